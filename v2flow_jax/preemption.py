"""Preemption: stop at a step boundary every process agrees on, after a checkpoint, and exit 0.

A Cloud TPU maintenance event or a scheduler's eviction arrives as SIGTERM, some time before the kill.
With several JAX processes (`jax.distributed.initialize`), JAX's preemption service already catches it
on the process that got it and spreads the notice through the coordinator; every process then calls
`reached_preemption_sync_point(step)` at each step and gets True at the same, agreed step. With one
process there is no coordinator, so a SIGTERM handler sets a flag that the next step boundary reads.
Either way the caller saves (force) at that step and returns; rerunning the same command resumes.
"""
from __future__ import annotations

import signal
import threading

from absl import logging


def _distributed() -> tuple[bool, bool]:
    """(several processes, JAX's preemption service running)."""
    from jax._src import distributed    # the public API has no "is initialized" query
    state = distributed.global_state
    return state.client is not None, state.preemption_sync_manager is not None


class PreemptionWatch:
    """`with PreemptionWatch() as watch: ... if watch.reached(step): save and stop`."""

    def __init__(self):
        self._signalled = threading.Event()
        self._previous = None
        self._multi = False

    def __enter__(self) -> "PreemptionWatch":
        self._multi, service = _distributed()
        if self._multi and not service:
            logging.warning("JAX's preemption service is off (jax_enable_preemption_service=False): a SIGTERM will "
                            "end this multi-process run without a checkpoint.")
            self._multi = None     # nothing to ask, and no local flag: hosts must agree on the step
        # Several processes: JAX's preemption service owns SIGTERM; a Python handler would replace its own.
        if self._multi is False and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum, frame) -> None:
        if not self._signalled.is_set():
            logging.warning("SIGTERM received: saving a checkpoint at the next step boundary, then exiting.")
        self._signalled.set()

    def reached(self, step: int) -> bool:
        """True at the step boundary where the run must save and stop. With several processes every process
        must call this at every step (it is a collective agreement on the step)."""
        if self._multi is None:
            return False
        if self._multi:
            from jax.experimental import multihost_utils
            return bool(multihost_utils.reached_preemption_sync_point(int(step)))
        return self._signalled.is_set()
