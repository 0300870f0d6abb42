"""A small MLP for vector data (the 2-D toy benchmark): x (B, D) with t and level embeddings."""

from __future__ import annotations

import torch
from torch import nn

from .embeddings import TimestepEmbedder


class MLPNet(nn.Module):
    """Residual MLP velocity net for vector data (the 2-D toy benchmark): ``net(x (B, D), t (B,), d_level (B,), cond)``
    -> (B, D). t (scaled by ``time_scale``) and the step input (the level log2(1/d), or with
    ``step_input="continuous"`` the step size d, scaled like t) get DiT-style sinusoidal embedders that are summed and
    added before every block; ``cond`` (B, cond_dim) is concatenated to x. ``use_step_size=False`` drops the level
    branch (flow matching). Raises ``ValueError`` for an unknown ``step_input``."""

    def __init__(
        self,
        input_dim: int = 2,
        hidden: int = 256,
        depth: int = 4,
        cond_dim: int = 0,
        use_step_size: bool = True,
        time_scale: float = 1000.0,
        step_input: str = "level",
    ):
        super().__init__()
        if step_input not in ("level", "continuous"):
            raise ValueError(f"MLPNet: step_input={step_input!r}: expected 'level' or 'continuous'")
        # continuous: d_level is the step size d in [0, 1], scaled like t (same parameters)
        self.step_input, self._d_mult = step_input, float(time_scale) if step_input == "continuous" else 1.0
        self.input_dim, self.cond_dim = input_dim, cond_dim
        # t in [0,1] is scaled so the sinusoid sees more than its top few frequencies (levels are 0..7 raw)
        self.t_embed = TimestepEmbedder(hidden, scale=time_scale)
        self.d_embed = TimestepEmbedder(hidden) if use_step_size else None
        self.inp = nn.Linear(input_dim + cond_dim, hidden)
        self.blocks = nn.ModuleList([nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth)])
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, input_dim))

    def forward(self, x, t, d_level=None, cond=None):
        """x (B, input_dim), t (B,) or scalar, d_level (B,) or scalar, cond (B, cond_dim) or None -> (B, input_dim).
        Raises ``ValueError`` when x is not (B, input_dim)."""
        if x.dim() != 2 or x.shape[-1] != self.input_dim:
            raise ValueError(f"MLPNet: x must be (B, {self.input_dim}), got {tuple(x.shape)}")
        B = x.shape[0]
        c = self.t_embed(torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1).expand(B))
        if self.d_embed is not None:
            c = c + self.d_embed(
                torch.as_tensor(d_level, device=x.device, dtype=torch.float32).reshape(-1).expand(B) * self._d_mult
            )
        h = self.inp(x if not self.cond_dim else torch.cat([x, cond], -1))
        for blk in self.blocks:
            h = h + blk(h + c)
        return self.out(h)
