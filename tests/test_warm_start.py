"""Warm start (eval ``warm_start=tau``): each chunk after an episode's first starts at t = tau from the previous
chunk's unexecuted actions, with the same number of network evaluations. Sampler arithmetic on a recording net,
the policy's prior handling on a real tiny checkpoint, the rollout's bookkeeping on the toy env, the eval option."""

import numpy as np
import pytest
import torch
from test_deploy import tiny_checkpoint

from shortcut_policy import cli
from shortcut_policy.conventions import interpolate
from shortcut_policy.eval.rollout import evaluate
from shortcut_policy.objectives import build_objective
from shortcut_policy.policy import load_policy


class RecordingNet(torch.nn.Module):
    """v(x, t, level, cond) = 0.1 x + t + level, recording every call's (t, level)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, level, cond=None):
        self.calls.append((t.tolist(), level.tolist()))
        return 0.1 * x + t.reshape(-1, 1, 1) + level.reshape(-1, 1, 1)


def objective(name, **kw):
    return build_objective({"name": name, "m": 16, **kw})


def test_shortcut_sample_from_t_start_takes_steps_on_the_training_grid():
    obj = objective("shortcut")
    x = torch.randn(3, 16, 2)
    net = RecordingNet()
    out = obj.sample(net, x, None, steps=1, t_start=0.5)  # one jump of d = 1/2 from t = 1/2: level 1
    assert net.calls == [([0.5] * 3, [1.0] * 3)]
    torch.testing.assert_close(out, x + 0.5 * (0.1 * x + 0.5 + 1.0))
    net = RecordingNet()
    obj.sample(net, x, None, steps=2, t_start=0.75)  # two steps of d = 1/8 from 3/4: level 3, at 0.75 and 0.875
    assert net.calls == [([0.75] * 3, [3.0] * 3), ([0.875] * 3, [3.0] * 3)]
    net = RecordingNet()
    obj.sample(net, x, None, steps=1)  # default: from noise at t = 0, level 0 (unchanged)
    assert net.calls == [([0.0] * 3, [0.0] * 3)]


def test_flow_matching_sample_from_t_start_keeps_the_flow_level():
    net = RecordingNet()
    objective("flow_matching").sample(net, torch.zeros(2, 4, 2), None, steps=2, t_start=0.5)
    assert net.calls == [([0.5] * 2, [4.0] * 2), ([0.75] * 2, [4.0] * 2)]


@pytest.mark.parametrize(
    "name,t_start,steps,match",
    [
        ("shortcut", 0.3, 1, "expected 1 - 2\\^-j"),  # d = 0.7 was never trained
        ("shortcut", 0.5, 16, "1/M = 1/16"),  # d = 1/32 is below the flow-matching level
        ("shortcut", 1.0, 1, "expected a number in \\[0, 1\\)"),
        ("shortcut", "soon", 1, "t_start='soon'"),
        ("diffusion", 0.99, 2, "leaves 1 denoising steps"),  # t = 0.99 enters DDPM at step 0
        ("diffusion", 1.0, 1, "expected a number in \\[0, 1\\)"),
        ("regression", 0.5, 1, "samples from noise only"),
    ],
)
def test_t_start_refused_where_the_objective_cannot_start(name, t_start, steps, match):
    obj = objective(name) if name == "shortcut" else build_objective({"name": name})
    with pytest.raises(ValueError, match=match):
        obj.check_t_start(t_start, steps)


class PointMassEps(torch.nn.Module):
    """The exact epsilon prediction of DDPM when every sample is the window c: eps = (x - sqrt(abar_k) c) /
    sqrt(1 - abar_k) at step k (the net's time input), recording each call's (k, x)."""

    def __init__(self, abar, c):
        super().__init__()
        self.abar, self.c, self.calls = abar, c, []

    def forward(self, x, t, level, cond=None):
        self.calls.append((t.tolist(), x.clone()))
        ab = self.abar[t.long()].reshape(-1, 1, 1).to(x.dtype)
        return (x - ab.sqrt() * self.c) / (1 - ab).sqrt()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("tau,steps", [(0.875, 1), (0.875, 3), (0.5, 2)])
def test_diffusion_warm_start_enters_the_chain_at_the_matching_noise_level(sampler, tau, steps):
    """DDPM warm start (SDEdit): the interpolant at tau is rescaled to DDPM's variance-preserving scale and denoised
    from the step of equal signal-to-noise ratio; with the exact eps of a point mass it returns the point."""
    obj = build_objective({"name": "diffusion"})
    abar = obj.ddpm.alphas_cumprod.double()
    k0 = obj.start_step(tau)
    a, b = tau, 1 - (1 - 1e-5) * tau
    snr = abar / (1 - abar)
    assert abs(torch.log(snr[k0]) - 2 * np.log(a / b)) <= (torch.log(snr) - 2 * np.log(a / b)).abs().min() + 1e-12
    assert 0 < k0 < 99 and (k0 == 7 if tau == 0.875 else True)
    c = torch.rand(2, 16, 2, dtype=torch.float64) * 1.6 - 0.8
    prior = c + 0.05 * torch.randn_like(c)
    x_tau = interpolate(torch.randn_like(c), prior, torch.full((2,), tau, dtype=torch.float64))
    net = PointMassEps(abar, c)
    out = obj.sample(
        net, x_tau, None, steps=steps, sampler=sampler, t_start=tau, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(out, c, atol=1e-6, rtol=0)
    ks = [k[0] for k, _ in net.calls]
    assert len(ks) == steps and ks[0] == k0 and ks == sorted(set(ks), reverse=True)
    torch.testing.assert_close(net.calls[0][1], x_tau / np.sqrt(a * a + b * b))
    # from noise (t_start = 0) afterwards, the sampler is Diffusion Policy's, as on an objective never warm-started
    z = torch.randn_like(c)
    runs = []
    for o in (obj, build_objective({"name": "diffusion"})):
        net0 = PointMassEps(abar, c)
        runs.append(o.sample(net0, z, None, steps=4, sampler=sampler, generator=torch.Generator().manual_seed(1)))
        runs.append([k[0] for k, _ in net0.calls])
    assert runs[1] == runs[3] == [75, 50, 25, 0]
    torch.testing.assert_close(runs[0], runs[2], atol=0, rtol=0)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return load_policy(tiny_checkpoint(tmp_path_factory))


def obs_batch(policy, b):
    rng = np.random.default_rng(0)
    return {
        k: rng.uniform(0, 512, (b, policy.n_obs_steps, *s)).astype(np.float32)
        for k, s in policy.obs_encoder.obs_shapes.items()
    }


def test_predict_chunk_starts_from_the_interpolant_of_noise_and_prior(policy):
    """x_tau = interpolate(noise, prior, tau); the sampler runs from t = tau; without a prior the chunk is the
    one predict_action returns from the same noise."""
    obs = obs_batch(policy, 2)
    H, Da = policy.horizon, policy.action_dim
    prior = torch.linspace(-0.5, 0.5, 2 * H * Da).reshape(2, H, Da)
    policy.warm_start = 0.5
    try:
        acts, window = policy.predict_chunk(obs, steps=1, generator=torch.Generator().manual_seed(3), prior=prior)
        x0 = torch.randn(2, H, Da, generator=torch.Generator().manual_seed(3))
        cond = policy.obs_encoder(policy.normalizer.normalize({k: torch.as_tensor(v) for k, v in obs.items()}))
        want = policy.objective.sample(
            policy.net, interpolate(x0, prior, torch.full((2,), 0.5)), cond, steps=1, t_start=0.5
        ).clamp(-1, 1)
        torch.testing.assert_close(window, want)
        np.testing.assert_allclose(acts, policy._execute(want).numpy(), rtol=1e-6, atol=1e-6)
        cold_acts, cold = policy.predict_chunk(obs, steps=1, generator=torch.Generator().manual_seed(3))
        np.testing.assert_allclose(
            cold_acts, policy.predict_action(obs, steps=1, generator=torch.Generator().manual_seed(3))
        )
        assert not torch.allclose(cold, window)
        with pytest.raises(ValueError, match="prior: expected shape"):
            policy.predict_chunk(obs, steps=1, prior=prior[:, :-1])
    finally:
        policy.warm_start = None
    with pytest.raises(ValueError, match="set warm_start"):
        policy.predict_chunk(obs, steps=1, prior=prior)
    with pytest.raises(ValueError, match="warm_start=0.3"):
        policy.check_warm_start(0.3)
    with pytest.raises(ValueError, match="warm_start=0"):
        policy.check_warm_start(0)


def test_next_prior_shifts_by_the_executed_actions_and_repeats_the_last(policy):
    H, Ta = policy.horizon, policy.n_action_steps
    w = torch.arange(H, dtype=torch.float32).reshape(1, H, 1).repeat(2, 1, 2)
    p = policy.next_prior(w)
    assert p.shape == w.shape
    np.testing.assert_array_equal(p[0, :, 0].numpy(), [min(j + Ta, H - 1) for j in range(H)])
    with pytest.raises(ValueError, match="n_executed"):
        policy.next_prior(w, H)


class PriorRecordingPolicy:
    """Duck-typed policy for the rollout: records the prior of every call; its window is prior + 1 (or 0)."""

    warm_start = 0.5
    n_action_steps, horizon = 4, 8

    def __init__(self):
        self.priors, self.steps = [], []

    def check_steps(self, s):
        return s

    def predict_chunk(self, obs, steps=1, prior=None):
        b = obs["obs"].shape[0]
        self.priors.append(None if prior is None else prior.clone())
        self.steps.append(steps)
        window = torch.zeros(b, self.horizon, 2) if prior is None else prior + 1
        return np.zeros((b, self.n_action_steps, 2), np.float32), window

    def next_prior(self, window):
        return window * 10


def test_rollout_feeds_each_episode_its_own_previous_chunk():
    import toy_reach_env as toy

    from shortcut_policy.envs import registry

    registry.register_env("toy_reach_warm", registry.EnvSpec(make=toy.make), replace=True)
    task = {
        "name": "toy",
        "env": "toy_reach_warm",
        "obs_shapes": {"obs": [4]},
        "n_obs_steps": 2,
        "n_action_steps": 4,
        "max_steps": 12,
        "control_hz": 50,
    }
    try:
        pol = PriorRecordingPolicy()
        evaluate(task, policy=pol, steps_list=[1], n_episodes=2, n_workers=1, progress=False)
        # 12 steps = 3 chunks per episode; both episodes run in step: one cold batch, then two warm ones
        assert [None if p is None else p.shape[0] for p in pol.priors] == [None, 2, 2]
        torch.testing.assert_close(pol.priors[1], torch.zeros(2, 8, 2))  # next_prior(zeros) = 0
        torch.testing.assert_close(pol.priors[2], torch.full((2, 8, 2), 10.0))  # next_prior(0 + 1) = 10
        with pytest.raises(ValueError, match="warm_start and ensemble_k"):
            evaluate(
                task,
                policy=PriorRecordingPolicy(),
                steps_list=[1],
                n_episodes=1,
                n_workers=1,
                progress=False,
                ensemble_k=0.0,
            )
    finally:
        registry.unregister_env("toy_reach_warm")


def test_eval_warm_start_option(tmp_path_factory, tmp_path):
    ckpt = tiny_checkpoint(tmp_path_factory)
    common = ["n_episodes=2", "workers=1", "n_videos=0", "progress=false", "n_action_steps=4"]
    res = cli.run_verb("eval", [f"checkpoint={ckpt}", "warm_start=0.5", *common, f"run_dir={tmp_path / 'a'}"])
    assert res["warm_start"] == 0.5 and res["n_episodes"] == 2 and 0 <= res["mean_score@1"] <= 1
    again = cli.run_verb("eval", [f"checkpoint={ckpt}", "warm_start=0.5", *common, f"run_dir={tmp_path / 'b'}"])
    assert again["mean_score@1"] == res["mean_score@1"]  # reproducible from the seeds
    with pytest.raises(ValueError, match="warm_start=0.3"):
        cli.run_verb("eval", [f"checkpoint={ckpt}", "warm_start=0.3", *common, f"run_dir={tmp_path / 'c'}"])
    with pytest.raises(ValueError, match="warm_start=0.5: the warm start applies to a learned policy"):
        cli.run_verb("eval", ["policy=expert", "warm_start=0.5", *common[:-1], f"run_dir={tmp_path / 'd'}"])


def test_rollouts_during_training_use_the_deployed_setting_and_restore_the_policy(tmp_path_factory, tmp_path):
    """train.eval_n_action_steps / train.eval_warm_start: the trainer's rollouts (RolloutEvaluator) execute the given
    number of actions with the warm start -- the same episodes as `eval` with that setting -- and leave the policy as
    it was; an invalid tau is refused naming the train key."""
    from shortcut_policy.builders import RolloutEvaluator

    ckpt = tiny_checkpoint(tmp_path_factory)
    common = ["n_episodes=2", "workers=1", "n_videos=0", "progress=false", "seed_start=200000"]
    want = cli.run_verb(
        "eval", [f"checkpoint={ckpt}", "n_action_steps=4", "warm_start=0.5", *common, f"run_dir={tmp_path / 'e'}"]
    )
    plain = cli.run_verb("eval", [f"checkpoint={ckpt}", *common, f"run_dir={tmp_path / 'p'}"])
    policy = load_policy(ckpt)
    trained = policy.n_action_steps
    ev = RolloutEvaluator(policy.task_cfg, 2, 200000, steps=1, n_workers=1, n_action_steps=4, warm_start=0.5)
    ev.check(policy)
    got = ev(policy, step=7)
    assert got["test_mean_score"] == want["mean_score@1"] and got["test_success_rate"] == want["success_rate@1"]
    assert got["warm_start"] == 0.5 and got["n_action_steps"] == 4
    assert (policy.n_action_steps, policy.warm_start) == (trained, None)  # restored for training and checkpoints
    base = RolloutEvaluator(policy.task_cfg, 2, 200000, steps=1, n_workers=1)(policy, step=7)
    assert base["test_mean_score"] == plain["mean_score@1"] and "warm_start" not in base
    assert want["mean_score@1"] != plain["mean_score@1"]  # the setting changes the episodes (else this proves nothing)
    with pytest.raises(ValueError, match="train.eval_warm_start=0.3"):
        RolloutEvaluator(policy.task_cfg, 2, 200000, warm_start=0.3).check(policy)
    with pytest.raises(ValueError, match="train.eval_n_action_steps=99"):
        RolloutEvaluator(policy.task_cfg, 2, 200000, n_action_steps=99).check(policy)
    assert (policy.n_action_steps, policy.warm_start) == (trained, None)


def test_eval_warm_start_of_a_ddpm_policy(tmp_path_factory, tmp_path):
    """A DDPM checkpoint warm-starts too (SDEdit from the previous chunk): `eval warm_start=0.875 steps=[1]` is one
    network evaluation per chunk after the first, reproducible from the seeds, and different from the cold start."""
    from test_deploy import TINY

    from shortcut_policy.datasets.pusht import write_synthetic_pusht_zarr

    base = tmp_path_factory.mktemp("ddpm_warm")
    write_synthetic_pusht_zarr(base / "pusht.zarr", episode_lengths=(30, 25, 41), with_images=False)
    cli.run_verb(
        "train",
        ["task=pusht_lowdim", f"task.dataset.zarr_path={base / 'pusht.zarr'}", *TINY, "objective=diffusion",
         f"run_dir={base / 'run'}"],
    )  # fmt: skip
    ckpt = base / "run" / "checkpoints" / "last.ckpt"
    common = [f"checkpoint={ckpt}", "n_episodes=2", "workers=1", "n_videos=0", "progress=false", "n_action_steps=4"]
    for sampler in ("ddim", "ddpm"):
        warm = [f"sampler={sampler}", "steps=[1]", "warm_start=0.875", *common]
        res = cli.run_verb("eval", [*warm, f"run_dir={tmp_path / sampler / 'a'}"])
        again = cli.run_verb("eval", [*warm, f"run_dir={tmp_path / sampler / 'b'}"])
        assert res["warm_start"] == 0.875 and res["sampler"] == sampler and 0 <= res["mean_score@1"] <= 1
        assert again["mean_score@1"] == res["mean_score@1"]
    policy = load_policy(ckpt)
    policy.warm_start = policy.check_warm_start(0.875, 1)
    obs = {"obs": torch.randn(3, policy.n_obs_steps, 20)}
    prior = torch.rand(3, policy.horizon, policy.action_dim) * 2 - 1
    cold = policy.predict_chunk(obs, steps=1, generator=torch.Generator().manual_seed(0))[1]
    warm = policy.predict_chunk(obs, steps=1, generator=torch.Generator().manual_seed(0), prior=prior)[1]
    assert not torch.allclose(cold, warm)  # the prior reaches the DDPM chain
    with pytest.raises(ValueError, match="warm_start=0.99"):  # enters the chain at step 0: no room for 2 steps
        cli.run_verb("eval", ["steps=[2]", "warm_start=0.99", *common, f"run_dir={tmp_path / 'bad'}"])


def test_diffusion_ddim_step_equals_diffusers_with_clipping():
    """The warm-started DDIM update equals diffusers' DDIMScheduler.step on the same pair of steps (50 inference
    steps: 7 -> 5), also when the predicted x0 leaves [-1, 1] and is clipped (the noise direction stays unclipped)."""
    obj = build_objective({"name": "diffusion"})
    sched = obj.ddim
    sched.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(4, 16, 2, generator=g) * 2, torch.randn(4, 16, 2, generator=g) * 3
    abar = sched.alphas_cumprod
    want = sched.step(out, 7, x).prev_sample
    got = obj.ddim_step(out, x, abar[7], abar[5])
    x1 = (x - (1 - abar[7]).sqrt() * out) / abar[7].sqrt()
    assert (x1.abs() > 1).any()  # clipping is exercised
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_first_chunk_steps_apply_to_each_episodes_first_chunk_only(tmp_path_factory, tmp_path):
    """eval first_chunk_steps=N with a warm start: an episode's first chunk is sampled in N steps, every later one
    in steps=; refused without a warm start or with a step count the objective cannot take."""
    import toy_reach_env as toy

    from shortcut_policy.envs import registry

    registry.register_env("toy_reach_first", registry.EnvSpec(make=toy.make), replace=True)
    task = {"name": "toy", "env": "toy_reach_first", "obs_shapes": {"obs": [4]}, "n_obs_steps": 2,
            "n_action_steps": 4, "max_steps": 12, "control_hz": 50}  # fmt: skip
    try:
        pol = PriorRecordingPolicy()
        pol.first_chunk_steps = 8
        evaluate(task, policy=pol, steps_list=[1], n_episodes=2, n_workers=1, progress=False)
    finally:
        registry.unregister_env("toy_reach_first")
    firsts = [s for p, s in zip(pol.priors, pol.steps) if p is None]
    later = [s for p, s in zip(pol.priors, pol.steps) if p is not None]
    assert firsts == [8] and later and set(later) == {1}  # both episodes' first chunks are one batched call
    ckpt = tiny_checkpoint(tmp_path_factory)
    common = [f"checkpoint={ckpt}", "n_episodes=1", "workers=1", "n_videos=0", "progress=false", "steps=[1]"]
    res = cli.run_verb("eval", [*common, "warm_start=0.5", "first_chunk_steps=4", f"run_dir={tmp_path / 'a'}"])
    assert res["first_chunk_steps"] == 4 and res["warm_start"] == 0.5
    with pytest.raises(ValueError, match="first_chunk_steps=4: applies with a warm start only"):
        cli.run_verb("eval", [*common, "first_chunk_steps=4", f"run_dir={tmp_path / 'b'}"])
    with pytest.raises(ValueError, match="first_chunk_steps=3"):
        cli.run_verb("eval", [*common, "warm_start=0.5", "first_chunk_steps=3", f"run_dir={tmp_path / 'c'}"])
