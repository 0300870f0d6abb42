"""Parallel rollout evaluation (the ``eval`` verb, :mod:`shortcut_policy.commands.eval`, and train's rollouts).

Runner design
* Envs live in W worker processes (``spawn``; default one per core, at most one per episode); each hosts
  several envs, one per seed, with fixed seeds ``seed_start .. seed_start + n_episodes - 1`` (Push-T test set:
  100000..100049). Each env is ``MultiStepWrapper(VideoRecorder(env), To, Ta, max_steps)`` built from the task
  config by the env registry (:func:`shortcut_policy.envs.registry.make_env`: the entry of ``task_cfg.env``
  builds the bare gymnasium env with dict observations). The workers receive the caller's registry entry, so an
  env registered at run time works in them too.
* ``policy=expert``: the env's privileged scripted expert (registry ``EnvSpec.expert``, or ``expert=module:Class``)
  runs inside the workers, one inner env step at a time (its plans come from the true state). Reported under N = 1.
* ``policy=checkpoint checkpoint=PATH steps=[1,4,128]``: the learned policy runs batched in the main process:
  ``policy.reset()``, then repeatedly ``policy.predict_action(obs, steps=N) -> (B, Ta, Da)`` where ``obs`` is
  ``{key: (B, To, ...)}`` over the envs still running (finished envs leave the batch). A chunk of Ta actions is
  executed per call (early stop on success, DP's MultiStepWrapper). Every N runs on the same seeds.
* Workers never hang the runner: every reply is awaited with a timeout while checking that the process is
  alive; a dead or stuck worker is killed and its unfinished seeds are reported (status ``crashed``/
  ``timeout``, error text). An exception inside one env only affects that seed (status ``error``).
* Crashes are never scored silently: when every episode of a step budget crashed, or more than
  ``max_crash_fraction`` of them (``eval`` config key; default 0.1 for the CLI, no share limit for direct callers),
  :func:`evaluate` raises :class:`EvalCrashError` with the first crash's cause (seed, exception type and message)
  after writing the per-seed tables. Below the limit the rates are over the episodes that ran, RESULT has
  ``n_crashed@N`` / ``n_ran@N`` / ``crashed_seeds@N`` and ``warnings``, and a ``warning:`` line goes to stderr.

Outputs in run_dir: ``per_seed.json`` / ``per_seed.csv`` (steps, seed, max_reward, success, env_steps,
status), ``videos/*.mp4`` (or .gif) of the first ``n_videos`` seeds, ``score_vs_steps.png``; the returned
dict (RESULT) has ``mean_score@N``, ``success_rate@N``, ``success_ci95@N`` ([lo, hi], Wilson 95 %),
``n_episodes`` (see :mod:`shortcut_policy.eval.report`).
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
import traceback
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shortcut_policy.action_queue import ActionQueue
from shortcut_policy.conventions import TEST_SEED_START, check_steps
from shortcut_policy.envs.registry import (
    EnvSpec,
    env_name,
    expert_class,
    get_env_spec,
    make_env,
    register_env,
    registered_envs,
    resolve,
)
from shortcut_policy.envs.wrappers import VideoRecorder, write_video
from shortcut_policy.eval import report
from shortcut_policy.utils import cfg_get as _cfg_get
from shortcut_policy.utils import check_int, default_workers, limit_opencv_threads
from shortcut_policy.utils import to_plain as _to_plain


class EvalCrashError(RuntimeError):
    """Every episode of a step budget crashed, or more than ``max_crash_fraction`` of them; the message names the
    count, the first crash's seed and cause, where the per-seed errors are, and the fix."""

    user_error = True  # the CLI prints the message as it is (no type name, no --debug hint)


# ---------------------------------------------------------------------------------------------------------
# helpers
def _recorder(env):
    """The :class:`VideoRecorder` inside a wrapper chain (following ``.env``), or None."""
    e = env
    while e is not None:
        if isinstance(e, VideoRecorder):
            return e
        e = getattr(e, "env", None)
    return None


def _info_stages(info: dict) -> dict | None:
    """The env's task stages reached so far (name -> first inner step), if it reports them (Transport)."""
    st = info.get("stages")
    if isinstance(st, list):  # MultiStepWrapper: the values of the last To inner steps
        st = next((x for x in reversed(st) if x is not None), None)
    return dict(st) if isinstance(st, dict) else None


def _info_success(info: dict) -> bool | None:
    """Whether any inner step of a MultiStepWrapper info reported ``success`` (None when the env does not report it)."""
    s = info.get("success")
    if isinstance(s, list):
        return bool(any(s))
    return None if s is None else bool(s)


# ---------------------------------------------------------------------------------------------------------
# worker process
def _worker_main(
    conn,
    task_cfg: dict,
    seeds: list[int],
    video_seeds: list[int],
    expert_spec,
    env_entry: tuple[str, EnvSpec] | None = None,
):
    """One env worker. ``env_entry``: the caller's registry entry of the task's env (name, spec), registered here
    first, so an env registered at run time in the caller also exists in this spawned process."""
    limit_opencv_threads()  # only in env workers: the main process keeps OpenCV's own thread pool
    envs: dict[int, object] = {}
    try:
        if env_entry is not None:
            register_env(*env_entry, replace=True)
        for s in seeds:
            envs[s] = make_env(task_cfg, wrap=True, video=s in video_seeds)
        conn.send(("ready", None))
        while True:
            msg, payload = conn.recv()
            if msg == "close":
                break
            if msg == "expert":
                _worker_expert(conn, envs, expert_spec, dict(task_cfg.get("expert_kwargs") or {}))
            elif msg == "reset":
                out = {}
                for s, env in envs.items():
                    try:
                        obs, _ = env.reset(seed=s)
                        out[s] = ("ok", obs)
                    except Exception:
                        out[s] = ("error", traceback.format_exc(limit=5))
                conn.send(("reset", out))
            elif msg == "step":
                out = {}
                for s, chunk in payload.items():
                    env = envs[s]
                    try:
                        obs, reward, terminated, truncated, info = env.step(chunk)
                        done = bool(terminated or truncated)
                        res = {
                            "obs": obs,
                            "reward": float(reward),
                            "done": done,
                            "terminated": bool(terminated),
                            "env_steps": env.n_inner_steps,
                            "success": _info_success(info),
                            "stages": _info_stages(info),
                        }
                        if done:
                            rec = _recorder(env)
                            res["frames"] = rec.frames if (rec is not None and rec.enabled) else None
                        out[s] = ("ok", res)
                    except Exception:
                        out[s] = ("error", traceback.format_exc(limit=5))
                conn.send(("step", out))
            else:
                conn.send(("error", f"unknown message {msg!r}"))
    except (EOFError, KeyboardInterrupt):
        pass
    except Exception:
        try:
            conn.send(("fatal", traceback.format_exc(limit=8)))
        except Exception:
            pass
    finally:
        for env in envs.values():
            try:
                env.close()
            except Exception:
                pass


def _worker_expert(conn, envs: dict, expert_spec: str | None, expert_kwargs: dict | None = None):
    """Run the scripted expert (``expert_spec``, built per seed with ``expert_kwargs``) on each of this worker's envs
    and send one ``("episode", row)`` per seed (errors become rows with ``status="error"``), then
    ``("expert_done", None)``."""
    for s, env in envs.items():
        t0 = time.perf_counter()
        try:
            cls = resolve(expert_spec, "the scripted expert")
            expert = cls(s, **(expert_kwargs or {}))  # e.g. action_noise=0.1 (eval expert_kwargs.action_noise=...)
            env.reset(seed=s)
            expert.reset(env)
            success, terminated, stages = None, False, None
            while not env.done:
                act = np.asarray(expert.act(env))
                _, _, terminated, _, info = env.step(act[None] if act.ndim == 1 else act)
                success, stages = _info_success(info), _info_stages(info)
            rewards = env.rewards
            rec = _recorder(env)
            row = {
                "seed": s,
                "max_reward": max(rewards) if rewards else 0.0,
                "success": bool(success) if success is not None else bool(terminated),
                "env_steps": env.n_inner_steps,
                "status": "ok",
                "error": "",
                "stages": stages,
                "frames": rec.frames if (rec is not None and rec.enabled) else None,
                "seconds": time.perf_counter() - t0,
            }
        except Exception:
            row = {
                "seed": s,
                "max_reward": 0.0,
                "success": False,
                "env_steps": 0,
                "status": "error",
                "error": traceback.format_exc(limit=5),
                "frames": None,
                "seconds": time.perf_counter() - t0,
            }
        conn.send(("episode", row))
    conn.send(("expert_done", None))


# ---------------------------------------------------------------------------------------------------------
# main-process side
class _Worker:
    """Main-process handle of one spawned env worker (:func:`_worker_main`) and its pipe; a worker that dies,
    breaks the pipe or misses a deadline raises :class:`_WorkerLost`."""

    def __init__(self, ctx, task_cfg, seeds, video_seeds, expert_spec, env_entry=None):
        self.seeds = list(seeds)
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_worker_main,
            args=(child, task_cfg, self.seeds, list(video_seeds), expert_spec, env_entry),
            daemon=True,
        )
        self.proc.start()
        child.close()
        self.alive = True

    def recv(self, timeout: float):
        """Next message, or raise _WorkerLost('crashed'|'timeout', detail)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.conn.poll(0.2):
                    msg = self.conn.recv()
                    if msg[0] == "fatal":
                        self.kill()
                        raise _WorkerLost("crashed", msg[1])
                    return msg
            except (EOFError, OSError, ConnectionError) as e:
                self.kill()
                raise _WorkerLost("crashed", f"connection lost ({e!r}), exit code {self.proc.exitcode}") from None
            if not self.proc.is_alive():
                # drain anything sent just before exiting
                try:
                    if self.conn.poll(0):
                        msg = self.conn.recv()
                        if msg[0] != "fatal":
                            return msg
                except (EOFError, OSError):
                    pass
                self.alive = False
                raise _WorkerLost("crashed", f"worker process died (exit code {self.proc.exitcode})")
            if time.monotonic() > deadline:
                self.kill()
                raise _WorkerLost("timeout", f"no reply within {timeout:.0f} s")

    def send(self, msg):
        """Send a message to the worker; :class:`_WorkerLost` ("crashed") when the pipe is broken."""
        try:
            self.conn.send(msg)
        except (BrokenPipeError, OSError) as e:
            self.kill()
            raise _WorkerLost("crashed", f"cannot send to worker ({e!r}), exit code {self.proc.exitcode}") from None

    def kill(self):
        """Kill the worker process (if alive) and reap it (5 s)."""
        self.alive = False
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)

    def close(self):
        """Ask a live worker to close its envs and exit (10 s), then make sure it is gone."""
        if self.alive and self.proc.is_alive():
            try:
                self.conn.send(("close", None))
            except Exception:
                pass
            self.proc.join(timeout=10)
        self.kill()


class _WorkerLost(Exception):
    """A worker crashed or timed out: ``status`` is "crashed" or "timeout", ``detail`` says what happened."""

    def __init__(self, status, detail):
        super().__init__(f"{status}: {detail}")
        self.status, self.detail = status, detail


def _lost_row(seed, steps, status, detail):
    """The per-seed result row of an episode lost with its worker (success False, ``status`` and the error)."""
    return {
        "steps": steps,
        "seed": int(seed),
        "max_reward": 0.0,
        "success": False,
        "env_steps": 0,
        "status": status,
        "error": f"worker {status} while running seed {seed}: {detail}",
    }


def _split(seeds: list[int], n_workers: int) -> list[list[int]]:
    """Seeds dealt round-robin over at most ``n_workers`` non-empty groups."""
    return [seeds[i::n_workers] for i in range(n_workers) if seeds[i::n_workers]]


def _env_entry(task_cfg) -> tuple[str, EnvSpec] | None:
    """(name, spec) of the task's env for the workers; None when it is not registered (the workers report it)."""
    name = env_name(task_cfg)
    return (name, get_env_spec(name)) if name in registered_envs() else None


def _start_workers(task_cfg, seeds, n_workers, video_seeds, expert_spec, startup_timeout):
    """Spawn one worker per group of seeds and wait for each to build its envs. Returns (workers, {seed: (status,
    detail)} for the seeds of workers that failed to start)."""
    ctx = mp.get_context("spawn")
    entry = _env_entry(task_cfg)
    workers = [_Worker(ctx, task_cfg, part, video_seeds, expert_spec, entry) for part in _split(seeds, n_workers)]
    lost = {}
    for w in workers:
        try:
            msg = w.recv(startup_timeout)
            if msg[0] != "ready":
                raise _WorkerLost("crashed", f"unexpected first message {msg[0]!r}")
        except _WorkerLost as e:
            for s in w.seeds:
                lost[s] = (e.status, e.detail)
    return workers, lost


def run_expert(
    task_cfg,
    seeds: list[int],
    n_workers: int,
    video_seeds=(),
    expert_spec: str | None = None,
    episode_timeout: float = 600.0,
    startup_timeout: float = 120.0,
    progress: bool = True,
) -> list[dict]:
    """Run the task's scripted expert (or ``expert_spec``) on ``seeds`` in ``n_workers`` processes, one episode per
    seed; returns one row per seed (``max_reward``, ``success``, ``env_steps``, ``status``, ``error``, ``stages``,
    ``frames`` for the video seeds). A worker that crashes or exceeds ``episode_timeout`` seconds loses its remaining
    seeds as rows with status "crashed" / "timeout"."""
    expert_spec = expert_class(task_cfg, override=expert_spec)
    workers, lost = _start_workers(task_cfg, seeds, n_workers, video_seeds, expert_spec, startup_timeout)
    rows = [_lost_row(s, 1, *lost[s]) for s in lost]
    bar = _bar(len(seeds), "eval expert", progress)
    bar.update(len(rows))
    try:
        remaining: dict[int, list[int]] = {}  # worker index -> seeds not reported yet
        deadline: dict[int, float] = {}
        for i, w in enumerate(workers):
            if w.alive and not set(w.seeds) & set(lost):
                try:
                    w.send(("expert", None))
                except _WorkerLost as e:
                    rows += [_lost_row(s, 1, e.status, e.detail) for s in w.seeds]
                    bar.update(len(w.seeds))
                    continue
                remaining[i], deadline[i] = list(w.seeds), time.monotonic() + episode_timeout

        def lose(i, e):
            seeds_lost = remaining.pop(i)
            rows.extend(_lost_row(s, 1, e.status, e.detail) for s in seeds_lost)
            bar.update(len(seeds_lost))

        def handle(i, msg):
            kind, row = msg
            deadline[i] = time.monotonic() + episode_timeout
            if kind == "episode" and row["seed"] in remaining[i]:
                row["steps"] = 1
                rows.append(row)
                remaining[i].remove(row["seed"])
                bar.update(1)
            if not remaining[i]:
                del remaining[i]

        while remaining:
            # receive from whichever worker is ready (a big message from one never stalls the others)
            ready = wait([workers[i].conn for i in remaining], timeout=1.0)
            for i in list(remaining):
                w = workers[i]
                if w.conn not in ready and w.proc.is_alive() and time.monotonic() <= deadline[i]:
                    continue
                try:  # ready, dead (drains a last message, else raises) or past its deadline (raises)
                    handle(i, w.recv(episode_timeout if w.conn in ready else 0.0))
                except _WorkerLost as e:
                    lose(i, e)
    finally:
        bar.close()
        for w in workers:
            w.close()
    return rows


def run_policy(
    policy,
    task_cfg,
    seeds: list[int],
    n_workers: int,
    steps: int,
    video_seeds=(),
    step_timeout: float = 300.0,
    startup_timeout: float = 120.0,
    progress: bool = True,
    ensemble_k: float | None = None,
) -> list[dict]:
    """Learned policy batched in the main process over envs stepped in the workers (one chunk per call).

    ``ensemble_k``: temporal ensembling (ACT, Zhao et al. 2023): the policy is queried at every env step and the
    env executes one action, the mean of every prediction made for that step by the chunks that cover it, weighted
    exp(-k i) with i = 0 for the oldest (k = 0: equal weights). The chunks are the policy's ``n_action_steps``
    actions; the weighting is :class:`~shortcut_policy.action_queue.ActionQueue`'s, as in ``deploy``. None: each
    chunk is executed whole (Diffusion Policy's protocol)."""
    if ensemble_k is not None and not float(ensemble_k) >= 0:
        raise ValueError(f"ensemble_k={ensemble_k}: expected a number >= 0 (or None for no temporal ensembling)")
    warm = getattr(policy, "warm_start", None) is not None
    if warm and ensemble_k is not None:
        raise ValueError("warm_start and ensemble_k: choose one (both change how chunks follow each other)")
    priors: dict = {}  # warm start: per seed, the normalised prior window for its next chunk (policy.next_prior)
    # per seed: the queue of predicted actions by env step, and the env step the next action is for
    queues = {s: ActionQueue(0.0, 1.0, 0.0, float(ensemble_k)) for s in seeds} if ensemble_k is not None else {}
    tick = dict.fromkeys(seeds, 0)
    workers, lost = _start_workers(task_cfg, seeds, n_workers, video_seeds, None, startup_timeout)
    rows: dict[int, dict] = {s: _lost_row(s, steps, *lost[s]) for s in lost}
    obs: dict[int, dict] = {}
    best: dict[int, dict] = {}
    owner = {s: w for w in workers for s in w.seeds}

    def fail_worker(w, e):
        for s in w.seeds:
            if s not in rows:
                r = _lost_row(s, steps, e.status, e.detail)
                if s in best:
                    r["env_steps"] = best[s]["env_steps"]
                rows[s] = r
                obs.pop(s, None)

    def record_error(s, tb):
        rows[s] = {
            "steps": steps,
            "seed": s,
            "max_reward": 0.0,
            "success": False,
            "env_steps": best.get(s, {}).get("env_steps", 0),
            "status": "error",
            "error": tb,
        }
        obs.pop(s, None)

    bar = _bar(len(seeds), f"eval steps={steps}", progress)
    try:
        for w in workers:
            if not w.alive or set(w.seeds) & set(lost):
                continue
            try:
                w.send(("reset", None))
                _, out = w.recv(step_timeout)
                for s, (status, val) in out.items():
                    if status == "ok":
                        obs[s] = val
                        best[s] = {"max_reward": 0.0, "env_steps": 0}
                    else:
                        record_error(s, val)
            except _WorkerLost as e:
                fail_worker(w, e)
        if hasattr(policy, "reset"):
            policy.reset()
        while obs:
            active = sorted(obs)
            keys = list(obs[active[0]].keys())
            batch = {k: np.stack([obs[s][k] for s in active], axis=0) for k in keys}
            if warm:
                actions = _warm_predict(policy, batch, active, priors, steps)
            else:
                actions = policy.predict_action(batch, steps=steps)
            actions = actions.detach().cpu().numpy() if hasattr(actions, "detach") else np.asarray(actions)
            if actions.ndim != 3 or actions.shape[0] != len(active):
                raise ValueError(
                    f"policy.predict_action returned shape {actions.shape}; expected (B={len(active)}, Ta, Da)"
                )
            per_worker: dict[int, dict] = {}
            for i, s in enumerate(active):
                chunk = actions[i]
                if queues:  # temporal ensembling: execute one action, the weighted mean of its predictions
                    queues[s].add_chunk(chunk, obs_time=float(tick[s]), now=float(tick[s]))
                    chunk = queues[s].pop(float(tick[s]))[None].astype(chunk.dtype)
                    tick[s] += 1
                per_worker.setdefault(id(owner[s]), {})[s] = chunk
            for w in workers:
                if id(w) in per_worker and w.alive:
                    try:
                        w.send(("step", per_worker[id(w)]))
                    except _WorkerLost as e:
                        fail_worker(w, e)
            for w in workers:
                if id(w) not in per_worker or not any(s in obs for s in per_worker[id(w)]):
                    continue
                try:
                    _, out = w.recv(step_timeout)
                except _WorkerLost as e:
                    fail_worker(w, e)
                    continue
                for s, (status, res) in out.items():
                    if status != "ok":
                        record_error(s, res)
                        bar.update(1)
                        continue
                    best[s] = {"max_reward": res["reward"], "env_steps": res["env_steps"]}
                    if res["done"]:
                        succ = res["success"] if res["success"] is not None else res["terminated"]
                        rows[s] = {
                            "steps": steps,
                            "seed": s,
                            "max_reward": res["reward"],
                            "success": bool(succ),
                            "env_steps": res["env_steps"],
                            "status": "ok",
                            "error": "",
                            "frames": res.get("frames"),
                            "stages": res.get("stages"),
                        }
                        obs.pop(s, None)
                        bar.update(1)
                    else:
                        obs[s] = res["obs"]
    finally:
        bar.close()
        for w in workers:
            w.close()
    for s in seeds:
        rows.setdefault(s, _lost_row(s, steps, "crashed", "no result"))
    return [rows[s] for s in seeds]


def _warm_predict(policy, batch: dict, active: list[int], priors: dict, steps: int) -> np.ndarray:
    """Warm-started chunks for the seeds ``active`` (rows of ``batch``): seeds without a prior (their first chunk)
    sample from noise, the others from their prior (:meth:`Policy.predict_chunk`); ``priors`` is updated in place
    with each seed's next prior; a first chunk takes ``policy.first_chunk_steps`` steps when that is set (eval
    ``first_chunk_steps=``), every later one ``steps``. Returns the executed actions (B, Ta, Da) in the order of
    ``active``."""
    import torch

    first = getattr(policy, "first_chunk_steps", None) or steps

    cold = [i for i, s in enumerate(active) if s not in priors]
    hot = [i for i, s in enumerate(active) if s in priors]
    out = [None] * len(active)
    for rows, from_prior in ((cold, False), (hot, True)):
        if not rows:
            continue
        sub = {k: v[rows] for k, v in batch.items()}
        p = torch.stack([priors[active[i]] for i in rows]) if from_prior else None
        acts, window = policy.predict_chunk(sub, steps=steps if from_prior else first, prior=p)
        nxt = policy.next_prior(window)
        for j, i in enumerate(rows):
            out[i] = acts[j]
            priors[active[i]] = nxt[j]
    return np.stack(out)


def _bar(total, desc, enabled):
    """A one-line tqdm progress bar over episodes (disabled when not ``enabled``)."""
    return tqdm(total=total, desc=desc, unit="ep", dynamic_ncols=True, disable=not enabled)


# ---------------------------------------------------------------------------------------------------------
def _save_videos(rows: list[dict], run_dir: Path, fps: int) -> list[str]:
    """Write the frames of rows that have them to ``run_dir/videos/seed<seed>_steps<N>.mp4`` (removing them from the
    rows); returns the paths."""
    out = []
    for r in rows:
        frames = r.pop("frames", None)
        if frames:
            out.append(write_video(frames, run_dir / "videos" / f"seed{r['seed']}_steps{r['steps']}.mp4", fps=fps))
    return out


def check_crash_fraction(value) -> float | None:
    """``max_crash_fraction``: None (no share limit) or a number in [0, 1]; a clear error otherwise."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"max_crash_fraction={value!r}: expected a number in [0, 1] or null")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"max_crash_fraction={value!r}: expected a number in [0, 1] or null") from None
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"max_crash_fraction={value!r}: expected a number in [0, 1] or null")
    return f


def _check_crashes(rows: list[dict], steps: int, max_crash_fraction: float | None, where: str) -> str | None:
    """Raise :class:`EvalCrashError` when every row crashed or more than ``max_crash_fraction`` of them; return a
    warning line when some (fewer) crashed, else None. ``where`` tells where the per-seed errors are."""
    bad = sorted((r for r in rows if r.get("status") != "ok"), key=lambda r: int(r["seed"]))
    n, k = len(rows), len(bad)
    if not k:
        return None
    first = bad[0]
    cause = f"seed {first['seed']} ({first.get('status')}): {report.crash_cause(first.get('error'))}"
    seeds = [int(r["seed"]) for r in bad]
    shown = str(seeds) if len(seeds) <= 10 else f"[{', '.join(map(str, seeds[:10]))}, ... ({len(seeds)} seeds)]"
    if k == n:
        raise EvalCrashError(
            f"eval: all {n} episodes crashed at steps={steps} (seeds {shown}), nothing was "
            f"evaluated; first: {cause}; {where}; fix the cause and rerun"
        )
    if max_crash_fraction is not None and k / n > max_crash_fraction:
        raise EvalCrashError(
            f"eval: {k} of {n} episodes crashed at steps={steps} (seeds {shown}), more than "
            f"max_crash_fraction={max_crash_fraction:g} allows; first: {cause}; {where}; fix the "
            f"cause, or accept crashes with a larger max_crash_fraction"
        )
    return (
        f"{k} of {n} episodes crashed at steps={steps} (seeds {shown}); mean_score@{steps} and "
        f"success_rate@{steps} are over the {n - k} that ran; first: {cause}"
    )


def evaluate(
    task_cfg,
    policy=None,
    steps_list=(1,),
    n_episodes: int = 50,
    seed_start: int = TEST_SEED_START,
    n_workers: int | None = None,
    n_videos: int = 0,
    run_dir=None,
    expert_spec: str | None = None,
    timeout: float = 600.0,
    progress: bool = True,
    envs_per_worker: int | None = None,
    max_crash_fraction: float | None = None,
    ensemble_k: float | None = None,
) -> dict:
    """Programmatic entry (also for trainers): ``policy=None`` evaluates the scripted expert. Returns the
    RESULT dict; writes per-seed tables, videos and the plot into ``run_dir`` when given.
    ``envs_per_worker`` caps the envs alive per worker: the seeds then run in waves of ``n_workers x
    envs_per_worker`` (a Transport env holds ~1 GB, so 25 per worker exhaust the memory); null = all at once.

    Crashed / timed-out episodes: when all episodes of a step budget crashed, or more than
    ``max_crash_fraction`` (in [0, 1]; None = no share limit) of them, raises :class:`EvalCrashError` naming the
    first crash (the per-seed tables are written first). Otherwise the metrics are over the episodes that ran and
    the RESULT lists ``n_crashed@N``, ``n_ran@N``, ``crashed_seeds@N`` and ``warnings`` (also printed to stderr).
    ``ensemble_k``: temporal ensembling at execution (see :func:`run_policy`); None = whole chunks, as Diffusion
    Policy evaluates."""
    task_cfg = _to_plain(task_cfg)
    max_crash_fraction = check_crash_fraction(max_crash_fraction)
    n_episodes = check_int("n_episodes", n_episodes, 1)
    seed_start = check_int("seed_start", seed_start, 0)
    n_videos = check_int("n_videos", n_videos, 0)
    n_workers = default_workers(n_episodes) if n_workers in (None, "auto") else check_int("workers", n_workers, 1)
    n_workers = min(n_workers, n_episodes)
    seeds = list(range(seed_start, seed_start + n_episodes))
    video_seeds = seeds[:n_videos]
    if envs_per_worker is None:
        waves = [seeds]
    else:
        per_wave = n_workers * check_int("envs_per_worker", envs_per_worker, 1)
        waves = [seeds[i : i + per_wave] for i in range(0, len(seeds), per_wave)]
    t0 = time.perf_counter()
    all_rows: list[dict] = []
    warnings: list[str] = []
    where = (
        f"every seed's error is in {Path(run_dir) / 'per_seed.csv'}"
        if run_dir is not None
        else "pass run_dir to get every seed's error in per_seed.csv"
    )

    def check(n):
        try:
            w = _check_crashes([r for r in all_rows if r["steps"] == n], n, max_crash_fraction, where)
        except EvalCrashError:
            if run_dir is not None:
                for r in all_rows:
                    r.pop("frames", None)
                report.write_per_seed(all_rows, run_dir)
            raise
        if w:
            warnings.append(w)
            print(f"warning: {w}", file=sys.stderr, flush=True)

    if policy is None:
        steps_list = [1]
        for wave in waves:
            all_rows += run_expert(
                task_cfg, wave, n_workers, video_seeds, expert_spec, episode_timeout=timeout, progress=progress
            )
        check(1)
    else:
        # the policy's objective validates its own step counts (powers of two for shortcut/flow, 1..100 for DDPM/DDIM)
        check = getattr(policy, "check_steps", check_steps)
        steps_list = [check(s) for s in steps_list]
        for n in steps_list:
            _seed_policy_rng(seed_start)  # same sampling noise stream for every budget: reproducible evals
            for wave in waves:
                all_rows += run_policy(
                    policy,
                    task_cfg,
                    wave,
                    n_workers,
                    n,
                    video_seeds,
                    step_timeout=timeout,
                    progress=progress,
                    ensemble_k=ensemble_k,
                )
            check(n)
    result: dict = {
        "n_episodes": n_episodes,
        "seed_start": seed_start,
        "steps": list(steps_list),
        "policy": "expert" if policy is None else "checkpoint",
        "workers": n_workers,
    }
    for n in steps_list:
        result.update(report.summarize([r for r in all_rows if r["steps"] == n], n, exclude_crashed=True))
    if warnings:
        result["warnings"] = warnings
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if run_dir is not None:
        run_dir = Path(run_dir)
        videos = _save_videos(all_rows, run_dir, fps=int(_cfg_get(task_cfg, "control_hz", 10)))
        report.write_per_seed(all_rows, run_dir)
        plot = report.plot_vs_steps(
            result,
            run_dir / "score_vs_steps.png",
            title=f"{_cfg_get(task_cfg, 'name', '')} seeds {seed_start}..{seed_start + n_episodes - 1}",
        )
        stages = report.plot_stages(
            result, run_dir / "stages.png", title=f"{_cfg_get(task_cfg, 'name', '')}: how far episodes get"
        )
        result["videos"] = videos
        result["plot"] = str(plot) if plot else None
        if stages:
            result["stages_plot"] = str(stages)
    else:
        for r in all_rows:
            r.pop("frames", None)
    return result


def _seed_policy_rng(seed: int) -> None:
    """Seed NumPy's global RNG and, when torch is loaded, torch's, so every step budget samples from the same
    noise stream."""
    np.random.seed(seed % 2**32)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)


__all__ = [
    "evaluate",
    "EvalCrashError",
    "check_crash_fraction",
    "default_workers",
    "make_env",
    "run_expert",
    "run_policy",
    "check_int",
]
