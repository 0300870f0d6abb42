"""One objective package for policies and images: Shortcut, FlowMatching, Diffusion, MeanFlow, Regression,
ConsistencyTraining, LiveReflow, and the teacher-checkpoint objectives ConsistencyDistillation, Progressive,
OdeDistillation, ScoreDistillation (selected by `objective=<name>`).

Every objective has `loss(net, x1, cond=None, *, teacher=None, null_cond=None, x0=None, teacher_cond=None)
-> (loss, info)` and `sample(net, x0, cond=None, *, steps, null_cond=None, cfg_scale=None) -> x1`.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from .base import Objective
from .consistency import ConsistencyTraining
from .diffusion import Diffusion
from .distillation import ConsistencyDistillation, FrozenTeacher, OdeDistillation, Progressive
from .flow_matching import FlowMatching
from .live_reflow import LiveReflow
from .meanflow import MeanFlow
from .regression import Regression
from .score_distillation import ScoreDistillation
from .shortcut import Shortcut

OBJECTIVES = {
    "shortcut": Shortcut,
    "flow_matching": FlowMatching,
    "diffusion": Diffusion,
    "meanflow": MeanFlow,
    "regression": Regression,
    "consistency": ConsistencyTraining,
    "live_reflow": LiveReflow,
    "consistency_distillation": ConsistencyDistillation,
    "progressive": Progressive,
    "ode_distillation": OdeDistillation,
    "score_distillation": ScoreDistillation,
}


# Guidance settings an image task sets for whichever objective it is trained with (configs/task/*.yaml); an objective
# without guidance (regression) or without a guided teacher (all but shortcut: bootstrap_cfg) does not take them.
TASK_LEVEL_KEYS = ("class_dropout_prob", "cfg_scale", "bootstrap_cfg")


def objective_keys(name: str) -> list[str]:
    """The config keys objective `name` takes (its constructor's parameters)."""
    import inspect

    return [p for p in inspect.signature(OBJECTIVES[name].__init__).parameters if p != "self"]


def build_objective(cfg) -> Objective:
    """An objective from its config group entry (a dict or DictConfig with `name` and the class's options).

    Raises ValueError for an unknown name (listing the valid ones) or a key the objective does not take (naming the
    key, the group and the valid keys); task-level guidance keys (TASK_LEVEL_KEYS) are dropped where unused.
    """
    d = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    name = d.pop("name", None)
    if name not in OBJECTIVES:
        raise ValueError(f"objective={name!r} does not exist; valid objectives: {sorted(OBJECTIVES)}")
    valid = objective_keys(name)
    unknown = [k for k in d if k not in valid and k not in TASK_LEVEL_KEYS]
    if unknown:
        raise ValueError(
            f"objective.{unknown[0]}: objective={name} has no option {unknown[0]!r}"
            f"{f' (also unknown: {unknown[1:]})' if unknown[1:] else ''}; valid keys of the objective "
            f"group for {name}: {sorted(valid)}"
        )
    return OBJECTIVES[name](**{k: v for k, v in d.items() if k in valid})


__all__ = [
    "ConsistencyDistillation",
    "Progressive",
    "OdeDistillation",
    "ScoreDistillation",
    "FrozenTeacher",
    "Objective",
    "Shortcut",
    "FlowMatching",
    "Diffusion",
    "MeanFlow",
    "Regression",
    "ConsistencyTraining",
    "LiveReflow",
    "build_objective",
    "OBJECTIVES",
]
