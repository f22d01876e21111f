"""Tiny run configs for end-to-end tests: the demo recipe shrunk until a training step takes milliseconds.

Used two ways:
  * in-process: `tiny_config(vocab=False, **overrides)` returns an ml_collections ConfigDict;
  * as a config file for `python -m v2flow_jax.main --config=tests/tiny_configs.py[:vocab]`, so a
    subprocess run takes the same numbers (single fields still overridable with `--config.x=...`).

32^2 pixels in 4x4 patches (8x8 latent of 48 channels, 64 tokens), the 'tiny' MAR, a 16-wide one-block
resampler, 64 codes, a 32x1 velocity MLP and a 2-step sampler. The vocab variant uses a RANDOM 64x32
vocabulary table (vocabulary.checkpoint=''), so no pretrained weights are needed.
"""
from __future__ import annotations

import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(REPO_ROOT, "tests", "tiny_configs.py")


def tiny_config(vocab: bool = False, **overrides):
    from v2flow_jax import demo_config
    c = demo_config.get_config()
    c.image_size = 32
    c.autoencoder.patch_size = 4
    c.model.update(latent_size=8, latent_channels=48, preset="tiny", resampler_width=16, resampler_depth=1,
                   token_dim=16, vocab_size=0, generator_rank=0, codebook_size=64, velocity_width=32,
                   velocity_depth=1, dropout=0.0)
    # The settings the tiny tests' margins were measured with (the demo has since moved to a weaker
    # vocabulary term, token_skip, the token readout, one noise draw per token and the mean decode; those
    # are covered by their own tests and by the demo's figures).
    c.model.update(vocab_info_weight=0.1, token_skip=False, diffusion_batch_mul=4, token_recon_weight=0.0)
    c.sampler.update(decode="sample", cfg_scale=2.9)
    if vocab:
        c.model.update(vocab_size=64, vocab_dim=32, generator_rank=0)
    c.vocabulary.checkpoint = ""
    c.sampler.update(num_ar_steps=2, solver_steps=2)
    c.data.update(source="demo", image_size=32, worker_count=0, read_threads=2)
    c.batch_size = 8
    c.num_steps = 8
    c.optim.update(warmup_steps=2)   # the demo's peak learning rate 2e-3 at batch 8
    c.log_every = 2
    c.eval_every = 1_000_000
    c.checkpoint_every = 4
    c.keep_checkpoints = 3
    c.eval.update(num_images=3, batch_size=3, grid_images=3, at_start=False)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    return apply_overrides(c, overrides)


def apply_overrides(c, overrides: dict):
    """Sets dotted fields, e.g. {"model.preset": "tiny"}, as --config.model.preset would."""
    for dotted, value in overrides.items():
        target = c
        *parents, leaf = dotted.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def get_config(arg: str = ""):
    """Config-file entry: '' (no vocabulary) or 'vocab' (random 64 x 32 vocabulary table)."""
    if arg not in ("", "vocab"):
        raise ValueError(f"tests/tiny_configs.py: unknown argument {arg!r}; use '' or 'vocab'.")
    return tiny_config(vocab=arg == "vocab")


# ------------------------------------------------------------------------------ subprocess helpers
def main_command(workdir, *flags: str, arg: str = "") -> list[str]:
    spec = CONFIG_FILE + (f":{arg}" if arg else "")
    return [sys.executable, "-m", "v2flow_jax.main", f"--config={spec}", f"--workdir={workdir}", *flags]


def main_env(devices: int = 1, cache_dir=None) -> dict:
    """Environment of a subprocess run: `devices` virtual CPU devices; with `cache_dir`, JAX's persistent
    compilation cache (the runs of one test session share their compiled train / eval steps)."""
    env = dict(os.environ)
    # LLVM -O0 for the CPU backend: the same programs, compiled ~4x faster (compilation, not the
    # tiny steps, is what a short test run spends its time on).
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    env["JAX_PLATFORMS"] = "cpu"
    if cache_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = os.fspath(cache_dir)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def run_main(workdir, *flags: str, arg: str = "", devices: int = 1, cache_dir=None, timeout: float = 600,
             check: bool = True) -> subprocess.CompletedProcess:
    """Runs `python -m v2flow_jax.main` on the tiny config; returns the completed process (output in .stdout)."""
    proc = subprocess.run(main_command(workdir, *flags, arg=arg), cwd=REPO_ROOT, env=main_env(devices, cache_dir),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"v2flow_jax.main exited with {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc


# ------------------------------------------------------------------ the run the tests share
# The tiny config with its vocabulary, 40 steps from an evaluation at step 0, a checkpoint every 4 steps: long enough for the PSNR to rise
# (tests/test_train.py) and for a run to be killed mid-way, short enough for seconds of training.
SHARED_STEPS = 40
SHARED_FLAGS = (f"--config.num_steps={SHARED_STEPS}", "--config.eval.at_start=True", "--config.checkpoint_every=4",
                "--config.log_every=10")
SHARED_ARG = "vocab"      # with the (random) vocabulary table: the full encode path
_SHARED: dict = {}


def compile_cache(tmp_path_factory):
    """One persistent-compilation-cache folder for all subprocess runs of the pytest session."""
    path = tmp_path_factory.getbasetemp() / "jax_compilation_cache"
    path.mkdir(exist_ok=True)
    return path


def shared_run(tmp_path_factory):
    """(workdir, log) of one uninterrupted tiny training run, trained once per pytest process."""
    if "workdir" not in _SHARED:
        workdir = tmp_path_factory.mktemp("shared_run")
        proc = run_main(workdir, *SHARED_FLAGS, arg=SHARED_ARG, cache_dir=compile_cache(tmp_path_factory))
        _SHARED.update(workdir=workdir, log=proc.stdout)
    return _SHARED["workdir"], _SHARED["log"]


# ------------------------------------------------------ mesh equivalence (run in a subprocess)
def train_steps(config, devices, batches):
    """The real jitted train step (train.compile_train_step) on `devices`: per-step metrics, state, frozen."""
    import jax
    from v2flow_jax import build, sharding, train, train_state
    run = build.build_run(config, devices=devices)
    tx = train.make_optimizer(config)
    state, state_sh = train_state.init_state(run, tx, config.seed)
    step_fn, _ = train.compile_train_step(run, tx, state, state_sh, sharding.put_batch(batches[0], run.mesh))
    metrics = []
    for batch in batches:
        state, m = step_fn(state, sharding.put_batch(batch, run.mesh), run.constants)
        metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    return metrics, state, run.frozen


def mesh_equivalence(out_path, num_steps: int = 3):
    """Trains the vocab config `num_steps` steps on 1 device and on a (data 2, fsdp 2, tensor 2) mesh of
    8 devices from the same batches; writes both metric curves, the final parameters and how the 8-device
    state is laid out to `out_path` (.npz) for tests/test_train.py to compare."""
    import json
    import jax
    import numpy as np
    from v2flow_jax import input_pipeline
    assert jax.device_count() == 8, jax.devices()
    one = tiny_config(vocab=True, mesh=[("data", 1), ("fsdp", 1), ("tensor", 1)])
    eight = tiny_config(vocab=True, mesh=[("data", 2), ("fsdp", 2), ("tensor", 2)])
    it, _ = input_pipeline.create_dataset(one.data, split="train", batch_size=one.batch_size, seed=0, train=True)
    batches = [{"image": next(it)["image"]} for _ in range(num_steps)]
    m1, s1, _ = train_steps(one, jax.devices()[:1], batches)
    m8, s8, frozen8 = train_steps(eight, jax.devices(), batches)
    flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(jax.device_get(x))
                         for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    layout = {"param_specs": [str(x.sharding.spec) for x in jax.tree.leaves(s8.params)],
              "param_devices": [len(x.sharding.device_set) for x in jax.tree.leaves(s8.params)],
              "frozen_replicated": [bool(x.sharding.is_fully_replicated) for x in jax.tree.leaves(frozen8)]}
    arrays = {f"one{k}": v for k, v in flat(s1.params).items()}
    arrays.update({f"eight{k}": v for k, v in flat(s8.params).items()})
    np.savez(out_path, metrics=json.dumps({"one": m1, "eight": m8, "layout": layout}), **arrays)


if __name__ == "__main__":
    if sys.argv[1:2] == ["mesh_equivalence"]:
        mesh_equivalence(sys.argv[2])
    else:
        raise SystemExit(f"usage: python {__file__} mesh_equivalence OUT.npz")
