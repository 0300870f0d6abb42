"""Evaluation summaries: per-seed tables, Wilson confidence intervals, score/success-vs-steps plots.

Metrics (Diffusion Policy's protocol plus a success rate):
* ``mean_score@N``   mean over seeds of the episode's max reward (DP's ``test/mean_score``; Push-T reward is
                     clip(coverage / 0.95, 0, 1)), with N = sampling steps (NFE of a shortcut policy);
* ``success_rate@N`` fraction of seeds whose episode succeeded (Push-T: max coverage > 0.95);
* ``success_ci95@N`` the 95 % Wilson score interval [lo, hi] of the success rate (z = 1.96). Wilson rather
                     than the normal approximation because rates near 0 or 1 with 50 episodes are the norm.
* ``stage_rate@N``   for envs that report task stages in ``info["stages"]`` (Transport: lid off, trash in its
                     bin, hammer handed over, ...): the fraction of seeds that reached each stage, in the order
                     the stages are reached on average; ``per_seed.csv`` lists each seed's stages with the step.
Crashed or timed-out episodes (status other than ``ok``) are listed under ``crashed_seeds@N`` with their count
``n_crashed@N``. :func:`summarize` with ``exclude_crashed=True`` (what :func:`shortcut_policy.eval.rollout.evaluate`
uses) computes the rates over the episodes that ran (``n_ran@N``), so a crash never passes silently as a failed
episode; with the default ``exclude_crashed=False`` they count as failures with score 0.
:func:`crash_cause` turns a crash's traceback text into one line (exception type and message).
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np

from shortcut_policy.utils import atomic_path, atomic_write_text

FIELDS = ["steps", "seed", "max_reward", "success", "env_steps", "status", "error", "stages"]


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes out of n trials."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    den = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(rows: list[dict], steps: int, exclude_crashed: bool = False) -> dict:
    """Metrics for one step budget from per-seed rows (dicts with max_reward, success, status).

    Rows whose status is not ``ok`` crashed or timed out: they are listed under ``crashed_seeds@N`` and
    counted in ``n_crashed@N``. With ``exclude_crashed`` the score, success rate, its interval and stage rates are
    over the episodes that ran (``n_ran@N``; NaN when none ran), otherwise crashed episodes count as failures
    with score 0."""
    crashed = [int(r["seed"]) for r in rows if r.get("status") != "ok"]
    if exclude_crashed:
        rows = [r for r in rows if r.get("status") == "ok"]
    n = len(rows)
    scores = np.array([float(r.get("max_reward") or 0.0) if r.get("status") == "ok" else 0.0 for r in rows])
    succ = np.array([bool(r.get("success")) and r.get("status") == "ok" for r in rows])
    k = int(succ.sum())
    lo, hi = wilson_interval(k, n)
    out = {
        f"mean_score@{steps}": float(scores.mean()) if n else float("nan"),
        f"success_rate@{steps}": k / n if n else float("nan"),
        f"success_ci95@{steps}": [round(lo, 4), round(hi, 4)],
    }
    staged = [r["stages"] for r in rows if isinstance(r.get("stages"), dict)]
    if staged:
        first: dict[str, list] = {}
        for st in staged:
            for k, v in st.items():
                first.setdefault(k, []).append(float(v))
        order = sorted(first, key=lambda k: float(np.mean(first[k])))
        out[f"stage_rate@{steps}"] = {k: len(first[k]) / n for k in order}
    if crashed:
        out[f"crashed_seeds@{steps}"] = crashed
        out[f"n_crashed@{steps}"] = len(crashed)
        if exclude_crashed:
            out[f"n_ran@{steps}"] = n
    return out


_TB_HEADER = "Traceback (most recent call last):"


def crash_cause(error) -> str:
    """One line for a crashed row's ``error`` text: the exception (``Type: message``) of its last traceback, with
    any text before the traceback (``worker crashed while running seed S``) in parentheses; text without a
    traceback (``worker process died (exit code 3)``) is returned on one line."""
    text = str(error or "").strip()
    if not text:
        return "no error text recorded"
    if _TB_HEADER not in text:
        return " ".join(p.strip() for p in text.splitlines() if p.strip())
    prefix = text[: text.index(_TB_HEADER)].strip().rstrip(":").strip()
    last_tb = text[text.rindex(_TB_HEADER) + len(_TB_HEADER) :]
    lines = last_tb.splitlines()
    # frames are indented ("  File ...", "    code", "    ^^^"); the exception starts at the first line that is not
    start = next((i for i, ln in enumerate(lines) if ln.strip() and not ln[:1].isspace()), None)
    exc = " ".join(ln.strip() for ln in lines[start:] if ln.strip()) if start is not None else ""
    exc = re.sub(r"\s+", " ", exc) or "unknown exception"
    return f"{exc} ({prefix})" if prefix else exc


def write_per_seed(rows: list[dict], run_dir) -> tuple[Path, Path]:
    """Write one row per (steps, seed) episode to ``run_dir/per_seed.json`` and ``per_seed.csv`` (columns
    ``FIELDS``; stages as "name:step" in the order reached), atomically; returns both paths."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: (int(r["steps"]), int(r["seed"])))
    jpath = run_dir / "per_seed.json"
    atomic_write_text(jpath, json.dumps(rows, indent=1, default=_default))
    cpath = run_dir / "per_seed.csv"
    with atomic_path(cpath) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            row = {k: r.get(k, "") for k in FIELDS}
            if isinstance(row["stages"], dict):  # name:first step, in the order reached
                row["stages"] = " ".join(f"{k}:{v}" for k, v in sorted(row["stages"].items(), key=lambda kv: kv[1]))
            w.writerow(row)
    return jpath, cpath


def _default(x):
    """JSON fallback: NumPy / torch scalars via ``.item()``, anything else as ``str``."""
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def plot_vs_steps(metrics: dict, path, title: str = "") -> Path | None:
    """PNG of mean_score and success_rate (with Wilson 95 % bars) against the number of sampling steps."""
    steps = sorted({int(k.split("@")[1]) for k in metrics if k.startswith("mean_score@")})
    if not steps:
        return None
    plt = _pyplot()
    score = [metrics[f"mean_score@{s}"] for s in steps]
    succ = [metrics[f"success_rate@{s}"] for s in steps]
    ci = np.array([metrics[f"success_ci95@{s}"] for s in steps], dtype=float)
    yerr = np.stack([np.array(succ) - ci[:, 0], ci[:, 1] - np.array(succ)])
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(steps, score, "o-", label="mean score (max reward)")
    ax.errorbar(steps, succ, yerr=np.clip(yerr, 0, None), fmt="s--", capsize=3, label="success rate (95% Wilson)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps)
    ax.set_xticklabels([str(s) for s in steps])
    ax.set_xlabel("sampling steps (NFE)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, ax, path, title)


def plot_stages(metrics: dict, path, title: str = "") -> Path | None:
    """PNG of the fraction of episodes reaching each task stage (``stage_rate@N``), one bar group per N, stages in
    the order they are reached. None when the env reports no stages."""
    keys = sorted((k for k in metrics if k.startswith("stage_rate@")), key=lambda k: int(k.split("@")[1]))
    if not keys:
        return None
    plt = _pyplot()
    names = list(metrics[keys[0]])
    for k in keys[1:]:
        names += [n for n in metrics[k] if n not in names]
    y = np.arange(len(names))
    h = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1.2), dpi=120)
    for i, k in enumerate(keys):
        vals = [metrics[k].get(n, 0.0) for n in names]
        bars = ax.barh(y + i * h, vals, height=h, label=f"{k.split('@')[1]} step(s)")
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in vals], fontsize=7, padding=2)
    ax.set_yticks(y + h * (len(keys) - 1) / 2)
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("fraction of episodes that reached the stage")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, ax, path, title)


def _pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (imported on first use)."""
    import matplotlib  # lazy: slow to import; env worker processes load this module (via rollout) and never plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, path, title: str) -> Path:
    """Title, tight layout, write the PNG, free the figure."""
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, keep_suffix=True) as tmp:  # savefig picks the format from the suffix
        fig.savefig(tmp)
    _pyplot().close(fig)
    return path
