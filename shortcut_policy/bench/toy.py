"""The 2-D toy benchmark (``shortcut-policy bench toy``: objectives side by side, sliced W2 vs sampling steps); the
``bench`` verb (:mod:`shortcut_policy.commands.bench`) dispatches to it and to the other modules of this package."""

from __future__ import annotations

import inspect
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from ..checkpoint import load_checkpoint
from ..model import TrainableModel
from ..nets import build_net
from ..objectives import build_objective
from ..train.trainer import Trainer
from ..utils import atomic_path, atomic_write_text
from .plots import quality_vs_nfe


# ---------------------------------------------------------------------------------------------------------
# 2-D toy distributions
def sample_toy(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points (n, 2) float32 of a 2-D toy distribution: "8gaussians" (radius 4, std 0.5), "checkerboard" (4 x 4
    board on [-4, 4]^2) or "moons" (two half circles scaled x3, plus N(0, 0.1^2) noise), drawn from ``rng``. Raises
    ``ValueError`` for another name."""
    if name == "8gaussians":
        ang = rng.integers(0, 8, n) * (np.pi / 4)
        centers = 4.0 * np.stack([np.cos(ang), np.sin(ang)], 1)
        return (centers + 0.5 * rng.standard_normal((n, 2))).astype(np.float32)
    if name == "checkerboard":
        x1 = rng.uniform(-2, 2, n)
        x2 = rng.uniform(0, 1, n) + rng.integers(0, 2, n) * 2.0 - 2.0
        x2 = x2 + (np.floor(x1) % 2)
        return (np.stack([x1, x2], 1) * 2.0).astype(np.float32)
    if name == "moons":
        k = rng.integers(0, 2, n)
        th = rng.uniform(0, np.pi, n)
        x = np.where(k == 0, np.cos(th), 1 - np.cos(th))
        y = np.where(k == 0, np.sin(th), 0.5 - np.sin(th))
        pts = np.stack([x - 0.5, y - 0.25], 1) * 3.0 + 0.1 * rng.standard_normal((n, 2))
        return pts.astype(np.float32)
    raise ValueError(f"toy dataset {name!r}: expected one of 8gaussians, checkerboard, moons")


def sliced_w2(a: np.ndarray, b: np.ndarray, n_proj: int = 512, seed: int = 0) -> float:
    """Sliced Wasserstein-2: sqrt of the mean over random directions of the 1-D W2^2 between projections."""
    rng = np.random.default_rng(seed)
    n = min(len(a), len(b))
    dirs = rng.standard_normal((a.shape[1], n_proj))
    dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
    pa = np.sort(a[:n] @ dirs, axis=0)
    pb = np.sort(b[:n] @ dirs, axis=0)
    return float(np.sqrt(np.mean((pa - pb) ** 2)))


class VectorModel(TrainableModel):
    """net + objective for unconditional vector data (the trainer's contract, :class:`TrainableModel`)."""

    def __init__(self, net, objective):
        super().__init__()
        self.net, self.objective = net, objective

    def compute_loss(self, batch, teacher=None, frozen=None):
        """``(loss, info)`` of the objective on ``batch["x"]`` (B, D), the teacher's net when given (no distillation
        objectives here: ``frozen`` must be None)."""
        return self.objective.loss(self.net, batch["x"], teacher=None if teacher is None else teacher.net)

    @torch.no_grad()
    def sample(self, n: int, steps: int, seed: int = 0) -> np.ndarray:
        """n samples with `steps` sampling steps; the initial noise (and a re-noising sampler's fresh noise, e.g.
        objective=consistency) come from one generator seeded with `seed`. Regression ignores steps (no warning)."""
        g = torch.Generator().manual_seed(seed)
        x0 = torch.randn(n, self.net.input_dim, generator=g)
        kw = {"generator": g} if "generator" in inspect.signature(self.objective.sample).parameters else {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*ignores steps=")  # regression: one pass at every N
            return self.objective.sample(self.net, x0, steps=steps, **kw).numpy()


def _toy_batches(dataset, batch, seed):
    """Endless training batches {"x": (batch, 2)} of the toy ``dataset`` from a generator seeded ``seed + 1``."""
    rng = np.random.default_rng(seed + 1)
    while True:
        yield {"x": torch.from_numpy(sample_toy(dataset, batch, rng))}


def toy_selection(tc) -> list[str]:
    """The objective presets to run: `toy.select` (a list of names of `toy.objectives`, or one comma-separated
    string), in order, duplicates dropped. ValueError for an empty selection or an unknown name (listing the valid
    ones)."""
    valid = list(tc.objectives)
    sel = tc.get("select")
    if sel is None:
        sel = valid
    elif isinstance(sel, str):
        sel = [s for s in (x.strip() for x in sel.split(",")) if s]
    names = list(dict.fromkeys(str(s) for s in sel))
    if not names:
        raise ValueError(f"bench toy: toy.select is empty; pick one or more of {valid}")
    unknown = [n for n in names if n not in tc.objectives]
    if unknown:
        raise ValueError(f"bench toy: unknown objective(s) {unknown} in toy.select; valid: {valid}")
    return names


def run_toy(cfg, run_dir: Path) -> dict:
    """``bench toy``: train every selected objective on the 2-D toy data with the same net, seed and budget, then
    measure the sliced W2 distance to held-out data at each step count of ``toy.steps``. Writes figures
    (``toy_samples.png``; sliced W2 against NFE, ``quality_vs_nfe.png``) and ``config_resolved.json`` in ``run_dir``.
    Returns ``{"<objective>@<N>": sliced W2, ...}`` plus the noise floor (two independent samples of the data) and
    training times."""
    tc = cfg.toy
    torch.set_num_threads(max(1, torch.get_num_threads()))
    held_out = sample_toy(tc.dataset, int(tc.n_eval), np.random.default_rng(10_000 + int(cfg.seed)))
    floor = sliced_w2(
        sample_toy(tc.dataset, int(tc.n_eval), np.random.default_rng(20_000)), held_out, int(tc.n_projections)
    )
    names = toy_selection(tc)
    result = {"metric": "sliced_w2", "dataset": tc.dataset, "noise_floor": floor, "num_steps": int(tc.num_steps)}
    samples = {}
    for name in names:
        ocfg = tc.objectives[name]
        torch.manual_seed(int(cfg.seed))
        objective = build_objective(ocfg)
        model = VectorModel(build_net(tc.net, **objective.net_options()), objective)
        sub = run_dir / name
        sub.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        Trainer(model, cfg, sub, batches=_toy_batches(tc.dataset, int(tc.batch_size), int(cfg.seed))).fit()
        result[f"train_seconds@{name}"] = time.time() - t0
        ema_model = model  # evaluate the weights the config asks for
        if cfg.train.eval_model == "ema":
            ck = load_checkpoint(sub / "checkpoints" / "last.ckpt")
            ema_obj = build_objective(ocfg)
            ema_model = VectorModel(build_net(tc.net, **ema_obj.net_options()), ema_obj)
            ema_model.load_state_dict(ck["ema"]["model"])
        ema_model.eval()
        samples[name] = {}
        for n in tc.steps:
            s = ema_model.sample(int(tc.n_eval), int(n), seed=int(cfg.seed) + 7)
            samples[name][int(n)] = s
            result[f"{name}@{int(n)}"] = sliced_w2(s, held_out, int(tc.n_projections))
    _plot_toy(samples, held_out, run_dir / "toy_samples.png", tc.dataset)
    result["figure"] = str(run_dir / "toy_samples.png")
    steps = [int(n) for n in tc.steps]
    ylabel = "sliced W2 to held-out data (lower is better)"
    fig = quality_vs_nfe(result, "{obj}@{n}", names, steps, run_dir / "quality_vs_nfe.png", ylabel, tc.dataset, floor)
    result["quality_vs_nfe"] = str(fig)
    atomic_write_text(run_dir / "config_resolved.json", json.dumps(OmegaConf.to_container(tc, resolve=True)))
    return result


def _plot_toy(samples: dict, held_out: np.ndarray, path: Path, title: str) -> None:
    """Scatter plots (rows: objectives, columns: the data and each step count) written atomically to ``path``."""
    import matplotlib  # lazy: matplotlib is slow to import, and the Agg backend is set only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(samples)
    steps = list(next(iter(samples.values())))
    fig, axes = plt.subplots(
        len(names), len(steps) + 1, figsize=(2.2 * (len(steps) + 1), 2.3 * len(names)), squeeze=False
    )
    lim = float(np.abs(held_out).max()) * 1.15
    for i, name in enumerate(names):
        axes[i, 0].scatter(held_out[:3000, 0], held_out[:3000, 1], s=1, c="k")
        axes[i, 0].set_title("data", fontsize=8)
        axes[i, 0].set_ylabel(name, fontsize=9)
        for j, n in enumerate(steps):
            s = samples[name][n]
            axes[i, j + 1].scatter(s[:3000, 0], s[:3000, 1], s=1, c="tab:blue" if name == "shortcut" else "tab:orange")
            axes[i, j + 1].set_title(f"{n} step{'s' if n > 1 else ''}", fontsize=8)
    for ax in axes.flat:
        ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"{title}: samples vs number of sampling steps (same weights per row)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path, keep_suffix=True) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
