"""MeanFlow and the regression baseline: analytic properties (no training needed)."""

import pytest
import torch
from torch import nn

from shortcut_policy.conventions import INTERP_EPS
from shortcut_policy.nets import build_net
from shortcut_policy.objectives import MeanFlow, Regression, build_objective


class Fn(nn.Module):
    """A 'net' computing a fixed function of (x, t, d) with one scalar parameter; continuous step input."""

    step_input = "continuous"

    def __init__(self, fn):
        super().__init__()
        self.fn, self.w = fn, nn.Parameter(torch.ones(()))

    def forward(self, x, t, d, cond=None):
        return self.fn(x, t, d) * self.w


def linear_field_average_velocity(a):
    """v(x, t) = a x has flow x_s = x_t exp(a (s - t)); its exact average velocity over [t, t + d]."""

    def u(x, t, d):
        db = d.reshape(-1, *([1] * (x.dim() - 1)))
        safe = torch.where(db.abs() < 1e-6, torch.ones_like(db), db)
        ratio = torch.where(db.abs() < 1e-6, a * torch.ones_like(db), torch.expm1(a * db) / safe)
        return x * ratio

    return u


@pytest.mark.parametrize("jvp", ["autograd", "finite_difference"])
def test_meanflow_target_equals_analytic_average_velocity_on_a_linear_field(jvp):
    torch.set_default_dtype(torch.float64)
    try:
        a = 0.7
        net = Fn(linear_field_average_velocity(a))
        obj = MeanFlow(jvp=jvp, fd_eps=1e-4)
        x = torch.randn(32, 4, 3)
        t = torch.rand(32) * 0.5
        d = torch.rand(32) * 0.5
        v = a * x  # the instantaneous velocity at (x, t)
        target = v + d.reshape(-1, 1, 1) * obj.time_derivative(net, x, t, d, v, None)
        torch.testing.assert_close(target, net(x, t, d), atol=1e-6, rtol=1e-6)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("tangent", ["conditional", "model"])
@pytest.mark.parametrize("steps", [1, 2, 3, 8])
def test_meanflow_straight_line_oracle_loss_zero_and_exact_sampling(steps, tangent):
    c = torch.tensor([[2.0, -3.0, 0.5]])

    def straight(x, t, d):  # point mass at c: straight paths, average velocity = instantaneous velocity
        tb = t.reshape(-1, 1)
        return c - (1 - INTERP_EPS) * (x - tb * c) / (1 - (1 - INTERP_EPS) * tb)

    net, obj = Fn(straight), MeanFlow(flow_fraction=0.25, tangent=tangent)
    loss, info = obj.loss(net, c.expand(64, 3).clone())
    assert info["mse"] < 1e-8
    out = obj.sample(net, torch.randn(16, 3), steps=steps)
    torch.testing.assert_close(out, c.expand(16, 3), atol=1e-3, rtol=0)


def test_meanflow_model_tangent_uses_the_nets_own_velocity():
    """tangent=model (improved MeanFlow): the JVP tangent is the net's u at d = 0, not x1 - x0; the target keeps v."""
    torch.set_default_dtype(torch.float64)
    try:
        a = 0.7

        def field(x, t, d):  # average velocity of v = a x, plus a d-independent offset the conditional v lacks
            return linear_field_average_velocity(a)(x, t, d) + 0.3

        net = Fn(field)
        x1, x0 = torch.randn(16, 4, 3), torch.randn(16, 4, 3)
        losses = {}
        for tangent in ("conditional", "model"):
            obj = MeanFlow(flow_fraction=0.0, tangent=tangent, adaptive_p=0.0, jvp="autograd")
            torch.manual_seed(3)
            losses[tangent] = obj.loss(net, x1, x0=x0)[0]
        # the same rows by hand, with the net's own velocity at d = 0 as the tangent
        torch.manual_seed(3)
        obj = MeanFlow(flow_fraction=0.0, tangent="model", adaptive_p=0.0, jvp="autograd")
        t, d = obj.sample_times(16, "cpu")
        from shortcut_policy.conventions import interpolate, velocity_target

        x_t, v = interpolate(x0, x1, t), velocity_target(x0, x1)
        tan = net(x_t, t, torch.zeros_like(d))
        target = v + d.reshape(-1, 1, 1) * obj.time_derivative(net, x_t, t, d, tan, None)
        expected = ((net(x_t, t, d) - target) ** 2).mean()
        torch.testing.assert_close(losses["model"].double(), expected.detach(), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(losses["model"], losses["conditional"])
    finally:
        torch.set_default_dtype(torch.float32)


def test_meanflow_no_gradient_through_target_and_every_parameter_gets_one():
    torch.manual_seed(0)
    net = build_net(
        {"kind": "unet1d", "step_embed_dim": 16, "down_dims": [16, 32]},
        step_input="continuous",
        input_dim=2,
        global_cond_dim=6,
    )
    obj = build_objective({"name": "meanflow"})
    x1, cond = torch.randn(16, 8, 2), torch.randn(16, 6)
    t, d = obj.sample_times(16, "cpu")
    dudt = obj.time_derivative(net, torch.randn_like(x1), t, d, torch.randn_like(x1), cond)
    assert not dudt.requires_grad
    loss, _ = obj.loss(net, x1, cond)
    loss.backward()
    for n, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


def test_meanflow_times_and_flow_fraction():
    torch.manual_seed(0)
    t, d = MeanFlow(flow_fraction=0.75).sample_times(20000, "cpu")
    assert (t >= 0).all() and (d >= 0).all() and (t + d <= 1 + 1e-6).all()
    assert (d == 0).float().mean().item() == pytest.approx(0.75, abs=0.02)
    t, d = MeanFlow(flow_fraction=0.0, time_dist="uniform").sample_times(20000, "cpu")
    assert (d > 0).all()


def test_meanflow_refuses_an_unknown_tangent():
    with pytest.raises(ValueError, match="objective.tangent='x'"):
        MeanFlow(tangent="x")


def test_meanflow_refuses_a_level_net_and_bad_options():
    level_net = build_net(
        {"kind": "unet1d", "step_embed_dim": 16, "down_dims": [16, 32]}, input_dim=2, global_cond_dim=6
    )
    with pytest.raises(ValueError, match="continuous"):
        MeanFlow().loss(level_net, torch.randn(4, 8, 2), torch.randn(4, 6))
    with pytest.raises(ValueError, match="step_input"):
        build_net(
            {"kind": "unet1d", "down_dims": [16, 32], "step_input": "level"}, step_input="continuous", input_dim=2
        )
    with pytest.raises(ValueError, match="flow_fraction"):
        MeanFlow(flow_fraction=1.0)
    with pytest.raises(ValueError, match="bootstrap_fracton.*valid keys"):
        build_objective({"name": "meanflow", "bootstrap_fracton": 0.5})
    with pytest.raises(ValueError, match="bootstrap_fracton"):
        build_objective({"name": "shortcut", "bootstrap_fracton": 0.5})
    with pytest.raises(ValueError, match="valid objectives"):
        build_objective({"name": "nope"})


def test_continuous_step_input_keeps_the_parameter_count():
    kw = {"kind": "unet1d", "step_embed_dim": 16, "down_dims": [16, 32]}
    a = build_net(kw, input_dim=2, global_cond_dim=6)
    b = build_net(kw, step_input="continuous", input_dim=2, global_cond_dim=6)
    b.load_state_dict(a.state_dict())  # same parameters: existing checkpoints load into either
    assert b.step_input == "continuous" and a.step_input == "level"


def test_regression_learns_the_conditional_mean_and_ignores_steps():
    torch.manual_seed(0)
    net = build_net({"kind": "mlp", "hidden": 32, "depth": 2, "cond_dim": 1}, input_dim=2)
    obj = Regression()
    cond = torch.randn(256, 1)
    x1 = torch.cat([cond * 2.0, -cond], 1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):
        loss, _ = obj.loss(net, x1, cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-2
    out1 = obj.sample(net, torch.randn(256, 2), cond, steps=1)
    out2 = obj.sample(net, torch.randn(256, 2), cond, steps=1)
    assert torch.equal(out1, out2)  # deterministic: the noise is ignored
    with pytest.warns(UserWarning, match="ignores steps=8"):
        assert obj.check_steps(8) == 1


def test_shortcut_target_depth_integrates_the_teacher_over_the_whole_step():
    """target_depth=n: n Euler steps of the teacher at level k + log2 n (capped at the FM level), mean velocity."""
    from shortcut_policy.objectives import Shortcut

    calls = []

    def teacher(x, t, level, cond):
        calls.append(level.clone())
        return torch.sin(3 * x) + t.reshape(-1, 1) - 0.1 * level.reshape(-1, 1)

    obj = Shortcut(m=16, target_depth=8, clip=None)
    x_t, levels = torch.randn(3, 2), torch.tensor([0, 1, 3])
    t = torch.tensor([0.0, 0.5, 0.25])
    got = obj.bootstrap_targets(teacher, x_t, t, levels, None, None)
    for i, (k, n) in enumerate([(0, 8), (1, 8), (3, 2)]):  # level 3 (d = 1/8) has only 2 steps of 1/16 left
        d, x, tt, acc = 2.0**-k, x_t[i : i + 1], t[i : i + 1], 0
        for _ in range(n):
            v = teacher(x, tt, torch.tensor([float(k + n.bit_length() - 1)]), None)
            acc, x, tt = acc + v, x + d / n * v, tt + d / n
        torch.testing.assert_close(got[i : i + 1], acc / n)
    assert Shortcut(target_depth=2).substeps(torch.tensor([0, 3, 6])).tolist() == [2, 2, 2]  # the reference
    with pytest.raises(ValueError, match="target_depth"):
        Shortcut(target_depth=3)


def test_shortcut_bootstrap_weight_scales_only_the_bootstrap_rows():
    """bootstrap_weight=w: loss = (w * sum of bootstrap-row MSEs + sum of flow-row MSEs) / B; w = 1 is the
    reference's unweighted mean, bit for bit; a non-positive weight is refused."""
    from shortcut_policy.objectives import Shortcut

    torch.manual_seed(0)
    net = build_net({"kind": "mlp", "input_dim": 2, "hidden": 32, "depth": 2, "use_step_size": True})
    x1, x0 = torch.randn(64, 2), torch.randn(64, 2)
    out = {}
    for w in (1.0, 4.0):
        obj = Shortcut(m=16, bootstrap_fraction=0.5, level_allocation="dt_bias", bootstrap_weight=w)
        torch.manual_seed(1)  # the bootstrap rows' t
        loss, info = obj.loss(net, x1, x0=x0)
        out[w] = (loss, info)
        nb = obj.n_bootstrap(64)
        expect = (w * info["loss_bootstrap"] * nb + info["loss_flow"] * (64 - nb)) / 64
        assert loss.item() == pytest.approx(expect, rel=1e-5)
    assert out[1.0][1]["loss_bootstrap"] == pytest.approx(out[4.0][1]["loss_bootstrap"])  # same rows, same targets
    assert out[4.0][0].item() > out[1.0][0].item()
    ref = Shortcut(m=16, bootstrap_fraction=0.5, level_allocation="dt_bias")
    torch.manual_seed(1)
    assert torch.equal(ref.loss(net, x1, x0=x0)[0], out[1.0][0])
    with pytest.raises(ValueError, match="bootstrap_weight"):
        Shortcut(bootstrap_weight=0)


def test_edm_preconditioning_is_the_least_squares_skip_with_unit_variance_residual():
    """For Gaussian data of std sigma_data, E[v | x_t] is linear in x_t: with F = 0 the preconditioned velocity must
    be that regression line (c_skip), and the residual v - c_skip x_t must have std c_out (F's target: unit
    variance), at every t (Monte Carlo, 400k draws)."""
    from shortcut_policy.conventions import interpolate, velocity_target
    from shortcut_policy.objectives.base import EDMVelocity

    sd = 0.33
    pre = EDMVelocity(lambda x, t, s, c: torch.zeros_like(x), sd)
    g = torch.Generator().manual_seed(0)
    n = 400_000
    for tv in (0.0, 0.25, 0.5, 0.9375):
        x0 = torch.randn(n, 1, generator=g, dtype=torch.float64)
        x1 = sd * torch.randn(n, 1, generator=g, dtype=torch.float64)
        t = torch.full((n,), tv, dtype=torch.float64)
        x_t, v = interpolate(x0, x1, t), velocity_target(x0, x1)
        slope = float((x_t * v).mean() / (x_t * x_t).mean())
        c_skip = float(pre(torch.ones(1, 1, dtype=torch.float64), torch.tensor([tv], dtype=torch.float64), None))
        assert c_skip == pytest.approx(slope, abs=0.01), tv
        ones = EDMVelocity(lambda x, t, s, c: torch.ones_like(x), sd)
        c_out = float(ones(torch.zeros(1, 1, dtype=torch.float64), torch.tensor([tv], dtype=torch.float64), None))
        assert float((v - c_skip * x_t).std()) == pytest.approx(c_out, rel=0.01), tv


def test_edm_shortcut_one_step_sample_is_the_nets_data_prediction():
    """With preconditioning=edm the 1-step sample from x0 is eps x0 + sigma_data F(x0): the net predicts the data at
    t = 0 (no noise to copy). Training, bootstrap targets and sampling all go through the preconditioning; the
    default (none) is the raw velocity."""
    k = 0.7

    class Const(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor(k))

        def forward(self, x, t, s, c=None):
            return self.w * torch.ones_like(x)

    x0 = torch.randn(5, 16, 2, generator=torch.Generator().manual_seed(1))
    edm = build_objective({"name": "shortcut", "m": 16, "preconditioning": "edm", "sigma_data": 0.4})
    out = edm.sample(Const(), x0, steps=1)
    assert torch.allclose(out, INTERP_EPS * x0 + 0.4 * k, atol=1e-6)
    raw = build_objective({"name": "shortcut", "m": 16})
    assert torch.allclose(raw.sample(Const(), x0, steps=1), x0 + k, atol=1e-6)
    fm = build_objective({"name": "flow_matching", "m": 16, "preconditioning": "edm", "sigma_data": 0.4})
    assert not torch.allclose(fm.sample(Const(), x0, steps=4), raw.sample(Const(), x0, steps=4))
    net = Const()
    loss, info = edm.loss(net, 0.3 * torch.randn(64, 16, 2), x0=torch.randn(64, 16, 2))
    loss.backward()
    assert torch.isfinite(loss) and net.w.grad is not None and net.w.grad.abs() > 0


@pytest.mark.parametrize(
    "opts, match",
    [
        ({"preconditioning": "x"}, "preconditioning"),
        ({"preconditioning": "edm", "sigma_data": 0}, "sigma_data"),
        ({"sigma_data": True}, "sigma_data"),
    ],
)
def test_preconditioning_refuses_bad_values(opts, match):
    for name in ("shortcut", "flow_matching"):
        with pytest.raises(ValueError, match=match):
            build_objective({"name": name, "m": 16, **opts})


def test_one_step_energy_score_is_lowest_for_the_true_distribution():
    """The energy score is strictly proper: for data x1 ~ N(0, I) a 1-step sampler that reproduces the noise
    (velocity 0, samples ~ N(0, I)) scores lower than a shifted, a collapsed (mode-averaging) or an over-dispersed
    sampler, on the same rows and noise draws; gradients reach the net."""
    from shortcut_policy.objectives.shortcut import one_step_energy_score

    x1 = torch.randn(20_000, 4, generator=torch.Generator().manual_seed(0))
    scores = {}
    for name, fn in {
        "true": lambda x, t, s: torch.zeros_like(x),
        "shifted": lambda x, t, s: torch.full_like(x, 0.3),
        "collapsed": lambda x, t, s: -0.7 * x,  # samples 0.3 x0: too narrow
        "wide": lambda x, t, s: 0.5 * x,  # samples 1.5 x0: too wide
    }.items():
        torch.manual_seed(1)
        net = Fn(fn)
        es = one_step_energy_score(net, x1, None, m=2)
        scores[name] = es.item()
        if name == "shifted":
            es.backward()
            assert net.w.grad is not None and net.w.grad.abs().item() > 0
    assert scores["true"] < min(scores["shifted"], scores["collapsed"], scores["wide"]) - 0.02, scores


def test_shortcut_energy_term_adds_to_the_reference_loss():
    """energy_weight=0 (the default) is the reference loss bit for bit; energy_weight=w adds w * energy score of the
    1-step sampler on the last energy_rows rows (logged as energy_score); invalid options are refused."""
    from shortcut_policy.objectives import Shortcut

    torch.manual_seed(0)
    net = build_net({"kind": "mlp", "input_dim": 2, "hidden": 32, "depth": 2, "use_step_size": True})
    x1, x0 = torch.randn(64, 2), torch.randn(64, 2)
    kw = dict(m=16, bootstrap_fraction=0.5, level_allocation="dt_bias")
    torch.manual_seed(1)
    ref, _ = Shortcut(**kw).loss(net, x1, x0=x0)
    torch.manual_seed(1)
    off, _ = Shortcut(**kw, energy_rows=16, energy_weight=0.0).loss(net, x1, x0=x0)
    assert torch.equal(ref, off)
    torch.manual_seed(1)
    on, info = Shortcut(**kw, energy_rows=16, energy_samples=3, energy_weight=0.5).loss(net, x1, x0=x0)
    assert on.item() == pytest.approx(ref.item() + 0.5 * info["energy_score"], rel=1e-5)
    assert info["energy_score"] > 0
    for bad in ({"energy_samples": 1}, {"energy_rows": -1}, {"energy_weight": -0.1}, {"energy_rows": 1.5}):
        with pytest.raises(ValueError, match="energy_"):
            Shortcut(**bad)
