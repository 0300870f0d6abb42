"""Time and step-level sampling shared by the objectives (reference: kvfrans/shortcut-models targets_shortcut.py)."""

from __future__ import annotations

import warnings

import torch

from ..conventions import LOG2_M


def discrete_t(n: int, m: int, device, generator=None) -> torch.Tensor:
    """t ~ U{0, 1/m, ..., (m-1)/m}: the reference's flow-matching grid (t = 1 is never drawn)."""
    return torch.randint(0, m, (n,), device=device, generator=generator).float() / m


def t_on_level_grid(levels: torch.Tensor, generator=None) -> torch.Tensor:
    """For bootstrap rows at level k (d = 2^-k): t uniform over multiples of d in [0, 1 - d]."""
    n_cells = (2.0**levels).to(torch.float32)
    u = torch.rand(levels.shape, device=levels.device, generator=generator)
    return torch.floor(u * n_cells) / n_cells


def allocate_levels(n: int, log2_m: int = LOG2_M, mode: str = "reference") -> torch.Tensor:
    """Deterministic, stratified shortcut levels (0 = d=1 ... log2_m-1 = d=2/M) for n bootstrap rows.

    reference: levels [log2_m-1, ..., 0] each repeated n // log2_m times, the remainder at level 0
      (d = 1), exactly as the reference. For n < log2_m the reference gives every row level 0
      (its issue #11); we then fall back to `cycle` and warn.
    cycle: [log2_m-1, ..., 0, log2_m-1, ...] truncated to n (every level covered as soon as n >= log2_m).
    dt_bias: the reference's ``bootstrap_dt_bias=1`` option, biased toward large steps: levels log2_m-1 ... 2 each
      (n // 2) // log2_m times, then n // 4 rows at level 1 and the rest at level 0 (n = 32, log2_m = 7:
      {6..2: 2 each, 1: 8, 0: 14}).
    """
    order = torch.arange(log2_m - 1, -1, -1)
    if mode == "reference" and n // log2_m == 0 and n > 0:
        warnings.warn(
            f"{n} bootstrap rows < {log2_m} levels: the reference allocation would put every row at d=1; "
            "cycling through the smallest levels instead (use a bigger batch to cover every level)",
            stacklevel=3,
        )
        mode = "cycle"
    if mode == "reference":
        reps = order.repeat_interleave(n // log2_m)
        return torch.cat([reps, torch.zeros(n - reps.numel(), dtype=torch.long)])
    if mode == "cycle":
        return order.repeat(n // log2_m + 1)[:n]
    if mode == "dt_bias":
        if n > 0 and (n // 2) // log2_m == 0:
            warnings.warn(
                f"{n} bootstrap rows: the dt_bias allocation gives levels {log2_m - 1}..2 no rows below "
                f"{2 * log2_m} rows (only d=1 and d=1/2 are trained)",
                stacklevel=3,
            )
        fine = torch.arange(log2_m - 1, 1, -1).repeat_interleave((n // 2) // log2_m)
        ones = torch.ones(n // 4, dtype=torch.long)
        return torch.cat([fine, ones, torch.zeros(n - fine.numel() - ones.numel(), dtype=torch.long)])
    raise ValueError(f"level allocation mode {mode!r}: expected 'reference', 'cycle' or 'dt_bias'")


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed process group, (0, 1) when none is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def global_levels_for_rank(n_local: int, log2_m: int, mode: str) -> torch.Tensor:
    """Stratify levels over the GLOBAL bootstrap batch (all DDP ranks), return this rank's slice."""
    rank, world = dist_rank_world()
    levels = allocate_levels(n_local * world, log2_m, mode)
    return levels[rank * n_local : (rank + 1) * n_local]
