"""Scalar embeddings shared by every network: sinusoidal features followed by an MLP."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal(
    x: torch.Tensor, dim: int, max_period: float = 10000.0, order: str = "cos_sin", freqs: str = "legacy"
) -> torch.Tensor:
    """Sinusoidal features of a (B,) tensor.

    order="cos_sin": [cos, sin] with freqs exp(-ln(max_period) i / half) (the shortcut-models DiT embedder);
    order="sin_cos": [sin, cos] with freqs exp(-ln(max_period) i / (half - 1)) (Diffusion Policy's SinusoidalPosEmb).
    ``freqs`` picks the floating-point evaluation of the frequencies: "dp" rounds as Diffusion Policy's
    SinusoidalPosEmb (i * (-ln(max_period) / denom), the constant in double precision first), bit-equal to it;
    "legacy" as checkpoint format 1 ((-ln(max_period) * i) / denom; up to 1 ulp different).
    """
    if freqs not in ("dp", "legacy"):
        raise ValueError(f"freqs={freqs!r}: expected 'dp' or 'legacy'")
    half = dim // 2
    denom = half if order == "cos_sin" else max(half - 1, 1)
    dtype = x.dtype if x.is_floating_point() else torch.float32  # float64 nets (precision checks) stay float64
    steps = torch.arange(half, device=x.device, dtype=dtype)
    if freqs == "dp":
        freqs = torch.exp(steps * (-math.log(max_period) / denom))
    else:
        freqs = torch.exp(-math.log(max_period) * steps / denom)
    args = x.to(dtype).reshape(-1, 1) * freqs.reshape(1, -1)
    if order == "cos_sin":
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """DiT-style scalar embedder: [cos, sin] features -> Linear -> SiLU -> Linear.

    `scale` multiplies the input before the sinusoid (1.0 = the reference: raw t in [0,1], raw level 0..7).
    """

    def __init__(self, hidden: int, freq_dim: int = 256, scale: float = 1.0, init_std: float = 0.02):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=init_std)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scalars x (B,) -> embeddings (B, hidden): MLP of the [cos, sin] features of x * scale."""
        return self.mlp(sinusoidal(x * self.scale, self.freq_dim, order="cos_sin"))


class SinusoidalMLPEmbedder(nn.Module):
    """Diffusion Policy's step encoder: SinusoidalPosEmb(dim) -> Linear(dim, 4 dim) -> Mish -> Linear(4 dim, dim).
    ``freqs``: the frequencies' rounding (:func:`sinusoidal`; "dp" bit-equal to Diffusion Policy)."""

    def __init__(self, dim: int, scale: float = 1.0, freqs: str = "dp"):
        super().__init__()
        self.dim, self.scale, self.freqs = dim, scale, freqs
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 4), nn.Mish(), nn.Linear(dim * 4, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scalars x (B,) -> embeddings (B, dim): MLP of the [sin, cos] features of x * scale."""
        return self.mlp(sinusoidal(x * self.scale, self.dim, order="sin_cos", freqs=self.freqs))
