"""Where does a Transport policy get stuck? Roll a checkpoint out on a few seeds and log, every chunk, the task's
stages from privileged simulator state (lid off the start bin, lid / hammer grasped by which arm, hammer height,
trash in the trash bin, hammer in the target bin). Prints the first step each stage was reached.

    python scripts/transport_stages.py CHECKPOINT --seeds 0 100000 [--steps 1] [--max-steps 700]
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import torch


def stages(expert) -> dict:
    rs = expert.rs
    tr = rs.transport
    ham, _ = expert._body_pose(tr.payload.root_body)
    return {
        "lid_grasped": expert._grasping(0, tr.lid.handle_geoms),
        "lid_off": not expert._lid_on_start_bin(),
        "hammer_grasped0": expert._grasping(0, tr.payload.handle_geoms),
        "hammer_grasped1": expert._grasping(1, tr.payload.handle_geoms),
        "hammer_lifted": bool(ham[2] > 0.95),
        "trash_in_trash_bin": bool(tr.trash_in_trash_bin),
        "hammer_in_target_bin": bool(tr.payload_in_target_bin),
        "success": bool(rs._check_success()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 100000])
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=700)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from shortcut_policy.envs.experts.transport import TransportExpert
    from shortcut_policy.envs.transport import make_env
    from shortcut_policy.policy import load_policy

    policy = load_policy(a.checkpoint, device="cpu")
    env = make_env(policy.cfg.task, wrap=True, render=False)
    for seed in a.seeds:
        obs, _ = env.reset(seed=seed)
        ex = TransportExpert(seed)
        ex._bind(env)
        first: dict = {}
        t = 0
        while t < a.max_steps:
            act = policy.predict_action({k: v[None] for k, v in obs.items()}, steps=a.steps)[0]
            obs, r, term, trunc, info = env.step(act)
            t += len(act)
            for k, v in stages(ex).items():
                if v and k not in first:
                    first[k] = t
            if term or trunc:
                break
        print(f"seed {seed}: first step reached " + ", ".join(f"{k}={first.get(k, '-')}" for k in stages(ex)), flush=True)
    env.close()


if __name__ == "__main__":
    main()
