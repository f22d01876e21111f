"""DC-AE in Flax against diffusers' AutoencoderDC, the checkpoint importer, and the pixel autoencoder."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from v2flow_jax import sharding
from v2flow_jax.convert import dc_ae as convert
from v2flow_jax.models.autoencoders import build_autoencoder
from v2flow_jax.models.autoencoders.dc_ae import DCAutoencoder, make_config, sana_f32c32_config
from v2flow_jax.models.autoencoders.pixels import PixelAutoencoder

_COMMON = {
    "in_channels": 3, "latent_channels": 8, "attention_head_dim": 8,
    "encoder_block_out_channels": [8, 16, 32], "decoder_block_out_channels": [8, 16, 32],
}
# Two reduced configurations that between them take every branch of the architecture.
TINY = {
    # Sana-like: conv stem, stride-2 conv down, interpolate up, RMS norm, 5x5 multiscale qkv.
    "conv_rms": {
        **_COMMON,
        "encoder_block_types": ["ResBlock", "ResBlock", "EfficientViTBlock"],
        "decoder_block_types": ["ResBlock", "ResBlock", "EfficientViTBlock"],
        "encoder_layers_per_block": [1, 1, 2], "decoder_layers_per_block": [1, 1, 2],
        "encoder_qkv_multiscales": [[], [], [5]], "decoder_qkv_multiscales": [[], [], [5]],
        "downsample_block_type": "Conv", "upsample_block_type": "interpolate",
        "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu", "scaling_factor": 0.41407,
    },
    # in/mix-like: empty first stage (down/up blocks as stem and head), pixel (un)shuffle, batch norm in
    # decoder ResBlocks and attention, per-stage activations, two qkv scales, no encoder out-shortcut.
    "shuffle_bn": {
        **_COMMON,
        "encoder_block_types": ["ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
        "decoder_block_types": ["ResBlock", "ResBlock", "EfficientViTBlock"],
        "encoder_layers_per_block": [0, 1, 2], "decoder_layers_per_block": [0, 2, 2],
        "encoder_qkv_multiscales": [[], [3], [5, 3]], "decoder_qkv_multiscales": [[], [], [5, 3]],
        "downsample_block_type": "pixel_unshuffle", "upsample_block_type": "pixel_shuffle",
        "decoder_norm_types": ["batch_norm", "batch_norm", "batch_norm"],
        "decoder_act_fns": ["relu", "gelu", "silu"], "decoder_conv_act_fn": "silu",
        "encoder_out_shortcut": False, "scaling_factor": 0.3189,
    },
}
# (H, W) per config: 32x48 keeps every attention on the linear path; at 8x8 the deepest stage has
# 2x2 = 4 <= head_dim positions, where diffusers switches to the quadratic form.
IMAGE_HW = {"conv_rms": (32, 48), "shuffle_bn": (8, 8)}


def _torch_model(config):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.AutoencoderDC(**config).eval()
    # Norms start at the identity (weight 1, bias 0, mean 0, var 1): perturb them so they are tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand_like(b))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{name: (torch model, saved diffusers directory)} for the tiny configurations."""
    out = {}
    for name, config in TINY.items():
        model = _torch_model(config)
        path = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(path, safe_serialization=True)
        out[name] = (model, path)
    return out


def _nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("name", sorted(TINY))
def test_parity_with_diffusers(checkpoints, name):
    import torch
    model, path = checkpoints[name]
    ae, params = convert.load_autoencoder(path)
    assert ae.scale == TINY[name]["scaling_factor"] and ae.stride == 4 and ae.channels == 8
    torch.manual_seed(1)
    images = torch.rand(2, 3, *IMAGE_HW[name]) * 2 - 1
    with torch.no_grad():
        want_z = model.encode(images).latent
        latents = torch.randn_like(want_z)
        want_x = model.decode(latents).sample
    z = np.asarray(jax.jit(ae.encode)(params, _nhwc(images)))
    x = np.asarray(jax.jit(ae.decode)(params, _nhwc(latents)))
    assert z.shape == _nhwc(want_z).shape and x.shape == _nhwc(want_x).shape
    assert np.abs(z - _nhwc(want_z)).max() < 1e-4
    assert np.abs(x - _nhwc(want_x)).max() < 1e-4
    assert np.abs(_nhwc(want_z)).max() > 0.1 and np.abs(_nhwc(want_x)).max() > 0.1  # not trivially zero


def test_bf16_tracks_fp32(checkpoints):
    """bfloat16 weights and compute (norms and attention stay float32) stay close to the float32 model."""
    _, path = checkpoints["conv_rms"]
    ae32, params32 = convert.load_autoencoder(path)
    ae16, params16 = convert.load_autoencoder(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert params16["params"]["encoder"]["conv_in"]["kernel"].dtype == jnp.bfloat16
    images = jax.random.uniform(jax.random.key(0), (1, 32, 32, 3), minval=-1, maxval=1)
    z32, z16 = jax.jit(ae32.encode)(params32, images), jax.jit(ae16.encode)(params16, images)
    assert z16.dtype == jnp.bfloat16
    rel = float(jnp.linalg.norm(z16.astype(jnp.float32) - z32) / jnp.linalg.norm(z32))
    assert rel < 5e-2


def _rewrite(src, dst, edit):
    """Copies a checkpoint directory, passing its tensors through `edit(dict) -> dict`."""
    from safetensors.numpy import load_file, save_file
    os.makedirs(dst)
    with open(os.path.join(src, convert.CONFIG_FILE)) as f:
        config = f.read()
    with open(os.path.join(dst, convert.CONFIG_FILE), "w") as f:
        f.write(config)
    state = edit(load_file(os.path.join(src, convert.WEIGHTS_FILE)))
    save_file(state, os.path.join(dst, convert.WEIGHTS_FILE))
    return dst


def test_converter_errors(checkpoints, tmp_path):
    _, path = checkpoints["conv_rms"]
    key = "encoder.down_blocks.2.0.attn.to_q.weight"

    with pytest.raises(convert.CheckpointError, match="does not exist.*huggingface-cli download"):
        convert.load_autoencoder(str(tmp_path / "nowhere"))

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / convert.CONFIG_FILE).write_text(open(os.path.join(path, convert.CONFIG_FILE)).read())
    with pytest.raises(convert.CheckpointError, match=f"no {convert.WEIGHTS_FILE}"):
        convert.load_autoencoder(str(no_weights))

    no_config = _rewrite(path, str(tmp_path / "no_config"), lambda s: s)
    os.remove(os.path.join(no_config, convert.CONFIG_FILE))
    with pytest.raises(convert.CheckpointError, match="config.json' is missing"):
        convert.load_autoencoder(no_config)

    other = _rewrite(path, str(tmp_path / "other"), lambda s: s)
    with open(os.path.join(other, convert.CONFIG_FILE), "w") as f:
        json.dump({"_class_name": "AutoencoderKL", "latent_channels": 4}, f)
    with pytest.raises(convert.CheckpointError, match="'AutoencoderKL', not 'AutoencoderDC'"):
        convert.load_autoencoder(other)

    missing = _rewrite(path, str(tmp_path / "missing"), lambda s: {k: v for k, v in s.items() if k != key})
    with pytest.raises(convert.CheckpointError, match=rf"1 tensors the model needs are missing \({key}\)"):
        convert.load_autoencoder(missing)

    extra = _rewrite(path, str(tmp_path / "extra"), lambda s: {**s, "encoder.spare.weight": np.zeros(3, np.float32)})
    with pytest.raises(convert.CheckpointError, match=r"1 tensors are not used by the model \(encoder.spare.weight\)"):
        convert.load_autoencoder(extra)

    shape = _rewrite(path, str(tmp_path / "shape"), lambda s: {**s, key: s[key][:16]})
    with pytest.raises(convert.CheckpointError, match=rf"{key}: checkpoint \(16, 32\), model \(32, 32\)"):
        convert.load_autoencoder(shape)


def test_bfloat16_checkpoint_reads(checkpoints, tmp_path):
    import torch
    from safetensors.torch import save_file
    model, path = checkpoints["conv_rms"]
    file = os.path.join(_rewrite(path, str(tmp_path / "bf16"), lambda s: s), convert.WEIGHTS_FILE)
    save_file({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, file)
    state = convert.read_state_dict(os.path.dirname(file))
    want = model.state_dict()["decoder.conv_in.weight"].to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(state["decoder.conv_in.weight"].astype(np.float32), want)


def test_params_shard_over_a_mesh(checkpoints):
    """Every logical name is valid on an fsdp x tensor mesh, and imported weights land sharded."""
    mesh = sharding.make_mesh([("fsdp", 4), ("tensor", 2)])
    ae = DCAutoencoder(TINY["shuffle_bn"])
    with sharding.use_mesh(mesh):
        abstract = jax.eval_shape(ae.init_boxed, jax.random.key(0))
    shardings = nn.unbox(sharding.logical_shardings(abstract, mesh))
    variables = convert.load_params(checkpoints["shuffle_bn"][1], ae, shardings=shardings)
    P = jax.sharding.PartitionSpec
    decoder = variables["params"]["decoder"]
    assert decoder["up_blocks_2_0"]["attn"]["to_q"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert decoder["up_blocks_1_1"]["conv1"]["kernel"].sharding.spec == P(None, None, "fsdp", "tensor")
    assert decoder["conv_out"]["conv"]["kernel"].sharding.spec == P(None, None, "fsdp", None)  # 3*4 RGB outputs
    bn_mean = variables["batch_stats"]["decoder"]["up_blocks_1_1"]["norm"]["mean"]
    assert bn_mean.sharding.spec == P("fsdp")


def test_f32c32_matches_diffusers_sizes():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    config = sana_f32c32_config()
    with torch.device("meta"):
        model = diffusers.AutoencoderDC(**config)
    assert dict(model.config) == {k: config[k] for k in model.config}  # same config.json fields and values
    assert set(model.config) == set(config)
    ae = build_autoencoder("dc_ae_f32c32")
    abstract = jax.eval_shape(ae.init_params, jax.random.key(0))
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    ours = {part: count(abstract["params"][part]) for part in ("encoder", "decoder")}
    theirs = {part: sum(p.numel() for p in getattr(model, part).parameters()) for part in ("encoder", "decoder")}
    assert ours == theirs
    assert 152.9e6 < ours["encoder"] < 153.1e6 and 159.1e6 < ours["decoder"] < 159.3e6
    # Every diffusers tensor maps onto one of ours with the transposed shape.
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {convert.torch_key(p[1:]): convert.torch_shape(s.shape) for p, s in convert.expected_tensors(ae).items()}
    assert expected == state
    latents = jax.eval_shape(ae.encode, abstract, jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))
    assert latents.shape == (1, 8, 8, 32)
    assert (ae.stride, ae.channels, ae.scale) == (32, 32, 0.41407)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="unknown fields \\['encoder_widths'\\]"):
        make_config({"encoder_widths": [1]})
    with pytest.raises(ValueError, match="'decoder_norm_types': 'layer_norm' is not supported"):
        make_config({**TINY["conv_rms"], "decoder_norm_types": "layer_norm"})
    with pytest.raises(ValueError, match="'encoder_layers_per_block' has 2 entries"):
        make_config({**TINY["conv_rms"], "encoder_layers_per_block": [1, 1]})
    with pytest.raises(ValueError, match="needs config="):
        build_autoencoder("dc_ae")
    with pytest.raises(ValueError, match="unknown autoencoder"):
        build_autoencoder("vqgan")


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_pixels_round_trip_is_exact(patch):
    ae = build_autoencoder("pixels", patch_size=patch)
    assert isinstance(ae, PixelAutoencoder)
    assert (ae.stride, ae.channels, ae.scale) == (patch, 3 * patch * patch, 1.0)
    images = jax.random.uniform(jax.random.key(patch), (2, 8, 12, 3), minval=-1, maxval=1)
    params = ae.init_params(jax.random.key(0))
    latents = ae.encode(params, images)
    assert latents.shape == (2, 8 // patch, 12 // patch, 3 * patch * patch)
    np.testing.assert_array_equal(np.asarray(ae.decode(params, latents)), np.asarray(images))
    # A latent pixel is exactly its image patch, flattened row, column, channel.
    np.testing.assert_array_equal(np.asarray(latents[1, 1, 2]),
                                  np.asarray(images[1, patch:2 * patch, 2 * patch:3 * patch]).reshape(-1))


def test_pixels_rejects_ragged_images():
    with pytest.raises(ValueError, match="not a multiple of the patch size 4"):
        PixelAutoencoder(4).encode({}, jnp.zeros((1, 6, 8, 3)))
