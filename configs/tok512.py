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

Arguments: novocab (no LLM vocabulary), tensor=N (the mesh's 'tensor' axis, default 1).
"""
from v2flow_jax import config_args, config_defaults


def get_config(arg: str = ""):
    args = config_args.parse(arg, novocab=False, tensor=1)
    c = config_defaults.base_config()
    c.image_size = c.data.image_size = 512
    c.autoencoder.name = "dc_ae_f32c32"                 # 32x downsampling, 32 channels
    c.model.update(latent_size=512 // 32, latent_channels=32, preset="large", dtype="bfloat16",
                   vocab_size=0 if args.novocab else 32000, vocab_dim=4096)     # LLaMA-2's table
    # G's 32000 x 32000 matrix and the vocabulary split over 'tensor' when there is one.
    c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1 if args.novocab else args.tensor))
    c.data.update(source="tfds", tfds_name="imagenet2012")
    c.batch_size = 768                                  # global
    c.num_steps = 166_800                               # 100 epochs of ImageNet-1k at 768
    c.optim.update(base_lr=1e-4, warmup_steps=8_340, schedule="cosine")   # lr = 1e-4 * 768 / 256
    c.ema_decay = 0.9999
    return c
