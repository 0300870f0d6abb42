"""``shortcut-policy demos task=<task> n_episodes=N out=PATH [workers=N seed=S expert_seed=E overwrite=false]``
(configs/demos.yaml): scripted-expert demonstrations. The writer is the env registry entry's ``demos`` for
``task.env`` (Push-T: envs/experts/pusht.py, Transport: envs/experts/transport.py, otherwise the generic
:func:`shortcut_policy.envs.demos.expert_demos`); a plain string ``task`` names the env directly (from Python).
RESULT: ``n_episodes`` (kept), ``n_dropped`` (failed attempts, not written), ``seconds``, ``out``, ...
"""

from __future__ import annotations

from pathlib import Path

from ..envs.registry import get_env_spec, registered_envs, resolve

__all__ = ["demos_command"]


def demos_command(cfg, run_dir) -> dict:
    """``shortcut-policy demos``: write scripted-expert demonstrations with the registry entry's ``demos`` writer for
    ``task`` (a task config's ``env`` or an env name). Raises ``ValueError`` for an unknown env or one without a
    demonstration writer. Returns the writer's result (see the module docstring)."""
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
