"""Distillation objectives (consistency_distillation, progressive, ode_distillation) and the `distill` verb.

Analytic properties on closed-form teachers (a constant velocity field: every reference target reduces to it), no
gradient through targets, the stage schedule and teacher refresh of progressive, clear errors without a teacher or
with a teacher the method cannot use; then the real CLI on a real zarr file: a tiny flow-matching and a tiny DDPM
teacher, a student distilled from each, evaluated in the Push-T env, and a progressive run stopped after its
teacher refresh and resumed equals the uninterrupted run bit for bit.
"""

import json

import pytest
import torch
from tiny import tiny_train
from torch import nn

from shortcut_policy import cli
from shortcut_policy.objectives import OBJECTIVES, ConsistencyDistillation, FrozenTeacher, OdeDistillation, Progressive
from shortcut_policy.objectives.flow_matching import FlowMatching


class ConstField(nn.Module):
    """net(x, t, level, cond) = u + 0 * w (a constant velocity field; w gives it a parameter)."""

    def __init__(self, u):
        super().__init__()
        self.u = u
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, level, cond=None):
        return torch.full_like(x, self.u) + self.w * x


def _frozen(u, m=16):
    net = ConstField(u)
    for p in net.parameters():
        p.requires_grad_(False)
    return FrozenTeacher(net, None, FlowMatching(m=m))


def test_consistency_distillation_target_is_the_field_of_a_straight_teacher():
    obj = ConsistencyDistillation(m=16, clip=None)
    x1 = torch.randn(32, 4, 2)
    student = ConstField(0.7)  # teacher step and student estimate on the same straight field: target = 0.7
    net = ConstField(0.0)
    loss, _ = obj.loss(net, x1, teacher=student, frozen=_frozen(0.7))
    assert loss.item() == pytest.approx(0.49, rel=1e-5)  # MSE(0, 0.7)
    loss.backward()
    assert net.w.grad is not None and student.w.grad is None  # no gradient through the target


def test_progressive_targets_stage_schedule_and_refresh():
    obj = Progressive(m=8, total_steps=6, clip=None)  # 3 stages of 2 steps: d = 1/4, 1/2, 1
    net = ConstField(0.3)
    stages, refresh = [], []
    for _ in range(6):
        refresh.append(obj.teacher_refresh_due())
        if refresh[-1]:
            obj.mark_refreshed()
        loss, info = obj.loss(net, torch.randn(16, 3, 2), frozen=_frozen(0.3))
        assert loss.item() == pytest.approx(0.0, abs=1e-12)  # two half steps of a constant field: the field
        stages.append((info["stage"], info["step_size"]))
    assert stages == [(0, 0.25), (0, 0.25), (1, 0.5), (1, 0.5), (2, 1.0), (2, 1.0)]
    assert refresh == [False, False, True, False, True, False]
    with torch.no_grad():  # validation calls do not advance the schedule
        obj.loss(net, torch.randn(4, 3, 2), frozen=_frozen(0.3))
    assert int(obj.step_count) == 6


def test_ode_distillation_regresses_the_teachers_sample_and_samples_one_step():
    class Shift(FlowMatching):  # a "teacher" whose sampler moves every point by +2
        def sample(self, net, x0, cond=None, *, steps, null_cond=None, cfg_scale=None):
            return x0 + 2.0

    obj = OdeDistillation(m=16, teacher_steps=4)
    ft = FrozenTeacher(ConstField(0.0), None, Shift(m=16))
    loss, _ = obj.loss(ConstField(2.0), torch.randn(8, 4, 2), frozen=ft)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    z = torch.randn(5, 4, 2)
    assert torch.allclose(obj.sample(ConstField(2.0), z, steps=1), z + 2.0)
    with pytest.raises(ValueError, match="exactly 1 step"):
        obj.sample(ConstField(2.0), z, steps=2)


def test_without_a_teacher_or_with_an_unusable_one_is_a_clear_error():
    for name in ("consistency_distillation", "progressive", "ode_distillation"):
        obj = OBJECTIVES[name](m=8, **({"total_steps": 4} if name == "progressive" else {}))
        with pytest.raises(ValueError, match="teacher_checkpoint"):
            obj.loss(ConstField(0.0), torch.randn(4, 3, 2))
    from shortcut_policy.objectives import Diffusion

    with pytest.raises(ValueError, match="ode_distillation"):
        Progressive(m=8, total_steps=4).check_teacher(Diffusion(), "teacher.ckpt")
    OdeDistillation(m=8).check_teacher(Diffusion(), "teacher.ckpt")  # a diffusion teacher is fine here


TINY = [
    "task=pusht_lowdim",
    *tiny_train(batch_size=8, warmup_steps=0),
    "train.threads=1",
    "train.deterministic=true",
]


@pytest.fixture(scope="module")
def teachers(pusht_lowdim_zarr, tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for name, extra in (("fm", ["objective=flow_matching", "objective.m=8"]), ("ddpm", ["objective=diffusion"])):
        cli.run_verb(
            "train",
            [
                *TINY,
                *extra,
                f"task.dataset.zarr_path={pusht_lowdim_zarr}",
                "train.num_steps=12",
                "train.checkpoint_every=12",
                f"run_dir={root / name}",
            ],
        )
        out[name] = root / name / "checkpoints" / "last.ckpt"
    return out


def _distill(teacher, run_dir, *extra):
    return cli.run_verb("distill", cli.distill_shorthand([f"teacher={teacher}", f"run_dir={run_dir}", *extra]))


def test_train_refuses_a_distillation_objective_without_teacher(pusht_lowdim_zarr, tmp_path):
    with pytest.raises(ValueError, match="teacher_checkpoint=PATH"):
        cli.run_verb(
            "train",
            [
                *TINY,
                "objective=progressive",
                f"task.dataset.zarr_path={pusht_lowdim_zarr}",
                "train.num_steps=2",
                f"run_dir={tmp_path / 'r'}",
            ],
        )
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_distill_from_ddpm_and_flow_teachers_then_evaluate(teachers, tmp_path):
    res = _distill(
        teachers["ddpm"],
        tmp_path / "ode",
        "objective=ode_distillation",
        "objective.teacher_steps=4",
        "fraction=0.5",
        "train.checkpoint_every=6",
        "logger=none",
    )
    assert res["student_steps"] == 6 and res["teacher_steps"] == 12 and res["student_fraction"] == 0.5
    assert res["teacher_objective"] == "diffusion"
    ck = torch.load(tmp_path / "ode" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ck["cfg"]["objective"]["name"] == "ode_distillation"
    assert ck["cfg"]["train"]["init_weights"].endswith("last.ckpt")
    ev = cli.run_verb(
        "eval",
        [
            f"checkpoint={tmp_path / 'ode' / 'checkpoints' / 'last.ckpt'}",
            "n_episodes=1",
            "workers=1",
            "n_videos=0",
            f"run_dir={tmp_path / 'ev'}",
        ],
    )
    assert ev["n_episodes"] == 1 and 0.0 <= ev["mean_score@1"] <= 1.0
    with pytest.raises(ValueError, match="flow teacher"):
        _distill(teachers["ddpm"], tmp_path / "cd", "objective=consistency_distillation", "train.num_steps=2")
    res = _distill(
        teachers["fm"],
        tmp_path / "cd2",
        "objective=consistency_distillation",
        "objective.m=8",
        "train.num_steps=2",
        "train.checkpoint_every=2",
    )
    assert res["steps"] == 2


def test_progressive_resumed_after_a_teacher_refresh_equals_uninterrupted(teachers, tmp_path):
    common = [
        "objective=progressive",
        "objective.m=4",
        "objective.total_steps=8",
        "train.lr_schedule=constant",
        "train.checkpoint_every=1",
        "train.seed=3",
    ]
    _distill(teachers["fm"], tmp_path / "ref", *common, "train.num_steps=8")
    _distill(teachers["fm"], tmp_path / "cut", *common, "train.num_steps=5")  # stage 1 started at step 4
    _distill(teachers["fm"], tmp_path / "cut", *common, "train.num_steps=8")  # resumes at step 5
    a = torch.load(tmp_path / "ref" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["frozen_teacher_kind"] == b["frozen_teacher_kind"] == "student"
    for key in ("model", "frozen_teacher"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    rows = [json.loads(x) for x in (tmp_path / "cut" / "logs.jsonl").read_text().splitlines() if x.strip()]
    assert [r["stage"] for r in rows if "stage" in r][-1] == 1.0


def test_an_edm_preconditioned_teacher_is_read_through_its_preconditioning(pusht_lowdim_zarr, tmp_path):
    """A flow teacher trained with objective.preconditioning=edm: a student cannot start from its weights (they are
    not a velocity net: clear error, nothing written), and a student trained from scratch reads the teacher's velocity
    through the preconditioning (FrozenTeacher.velocity), equal to the teacher objective's own 1-step field."""
    cli.run_verb(
        "train",
        [
            *TINY,
            "objective=flow_matching",
            "objective.m=8",
            "objective.preconditioning=edm",
            f"task.dataset.zarr_path={pusht_lowdim_zarr}",
            "train.num_steps=4",
            "train.checkpoint_every=4",
            f"run_dir={tmp_path / 't'}",
        ],
    )
    teacher = tmp_path / "t" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="preconditioning=edm"):
        _distill(teacher, tmp_path / "s", "objective=consistency_distillation", "objective.m=8", "train.num_steps=2")
    assert not (tmp_path / "s" / "checkpoints").exists()
    res = _distill(
        teacher,
        tmp_path / "s2",
        "objective=consistency_distillation",
        "objective.m=8",
        "init_from_teacher=false",
        "train.num_steps=2",
        "train.checkpoint_every=2",
    )
    assert res["steps"] == 2
    from shortcut_policy.objectives.distillation import FrozenTeacher
    from shortcut_policy.policy import load_policy

    pol = load_policy(str(teacher))
    assert pol.objective.preconditioning == "edm"
    x, t = torch.randn(3, pol.horizon, pol.action_dim), torch.zeros(3)
    cond = torch.randn(3, pol.obs_encoder.out_dim)
    ft = FrozenTeacher(pol.net, cond, pol.objective)
    with torch.no_grad():
        want = pol.objective.sample(pol.net, x, cond, steps=1) - x
        assert torch.allclose(ft.velocity(x, t), want, atol=1e-5)
        assert not torch.allclose(pol.net(x, t, torch.full_like(t, 3.0), cond), want, atol=1e-3)
