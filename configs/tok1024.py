r"""V2Flow tokenizer at 1024^2: the official release's default run (1024 tokens, LLaMA-2 vocabulary).

Run (Cloud TPU v5p-256 or 48 H100s as in the release; see launch/README.md):
    python -m v2flow_jax.main --config=configs/tok1024.py --workdir=gs://BUCKET/v2flow/tok1024 \
        --config.data.source=folder --config.data.path=/data/highres_images \
        --config.autoencoder.checkpoint=/path/to/dc-ae-f32c32-sana-1.1-diffusers \
        --config.vocabulary.checkpoint=/path/to/Llama-2-7b-hf

Model: DC-AE latents 32x32x32 (n = L = 1024), 'large' MAR, velocity MLP 1536 x 8, LLaMA-2
vocabulary (32000 x 4096) with the full 1.04 B generator G: 1.56 B parameters in all
(`--config.mode=params` prints the table). The release's cost: ~14.9 TFLOP per training image and
~33 TFLOP per reconstruction (REFERENCE section 9). Shard G's 32000 x 32000 matrix and the vocabulary
over 'tensor' (mesh below) so it does not sit whole on every chip. Global batch 768 (16 per GPU on
48 GPUs in the release). Not yet run by us.

Arguments: novocab (no LLM vocabulary), tensor=N (the mesh's 'tensor' axis, default 4).
"""
from v2flow_jax import config_args, config_defaults


def get_config(arg: str = ""):
    args = config_args.parse(arg, novocab=False, tensor=4)
    c = config_defaults.base_config()
    c.image_size = c.data.image_size = 1024
    c.autoencoder.name = "dc_ae_f32c32"                 # 32x downsampling, 32 channels
    c.model.update(latent_size=1024 // 32, latent_channels=32, preset="large", dtype="bfloat16",
                   vocab_size=0 if args.novocab else 32000, vocab_dim=4096)     # LLaMA-2's table
    # G's 32000 x 32000 matrix and the vocabulary split over 'tensor' when there is one.
    c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1 if args.novocab else args.tensor))
    c.data.update(source="tfds", tfds_name="imagenet2012")
    c.batch_size = 768                                  # global
    c.num_steps = 166_800                               # 100 epochs of ImageNet-1k at 768
    c.optim.update(base_lr=1e-4, warmup_steps=8_340, schedule="cosine")   # lr = 1e-4 * 768 / 256
    c.ema_decay = 0.9999
    return c
