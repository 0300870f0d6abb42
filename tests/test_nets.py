"""Network contract for every config in configs/net, Diffusion Policy parameter count, d-dependence."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from shortcut_policy.nets import build_net
from shortcut_policy.nets.unet1d import UNet1D

NET_CFGS = sorted((Path(__file__).parents[1] / "configs" / "net").glob("*.yaml"))
BIG = {"unet1d_image", "dit_xl2", "dit_l2", "dit_b2", "dit_s2"}  # built on the meta device only (size), not run


def _inputs(kind, cfg):
    torch.manual_seed(0)
    if kind == "unet1d":
        return dict(input_dim=2, global_cond_dim=10), torch.randn(2, 16, 2), torch.randn(2, 10)
    if kind == "mlp":
        return dict(input_dim=2), torch.randn(2, 2), None
    if kind == "dit":
        return dict(input_size=8, in_channels=4, num_classes=10), torch.randn(2, 4, 8, 8), torch.tensor([0, 1])
    raise AssertionError(kind)


@pytest.mark.parametrize("path", NET_CFGS, ids=lambda p: p.stem)
def test_net_contract(path):
    cfg = OmegaConf.load(path)
    dims, x, cond = _inputs(cfg.kind, cfg)
    if path.stem in BIG:
        with torch.device("meta"):
            net = build_net(cfg, **dims)
        assert sum(p.numel() for p in net.parameters()) > 1e6
        return
    net = build_net(cfg, **dims).eval()
    with torch.no_grad():  # leave the zero-initialised output layers (DiT) so the output can depend on inputs
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    t = torch.full((x.shape[0],), 0.3)
    with torch.no_grad():
        y0 = net(x, t, torch.zeros(x.shape[0]), cond)
        y7 = net(x, t, torch.full((x.shape[0],), 7.0), cond)
        yt = net(x, torch.full((x.shape[0],), 0.8), torch.zeros(x.shape[0]), cond)
    assert y0.shape == x.shape and y0.dtype == x.dtype and torch.isfinite(y0).all()
    if cfg.get("use_step_size", True):
        assert not torch.allclose(y0, y7), f"{path.stem}: output does not depend on the step level d"
    assert not torch.allclose(y0, yt), f"{path.stem}: output does not depend on t"


def test_unet1d_matches_diffusion_policy_parameter_count():
    with torch.device("meta"):
        net = UNet1D(
            input_dim=2,
            global_cond_dim=40,
            step_embed_dim=256,
            down_dims=(256, 512, 1024),
            kernel_size=5,
            n_groups=8,
            cond_predict_scale=True,
            use_step_size=False,
        )
    assert sum(p.numel() for p in net.parameters()) == 65_783_298
    with torch.device("meta"):
        img = UNet1D(
            input_dim=2, global_cond_dim=132, step_embed_dim=128, down_dims=(512, 1024, 2048), use_step_size=False
        )
    assert sum(p.numel() for p in img.parameters()) == 251_511_938


def test_unet1d_step_branch_changes_output_and_rejects_bad_shapes():
    torch.manual_seed(0)
    net = UNet1D(2, 6, step_embed_dim=32, down_dims=(16, 32)).eval()
    x, c, t = torch.randn(3, 8, 2), torch.randn(3, 6), torch.rand(3)
    with torch.no_grad():
        outs = [net(x, t, torch.full((3,), float(k)), c) for k in range(8)]
    for a, b in zip(outs[:-1], outs[1:]):
        assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="cond must be"):
        net(x, t, torch.zeros(3), torch.randn(3, 5))
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(3, 5, 2), t, torch.zeros(3), c)
    with pytest.raises(ValueError, match="x must be"):
        net(torch.randn(3, 8, 3), t, torch.zeros(3), c)


def test_composed_diffusion_config_builds_diffusion_policys_exact_net():
    """`train task=pusht_lowdim objective=diffusion` composes the U-Net without the step-size branch: Diffusion
    Policy's 65,783,298 parameters (the shortcut objective keeps the branch: +525,568)."""
    from shortcut_policy.commands.runner import compose
    from shortcut_policy.objectives import build_objective

    counts = {}
    for name in ("diffusion", "shortcut"):
        cfg = compose("train", ["task=pusht_lowdim", f"objective={name}"])
        obj = build_objective(cfg.objective)
        with torch.device("meta"):
            net = build_net(cfg.net, **obj.net_options(), input_dim=2, global_cond_dim=40)
        counts[name] = sum(p.numel() for p in net.parameters())
    assert counts == {"diffusion": 65_783_298, "shortcut": 66_308_866}


def test_dp_frequency_rounding_is_bit_equal_and_legacy_is_kept():
    import math

    from shortcut_policy.nets.embeddings import sinusoidal

    k = torch.arange(100)
    for dim in (16, 128, 256):
        half = dim // 2
        freqs = torch.exp(torch.arange(half) * -(math.log(10000) / (half - 1)))  # Diffusion Policy's formula
        ref = torch.cat([(k[:, None] * freqs).sin(), (k[:, None] * freqs).cos()], -1)
        assert torch.equal(sinusoidal(k.float(), dim, order="sin_cos", freqs="dp"), ref)
        old = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - 1))
        old_ref = torch.cat([(k[:, None] * old).sin(), (k[:, None] * old).cos()], -1)
        assert torch.equal(sinusoidal(k.float(), dim, order="sin_cos", freqs="legacy"), old_ref)
