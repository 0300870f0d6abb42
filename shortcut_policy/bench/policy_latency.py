"""`shortcut-policy bench policy`: inference latency and training-step cost, measured side by side in one run.

Same U-Net weights for every sampler: shortcut 1 step, DDIM 10 and DDPM 100 (through predict_action, batch 1,
normalisation included), plus one bare network forward. Training-step time of the shortcut objective over
flow matching on the same net and batch. Rounds interleave the methods; medians are reported.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..datasets.normalizer import LinearNormalizer
from ..objectives import Diffusion, FlowMatching, Shortcut
from ..policy import build_policy
from ..utils import atomic_write_text


def _median_ms(fn, rounds: int) -> list[float]:
    """Wall-clock times in milliseconds of ``rounds`` calls of ``fn`` (a list; the caller takes the median)."""
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def run_bench_policy(cfg, run_dir: Path, train_cfg) -> dict:
    """``cfg.policy_bench`` settings; ``train_cfg``: the composed train config of ``policy_bench.task`` /
    ``policy_bench.net`` (the bench command composes it: ``train task=<task> net=<net> logger=none``)."""
    bc = cfg.policy_bench
    tcfg = train_cfg
    task = tcfg.task
    torch.manual_seed(0)
    torch.set_num_threads(int(bc.threads) if bc.threads else torch.get_num_threads())
    rng = np.random.default_rng(0)
    norm = LinearNormalizer()
    fit = {k: rng.uniform(0, 512, (1000, *v)).astype(np.float32) for k, v in task.obs_shapes.items()}
    fit["action"] = rng.uniform(0, 512, (1000, task.action_dim)).astype(np.float32)
    norm.fit(fit, mode={k: ("image" if k in task.get("image_keys", []) else "limits") for k in fit})
    policy = build_policy(tcfg, norm).eval()
    net = policy.net
    obs = {k: rng.uniform(0, 1, (1, task.n_obs_steps, *v)).astype(np.float32) for k, v in task.obs_shapes.items()}
    cond = policy.obs_encoder(policy.normalizer.normalize({k: torch.as_tensor(v) for k, v in obs.items()}))
    x = torch.randn(1, task.horizon, task.action_dim)
    shortcut, diffusion = Shortcut(), Diffusion()

    def with_objective(obj, steps, **kw):
        def f():
            policy.objective = obj
            policy.predict_action(obs, steps=steps, **kw)

        return f

    @torch.no_grad()
    def forward():
        net(x, torch.zeros(1), torch.zeros(1), cond)

    methods = {
        "forward": forward,
        "shortcut1": with_objective(shortcut, 1),
        "ddim10": with_objective(diffusion, 10, sampler="ddim"),
        "ddpm100": with_objective(diffusion, 100, sampler="ddpm"),
    }
    for f in methods.values():  # warm-up
        f()
    times = {k: [] for k in methods}
    fast = [k for k in methods if k not in ("ddpm100", "ddim10")]
    for _ in range(int(bc.rounds)):
        for _ in range(int(bc.fast_reps)):  # alternate single calls, so a load change hits every method alike
            for k in fast:
                times[k] += _median_ms(methods[k], 1)
        for k in ("ddim10", "ddpm100"):
            times[k] += _median_ms(methods[k], 1)
    res = {f"latency_ms@{k}": float(np.median(v)) for k, v in times.items()}
    res["ddpm100_over_shortcut1"] = res["latency_ms@ddpm100"] / res["latency_ms@shortcut1"]
    res["shortcut1_over_forward"] = res["latency_ms@shortcut1"] / res["latency_ms@forward"]

    # training step: shortcut vs flow matching, same net, same batch, interleaved
    policy.train()
    B = int(bc.train_batch)
    batch = {
        "obs": {
            k: torch.as_tensor(rng.uniform(0, 1, (B, task.horizon, *v)).astype(np.float32))
            for k, v in task.obs_shapes.items()
        },
        "action": torch.as_tensor(rng.uniform(0, 512, (B, task.horizon, task.action_dim)).astype(np.float32)),
    }
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    objs = {"shortcut": Shortcut(teacher="online"), "flow_matching": FlowMatching()}

    def step(obj):
        def f():
            policy.objective = obj
            loss, _ = policy.compute_loss(batch, teacher=policy)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return f

    for o in objs.values():
        step(o)()
    ttimes = {k: [] for k in objs}
    for _ in range(int(bc.train_rounds)):
        for k, o in objs.items():
            ttimes[k] += _median_ms(step(o), 1)
    res["train_step_ms@shortcut"] = float(np.median(ttimes["shortcut"]))
    res["train_step_ms@flow_matching"] = float(np.median(ttimes["flow_matching"]))
    res["train_step_ratio_shortcut_over_fm"] = res["train_step_ms@shortcut"] / res["train_step_ms@flow_matching"]
    res.update(
        {
            "net": str(bc.net),
            "params": sum(p.numel() for p in net.parameters()),
            "train_batch": B,
            "threads": torch.get_num_threads(),
            "task": str(bc.task),
        }
    )
    atomic_write_text(
        Path(run_dir) / "bench_policy_raw.json", json.dumps({"latency_ms": times, "train_step_ms": ttimes}, indent=1)
    )
    return res
