"""Fine-tuning an extended LLaMA on conversations: the loss on the response, the paper's optimiser, one step.

The paper's recipe (V2Flow section 2.4): Adam without weight decay, cosine decay after a 3% linear
warm-up, loss only on the response tokens. A step is pure: (params, opt_state, batch) in, the same
out, so `jax.jit` with the parameters' shardings runs it on one CPU or a data x fsdp x tensor mesh.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from v2flow_jax.lm import llama


def response_loss(logits, targets, loss_mask):
    """Mean cross-entropy over the positions where loss_mask is 1 (float32 throughout); also the count."""
    logits = logits.astype(jnp.float32)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    count = jnp.sum(loss_mask)
    return jnp.sum(nll * loss_mask) / jnp.maximum(count, 1.0), count


def masked_accuracy(logits, targets, loss_mask):
    hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(hits * loss_mask) / jnp.maximum(jnp.sum(loss_mask), 1.0)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The optimiser of a fine-tuning run (the paper's defaults)."""
    learning_rate: float = 2e-5
    total_steps: int = 1000
    warmup_fraction: float = 0.03
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: float = 1.0          # 0: off

    def schedule(self):
        warmup = max(1, int(round(self.warmup_fraction * self.total_steps)))
        return optax.warmup_cosine_decay_schedule(0.0, self.learning_rate, warmup, max(self.total_steps, warmup + 1))

    def optimizer(self) -> optax.GradientTransformation:
        adam = optax.adam(self.schedule(), b1=self.b1, b2=self.b2)   # Adam, no weight decay
        return optax.chain(optax.clip_by_global_norm(self.grad_clip), adam) if self.grad_clip else adam


def loss_fn(model: llama.Llama, params, batch):
    logits = model.apply({"params": params}, batch["inputs"])
    loss, count = response_loss(logits, batch["targets"], batch["loss_mask"])
    return loss, {"loss": loss, "accuracy": masked_accuracy(logits, batch["targets"], batch["loss_mask"]),
                  "response_tokens": count}


@functools.partial(jax.jit, static_argnames=("model", "optimizer"), donate_argnames=("params", "opt_state"))
def train_step(model: llama.Llama, optimizer: optax.GradientTransformation, params, opt_state, batch):
    """One Adam step on a batch of {inputs, targets, loss_mask} (B, T) -> params, opt_state, metrics."""
    (_, metrics), grads = jax.value_and_grad(functools.partial(loss_fn, model), has_aux=True)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return optax.apply_updates(params, updates), opt_state, metrics


def opt_state_shardings(optimizer: optax.GradientTransformation, params) -> Any:
    """Each moment in its parameter's sharding, the rest (step counts) replicated. Said explicitly: a
    moment starts as zeros, which depend on no input, so jit would not carry the sharding over and
    replicates them (Adam's two moments of LLaMA-2-7B: 52 GiB on every chip)."""
    abstract = jax.eval_shape(optimizer.init, params)
    mesh = next((p.sharding.mesh for p in jax.tree.leaves(params) if hasattr(p.sharding, "mesh")), None)
    if mesh is None:      # unsharded (one device): nothing to lay out
        return None
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    param_tree = jax.tree.structure(params)
    is_params = lambda x: jax.tree.structure(x) == param_tree   # noqa: E731  (a moment: the params' tree)
    param_shardings = jax.tree.map(lambda p: p.sharding, params)
    return jax.tree.map(lambda sub: param_shardings if is_params(sub) else replicated, abstract, is_leaf=is_params)


def init_opt_state(optimizer: optax.GradientTransformation, params) -> Any:
    """Optimizer state laid out like the parameters (opt_state_shardings)."""
    return jax.jit(optimizer.init, out_shardings=opt_state_shardings(optimizer, params))(params)
