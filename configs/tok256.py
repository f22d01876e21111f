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

Arguments (comma-separated after the colon, e.g. configs/tok256.py:novocab,tensor=2):
  demo         the embedded CPU demo (v2flow_jax/demo_config.py: pixels, tiny model, bundled photos)
  novocab      the same run without the LLM vocabulary (release flag --visual_vocabulary False)
  tensor=N     size of the mesh's 'tensor' axis for G and the vocabulary (default 1)
"""
from v2flow_jax import config_args, config_defaults


def get_config(arg: str = ""):
    args = config_args.parse(arg, demo=False, novocab=False, tensor=1)
    if args.demo:
        from v2flow_jax import demo_config
        return demo_config.get_config()
    c = config_defaults.base_config()
    c.image_size = c.data.image_size = 256
    c.autoencoder.name = "dc_ae_f32c32"                 # 32x downsampling, 32 channels
    c.model.update(latent_size=256 // 32, latent_channels=32, preset="large", dtype="bfloat16",
                   vocab_size=0 if args.novocab else 32000, vocab_dim=4096)     # LLaMA-2's table
    # G's 32000 x 32000 matrix and the vocabulary split over 'tensor' when there is one.
    c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1 if args.novocab else args.tensor))
    c.data.update(source="tfds", tfds_name="imagenet2012")
    c.batch_size = 768                                  # global
    c.num_steps = 166_800                               # 100 epochs of ImageNet-1k at 768
    c.optim.update(base_lr=1e-4, warmup_steps=8_340, schedule="cosine")   # lr = 1e-4 * 768 / 256
    c.ema_decay = 0.9999
    return c
