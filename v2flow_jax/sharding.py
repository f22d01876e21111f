"""The device mesh and logical-axis sharding, both taken from the config.

Parameters name their axes logically (`nn.with_logical_partitioning`); the rules here map those
names onto mesh axes. A model is initialised abstractly first (`jax.eval_shape`), the shardings are
read off the abstract tree, and the real init is jitted with those `out_shardings`, so full
parameters never sit on one device.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis. A mesh axis is used at most once per array: flax skips a rule whose
# mesh axis an earlier dimension already took, so order the names in a shape by priority.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),      # rows of the LLM vocabulary (N_l) and the generator's output
    ("codes", "tensor"),      # codebook entries
    ("mlp", "tensor"),        # MLP hidden width, fused qkv / heads
    ("heads", "tensor"),
    ("llm_embed", "fsdp"),    # width of the LLM's embeddings (d_l)
    ("embed", "fsdp"),        # transformer / MLP width
    ("channels", "fsdp"),     # convolution channels
    ("latent", None),         # autoencoder latent channels (tiny)
    ("seq", None),
    ("kernel", None),
    ("kv_heads", "tensor"),   # the LLM's key/value heads (grouped-query attention)
    ("head_dim", None),       # per-head width: kept whole for RoPE and the attention contractions
    ("layers", None),         # the stacked-layer axis of scanned (nn.scan) parameters
)


def make_mesh(mesh_shape: Sequence[tuple[str, int]] | dict, devices: Sequence[Any] | None = None,
              dcn_axis: str = "data"):
    """Builds a mesh from `[(axis, size), ...]`; one size may be -1 (= all remaining devices).

    Over several TPU slices (devices with distinct `slice_index`) the axis `dcn_axis` spans the slices
    (data-parallel traffic over the data-centre network) and every other axis stays inside a slice, on ICI.
    """
    items = list(mesh_shape.items()) if isinstance(mesh_shape, dict) else [tuple(x) for x in mesh_shape]
    devices = list(devices if devices is not None else jax.devices())
    names = [name for name, _ in items]
    sizes = [int(size) for _, size in items]
    unknown = [n for n in names if n not in MESH_AXES]
    if unknown:
        raise ValueError(f"config.mesh names unknown axes {unknown}; use any of {MESH_AXES}.")
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {items}.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"config.mesh {items}: {len(devices)} devices do not divide by {known}.")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"config.mesh {items} needs {math.prod(sizes)} devices but {len(devices)} are visible; "
            "set one axis to -1 to absorb the rest.")
    # Auto axis types: linen's logical constraints and embedding lookups need them (ENVIRONMENT.md).
    axis_types = (jax.sharding.AxisType.Auto,) * len(names)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        return jax.make_mesh(tuple(sizes), tuple(names), axis_types=axis_types, devices=devices)
    if dcn_axis not in names or sizes[names.index(dcn_axis)] % slices:
        raise ValueError(f"config.mesh {items} over {slices} slices: the DCN axis {dcn_axis!r} (config.plan.dcn_axis) "
                         f"must be in the mesh with a size divisible by {slices}.")
    from jax.experimental import mesh_utils
    ici = [s // slices if n == dcn_axis else s for n, s in zip(names, sizes)]
    dcn = [slices if n == dcn_axis else 1 for n in names]
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    return jax.sharding.Mesh(grid, tuple(names), axis_types=axis_types)


def rules_from_config(config) -> tuple[tuple[str, Any], ...]:
    """The config's `sharding_rules` (a list of (logical, mesh) pairs) or the defaults."""
    rules = config.get("sharding_rules", None) if hasattr(config, "get") else None
    if not rules:
        return DEFAULT_RULES
    return tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in rules)


def rules_for_mesh(rules, mesh):
    """The rules without the mesh axes this mesh lacks, so the defaults fit any mesh (e.g. [("data", 8)]).

    A rule left with no axis replicates that logical dimension.
    """
    present = set(mesh.axis_names)
    out = []
    for name, axes in rules:
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        kept = tuple(a for a in axes if a in present)
        out.append((name, kept if len(kept) > 1 else (kept[0] if kept else None)))
    return tuple(out)


@contextlib.contextmanager
def use_mesh(mesh, rules=DEFAULT_RULES):
    """Activates the mesh and the logical rules for tracing (jit) and execution."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules_for_mesh(rules, mesh)):
        yield


def logical_shardings(abstract_tree, mesh, rules=DEFAULT_RULES):
    """NamedShardings for a (possibly boxed) tree; leaves without names are replicated."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules_for_mesh(rules, mesh))


def batch_sharding(mesh, ndim: int = 1) -> NamedSharding:
    """Leading axis split over every data-parallel mesh axis present in the mesh."""
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh) -> int:
    return math.prod(mesh.shape[a] for a in ("data", "fsdp") if a in mesh.axis_names)


def sharded_init(init_fn: Callable[..., Any], mesh, rules, *args):
    """Runs `init_fn(*args)` with every output created directly in its sharding.

    Returns (variables, shardings) with the LogicallyPartitioned boxes removed.
    """
    with use_mesh(mesh, rules):
        abstract = jax.eval_shape(init_fn, *args)
        shardings = logical_shardings(abstract, mesh, rules)
        variables = jax.jit(init_fn, out_shardings=shardings)(*args)
    return nn.unbox(variables), nn.unbox(shardings)


def put_batch(batch, mesh):
    """Places a host-local numpy batch (a tree) sharded over the data axes.

    With one process the global batch is the local one; with several, each host contributes its rows.
    """
    def put(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x)
    return jax.tree.map(put, batch)


def put_global_batch(batch, mesh):
    """Places a numpy batch that every host holds whole (a tree) sharded over the data axes."""
    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, batch_sharding(mesh, x.ndim), lambda index: x[index])
    return jax.tree.map(put, batch)


def to_host(x) -> np.ndarray:
    """The whole of a (possibly multi-host) array as numpy, on every host: `np.asarray` alone fails on
    an array whose shards live on other hosts' devices."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def real_rows(num_rows: int, per_host: int, mesh) -> np.ndarray:
    """Which rows of a `put_batch` global batch are real, when this host filled `num_rows` of its
    `per_host` rows (the same on every host). Read off a placed mask: where a host's rows land depends on
    its devices' places in the mesh (on a TPU pod they interleave), not on the process index."""
    return to_host(put_batch(np.arange(per_host) < num_rows, mesh))


def local_row_positions(per_host: int, mesh) -> np.ndarray:
    """The global rows of a `put_batch` batch that hold this host's local rows 0 .. per_host-1, in order."""
    codes = to_host(put_batch(np.arange(per_host) + jax.process_index() * per_host, mesh))
    where = np.empty(len(codes), np.int64)
    where[codes] = np.arange(len(codes))
    return where[jax.process_index() * per_host:(jax.process_index() + 1) * per_host]


def all_hosts_values(value: int) -> np.ndarray:
    """`value` (an int or bool) of every host, in process order (one element with a single process)."""
    values = np.asarray([value])
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        values = np.asarray(multihost_utils.process_allgather(values)).reshape(-1)
    return values
