"""Several JAX processes on one machine (jax.distributed on 127.0.0.1, CPU collectives over gloo).

The same tiny run as 1 process x 8 devices and as 2 processes x 4 devices, same global batch: the same
losses at every step, the same evaluation, the same parameters; each one's checkpoint resumed on the
other process count; and the latent cache written by 2 processes holding the same records as by 1.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess

import numpy as np
import pytest

import tiny_configs
from test_train import _assert_trees_close
from v2flow_jax.data import latent_records

STEPS = 6
FLAGS = (f"--config.num_steps={STEPS}", "--config.log_every=1", "--config.checkpoint_every=3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(workdir, num_processes: int, *flags: str, cache_dir=None, timeout: float = 600) -> list[str]:
    """`python -m v2flow_jax.main` on the vocab tiny config as `num_processes` processes of 8 / n devices
    each (one process: no jax.distributed); returns each process's output."""
    devices = 8 // num_processes
    cmd = tiny_configs.main_command(workdir, *flags, arg="vocab")
    if num_processes > 1:
        cmd += ["--jax_distributed", f"--coordinator_address=127.0.0.1:{_free_port()}",
                f"--num_processes={num_processes}"]
    procs = []
    for i in range(num_processes):
        extra = [f"--process_id={i}"] if num_processes > 1 else []
        procs.append(subprocess.Popen(cmd + extra, cwd=tiny_configs.REPO_ROOT,
                                      env=tiny_configs.main_env(devices, cache_dir), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for i, (proc, out) in enumerate(zip(procs, outs)):
        assert proc.returncode == 0, f"process {i} of {num_processes} exited with {proc.returncode}:\n{out[-5000:]}"
    return outs


def _load_state(workdir, step):
    """A checkpoint's state as numpy on this process's first device, whatever devices wrote it."""
    import jax
    import orbax.checkpoint as ocp
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    checkpointer = ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          checkpointer.metadata(path).item_metadata.tree)
    return jax.tree.map(np.asarray, checkpointer.restore(path, target))


def _losses(log: str) -> list[float]:
    return [float(x) for x in re.findall(r"step \d+/\d+  loss (\d+\.\d+)", log)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(workdir, outputs) of the tiny run as 1 x 8 and as 2 x 4."""
    cache = tiny_configs.compile_cache(tmp_path_factory)
    out = {}
    for n in (1, 2):
        workdir = tmp_path_factory.mktemp(f"procs{n}")
        out[n] = workdir, run_processes(workdir, n, *FLAGS, cache_dir=cache)
    return out


def test_two_processes_train_and_evaluate_like_one(runs):
    (one_dir, one_logs), (two_dir, two_logs) = runs[1], runs[2]
    one, two = _losses(one_logs[0]), _losses(two_logs[0])
    assert len(one) == STEPS and one == two == _losses(two_logs[1]), (one, two)   # printed to 4 decimals
    assert "2 process(es), 8 device(s)" in two_logs[0], two_logs[0][-3000:]
    # Evaluation gathered across hosts: the same images, scores and codes as one process.
    a = json.loads((one_dir / "metrics.json").read_text())["latest"]
    b = json.loads((two_dir / "metrics.json").read_text())["latest"]
    for key in ("num_images", "psnr", "ssim", "psnr_swapped", "psnr_floor_grey", "codebook_usage",
                "codebook_perplexity", "vocab_perplexity"):
        assert a[key] == pytest.approx(b[key], abs=1e-5), key
    # One checkpoint written by both processes together (each its own data-iterator state).
    data_files = sorted(f for f in os.listdir(two_dir / "checkpoints" / str(STEPS) / "data") if f.startswith("process"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
    _assert_trees_close(_load_state(one_dir, STEPS), _load_state(two_dir, STEPS), atol=1e-5)


def test_checkpoints_resume_on_the_other_process_count(runs, tmp_path, tmp_path_factory):
    """1-process checkpoint continued by 2 processes, 2-process checkpoint by 1: the same state after."""
    import shutil
    cache = tiny_configs.compile_cache(tmp_path_factory)
    more = (f"--config.num_steps={STEPS + 1}", "--config.log_every=1", "--config.checkpoint_every=3",
            "--config.restore_data_state=False")     # a data position is per process count
    ends = {}
    for saved, resumed_on in ((1, 2), (2, 1)):
        workdir = tmp_path / f"saved{saved}_on{resumed_on}"
        shutil.copytree(runs[saved][0], workdir)
        logs = run_processes(workdir, resumed_on, *more, cache_dir=cache)
        assert f"at step {STEPS}." in logs[0] and f"step {STEPS + 1}/{STEPS + 1}" in logs[0], logs[0][-3000:]
        ends[saved] = _load_state(workdir, STEPS + 1)
    _assert_trees_close(ends[1], ends[2], atol=1e-5)


def _records(out_dir) -> dict[str, list[bytes]]:
    by_host: dict[str, list[bytes]] = {}
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".array_record"):
            host = name.split("-")[1]
            by_host.setdefault(host, []).extend(np.asarray(r).tobytes() for r in
                                                latent_records.iterate_latent_shard(os.path.join(out_dir, name)))
    return by_host


def test_latent_cache_of_two_processes_holds_the_records_of_one(tmp_path, tmp_path_factory):
    cache = tiny_configs.compile_cache(tmp_path_factory)
    flags = ("--config.mode=cache_latents", "--config.cache.images_per_part=2")
    caches = {}
    for n in (1, 2):
        run_processes(tmp_path / f"cache{n}", n, *flags, cache_dir=cache)
        caches[n] = _records(tmp_path / f"cache{n}" / "latents")
    assert list(caches[1]) == ["host000"] and list(caches[2]) == ["host000", "host001"]
    one = caches[1]["host000"]
    two = caches[2]["host000"] + caches[2]["host001"]
    assert len(set(one)) == len(one) > 8                      # each image and its flip, once
    assert not set(caches[2]["host000"]) & set(caches[2]["host001"])   # disjoint shards
    assert sorted(two) == sorted(one)                         # complete: the same records


def test_sigterm_to_one_process_stops_all_at_one_agreed_step(tmp_path, tmp_path_factory):
    """JAX's preemption service spreads one host's SIGTERM: every process saves the same step, exits 0."""
    import signal
    import time
    workdir = tmp_path / "preempted"
    cmd = tiny_configs.main_command(workdir, "--config.num_steps=200", "--config.log_every=5",
                                    "--config.checkpoint_every=10", arg="vocab")
    cmd += ["--jax_distributed", f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=2"]
    env = tiny_configs.main_env(4, tiny_configs.compile_cache(tmp_path_factory))
    procs = [subprocess.Popen(cmd + [f"--process_id={i}"], cwd=tiny_configs.REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 600
        while not (workdir / "checkpoints" / "10").is_dir() and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)          # the notice reaches one host only
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    stopped = {int(m) for out in outs for m in re.findall(r"Preempted: checkpoint at step (\d+)", out)}
    assert len(stopped) == 1, outs[0][-3000:]
    step = stopped.pop()
    assert 10 <= step < 200 and (workdir / "checkpoints" / str(step)).is_dir()
