"""The parameter table of a config, by component, from `jax.eval_shape` (nothing is allocated)."""
from __future__ import annotations

import math

import jax
from flax import linen as nn

from v2flow_jax import build
from v2flow_jax.models import tokenizer as tokenizer_lib

# MAR parameter names that belong to the encoder; every other MAR parameter is the decoder's.
ENCODER_PREFIXES = ("z_proj", "encoder", "fake_latent")


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def tokenizer_components(model) -> list[tuple[str, int, str]]:
    """(component, parameter count, how it is updated) for the tokenizer."""
    shapes = nn.unbox(jax.eval_shape(lambda r: tokenizer_lib.init_variables(model, r), jax.random.key(0)))
    params = shapes["params"]
    mar = params["mar"]
    encoder = {k: v for k, v in mar.items() if k.startswith(ENCODER_PREFIXES)}
    decoder = {k: v for k, v in mar.items() if not k.startswith(ENCODER_PREFIXES)}
    rows = [("resampler (STC connector + readout / generator G)", _count(params["resampler"]), "trained"),
            ("projector", _count(params["projector"]), "trained"),
            ("MAR encoder", _count(encoder), "trained"),
            ("MAR decoder", _count(decoder), "trained"),
            ("velocity MLP", _count(params["velocity_mlp"]), "trained")]
    if "token_readout" in params:
        rows.append(("token readout (training-only head)", _count(params["token_readout"]), "trained"))
    rows.append(("codebook (+ EMA statistics)", _count(shapes["vq"]), "EMA, not optimised"))
    if "frozen" in shapes:
        rows.append(("LLM vocabulary table", _count(shapes["frozen"]), "frozen"))
    return rows


def parameter_table(config) -> str:
    """Markdown table of a run config's parameters; needs no devices and allocates nothing."""
    model, ae = build.build_model(config)
    rows = tokenizer_components(model)
    ae_count = _count(jax.eval_shape(ae.init_params, jax.random.key(0)))
    if ae_count:
        rows.append((f"autoencoder {config.autoencoder.name}", ae_count, "frozen"))
    trained = sum(n for _, n, how in rows if how == "trained")
    lines = ["| component | parameters | M | updated by |", "|---|---:|---:|---|"]
    lines += [f"| {name} | {n:,} | {n / 1e6:.2f} | {how} |" for name, n, how in rows]
    lines.append(f"| **trained total** | {trained:,} | {trained / 1e6:.2f} | optimizer |")
    return "\n".join(lines)
