"""``shortcut-policy eval policy=expert|checkpoint task=<task> ...`` (configs/eval.yaml): the env's scripted expert or
a trained checkpoint on the task's seeds, through the parallel rollout runner (:mod:`shortcut_policy.eval.rollout`)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..conventions import TEST_SEED_START
from ..eval.rollout import EvalCrashError, check_crash_fraction, evaluate
from ..policy import load_policy
from ..utils import available_cores, cfg_get, check_int, resolve_device, to_plain

__all__ = ["eval_command", "EvalCrashError"]


def _load_checkpoint_policy(path: str, device: str, weights: str | None = None):
    """The policy in checkpoint ``path`` on ``device`` with its EMA or online ``weights`` (None: the checkpoint's
    ``train.eval_model``); ``FileNotFoundError`` when the file does not exist, ``ValueError`` for other weights."""
    if not Path(path).exists():
        raise FileNotFoundError(f"checkpoint={path!r}: no such file")
    return load_policy(path, device, weights=weights)


def _set_torch_threads(threads, device: str, workers) -> None:
    """CPU inference threads of the main process. Default: the cores the env workers leave free (at least 1):
    on a 2-core machine, 2 torch threads competing with 2 env workers made a small U-Net 30x slower."""
    if not str(device).startswith("cpu"):
        return
    if threads is None:
        cores = available_cores()
        n_workers = cores if workers in (None, "auto") else check_int("workers", workers, 1)
        threads = max(1, cores - n_workers)
    torch.set_num_threads(check_int("torch_threads", threads, 1))


def _policy_task_cfg(policy):
    """The task config a loaded policy was trained on (``policy.task_cfg``, else ``policy.cfg.task``), or None."""
    for attr in ("task_cfg",):
        v = getattr(policy, attr, None)
        if v is not None:
            return v
    cfg = getattr(policy, "cfg", None)
    return cfg_get(cfg, "task") if cfg is not None else None


def eval_command(cfg, run_dir) -> dict:
    """`shortcut-policy eval ...` (configs/eval.yaml): the expert or a checkpoint on the task's seeds. Fails
    (:class:`EvalCrashError`) when all episodes crash or more than ``max_crash_fraction`` (default 0.1) do."""
    max_crash = check_crash_fraction(cfg.get("max_crash_fraction", 0.1) if hasattr(cfg, "get") else 0.1)
    ckpt = cfg_get(cfg, "checkpoint")
    mode = str(cfg_get(cfg, "policy", "checkpoint" if ckpt is not None else "expert"))
    if mode not in ("expert", "checkpoint"):
        raise ValueError(f"policy={mode!r}: expected 'expert' or 'checkpoint'")
    if mode == "expert" and ckpt is not None:
        raise ValueError(f"policy=expert with checkpoint={ckpt!r}: drop one of them")
    if mode == "expert" and cfg_get(cfg, "warm_start", None) is not None:
        raise ValueError(
            f"warm_start={cfg_get(cfg, 'warm_start')}: the warm start applies to a learned policy (checkpoint=)"
        )
    task_cfg = to_plain(cfg_get(cfg, "task"))
    if cfg_get(cfg, "expert_kwargs"):
        task_cfg = {**task_cfg, "expert_kwargs": to_plain(cfg_get(cfg, "expert_kwargs"))}
    policy = None
    if mode == "checkpoint":
        if ckpt is None:
            raise ValueError("policy=checkpoint needs checkpoint=PATH")
        device = str(cfg_get(cfg, "device", "cpu"))
        if device == "auto":
            device = str(resolve_device(device))
        _set_torch_threads(cfg_get(cfg, "torch_threads"), device, cfg_get(cfg, "workers"))
        policy = _load_checkpoint_policy(str(ckpt), device, cfg_get(cfg, "weights", None))
        if bool(cfg_get(cfg, "use_checkpoint_task", True)):
            task_cfg = _policy_task_cfg(policy) or task_cfg
        n_act = cfg_get(cfg, "n_action_steps", None)
        if n_act is not None:  # execute a different number of each chunk's actions than the policy was trained with
            n_act = check_int("n_action_steps", n_act, 1)
            policy.set_execution_horizon(n_act)
            task_cfg = {**to_plain(task_cfg), "n_action_steps": n_act}
        sampler = cfg_get(cfg, "sampler", None)
        if sampler is not None:  # diffusion checkpoints: ddpm | ddim (steps= is then the number of denoising steps)
            if not hasattr(policy.objective, "sampler"):
                raise ValueError(
                    f"sampler={sampler!r}: only diffusion checkpoints have a sampler choice; {ckpt} was "
                    f"trained with objective={policy.objective.name}"
                )
            if sampler not in ("ddpm", "ddim"):
                raise ValueError(f"sampler={sampler!r}: expected 'ddpm' or 'ddim'")
            policy.objective.sampler = sampler
        policy.noise_scale = float(cfg_get(cfg, "noise_scale", 1.0))
        warm = cfg_get(cfg, "warm_start", None)  # start each chunk at t = warm from the previous one's rest
        st = to_plain(cfg_get(cfg, "steps", [1]))
        for n in st if isinstance(st, (list, tuple)) else [st]:  # valid for every step count asked for
            policy.check_warm_start(warm, n)
        policy.warm_start = policy.check_warm_start(warm)
        first = cfg_get(cfg, "first_chunk_steps", None)  # the warm start's first chunk with more steps
        if first is not None:
            if policy.warm_start is None:
                raise ValueError(
                    f"first_chunk_steps={first}: applies with a warm start only (set warm_start=); without one "
                    "every chunk takes steps="
                )
            try:
                policy.first_chunk_steps = policy.check_steps(first)
            except ValueError as e:
                raise ValueError(f"first_chunk_steps={first!r}: {e}") from None
    if task_cfg is None:
        raise ValueError("eval: no task config (task=pusht_lowdim|pusht_image|...)")
    tev = cfg_get(task_cfg, "eval", {}) or {}
    n_episodes = cfg_get(cfg, "n_episodes", cfg_get(tev, "n_episodes", 50))
    seed_start = cfg_get(cfg, "seed_start", cfg_get(tev, "seed_start", TEST_SEED_START))
    workers = cfg_get(cfg, "workers", cfg_get(tev, "n_workers", None))
    n_videos = cfg_get(cfg, "n_videos", cfg_get(tev, "n_videos", 2))
    steps = cfg_get(cfg, "steps", [1])
    steps = list(steps) if isinstance(to_plain(steps), (list, tuple)) else [steps]
    ensemble_k = cfg_get(cfg, "ensemble_k", None)
    if ensemble_k is not None:
        if policy is None:
            raise ValueError(f"ensemble_k={ensemble_k}: temporal ensembling applies to a learned policy (checkpoint=)")
        try:
            ensemble_k = float(ensemble_k)
        except (TypeError, ValueError):
            raise ValueError(f"ensemble_k={ensemble_k!r}: expected a number >= 0 (or null)") from None
    res = evaluate(
        task_cfg,
        policy=policy,
        steps_list=steps,
        n_episodes=n_episodes,
        seed_start=seed_start,
        n_workers=workers,
        n_videos=n_videos,
        run_dir=run_dir,
        expert_spec=cfg_get(cfg, "expert"),
        timeout=float(cfg_get(cfg, "timeout_s", 600.0)),
        progress=bool(cfg_get(cfg, "progress", True)),
        envs_per_worker=cfg_get(cfg, "envs_per_worker", cfg_get(tev, "envs_per_worker", None)),
        max_crash_fraction=max_crash,
        ensemble_k=ensemble_k,
    )
    if policy is not None:
        res["weights"] = getattr(policy, "loaded_weights", None)
        res["n_action_steps"] = policy.n_action_steps
        res["noise_scale"] = policy.noise_scale
        res["ensemble_k"] = ensemble_k
        res["warm_start"] = policy.warm_start
        res["first_chunk_steps"] = policy.first_chunk_steps
        if hasattr(policy.objective, "sampler"):
            res["sampler"] = policy.objective.sampler
    return res
