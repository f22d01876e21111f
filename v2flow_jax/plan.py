"""mode=plan: will a config fit a TPU topology? Compile-only, on any machine, nothing allocated.

For each topology in `config.plan.topologies` ("v5e:16x16", "v5p:4x4x8", "2xv6e:8x8" for two slices)
libtpu describes the chips without hardware (`jax.experimental.topologies`), the mesh is built over
them from `config.mesh` (ICI axes within a slice, `config.plan.dcn_axis` across slices), and the real
jitted train step and the reconstruct sampler are lowered with their real shardings and compiled ahead
of time. The table gives, per device: parameter, optimizer and batch bytes (from the shardings), the
compiler's temporaries and peak, the chip's HBM, FLOPs per step and the step time they imply at the
chip's peak. A program over HBM is reported as "does not fit" with the compiler's figure.

Needs libtpu (`pip install "jax[tpu]"`, or the `plan` extra); it compiles for TPUs on a CPU host.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from v2flow_jax import build, sampling, sharding, train, train_state
from v2flow_jax.models import autoencoders

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_bytes: float
    peak_flops: float     # dense bf16 per chip


# device_kind as libtpu reports it -> HBM and peak (Cloud TPU documentation).
CHIPS = {"TPU v4": Chip(32 * GiB, 275e12), "TPU v5 lite": Chip(16 * GiB, 197e12),
         "TPU v5": Chip(95 * GiB, 459e12), "TPU v6 lite": Chip(32 * GiB, 918e12)}

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
    if kind not in CHIPS:
        raise ValueError(f"no HBM / peak figures for {kind!r}; known: {sorted(CHIPS)} (v2flow_jax/plan.py CHIPS).")
    return CHIPS[kind]


# ------------------------------------------------------------------------------ abstract pieces
def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_run(config, devices) -> build.Run:
    """A Run over `devices` whose autoencoder weights and frozen tables are ShapeDtypeStructs: nothing is
    read or allocated, so the devices may be compile-only."""
    build.validate(config)
    mesh = sharding.make_mesh(config.mesh, devices, dcn_axis=build.dcn_axis(config))
    rules = sharding.rules_from_config(config)
    dp = sharding.data_parallel_size(mesh)
    if config.batch_size % dp:
        raise ValueError(f"config.batch_size={config.batch_size} must divide by the {dp} data-parallel devices "
                         f"of this topology's mesh {dict(mesh.shape)}.")
    ae, _ = build.build_autoencoder(config, with_params=False)
    model = build.build_model(config)[0]
    ae_shapes = jax.eval_shape(ae.init_params, jax.random.key(0))
    ae_params = _abstract(ae_shapes, jax.tree.map(lambda _: sharding.replicated(mesh), ae_shapes))
    run = build.Run(config, mesh, rules, model, sampling.SamplerConfig.from_config(config.sampler), ae, ae_params)
    run.__dict__["frozen"] = abstract_frozen(run)   # in place of the cached property, which reads the file
    return run


def abstract_frozen(run: build.Run):
    from flax import linen as nn
    from v2flow_jax.models import tokenizer as tokenizer_lib

    def init(rng):
        return tokenizer_lib.init_variables(run.model, rng).get("frozen", {})
    shapes = jax.eval_shape(lambda: init(build.init_rngs(run.config.seed)[0]))   # traced: no eager op on the mesh
    with sharding.use_mesh(run.mesh, run.rules):
        shardings = sharding.logical_shardings(shapes, run.mesh, run.rules)
    return _abstract(nn.unbox(shapes), nn.unbox(shardings))


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


def lower_train_step(run: build.Run):
    tx = train.make_optimizer(run.config)
    state, state_sh = train_state.abstract_train_state(run, tx, run.config.seed)
    batch = abstract_batch(run, run.config.batch_size)
    batch_sh = jax.tree.map(lambda x: x.sharding, batch)
    constants = run.constants
    step = jax.jit(functools.partial(train.train_step, run, tx),
                   in_shardings=(state_sh, batch_sh, jax.tree.map(lambda x: x.sharding, constants)),
                   out_shardings=(state_sh, sharding.replicated(run.mesh)), donate_argnums=(0,))
    with sharding.use_mesh(run.mesh, run.rules):
        lowered = step.lower(state, batch, constants)
    return lowered, state


def lower_reconstruct(run: build.Run, rows: int):
    """The reconstruct sampler (encode, AR rectified-flow decode, back to pixels) on `rows` images."""
    infer = train_state.abstract_inference_variables(run)
    variables = run.variables(infer["params"], infer["vq"])
    images = abstract_batch(run, rows)
    images = images.get("image", images.get("latent"))
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(run.mesh))

    def reconstruct(variables, ae_params, images, rng):
        latents = (images * run.autoencoder.scale if run.config.data.source == "latents"
                   else autoencoders.images_to_latents(run.autoencoder, ae_params, images))
        recon, _ = sampling.reconstruct_latents(run.model, variables, latents, rng, run.sampler)
        return autoencoders.latents_to_images(run.autoencoder, ae_params, recon)
    with sharding.use_mesh(run.mesh, run.rules):
        return jax.jit(reconstruct).lower(variables, run.ae_params, images, rng)


# --------------------------------------------------------------------------------------- report
def plan_topology(config, spec: str) -> dict:
    """One topology's row: devices, mesh, per-device bytes, FLOPs, step time at peak, fits or not."""
    devices = topology_devices(spec)
    chip = chip_of(devices[0])
    run = abstract_run(config, devices)
    lowered, state = lower_train_step(run)
    step = compile_report(lowered, chip.hbm_bytes)
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
    rows = []
    for spec in specs:
        logging.info("Planning %s: lowering and compiling the train step%s ...", spec,
                     " and the reconstruct sampler" if config.plan.reconstruct else "")
        rows.append(plan_topology(config, spec.strip()))
    table = format_rows(f"Plan: global batch {config.batch_size}, MAR '{config.model.preset}', "
                        f"{config.image_size}^2 images", rows)
    print(table)
    with open(os.path.join(workdir, "plan.json"), "w") as f:
        json.dump(rows, f, indent=1, default=str)
    return rows
