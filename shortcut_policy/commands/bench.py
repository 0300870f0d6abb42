"""``shortcut-policy bench toy|policy|images|policies ...`` (configs/bench.yaml, ``what=``): benchmarks that measure
quality and speed side by side. The implementations stay in the library package :mod:`shortcut_policy.bench`:
toy, policy_latency, images, policies (trains through the train and distill verbs handed to it here)."""

from __future__ import annotations

from pathlib import Path

from ..bench.images import run_bench_images
from ..bench.policies import run_bench_policies
from ..bench.policy_latency import run_bench_policy
from ..bench.toy import run_toy
from .distill import distill_shorthand
from .runner import compose, run_verb

__all__ = ["bench_command"]


def bench_command(cfg, run_dir):
    """``shortcut-policy bench what=toy|policy|images|policies``: run that benchmark in ``run_dir`` and return its
    result dict. The policies bench trains through the ``train`` verb (handed in from the CLI layer). Raises
    ``ValueError`` for another ``what``."""
    what = cfg.get("what", "toy")
    if what == "toy":
        return run_toy(cfg, Path(run_dir))
    if what == "policy":
        bc = cfg.policy_bench
        return run_bench_policy(
            cfg, Path(run_dir), compose("train", [f"task={bc.task}", f"net={bc.net}", "logger=none"])
        )
    if what == "images":
        return run_bench_images(cfg, Path(run_dir))
    if what == "policies":
        return run_bench_policies(
            cfg,
            Path(run_dir),
            compose,
            lambda overrides: run_verb("train", overrides),
            lambda overrides: run_verb("distill", distill_shorthand(overrides)),
        )
    raise ValueError(f"bench {what!r}: expected one of toy, policy, images, policies")
