"""FID Inception-v3 in Flax against an independent torch re-derivation, the converter, the loader and the resize.

The torch network below is written from the architecture (torchvision's Inception3 names, pytorch-fid's
FID blocks), not imported: torchvision is not available. It gets random weights and random BatchNorm
statistics; its state dict goes through our converter into our loader, and both networks must give the
same pool3 features.
"""
import copy

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from v2flow_jax.convert import inception_weights as convert
from v2flow_jax.metrics import inception

SIZE = 299


def _torch_fid_inception(torch):
    """A plain torch FID Inception-v3 returning (N, 2048) pool3 features; state-dict keys as torchvision's."""
    nn, F = torch.nn, torch.nn.functional

    class BasicConv2d(nn.Module):
        def __init__(self, cin, cout, **kw):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
            self.bn = nn.BatchNorm2d(cout, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    def avg_same(x):
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    class A(nn.Module):
        def __init__(self, cin, pool):
            super().__init__()
            self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
            self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
            self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
            self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
            self.branch_pool = BasicConv2d(cin, pool, kernel_size=1)

        def forward(self, x):
            return torch.cat([
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(avg_same(x))], 1)

    class B(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
            self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

        def forward(self, x):
            return torch.cat([
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2)], 1)

    class C(nn.Module):
        def __init__(self, cin, c7):
            super().__init__()
            h, v = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
            self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
            self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
            self.branch7x7_2 = BasicConv2d(c7, c7, **h)
            self.branch7x7_3 = BasicConv2d(c7, 192, **v)
            self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
            self.branch7x7dbl_2 = BasicConv2d(c7, c7, **v)
            self.branch7x7dbl_3 = BasicConv2d(c7, c7, **h)
            self.branch7x7dbl_4 = BasicConv2d(c7, c7, **v)
            self.branch7x7dbl_5 = BasicConv2d(c7, 192, **h)
            self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

        def forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = x
            for i in range(1, 6):
                bd = getattr(self, f"branch7x7dbl_{i}")(bd)
            return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg_same(x))], 1)

    class D(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
            self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
            self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
            self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

        def forward(self, x):
            b7 = x
            for i in range(1, 5):
                b7 = getattr(self, f"branch7x7x3_{i}")(b7)
            return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)

    class E(nn.Module):
        def __init__(self, cin, max_pool):
            super().__init__()
            self.max_pool = max_pool
            self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
            self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
            self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
            self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

        def forward(self, x):
            s = self.branch3x3_1(x)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_same(x)
            return torch.cat([self.branch1x1(x),
                              self.branch3x3_2a(s), self.branch3x3_2b(s),
                              self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
                              self.branch_pool(pooled)], 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
            self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
            self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
            self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
            self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
            self.Mixed_6a = B(288)
            self.Mixed_6b, self.Mixed_6c = C(768, 128), C(768, 160)
            self.Mixed_6d, self.Mixed_6e = C(768, 160), C(768, 192)
            self.Mixed_7a = D(768)
            self.Mixed_7b, self.Mixed_7c = E(1280, max_pool=False), E(2048, max_pool=True)
            self.fc = nn.Linear(2048, 1008)      # in the checkpoint, unused by FID

        def forward(self, x):
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = F.max_pool2d(x, 3, stride=2)
            x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
            for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                         "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
                x = getattr(self, name)(x)
            return x.mean(dim=(2, 3))

    return Net()


def _randomise(torch, net):
    """He-scaled conv weights, random BatchNorm affine, and random running statistics of the right size.

    Running statistics are set in one eval-mode pass: a pre-hook on each BatchNorm measures its actual
    input (given the already perturbed layers before it) and stores that mean and variance times random
    factors. Activations then stay O(1) through the ~95 layers, as with real weights, while every mean and
    variance is still an arbitrary number the converter must carry over.
    """
    torch.manual_seed(0)

    def calibrate(bn, inputs):
        x = inputs[0]
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3))
        bn.running_var.copy_((var * torch.empty_like(var).uniform_(0.5, 2.0)).clamp(min=1e-2))
        bn.running_mean.copy_(mean + 0.2 * bn.running_var.sqrt() * torch.randn_like(mean))

    hooks = []
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0.0, (2.0 / m.weight[0].numel()) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                hooks.append(m.register_forward_pre_hook(calibrate))
        net.eval()
        net(torch.rand(2, 3, 224, 224) * 2 - 1)
    for h in hooks:
        h.remove()
    return net


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(torch net, .pth path, our safetensors path), converted through the CLI entry point."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    net = _randomise(torch, _torch_fid_inception(torch))
    folder = tmp_path_factory.mktemp("fid_inception")
    pth, out = folder / "pt_inception-random.pth", folder / "fid_inception.safetensors"
    torch.save(net.state_dict(), pth)
    summary = convert.main([f"--pth={pth}", f"--out={out}"])
    assert summary["tensors"] == 94 * 5          # 94 BasicConv2d: kernel, scale, bias, mean, var
    return net, pth, out


@pytest.fixture(scope="module")
def torch_features(converted):
    """Random [-1, 1] images (NHWC, float32) and the torch network's pool3 features in float32 and float64."""
    torch = pytest.importorskip("torch")
    net, _, _ = converted
    images = np.random.default_rng(0).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2))
    with torch.no_grad():
        f32 = net(x).numpy()
        f64 = copy.deepcopy(net).double()(x.double()).numpy()
    # The features must be informative for the comparison to mean anything.
    assert f64.std() > 0.05 and (f64 > 0).mean() > 0.5 and np.abs(f64[0] - f64[1]).max() > 1e-2
    return images, f32, f64


def test_features_match_torch_rederivation(converted, torch_features):
    """float32 against float32 torch, both judged by the float64 torch features."""
    _, _, out = converted
    images, want32, want64 = torch_features
    variables = inception.load_inception_params(out)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(inception.feature_fn(variables)(images))
    assert got.shape == (2, inception.FEATURE_DIM) and got.dtype == np.float32
    diff, ours, theirs = (np.abs(got - want32).max(), np.abs(got - want64).max(), np.abs(want32 - want64).max())
    scale = max(1.0, float(np.abs(want64).max()))
    print(f"\nfloat32 pool3 (max {scale:.3g}, std {want64.std():.3g}): max |flax - torch| = {diff:.3g}; "
          f"against float64 torch: flax {ours:.3g}, torch {theirs:.3g}")
    # ~95 float32 layers leave ~4e-5 of the feature scale in rounding (torch's own error against
    # float64 is of that size), so the bound is 1e-4 of the scale, and ours no worse than torch's.
    assert diff <= 1e-4 * scale
    assert ours <= 2 * theirs + 1e-6 * scale


def test_features_match_torch_exactly_in_float64(converted, torch_features):
    """In float64 rounding vanishes and any layer difference (padding, pooling, order) would show."""
    _, _, out = converted
    images, _, want64 = torch_features
    variables = inception.load_inception_params(out)
    with jax.enable_x64(True):
        module = inception.FIDInceptionV3(dtype=jnp.float64)
        got = np.asarray(inception.feature_fn(jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables),
                                              module)(images))
    assert got.dtype == np.float64
    diff = np.abs(got - want64).max()
    print(f"\nfloat64 pool3: max |flax - torch| = {diff:.3g}")
    assert diff <= 1e-9 * max(1.0, float(np.abs(want64).max()))


def _torch_resize(torch, images_nhwc, size=SIZE):
    x = torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2))
    y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return y.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("shape", [(2, 64, 64, 3), (1, 512, 384, 3)], ids=["up_64", "down_512x384"])
def test_resize_matches_torch_interpolate(shape):
    torch = pytest.importorskip("torch")
    images = np.random.default_rng(1).uniform(-1, 1, shape).astype(np.float32)
    want = _torch_resize(torch, images)
    got = np.asarray(inception.resize_to_inception(images))
    diff = np.abs(got - want).max()
    # jax's default (antialias=True) would low-pass when shrinking, unlike pytorch-fid's resize.
    aa = np.asarray(jax.image.resize(images, got.shape, "bilinear", antialias=True))
    print(f"\nresize {shape[1]}x{shape[2]} -> 299: max |jax - torch| = {diff:.3g} "
          f"(antialias=True would differ by {np.abs(aa - want).max():.3g})")
    assert got.shape == (shape[0], SIZE, SIZE, 3)
    assert diff <= 1e-5


def test_preprocess_clips_and_checks_shape():
    x = jnp.full((1, SIZE, SIZE, 3), 3.0)
    assert float(inception.preprocess(x).max()) == 1.0
    assert inception.preprocess(x, resize=True).shape == (1, SIZE, SIZE, 3)
    with pytest.raises(ValueError, match="NHWC RGB"):
        inception.preprocess(jnp.zeros((1, 3, 32, 32)))


def _rewrite(src, dst, change):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(src))
    change(tensors)
    save_file(tensors, str(dst))


def test_missing_tensor_is_named(converted, tmp_path):
    _, _, out = converted
    key = "batch_stats/Mixed_6c/branch7x7dbl_3/bn/var"
    _rewrite(out, tmp_path / "missing.safetensors", lambda t: t.pop(key))
    with pytest.raises(inception.InceptionWeightsError, match="1 tensors are missing") as e:
        inception.load_inception_params(tmp_path / "missing.safetensors")
    assert key in str(e.value) and "v2flow_jax.convert.inception_weights" in str(e.value)


def test_misshaped_tensor_is_named(converted, tmp_path):
    _, _, out = converted
    key = "params/Mixed_7c/branch_pool/conv/kernel"

    def shrink(t):
        t[key] = t[key][..., :100]
    _rewrite(out, tmp_path / "shape.safetensors", shrink)
    with pytest.raises(inception.InceptionWeightsError, match="wrong shape") as e:
        inception.load_inception_params(tmp_path / "shape.safetensors")
    assert f"{key}: file (1, 1, 2048, 100), model (1, 1, 2048, 192)" in str(e.value)


def test_converter_names_missing_torch_tensor_and_refuses_imagenet_weights(converted):
    _, pth, _ = converted
    state = convert.read_pth(pth)
    partial = {k: v for k, v in state.items() if k != "Mixed_7b.branch3x3_2a.bn.running_var"}
    with pytest.raises(inception.InceptionWeightsError, match=r"Mixed_7b\.branch3x3_2a\.bn\.running_var"):
        convert.convert_state_dict(partial)
    imagenet = dict(state, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
    with pytest.raises(inception.InceptionWeightsError, match="torchvision's ImageNet"):
        convert.convert_state_dict(imagenet)
    assert len(convert.convert_state_dict(imagenet, allow_other_weights=True)) == 94 * 5


def test_loader_points_at_the_converter(tmp_path, converted):
    _, pth, _ = converted
    for path in (tmp_path / "absent.safetensors", pth):
        with pytest.raises(inception.InceptionWeightsError, match="inception_weights --pth="):
            inception.load_inception_params(path)
