"""launch/ scripts: --dry-run prints every command, with flags main.py defines, without running any."""
from __future__ import annotations

import os
import shlex
import subprocess

import tiny_configs

LAUNCH = os.path.join(tiny_configs.REPO_ROOT, "launch")


def _dry_run(script, *args, **env):
    proc = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env={**os.environ, **env},
                          cwd=tiny_configs.REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def _main_flags(command: list[str]) -> set[str]:
    return {a.split("=", 1)[0].lstrip("-") for a in command if a.startswith("--") and not a.startswith("--config.")}


def test_tpu_dry_run_prints_a_copy_and_a_start_per_slice():
    lines = _dry_run("tpu_pod.sh", "--dry-run", "--slices=2", TPU_NAME="v2flow", ZONE="us-east5-a",
                     BUCKET="gs://bucket", CONFIG="configs/tok512.py", EXTRA="--config.num_steps=10")
    commands = [shlex.split(line) for line in lines if line.startswith("gcloud")]
    per_slice = [("ssh", "v2flow-{}"), ("scp", "--recurse"), ("ssh", "v2flow-{}")]   # clear, copy, install
    want = [(a, b.format(i)) for i in range(2) for a, b in per_slice] + [("ssh", "v2flow-0"), ("ssh", "v2flow-1")]
    assert [(c[4], c[5]) for c in commands] == want
    assert [commands[i][-1].split(":")[0] for i in (1, 4)] == ["v2flow-0", "v2flow-1"]
    assert all("--worker=all" in c for c in commands)
    assert "rm -rf ~/v2flow_jax" in commands[0][-1] and "pip install" in commands[2][-1]
    start = commands[-2][-1].removeprefix("--command=")
    main = shlex.split(start.split("nohup ", 1)[1].split(" >", 1)[0])
    assert main[:3] == ["python3", "-m", "v2flow_jax.main"] and "--config=configs/tok512.py" in main
    assert "--workdir=gs://bucket/v2flow/tok512" in main and "--config.num_steps=10" in main
    assert "dry run: nothing was started" in lines[-3]


def test_gpu_dry_run_passes_the_coordinator_to_main():
    from v2flow_jax import main as main_module  # defines the flags
    del main_module
    from absl import flags
    lines = _dry_run("gpu_multinode.sh", "--dry-run", "configs/tok256.py", "/shared/run", "--config.num_steps=3",
                     COORDINATOR="10.0.0.1:12355", SLURM_NNODES="4", SLURM_NODEID="2")
    command = shlex.split(lines[-1])
    assert command[:3] == ["python", "-m", "v2flow_jax.main"]
    for flag in ("--coordinator_address=10.0.0.1:12355", "--num_processes=4", "--process_id=2", "--jax_distributed"):
        assert flag in command
    assert _main_flags(command) <= set(flags.FLAGS), _main_flags(command) - set(flags.FLAGS)
