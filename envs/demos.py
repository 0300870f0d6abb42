"""The default ``demos`` writer of a registered env: its scripted expert's successful episodes in a zarr store.

``shortcut-policy demos task=<task> n_episodes=N out=PATH.zarr [seed=S expert_seed=E max_attempts=A
overwrite=true]`` for an env whose registry entry keeps the default ``demos`` (Push-T and Transport have their
own writers). Episode i starts from env seed ``seed + i`` (failed attempts are dropped and replaced by the next
seed); the expert of an episode is seeded from (``expert_seed``, env seed). Each kept episode stores every
observation key of the bare env (before each step) and ``action``, in Diffusion Policy's replay-buffer layout
(zarr format 2): a task config reads it with ``dataset: {obs_keys: {<key>: [<key>]}, action_keys: [action]}``.
Episodes run until the env terminates or truncates, at most ``task.max_steps`` (else ``max_steps``) steps;
success is ``info["success"]`` (else termination). In-process (``workers`` is ignored).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import zarr

from shortcut_policy.datasets.replay_buffer import ReplayBuffer
from shortcut_policy.envs.registry import env_name, expert_class, get_env_spec, resolve
from shortcut_policy.utils import atomic_path, cfg_get, check_int, to_plain


def record_episode(env, expert, seed: int, max_steps: int) -> tuple[dict, bool]:
    """Run ``expert`` on the bare ``env`` from ``seed``.

    Returns ({key: (T, ...) float32, "action": (T, Da)}, success): the episode's observations and actions.
    """
    obs, info = env.reset(seed=int(seed))
    expert.reset(env)
    rec: dict[str, list] = {k: [] for k in obs}
    rec["action"] = []
    success, terminated = False, False
    for _ in range(max_steps):
        act = np.asarray(expert.act(env), dtype=np.float32).reshape(-1)
        for k, v in obs.items():
            rec[k].append(np.asarray(v, dtype=np.float32))
        rec["action"].append(act)
        obs, _, terminated, truncated, info = env.step(act)
        if terminated or truncated:
            break
    s = info.get("success")
    success = bool(terminated) if s is None else bool(s)
    return {k: np.stack(v) for k, v in rec.items()}, success


def expert_demos(cfg, run_dir) -> dict:
    """The default demos writer (see the module docstring); RESULT: n_episodes, n_dropped, seconds, out, n_steps,
    mean_episode_length."""
    task = to_plain(cfg_get(cfg, "task"))
    name = env_name(task)
    spec = get_env_spec(name)
    expert_cls = resolve(expert_class(name), f"demos: the expert of env={name!r}", spec)
    expert_kwargs = dict(to_plain(cfg_get(cfg, "expert_kwargs", {})) or {})
    n_episodes = check_int("n_episodes", cfg_get(cfg, "n_episodes", 200), 1)
    seed = check_int("seed", cfg_get(cfg, "seed", 0), 0)
    expert_seed = check_int("expert_seed", cfg_get(cfg, "expert_seed", 0), 0)
    max_steps = check_int("max_steps", cfg_get(task, "max_steps", cfg_get(cfg, "max_steps", 300)), 1)
    max_attempts = check_int("max_attempts", cfg_get(cfg, "max_attempts") or 2 * n_episodes, n_episodes)
    out = Path(str(cfg_get(cfg, "out", f"data/{name}_expert.zarr")))
    if out.exists() and not bool(cfg_get(cfg, "overwrite", False)):
        raise FileExistsError(f"demos: {out} already exists; pass overwrite=true to replace it")
    t0 = time.perf_counter()
    # the zarr store is written aside and renamed onto `out` once complete (deleted on an error)
    with atomic_path(out) as tmp:
        env = resolve(spec.make, f"task env={name!r}", spec)(task)
        rb = ReplayBuffer.create_empty_zarr(tmp, zarr_format=2)
        kept, dropped, lengths = [], [], []
        try:
            for s in range(seed, seed + max_attempts):
                if len(kept) == n_episodes:
                    break
                ss = np.random.SeedSequence([expert_seed, s])
                expert = expert_cls(int(ss.generate_state(1)[0]), **expert_kwargs)
                data, success = record_episode(env, expert, s, max_steps)
                if success:
                    rb.add_episode(data, compressors="disk")
                    kept.append(s)
                    lengths.append(len(data["action"]))
                else:
                    dropped.append(s)
        finally:
            env.close()
        if not kept:
            raise RuntimeError(f"demos: no successful episode of env={name!r} in {len(dropped)} attempts")
        root = zarr.open_group(str(tmp), mode="r+", zarr_format=2)
        root.attrs.update(
            {
                "generator": str(spec.expert if isinstance(spec.expert, str) else expert_cls.__qualname__),
                "env": name,
                "episode_seeds": kept,
                "dropped_seeds": dropped,
                "expert_seed": expert_seed,
                "max_steps": max_steps,
            }
        )
    result = {
        "n_episodes": len(kept),
        "n_dropped": len(dropped),
        "seconds": round(time.perf_counter() - t0, 2),
        "out": str(out),
        "n_steps": int(sum(lengths)),
        "mean_episode_length": float(np.mean(lengths)),
    }
    if len(kept) < n_episodes:
        result["warning"] = f"only {len(kept)} of {n_episodes} episodes succeeded in {max_attempts} attempts"
    return result
