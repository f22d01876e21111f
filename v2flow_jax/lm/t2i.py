"""Prompts -> images: an extended LLaMA writes the visual tokens, the V2Flow tokenizer decodes them.

    t2i = TextToImage(llm_model, llm_params, chat, image_tokenizer)
    images = t2i.generate(["red apple", "dog face"], jax.random.key(0))   # float (2, H, W, 3) in [-1, 1]
    save_generations(images, captions, "out/")                             # PNG files and a grid

`chat` (a `ChatFormat`) frames each caption in the LLM's chat template; guidance uses the empty
caption in the same frame. The number of visual tokens is the image tokenizer's own.
"""
from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from v2flow_jax.lm import generate as gen
from v2flow_jax.lm.conversation import ChatFormat
from v2flow_jax.metrics import image as image_metrics


def tokenizer_codebook(image_tokenizer) -> np.ndarray:
    """The unit codebook (N_v, width) of a `v2flow_jax.api.Tokenizer` (from its 'vq' collection)."""
    found = [np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(image_tokenizer.variables["vq"])
             if getattr(path[-1], "key", None) == "codebook"]
    if len(found) != 1:
        raise ValueError(f"expected one 'codebook' in the tokenizer's 'vq' collection, found {len(found)}.")
    return found[0]


def pad_right(rows: list[list[int]], width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (B, width) int32 right-padded with 0, and their lengths."""
    width = width or max(map(len, rows))
    out = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out, np.array([len(r) for r in rows], np.int32)


class TextToImage:
    def __init__(self, llm_model, llm_params, chat: ChatFormat, image_tokenizer):
        if chat.vocab.num_visual != image_tokenizer.run.model.config.codebook_size:
            raise ValueError(f"the LLM knows {chat.vocab.num_visual} visual tokens but the image tokenizer has "
                             f"{image_tokenizer.run.model.config.codebook_size} codes: they were not extended together.")
        self.llm_model, self.llm_params = llm_model, llm_params
        self.chat, self.image_tokenizer = chat, image_tokenizer

    @property
    def num_tokens(self) -> int:
        return self.image_tokenizer.num_tokens

    def codes(self, prompts: list[str], rng, sampling: gen.Sampling = gen.Sampling(), cfg_scale=None) -> np.ndarray:
        """(B,) captions -> (B, num_tokens) tokenizer codes. Guidance runs when the scale is not 1."""
        scale = sampling.cfg_scale if cfg_scale is None else cfg_scale
        ids, lengths = pad_right([self.chat.prompt_ids(p) for p in prompts])
        kw = {}
        if scale != 1.0:
            empty, empty_len = pad_right([self.chat.prompt_ids("")] * len(prompts), ids.shape[1])
            kw = dict(uncond_prompts=jnp.asarray(empty), uncond_lengths=jnp.asarray(empty_len), cfg_scale=scale)
        return np.asarray(gen.generate_codes(self.llm_model, self.llm_params, jnp.asarray(ids), jnp.asarray(lengths),
                                             rng, vocab=self.chat.vocab, num_tokens=self.num_tokens,
                                             sampling=sampling, **kw))

    def generate(self, prompts: list[str], rng, sampling: gen.Sampling = gen.Sampling(), cfg_scale=None,
                 **decode_overrides) -> np.ndarray:
        """Captions -> float32 images (B, H, W, 3) in [-1, 1]; decode_overrides go to Tokenizer.decode."""
        token_rng, decode_rng = jax.random.split(rng)
        codes = self.codes(prompts, token_rng, sampling, cfg_scale)
        return self.image_tokenizer.decode(codes, decode_rng, **decode_overrides)


def _file_name(i: int, caption: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", caption.lower()).strip("_")[:48] or "empty"
    return f"{i:04d}_{slug}.png"


def save_generations(images, captions: list[str], out_dir: str, per_row: int = 8) -> dict:
    """One PNG per image (named by index and caption) and grid.png; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    pixels = [image_metrics.to_uint8(x) for x in np.asarray(images)]
    files = [image_metrics.save_png(os.path.join(out_dir, _file_name(i, c)), p)
             for i, (c, p) in enumerate(zip(captions, pixels))]
    rows = [pixels[i:i + per_row] for i in range(0, len(pixels), per_row)]
    grid = image_metrics.save_png(os.path.join(out_dir, "grid.png"), image_metrics.image_grid(rows))
    return {"images": files, "grid": grid}


def _prompts(spec: str) -> list[str]:
    """config.generate.prompts: a .txt file (one caption a line) or captions separated by '|'."""
    if spec.endswith(".txt"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"config.generate.prompts={spec!r}: no such file (one caption per line).")
        with open(spec, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    else:
        prompts = [p.strip() for p in spec.split("|") if p.strip()]
    if not prompts:
        raise ValueError("mode=generate_images needs --config.generate.prompts='red apple|dog face' or a .txt file.")
    return prompts


def load_pipeline(config, workdir: str, mode: str = "generate_images") -> tuple["TextToImage", str]:
    """(TextToImage, the image tokenizer's workdir) of a finetune_llm workdir's export
    (config.generate.model_dir, default <workdir>/hf_model) with the image tokenizer it was tuned with
    (config.generate.tokenizer_workdir, default the one the export records; another one is refused)."""
    from v2flow_jax.api import Tokenizer
    from v2flow_jax.lm import finetune_run
    g = config.generate
    model_dir = g.model_dir or os.path.join(workdir, "hf_model")
    info = finetune_run.read_export_info(model_dir)
    tokenizer_workdir = g.tokenizer_workdir or info.get("tokenizer_workdir", "")
    if not tokenizer_workdir:
        raise ValueError(f"mode={mode} needs --config.generate.tokenizer_workdir=<the image tokenizer's "
                         "workdir the LLM was fine-tuned with> (this export does not record it).")
    image_tok = Tokenizer.from_workdir(tokenizer_workdir)
    if info.get("codebook_sha256") and finetune_run.codebook_digest(image_tok) != info["codebook_sha256"]:
        raise ValueError(f"the image tokenizer in {tokenizer_workdir} is not the one {model_dir} was fine-tuned with "
                         f"(its codebook differs): use --config.generate.tokenizer_workdir="
                         f"{info.get('tokenizer_workdir') or '<that run>'}.")
    model, params, chat = finetune_run.load_exported(model_dir, dtype=jnp.dtype(g.dtype))
    return TextToImage(model, params, chat, image_tok), tokenizer_workdir


def run(config, workdir: str) -> dict:
    """The main mode: a fine-tuned export (`<workdir>/hf_model` of mode=finetune_llm) + its image tokenizer
    -> one PNG per prompt and a grid in config.generate.output_dir (default <workdir>/generated)."""
    g = config.generate
    prompts = _prompts(g.prompts)
    pipeline, _ = load_pipeline(config, workdir)
    sampling = gen.Sampling(greedy=bool(g.greedy), temperature=float(g.temperature), top_k=int(g.top_k),
                            top_p=float(g.top_p), cfg_scale=float(g.cfg_scale))
    images = []
    for i in range(0, len(prompts), int(g.batch_size)):
        chunk = prompts[i:i + int(g.batch_size)]
        images.append(pipeline.generate(chunk, jax.random.fold_in(jax.random.key(config.seed), i), sampling))
    out = save_generations(np.concatenate(images), prompts, g.output_dir or os.path.join(workdir, "generated"))
    return {"prompts": len(prompts), "grid": out["grid"]}
