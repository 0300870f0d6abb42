"""Scripted experts and the ``demos`` verb: demonstrations in Diffusion Policy's zarr layout.

``shortcut-policy demos task=pusht n_episodes=200 out=data/pusht_expert.zarr [workers=N seed=S expert_seed=E
overwrite=false]`` (configs/demos.yaml). ``task`` is the task config group (``task=pusht`` is an alias of
pusht_lowdim; any Push-T task works); the generator in :data:`GENERATORS` is chosen by ``task.env`` (a plain
string naming it also works when called from Python). Transport: ``transport`` ->
``shortcut_policy.envs.experts.transport:demos``.

A generator is ``fn(cfg, run_dir) -> dict`` and prints/returns the RESULT keys
``n_episodes`` (kept), ``n_dropped`` (failed attempts, not written), ``seconds``, ``out``.
"""
from __future__ import annotations

import importlib
import os
import shutil
import time
from pathlib import Path

import numpy as np

# task name -> "module:function" producing demonstrations
GENERATORS: dict[str, str] = {
    "pusht": "shortcut_policy.envs.experts:pusht_demos",
    "transport": "shortcut_policy.envs.experts.transport:demos",
}


def demos_command(cfg, run_dir) -> dict:
    task = cfg.get("task", "pusht")
    if hasattr(task, "get"):  # a task config (configs/task/*.yaml): dispatch on its env
        task = task.get("env", None)
    task = str(task)
    if task not in GENERATORS:
        raise ValueError(f"demos: unknown task={task!r}; expected one of {sorted(GENERATORS)}")
    module, fn = GENERATORS[task].split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise ValueError(f"demos: task={task!r} needs {module}, which is not available ({e})") from e
    return getattr(mod, fn)(cfg, Path(run_dir))


# ---------------------------------------------------------------------------------------------------------
# Push-T
def _int_arg(name: str, value, minimum: int | None = None) -> int:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name}={value!r}: expected an integer")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"{name}={value!r}: expected an integer") from None
    if not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}={value!r}: expected an integer")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value}: expected an integer >= {minimum}")
    return int(value)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def pusht_episode(env_seed: int, expert_seed: int = 0, max_steps: int = 300, render: bool = True,
                  expert_kwargs: dict | None = None) -> dict:
    """Run the scripted expert on one Push-T start; returns the recorded episode (DP's fields, images as
    uint8 to keep transfers small) plus ``success``, ``seed``, ``seconds``."""
    from shortcut_policy.envs.experts.pusht import PushTExpert
    from shortcut_policy.envs.pusht import PushTEnv

    t0, c0 = time.perf_counter(), time.process_time()
    env = PushTEnv(obs_type="state", max_steps=max_steps)
    _, info = env.reset(seed=int(env_seed))
    ss = np.random.SeedSequence([int(expert_seed), int(env_seed)])
    expert = PushTExpert(seed=int(ss.generate_state(1)[0]), **(expert_kwargs or {}))
    expert.reset(env)
    rec = {"img": [], "state": [], "keypoint": [], "action": [], "n_contacts": []}
    success = False
    for _ in range(max_steps):
        act = expert.act(env)
        if render:
            rec["img"].append(env.render_image())
        rec["state"].append(env.dp_state())
        rec["keypoint"].append(env.block_keypoints())
        rec["action"].append(act)
        rec["n_contacts"].append([info["n_contacts"]])
        _, _, terminated, truncated, info = env.step(act)
        if terminated:
            success = True
            break
        if truncated:
            break
    out = {
        "state": np.asarray(rec["state"], np.float32),
        "keypoint": np.asarray(rec["keypoint"], np.float32),
        "action": np.asarray(rec["action"], np.float32),
        "n_contacts": np.asarray(rec["n_contacts"], np.float32),
    }
    if render:
        out["img"] = np.asarray(rec["img"], np.uint8)
    return {"data": out, "success": success, "seed": int(env_seed), "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0,
            "n_steps": len(rec["action"]), "coverage": float(info["coverage"])}


def _worker_init():
    try:
        import cv2

        cv2.setNumThreads(1)
    except Exception:
        pass


def _pusht_job(args):
    return pusht_episode(*args)


def pusht_demos(cfg, run_dir: Path) -> dict:
    from tqdm import tqdm

    from shortcut_policy.datasets.replay_buffer import ReplayBuffer

    n_episodes = _int_arg("n_episodes", cfg.get("n_episodes", 200), 1)
    seed = _int_arg("seed", cfg.get("seed", 0), 0)
    expert_seed = _int_arg("expert_seed", cfg.get("expert_seed", 0), 0)
    max_steps = _int_arg("max_steps", cfg.get("max_steps", 300), 1)
    workers = cfg.get("workers", None)
    workers = default_workers() if workers in (None, "auto") else _int_arg("workers", workers, 1)
    max_attempts = _int_arg("max_attempts", cfg.get("max_attempts", None) or 2 * n_episodes, n_episodes)
    render = bool(cfg.get("images", True))
    out = Path(str(cfg.get("out", "data/pusht_expert.zarr")))
    overwrite = bool(cfg.get("overwrite", False))
    if out.exists() and not overwrite:
        raise FileExistsError(f"demos: {out} already exists; pass overwrite=true to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)

    t0 = time.perf_counter()
    rb = ReplayBuffer.create_empty_zarr(tmp, zarr_format=2)
    kept_seeds, dropped_seeds, lengths, ep_secs, ep_cpu = [], [], [], [], []
    pending: dict[int, dict] = {}
    next_seed = seed  # next start to submit
    next_write = seed  # next seed to write (episodes are written in seed order, whatever the worker order)

    def consume(res):
        pending[res["seed"]] = res
        nonlocal next_write
        while next_write in pending:
            r = pending.pop(next_write)
            next_write += 1
            if r["success"]:
                if len(kept_seeds) < n_episodes:
                    rb.add_episode(
                        {k: (v.astype(np.float32) if k == "img" else v) for k, v in r["data"].items()},
                        compressors="disk",
                    )
                    kept_seeds.append(r["seed"])
                    lengths.append(r["n_steps"])
            else:
                dropped_seeds.append(r["seed"])
            ep_secs.append(r["seconds"])
            ep_cpu.append(r["cpu_seconds"])

    bar = tqdm(total=n_episodes, desc="demos pusht", unit="ep", dynamic_ncols=True)
    try:
        if workers == 1:
            while len(kept_seeds) < n_episodes and next_seed - seed < max_attempts:
                before = len(kept_seeds)
                consume(pusht_episode(next_seed, expert_seed, max_steps, render))
                next_seed += 1
                bar.update(len(kept_seeds) - before)
                bar.set_postfix(dropped=len(dropped_seeds))
        else:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            with ctx.Pool(workers, initializer=_worker_init) as pool:
                while len(kept_seeds) < n_episodes and next_seed - seed < max_attempts:
                    need = min(n_episodes - len(kept_seeds), max_attempts - (next_seed - seed))
                    jobs = [(s, expert_seed, max_steps, render) for s in range(next_seed, next_seed + need)]
                    next_seed += need
                    for res in pool.imap_unordered(_pusht_job, jobs):
                        before = len(kept_seeds)
                        consume(res)
                        bar.update(len(kept_seeds) - before)
                        bar.set_postfix(dropped=len(dropped_seeds))
    finally:
        bar.close()
    if rb.n_episodes == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"demos: no successful episode in {next_seed - seed} attempts")
    import zarr

    root = zarr.open_group(str(tmp), mode="r+", zarr_format=2)
    root.attrs.update(
        {
            "generator": "shortcut_policy.envs.experts.pusht.PushTExpert",
            "env": "pusht",
            "episode_seeds": [int(s) for s in kept_seeds],
            "dropped_seeds": [int(s) for s in dropped_seeds],
            "expert_seed": expert_seed,
            "max_steps": max_steps,
        }
    )
    if out.exists():  # overwrite=true
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)
    seconds = time.perf_counter() - t0
    result = {
        "n_episodes": len(kept_seeds),
        "n_dropped": len(dropped_seeds),
        "seconds": round(seconds, 2),
        "out": str(out),
        "n_steps": int(sum(lengths)),
        "mean_episode_length": float(np.mean(lengths)),
        "max_episode_length": int(max(lengths)),
        "workers": workers,
        "worker_seconds_per_episode": round(float(np.mean(ep_secs)), 3),
        "cpu_seconds_per_episode": round(float(np.mean(ep_cpu)), 3),
        "cpu_seconds_total": round(float(np.sum(ep_cpu)), 1),
    }
    if len(kept_seeds) < n_episodes:
        result["warning"] = f"only {len(kept_seeds)} of {n_episodes} episodes succeeded in {max_attempts} attempts"
    return result
