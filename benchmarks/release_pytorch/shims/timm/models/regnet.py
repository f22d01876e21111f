"""RegNet bottleneck stage shim (timm 0.9.12 RegStage/Bottleneck defaults:
bottle_ratio 1, group_size 1 (depthwise 3x3), se_ratio 0.25 of block input chs,
conv1x1+norm shortcut when channels change, act after the residual sum).
timm converts LayerNorm2d to LayerNormAct2d (eps 1e-5) inside ConvNormAct; same here."""
import torch.nn as nn


class _ConvNormAct(nn.Module):
    def __init__(self, cin, cout, k, groups, norm_layer, act_layer, apply_act):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=1, padding=k // 2, groups=groups, bias=False)
        self.bn = norm_layer(cout, eps=1e-5)
        self.act = act_layer() if apply_act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class _SE(nn.Module):
    def __init__(self, ch, rd, act_layer):
        super().__init__()
        self.fc1 = nn.Conv2d(ch, rd, 1, bias=True)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(rd, ch, 1, bias=True)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * self.fc2(self.act(self.fc1(s))).sigmoid()


class _Bottleneck(nn.Module):
    def __init__(self, cin, cout, act_layer, norm_layer, se_ratio=0.25):
        super().__init__()
        mid = cout
        self.conv1 = _ConvNormAct(cin, mid, 1, 1, norm_layer, act_layer, True)
        self.conv2 = _ConvNormAct(mid, mid, 3, mid, norm_layer, act_layer, True)
        self.se = _SE(mid, int(round(cin * se_ratio)), act_layer)
        self.conv3 = _ConvNormAct(mid, cout, 1, 1, norm_layer, act_layer, False)
        self.downsample = (_ConvNormAct(cin, cout, 1, 1, norm_layer, act_layer, False)
                           if cin != cout else nn.Identity())
        self.act3 = act_layer()

    def forward(self, x):
        y = self.conv3(self.se(self.conv2(self.conv1(x))))
        return self.act3(y + self.downsample(x))


class RegStage(nn.Module):
    def __init__(self, depth, in_chs, out_chs, stride, dilation, drop_path_rates=None,
                 act_layer=nn.ReLU, norm_layer=None, **kwargs):
        super().__init__()
        assert stride == 1 and dilation == 1 and not kwargs
        for i in range(depth):
            self.add_module("b{}".format(i + 1), _Bottleneck(
                in_chs if i == 0 else out_chs, out_chs, act_layer, norm_layer))

    def forward(self, x):
        for m in self.children():
            x = m(x)
        return x
