"""host_memory: with freed memory retained, repeated XLA:CPU executions stop page-faulting their buffers.

Each case runs in a fresh interpreter (malloc settings are per process and must precede the first
computation) and allocates, fills and frees a block the size of a train step's XLA temp buffer three
times on a worker thread, as XLA does; the default case shows the faults the setting removes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from v2flow_jax import host_memory

PROBE = r"""
import ctypes, json, resource, threading
import sys
import v2flow_jax
from v2flow_jax import host_memory
assert host_memory._state["applied"] is None      # importing the package changes nothing
if sys.argv[1] == "apply":
    host_memory.apply_default()                   # what main does first
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
SIZE = 256 * 2**20       # an XLA:CPU temp buffer of the release-sized train step is ~180 MB
faults = []

def worker():            # XLA allocates on its worker threads, which get their own malloc arena
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(SIZE)
        libc.memset(block, 1, SIZE)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        libc.free(block)

thread = threading.Thread(target=worker)
thread.start()
thread.join()
print(json.dumps({"applied": host_memory._state["applied"], "faults": faults}))
"""


def _probe(switch: str, apply: bool = True) -> dict:
    env = dict(os.environ, **{host_memory.ENV_SWITCH: switch, "JAX_PLATFORMS": "cpu"})
    out = subprocess.run([sys.executable, "-c", PROBE, "apply" if apply else "import-only"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_retained_memory_removes_page_faults():
    pages = 256 * 2**20 / os.sysconf("SC_PAGE_SIZE")
    default = _probe("0")
    retained = _probe("auto")                # CPU-only install: auto turns it on
    imported = _probe("auto", apply=False)   # only imported: untouched
    assert default["applied"] is None and retained["applied"] is True and imported["applied"] is None
    assert min(imported["faults"]) > 0.9 * pages, imported
    # Every allocation of the block faults all its pages in again by default ...
    assert min(default["faults"]) > 0.9 * pages, default
    # ... and only the first one does once freed memory is kept.
    assert retained["faults"][0] > 0.9 * pages and max(retained["faults"][1:]) < 0.01 * pages, retained


def test_accelerator_platforms_leave_malloc_alone(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert host_memory.accelerator_expected()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not host_memory.accelerator_expected()
