"""``shortcut-policy export checkpoint=PATH format=onnx|torchscript [steps=1 precision=float32|float64 out=PATH
overwrite=false]`` (configs/export.yaml): the N-step policy as one graph, with a parity check and batch-1 latency
against the PyTorch policy (:mod:`shortcut_policy.deploy.export`)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

from ..deploy.export import (
    FORMATS,
    ExportablePolicy,
    Runner,
    export_onnx,
    export_torchscript,
    fixed_noise,
    float32_reference,
    median_ms,
    parity,
    random_observations,
)
from ..deploy.lowering import lower_module
from ..policy import load_policy
from ..utils import atomic_write_text

__all__ = ["export_command"]


def export_command(cfg, run_dir) -> dict:
    """Export the checkpoint's N-step policy, check parity and latency against PyTorch, write the sidecar JSON."""
    fmt = str(cfg.format)
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: expected one of {sorted(FORMATS)}")
    if not cfg.get("checkpoint"):
        raise ValueError("export: checkpoint=PATH is required")
    precision = str(cfg.get("precision") or "float32")
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision={precision!r}: expected float32 or float64")
    threads = int(cfg.get("threads") or 1)
    torch.set_num_threads(threads)
    policy = load_policy(cfg.checkpoint, device="cpu", weights=cfg.get("weights"))
    sampler = cfg.get("sampler")
    if hasattr(policy.objective, "sampler"):  # diffusion: only DDIM is deterministic given the initial noise
        sampler = str(sampler or "ddim")
        if sampler != "ddim":
            raise ValueError(
                f"sampler={sampler!r}: DDPM draws fresh noise at every step, so its graph would not be deterministic; "
                "export sampler=ddim (the default for diffusion checkpoints)"
            )
        policy.objective.sampler = sampler
    elif sampler is not None:
        raise ValueError(f"sampler={sampler!r}: only diffusion checkpoints have a sampler choice")
    steps = policy.check_steps(int(cfg.steps))
    module = ExportablePolicy(policy, steps).eval()
    ref_policy, graph, dtype = policy, module, np.float32
    if precision == "float64":
        ref_policy = copy.deepcopy(policy).double()
        graph, dtype = lower_module(module).double().eval(), np.float64
    ckpt = Path(str(cfg.checkpoint))
    suffix = "_fp64" if precision == "float64" else ""
    out = Path(str(cfg.out)) if cfg.get("out") else ckpt.with_name(f"{ckpt.stem}_{steps}step{suffix}{FORMATS[fmt]}")
    seed = int(cfg.seed)
    ex_obs = random_observations(policy, 2, seed)
    tdt = torch.float64 if precision == "float64" else torch.float32
    example = tuple(torch.as_tensor(ex_obs[k], dtype=tdt) for k in module.keys) + (
        fixed_noise(policy, 2, seed).to(tdt),
    )
    if fmt == "onnx":
        export_onnx(graph, example, out, overwrite=bool(cfg.overwrite), opset=int(cfg.opset))
    else:
        export_torchscript(graph, example, out, overwrite=bool(cfg.overwrite))
    runner = Runner(out, fmt, module.keys, threads=threads, dtype=dtype)
    diff, ndiff, got = parity(ref_policy, runner, steps, int(cfg.n_parity), seed)
    rounding = float32_reference(module, policy, got, int(cfg.n_parity), seed)
    # batch-1 latency: the exported graph vs the PyTorch policy (predict_action, as deploy calls it)
    obs1 = random_observations(policy, 1, seed + 1)
    noise1 = fixed_noise(policy, 1, seed + 1).numpy()
    gen = torch.Generator().manual_seed(seed)
    n = int(cfg.n_timing)
    exp_ms = median_ms(lambda: runner(obs1, noise1), n)
    torch_ms = median_ms(lambda: ref_policy.predict_action(obs1, steps=steps, generator=gen), n)
    extra = {}
    if precision == "float64":  # what the float32 PyTorch policy costs, for comparison
        extra["torch_float32_latency_ms"] = median_ms(
            lambda: policy.predict_action(obs1, steps=steps, generator=gen), n
        )
    meta = {
        "format": fmt,
        "file": str(out),
        "checkpoint": str(ckpt),
        "task": policy.task_name,
        "steps": steps,
        **({"sampler": sampler} if sampler else {}),
        "precision": precision,
        "inputs": {k: ["B", policy.n_obs_steps, *policy.obs_encoder.obs_shapes[k]] for k in module.keys}
        | {"noise": ["B", policy.horizon, policy.action_dim]},
        "output": {"action": ["B", policy.n_action_steps, policy.action_dim]},
        "parity_noise_seed": seed,
        "noise": "standard normal; pass a fixed tensor (e.g. torch.randn with a fixed seed, or zeros) for determinism",
    }
    side = out.with_name(out.name + ".json")
    atomic_write_text(side, json.dumps(meta, indent=2))
    res = {
        "format": fmt,
        "file": str(out),
        "steps": steps,
        **({"sampler": sampler} if sampler else {}),
        "precision": precision,
        "max_abs_diff": diff,
        "max_abs_diff_normalized": ndiff,
        "torch_batch1_vs_batched_diff": rounding["torch_batch1_vs_batched_diff"],
        "torch_fp32_vs_fp64": rounding["torch_fp32_vs_fp64"],
        f"{fmt}_vs_fp64": rounding["exported_vs_fp64"],
        "n_parity": int(cfg.n_parity),
        "torch_latency_ms": torch_ms,
        **extra,
        "threads": threads,
    }
    res["onnx_latency_ms" if fmt == "onnx" else "torchscript_latency_ms"] = exp_ms
    if fmt == "onnx":
        import onnx  # lazy: onnx + onnxruntime (optional, the `deploy` extra), only for format=onnx
        import onnxruntime

        res.update(onnx_version=onnx.__version__, onnxruntime_version=onnxruntime.__version__)
    return res
