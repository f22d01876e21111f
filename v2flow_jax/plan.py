"""mode=plan: will a config fit a TPU topology? Compile-only, on any machine, nothing allocated.

For each topology in `config.plan.topologies` ("v5e:16x16", "v5p:4x4x8", "2xv6e:8x8" for two slices)
libtpu describes the chips without hardware (`jax.experimental.topologies`), the mesh is built over
them from `config.mesh` (ICI axes within a slice, `config.plan.dcn_axis` across slices), and the real
jitted train step and the reconstruct sampler are lowered with their real shardings and compiled ahead
of time (`config.plan.stage='llm'`: the LLM stage's fine-tuning step instead, for the LLaMA shape in
`config.plan.llm`, with no weights read). The table gives, per device: parameter, optimizer and batch bytes (from the shardings), the
compiler's temporaries and peak, the chip's HBM, FLOPs per step and the step time they imply at the
chip's peak. A program over HBM is reported as "does not fit" with the compiler's figure.

Needs libtpu (`pip install "jax[tpu]"`, or the `plan` extra); it compiles for TPUs on a CPU host.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
from absl import logging

from v2flow_jax import api, build, sampling, sharding, train, train_state

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_bytes: float
    peak_flops: float     # dense bf16 per chip (train.PEAK_FLOPS)


# device_kind as libtpu reports it -> HBM per chip (Cloud TPU documentation).
HBM_BYTES = {"TPU v4": 32 * GiB, "TPU v5 lite": 16 * GiB, "TPU v5": 95 * GiB, "TPU v6 lite": 32 * GiB}

_TOPOLOGY = re.compile(r"^(?:(\d+)x)?(v\d+[a-z]*):(\d+(?:x\d+)+)$")


def parse_topology(spec: str) -> tuple[str, int]:
    """'2xv5e:16x16' -> ('v5e:16x16', 2); 'v5p:4x4x8' -> ('v5p:4x4x8', 1)."""
    m = _TOPOLOGY.match(spec.strip())
    if not m:
        raise ValueError(f"config.plan.topologies: {spec!r} is not a TPU topology; write it as 'v5e:16x16', "
                         "'v5p:4x4x8' or, for several slices, '2xv5e:16x16'.")
    return f"{m.group(2)}:{m.group(3)}", int(m.group(1) or 1)


def topology_devices(spec: str) -> list:
    """Compile-only devices of a named topology (no TPU needed, libtpu is)."""
    from jax.experimental import topologies
    name, slices = parse_topology(spec)
    try:
        kwargs = {"num_slices": slices} if slices > 1 else {}
        return list(topologies.get_topology_desc(name, "tpu", **kwargs).devices)
    except Exception as e:   # no libtpu, or a topology libtpu does not know
        raise RuntimeError(f"cannot describe TPU topology {spec!r} ({type(e).__name__}: {str(e)[:300]}). mode=plan "
                           "needs libtpu: pip install 'jax[tpu]' (it compiles for TPUs on a CPU host).") from e


def chip_of(device) -> Chip:
    kind = device.device_kind
    if kind not in HBM_BYTES:
        raise ValueError(f"no HBM figure for {kind!r}; known: {sorted(HBM_BYTES)} (v2flow_jax/plan.py HBM_BYTES).")
    return Chip(HBM_BYTES[kind], train.peak_flops_of(device))


# ------------------------------------------------------------------------------ abstract pieces
def abstract_run(config, devices) -> build.Run:
    """A Run over `devices` whose autoencoder weights and frozen tables are ShapeDtypeStructs: nothing is
    read or allocated, so the devices may be compile-only."""
    model, ae = build.build_model(config)          # validates the config
    mesh = build.make_run_mesh(config, devices)
    ae_shapes = jax.eval_shape(ae.init_params, jax.random.key(0))
    ae_params = train_state.abstract_state(ae_shapes, jax.tree.map(lambda _: sharding.replicated(mesh), ae_shapes))
    run = build.Run(config, mesh, sharding.rules_from_config(config), model,
                    sampling.SamplerConfig.from_config(config.sampler), ae, ae_params)
    run.__dict__["frozen"] = build.frozen_targets(run)   # in place of the cached property, which reads the file
    return run


def abstract_batch(run: build.Run, rows: int) -> dict:
    """What the input pipeline feeds the step: pixels in [-1, 1], or cached latents."""
    c = run.config
    if c.data.source == "latents":
        m = run.model.config
        shape, key = (rows, m.latent_size, m.latent_size, m.latent_channels), "latent"
    else:
        shape, key = (rows, c.image_size, c.image_size, 3), "image"
    return {key: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding.batch_sharding(run.mesh, 4))}


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard, from the sharding)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
    return total


# ------------------------------------------------------------------------------------ compiling
@dataclasses.dataclass
class Compiled:
    fits: bool
    argument_bytes: float = 0.0
    temp_bytes: float = 0.0
    peak_bytes: float = 0.0
    flops: float = 0.0
    message: str = ""


_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Oo]ut of memory")


def compile_report(lowered, hbm_bytes: float) -> Compiled:
    """Compiles a lowered program; an over-HBM program becomes fits=False with the compiler's message."""
    try:
        compiled = lowered.compile()
    except Exception as e:   # XLA raises JaxRuntimeError; only memory exhaustion is a verdict, the rest a bug
        if not _OOM.search(str(e)):
            raise
        return Compiled(fits=False, message=str(e).split("\n")[0][:300])
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    over = peak > hbm_bytes   # the compiler checks temporaries; arguments it may take as given
    return Compiled(fits=not over, argument_bytes=m.argument_size_in_bytes, temp_bytes=m.temp_size_in_bytes,
                    peak_bytes=peak, flops=train.flops_of(compiled),
                    message=f"peak {peak / GiB:.2f} GiB over HBM {hbm_bytes / GiB:.2f} GiB" if over else "")


def lower_reconstruct(run: build.Run, rows: int):
    """The API's jitted reconstruct (encode, AR rectified-flow decode, back to pixels) on `rows` images."""
    infer = train_state.abstract_inference_variables(run)
    images = jax.ShapeDtypeStruct((rows, run.config.image_size, run.config.image_size, 3), jnp.float32,
                                  sharding=sharding.batch_sharding(run.mesh, 4))
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(run.mesh))
    fn = jax.jit(functools.partial(api.reconstruct_images, run, cfg=run.sampler))
    with sharding.use_mesh(run.mesh, run.rules):
        return fn.lower(run.variables(infer["params"], infer["vq"]), run.ae_params, images, rng)


# --------------------------------------------------------------------------------------- report
def plan_topology(config, spec: str) -> dict:
    """One topology's row: devices, mesh, per-device bytes, FLOPs, step time at peak, fits or not."""
    devices = topology_devices(spec)
    chip = chip_of(devices[0])
    run = abstract_run(config, devices)
    tx = train.make_optimizer(config)
    state, state_sh = train_state.abstract_train_state(run, tx, config.seed)
    step = compile_report(train.lower_train_step(run, tx, state, state_sh, abstract_batch(run, config.batch_size)),
                          chip.hbm_bytes)
    row = {"topology": spec, "devices": len(devices), "chip": devices[0].device_kind, "mesh": dict(run.mesh.shape),
           "batch_per_device": config.batch_size / len(devices), "hbm_bytes": chip.hbm_bytes,
           "peak_flops": chip.peak_flops,
           "param_bytes": per_device_bytes(state.params) + per_device_bytes(state.ema_params or {}),
           "optimizer_bytes": per_device_bytes(state.opt_state) + per_device_bytes(state.vq),
           "frozen_bytes": per_device_bytes(run.constants),
           "train": dataclasses.asdict(step)}
    row["train"]["step_time_at_peak_s"] = step.flops / chip.peak_flops if step.flops else None
    row["train"]["max_batch_per_device"] = max_batch_estimate(row["batch_per_device"], step, chip.hbm_bytes)
    eval_rows = int(config.plan.eval_batch_size or config.eval.batch_size)
    eval_rows = max(sharding.data_parallel_size(run.mesh), eval_rows - eval_rows % sharding.data_parallel_size(run.mesh))
    row["eval_batch"] = eval_rows
    row["reconstruct"] = dataclasses.asdict(compile_report(lower_reconstruct(run, eval_rows), chip.hbm_bytes)) \
        if config.plan.reconstruct else None
    return row


def plan_llm_topology(config, spec: str) -> dict:
    """The LLM stage's fine-tuning step (lm/finetune.train_step, Adam on every weight) for the LLaMA shape
    in config.plan.llm, extended by config.plan.llm_visual_codes codes and 2 markers, on one topology."""
    from v2flow_jax.lm import finetune, llama
    devices = topology_devices(spec)
    chip = chip_of(devices[0])
    c = config.llm
    shape = dict(config.plan.llm)
    shape["vocab_size"] = int(shape["vocab_size"]) + int(config.plan.llm_visual_codes) + 2
    llm = llama.LlamaConfig(**shape, dtype=jnp.dtype(c.dtype), scan_layers=bool(c.scan_layers),
                            remat_policy=c.remat_policy)
    mesh = sharding.make_mesh(config.mesh, devices, dcn_axis=build.dcn_axis(config))
    if c.batch_size % sharding.data_parallel_size(mesh):
        raise ValueError(f"config.llm.batch_size={c.batch_size} must divide by the mesh's data-parallel size "
                         f"{sharding.data_parallel_size(mesh)} (mesh {dict(mesh.shape)}).")
    shardings = llama.param_shardings(llm, mesh)
    params = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                          llama.strip_boxes(llama.abstract_params(llm)), shardings)
    optimizer = finetune.Recipe(learning_rate=float(c.learning_rate), total_steps=int(c.num_steps),
                                warmup_fraction=float(c.warmup_fraction), grad_clip=float(c.grad_clip)).optimizer()
    with sharding.use_mesh(mesh):
        opt_state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                 jax.eval_shape(optimizer.init, params),
                                 finetune.opt_state_shardings(optimizer, params))
        seq = int(c.seq_len or config.plan.llm_seq_len)
        tokens = lambda dtype: jax.ShapeDtypeStruct((int(c.batch_size), seq), dtype,   # noqa: E731
                                                    sharding=sharding.batch_sharding(mesh, 2))
        batch = {"inputs": tokens(jnp.int32), "targets": tokens(jnp.int32), "loss_mask": tokens(jnp.float32)}
        step = compile_report(finetune.train_step.lower(llama.Llama(llm), optimizer, params, opt_state, batch),
                              chip.hbm_bytes)
    row = {"topology": spec, "devices": len(devices), "chip": devices[0].device_kind, "mesh": dict(mesh.shape),
           "batch_per_device": c.batch_size / len(devices), "sequence": seq, "hbm_bytes": chip.hbm_bytes,
           "peak_flops": chip.peak_flops, "param_bytes": per_device_bytes(params),
           "optimizer_bytes": per_device_bytes(opt_state), "frozen_bytes": 0, "train": dataclasses.asdict(step),
           "reconstruct": None}
    row["train"]["step_time_at_peak_s"] = step.flops / chip.peak_flops if step.flops else None
    row["train"]["max_batch_per_device"] = max_batch_estimate(row["batch_per_device"], step, chip.hbm_bytes)
    return row


def max_batch_estimate(batch_per_device: float, step: Compiled, hbm_bytes: float) -> int | None:
    """The batch per chip that would fill HBM, with temporaries linear in the batch (activations dominate
    them) and everything else fixed: an estimate to try, not a compiled figure."""
    if not step.peak_bytes or not step.temp_bytes:
        return None
    fixed = step.peak_bytes - step.temp_bytes
    return max(int((hbm_bytes - fixed) / (step.temp_bytes / batch_per_device)), 0)


def _gib(x) -> str:
    return f"{x / GiB:.2f}"


def format_rows(name: str, rows: list[dict]) -> str:
    head = ("| topology | chips | mesh | batch/chip | params+EMA GiB | opt+codebook GiB | frozen GiB | temp GiB | "
            "peak GiB / HBM | TFLOP/step/chip | step s at peak | train fits | max batch/chip (est.) | reconstruct peak GiB |")
    lines = [f"{name}", head, "|" + "---|" * 14]
    for r in rows:
        t, rec = r["train"], r["reconstruct"]
        mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1) or "1"
        compiled = t["peak_bytes"] > 0            # False when the compiler itself refused the program
        peak = f"{_gib(t['peak_bytes']) if compiled else '-'} / {_gib(r['hbm_bytes'])}"
        fits = "yes" if t["fits"] else "does not fit: " + t["message"]
        temp = _gib(t["temp_bytes"]) if compiled else "-"
        tflop = f"{t['flops'] / 1e12:.2f}" if compiled else "-"
        secs = f"{t['flops'] / r['peak_flops']:.3f}" if compiled else "-"
        rec_s = "-" if rec is None else (_gib(rec["peak_bytes"]) if rec["fits"] else "does not fit")
        lines.append(f"| {r['topology']} | {r['devices']} | {mesh} | {r['batch_per_device']:g} | {_gib(r['param_bytes'])} "
                     f"| {_gib(r['optimizer_bytes'])} | {_gib(r['frozen_bytes'])} | {temp} | {peak} | {tflop} | {secs} "
                     f"| {fits} | {t.get('max_batch_per_device') if t.get('max_batch_per_device') is not None else '-'} | {rec_s} |")
    return "\n".join(lines)


def run(config, workdir: str) -> list[dict]:
    """mode=plan: a table per config over config.plan.topologies; rows also in <workdir>/plan.json."""
    import json
    import os
    specs = [s for s in str(config.plan.topologies).split(",") if s.strip()]
    if not specs:
        raise ValueError("mode=plan needs --config.plan.topologies, e.g. 'v5e:16x16,v5p:4x4x8,2xv6e:8x8'.")
    llm_stage = config.plan.stage == "llm"
    if config.plan.stage not in ("tokenizer", "llm"):
        raise ValueError(f"config.plan.stage={config.plan.stage!r}: use 'tokenizer' or 'llm'.")
    rows = []

    def keep(row):      # each topology takes minutes: its row is saved (and said) as soon as it is done
        rows.append(row)
        with open(os.path.join(workdir, "plan.json"), "w") as f:
            json.dump(rows, f, indent=1, default=str)
        t = row["train"]
        logging.info("%s: %s, peak %.2f GiB of %.2f GiB HBM per chip.", row["topology"], "fits" if t["fits"] else
                     "does not fit (" + t["message"] + ")", t["peak_bytes"] / GiB, row["hbm_bytes"] / GiB)
    for spec in specs:
        if llm_stage:
            logging.info("Planning %s: lowering and compiling the LLM fine-tuning step ...", spec)
            keep(plan_llm_topology(config, spec.strip()))
            continue
        logging.info("Planning %s: lowering and compiling the train step%s ...", spec,
                     " and the reconstruct sampler" if config.plan.reconstruct else "")
        keep(plan_topology(config, spec.strip()))
    if llm_stage:
        table = format_rows(f"Plan: LLM fine-tuning, {dict(config.plan.llm)} + {config.plan.llm_visual_codes} "
                            f"visual codes, global batch {config.llm.batch_size} x {rows[0]['sequence']} tokens", rows)
    else:
        table = format_rows(f"Plan: global batch {config.batch_size}, MAR '{config.model.preset}', "
                            f"{config.image_size}^2 images", rows)
    print(table)
    return rows
