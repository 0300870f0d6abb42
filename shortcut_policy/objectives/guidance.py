"""Classifier-free guidance helpers (class dropout, guided network calls)."""

from __future__ import annotations

import torch


def null_like(cond: torch.Tensor, null_cond) -> torch.Tensor:
    """The null (unconditional) condition ``null_cond`` broadcast to the shape, dtype and device of ``cond``
    (B, ...); a fresh tensor, safe to modify."""
    return torch.as_tensor(null_cond, device=cond.device, dtype=cond.dtype).expand_as(cond).clone()


def drop_cond(cond, null_cond, prob: float, generator=None):
    """Replace each row's condition by the null condition with probability `prob`."""
    if cond is None or null_cond is None or prob <= 0:
        return cond
    keep = torch.rand(cond.shape[0], device=cond.device, generator=generator) >= prob
    keep = keep.reshape(-1, *([1] * (cond.dim() - 1)))
    return torch.where(keep, cond, null_like(cond, null_cond))


def guided(net, x, t, level, cond, null_cond, scale: float | None):
    """v = v_u + s (v_c - v_u) in one batched forward; plain conditional call when scale is None or 1."""
    if scale is None or scale == 1.0 or cond is None or null_cond is None:
        return net(x, t, level, cond)
    if scale == 0.0:
        return net(x, t, level, null_like(cond, null_cond))
    both = net(
        torch.cat([x, x]), torch.cat([t, t]), torch.cat([level, level]), torch.cat([cond, null_like(cond, null_cond)])
    )
    v_c, v_u = both.chunk(2)
    return v_u + scale * (v_c - v_u)
