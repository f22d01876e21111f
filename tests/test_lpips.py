"""LPIPS-VGG in Flax against the `lpips` package (torch), the weights converter and the loader.

torchvision cannot be installed here, and lpips imports it only for `torchvision.models.vgg16`, so the
test hands lpips a stand-in `torchvision` whose `vgg16()` builds torchvision's layer layout and loads
random weights this test wrote. The same file then goes through our converter, so the oracle and our
module see identical numbers.
"""
import importlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from v2flow_jax.metrics import lpips as ours

torch = pytest.importorskip("torch")
from v2flow_jax.convert import lpips_weights  # noqa: E402  (after the torch check: every test here needs torch)

# torchvision's VGG16 ("configuration D"): conv widths, "M" for a 2x2 max-pool.
TORCHVISION_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
# Indices in `features` of the ReLUs lpips taps (the ends of its five slices).
TAP_INDICES = (3, 8, 15, 22, 29)
HEAD_CHANNELS = (64, 128, 256, 512, 512)
ORACLE_TOL = 1e-5


# --------------------------------------------------------------------------------------------------
# The torch side: a torchvision-shaped VGG16, random weights, and lpips behind a torchvision stand-in


class TorchVGG16(torch.nn.Module):
    """Just the part of torchvision's VGG16 lpips reads: `features`, with torchvision's indices."""

    def __init__(self):
        super().__init__()
        layers, cin = [], 3
        for item in TORCHVISION_VGG16:
            if item == "M":
                layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [torch.nn.Conv2d(cin, item, kernel_size=3, padding=1), torch.nn.ReLU(inplace=True)]
                cin = item
        self.features = torch.nn.Sequential(*layers)


def random_vgg16_state(seed: int) -> dict:
    """He-normal convs (activations stay O(1) through 13 layers) and small random biases."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, t in TorchVGG16().state_dict().items():
        if key.endswith(".weight"):
            fan_in = t.shape[1] * t.shape[2] * t.shape[3]
            state[key] = torch.randn(t.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        else:
            state[key] = torch.randn(t.shape, generator=gen) * 0.05
    # The real file also holds the classifier, which LPIPS never uses: the converter must skip it.
    state["classifier.6.bias"] = torch.randn(1000, generator=gen)
    return state


def random_heads_state(seed: int) -> dict:
    # lpips keeps its heads non-negative; random ones of that kind.
    gen = torch.Generator().manual_seed(seed)
    return {f"lin{k}.model.1.weight": torch.rand((1, c, 1, 1), generator=gen) * 0.2
            for k, c in enumerate(HEAD_CHANNELS)}


def torchvision_stub() -> types.ModuleType:
    """A `torchvision` module with `models.vgg16(pretrained=...)` loading `models.weights_path`."""
    models = types.ModuleType("torchvision.models")
    models.weights_path = None

    def vgg16(pretrained=False, **unused):
        net = TorchVGG16()
        if pretrained:
            state = torch.load(models.weights_path, map_location="cpu", weights_only=True)
            net.load_state_dict({k: v for k, v in state.items() if k.startswith("features.")})
        return net

    models.vgg16 = vgg16
    package = types.ModuleType("torchvision")
    package.models = models
    return package


def import_lpips_with(stub):
    """Imports lpips with the stand-in visible, then takes the stand-in out of sys.modules again (other
    libraries probing for torchvision must not find it) and points lpips at it directly."""
    saved = {name: sys.modules.get(name) for name in ("torchvision", "torchvision.models")}
    sys.modules["torchvision"], sys.modules["torchvision.models"] = stub, stub.models
    try:
        package = pytest.importorskip("lpips", reason="pip install --no-deps lpips==0.1.4")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    networks = importlib.import_module("lpips.pretrained_networks")
    return package, networks


def torch_taps(net: TorchVGG16, x_nhwc: np.ndarray) -> list[np.ndarray]:
    """The activations at TAP_INDICES, NHWC, from lpips-scaled input (as the oracle feeds its VGG)."""
    shift = np.array([-0.030, -0.088, -0.188], np.float32)
    scale = np.array([0.458, 0.448, 0.450], np.float32)
    h = torch.from_numpy(np.transpose((x_nhwc - shift) / scale, (0, 3, 1, 2)).copy())
    taps = []
    with torch.no_grad():
        for i, layer in enumerate(net.features):
            h = layer(h)
            if i in TAP_INDICES:
                taps.append(np.transpose(h.numpy(), (0, 2, 3, 1)).copy())
    return taps


def nchw(x: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def images(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Fixtures: write the torch files once, convert them once, build the oracle once


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lpips")
    vgg_state, heads_state = random_vgg16_state(0), random_heads_state(1)
    paths = types.SimpleNamespace(vgg16=root / "vgg16.pth", heads=root / "vgg_heads.pth",
                                  out=root / "lpips_vgg.safetensors", root=root)
    torch.save(vgg_state, paths.vgg16)
    torch.save(heads_state, paths.heads)
    summary = lpips_weights.main([f"--vgg16={paths.vgg16}", f"--lpips_heads={paths.heads}", f"--out={paths.out}"])
    assert summary["tensors"] == 13 * 2 + 5
    paths.vgg_state, paths.heads_state = vgg_state, heads_state
    return paths


@pytest.fixture(scope="module")
def params(files):
    return ours.load_lpips_params(files.out)


@pytest.fixture(scope="module")
def oracle(files):
    stub = torchvision_stub()
    package, networks = import_lpips_with(stub)
    previous = networks.tv
    networks.tv = stub.models
    stub.models.weights_path = str(files.vgg16)
    try:
        model = package.LPIPS(net="vgg", version="0.1", pretrained=True, model_path=str(files.heads), verbose=False)
    finally:
        networks.tv = previous
    # lpips loads heads with strict=False: make sure ours really arrived, not its random init.
    for k in range(5):
        np.testing.assert_array_equal(model.lins[k].model[1].weight.detach().numpy(),
                                      files.heads_state[f"lin{k}.model.1.weight"].numpy())
    return model


# --------------------------------------------------------------------------------------------------
# Against the oracle


def test_constants_match_lpips(oracle):
    np.testing.assert_array_equal(np.float32(ours.SHIFT), oracle.scaling_layer.shift.flatten().numpy())
    np.testing.assert_array_equal(np.float32(ours.SCALE), oracle.scaling_layer.scale.flatten().numpy())


@pytest.mark.parametrize("shape", [(2, 64, 64, 3), (1, 37, 52, 3)], ids=["square", "odd_non_square"])
def test_matches_lpips_package(oracle, params, shape):
    # Pair 0: unrelated images; pair 1 (when there): an image and a slightly noisy copy.
    x = images(10, shape)
    y = images(11, shape)
    if shape[0] > 1:
        y[1] = np.clip(x[1] + 0.1 * images(12, shape[1:]), -1, 1)
    with torch.no_grad():
        want = oracle(nchw(x), nchw(y)).numpy().reshape(-1)
    got = np.asarray(ours.lpips_distance(params, jnp.asarray(x), jnp.asarray(y)))
    assert got.shape == (shape[0],) and got.dtype == np.float32
    diff = np.max(np.abs(got - want))
    print(f"LPIPS {shape}: ours {got}, lpips {want}, max |diff| {diff:.3g}")
    assert diff <= ORACLE_TOL, (got, want)


def test_features_match_torch_vgg(files, params):
    net = TorchVGG16()
    net.load_state_dict({k: v for k, v in files.vgg_state.items() if k.startswith("features.")})
    x = images(20, (2, 64, 64, 3))
    want = torch_taps(net, x)
    got = ours.vgg16_features(params, jnp.asarray(x))
    assert len(got) == len(want) == 5
    for name, g, w in zip(ours.TAP_NAMES, got, want):
        assert g.shape == w.shape, name
        diff = np.max(np.abs(np.asarray(g) - w))
        print(f"{name} {w.shape}: max |diff| {diff:.3g} (max |activation| {np.max(np.abs(w)):.3g})")
        assert diff <= 1e-4, name


# --------------------------------------------------------------------------------------------------
# Properties that break when the heads or an input are ignored


@pytest.fixture(scope="module")
def pair():
    """Four copies of one image and four noisier and noisier versions of it (32x32: cheap to compile)."""
    x = np.repeat(images(30, (1, 32, 32, 3)), 4, axis=0)
    noise = images(31, (1, 32, 32, 3))
    levels = np.array([0.02, 0.1, 0.3, 1.0], np.float32)[:, None, None, None]
    return jnp.asarray(x), jnp.asarray(np.clip(x + levels * noise, -1, 1))


def test_identical_images_are_at_distance_zero(params, pair):
    # Zero up to rounding: XLA's CPU convs may round the two halves of the batch differently (~1e-16),
    # which is far below the smallest distance that means anything (the 2% noise below gives ~1e-3).
    x, _ = pair
    d = np.asarray(ours.lpips_distance(params, x, x))
    print(f"LPIPS(x, x) = {d}")
    assert np.all(np.abs(d) <= 1e-12), d


def test_distance_grows_with_noise_and_is_symmetric(params, pair):
    x, y = pair
    d = np.asarray(ours.lpips_distance(params, x, y))
    print(f"LPIPS at noise 0.02, 0.1, 0.3, 1.0: {d}")
    assert np.all(d > 0) and np.all(np.diff(d) > 0), d
    np.testing.assert_allclose(np.asarray(ours.lpips_distance(params, y, x)), d, rtol=1e-5)
    other = jnp.asarray(images(32, y.shape))
    assert np.all(np.abs(np.asarray(ours.lpips_distance(params, x, other)) - d) > 1e-3)


def test_every_head_counts(params, pair):
    x, y = pair
    d = np.asarray(ours.lpips_distance(params, x, y))
    scaled = {**params, **{f"lin{k}": {"kernel": 2.0 * params[f"lin{k}"]["kernel"]} for k in range(5)}}
    np.testing.assert_allclose(np.asarray(ours.lpips_distance(scaled, x, y)), 2.0 * d, rtol=1e-5)
    for k in range(5):
        dropped = {**params, f"lin{k}": {"kernel": jnp.zeros_like(params[f"lin{k}"]["kernel"])}}
        assert np.all(np.asarray(ours.lpips_distance(dropped, x, y)) < d), f"lin{k} has no effect"


def test_per_layer_sums_to_distance(params, pair):
    x, y = pair
    layers = jax.jit(lambda p, a, b: ours.LPIPS().apply({"params": p}, a, b, method="per_layer"))(params, x, y)
    assert len(layers) == 5 and all(np.all(np.asarray(layer) > 0) for layer in layers)
    np.testing.assert_allclose(np.asarray(sum(layers)), np.asarray(ours.lpips_distance(params, x, y)), rtol=1e-6)


def test_param_shapes_match_the_module():
    abstract = jax.eval_shape(ours.LPIPS().init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 16, 3)))
    flat = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract["params"]).items()}
    assert flat == ours.param_shapes()


@pytest.mark.parametrize("x_shape,y_shape,match", [
    ((1, 32, 32, 3), (1, 32, 48, 3), "one shape"),
    ((1, 32, 32, 1), (1, 32, 32, 1), "RGB"),
    ((1, 8, 32, 3), (1, 8, 32, 3), "at least 16x16"),
])
def test_bad_image_shapes(x_shape, y_shape, match):
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(ours.LPIPS().init, jax.random.key(0), jnp.zeros(x_shape), jnp.zeros(y_shape))


# --------------------------------------------------------------------------------------------------
# The converter and the loader


def test_converted_layout(files):
    flat = load_file(files.out)
    assert {k: v.shape for k, v in flat.items()} == ours.param_shapes()
    assert all(v.dtype == np.float32 for v in flat.values())
    # features.7 is conv2_2; OIHW -> HWIO.
    np.testing.assert_array_equal(flat["vgg/conv2_2/kernel"],
                                  np.transpose(files.vgg_state["features.7.weight"].numpy(), (2, 3, 1, 0)))
    np.testing.assert_array_equal(flat["lin3/kernel"][:, 0], files.heads_state["lin3.model.1.weight"].numpy().ravel())


def test_heads_default_to_the_installed_lpips(files):
    packaged = lpips_weights.installed_heads_path()
    if packaged is None:
        pytest.skip("lpips is not installed (pip install --no-deps lpips==0.1.4)")
    out = files.root / "packaged_heads.safetensors"
    summary = lpips_weights.convert_files(files.vgg16, out)
    assert summary["lpips_heads"] == packaged
    real = torch.load(packaged, map_location="cpu", weights_only=True)
    np.testing.assert_array_equal(load_file(out)["lin0/kernel"][:, 0], real["lin0.model.1.weight"].numpy().ravel())


def _resave(files, name, edit):
    flat = load_file(files.out)
    edit(flat)
    path = files.root / name
    save_file(flat, str(path))
    return path


def test_loader_names_a_missing_tensor(files):
    path = _resave(files, "missing.safetensors", lambda f: f.pop("vgg/conv3_2/bias"))
    with pytest.raises(ours.LPIPSWeightsError, match=r"missing tensors: vgg/conv3_2/bias.*lpips_weights"):
        ours.load_lpips_params(path)


def test_loader_names_a_misshapen_tensor(files):
    path = _resave(files, "shape.safetensors", lambda f: f.update({"lin2/kernel": f["lin2/kernel"][:128]}))
    with pytest.raises(ours.LPIPSWeightsError, match=r"lin2/kernel has shape \(128, 1\), expected \(256, 1\)"):
        ours.load_lpips_params(path)


def test_loader_refuses_other_files(files):
    with pytest.raises(ours.LPIPSWeightsError, match="does not exist.*convert.lpips_weights"):
        ours.load_lpips_params(files.root / "nowhere.safetensors")
    with pytest.raises(ours.LPIPSWeightsError, match="not a safetensors file"):
        ours.load_lpips_params(files.vgg16)


def test_converter_names_bad_source_tensors(files):
    vgg = {k: v.numpy() for k, v in files.vgg_state.items() if k != "features.28.weight"}
    heads = {k: v.numpy() for k, v in files.heads_state.items()}
    with pytest.raises(lpips_weights.ConversionError, match=r"missing tensors: features\.28\.weight"):
        lpips_weights.convert(vgg, heads)
    vgg["features.28.weight"] = files.vgg_state["features.28.weight"].numpy()
    heads["lin1.model.1.weight"] = np.zeros((1, 192, 1, 1), np.float32)  # AlexNet's second head
    with pytest.raises(lpips_weights.ConversionError, match=r"lin1\.model\.1\.weight has shape \(1, 192, 1, 1\)"):
        lpips_weights.convert(vgg, heads)


def test_cli_reports_errors_without_traceback(files, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lpips_weights.main([f"--vgg16={files.root / 'absent.pth'}", f"--lpips_heads={files.heads}",
                            f"--out={files.root / 'x.safetensors'}"])
    assert exit_info.value.code == 1
    assert "absent.pth" in capsys.readouterr().err
