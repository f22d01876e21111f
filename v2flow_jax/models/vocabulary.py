"""The frozen LLM vocabulary L (N_l x d_l) inside the model.

V2Flow mixes the rows of an LLM's input-embedding table (`embed_tokens`, e.g. LLaMA-2's 32000 x
4096) with the resampler's Gumbel-softmax weights, so visual tokens live in the LLM's own space.
The table is frozen: it sits in the `'frozen'` variable collection, never in `'params'`, so no
optimizer or gradient ever sees it. Reading it from a checkpoint is `convert/hf_embeddings.py`.

How a caller uses it (the model holds a `FrozenVocabulary` somewhere inside):

    variables, shardings = sharding.sharded_init(model.init, mesh, rules, rng, x)  # random placeholder
    table = hf_embeddings.load_embedding_table(path, num_tokens=cfg.vocab_size,
                                               sharding=table_sharding(mesh, rules))
    variables = install_table(variables, table)         # finds the one 'table' in 'frozen'
    grads = jax.grad(loss)(variables["params"], variables["frozen"], ...)  # L gets no gradient
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util
from flax.core import FrozenDict, meta
from jax.sharding import PartitionSpec as P

from v2flow_jax.convert.hf_embeddings import VocabularyError

FROZEN = "frozen"                       # the variable collection of frozen tables
TABLE = "table"                         # the variable's name inside FrozenVocabulary
TABLE_AXES = ("vocab", "llm_embed")     # logical axis names of L's (rows, width)


def table_sharding(mesh, rules) -> jax.sharding.NamedSharding:
    """The NamedSharding the rules give a (vocab, llm_embed) table on this mesh."""
    from v2flow_jax.sharding import rules_for_mesh  # pylint: disable=g-import-not-at-top
    return nn.logical_to_mesh_sharding(P(*TABLE_AXES), mesh, rules_for_mesh(rules, mesh))


# ----------------------------------------------------------------------------------------------
# The frozen table inside a linen model


class FrozenVocabulary(nn.Module):
    """Holds L as variable 'table' of the 'frozen' collection; calling it returns L.

    `init` fills it with normal(0.02) placeholders, boxed with the logical names (vocab, llm_embed)
    so `sharding.sharded_init` shards it; `install_table` then puts the real table in. Keeping it out
    of 'params' keeps it out of the optimizer by construction; stop_gradient keeps it frozen even
    when a caller differentiates w.r.t. all variables.
    """
    num_tokens: int
    dim: int
    dtype: Any = jnp.float32  # storage dtype (the release keeps an fp32 buffer)

    @nn.compact
    def __call__(self) -> jax.Array:
        if not self.is_initializing() and not self.has_variable(FROZEN, TABLE):
            raise VocabularyError(
                f"FrozenVocabulary {self.path} has no '{FROZEN}/{TABLE}': apply the model with "
                f"variables={{'params': ..., '{FROZEN}': ...}} (both collections from init).")
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), TABLE_AXES)
        # The lambda defers make_rng to init time: at apply there is no 'params' rng to draw.
        table = self.variable(FROZEN, TABLE, lambda: init(self.make_rng("params"),
                                                          (self.num_tokens, self.dim), self.dtype))
        return jax.lax.stop_gradient(table.value)


def _table_paths(variables) -> list[tuple[str, ...]]:
    frozen = variables.get(FROZEN, {}) if isinstance(variables, Mapping) else {}
    flat = traverse_util.flatten_dict(frozen) if frozen else {}
    return [(FROZEN,) + k for k in flat if k[-1] == TABLE]


def _replace_at(tree, path, fn):
    if not path:
        return fn(tree)
    head = path[0]
    new = dict(tree)
    new[head] = _replace_at(tree[head], path[1:], fn)
    return FrozenDict(new) if isinstance(tree, FrozenDict) else new


def _get_at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def install_table(variables, table, path: Sequence[str] | None = None):
    """`variables` with the loaded table at `path` (default: the only 'table' under 'frozen').

    Works on boxed (LogicallyPartitioned) or plain trees. The table takes the placeholder's sharding
    and dtype, so jitted steps compiled for the placeholder accept the result unchanged.
    """
    if path is None:
        found = _table_paths(variables)
        if len(found) != 1:
            raise VocabularyError(
                f"install_table: expected exactly one '{TABLE}' under '{FROZEN}', found "
                f"{['/'.join(p) for p in found]}; pass path=(...) to pick one.")
        path = found[0]
    path = tuple(path)
    try:
        old = _get_at(variables, path)
    except (KeyError, TypeError) as e:
        raise VocabularyError(f"install_table: no variable at {'/'.join(path)!r}.") from e

    boxed = isinstance(old, meta.AxisMetadata)
    placeholder = old.unbox() if boxed else old
    if tuple(table.shape) != tuple(placeholder.shape):
        raise VocabularyError(
            f"install_table: the table's shape {tuple(table.shape)} differs from the model's "
            f"{'/'.join(path)} {tuple(placeholder.shape)}; load it with num_tokens="
            f"{placeholder.shape[0]} or build the model with this vocabulary size.")
    target = getattr(placeholder, "sharding", None)
    if target is not None and getattr(table, "sharding", None) != target:
        table = jax.device_put(table, target)  # host or differently-placed table -> the model's layout
    table = jnp.asarray(table)
    if table.dtype != placeholder.dtype:
        table = table.astype(placeholder.dtype)
    new = old.replace_boxed(table) if boxed else table
    return _replace_at(variables, path, lambda _: new)
