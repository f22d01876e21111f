"""The run configuration: every field with its default (the one set of defaults).

Config files (configs/*.py, and the embedded demo v2flow_jax/demo_config.py that `python -m
v2flow_jax.main` runs when no --config is given) start from `base_config()` and set their recipe's
numbers inline.
"""
from __future__ import annotations

import ml_collections

from v2flow_jax.data import settings
from v2flow_jax.models.tokenizer import TokenizerConfig
from v2flow_jax.sampling import SamplerConfig

MODES = ("train", "evaluate", "params", "plan", "cache_latents", "encode_pairs", "finetune_llm", "generate_images",
         "evaluate_t2i")


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
    # The LLM embedding table (used when model.vocab_size > 0): a HF checkpoint dir, a llama.cpp .gguf
    # file (its token_embd.weight, dequantised), or "package:<module>" for either shipped inside an
    # installed Python package (a folder with config.json, or with exactly one .gguf). Empty = random
    # placeholder table (only sensible for tests and smoke runs).
    # tensor_name: the table's name in a HF checkpoint; a .gguf takes "token_embd.weight" (or this default).
    # first_row: the table is rows [first_row, first_row + model.vocab_size) of the checkpoint's.
    c.vocabulary = ml_collections.ConfigDict(dict(checkpoint="", tensor_name="model.embed_tokens.weight",
                                                  first_row=0))
    c.sampler = ml_collections.ConfigDict(_dataclass_defaults(SamplerConfig))

    # The data section's fields and defaults live in data/settings.py (settings.DEFAULTS).
    c.data = ml_collections.ConfigDict({**settings.DEFAULTS,
                                        "prefetch_buffer_size": ml_collections.config_dict.placeholder(int)})

    # mode=cache_latents: encode config.data's split once (plus flips) into array_record parts.
    # views: passes over the split, each view its own random crops when data.random_crop_scale is set
    # (few photos -> many cached examples); 1 = each image once (plus its flip), as the release.
    c.cache = ml_collections.ConfigDict(dict(split="train", output_dir="", images_per_part=1024, views=1))
    # mode=encode_pairs (lm/token_records.py): a pairs JSONL ({"image", "caption"} lines) encoded by a
    # trained tokenizer (its workdir) into token-id records for the LLM stage; output_dir '' = <workdir>/token_records.
    c.pairs = ml_collections.ConfigDict(dict(jsonl="", tokenizer_workdir="", output_dir="", per_part=1024,
                                               limit=0))   # limit: that many pairs, evenly spaced; 0 = all
    # mode=finetune_llm (lm/finetune_run.py): the LLM stage. checkpoint: a .gguf, a HF directory or
    # package:<name>; records_dir '' = <tokenizer_workdir>/token_records; seq_len 0 = the response + 64.
    # The optimiser is the paper's: Adam without weight decay, cosine after a 3% warm-up, lr 2e-5.
    c.llm = ml_collections.ConfigDict(dict(
        checkpoint="", tokenizer_workdir="", records_dir="", seq_len=0, batch_size=1024, num_steps=1000,
        learning_rate=2e-5, warmup_fraction=0.03, grad_clip=1.0, empty_caption_fraction=0.1,
        head_init="codebook", visual_row_norm="codebook", untie=False, system="", dtype="bfloat16", scan_layers=True, remat_policy="none",
        log_every=10, checkpoint_every=500, keep_checkpoints=2))
    # mode=generate_images (lm/t2i.py): prompts ('a|b|c' or a .txt, one a line) -> PNGs and a grid, from a
    # finetune_llm export (model_dir '' = <workdir>/hf_model) and its image tokenizer's workdir.
    c.generate = ml_collections.ConfigDict(dict(
        prompts="", model_dir="", tokenizer_workdir="", output_dir="", batch_size=8, greedy=False,
        temperature=1.0, top_k=0, top_p=1.0, cfg_scale=3.0, dtype="float32",
        # mode=evaluate_t2i (lm/t2i_eval.py): greedy generations for num_seen training records (evenly
        # spaced) against their images and the tokenizer's own reconstructions; a grid for num_held_out
        # pairs of held_out (a pairs JSONL; 0 = all of them).
        held_out="", num_seen=64, num_held_out=16))

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
    # lpips_weights / inception_weights: safetensors files from v2flow_jax.convert.lpips_weights /
    # .inception_weights ('' = LPIPS / rFID skipped, and metrics.json says why).
    c.eval = ml_collections.ConfigDict(dict(num_images=50_000, batch_size=256, use_ema=True, grid_images=8,
                                            at_start=False, lpips_weights="", inception_weights=""))
    # mode=plan (plan.py): compile-only plans for TPU topologies ('v5e:16x16,v5p:4x4x8,2xv6e:8x8'; 'Nx' = N
    # slices, the mesh axis dcn_axis spanning them); reconstruct: also compile the reconstruct sampler on
    # eval_batch_size images (0 = config.eval.batch_size). stage 'llm': the LLM stage's fine-tuning step
    # instead, for the LLaMA shape in llm (LlamaConfig fields; the configs/t2i_*.py set it) extended by
    # llm_visual_codes codes, on sequences of config.llm.seq_len (0: llm_seq_len) tokens.
    c.plan = ml_collections.ConfigDict(dict(topologies="", dcn_axis="data", reconstruct=True, eval_batch_size=0,
                                            stage="tokenizer", llm=dict(vocab_size=0, hidden_size=0,
                                            intermediate_size=0, num_layers=0, num_heads=0, num_kv_heads=0),
                                            llm_visual_codes=16384, llm_seq_len=384))
    c.peak_flops_per_device = 0.0  # 0 = look up the device kind (v2flow_jax.train.PEAK_FLOPS)
    return c
