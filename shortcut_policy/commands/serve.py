"""``shortcut-policy serve checkpoint=PATH port=P [host=127.0.0.1 steps=1 device=cpu]`` (configs/serve.yaml): the
checkpoint as a policy server (:class:`shortcut_policy.deploy.server.PolicyServer`, ZeroMQ) for ``deploy
policy=remote policy.address=HOST:P``. Serves until Ctrl-C or SIGTERM (or ``max_requests``); RESULT: requests,
errors, inference latency percentiles, the address."""

from __future__ import annotations

import sys

import numpy as np
import torch

from ..deploy.loop import make_policy_fn
from ..deploy.server import PolicyServer
from ..policy import load_policy
from ..utils import resolve_device, sigterm_as_interrupt

__all__ = ["serve_command"]


def serve_command(cfg, run_dir) -> dict:
    """Load the checkpoint, warm it up, bind ``tcp://host:port`` and answer requests until stopped."""
    if not cfg.get("checkpoint"):
        raise ValueError("serve: checkpoint=PATH is required")
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    device = resolve_device(cfg.get("device") or "cpu")
    policy = load_policy(cfg.checkpoint, device=device, weights=cfg.get("weights"))
    fn = make_policy_fn(policy, int(cfg.steps), seed=0)
    zeros = {k: np.zeros((policy.n_obs_steps, *v), np.float32) for k, v in policy.obs_encoder.obs_shapes.items()}
    for _ in range(int(cfg.get("warmup") or 0)):
        fn(zeros)
    server = PolicyServer(
        policy,
        host=str(cfg.host),
        port=int(cfg.port),
        steps=int(cfg.steps),
        queue_size=int(cfg.queue_size),
        max_message_bytes=int(cfg.max_message_bytes),
        seed=cfg.get("seed"),
        name=str(cfg.checkpoint),
        log=lambda m: print(m, file=sys.stderr, flush=True),
    ).bind()
    spec = server.spec
    print(
        f"serving {cfg.checkpoint} ({spec['task']}, {spec['objective']}, {spec['steps']} step(s)) on "
        f"tcp://{server.address}; obs {spec['obs_shapes']}, chunks of {spec['n_action_steps']} x "
        f"{spec['action_dim']} at {spec['control_hz']:g} Hz. Ctrl-C or SIGTERM stops it.",
        file=sys.stderr,
        flush=True,
    )
    max_requests = cfg.get("max_requests")
    with sigterm_as_interrupt():
        res = server.serve(max_requests=None if max_requests is None else int(max_requests))
    print(
        f"policy server stopped ({res['stopped_by']}): {res['requests']} requests, {res['errors']} errors",
        file=sys.stderr,
        flush=True,
    )
    return {**res, "address": server.address, "port": server.port, "checkpoint": str(cfg.checkpoint)}
