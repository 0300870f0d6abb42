"""``shortcut-policy deploy checkpoint=PATH robot=sim_pusht hz=10 steps=1 mode=async [n_steps=300 seed=100000]``
(configs/deploy.yaml): a checkpoint driving a robot in real time through the fixed-rate control loop
(:mod:`shortcut_policy.deploy.loop`). The simulated robot comes from the env registry (``robot.env``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from ..deploy.loop import ControlLoop, make_policy_fn, measure_latency, status_printer, sustainable
from ..deploy.robot import check_spec, validate_observation
from ..deploy.sim_robot import make_sim_robot
from ..policy import load_policy
from ..utils import atomic_write_text

__all__ = ["deploy_command"]


def deploy_command(cfg, run_dir) -> dict:
    """Load the checkpoint, build the robot (``robot=``: a simulated robot of a registered env), check the specs,
    warm up, run the control loop; RESULT: loop statistics, latency, score, timeline.json in run_dir."""
    if not cfg.get("checkpoint"):
        raise ValueError("deploy: checkpoint=PATH is required")
    robot_cfg = OmegaConf.to_container(cfg.robot, resolve=True)
    if robot_cfg.get("kind", "sim") != "sim":
        raise ValueError(
            f"robot kind {robot_cfg.get('kind')!r}: only simulated robots ship here (kind: sim); "
            f"a real robot implements shortcut_policy.deploy.robot.Robot"
        )
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    policy = load_policy(cfg.checkpoint, device=cfg.get("device", "cpu"), weights=cfg.get("weights"))
    task = policy.task_cfg
    hz = float(cfg.hz or robot_cfg.get("control_hz", task.get("control_hz", 10)))
    mode, steps, n_steps = str(cfg.mode), int(cfg.steps), int(cfg.n_steps)
    if task.get("control_hz") and abs(float(task["control_hz"]) - hz) > 1e-9:
        print(f"warning: the policy was trained at {task['control_hz']} Hz, deploying at {hz:g} Hz", file=sys.stderr)
    robot = make_sim_robot(
        robot_cfg, n_obs_steps=policy.n_obs_steps, hz=hz, auto_reset=bool(cfg.get("auto_reset", False))
    )
    try:
        # 1. spec check before anything moves
        check_spec(
            task["obs_shapes"],
            task["action_dim"],
            robot.obs_shapes,
            robot.action_dim,
            policy_name=f"checkpoint ({task.get('name')})",
            robot_name=robot.name,
        )
        policy_fn = make_policy_fn(policy, steps, seed=cfg.get("seed"))
        # 2. warm-up inferences on a real observation of the robot at rest
        robot.start(int(cfg.seed))
        obs0 = robot.get_observation()
        validate_observation(obs0, task["obs_shapes"], policy.n_obs_steps)
        pobs = {k: obs0[k][-policy.n_obs_steps :] for k in task["obs_shapes"]}
        warm = measure_latency(policy_fn, pobs, int(cfg.warmup))
        lat = float(np.median(warm[1:] if len(warm) > 2 else warm))
        ok, rate = sustainable(lat, mode, policy.n_action_steps, hz)
        print(
            f"warm-up: {len(warm)} inferences ({steps} step{'s' if steps > 1 else ''}), median latency "
            f"{1e3 * lat:.1f} ms; {mode} budget {1e3 * (1 if mode == 'sync' else policy.n_action_steps) / hz:.0f} ms",
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
        policy.n_obs_steps,
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
    stats = loop.run(n_steps, seed=int(cfg.seed))
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
            "checkpoint": str(cfg.checkpoint),
            "objective": type(policy.objective).__name__,
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
        }
    )
    return res
