"""DiT: reference deviations (shortcut-models model.py), parameter counts, and that t, level and label matter."""

import math

import pytest
import torch
from torch import nn

from shortcut_policy.nets import build_net
from shortcut_policy.nets.dit import DiT, count_params, dit_preset, sincos_pos_embed_2d

LOGVAR_PARAMS = 256  # the reference's unused logvars Embed(256, 1); omitted here


def _meta(**kw):
    with torch.device("meta"):
        return DiT(**kw)


def test_param_count_matches_reference_table_minus_logvar():
    b2 = _meta(input_size=32, in_channels=4, num_classes=1000, hidden_size=768, depth=12, num_heads=12)
    assert count_params(b2) == 131_091_728 - LOGVAR_PARAMS
    assert count_params(b2.blocks) == 127_540_224
    assert count_params(b2.t_embedder) == count_params(b2.d_embedder) == 787_968
    assert count_params(b2.y_embedder) == 768_768
    celeba = _meta(input_size=32, in_channels=4, num_classes=1, hidden_size=768, depth=12, num_heads=12)
    assert count_params(celeba) == 130_324_496 - LOGVAR_PARAMS
    xl2 = _meta(input_size=32, in_channels=4, num_classes=1000, hidden_size=1152, depth=28, num_heads=16)
    assert count_params(xl2) == 676_440_848 - LOGVAR_PARAMS
    assert count_params(xl2.blocks) == 669_344_256


def test_presets_and_configs_agree():
    import importlib.resources as ir

    from omegaconf import OmegaConf

    from shortcut_policy.cli import compose  # noqa: F401  (package importable)

    for name, preset in [("s2", "S"), ("b2", "B"), ("l2", "L"), ("xl2", "XL"), ("tiny", "tiny")]:
        text = (ir.files("shortcut_policy.configs") / "net" / f"dit_{name}.yaml").read_text()
        cfg = OmegaConf.create(text)
        assert cfg.kind == "dit" and cfg.patch_size == 2
        with torch.device("meta"):
            a = build_net(cfg, input_size=32, in_channels=4, num_classes=1000)
            b = dit_preset(preset, input_size=32, in_channels=4, num_classes=1000)
        assert count_params(a) == count_params(b)


def test_init_follows_reference():
    torch.manual_seed(0)
    net = DiT(input_size=8, in_channels=3, num_classes=10, hidden_size=64, depth=2, num_heads=4)
    for blk in net.blocks:
        assert blk.adaLN.weight.abs().sum() > 0  # not adaLN-Zero
        bound = math.sqrt(6.0 / (64 + 6 * 64))
        assert blk.adaLN.weight.abs().max() <= bound + 1e-6
        assert torch.all(blk.adaLN.bias == 0)
        assert not any(p.numel() for p in blk.norm1.parameters())  # LayerNorm without affine
        assert blk.norm1.eps == 1e-6
    assert torch.all(net.final_layer.adaLN.weight == 0) and torch.all(net.final_layer.linear.weight == 0)
    assert abs(net.y_embedder.weight.std().item() - 0.02) < 0.004
    assert net.y_embedder.num_embeddings == 11  # null label row
    assert "pos_embed" not in dict(net.named_parameters())
    # zero-initialised output layer: the untrained net predicts exactly 0
    out = net(torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0.0, 7.0]), torch.tensor([1, 10]))
    assert out.shape == (2, 3, 8, 8) and torch.all(out == 0)


def _perturbed_tiny(seed=0):
    torch.manual_seed(seed)
    net = DiT(input_size=8, in_channels=3, num_classes=10, hidden_size=64, depth=2, num_heads=4)
    for m in (net.final_layer.adaLN, net.final_layer.linear):
        nn.init.normal_(m.weight, std=0.05)
    return net.eval()


def test_output_depends_on_level_t_and_label():
    net = _perturbed_tiny()
    x = torch.randn(4, 3, 8, 8)
    t = torch.full((4,), 0.25)
    lvl = torch.full((4,), 3.0)
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        base = net(x, t, lvl, y)
        for other in (
            net(x, t, lvl + 1, y),
            net(x, t, torch.zeros(4), y),
            net(x, t + 0.5, lvl, y),
            net(x, t, lvl, (y + 1) % 10),
        ):
            diff = (other - base).abs().amax(dim=(1, 2, 3))
            assert torch.all(diff > 1e-4), diff
        # null label differs from every class label
        assert not torch.allclose(net(x, t, lvl, torch.full((4,), 10)), base)
        # cond=None is the null label
        torch.testing.assert_close(net(x, t, lvl, None), net(x, t, lvl, torch.full((4,), 10)))
    # gradients reach the step-level embedder (the failure of several ports: d never reaches the net)
    net.train()
    net(x, t, lvl, y).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.d_embedder.parameters())


def test_attention_scaling_is_one_over_head_dim_and_sdpa_matches():
    torch.manual_seed(1)
    net = _perturbed_tiny(1)
    attn = net.blocks[0].attn
    x = torch.randn(2, 16, 64)
    q = attn.q(x).reshape(2, 16, 4, 16).transpose(1, 2)
    k = attn.k(x).reshape(2, 16, 4, 16).transpose(1, 2)
    v = attn.v(x).reshape(2, 16, 4, 16).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / 16.0, dim=-1)
    expect = attn.proj((w @ v).transpose(1, 2).reshape(2, 16, 64))
    torch.testing.assert_close(attn(x), expect)
    w_sqrt = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
    assert not torch.allclose(attn(x), attn.proj((w_sqrt @ v).transpose(1, 2).reshape(2, 16, 64)), atol=1e-5)
    # the fused path computes the same function
    net2 = _perturbed_tiny(1)
    for blk in net2.blocks:
        blk.attn.impl = "sdpa"
    xx, tt, ll, yy = torch.randn(3, 3, 8, 8), torch.rand(3), torch.tensor([0.0, 3.0, 7.0]), torch.tensor([1, 2, 10])
    with torch.no_grad():
        torch.testing.assert_close(net(xx, tt, ll, yy), net2(xx, tt, ll, yy), atol=1e-5, rtol=1e-4)


def test_patch_roundtrip_and_pos_embed():
    net = DiT(input_size=(8, 12), in_channels=2, num_classes=1, hidden_size=32, depth=1, num_heads=2)
    # unpatchify inverts the (py, px, c) token layout
    x = torch.randn(2, 2, 8, 12)
    tokens = x.reshape(2, 2, 4, 2, 6, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 24, 8)
    torch.testing.assert_close(net.unpatchify(tokens), x)
    pe = sincos_pos_embed_2d(32, 4, 6)
    assert pe.shape == (24, 32)
    assert abs(pe[:, 0::1].max() - 1.0) < 1e-6
    assert len({tuple(r.round(5)) for r in pe}) == 24  # every position distinct


def test_shape_errors_are_clear():
    net = DiT(input_size=8, in_channels=3, num_classes=10, hidden_size=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match=r"\(B, 3, 8, 8\)"):
        net(torch.randn(2, 4, 8, 8), torch.rand(2), torch.zeros(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        DiT(input_size=7, in_channels=3, num_classes=1, hidden_size=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="num_heads"):
        DiT(input_size=8, in_channels=3, num_classes=1, hidden_size=32, depth=1, num_heads=3)


def test_bf16_autocast_keeps_dtype():
    net = _perturbed_tiny()
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, torch.rand(2), torch.zeros(2), torch.tensor([1, 2]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
