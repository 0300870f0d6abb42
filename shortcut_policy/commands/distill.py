"""``shortcut-policy distill teacher=PATH objective=<name> [fraction=0.1] [train.* / objective.* overrides]``
(configs/distill.yaml): a one-step student from a trained teacher checkpoint, trained by the train verb's Trainer.

The student's train config is composed like ``train``'s with the teacher's task name, then the teacher's resolved
``task`` and ``net`` sections replace the composed ones (same data files, same spaces, same net), and:
the teacher's ``train`` settings (batch, lr, EMA, threads, evaluation; not its steps or warm-up);
``objective.teacher_checkpoint`` = the teacher; ``train.init_weights`` = the teacher when ``init_from_teacher`` (the
reference's ``--load_dir``); ``train.num_steps`` = round(``fraction`` x the teacher's steps) unless given. Overrides on
the command line other than ``teacher``, ``objective``, ``fraction``, ``init_from_teacher`` and ``run_dir`` are the
student's (the CLI collects them into ``student_overrides``).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from ..checkpoint import load_checkpoint
from ..objectives import OBJECTIVES
from .runner import compose
from .train import train_command, train_command_preflight

__all__ = ["distill_command", "distill_command_preflight", "distill_shorthand", "student_config", "DISTILL_KEYS"]

DISTILL_KEYS = ("teacher", "student_objective", "fraction", "init_from_teacher", "run_dir", "student_overrides")


# train keys of the teacher's config that a student does not inherit (its own budget and starting point)
_NOT_INHERITED = (
    "num_steps",
    "init_weights",
    "init_normalizer",
    "resume",
    "max_minutes",
    "warmup_steps",
    "eval_steps",
    "eval_warm_start",  # chosen for the teacher's sampler; most students sample from noise only
)


def _teacher_payload(path) -> dict:
    p = Path(str(path))
    if not p.is_file():
        raise FileNotFoundError(f"distill: teacher={path}: no such checkpoint file")
    ck = load_checkpoint(p)
    if not isinstance(ck, dict) or "cfg" not in ck or "ema" not in ck:
        raise ValueError(
            f"distill: teacher={path} is not a checkpoint of this project (no 'cfg'/'ema' entries); import a "
            "Diffusion Policy checkpoint first with `shortcut-policy import`"
        )
    return ck


def student_config(cfg):
    """The student's train config (an OmegaConf DictConfig) from the distill config ``cfg``; raises ``ValueError``
    / ``FileNotFoundError`` naming the teacher, objective or fraction when they cannot work."""
    name = str(cfg.student_objective)
    if not getattr(OBJECTIVES.get(name), "needs_teacher_checkpoint", False):
        valid = sorted(k for k, v in OBJECTIVES.items() if getattr(v, "needs_teacher_checkpoint", False))
        raise ValueError(f"distill: objective={name!r} does not learn from a teacher; valid: {valid}")
    frac = float(cfg.fraction)
    if not 0.0 < frac <= 10.0:
        raise ValueError(f"distill: fraction={cfg.fraction}: expected a positive fraction of the teacher's steps")
    ck = _teacher_payload(cfg.teacher)
    tcfg = OmegaConf.create(ck["cfg"])
    user = [str(o) for o in (cfg.student_overrides or [])]
    user_keys = {o.partition("=")[0].lstrip("+~") for o in user}
    scfg = compose("train", [f"task={tcfg.task.name}", f"objective={name}", *user])
    OmegaConf.set_struct(scfg, False)
    if not any(k == "task" or k.startswith("task.") for k in user_keys):
        scfg.task = tcfg.task
    if not any(k == "net" or k.startswith("net.") for k in user_keys):
        scfg.net = tcfg.net
    if "logger" not in user_keys and "logger" in tcfg:  # log where the teacher logged (e.g. none in a benchmark)
        scfg.logger = tcfg.logger
    # the teacher's recipe (batch, lr, EMA, threads, evaluation) unless the command line says otherwise
    for key, value in (tcfg.get("train") or {}).items():
        if key not in _NOT_INHERITED and f"train.{key}" not in user_keys and key in scfg.train:
            scfg.train[key] = value
    teacher = str(Path(str(cfg.teacher)).resolve())
    scfg.objective.teacher_checkpoint = teacher
    if bool(cfg.init_from_teacher) and "train.init_weights" not in user_keys:
        pre = (tcfg.get("objective") or {}).get("preconditioning", "none")
        if pre != "none":
            raise ValueError(
                f"distill: teacher={cfg.teacher} was trained with objective.preconditioning={pre}, whose weights are "
                f"not a velocity net: a {name} student cannot start from them; pass init_from_teacher=false"
            )
        scfg.train.init_weights = teacher
    if "train.num_steps" not in user_keys:
        scfg.train.num_steps = max(1, int(round(frac * int(ck.get("step") or tcfg.train.num_steps))))
    OmegaConf.set_struct(scfg, True)
    return OmegaConf.create(OmegaConf.to_container(scfg, resolve=True))


def distill_command_preflight(cfg, run_dir) -> dict:
    """Before anything is written: the teacher loads, the objective learns from a teacher, the student's config
    composes and a resume agrees with its checkpoint (see :func:`train_command_preflight`)."""
    return train_command_preflight(student_config(cfg), run_dir)


def distill_command(cfg, run_dir):
    """Train the student (:func:`student_config`) in ``run_dir``; returns the train result plus the teacher, its
    steps and the student's steps as a fraction of them."""
    scfg = student_config(cfg)
    ck = load_checkpoint(str(cfg.teacher))
    res = dict(train_command(scfg, run_dir) or {})
    t_steps = int(ck.get("step") or 0)
    res.update(
        teacher=str(cfg.teacher),
        teacher_objective=ck["cfg"]["objective"]["name"],
        teacher_steps=t_steps,
        student_steps=int(scfg.train.num_steps),
        student_fraction=(int(scfg.train.num_steps) / t_steps) if t_steps else None,
    )
    return res


def distill_shorthand(overrides: list[str]) -> list[str]:
    """`distill teacher=T objective=ode_distillation train.lr=1e-4 objective.teacher_steps=8` -> the distill keys
    as they are, every other override collected into ``student_overrides=['train.lr=1e-4', ...]`` (the student's
    train config). ``objective=<name>`` stays a distill key (the student's objective preset)."""
    own, student = [], []
    for o in overrides:
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if key == "objective":  # the student's objective preset (a plain key of distill.yaml, not a config group)
            own.append(f"student_objective={value}")
            continue
        (own if key in DISTILL_KEYS else student).append(o)
    if student:
        quoted = ",".join("'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'" for s in student)
        own.append(f"student_overrides=[{quoted}]")
    return own
