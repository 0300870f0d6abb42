"""`shortcut-policy bench images`: shortcut vs flow matching, class-conditional, on scikit-learn's digits.

CPU-sized (target: under 20 minutes on 2 cores): the 8x8 digits upscaled to 16x16, a small pixel-space DiT, the same
net, optimiser, batch and step budget for both objectives. Quality at N = 1, 2, 4, ..., 128 steps is measured as
- ``fid@<objective><N>``: Fréchet distance in the 128-d penultimate feature space of a small CNN digits classifier
  trained here once and cached (reference statistics: the training split; ``fid@real_test`` is the held-out split
  against the same statistics, the noise floor of this metric);
- ``acc@<objective><N>``: that classifier's accuracy on class-conditional samples (the label asked for).
A PNG grid (rows: objective x N in {1, 4, 128}; columns: classes 0..9; the same noise everywhere).
Settings come from ``DEFAULTS`` below, overridden by ``bench.images.*`` (``shortcut-policy bench images
images.num_steps=500``). Each objective checkpoints under ``<run_dir>/<objective>/checkpoints``; re-running with the
same ``run_dir`` resumes (an interrupted run) or, when training is complete, only re-evaluates (e.g. with
``+images.eval_model=online``).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from ..builders import build_generator, build_image_dataset
from ..conventions import CLIP_TARGET, VALID_STEPS, M
from ..datasets.images import DigitsDataset, make_grid, write_image
from ..eval.fid import feature_statistics, frechet_distance
from ..generator import sample_images
from ..train.trainer import Trainer
from ..utils import atomic_path, atomic_write_text
from .plots import quality_vs_nfe

DEFAULTS = {
    "image_size": 16,
    "num_steps": 3500,  # session 3: 2,500 -> 3,500 (about 15 min for both objectives in parallel on 2 idle cores)
    "batch_size": 128,
    "lr": 1.0e-3,
    "weight_decay": 0.1,
    "lr_schedule": "constant",  # or "cosine" (decays to 0 over num_steps after warmup_steps)
    "warmup_steps": 0,
    "ema": {"decay": 0.999, "warmup": "power", "power": 0.75, "inv_gamma": 1.0},
    "eval_model": "ema",
    "net": {"kind": "dit", "hidden_size": 96, "depth": 4, "num_heads": 4, "patch_size": 4, "mlp_ratio": 4.0},
    "objectives": {
        # half the batch as bootstrap rows, allocated as the reference's bootstrap_dt_bias=1 (more rows at d = 1, 1/2):
        # at this budget one-step quality is limited by how far self-consistency has propagated (docs/results/images.md)
        "shortcut": {
            "name": "shortcut",
            "m": M,
            "bootstrap_fraction": 0.5,
            "level_allocation": "dt_bias",
            "clip": CLIP_TARGET,
            "teacher": "online",
            "class_dropout_prob": 0.0,
        },
        "flow_matching": {"name": "flow_matching", "m": M, "t_sampling": "discrete", "class_dropout_prob": 0.0},
        # MeanFlow at this budget: half the rows with r != t and (r, t) uniform (the paper's ImageNet choice, 75 % r = t
        # and logit-normal times, gave 1-step FID 47.4 vs 37.4 here: docs/results/images.md)
        "meanflow": {"name": "meanflow", "m": M, "flow_fraction": 0.5, "time_dist": "uniform", "jvp": "autograd"},
        "consistency": {"name": "consistency", "m": M, "teacher": "ema"},  # total_steps = num_steps (set below)
        "live_reflow": {"name": "live_reflow", "m": M, "bootstrap_fraction": 0.125, "euler_steps": 8},
        "regression": {"name": "regression", "m": M},
    },
    "select": ["shortcut", "flow_matching"],  # which presets run (`bench images objectives=[...]`), in this order
    "steps": list(VALID_STEPS),  # 1, 2, 4, ..., M
    "n_eval": 400,
    "classifier_cache": "data/bench_images/digits_classifier_{size}px.pt",
    "classifier_epochs": 40,
    "threads": None,  # torch threads per process (parallel: 1)
    "parallel": True,  # train the objectives in parallel processes
    "seed": 0,
}


# ------------------------------------------------------------------------------------------------------------
# The feature network: a small CNN classifier of the digits (trained once, cached)


class DigitsClassifier(nn.Module):
    """Small CNN digits classifier for (B, 1, S, S) images in [-1, 1]: two conv stages (32, 64 channels), a
    ``feat_dim`` ReLU feature layer (the space FID-like distances are measured in) and a 10-way head."""

    def __init__(self, image_size: int = 16, feat_dim: int = 128):
        super().__init__()
        self.image_size = image_size
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * (image_size // 4) ** 2, feat_dim), nn.ReLU())
        self.head = nn.Linear(feat_dim, 10)

    def features(self, x):
        """Images (B, 1, S, S) -> penultimate features (B, feat_dim)."""
        return self.fc(self.conv(x))

    def forward(self, x):
        """Images (B, 1, S, S) -> class logits (B, 10)."""
        return self.head(self.features(x))


def _shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random integer translations (padding with the background value -1)."""
    B = x.shape[0]
    p = max_shift
    xp = F.pad(x, (p, p, p, p), value=-1.0)
    out = torch.empty_like(x)
    dx = torch.randint(0, 2 * p + 1, (B,), generator=g)
    dy = torch.randint(0, 2 * p + 1, (B,), generator=g)
    H, W = x.shape[-2:]
    for i in range(B):
        out[i] = xp[i, :, dy[i] : dy[i] + H, dx[i] : dx[i] + W]
    return out


def train_classifier(train, test, image_size: int, epochs: int = 40, seed: int = 0) -> tuple[DigitsClassifier, float]:
    """Train a :class:`DigitsClassifier` with Adam (lr 1e-3, batch 64, +-1 pixel random shifts) for ``epochs`` on
    ``train`` (a :class:`~shortcut_policy.datasets.images.DigitsDataset`); returns (classifier in eval mode, test
    accuracy on ``test``)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    clf = DigitsClassifier(image_size)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    x, y = train.x, train.labels
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(clf(_shift(x[idx], g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    clf.eval()
    with torch.no_grad():
        acc = (clf(test.x).argmax(1) == test.labels).float().mean().item()
    return clf, acc


def load_or_train_classifier(path, train, test, image_size: int, epochs: int, seed: int = 0):
    """The cached classifier at ``path`` (``{size}`` replaced by ``image_size``) when it was trained at this size, else
    a freshly trained one saved there. Returns (classifier, test accuracy, path, whether it came from the cache)."""
    path = Path(str(path).format(size=image_size))
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=False)
        if blob.get("image_size") == image_size:
            clf = DigitsClassifier(image_size)
            clf.load_state_dict(blob["state_dict"])
            return clf.eval(), float(blob["test_acc"]), path, True
    clf, acc = train_classifier(train, test, image_size, epochs, seed)
    with atomic_path(path) as tmp:
        torch.save({"state_dict": clf.state_dict(), "test_acc": acc, "image_size": image_size}, tmp)
    return clf, acc, path, False


# ------------------------------------------------------------------------------------------------------------


def _merge(base: dict, over) -> dict:
    """Deep merge: ``base`` with the keys of ``over`` replaced (nested dicts merged key by key); a copy."""
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def bench_settings(cfg) -> dict:
    """The images-bench settings: :data:`DEFAULTS` overridden by the config's ``images`` section."""
    over = cfg.get("images") if cfg is not None else None
    over = OmegaConf.to_container(over, resolve=True) if over is not None and not isinstance(over, dict) else over
    return _merge(DEFAULTS, over)


def image_selection(s: dict) -> list[tuple[str, dict]]:
    """(name, objective config) of the presets to run: ``s["select"]`` (a list or a comma-separated string of names
    of ``s["objectives"]``; None = all), in order. Raises ``ValueError`` for an empty selection or an unknown name,
    listing the valid ones. A consistency preset gets ``total_steps`` = the bench's ``num_steps``."""
    valid = list(s["objectives"])
    sel = s.get("select")
    if sel is None:
        sel = valid
    elif isinstance(sel, str):
        sel = [x.strip() for x in sel.split(",") if x.strip()]
    names = list(dict.fromkeys(str(x) for x in sel))
    if not names:
        raise ValueError(f"bench images: objectives=[] is empty; pick one or more of {valid}")
    unknown = [n for n in names if n not in s["objectives"]]
    if unknown:
        raise ValueError(f"bench images: unknown objective(s) {unknown}; valid: {valid}")
    out = []
    for n in names:
        o = s["objectives"][n]
        if o and o.get("name") == "consistency" and o.get("total_steps") is None:
            o = {**o, "total_steps": int(s["num_steps"])}
        out.append((n, o))
    return out


def make_model_cfg(s: dict, objective: dict, run_seed: int):
    """A full train config (digits task, ``s["net"]``, ``objective``, CPU trainer settings from ``s``) for one
    objective of the images bench, seeded ``run_seed``."""
    return OmegaConf.create(
        {
            "task": {
                "name": "digits",
                "kind": "image",
                "source": "digits",
                "split": "train",
                "class_conditional": True,
                "num_classes": 10,
                "image_size": s["image_size"],
                "image_channels": 1,
                "random_flip": False,
                "space": "pixel",
                "vae_path": None,
                "latents_path": None,
            },
            "net": s["net"],
            "objective": objective,
            "logger": {"kind": "none"},
            "train": {
                "seed": run_seed,
                "device": "cpu",
                "num_steps": s["num_steps"],
                "batch_size": s["batch_size"],
                "lr": s["lr"],
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": s["weight_decay"],
                "lr_schedule": s["lr_schedule"],
                "warmup_steps": s["warmup_steps"],
                "grad_clip": None,
                "ema": s["ema"],
                "eval_model": s["eval_model"],
                "log_every": 100,
                "eval_every": 0,
                "checkpoint_every": 500,
                "topk": 0,
                "topk_key": "score",
                "resume": True,
                "num_workers": 0,
                "amp": "auto",
                "max_minutes": None,
            },
        }
    )


def _train_and_eval(name: str, obj: dict, s: dict, run_dir: str, threads) -> dict:
    """Train one objective and evaluate it at every N (runs in its own process when ``parallel``)."""
    if threads:
        torch.set_num_threads(int(threads))
    seed, size = int(s["seed"]), int(s["image_size"])
    train, test = DigitsDataset(size, "train"), DigitsDataset(size, "test")
    clf, _, _, _ = load_or_train_classifier(s["classifier_cache"], train, test, size, int(s["classifier_epochs"]), seed)

    @torch.no_grad()
    def feats(x):
        return np.concatenate([clf.features(x[i : i + 500]).numpy() for i in range(0, len(x), 500)])

    mu_ref, sig_ref = feature_statistics(feats(train.x))
    mcfg = make_model_cfg(s, obj, seed)
    torch.manual_seed(seed)
    model = build_generator(mcfg)
    trainer = Trainer(model, mcfg, Path(run_dir) / name, train_dataset=build_image_dataset(mcfg), progress=False)
    t0 = time.time()
    fit = trainer.fit()
    out = {f"train_minutes@{name}": (time.time() - t0) / 60, f"train_loss@{name}": fit.get("train_loss")}
    gen = trainer.ema.model if s["eval_model"] == "ema" else trainer.model
    gen.eval()
    n_eval = int(s["n_eval"])
    eval_labels = torch.arange(n_eval) % 10
    rows = []
    for n in s["steps"]:
        t0 = time.time()
        x = sample_images(gen, n_eval, int(n), seed=seed + 1, labels=eval_labels, batch_size=500)
        with torch.no_grad():
            logits = torch.cat([clf(x[i : i + 500]) for i in range(0, n_eval, 500)])
        out[f"acc@{name}{n}"] = (logits.argmax(1) == eval_labels).float().mean().item()
        out[f"fid@{name}{n}"] = frechet_distance(*feature_statistics(feats(x)), mu_ref, sig_ref)
        out[f"sample_seconds@{name}{n}"] = time.time() - t0
        print(f"{name:>14s} N={n:<3d} fid={out[f'fid@{name}{n}']:.3f} acc={out[f'acc@{name}{n}']:.3f}", flush=True)
        if n in (1, 4, M):
            rows.append(sample_images(gen, 10, int(n), seed=seed + 7, labels=torch.arange(10)))
    out["_grid"] = torch.cat(rows) if rows else None
    return out


def run_bench_images(cfg, run_dir) -> dict:
    """``bench images``: train each objective on the digits and report, per step count N, the Fréchet distance in
    the classifier's feature space (``fid@<objective><N>``) and the classifier accuracy on the samples
    (``acc@<objective><N>``); writes ``samples_grid.png``, ``fid_vs_nfe.png`` and ``bench_images.json`` into
    ``run_dir``. Raises ``ValueError`` when every objective is disabled."""
    s = bench_settings(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed, size = int(s["seed"]), int(s["image_size"])
    t_start = time.time()
    train, test = DigitsDataset(size, "train"), DigitsDataset(size, "test")
    clf, clf_acc, clf_path, cached = load_or_train_classifier(
        s["classifier_cache"], train, test, size, int(s["classifier_epochs"]), seed
    )
    print(
        f"digits classifier {clf_path} ({'cached' if cached else 'trained'}): test accuracy {clf_acc:.4f}", flush=True
    )
    with torch.no_grad():
        f_train, f_test = clf.features(train.x).numpy(), clf.features(test.x).numpy()
    result: dict = {
        "classifier_test_acc": clf_acc,
        "fid@real_test": frechet_distance(*feature_statistics(f_test), *feature_statistics(f_train)),
    }
    objs = [(n, o) for n, o in image_selection(s) if o]  # an objective set to null is skipped
    if not objs:
        raise ValueError("bench images: every objective in images.objectives is null; expected at least one")
    if s.get("parallel", True) and len(objs) > 1:
        # one process per objective, one thread each: small matrices use 2 cores better this way than 2 threads
        ctx = mp.get_context("spawn")
        with ctx.Pool(len(objs)) as pool:
            outs = pool.starmap(_train_and_eval, [(n, o, s, str(run_dir), s.get("threads") or 1) for n, o in objs])
    else:
        outs = [_train_and_eval(n, o, s, str(run_dir), s.get("threads")) for n, o in objs]
    grid_rows = []
    for out in outs:
        g = out.pop("_grid")
        if g is not None:
            grid_rows.append(g)
        result.update(out)
    if grid_rows:
        grid = make_grid(torch.cat(grid_rows), nrow=10)
        grid = F.interpolate(grid[None], scale_factor=2, mode="nearest")[0]
        write_image(run_dir / "samples_grid.png", grid)
        result["grid"] = str(run_dir / "samples_grid.png")
        result["grid_rows"] = [f"{name}{n}" for name, _ in objs for n in (1, 4, M) if n in s["steps"]]
    names = [name for name, _ in objs]
    steps = [int(n) for n in s["steps"]]
    ylabel = "FID in the digits classifier's features (lower is better)"
    fig = quality_vs_nfe(result, "fid@{obj}{n}", names, steps, run_dir / "fid_vs_nfe.png", ylabel, "bench images")
    result["fid_vs_nfe"] = str(fig)
    sc1, sc128, fm1 = result.get("fid@shortcut1"), result.get("fid@shortcut128"), result.get("fid@flow_matching1")
    if None not in (sc1, sc128, fm1):
        result["targets"] = {
            "fid@shortcut1 <= 2 x fid@shortcut128": bool(sc1 <= 2 * sc128),
            "fid@flow_matching1 >= 3 x fid@shortcut1": bool(fm1 >= 3 * sc1),
            "acc@shortcut1 >= 0.8": bool(result["acc@shortcut1"] >= 0.8),
        }
    result["minutes"] = round((time.time() - t_start) / 60, 2)
    result["settings"] = s
    atomic_write_text(run_dir / "bench_images.json", json.dumps(result, indent=1, default=str))
    return result
