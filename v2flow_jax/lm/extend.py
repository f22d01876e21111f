"""Extending a pretrained LLaMA with the tokenizer's visual tokens (V2Flow section 2.4).

The new rows are appended after the text rows (layout in `visual_vocab`), so every text id and
every text logit stays what it was. Input rows of the visual tokens are the tokenizer's codebook
vectors, the paper's rule: the codebook was learned inside this LLM's embedding space, so a visual
token enters the LLM already looking like a mixture of its words. The image markers start as the
mean text row plus a little per-dimension noise: like an ordinary token, but told apart.

Output head rows are a choice (`head_init`):
- "codebook": the codebook vectors (what a tied head gives by construction);
- "text_mean": every new row the mean text row (all visual tokens equally likely at first);
- "zeros": zero logits for the new tokens at first.
A tied head (SmolLM2) stays tied: the output rows then are the input rows, i.e. "codebook". Untying
would add a vocab x width matrix (28M parameters for SmolLM2-135M, 20% of the model) and change the
architecture the exported model declares, for a head start that fine-tuning gives anyway; pass
`untie=True` to untie (the head starts as the extended table, then `head_init` applies).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from v2flow_jax.lm.llama import LlamaConfig
from v2flow_jax.lm.visual_vocab import BOI, EOI, VisualVocab, visual_token_name

HEAD_INITS = ("codebook", "text_mean", "zeros")
# The length of the visual rows: "codebook" keeps the unit codebook vectors (the paper's rule, as is);
# "text_median" scales them to the median norm of the text rows (same directions). The cosine codebook
# is unit-norm while LLM rows are not (SmolLM2's median is 3.15), so as-is visual tokens enter the LLM
# (and, tied, leave it) at a third of a word's length.
ROW_NORMS = ("codebook", "text_median")


def _new_rows_like_text(text_rows: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Rows with the text rows' mean, perturbed by 10% of their per-dimension spread."""
    mean, std = text_rows.mean(axis=0), text_rows.std(axis=0)
    return (mean + 0.1 * std * rng.standard_normal((count, text_rows.shape[1]))).astype(text_rows.dtype)


def extend_llama(params, config: LlamaConfig, codebook, *, head_init: str = "codebook", untie: bool = False,
                 seed: int = 0, row_norm: str = "codebook"):
    """(params, config) of a LLaMA + the codebook (N_v, width) -> (params, config, VisualVocab).

    `params` is the unrolled or scanned tree `lm.llama` uses; only `embed_tokens` (and `lm_head`)
    change. The result is on the host (numpy) for the new tables; place it on a mesh afterwards.
    """
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init={head_init!r}: use one of {HEAD_INITS}.")
    if row_norm not in ROW_NORMS:
        raise ValueError(f"row_norm={row_norm!r}: use one of {ROW_NORMS} (config.llm.visual_row_norm).")
    codebook = np.asarray(codebook, np.float32)
    if codebook.ndim != 2 or codebook.shape[1] != config.hidden_size:
        raise ValueError(
            f"codebook of shape {codebook.shape} cannot extend a LLaMA of width {config.hidden_size}: the "
            f"tokenizer's codes must live in this LLM's embedding space: train the tokenizer with this LLM's "
            f"embedding table as its vocabulary (config.vocabulary.checkpoint = the LLM's file, "
            f"config.model.vocab_dim={config.hidden_size}; for SmolLM2 v2flow_jax/demo_config.py:vocab=smollm2).")
    tied = config.tie_word_embeddings and not untie
    if tied and head_init != "codebook":
        raise ValueError(f"head_init={head_init!r} with a tied output head: the head is the embedding table, "
                         f"so its visual rows are the codebook. Use head_init='codebook' or untie=True (config.llm.head_init, "
                         f"config.llm.untie).")
    vocab = VisualVocab(text_size=config.vocab_size, num_visual=codebook.shape[0])
    rng = np.random.default_rng(seed)

    table = np.asarray(params["embed_tokens"]["embedding"], np.float32)
    if row_norm == "text_median":
        target = np.median(np.linalg.norm(table, axis=1))
        codebook = codebook * (target / np.maximum(np.linalg.norm(codebook, axis=1, keepdims=True), 1e-12))
    markers = _new_rows_like_text(table, 2, rng)
    new_table = np.concatenate([table, codebook.astype(table.dtype), markers])
    out = dict(params)
    out["embed_tokens"] = dict(params["embed_tokens"], embedding=new_table)

    if not tied:
        # lm_head kernel is (width, vocab): one column per output token.
        head = (np.asarray(params["lm_head"]["kernel"], np.float32) if "lm_head" in params else table.T)
        text_cols = head.T
        if head_init == "codebook":
            visual = codebook
        elif head_init == "text_mean":
            visual = np.broadcast_to(text_cols.mean(axis=0), codebook.shape)
        else:
            visual = np.zeros_like(codebook)
        marker_cols = np.broadcast_to(text_cols.mean(axis=0), (2, head.shape[0]))
        out["lm_head"] = {"kernel": np.concatenate([head, visual.T, marker_cols.T], axis=1).astype(np.float32)}
    new_config = config.replace(vocab_size=vocab.size, tie_word_embeddings=tied)
    return out, new_config, vocab


def visual_token_strings(num_visual: int) -> list[str]:
    """The strings the text tokenizer learns, in id order: <v0> ... <v{N-1}>, <boi>, <eoi>."""
    return [visual_token_name(k) for k in range(num_visual)] + [BOI, EOI]


def extend_text_tokenizer(tokenizer, vocab: VisualVocab):
    """Adds the visual tokens and markers to a `transformers` tokenizer at the ids `vocab` gives them.

    A tokenizer shorter than the embedding table (some checkpoints pad their tables) is first filled
    with placeholder tokens so that id text_size is <v0>. Returns the tokenizer (changed in place).
    """
    have = len(tokenizer)
    if visual_token_name(0) in tokenizer.get_vocab():
        raise ValueError(f"the text tokenizer already has {visual_token_name(0)!r}: it is extended already "
                         f"(load the one saved with the extended model, or extend an unextended tokenizer).")
    if have > vocab.text_size:
        raise ValueError(f"the text tokenizer has {have} tokens but the LLM's table only {vocab.text_size} rows: "
                         f"they are not the same model's.")
    fillers = [f"<|unused_row_{i}|>" for i in range(have, vocab.text_size)]
    added = tokenizer.add_tokens(fillers + visual_token_strings(vocab.num_visual), special_tokens=True)
    if added != len(fillers) + vocab.num_visual + 2:
        raise ValueError(f"the text tokenizer already knows some of the visual token names ({added} of "
                         f"{len(fillers) + vocab.num_visual + 2} were new): extend an unextended tokenizer.")
    got = tokenizer.convert_tokens_to_ids([visual_token_name(0), BOI, EOI])
    if got != [vocab.first_visual, vocab.boi, vocab.eoi]:
        raise AssertionError(f"visual token ids {got} != {[vocab.first_visual, vocab.boi, vocab.eoi]}")
    return tokenizer


def place_params(params, shardings=None):
    """Host trees -> device arrays, each in its sharding when given (a tree like params)."""
    if shardings is None:
        return jax.tree.map(jnp.asarray, params)
    return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), params, shardings)
