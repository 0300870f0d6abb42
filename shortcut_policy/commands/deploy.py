"""``shortcut-policy deploy checkpoint=PATH robot=sim_pusht hz=10 steps=1 mode=async [n_steps=300 seed=100000]``
(configs/deploy.yaml): a checkpoint driving a robot in real time through the fixed-rate control loop
(:mod:`shortcut_policy.deploy.loop`). The simulated robot comes from the env registry (``robot.env``).
``policy=remote policy.address=HOST:PORT`` takes the actions from a policy server (``shortcut-policy serve``,
:mod:`shortcut_policy.deploy.server`) through the same loop instead of a checkpoint loaded here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from ..deploy.loop import ControlLoop, make_policy_fn, measure_latency, status_printer, sustainable
from ..deploy.robot import EPISODE_KEY, TIMESTAMP_KEY, check_spec, validate_observation
from ..deploy.server import DEFAULT_MAX_MESSAGE_BYTES, RemotePolicy, RemotePolicyError
from ..deploy.sim_robot import make_sim_robot
from ..policy import load_policy
from ..utils import atomic_write_text, sigterm_as_interrupt

__all__ = ["deploy_command"]


class _Local:
    """The checkpoint loaded in this process (``policy.kind=local``)."""

    kind = "local"

    def __init__(self, cfg):
        if not cfg.get("checkpoint"):
            raise ValueError("deploy: checkpoint=PATH is required (or policy=remote policy.address=HOST:PORT)")
        self.policy = load_policy(cfg.checkpoint, device=cfg.get("device", "cpu"), weights=cfg.get("weights"))
        self.task = dict(self.policy.task_cfg)
        self.n_obs_steps, self.n_action_steps = self.policy.n_obs_steps, self.policy.n_action_steps
        self.name, self.checkpoint = f"checkpoint ({self.task.get('name')})", str(cfg.checkpoint)
        self.objective = type(self.policy.objective).__name__

    def policy_fn(self, steps, seed, hz=None, warm_start=None):
        """``policy_fn(obs) -> (Ta, Da)`` running the checkpoint in this process; ``warm_start`` (tau) starts each
        chunk after an episode's first from the previous one (chunks aligned with the control rate ``hz``)."""
        self.policy.warm_start = self.policy.check_warm_start(warm_start, steps)
        return make_policy_fn(self.policy, steps, seed=seed, hz=hz)

    def close(self):
        """Nothing to release."""

    def result(self) -> dict:
        """No remote figures."""
        return {}


class _Remote:
    """A policy server (``policy=remote policy.address=HOST:PORT``, started with ``shortcut-policy serve``)."""

    kind = "remote"

    def __init__(self, pcfg):
        if not pcfg.get("address"):
            raise ValueError("deploy policy=remote: policy.address=HOST:PORT is required (a `shortcut-policy serve`)")
        self.client = RemotePolicy(
            str(pcfg["address"]),
            timeout_s=float(pcfg.get("timeout_s") or 2.0),
            connect_timeout_s=float(pcfg.get("connect_timeout_s") or 10.0),
            queue_size=int(pcfg.get("queue_size") or 4),
            max_message_bytes=int(pcfg.get("max_message_bytes") or DEFAULT_MAX_MESSAGE_BYTES),
        )
        try:
            spec = self.client.hello()
        except BaseException:
            self.client.close()
            raise
        self.task = {
            "name": spec.get("task"),
            "obs_shapes": spec["obs_shapes"],
            "action_dim": spec["action_dim"],
            "control_hz": spec.get("control_hz"),
        }
        self.n_obs_steps, self.n_action_steps = int(spec["n_obs_steps"]), int(spec["n_action_steps"])
        self.name = f"policy server {self.client.address} ({spec.get('task')})"
        self.checkpoint, self.objective = spec.get("checkpoint"), spec.get("objective")

    def policy_fn(self, steps, seed, hz=None, warm_start=None):
        """``policy_fn(obs) -> (Ta, Da)`` asking the server (``steps`` sampling steps; the server seeds the noise).
        Raises ``ValueError`` for ``warm_start``: the server keeps no chunk between requests."""
        if warm_start is not None:
            raise ValueError(f"warm_start={warm_start}: applies to policy.kind=local (a policy server keeps no chunk)")
        return self.client.policy_fn(steps)

    def close(self):
        """Close the client socket."""
        self.client.close()

    def result(self) -> dict:
        """Round trip vs the server's own inference time (ms), as measured during the run."""
        rt, inf = list(self.client.round_trip_s), list(self.client.server_inference_s)
        pct = lambda x, q: 1e3 * float(np.percentile(x, q)) if len(x) else float("nan")  # noqa: E731
        return {
            "policy_address": self.client.address,
            "round_trip_p50_ms": pct(rt, 50),
            "round_trip_p99_ms": pct(rt, 99),
            "server_inference_p50_ms": pct(inf, 50),
            "server_inference_p99_ms": pct(inf, 99),
        }


def deploy_command(cfg, run_dir) -> dict:
    """Load the checkpoint (or connect to a policy server: ``policy=remote``), build the robot (``robot=``: a
    simulated robot of a registered env), check the specs, warm up, run the control loop; RESULT: loop statistics,
    latency, score, timeline.json in run_dir. SIGTERM stops the loop like Ctrl-C (the robot is stopped, the result
    written)."""
    robot_cfg = OmegaConf.to_container(cfg.robot, resolve=True)
    if robot_cfg.get("kind", "sim") != "sim":
        raise ValueError(
            f"robot kind {robot_cfg.get('kind')!r}: only simulated robots ship here (kind: sim); "
            f"a real robot implements shortcut_policy.deploy.robot.Robot"
        )
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    pcfg = OmegaConf.to_container(cfg.policy, resolve=True) if cfg.get("policy") is not None else {"kind": "local"}
    kind = str(pcfg.get("kind") or "local")
    if kind not in ("local", "remote"):
        raise ValueError(f"policy={kind!r}: expected local (checkpoint=PATH) or remote (policy.address=HOST:PORT)")
    if kind == "remote" and cfg.get("checkpoint"):
        print("warning: policy=remote: checkpoint= is ignored (the server holds the policy)", file=sys.stderr)
    source = _Remote(pcfg) if kind == "remote" else _Local(cfg)
    try:
        with sigterm_as_interrupt():
            return _deploy(cfg, run_dir, robot_cfg, source)
    finally:
        source.close()


def _deploy(cfg, run_dir, robot_cfg, source) -> dict:
    """The body of :func:`deploy_command` for one policy source (local checkpoint or server)."""
    task = source.task
    hz = float(cfg.hz or robot_cfg.get("control_hz", task.get("control_hz") or 10))
    mode, steps, n_steps = str(cfg.mode), int(cfg.steps), int(cfg.n_steps)
    if task.get("control_hz") and abs(float(task["control_hz"]) - hz) > 1e-9:
        print(f"warning: the policy was trained at {task['control_hz']} Hz, deploying at {hz:g} Hz", file=sys.stderr)
    robot = make_sim_robot(
        robot_cfg, n_obs_steps=source.n_obs_steps, hz=hz, auto_reset=bool(cfg.get("auto_reset", False))
    )
    try:
        # 1. spec check before anything moves
        check_spec(
            task["obs_shapes"],
            task["action_dim"],
            robot.obs_shapes,
            robot.action_dim,
            policy_name=source.name,
            robot_name=robot.name,
        )
        policy_fn = source.policy_fn(steps, cfg.get("seed"), hz=hz, warm_start=cfg.get("warm_start"))
        # 2. warm-up inferences on a real observation of the robot at rest
        robot.start(int(cfg.seed))
        obs0 = robot.get_observation()
        validate_observation(obs0, task["obs_shapes"], source.n_obs_steps)
        keys = list(task["obs_shapes"]) + ([TIMESTAMP_KEY] if getattr(policy_fn, "accepts_timestamps", False) else [])
        keys += [EPISODE_KEY] if getattr(policy_fn, "accepts_episodes", False) and EPISODE_KEY in obs0 else []
        pobs = {k: np.asarray(obs0[k])[-source.n_obs_steps :] for k in keys}
        warm = measure_latency(policy_fn, pobs, int(cfg.warmup))
        if hasattr(policy_fn, "reset"):  # a warm-started policy_fn forgets the warm-up chunks
            policy_fn.reset()
        lat = float(np.median(warm[1:] if len(warm) > 2 else warm))
        ok, rate = sustainable(lat, mode, source.n_action_steps, hz)
        print(
            f"warm-up: {len(warm)} inferences ({steps} step{'s' if steps > 1 else ''}), median latency "
            f"{1e3 * lat:.1f} ms; {mode} budget {1e3 * (1 if mode == 'sync' else source.n_action_steps) / hz:.0f} ms",
            file=sys.stderr,
        )
        if not ok:
            print(
                f"WARNING: the policy cannot sustain {hz:g} Hz in {mode} mode (latency {1e3 * lat:.1f} ms); "
                f"it can sustain about {rate:.2f} Hz. Expect deadline misses (the robot holds its last action).",
                file=sys.stderr,
            )
    except BaseException:
        robot.close()
        raise
    loop = ControlLoop(
        robot,
        policy_fn,
        task["obs_shapes"],
        source.n_obs_steps,
        hz=hz,
        mode=mode,
        ensemble_k=cfg.get("ensemble_k"),
        expected_latency_s=max(warm),
        spin_s=float(cfg.spin_ms) / 1e3,
        torch_threads=cfg.get("torch_threads"),
        switch_interval_s=(float(cfg.switch_interval_ms) / 1e3) if cfg.get("switch_interval_ms") else None,
        rt_priority=int(cfg.get("rt_priority") or 0),
        status=status_printer() if cfg.get("status", True) else None,
    )
    try:
        stats = loop.run(n_steps, seed=int(cfg.seed))
    except RuntimeError as e:  # the inference thread failed: a remote policy's timeout / error reaches the user as is
        if isinstance(e.__cause__, (TimeoutError, RemotePolicyError, ConnectionError)):
            raise e.__cause__ from None
        raise
    # per-cycle timeline (ms) for diagnosing stalls: jitter and work time per cycle, latency per inference
    # and one entry per episode reset (auto_reset): cycle, new episode id, chunks/actions discarded because of it
    timeline = {
        "jitter_ms": [1e3 * v for v in stats.jitter_s],
        "cycle_ms": [1e3 * v for v in stats.busy_s],
        "inference_ms": [1e3 * v for v in stats.inference_s],
        "resets": stats.resets,
    }
    atomic_write_text(Path(run_dir) / "timeline.json", json.dumps(timeline))
    info = robot.info()
    episodes = info.get("episodes") or []
    if episodes:  # auto_reset: score over the finished episodes (the unfinished last one is left out)
        score = float(np.mean([e["max_reward"] for e in episodes]))
        success = float(np.mean([e["success"] for e in episodes]))
    else:
        score, success = float(info.get("max_reward", 0.0)), bool(info.get("success", False))
    res = stats.summary()
    res.update(
        {
            "steps": steps,
            "policy": source.kind,
            "checkpoint": source.checkpoint,
            "objective": source.objective,
            "warmup_latency_ms": 1e3 * lat,
            "sustainable_hz": rate,
            "can_sustain": ok,
            "mean_score": score,
            "success": success,
            "episodes": max(len(episodes), 1),
            "env_steps": int(info.get("n_env_steps", 0)),
            "late_commands": int(info.get("late_commands", 0)),
            "reset_dropped_commands": int(info.get("reset_dropped_commands", 0)),
            "seed": int(cfg.seed),
            "rt_priority": int(cfg.get("rt_priority") or 0) if loop.rt_applied else 0,
            "load_avg_1min": os.getloadavg()[0],
            **source.result(),
        }
    )
    return res
