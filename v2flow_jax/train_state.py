"""The train state: what a checkpoint holds, its abstract shape and its shardings.

Kept apart from the trainer so that inference (api.py) can learn a checkpoint's layout and restore
from it without importing the training loop.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn

from v2flow_jax import build, sharding
from v2flow_jax.models import tokenizer as tokenizer_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any      # None when config.ema_decay == 0
    vq: Any              # codebook + EMA statistics (collection 'vq'), updated by the EMA rule
    rng: jax.Array       # uint32 key data (checkpointable)


def init_state_tree(run: build.Run, tx, rngs):
    """The TrainState with LogicallyPartitioned boxes; pure, for eval_shape and jit. The 'frozen' collection
    is not part of it: it is `run.frozen`, read from its file, never trained or checkpointed."""
    init_rng, state_rng = rngs[0], rngs[1]
    variables = tokenizer_lib.init_variables(run.model, init_rng)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params if run.config.ema_decay > 0 else None, vq=variables["vq"],
                      rng=jax.random.key_data(state_rng))


def init_state(run: build.Run, tx, seed: int):
    """Returns (state, state_shardings), created in their shardings."""
    rngs = build.init_rngs(seed)
    return sharding.sharded_init(lambda: init_state_tree(run, tx, rngs), run.mesh, run.rules)


def abstract_state(state, shardings):
    """ShapeDtypeStructs with shardings, the restore target of a checkpoint."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def abstract_train_state(run: build.Run, tx, seed: int):
    """(abstract TrainState with shardings, its shardings), computed without allocating anything."""
    shapes = jax.eval_shape(lambda: init_state_tree(run, tx, build.init_rngs(seed)))
    with sharding.use_mesh(run.mesh, run.rules):
        shardings = sharding.logical_shardings(shapes, run.mesh, run.rules)
    shapes, shardings = nn.unbox(shapes), nn.unbox(shardings)
    return abstract_state(shapes, shardings), shardings


def abstract_inference_variables(run: build.Run):
    """{'params': ..., 'vq': ...} as ShapeDtypeStructs with shardings: what decoding needs."""
    shapes = jax.eval_shape(lambda: tokenizer_lib.init_variables(run.model, build.init_rngs(run.config.seed)[0]))
    shapes = {k: shapes[k] for k in ("params", "vq")}
    with sharding.use_mesh(run.mesh, run.rules):
        shardings = sharding.logical_shardings(shapes, run.mesh, run.rules)
    return abstract_state(nn.unbox(shapes), nn.unbox(shardings))


def inference_params_key(config, use_ema: bool = True) -> str:
    """The train-state entry an evaluation reads its weights from: 'ema_params' when kept and wanted."""
    return "ema_params" if (use_ema and config.eval.use_ema and config.ema_decay > 0) else "params"


def state_params(state: TrainState, config):
    """The parameters an evaluation uses: the weight EMA when configured and kept."""
    return state.ema_params if (config.eval.use_ema and state.ema_params is not None) else state.params
