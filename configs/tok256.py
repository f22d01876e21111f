r"""V2Flow tokenizer at 256^2 on ImageNet-1k: the paper's main setting on the release's latent space.

Run (Cloud TPU v4-64 / v5p-64, or 8+ H100s; see launch/README.md):
    python -m v2flow_jax.main --config=configs/tok256.py --workdir=gs://BUCKET/v2flow/tok256 \
        --config.data.tfds_data_dir=gs://BUCKET/tfds \
        --config.autoencoder.checkpoint=/path/to/dc-ae-f32c32-sana-1.1-diffusers \
        --config.vocabulary.checkpoint=/path/to/Llama-2-7b-hf

Model: DC-AE f32c32 latents (8x8x32, so n = L = 64 tokens), the 'large' MAR (1024 wide, 16 + 16
blocks), velocity MLP 1536 x 8, LLaMA-2 vocabulary (32000 x 4096) with the full 1 B generator G,
16384-code cosine codebook. Recipe of REFERENCE.md section 6 with warm-up then cosine (the release
warms up for the whole run). Global batch 768, 100 epochs (166.8 k steps).
Expected: the paper reports PSNR 20.41 / SSIM 0.52 / LPIPS 0.26 for 64 tokens at 256^2 (Table 1);
the release's compute is ~0.42 TFLOP per training image plus ~1.04 TFLOP for G and the vocabulary,
i.e. roughly 3 days on a v5p-64 at 40% MFU (not yet measured on a pod).

Arguments:
  :demo        the embedded CPU demo (pixels, tiny model, bundled photos, a few minutes on 2 cores)
  :novocab     the same run without the LLM vocabulary (release flag --visual_vocabulary False)
"""
from v2flow_jax import config_defaults


def get_config(arg: str = ""):
    if arg == "demo":
        return config_defaults.demo_config()
    return config_defaults.dc_ae_config(256, arg)
