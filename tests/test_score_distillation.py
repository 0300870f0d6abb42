"""score_distillation (DMD / OneDP): a one-step generator distilled from a DDPM teacher by distribution matching.

Properties checked on small real nets: the fake denoiser starts as a copy of the teacher, so the first matching
gradient is exactly zero; the generator's loss reaches only the generator and the fake denoiser's loss only the
fake denoiser; the generator step is the DDPM data estimate at `generator_step`; wrong teachers and step counts are
clear errors; then the real `distill` verb from a tiny DDPM teacher on a real zarr file, evaluated in the Push-T env,
and a run stopped and resumed equals the uninterrupted one bit for bit (the fake denoiser is in the checkpoint).
"""

import pytest
import torch
from test_distillation import TINY
from torch import nn

from shortcut_policy import cli
from shortcut_policy.objectives import Diffusion, FlowMatching, FrozenTeacher, ScoreDistillation


class EpsNet(nn.Module):
    """net(x, t, level, cond) = a tiny MLP of (x, t, cond) per row: a real parametrised epsilon predictor."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(8 + 1 + 3, 8)
        with torch.no_grad():
            for p in self.lin.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x, t, level, cond=None):
        h = torch.cat([x.flatten(1), t[:, None] / 100.0, cond], 1)
        return self.lin(h).reshape(x.shape)


def _setup(seed_student=1, seed_teacher=2):
    obj = ScoreDistillation()
    student = EpsNet(seed_student)
    obj.bind_net(student)
    teacher = EpsNet(seed_teacher)
    for p in teacher.parameters():
        p.requires_grad_(False)
    cond = torch.randn(6, 3)
    return obj, student, FrozenTeacher(teacher, cond, Diffusion()), cond


def test_first_step_copies_the_teacher_into_the_fake_denoiser_and_its_matching_gradient_is_zero():
    obj, student, frozen, cond = _setup()
    assert not torch.equal(obj.fake.lin.weight, frozen.net.lin.weight)
    loss, info = obj.loss(student, torch.randn(6, 4, 2), cond, frozen=frozen)
    assert torch.equal(obj.fake.lin.weight, frozen.net.lin.weight) and int(obj.fake_initialised) == 1
    assert info["loss_dmd"] == 0.0 and info["score_gap"] == 0.0
    assert info["loss_fake"] > 0.0


def test_generator_and_fake_losses_reach_disjoint_nets():
    obj, student, frozen, cond = _setup()
    obj.loss(student, torch.randn(6, 4, 2), cond, frozen=frozen)  # initialises the fake denoiser
    with torch.no_grad():
        obj.fake.lin.bias.add_(0.5)  # a fake denoiser that differs from the teacher: a non-zero matching gradient
    x1 = torch.randn(6, 4, 2)

    def grads(freeze=None):
        for p in (*student.parameters(), *obj.fake.parameters()):
            p.grad = None
            p.requires_grad_(True)
        if freeze is not None:
            for p in freeze.parameters():
                p.requires_grad_(False)
        torch.manual_seed(0)
        loss, info = obj.loss(student, x1, cond, frozen=frozen)
        loss.backward()
        return student.lin.weight.grad, obj.fake.lin.weight.grad, info

    g_student, g_fake, info = grads()
    assert info["loss_dmd"] > 0.0 and g_student.abs().sum() > 0 and g_fake.abs().sum() > 0
    assert all(p.grad is None for p in frozen.net.parameters())
    # freezing the fake denoiser leaves the generator's gradient as it was (the fake loss sees detached samples) ...
    assert torch.equal(grads(freeze=obj.fake)[0], g_student)
    # ... and freezing the generator leaves the fake denoiser's (the matching term sees it under no_grad)
    assert torch.equal(grads(freeze=student)[1], g_fake)


def test_one_step_is_the_ddpm_data_estimate_at_the_generator_step():
    obj, student, _, cond = _setup()
    z = torch.randn(6, 4, 2)
    a = obj.diffusion.ddpm.alphas_cumprod[obj.generator_step]
    eps = student(z, torch.full((6,), float(obj.generator_step)), torch.zeros(6), cond)
    want = (z - (1 - a).sqrt() * eps) / a.sqrt()
    assert torch.allclose(obj.sample(student, z, cond, steps=1), want, atol=1e-6)
    with pytest.raises(ValueError, match="exactly 1 step"):
        obj.sample(student, z, cond, steps=2)


def test_unusable_teachers_and_options_are_clear_errors():
    obj = ScoreDistillation()
    with pytest.raises(ValueError, match="needs a DDPM teacher"):
        obj.check_teacher(FlowMatching(m=8), "t.ckpt")
    with pytest.raises(ValueError, match="objective.time_input=flipped"):
        obj.check_teacher(Diffusion(time_input="flipped"), "t.ckpt")
    with pytest.raises(ValueError, match="noise schedule"):
        obj.check_teacher(Diffusion(num_train_timesteps=50), "t.ckpt")
    with pytest.raises(ValueError, match="prediction_type"):
        obj.check_teacher(Diffusion(prediction_type="sample"), "t.ckpt")
    obj.check_teacher(Diffusion(), "t.ckpt")
    with pytest.raises(ValueError, match="generator_step"):
        ScoreDistillation(generator_step=100)
    with pytest.raises(ValueError, match="k_min"):
        ScoreDistillation(k_min=50, k_max=10)
    with pytest.raises(ValueError, match="distill"):
        _setup()[0].loss(EpsNet(0), torch.randn(6, 4, 2), torch.randn(6, 3))


@pytest.fixture(scope="module")
def ddpm_teacher(pusht_lowdim_zarr, tmp_path_factory):
    root = tmp_path_factory.mktemp("dmd_teacher")
    cli.run_verb(
        "train",
        [
            *TINY,
            "objective=diffusion",
            f"task.dataset.zarr_path={pusht_lowdim_zarr}",
            "train.num_steps=10",
            "train.checkpoint_every=10",
            f"run_dir={root}",
        ],
    )
    return root / "checkpoints" / "last.ckpt"


def _distill(teacher, run_dir, *extra):
    return cli.run_verb(
        "distill",
        cli.distill_shorthand(
            [f"teacher={teacher}", f"run_dir={run_dir}", "objective=score_distillation", "logger=none", *extra]
        ),
    )


def test_distill_evaluate_and_resume_equals_uninterrupted(ddpm_teacher, tmp_path):
    common = ["train.lr_schedule=constant", "train.checkpoint_every=1", "train.seed=5"]
    res = _distill(ddpm_teacher, tmp_path / "ref", *common, "train.num_steps=4")
    assert res["teacher_objective"] == "diffusion" and res["student_steps"] == 4
    _distill(ddpm_teacher, tmp_path / "cut", *common, "train.num_steps=2")
    _distill(ddpm_teacher, tmp_path / "cut", *common, "train.num_steps=4")  # resumes at step 2
    a = torch.load(tmp_path / "ref" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=False)
    assert any(k.startswith("objective.fake.") for k in a["model"])
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    ev = cli.run_verb(
        "eval",
        [
            f"checkpoint={tmp_path / 'ref' / 'checkpoints' / 'last.ckpt'}",
            "n_episodes=1",
            "workers=1",
            "n_videos=0",
            f"run_dir={tmp_path / 'ev'}",
        ],
    )
    assert ev["n_episodes"] == 1 and 0.0 <= ev["mean_score@1"] <= 1.0


def test_two_time_scale_updates_move_the_generator_on_every_nth_step_only():
    obj = ScoreDistillation(fake_updates=3)
    student = EpsNet(1)
    obj.bind_net(student)
    teacher = EpsNet(2)
    cond = torch.randn(6, 3)
    frozen = FrozenTeacher(teacher.requires_grad_(False), cond, Diffusion())
    moved = []
    for _ in range(6):
        student.zero_grad(set_to_none=True)
        obj.fake.zero_grad(set_to_none=True)
        loss, info = obj.loss(student, torch.randn(6, 4, 2), cond, frozen=frozen)
        loss.backward()
        moved.append(student.lin.weight.grad is not None)
        assert obj.fake.lin.weight.grad is not None  # the fake denoiser trains at every step
        assert ("loss_dmd" in info) == moved[-1]
    assert moved == [False, False, True, False, False, True] and int(obj.step_count) == 6
    with pytest.raises(ValueError, match="fake_updates"):
        ScoreDistillation(fake_updates=0)


def test_paired_regression_adds_the_mse_to_the_teachers_ddim_sample_of_the_same_noise():
    """DMD's regression term: at the first step the matching gradient is zero, so the generator's whole gradient is
    the regression's, and it equals the gradient of weight x MSE(G(z)[:r], DDIM_teacher(z)[:r]) computed here."""
    obj = ScoreDistillation(regression_weight=2.0, regression_fraction=0.5, regression_steps=4)
    student = EpsNet(1)
    obj.bind_net(student)
    teacher = EpsNet(2).requires_grad_(False)
    cond = torch.randn(6, 3)
    frozen = FrozenTeacher(teacher, cond, Diffusion())
    z = torch.randn(6, 4, 2)
    loss, info = obj.loss(student, torch.randn(6, 4, 2), cond, frozen=frozen, x0=z)
    assert info["loss_dmd"] == 0.0 and info["loss_regression"] > 0.0
    student.zero_grad(set_to_none=True)
    loss.backward()
    got = student.lin.weight.grad.clone()

    ref = Diffusion().sample(teacher, z[:3], cond[:3], steps=4, sampler="ddim")
    student.zero_grad(set_to_none=True)
    want_loss = 2.0 * ((obj.generate(student, z, cond)[:3] - ref) ** 2).flatten(1).mean(1).mean()
    want_loss.backward()
    assert abs(info["loss_regression"] * 2.0 - want_loss.item()) < 1e-5
    assert torch.allclose(got, student.lin.weight.grad, atol=1e-6)
    for bad in ({"regression_weight": -1.0}, {"regression_fraction": 0.0}, {"regression_steps": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ScoreDistillation(**bad)
