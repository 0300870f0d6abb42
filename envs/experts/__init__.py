"""Privileged scripted experts, one module per environment, each with its ``demos`` writer.

* :mod:`shortcut_policy.envs.experts.pusht`: ``PushTExpert`` and ``demos`` (Diffusion Policy's zarr layout);
* :mod:`shortcut_policy.envs.experts.transport`: ``TransportExpert`` and ``demos`` (robomimic hdf5 + zarr).

The env registry (:mod:`shortcut_policy.envs.registry`) names them per env (``EnvSpec.expert`` / ``EnvSpec.demos``);
the ``demos`` verb (:mod:`shortcut_policy.commands.demos`) calls the writer of ``task.env``. This package imports
nothing, so importing one expert never loads another env's dependencies.
"""
from __future__ import annotations

from pathlib import Path

from shortcut_policy.envs.registry import get_env_spec, registered_envs, resolve


def demos_command(cfg, run_dir) -> dict:
    task = cfg.get("task", "pusht")
    if hasattr(task, "get"):  # a task config (configs/task/*.yaml): dispatch on its env
        task = task.get("env", None)
    task = str(task)
    try:
        spec = get_env_spec(task)
    except ValueError:
        raise ValueError(f"demos: unknown task={task!r}; expected one of {registered_envs()}") from None
    if spec.demos is None:
        raise ValueError(f"demos: env {task!r} has no demonstration writer (EnvSpec.demos)")
    return resolve(spec.demos, f"demos: task={task!r}", spec)(cfg, Path(run_dir))
