"""Chi et al.'s ConditionalUnet1D (Diffusion Policy) with a step-size (shortcut level) branch.

Same blocks as Diffusion Policy: Conv1d -> GroupNorm(8) -> Mish, FiLM conditioning (scale * x + bias, scale
first) of every residual block on [time embedding, global obs condition], skip taken before downsampling,
every up level upsamples. The shortcut level k = log2(1/d) gets its own sinusoidal+MLP embedder whose output
is *summed* into the time embedding (the analogue of the reference DiT's c = te + ye + dte), so the FiLM
input width and, with `use_step_size=False`, the parameter count equal Diffusion Policy's exactly.

t in [0,1] is multiplied by `time_scale` (default 100, Diffusion Policy's DDPM step range) before the
sinusoid: DP's embedding frequencies lie in [1e-4, 1], so a raw t in [0,1] would be almost constant.
The level (0..7) is fed raw, like DP's integer steps. The diffusion objective feeds DP's integer step k with
`time_scale` 1 (the objective sets it), so DP's weights predict exactly as in DP. `embed_freqs="dp"` evaluates the
sinusoid's frequencies with DP's floating-point rounding (bit-equal); "legacy" is checkpoint format 1's rounding.
"""

from __future__ import annotations

from typing import Sequence

import torch
from einops import rearrange
from torch import nn

from .embeddings import SinusoidalMLPEmbedder


class Conv1dBlock(nn.Sequential):
    """Conv1d (same padding) -> GroupNorm(n_groups) -> Mish: (B, cin, T) -> (B, cout, T)."""

    def __init__(self, cin: int, cout: int, k: int, n_groups: int = 8):
        super().__init__(nn.Conv1d(cin, cout, k, padding=k // 2), nn.GroupNorm(n_groups, cout), nn.Mish())


class ConditionalResidualBlock1D(nn.Module):
    """Diffusion Policy's FiLM residual block: two :class:`Conv1dBlock` with the condition applied between them
    as ``scale * x + bias`` (``cond_predict_scale``) or ``x + bias``, plus a 1x1 conv residual when the widths differ.
    """

    def __init__(
        self, cin: int, cout: int, cond_dim: int, k: int = 5, n_groups: int = 8, cond_predict_scale: bool = True
    ):
        super().__init__()
        self.blocks = nn.ModuleList([Conv1dBlock(cin, cout, k, n_groups), Conv1dBlock(cout, cout, k, n_groups)])
        self.cout, self.cond_predict_scale = cout, cond_predict_scale
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, cout * 2 if cond_predict_scale else cout))
        self.residual_conv = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, cin, T), cond (B, cond_dim) -> (B, cout, T)."""
        out = self.blocks[0](x)
        emb = self.cond_encoder(cond).unsqueeze(-1)
        if self.cond_predict_scale:
            scale, bias = emb[:, : self.cout], emb[:, self.cout :]
            out = scale * out + bias
        else:
            out = out + emb
        out = self.blocks[1](out)
        return out + self.residual_conv(x)


class UNet1D(nn.Module):
    """net(x, t, d_level, cond) -> velocity/noise prediction shaped like x; x is (B, T, Da), cond (B, Dc).

    `step_input="level"`: d_level is the dyadic level log2(1/d) (0..7), fed raw; `"continuous"`: it is the step
    size d in [0, 1] (MeanFlow's t - r), scaled by `time_scale` like t. Same parameters either way.
    `use_step_size=False` drops the step-size branch (Diffusion Policy's exact net); `embed_freqs` ("dp" | "legacy")
    is the sinusoid's frequency rounding (module docstring).
    """

    def __init__(
        self,
        input_dim: int,
        global_cond_dim: int | None = None,
        step_embed_dim: int = 256,
        down_dims: Sequence[int] = (256, 512, 1024),
        kernel_size: int = 5,
        n_groups: int = 8,
        cond_predict_scale: bool = True,
        use_step_size: bool = True,
        time_scale: float = 100.0,
        step_input: str = "level",
        embed_freqs: str = "dp",
    ):
        super().__init__()
        if step_input not in ("level", "continuous"):
            raise ValueError(
                f"UNet1D: step_input={step_input!r}: expected 'level' (dyadic level log2(1/d), shortcut) "
                "or 'continuous' (step size d in [0, 1], MeanFlow)"
            )
        self.step_input, self.time_scale = step_input, float(time_scale)
        dsed = step_embed_dim
        self.input_dim, self.global_cond_dim = input_dim, global_cond_dim
        self.down_dims = list(down_dims)
        self.time_embed = SinusoidalMLPEmbedder(dsed, scale=time_scale, freqs=embed_freqs)
        self.step_size_embed = SinusoidalMLPEmbedder(dsed, scale=1.0, freqs=embed_freqs) if use_step_size else None
        cond_dim = dsed + (global_cond_dim or 0)
        dims = [input_dim] + self.down_dims
        in_out = list(zip(dims[:-1], dims[1:]))

        def rb(a, b):
            return ConditionalResidualBlock1D(a, b, cond_dim, kernel_size, n_groups, cond_predict_scale)

        self.down_modules = nn.ModuleList()
        for i, (a, b) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.down_modules.append(
                nn.ModuleList([rb(a, b), rb(b, b), nn.Conv1d(b, b, 3, 2, 1) if not last else nn.Identity()])
            )
        mid = self.down_dims[-1]
        self.mid_modules = nn.ModuleList([rb(mid, mid), rb(mid, mid)])
        self.up_modules = nn.ModuleList()
        for a, b in reversed(in_out[1:]):
            self.up_modules.append(nn.ModuleList([rb(b * 2, a), rb(a, a), nn.ConvTranspose1d(a, a, 4, 2, 1)]))
        d0 = self.down_dims[0]
        self.final_conv = nn.Sequential(Conv1dBlock(d0, d0, kernel_size, n_groups), nn.Conv1d(d0, input_dim, 1))
        self.horizon_multiple = 2 ** (len(self.down_dims) - 1)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, d_level: torch.Tensor | None = None, cond: torch.Tensor | None = None
    ):
        """x (B, T, Da) at time t (B,) in [0, 1], step input ``d_level`` (B,) (required when ``use_step_size``) and the
        global condition ``cond`` (B, global_cond_dim) -> (B, T, Da). T must be a multiple of 2^(levels - 1); scalars t
        / d_level broadcast. Raises ``ValueError`` for a wrong x or cond shape, a T that does not divide, or a missing
        d_level."""
        if x.dim() != 3 or x.shape[-1] != self.input_dim:
            raise ValueError(f"UNet1D: x must be (B, T, {self.input_dim}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        if T % self.horizon_multiple:
            raise ValueError(f"UNet1D: horizon T={T} must be divisible by {self.horizon_multiple} (2^(levels-1))")
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype).reshape(-1).expand(B)
        feat = self.time_embed(t)
        if self.step_size_embed is not None:
            if d_level is None:
                raise ValueError("UNet1D: d_level is required when use_step_size=True")
            d_level = torch.as_tensor(d_level, device=x.device, dtype=x.dtype).reshape(-1).expand(B)
            if self.step_input == "continuous":  # d in [0, 1] gets t's scaling (no new parameters)
                d_level = d_level * self.time_scale
            feat = feat + self.step_size_embed(d_level)
        if self.global_cond_dim:
            if cond is None or cond.shape != (B, self.global_cond_dim):
                got = None if cond is None else tuple(cond.shape)
                raise ValueError(f"UNet1D: cond must be ({B}, {self.global_cond_dim}), got {got}")
            feat = torch.cat([feat, cond.to(feat.dtype)], dim=-1)
        h = rearrange(x, "b t d -> b d t")
        skips = []
        for r1, r2, down in self.down_modules:
            h = r2(r1(h, feat), feat)
            skips.append(h)
            h = down(h)
        for m in self.mid_modules:
            h = m(h, feat)
        for r1, r2, up in self.up_modules:
            h = torch.cat([h, skips.pop()], dim=1)
            h = up(r2(r1(h, feat), feat))
        return rearrange(self.final_conv(h), "b d t -> b t d")
