"""Properties of the shared objective package (no training needed)."""

import copy

import pytest
import torch
from torch import nn

from shortcut_policy.conventions import INTERP_EPS, LOG2_M, M, check_steps, interpolate, velocity_target
from shortcut_policy.nets.mlp import MLPNet
from shortcut_policy.objectives import Diffusion, FlowMatching, Shortcut, build_objective
from shortcut_policy.objectives.timesteps import allocate_levels


class Recorder(nn.Module):
    """A net that returns a fixed function of its inputs and records every call."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.calls = fn, []
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x, t, level, cond=None):
        self.calls.append(
            {
                "x": x.detach().clone(),
                "t": t.detach().clone(),
                "level": level.detach().clone(),
                "cond": None if cond is None else cond.detach().clone(),
                "grad": torch.is_grad_enabled(),
            }
        )
        return self.fn(x, t, level, cond) * self.w


def oracle_point(c):
    """Exact flow-matching field of a point mass at c under the reference interpolant: straight lines."""

    def f(x, t, level, cond):
        tb = t.reshape(-1, *([1] * (x.dim() - 1)))
        return c - (1 - INTERP_EPS) * (x - tb * c) / (1 - (1 - INTERP_EPS) * tb)

    return f


def test_interpolation_endpoints_and_target():
    x0, x1 = torch.randn(5, 3), torch.randn(5, 3)
    assert torch.allclose(interpolate(x0, x1, torch.zeros(5)), x0)
    assert torch.allclose(interpolate(x0, x1, torch.ones(5)), x1 + INTERP_EPS * x0, atol=1e-7)
    t = torch.rand(5)
    # x_t moves with the constant velocity target: x_t = x0 + t v
    assert torch.allclose(interpolate(x0, x1, t), x0 + t[:, None] * velocity_target(x0, x1), atol=1e-6)


@pytest.mark.parametrize("steps", [1, 2, 128])
@pytest.mark.parametrize("obj", [Shortcut(), FlowMatching()])
def test_straight_line_oracle_is_sampled_exactly(obj, steps):
    c = torch.tensor([[2.0, -3.0, 0.5]])
    net = Recorder(oracle_point(c))
    x0 = torch.randn(16, 3)
    x1 = obj.sample(net, x0, steps=steps)
    assert torch.allclose(x1, c.expand(16, 3), atol=1e-3), (x1 - c).abs().max()
    assert len(net.calls) == steps
    lv = {float(call["level"][0]) for call in net.calls}
    assert lv == ({float(steps.bit_length() - 1)} if obj.name == "shortcut" else {float(LOG2_M)})
    assert [float(call["t"][0]) for call in net.calls] == pytest.approx([i / steps for i in range(steps)])


@pytest.mark.parametrize("bad", [0, 3, 6, 256, -1, 1.5, True, "4"])
def test_invalid_step_counts_rejected(bad):
    with pytest.raises((ValueError, TypeError), match="steps"):
        check_steps(bad)
    with pytest.raises((ValueError, TypeError), match="steps"):
        Shortcut().sample(MLPNet(), torch.randn(2, 2), steps=bad)


def test_level_allocation_stratified_and_small_batch_fallback():
    lv = allocate_levels(64, 7, "reference")
    counts = torch.bincount(lv, minlength=7)
    assert counts.tolist() == [10, 9, 9, 9, 9, 9, 9]  # 9 each, surplus at d=1 as the reference
    with pytest.warns(UserWarning, match="bootstrap rows"):
        small = allocate_levels(4, 7, "reference")
    assert small.tolist() == [6, 5, 4, 3]
    assert sorted(set(allocate_levels(21, 7, "cycle").tolist())) == list(range(7))
    # the reference's bootstrap_dt_bias=1 counts for 32 rows (shortcut-models.md): {6..2: 2 each, 1: 8, 0: 14}
    assert torch.bincount(allocate_levels(32, 7, "dt_bias"), minlength=7).tolist() == [14, 8, 2, 2, 2, 2, 2]
    with pytest.raises(ValueError, match="dt_bias"):
        allocate_levels(32, 7, "nope")


def test_flow_matching_rows_use_smallest_step_and_velocity_target():
    torch.manual_seed(0)
    obj = Shortcut(bootstrap_fraction=0.25)
    net = Recorder(lambda x, t, l, c: torch.zeros_like(x))
    x1, x0 = torch.randn(32, 4), torch.randn(32, 4)
    loss, info = obj.loss(net, x1, x0=x0)
    student = net.calls[-1]
    nb = 8
    assert (student["level"][nb:] == LOG2_M).all()
    t_fm = student["t"][nb:]
    assert torch.allclose(t_fm * M, torch.round(t_fm * M)) and (t_fm < 1).all()
    expected_fm = (velocity_target(x0[nb:], x1[nb:]) ** 2).mean()
    assert info["loss_flow"] == pytest.approx(expected_fm.item(), rel=1e-5)
    # bootstrap rows: levels < log2 M, t on multiples of d = 2^-k within [0, 1 - d]
    lv, tb = student["level"][:nb], student["t"][:nb]
    assert (lv < LOG2_M).all()
    d = 2.0**-lv
    assert torch.allclose(tb / d, torch.round(tb / d)) and (tb <= 1 - d + 1e-6).all()


def test_bootstrap_target_is_two_half_steps_of_the_teacher():
    obj = Shortcut(bootstrap_fraction=0.5, clip=None)
    f = lambda x, t, l, c: 0.3 * x + t.reshape(-1, 1) + 0.1 * l.reshape(-1, 1)  # noqa: E731
    teacher = Recorder(f)
    x_t, t = torch.randn(4, 2), torch.tensor([0.0, 0.5, 0.25, 0.0])
    levels = torch.tensor([0, 1, 2, 6])
    tgt = obj.bootstrap_targets(teacher, x_t, t, levels, None, None)
    d = (2.0 ** -levels.float())[:, None]
    v1 = f(x_t, t, levels + 1.0, None)
    v2 = f(x_t + d / 2 * v1, t + d[:, 0] / 2, levels + 1.0, None)
    assert torch.allclose(tgt, (v1 + v2) / 2, atol=1e-6)
    assert all((c["level"] == levels + 1).all() for c in teacher.calls)
    clipped = Shortcut(bootstrap_fraction=0.5, clip=0.1).bootstrap_targets(teacher, x_t * 100, t, levels, None, None)
    assert clipped.abs().max() <= 0.1 + 1e-7


def test_no_gradient_through_bootstrap_targets():
    torch.manual_seed(0)
    net = MLPNet(input_dim=3, hidden=32, depth=2)
    frozen = copy.deepcopy(net).requires_grad_(False)
    x1 = torch.randn(64, 3)
    grads = []
    for teacher in (net, frozen):  # same weights: identical grads iff nothing flows through the teacher
        net.zero_grad()
        torch.manual_seed(1)
        loss, _ = Shortcut().loss(net, x1, teacher=teacher)
        loss.backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-7)


@pytest.mark.parametrize("name", ["shortcut", "flow_matching", "diffusion"])
def test_every_parameter_gets_a_gradient(name):
    from shortcut_policy.nets.unet1d import UNet1D

    torch.manual_seed(0)
    net = UNet1D(2, 6, step_embed_dim=16, down_dims=(16, 32))
    obj = build_objective({"name": name})
    loss, _ = obj.loss(net, torch.randn(16, 8, 2), torch.randn(16, 6))
    loss.backward()
    for n, p in net.named_parameters():
        if name != "shortcut" and n.startswith("step_size_embed"):
            continue  # baselines hold the level constant: this branch only gets a bias-like gradient
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


def test_class_dropout_only_on_fm_rows_and_cfg_only_at_smallest_level():
    torch.manual_seed(0)
    null = 10
    obj = Shortcut(
        bootstrap_fraction=0.5, class_dropout_prob=1.0, bootstrap_cfg=True, cfg_scale=1.5, level_allocation="cycle"
    )
    net = Recorder(lambda x, t, l, c: torch.zeros_like(x))
    labels = torch.arange(14) % 10
    obj.loss(net, torch.randn(14, 2), labels, null_cond=null)
    student = net.calls[-1]
    assert (student["cond"][:7] == labels[:7]).all()  # bootstrap rows keep true labels
    assert (student["cond"][7:] == null).all()  # FM rows dropped (p = 1)
    teacher_calls = net.calls[:-1]
    for call in teacher_calls:
        has_null = call["cond"] == null
        # null labels appear only in guided calls, whose rows are all at teacher level log2 M (FM level)
        if has_null.any():
            assert (call["level"] == LOG2_M).all()
    assert any((c["cond"] == null).any() for c in teacher_calls)


def test_sampling_uses_cfg_only_at_M_steps():
    obj = Shortcut(cfg_scale=1.5)
    net = Recorder(lambda x, t, l, c: torch.zeros_like(x))
    labels = torch.tensor([1, 2])
    obj.sample(net, torch.randn(2, 2), labels, steps=4, null_cond=10)
    assert all(c["x"].shape[0] == 2 and (c["cond"] != 10).all() for c in net.calls)
    net.calls.clear()
    obj.sample(net, torch.randn(2, 2), labels, steps=128, null_cond=10)
    assert all(c["x"].shape[0] == 4 and (c["cond"][2:] == 10).all() for c in net.calls)


def test_bad_input_errors():
    net = MLPNet()
    with pytest.raises(ValueError, match="NaN"):
        Shortcut().loss(net, torch.tensor([[float("nan"), 0.0]] * 8))
    with pytest.raises(TypeError, match="floating"):
        Shortcut().loss(net, torch.ones(8, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="x must be"):
        Shortcut().loss(net, torch.randn(8, 3))
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        Shortcut().loss(Recorder(lambda x, t, l, c: x * float("inf")), torch.randn(8, 2))
    with pytest.raises(ValueError, match="bootstrap_fraction"):
        Shortcut(bootstrap_fraction=1.5)
    with pytest.raises(ValueError, match="does not exist; valid objectives"):
        build_objective({"name": "nope"})


def test_diffusion_ddpm_and_ddim_sampling():
    torch.manual_seed(0)
    obj = Diffusion()
    net = Recorder(lambda x, t, l, c: torch.zeros_like(x))  # eps = 0: deterministic DDIM
    x = obj.sample(net, torch.randn(3, 8, 2), steps=10, sampler="ddim")
    assert x.shape == (3, 8, 2) and len(net.calls) == 10 and torch.isfinite(x).all()
    net.calls.clear()
    obj.sample(net, torch.randn(3, 8, 2), steps=100)
    assert len(net.calls) == 100
    ts = torch.stack([c["t"][0] for c in net.calls])
    # Diffusion Policy's time input: the integer DDPM step k, from K - 1 (noise) down to 0
    assert torch.equal(ts, torch.arange(99, -1, -1, dtype=torch.float32)) and obj.net_time_scale == 1.0
    with pytest.raises(ValueError, match="steps"):
        obj.sample(net, torch.randn(1, 8, 2), steps=101)
    # checkpoint format 1: t = 1 - k/K (the net scales it by its own time scale), from noise (0) toward data
    old = Diffusion(time_input="flipped")
    net.calls.clear()
    old.sample(net, torch.randn(3, 8, 2), steps=100)
    ts = torch.stack([c["t"][0] for c in net.calls])
    assert torch.allclose(ts, 1.0 - torch.arange(99, -1, -1).float() / 100) and old.net_time_scale is None
    with pytest.raises(ValueError, match="time_input"):
        Diffusion(time_input="reversed")


def test_diffusion_net_sees_dp_timestep_and_has_no_step_branch():
    from shortcut_policy.nets import build_net

    cfg = {"kind": "unet1d", "step_embed_dim": 16, "down_dims": [16, 32], "use_step_size": "auto", "time_scale": 100}
    obj = Diffusion()
    net = build_net(cfg, **obj.net_options(), input_dim=2, global_cond_dim=6)
    assert net.step_size_embed is None and net.time_scale == 1.0
    shortcut_net = build_net(cfg, **Shortcut().net_options(), input_dim=2, global_cond_dim=6)
    assert shortcut_net.step_size_embed is not None and shortcut_net.time_scale == 100.0
    for name in ("regression", "flow_matching", "consistency"):  # objectives whose contract uses no step size
        assert build_net(cfg, **build_objective({"name": name}).net_options(), input_dim=2).step_size_embed is None
    # the training loss feeds k itself: with noise x0 fixed, record the t the net is called with
    torch.manual_seed(0)
    rec = Recorder(lambda x, t, l, c: torch.zeros_like(x))
    obj.loss(rec, torch.randn(5, 8, 2), x0=torch.randn(5, 8, 2))
    t = rec.calls[0]["t"]
    assert t.dtype == torch.float32 and torch.equal(t, t.round()) and 0 <= t.min() and t.max() <= 99
