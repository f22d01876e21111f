"""Keep freed host memory in the process so XLA:CPU's per-execution buffers stop page-faulting.

XLA:CPU allocates every execution's temporary buffer (and each output that is not donated) afresh.
glibc serves blocks that large by mmap, from the calling thread's arena, and unmaps them on free,
so the next step faults in every page again: ~42 k minor faults (~180 MB) per step in the
release-sized training benchmark (~28 k without the vocabulary), an eighth to a quarter of its step
time on a 2-core VM. With one arena, no mmap for large blocks and no trimming, freed blocks are
reused and the faults go away. The cost:
the process keeps its high-water mark of host memory instead of handing it back to the OS.

`apply_default()` applies this when JAX will run on the CPU (no TPU/GPU plugin installed and
JAX_PLATFORMS not naming an accelerator); V2FLOW_RETAIN_HOST_MEMORY=1 forces it, =0 turns it off.
`python -m v2flow_jax.main`, the benchmarks and the test suite call it; importing v2flow_jax does not
(no side effects at import), so a Python user who wants it calls `host_memory.apply_default()` first.
It must happen before the first JAX computation: threads that already own an arena keep it.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys

ENV_SWITCH = "V2FLOW_RETAIN_HOST_MEMORY"
# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_NEVER_TRIM = 2 ** 31 - 1       # mallopt takes an int
_ACCELERATOR_PACKAGES = ("libtpu", "jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm")

_state = {"applied": None}


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it (musl has no mallopt arenas)
        return libc
    except (OSError, AttributeError):
        return None


def accelerator_expected() -> bool:
    """True when JAX will likely run on a TPU/GPU: JAX_PLATFORMS names one first, or a plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() not in ("cpu", "")
    names = (d.metadata.get("Name", "") or "" for d in importlib.metadata.distributions())
    return any(n.lower().startswith(_ACCELERATOR_PACKAGES) for n in names)


def retain_freed_memory() -> bool:
    """One malloc arena, no mmap'd blocks, no trimming. True where it took effect (glibc); idempotent."""
    if _state["applied"] is None:
        libc = _glibc()
        ok = libc is not None and all(libc.mallopt(param, value) == 1 for param, value in (
            (M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, _NEVER_TRIM)))
        _state["applied"] = bool(ok)
    return _state["applied"]


def applied() -> bool:
    """Whether this process keeps its freed memory (set by `apply_default` or `retain_freed_memory`)."""
    return bool(_state["applied"])


def apply_default() -> bool:
    """What `main` does first: retain on CPU-only installs unless V2FLOW_RETAIN_HOST_MEMORY says otherwise."""
    switch = os.environ.get(ENV_SWITCH, "auto").strip().lower()
    if switch in ("0", "false", "no", "off"):
        return False
    if switch in ("1", "true", "yes", "on") or not accelerator_expected():
        return retain_freed_memory()
    return False
