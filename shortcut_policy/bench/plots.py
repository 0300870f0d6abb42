"""Figures shared by the benchmarks: quality against NFE, one line per objective."""

from __future__ import annotations

from pathlib import Path

from ..utils import atomic_path


def quality_vs_nfe(
    result: dict,
    key: str,
    objectives: list[str],
    steps: list[int],
    path,
    ylabel: str,
    title: str,
    floor: float | None = None,
) -> Path:
    """Write a PNG of a quality metric against the number of sampling steps (NFE), one line per objective.

    ``result`` maps ``key.format(obj=name, n=N)`` (e.g. ``"{obj}@{n}"`` for `bench toy`, ``"fid@{obj}{n}"`` for
    `bench images`) to the metric of objective ``name`` at N steps; missing entries are skipped. The x axis is log2
    NFE; ``floor`` (the metric's noise floor, when there is one) is drawn as a dashed line. Written atomically;
    returns ``path``. Raises ``ValueError`` when no objective has a value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = 0
    for name in objectives:
        keys = [(int(n), key.format(obj=name, n=int(n))) for n in steps]
        pts = [(n, result[k]) for n, k in keys if k in result]
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        drawn += 1
    if not drawn:
        plt.close(fig)
        raise ValueError(f"quality_vs_nfe: no values for {objectives} under key {key!r}")
    if floor is not None:
        ax.axhline(float(floor), color="k", ls="--", lw=1, label="noise floor")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("NFE (sampling steps)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, keep_suffix=True) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return Path(path)
