"""The paper's baselines consistency training and live reflow: analytic properties (no training needed)."""

import copy

import pytest
import torch
from test_objectives import Recorder, oracle_point  # noqa: E402  (shared test nets)

from shortcut_policy.conventions import INTERP_EPS, LOG2_M, M, interpolate
from shortcut_policy.nets.mlp import MLPNet
from shortcut_policy.objectives import OBJECTIVES, ConsistencyTraining, LiveReflow, build_objective


def oracle_x1(c):
    """A velocity whose data estimate x + (1 - t) v is exactly c at every (x, t < 1)."""

    def f(x, t, level, cond):
        tb = t.reshape(-1, *([1] * (x.dim() - 1)))
        return (c - x) / (1 - tb)

    return f


def tiny_unet():
    from shortcut_policy.nets.unet1d import UNet1D

    return UNet1D(2, 6, step_embed_dim=16, down_dims=(16, 32))


# --- registry and configs -------------------------------------------------------------------------------------
def test_registered_and_strict_constructors():
    assert OBJECTIVES["consistency"] is ConsistencyTraining and OBJECTIVES["live_reflow"] is LiveReflow
    for name in ("consistency", "live_reflow"):
        with pytest.raises(ValueError, match="bootstrap_fracton"):
            build_objective({"name": name, "bootstrap_fracton": 0.5})
        with pytest.raises(TypeError, match="bootstrap_fracton"):
            OBJECTIVES[name](bootstrap_fracton=0.5)
    assert ConsistencyTraining().teacher == "ema"  # the reference's bootstrap_ema default
    assert LiveReflow().teacher == "online" and LiveReflow().bootstrap_fraction == 0.125
    with pytest.raises(ValueError, match="total_steps"):
        ConsistencyTraining(total_steps=0)
    with pytest.raises(ValueError, match="teacher"):
        ConsistencyTraining(teacher="frozen")
    with pytest.raises(ValueError, match="bootstrap_fraction"):
        LiveReflow(bootstrap_fraction=1.0)
    with pytest.raises(ValueError, match="euler_steps"):
        LiveReflow(euler_steps=0)
    with pytest.raises(ValueError, match="sample_level"):
        LiveReflow(sample_level="nope")


@pytest.mark.parametrize("name", ["consistency", "live_reflow"])
def test_config_files_build_in_the_train_config(name):
    from shortcut_policy import cli

    cfg = cli.compose("train", [f"objective={name}", "train.num_steps=700", "logger=none"])
    obj = build_objective(cfg.objective)
    assert obj.name == name
    if name == "consistency":
        assert obj.total_steps == 700  # ${train.num_steps}


# --- consistency training -------------------------------------------------------------------------------------
def test_consistency_target_is_the_teacher_x1_estimate_velocity():
    torch.set_default_dtype(torch.float64)
    try:
        obj = ConsistencyTraining(total_steps=7)
        f = lambda x, t, l, c: 0.3 * x + t.reshape(-1, 1) ** 2 - 0.5  # noqa: E731  an arbitrary teacher velocity
        teacher = Recorder(f)
        x0, x1 = torch.randn(5, 2), torch.randn(5, 2)
        t = torch.tensor([0.0, 0.25, 0.5, 0.75, 0.5])
        d = torch.tensor([0.25, 0.25, 0.25, 0.25, 0.5])
        x_t, tgt = obj.targets(teacher, x0, x1, t, d)
        # by hand: x_t2 on the same noise pair, x1_hat = x_t2 + (1 - t2) v(x_t2, t2), v = (x1_hat - x_t) / (1 - t)
        t2 = t + d
        xt = (1 - (1 - INTERP_EPS) * t[:, None]) * x0 + t[:, None] * x1
        xt2 = (1 - (1 - INTERP_EPS) * t2[:, None]) * x0 + t2[:, None] * x1
        x1_hat = xt2 + (1 - t2[:, None]) * f(xt2, t2, None, None)
        torch.testing.assert_close(x_t, xt)
        torch.testing.assert_close(tgt, (x1_hat - xt) / (1 - t[:, None]))
        (call,) = teacher.calls
        torch.testing.assert_close(call["t"], t2)
        assert (call["level"] == LOG2_M).all() and not call["grad"]  # dt ignored: the FM level; no grad
        # t2 = 1: the estimate is the data point itself (x_1 + eps x0), whatever the teacher says
        _, tgt1 = obj.targets(teacher, x0[:1], x1[:1], torch.tensor([0.5]), torch.tensor([0.5]))
        x_half = interpolate(x0[:1], x1[:1], torch.tensor([0.5]))
        torch.testing.assert_close(tgt1, (x1[:1] + INTERP_EPS * x0[:1] - x_half) / 0.5)
    finally:
        torch.set_default_dtype(torch.float32)


def test_consistency_loss_uses_scheduled_level_and_grid_times():
    torch.manual_seed(0)
    obj = ConsistencyTraining(total_steps=70)  # 7 sections of 10 calls
    net = Recorder(lambda x, t, l, c: torch.zeros_like(x))
    seen = []
    for _ in range(75):
        net.calls.clear()
        _, info = obj.loss(net, torch.randn(64, 3), teacher=net)
        teacher_call, student_call = net.calls
        k = int(info["level"])
        seen.append(k)
        d = 2.0**-k
        t = student_call["t"]
        assert torch.allclose(t / d, torch.round(t / d)) and (t <= 1 - d + 1e-7).all()  # t multiple of d in [0, 1-d]
        torch.testing.assert_close(teacher_call["t"], t + d)  # teacher at t + d
        assert (student_call["level"] == LOG2_M).all()  # the net never sees the step size
    # reference L10-12: floor(step / (max_steps / 7)), step counted from 0; capped at log2(M) - 1 past the end
    assert seen == [s * 7 // 70 for s in range(70)] + [6] * 5
    assert int(obj.step_count) == 75
    with torch.no_grad():  # a no-grad (validation) call does not advance the schedule
        obj.loss(net, torch.randn(8, 3))
    assert int(obj.step_count) == 75


def test_consistency_progress_overrides_the_counter():
    obj = ConsistencyTraining()  # no total_steps: needs progress
    with pytest.raises(ValueError, match="total_steps"):
        obj.loss(MLPNet(input_dim=3, hidden=16, depth=1), torch.randn(8, 3))
    for step, level in [(0, 0), (99, 0), (143, 1), (500, 3), (999, 6), (1000, 6), (5000, 6)]:
        obj.set_progress(step, 1000)
        assert obj.current_level() == level, step
    obj.progress = 2 / 7
    assert obj.current_level() == 2
    obj.progress = 1.5
    with pytest.raises(ValueError, match="progress"):
        obj.current_level()
    m16 = ConsistencyTraining(m=16, total_steps=8)  # log2 M = 4 sections
    assert [m16.current_level()] == [0]
    m16.step_count.fill_(6)
    assert m16.current_level() == 3


@pytest.mark.parametrize("steps", [1, 2, 4, 128])
def test_consistency_sampler_with_an_x1_oracle_returns_the_data_point(steps):
    c = torch.tensor([[2.0, -3.0, 0.5]])
    net = Recorder(oracle_x1(c))
    obj = ConsistencyTraining(total_steps=10)
    g = torch.Generator().manual_seed(0)
    out = obj.sample(net, torch.randn(16, 3), steps=steps, generator=g)
    torch.testing.assert_close(out, c.expand(16, 3), atol=1e-5, rtol=0)
    assert len(net.calls) == steps
    assert [float(call["t"][0]) for call in net.calls] == pytest.approx([i / steps for i in range(steps)])
    assert all((call["level"] == LOG2_M).all() for call in net.calls)
    if steps > 1:  # re-noised: the state before step i is c t + eps (1 - t) with fresh noise
        x_before = net.calls[1]["x"]
        eps = (x_before - c * (1 / steps)) / (1 - 1 / steps)
        assert eps.std() > 0.5 and not torch.allclose(eps, net.calls[0]["x"])


def test_consistency_sampler_renoising_follows_the_generator():
    net = Recorder(lambda x, t, l, c: -x)  # x1_hat = t x: the output depends on the fresh noise
    obj = ConsistencyTraining(total_steps=10)
    x0 = torch.randn(8, 2)
    a = obj.sample(net, x0, steps=4, generator=torch.Generator().manual_seed(3))
    b = obj.sample(net, x0, steps=4, generator=torch.Generator().manual_seed(3))
    c = obj.sample(net, x0, steps=4, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # one step = one jump: x0 + v(x0, 0)
    one = obj.sample(net, x0, steps=1)
    torch.testing.assert_close(one, torch.zeros_like(x0))


def test_consistency_oracle_teacher_gives_zero_loss_on_a_point_mass():
    c = torch.tensor([[1.0, -2.0]])
    net = Recorder(oracle_point(c))
    obj = ConsistencyTraining(total_steps=7)
    obj.step_count.fill_(5)
    loss, info = obj.loss(net, c.expand(32, 2).clone(), teacher=net)
    assert info["level"] == 5 and loss.item() < 1e-8


# --- live reflow ----------------------------------------------------------------------------------------------
def test_live_reflow_targets_equal_the_oracle_velocity():
    torch.manual_seed(0)
    c = torch.tensor([[2.0, -3.0, 0.5]])
    net = Recorder(oracle_point(c))
    obj = LiveReflow(bootstrap_fraction=0.25)
    x0 = torch.randn(32, 3)
    t = torch.randint(0, M, (8,)).float() / M
    x_t, v = obj.reflow_targets(net, x0[:8], t)
    # the rollout follows the oracle's straight line: x_8 = c + eps x0, so the target x_8 - x0 is the oracle's
    # velocity along its path (exactly c - (1 - eps) x0), and x_t lies on that path up to O(eps)
    on_path = interpolate(x0[:8], c.expand(8, 3), t)
    torch.testing.assert_close(v, oracle_point(c)(on_path, t, None, None), atol=1e-5, rtol=0)
    torch.testing.assert_close(x_t, on_path, atol=1e-4, rtol=0)
    assert len(net.calls) == 8 and not any(call["grad"] for call in net.calls)  # 8 Euler steps, no grad
    assert [float(call["t"][0]) for call in net.calls] == pytest.approx([i / 8 for i in range(8)])
    assert all((call["level"] == LOG2_M).all() for call in net.calls)  # the rollout at the flow-matching level
    # in the loss: reflow rows first at level 0 (d = 1), the rest flow matching at log2 M; the oracle fits both
    net.calls.clear()
    loss, info = obj.loss(net, c.expand(32, 3).clone(), x0=x0)
    student = net.calls[-1]
    assert len(net.calls) == 9 and student["grad"]
    assert (student["level"][:8] == 0).all() and (student["level"][8:] == LOG2_M).all()
    torch.testing.assert_close(net.calls[0]["x"], x0[:8])  # reflow rollouts start from the given noise rows
    tt = student["t"]
    assert torch.allclose(tt * M, torch.round(tt * M)) and (tt < 1).all()
    # reflow rows: the target x_8 - x0 differs from the oracle at x_t by O(eps / (1 - t)) (the reference's target
    # omits the (1 - eps) factor of the interpolant's velocity); flow-matching rows fit exactly
    assert info["loss_reflow"] < 1e-4 and info["loss_flow"] < 1e-10 and info["reflow_ratio"] == 0.25


def test_live_reflow_uses_the_online_net_unless_asked():
    net = Recorder(lambda x, t, l, c: torch.zeros_like(x))
    other = Recorder(lambda x, t, l, c: torch.zeros_like(x))
    LiveReflow().loss(net, torch.randn(16, 2), teacher=other)
    assert len(other.calls) == 0 and len(net.calls) == 9
    net.calls.clear()
    LiveReflow(teacher="ema").loss(net, torch.randn(16, 2), teacher=other)
    assert len(other.calls) == 8 and len(net.calls) == 1


@pytest.mark.parametrize("steps", [1, 2, 8, 128])
def test_live_reflow_samples_the_straight_line_oracle_exactly(steps):
    c = torch.tensor([[2.0, -3.0, 0.5]])
    net = Recorder(oracle_point(c))
    out = LiveReflow().sample(net, torch.randn(16, 3), steps=steps)
    torch.testing.assert_close(out, c.expand(16, 3), atol=1e-3, rtol=0)
    assert len(net.calls) == steps
    assert {float(call["level"][0]) for call in net.calls} == {float(steps.bit_length() - 1)}
    net.calls.clear()
    LiveReflow(sample_level="reflow").sample(net, torch.randn(4, 3), steps=steps)
    assert {float(call["level"][0]) for call in net.calls} == {float(LOG2_M if steps == M else 0)}


def test_live_reflow_class_dropout_only_on_flow_rows():
    torch.manual_seed(0)
    obj = LiveReflow(bootstrap_fraction=0.5, class_dropout_prob=1.0)
    net = Recorder(lambda x, t, l, c: torch.zeros_like(x))
    labels = torch.arange(8) % 5
    obj.loss(net, torch.randn(8, 2), labels, null_cond=10)
    student = net.calls[-1]
    assert (student["cond"][:4] == labels[:4]).all() and (student["cond"][4:] == 10).all()
    assert all((call["cond"] == labels[:4]).all() for call in net.calls[:-1])  # rollouts: true labels (no cfg)


# --- both -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["consistency", "live_reflow"])
def test_no_gradient_through_targets(name):
    torch.manual_seed(0)
    net = MLPNet(input_dim=3, hidden=32, depth=2)
    frozen = copy.deepcopy(net).requires_grad_(False)
    x1 = torch.randn(64, 3)
    grads = []
    # live_reflow with teacher=ema rolls out the `teacher` argument: with the online net as teacher, any graph through
    # the rollout would change the gradient
    extra = {"total_steps": 7} if name == "consistency" else {"teacher": "ema"}
    for teacher in (net, frozen):  # same weights: identical grads iff nothing flows through the targets
        obj = build_objective({"name": name, **extra})
        if name == "consistency":
            obj.step_count.fill_(4)  # level 4: a nontrivial teacher term
        net.zero_grad()
        torch.manual_seed(1)
        loss, _ = obj.loss(net, x1, teacher=teacher)
        loss.backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-7)
    if name == "live_reflow":  # the online rollout itself: targets carry no graph
        x0 = torch.randn(8, 3)
        _, v = LiveReflow().reflow_targets(net, x0, torch.zeros(8))
        assert not v.requires_grad


@pytest.mark.parametrize("name", ["consistency", "live_reflow"])
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    net = tiny_unet()
    obj = build_objective({"name": name, **({"total_steps": 7} if name == "consistency" else {})})
    if name == "consistency":
        obj.step_count.fill_(3)
    loss, _ = obj.loss(net, torch.randn(16, 8, 2), torch.randn(16, 6), teacher=copy.deepcopy(net))
    loss.backward()
    for n, p in net.named_parameters():
        if name == "consistency" and n.startswith("step_size_embed"):
            continue  # the level is held at log2 M (the reference ignores dt): a bias-like gradient only
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


def test_toy_selection_by_name():
    from pathlib import Path

    from omegaconf import OmegaConf

    from shortcut_policy.bench.toy import toy_selection

    tc = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "bench.yaml").toy
    assert list(tc.select) == ["shortcut", "flow_matching"]
    assert {"shortcut", "flow_matching", "meanflow", "consistency", "live_reflow", "regression"} <= set(tc.objectives)
    assert toy_selection(tc) == ["shortcut", "flow_matching"]
    tc.select = ["live_reflow", "consistency", "live_reflow"]
    assert toy_selection(tc) == ["live_reflow", "consistency"]
    tc.select = "meanflow, regression"
    assert toy_selection(tc) == ["meanflow", "regression"]
    tc.select = ["shortcut", "nope"]
    with pytest.raises(ValueError, match="nope.*valid.*consistency"):
        toy_selection(tc)


def test_quality_vs_nfe_plot_skips_missing_and_refuses_empty(tmp_path):
    from shortcut_policy.bench.plots import quality_vs_nfe

    res = {"a@1": 0.5, "a@4": 0.2, "b@1": 0.9}  # b has no value at 4 steps: drawn with one point
    out = quality_vs_nfe(res, "{obj}@{n}", ["a", "b"], [1, 4], tmp_path / "q.png", "W2", "t", floor=0.1)
    assert out.stat().st_size > 0
    with pytest.raises(ValueError, match="no values"):
        quality_vs_nfe(res, "fid@{obj}{n}", ["a"], [1], tmp_path / "r.png", "FID", "t")
    assert not (tmp_path / "r.png").exists()
