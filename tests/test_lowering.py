"""deploy.lowering: each elementary rewrite computes the layer it replaces (float64, 1e-12)."""

import pytest
import torch
from torch import nn

from shortcut_policy.deploy.lowering import (
    ElementaryGroupNorm,
    ElementaryMish,
    MatmulConv1d,
    MatmulConvTranspose1d,
    lower_module,
)


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(
    "cin,cout,k,stride,pad,bias",
    [(3, 5, 5, 1, 2, True), (4, 4, 3, 2, 1, True), (6, 2, 1, 1, 0, False), (2, 3, 4, 3, 0, True)],
)
def test_conv1d(cin, cout, k, stride, pad, bias):
    conv = nn.Conv1d(cin, cout, k, stride, pad, bias=bias).double()
    x = _x(2, cin, 16)
    assert torch.allclose(MatmulConv1d(conv)(x), conv(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("cin,cout,k,stride,pad,out_pad", [(4, 4, 4, 2, 1, 0), (3, 5, 3, 1, 1, 0), (2, 3, 3, 2, 1, 1)])
def test_conv_transpose1d(cin, cout, k, stride, pad, out_pad):
    conv = nn.ConvTranspose1d(cin, cout, k, stride, pad, output_padding=out_pad).double()
    x = _x(2, cin, 8)
    y = MatmulConvTranspose1d(conv)(x)
    assert y.shape == conv(x).shape and torch.allclose(y, conv(x), atol=1e-12, rtol=0)


def test_group_norm_and_mish():
    gn = nn.GroupNorm(4, 8).double()
    with torch.no_grad():
        gn.weight.normal_(), gn.bias.normal_()
    x = 3 * _x(3, 8, 16) + 1
    assert torch.allclose(ElementaryGroupNorm(gn)(x), gn(x), atol=1e-12, rtol=0)
    z = torch.cat([_x(100) * 10, torch.tensor([-800.0, -30.0, 19.9, 20.0, 20.1, 45.0, 800.0], dtype=torch.float64)])
    assert torch.allclose(ElementaryMish()(z), nn.Mish()(z), atol=1e-12, rtol=0)


def test_lower_module_replaces_every_layer_and_keeps_the_function():
    from shortcut_policy.nets.unet1d import UNet1D

    net = UNet1D(
        input_dim=2, global_cond_dim=6, step_embed_dim=16, down_dims=[8, 16], kernel_size=5, n_groups=4
    ).double()
    low = lower_module(net)
    kinds = {type(m) for m in low.modules()}
    assert kinds.isdisjoint({nn.Conv1d, nn.ConvTranspose1d, nn.GroupNorm, nn.Mish})
    x, cond = _x(2, 16, 2), _x(2, 6, seed=1)
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    d = torch.tensor([0.0, 3.0], dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(low(x, t, d, cond), net(x, t, d, cond), atol=1e-12, rtol=0)
    assert any(isinstance(m, nn.Conv1d) for m in net.modules())  # the original is untouched (a copy was lowered)


def test_lower_module_names_an_unsupported_layer():
    with pytest.raises(ValueError, match=r"'enc.0' \(Conv2d\)"):
        lower_module(_Wrap())


class _Wrap(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 1, 3))
