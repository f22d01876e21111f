r"""V2Flow tokenizer at 512^2 on ImageNet-1k: 256 tokens on DC-AE f32c32 latents (16x16x32).

Run (Cloud TPU v5p-128 or 16+ H100s; see launch/README.md):
    python -m v2flow_jax.main --config=configs/tok512.py --workdir=gs://BUCKET/v2flow/tok512 \
        --config.data.tfds_data_dir=gs://BUCKET/tfds \
        --config.autoencoder.checkpoint=/path/to/dc-ae-f32c32-sana-1.1-diffusers \
        --config.vocabulary.checkpoint=/path/to/Llama-2-7b-hf

Model: n = L = 256 tokens, 'large' MAR, velocity MLP 1536 x 8, LLaMA-2 vocabulary with the full G.
Compute (REFERENCE section 9, no vocabulary): ~1.72 TFLOP per training image; G and alpha @ L add
~4 TFLOP per image at 256 tokens. Global batch 768, 100 epochs. Expected quality: the paper reports
PSNR 22.37 / SSIM 0.65 / LPIPS 0.20 for 256 tokens (at 256^2 with a 16x latent space; the 512^2
figure with 1024 tokens is 23.28 / 0.65 / 0.22). Not yet run by us.

Arguments: '' (default), 'novocab' (no LLM vocabulary).
"""
from v2flow_jax import config_defaults


def get_config(arg: str = ""):
    return config_defaults.dc_ae_config(512, arg)
