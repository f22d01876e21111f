"""Training the tokenizer: `train_and_evaluate(config, workdir)` (big_vision / flax-examples style).

The state is created sharded (eval_shape -> jit with out_shardings), the step is one pure, donated,
jitted function with explicit shardings, and everything that defines where a run stands (params,
optimizer, weight EMA, quantizer statistics, step, rng, data-iterator position) goes into the
checkpoint, so a killed run restarted with the same command continues exactly where it stopped.
"""
from __future__ import annotations

import contextlib
import functools
import re
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from v2flow_jax import build, checkpointing, evaluate, input_pipeline, preemption, sharding, train_state
from v2flow_jax.models import autoencoders

# Dense peak FLOP/s per device for the utilisation figure (bf16 for accelerators; the CPU figure is
# the f32 matmul rate measured on the project's 2-core development machine).
PEAK_FLOPS = {"cpu": 200e9, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "TPU v5": 459e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


# ------------------------------------------------------------------------------------ optimizer
def learning_rate_schedule(config) -> optax.Schedule:
    peak = config.optim.base_lr * config.batch_size / 256
    warmup = max(int(config.optim.warmup_steps), 0)
    if config.optim.schedule == "constant":
        after = optax.constant_schedule(peak)
    else:
        after = optax.cosine_decay_schedule(peak, max(config.num_steps - warmup, 1), alpha=config.optim.min_lr_ratio)
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def decay_mask(params):
    """Weight decay on matrices and tables only: biases, norm scales and single vectors are exempt."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(config) -> optax.GradientTransformation:
    o = config.optim
    tx = optax.chain(
        optax.clip_by_global_norm(o.grad_clip),
        optax.adamw(learning_rate_schedule(config), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask),
    )
    if not o.frozen_params:
        return tx
    pattern = re.compile(o.frozen_params)
    labels = lambda params: jax.tree_util.tree_map_with_path(
        lambda p, _: "frozen" if pattern.search(_path(p)) else "train", params)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


# ------------------------------------------------------------------------------------- the step
def batch_latents(run: build.Run, ae_params, batch):
    if "latent" in batch:
        return batch["latent"].astype(jnp.float32) * run.autoencoder.scale
    return autoencoders.images_to_latents(run.autoencoder, ae_params, batch["image"])


def train_step(run: build.Run, tx, state: train_state.TrainState, batch, constants):
    """One optimizer step. Pure: (state, batch, run.constants) -> (new state, metrics)."""
    model = run.model
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    sample_rng, dropout_rng = jax.random.split(rng)
    latents = batch_latents(run, constants["autoencoder"], batch)

    def loss_fn(params):
        variables = {"params": params, "vq": state.vq, "frozen": constants["frozen"]}
        (loss, aux), updates = model.apply(variables, latents, train=True, mutable=["vq"],
                                           rngs={"sample": sample_rng, "dropout": dropout_rng})
        return loss, (aux, updates["vq"])

    (loss, (aux, vq)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply_update(state):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            d = ema_decay_at(run.config.ema_decay, state.step)
            ema = optax.incremental_update(params, ema, step_size=1.0 - d)   # d * ema + (1 - d) * params
        return state.replace(params=params, opt_state=opt_state, ema_params=ema, vq=vq)

    # NaN/inf guard: a bad step leaves the model untouched (and is counted); the host stops the run
    # after config.max_nonfinite_steps bad steps in a row. A branch, not a per-leaf select: selecting
    # between old and new state costs a pass over every tensor and forces copies of the donated ones.
    new_state = jax.lax.cond(finite, apply_update, lambda state: state, state)
    new_state = new_state.replace(step=state.step + 1)
    metrics = {**aux, "grad_norm": grad_norm, "param_norm": optax.tree.norm(new_state.params),
               "learning_rate": learning_rate_schedule(run.config)(state.step), "nonfinite": 1.0 - finite}
    return new_state, metrics


def ema_decay_at(decay: float, step):
    """The weight EMA's decay at a step: min(decay, (1 + step) / (10 + step)) (TF's num_updates rule).

    Without the warm-up an early EMA is mostly the initial weights (0.9999 keeps 97% of them after
    300 steps), and an evaluation of it measures an untrained decoder.
    """
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def lower_train_step(run: build.Run, tx, state, state_sh, batch):
    """The step jitted with explicit shardings and state donation, lowered for (state, batch, run.constants);
    the arguments may be arrays or sharded ShapeDtypeStructs (mode=plan lowers for devices it has not got)."""
    batch_sh = jax.tree.map(lambda x: sharding.batch_sharding(run.mesh, x.ndim), batch)
    constants = run.constants
    constants_sh = jax.tree.map(lambda x: x.sharding, constants)
    step_fn = jax.jit(functools.partial(train_step, run, tx), in_shardings=(state_sh, batch_sh, constants_sh),
                      out_shardings=(state_sh, sharding.replicated(run.mesh)), donate_argnums=(0,))
    with sharding.use_mesh(run.mesh, run.rules):
        return step_fn.lower(state, batch, constants)


def compile_train_step(run: build.Run, tx, state, state_sh, batch):
    """Returns (compiled step, flops per step); call it as `step_fn(state, batch, run.constants)`."""
    compiled = lower_train_step(run, tx, state, state_sh, batch).compile()
    return compiled, flops_of(compiled)


def flops_of(compiled) -> float:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0))
    except Exception:  # cost analysis is best effort on some backends
        return 0.0


def peak_flops(config) -> float:
    if config.peak_flops_per_device:
        return float(config.peak_flops_per_device)
    return peak_flops_of(jax.devices()[0])


def peak_flops_of(device) -> float:
    """The table's figure for a device's kind (libtpu calls v5p 'TPU v5', after the 'TPU v5 lite' entry)."""
    for name, value in PEAK_FLOPS.items():
        if device.device_kind.startswith(name):
            return value
    return PEAK_FLOPS.get(device.platform, 0.0)


# ---------------------------------------------------------------------------------------- the loop
def _host_batch(it):
    batch = next(it)
    return {k: v for k, v in batch.items() if k in ("image", "latent")}


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains for config.num_steps (resuming from workdir), evaluating and checkpointing on the way.

    Everything that can be checked from the config, the files and the shapes is checked before the
    state is allocated; each checkpoint is written before the evaluation at the same step; the
    checkpointer is closed on every path, so an error is the last thing printed. Returns the last
    evaluation's metrics.
    """
    run = build.build_run(config)           # validates every section of the config
    build.check_vocabulary(run)             # the table's file and shape, before any allocation
    tx = make_optimizer(config)
    per_host_batch = config.batch_size // jax.process_count()
    train_iter, num_train = input_pipeline.create_dataset(config.data, split="train", batch_size=per_host_batch,
                                                          seed=config.seed, train=True)
    evaluator = evaluate.Evaluator(run, workdir)
    evaluator.check_data()
    abstract, state_sh = train_state.abstract_train_state(run, tx, config.seed)
    ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints,
                                      save_interval_steps=config.checkpoint_every)
    try:
        with preemption.PreemptionWatch() as watch:
            result = _train(run, tx, ckpt, train_iter, num_train, evaluator, abstract, state_sh, workdir, watch)
    except BaseException:   # Ctrl-C included: close, then let the real error be the last thing printed
        _close_quietly(ckpt)
        raise
    ckpt.close()
    return result


@contextlib.contextmanager
def _interrupt_after():
    """Holds a Ctrl-C back until the block ends: a KeyboardInterrupt inside orbax's save leaves its writer
    threads half-started, and their errors then print after the user's traceback."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _close_quietly(ckpt) -> None:
    """Finishes the pending write (the step saved before a failing evaluation is kept), then closes the
    checkpointer; on this error path its own errors are logged and must not hide the real one."""
    for what, fn in (("Finishing the last checkpoint write", ckpt.wait), ("Closing the checkpointer", ckpt.close)):
        try:
            fn()
        except Exception as e:  # e.g. a full disk fails the pending write too
            logging.warning("%s after the error below also failed: %s: %s", what, type(e).__name__, e)


def _restore(ckpt, config, abstract, train_iter):
    """The newest intact checkpoint as (state, step), or (None, 0); restores the iterator state too."""
    try:
        restored = ckpt.restore_latest(abstract_state=abstract, data_iterator=train_iter,
                                       restore_data=config.restore_data_state)
    except checkpointing.DataStateMismatchError as e:
        cause = e.__cause__ or e
        raise ValueError(
            f"Checkpoint step {e.step} in {ckpt.directory} holds a data-iterator position that does not fit the "
            f"current data: {describe_data_change(e.config, config)} ({type(cause).__name__}: {cause}). To resume "
            "the model and restart the data stream from its beginning, add --config.restore_data_state=False.") from e
    if restored is None:
        return None, 0
    step, state, data_restored, saved_config = restored   # train_iter is restored in place
    warn_config_changes(saved_config, config)
    if not data_restored and not config.restore_data_state:
        logging.info("config.restore_data_state=False: the data stream restarts from its beginning.")
    logging.info("Resumed from %s at step %d.", ckpt.directory, step)
    return state, step


# Settings that may change on resume without changing any shape: a change is allowed, and said.
RESUME_SENSITIVE = ("batch_size", "num_steps", "ema_decay", "seed", "optim.base_lr", "optim.warmup_steps",
                    "optim.schedule", "optim.weight_decay", "optim.grad_clip", "optim.b1", "optim.b2",
                    "optim.min_lr_ratio", "optim.frozen_params")


def config_changes(saved: dict | None, config, keys=RESUME_SENSITIVE) -> list[str]:
    """'key: saved -> now' for each of `keys` whose value differs from the checkpoint's config."""
    if not saved:
        return []
    now = flatten_config(config)
    then = flatten_config(saved)
    return [f"{k}: {then[k]!r} -> {now[k]!r}" for k in keys if k in then and k in now and then[k] != now[k]]


def warn_config_changes(saved: dict | None, config) -> None:
    changes = config_changes(saved, config)
    if changes:
        logging.warning("Resuming with settings that differ from the checkpoint's (training continues with the new "
                        "ones): %s", "; ".join(changes))


def describe_data_change(saved: dict | None, config) -> str:
    keys = ["seed", "batch_size"] + [f"data.{k}" for k in config.data.keys()]
    changes = config_changes(saved, config, keys)
    if changes:
        return "changed since the checkpoint: " + "; ".join(changes)
    return ("the data settings are unchanged, so the data itself changed (files added to or removed from the "
            "folder, another dataset version)")


def _train(run, tx, ckpt, train_iter, num_train, evaluator, abstract, state_sh, workdir, watch) -> dict:
    from clu import metric_writers
    config = run.config
    state, start = _restore(ckpt, config, abstract, train_iter)
    if state is None:
        state, _ = train_state.init_state(run, tx, config.seed)
    start = int(state.step)
    if start >= config.num_steps:
        logging.info("The run in %s already finished at step %d (config.num_steps=%d): nothing to do. Raise "
                     "--config.num_steps to train further; its evaluations are in metrics.json.", workdir, start,
                     config.num_steps)
        return _latest_metrics(workdir)

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if start == 0:
        writer.write_hparams({k: v for k, v in flatten_config(config).items()})
    metrics_json = {}
    evaluate_at = lambda step: evaluator.run(train_state.state_params(state, config), state.vq, step=step,
                                             writer=writer, input_stats=train_iter.stats.as_dict())
    if start == 0 and config.eval.at_start:
        metrics_json = evaluate_at(0)

    batch = sharding.put_batch(_host_batch(train_iter), run.mesh)
    step_fn, flops = compile_train_step(run, tx, state, state_sh, batch)
    constants = run.constants
    peak = peak_flops(config) * jax.device_count()
    logging.info("Train step: %.3g GFLOP per step (XLA cost analysis), %d training records, global batch %d.",
                 flops / 1e9, num_train, config.batch_size)

    bad_in_a_row, t_last, steps_since = 0, time.perf_counter(), 0
    for step in range(start, config.num_steps):
        if step > start:
            batch = sharding.put_batch(_host_batch(train_iter), run.mesh)
        state, metrics = step_fn(state, batch, constants)
        done = step + 1
        steps_since += 1
        if done % config.log_every == 0 or done == config.num_steps:
            metrics = jax.device_get(metrics)
            bad_in_a_row = bad_in_a_row + 1 if metrics["nonfinite"] else 0
            elapsed = time.perf_counter() - t_last
            step_time = elapsed / steps_since
            scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
            scalars.update(step_time_s=step_time, images_per_s=config.batch_size / step_time,
                           mfu=(flops / step_time / peak) if peak and flops else 0.0)
            writer.write_scalars(done, scalars)
            log_step(done, config.num_steps, scalars, config.model.codebook_size, train_iter.stats.summary())
            t_last, steps_since = time.perf_counter(), 0
            if bad_in_a_row >= config.max_nonfinite_steps:
                raise FloatingPointError(f"{bad_in_a_row} log steps in a row had a NaN/inf loss or gradient at step "
                                         f"{done}; lower config.optim.base_lr or use model.dtype='float32'.")
        last = done == config.num_steps
        preempted = not last and watch.reached(done)    # every process calls it at every step
        if last or preempted or ckpt.due(done):  # the iterator's position is read by save, only when it writes
            with _interrupt_after():
                ckpt.save(done, state, data_iterator=train_iter, config=config, force=last or preempted)
        if preempted:
            ckpt.wait()
            writer.flush()
            logging.warning("Preempted: checkpoint at step %d of %d written to %s; run the same command to resume.",
                            done, config.num_steps, workdir)
            return {"preempted_at_step": done, **metrics_json}
        if done % config.eval_every == 0 or last:   # after the save: a failing evaluation loses nothing
            metrics_json = evaluate_at(done)
    writer.flush()
    return metrics_json


COLLAPSE_PERPLEXITY = 2.0   # codebook perplexity of a training batch below which the tokens have collapsed


def log_step(done: int, num_steps: int, s: dict, codebook_size: int, input_summary: str) -> None:
    """One console line a log step, and a loud warning when the tokens collapse onto a few codes."""
    vocab = (f"  vocab H %.3f ppl %.0f I %.2f" % (s["vocab_entropy"], s["vocab_perplexity"], s["vocab_information"])
             if "vocab_entropy" in s else "")
    restarts = f"  restarted {int(s['restarted_codes'])}" if "restarted_codes" in s else ""
    readout = f", token readout {s['token_recon_loss']:.4f}" if "token_recon_loss" in s else ""
    logging.info("step %d/%d  loss %.4f (flow %.4f, commit %.2e%s)  codes: usage %.3f ppl %.1f%s%s  |g| %.3f  "
                 "lr %.2e  %.1f img/s  MFU %.1f%%  input: %s", done, num_steps, s["loss"], s["flow_loss"],
                 s["commit_loss"], readout, s["codebook_usage"], s["codebook_perplexity"], restarts, vocab, s["grad_norm"],
                 s["learning_rate"], s["images_per_s"], 100 * s["mfu"], input_summary)
    if s["codebook_perplexity"] < COLLAPSE_PERPLEXITY:
        logging.warning("step %d: the tokens have COLLAPSED: codebook perplexity %.2f of %d codes, so the decoder "
                        "cannot depend on them. Lower config.optim.base_lr, raise config.model.vocab_info_weight "
                        "or set config.model.dead_code_threshold.", done, s["codebook_perplexity"], codebook_size)


def _latest_metrics(workdir: str) -> dict:
    import json
    import os
    path = os.path.join(workdir, "metrics.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f).get("latest", {})


def flatten_config(config, prefix="") -> dict:
    out = {}
    for k, v in config.items():
        if hasattr(v, "items"):
            out.update(flatten_config(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
    return out
