"""DiT with a step-size branch, faithful to the shortcut-models reference (kvfrans/shortcut-models, model.py).

Contract: ``net(x_t, t, d_level, cond) -> tensor shaped like x_t`` with x_t (B, C, H, W), t float (B,) in [0, 1],
d_level float (B,) = log2(1/d) in 0..7 and cond = class labels (B,) long, ``num_classes`` being the null label.

Deviations from stock facebookresearch/DiT that the reference makes and this port keeps
(each changes the numbers a checkpoint produces, so a faithful port keeps them all):

- attention logits scaled by 1/head_dim (not 1/sqrt(head_dim)); separate q, k, v Linear layers with bias;
  softmax in fp32;
- the blocks' adaLN Linear is NOT zero-initialised (xavier uniform, zero bias); only the final layer's adaLN and
  output Linear are zero-initialised;
- LayerNorm without scale/bias, eps 1e-6; MLP with tanh-approximated GELU; ``modulate`` without clipping;
- fixed 2-D sin-cos position embedding (a buffer, not a parameter); patch embedding = Conv(k=p, stride=p);
- output channels = input channels (no learned-sigma half);
- conditioning ``c = t_emb(t) + y_emb(label) + d_emb(level)`` with two separate sinusoidal+MLP embedders that get
  the raw t in [0,1] and the raw level 0..7 (no x1000 scaling);
- label table of size num_classes + 1 (the last row is the null label), normal(0.02) init.

Omitted: the reference's unused ``logvars`` head (256 parameters), so DiT-B/2 on 32x32x4 latents with
1000 classes has 131,091,472 parameters (reference table: 131,091,728 = this + 256).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import TimestepEmbedder

# hidden, depth, heads (patch 2 for all): the DiT paper's presets.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, depth=2, num_heads=4),
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
}


def _xavier_uniform_(w: torch.Tensor, fan_in: int, fan_out: int) -> None:
    """In place: w ~ U(-b, b), b = sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio 2010), with the fans given
    explicitly (a Conv2d patch embedding counts fan_in = p * p * C as a flattened Linear, as JAX/flax does)."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        w.uniform_(-bound, bound)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """(N,) positions -> (N, dim) features [sin | cos] with frequencies 1/10000^(i/(dim/2))."""
    assert dim % 2 == 0
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    ang = pos.reshape(-1, 1).astype(np.float64) * omega.reshape(1, -1)
    return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (MAE style), (grid_h*grid_w, dim), row-major over (h, w).

    Half of the channels encode the column index, the other half the row index.
    """
    if dim % 4 != 0:
        raise ValueError(f"hidden_size={dim} must be divisible by 4 for the 2-D sin-cos position embedding")
    ww, hh = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64))
    emb_a = _sincos_1d(dim // 2, ww.reshape(-1))
    emb_b = _sincos_1d(dim // 2, hh.reshape(-1))
    return np.concatenate([emb_a, emb_b], axis=1).astype(np.float32)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift: x (B, N, H), shift and scale (B, H) broadcast over the N tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention as the reference DiT: separate q, k, v Linear layers (with bias), logits scaled by
    1/head_dim (not 1/sqrt(head_dim)), softmax in fp32 (``impl="math"``) or torch's fused kernel with the same scale
    (``"sdpa"``). Raises ``ValueError`` when ``hidden`` is not divisible by ``num_heads`` or ``impl`` is unknown."""

    def __init__(self, hidden: int, num_heads: int, impl: str = "math"):
        super().__init__()
        if hidden % num_heads != 0:
            raise ValueError(f"hidden_size={hidden} not divisible by num_heads={num_heads}")
        if impl not in ("math", "sdpa"):
            raise ValueError(f"attn_impl={impl!r}: expected 'math' or 'sdpa'")
        self.num_heads, self.head_dim, self.impl = num_heads, hidden // num_heads, impl
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens x (B, N, H) -> (B, N, H)."""
        B, N, H = x.shape
        shape = (B, N, self.num_heads, self.head_dim)
        q = self.q(x).reshape(shape).transpose(1, 2)
        k = self.k(x).reshape(shape).transpose(1, 2)
        v = self.v(x).reshape(shape).transpose(1, 2)
        scale = 1.0 / self.head_dim  # reference: q / head_dim (not sqrt)
        if self.impl == "sdpa":
            # fused kernels accumulate the softmax in fp32 internally
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        else:
            logits = torch.matmul(q * scale, k.transpose(-1, -2)).float()
            attn = torch.softmax(logits, dim=-1).to(v.dtype)
            out = torch.matmul(attn, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, H))


class Mlp(nn.Module):
    """Transformer MLP: Linear(hidden, mlp_hidden) -> GELU (tanh approximation) -> Linear(mlp_hidden, hidden)."""

    def __init__(self, hidden: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden)

    def forward(self, x):
        """x (B, N, H) -> (B, N, H)."""
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """A DiT block with adaLN: LayerNorm (no affine, eps 1e-6) -> modulate -> attention / MLP, each residual branch
    gated; shift, scale and gate for both branches come from Linear(SiLU(c)) (6 H values per row)."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, attn_impl: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads, attn_impl)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.adaLN = nn.Linear(hidden, 6 * hidden)

    def forward(self, x, c):
        """Tokens x (B, N, H) and conditioning c (B, H) -> (B, N, H)."""
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN(F.silu(c)).chunk(6, dim=-1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh1, sc1))
        x = x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh2, sc2))
        return x


class FinalLayer(nn.Module):
    """Final adaLN LayerNorm + Linear mapping each token to a p x p x C_out patch (both zero-initialised by
    :meth:`DiT.reset_parameters`, so a fresh DiT outputs zeros)."""

    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Linear(hidden, 2 * hidden)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)

    def forward(self, x, c):
        """Tokens x (B, N, H), conditioning c (B, H) -> patches (B, N, p * p * C_out)."""
        shift, scale = self.adaLN(F.silu(c)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer with a step-level embedder: ``forward(x_t, t, d_level, cond)``.

    Args:
        input_size: spatial size (int, or (H, W)) of x (latent or pixel).
        in_channels: channels of x; the output has the same number.
        num_classes: number of real classes; label ``num_classes`` is the null (unconditional) label.
            Unconditional data uses ``num_classes=1`` with every label set to the null label, as the reference.
        attn_impl: "math" (explicit fp32 softmax) or "sdpa" (torch fused attention, same scaling).
    """

    def __init__(
        self,
        input_size=32,
        in_channels: int = 4,
        num_classes: int = 1000,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        patch_size: int = 2,
        mlp_ratio: float = 4.0,
        attn_impl: str = "math",
        t_scale: float = 1.0,
        level_scale: float = 1.0,
        freq_dim: int = 256,
        step_input: str = "level",
    ):
        super().__init__()
        if step_input not in ("level", "continuous"):
            raise ValueError(f"DiT: step_input={step_input!r}: expected 'level' or 'continuous'")
        # continuous: d_level is the step size d in [0, 1], embedded at t's scale (same parameters)
        self.step_input, self._d_mult = (
            step_input,
            (float(t_scale) / float(level_scale)) if step_input == "continuous" else 1.0,
        )
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.input_size = tuple(int(s) for s in input_size)
        if any(s % patch_size for s in self.input_size):
            raise ValueError(f"input_size={self.input_size} not divisible by patch_size={patch_size}")
        self.in_channels = self.out_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.hidden_size, self.patch_size = int(hidden_size), int(patch_size)
        self.grid = (self.input_size[0] // patch_size, self.input_size[1] // patch_size)

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_dim=freq_dim, scale=t_scale)
        self.d_embedder = TimestepEmbedder(hidden_size, freq_dim=freq_dim, scale=level_scale)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)
        self.register_buffer(
            "pos_embed",
            torch.from_numpy(sincos_pos_embed_2d(hidden_size, *self.grid)).unsqueeze(0),
            persistent=False,
        )
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, attn_impl) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference initialisation: every Linear xavier-uniform with zero bias (the blocks' adaLN included), the
        patch embedding xavier-uniform as a flattened Linear, the t / level embedders' Linear layers normal(0.02), the
        label table normal(0.02), and the final layer's adaLN and output Linear zero."""
        H, p, C = self.hidden_size, self.patch_size, self.in_channels
        # every Linear: xavier uniform over (fan_in, fan_out), zero bias (blocks' adaLN included)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                _xavier_uniform_(m.weight, m.in_features, m.out_features)
                nn.init.zeros_(m.bias)
        _xavier_uniform_(self.x_embedder.weight, p * p * C, H)
        nn.init.zeros_(self.x_embedder.bias)
        for emb in (self.t_embedder, self.d_embedder):
            for m in emb.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        for m in (self.final_layer.adaLN, self.final_layer.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, gh * gw, p * p * C) -> image (B, C, gh * p, gw * p) (row-major token order)."""
        B = x.shape[0]
        gh, gw = self.grid
        p, C = self.patch_size, self.out_channels
        x = x.reshape(B, gh, gw, p, p, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, gh * p, gw * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, d_level: torch.Tensor, cond=None) -> torch.Tensor:
        """Predict the velocity for x_t (B, C, H, W) at time t (B,) in [0, 1], step input ``d_level`` (B,) (the level
        log2(1/d) in 0..7, or the step size d in [0, 1] with ``step_input="continuous"``) and class labels ``cond`` (B,)
        long (None: the null label ``num_classes``). Scalars broadcast over the batch. Returns (B, C, H, W) in x's
        dtype. Raises ``ValueError`` when x's shape is not (B, in_channels, *input_size)."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, *self.input_size):
            raise ValueError(
                f"DiT expects x of shape (B, {self.in_channels}, {self.input_size[0]}, {self.input_size[1]}), "
                f"got {tuple(x.shape)}"
            )
        B = x.shape[0]
        if cond is None:  # unconditional call: the null label
            cond = torch.full((B,), self.num_classes, dtype=torch.long, device=x.device)
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1).expand(B)
        d_level = torch.as_tensor(d_level, device=x.device, dtype=torch.float32).reshape(-1).expand(B) * self._d_mult
        cond = cond.reshape(-1).long()
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(cond) + self.d_embedder(d_level)
        for blk in self.blocks:
            h = blk(h, c)
        h = self.final_layer(h, c)
        return self.unpatchify(h).to(x.dtype)


def dit_preset(name: str, **kw) -> DiT:
    """``dit_preset("B", input_size=32, in_channels=4, num_classes=1000)``; names S, B, L, XL, tiny (patch 2)."""
    key = name.upper().split("/")[0] if name.lower() != "tiny" else "tiny"
    if key not in PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}: expected one of {sorted(PRESETS)}")
    return DiT(**{**PRESETS[key], "patch_size": 2, **kw})


def count_params(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``module``."""
    return sum(p.numel() for p in module.parameters())
