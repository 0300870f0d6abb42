"""One objective package for policies and images: FlowMatching, Shortcut, Diffusion.

Every objective has `loss(net, x1, cond=None, *, teacher=None, null_cond=None, x0=None, teacher_cond=None)
-> (loss, info)` and `sample(net, x0, cond=None, *, steps, null_cond=None, cfg_scale=None) -> x1`.
"""
from __future__ import annotations

from .base import Objective
from .diffusion import Diffusion
from .flow_matching import FlowMatching
from .meanflow import MeanFlow
from .regression import Regression
from .shortcut import Shortcut

OBJECTIVES = {"shortcut": Shortcut, "flow_matching": FlowMatching, "diffusion": Diffusion, "meanflow": MeanFlow,
              "regression": Regression}


def build_objective(cfg) -> Objective:
    from omegaconf import DictConfig, OmegaConf

    d = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    name = d.pop("name", None)
    if name not in OBJECTIVES:
        raise ValueError(f"objective name {name!r}: expected one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](**d)


__all__ = ["Objective", "Shortcut", "FlowMatching", "Diffusion", "MeanFlow", "Regression", "build_objective", "OBJECTIVES"]
