"""Rewrite a module's layers into elementary ops so that an ONNX graph of it runs in float64 in onnxruntime.

onnxruntime's CPU provider has float64 kernels for MatMul, Add, Mul, Pad, Slice, Reshape, ReduceMean, Sqrt, Exp,
Log, Tanh, Sin, Cos and the like, but none for ``Conv``, ``ConvTranspose``, ``Softplus`` or ``Mish`` (checked with
onnxruntime 1.2x: "Could not find an implementation for Conv(11) node ... tensor(double)"). ``lower_module`` returns a
deep copy of a module in which

* ``nn.Conv1d``          -> ``MatmulConv1d``         (im2col: the K strided slices stacked, one matmul),
* ``nn.ConvTranspose1d`` -> ``MatmulConvTranspose1d`` (zero insertion, padding, then the flipped kernel as a conv),
* ``nn.GroupNorm``       -> ``ElementaryGroupNorm``   (mean / biased variance over each group, like PyTorch),
* ``nn.Mish``            -> ``ElementaryMish``        (x * tanh(log(1 + exp(x))), linear above x = 20),

each computing the same function as the layer it replaces (tests check this to 1e-12 in float64). The other layers
used by the policy nets (Linear, SiLU, the sinusoidal embeddings, the normaliser's affine maps) already export to
ops with float64 kernels. Used by ``shortcut-policy export precision=float64``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def conv1d_as_matmul(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1, dilation: int = 1
) -> torch.Tensor:
    """A valid (unpadded) 1-d convolution as im2col + one matmul: the K strided slices of ``x`` (B, C, L) stacked
    on the channel axis (B, K*C, L_out), times ``weight`` (O, C, K) reshaped to (O, K*C); plus ``bias`` (O,).
    Returns (B, O, L_out), L_out = (L - dilation (K - 1) - 1) // stride + 1, as ``F.conv1d``."""
    K = weight.shape[-1]
    n_out = (x.shape[-1] - dilation * (K - 1) - 1) // stride + 1
    cols = torch.cat(
        [x[:, :, k * dilation : k * dilation + stride * (n_out - 1) + 1 : stride] for k in range(K)], dim=1
    )
    y = torch.matmul(weight.permute(0, 2, 1).reshape(weight.shape[0], -1), cols)
    return y if bias is None else y + bias[:, None]


class MatmulConv1d(nn.Module):
    """nn.Conv1d (groups=1, zero padding) as one matmul on the K strided slices of the padded input (im2col)."""

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"lowering: unsupported {conv} (only groups=1, numeric zero padding)")
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)  # (O, C, K)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.stride, self.pad, self.dil = conv.stride[0], conv.padding[0], conv.dilation[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, L) -> (B, O, L_out)
        """(B, C, L) -> (B, O, L_out), as the Conv1d it replaces."""
        if self.pad:
            x = F.pad(x, (self.pad, self.pad))
        return conv1d_as_matmul(x, self.weight, self.bias, self.stride, self.dil)


class MatmulConvTranspose1d(nn.Module):
    """nn.ConvTranspose1d (groups=1, dilation 1) as zero insertion + padding + a stride-1 conv, kernel flipped."""

    def __init__(self, conv: nn.ConvTranspose1d):
        super().__init__()
        if conv.groups != 1 or conv.dilation[0] != 1:
            raise ValueError(f"lowering: unsupported {conv} (only groups=1, dilation=1)")
        w = conv.weight.detach().clone()  # (C_in, O, K)
        self.weight = nn.Parameter(w.flip(-1).transpose(0, 1).contiguous(), requires_grad=False)  # (O, C_in, K)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.stride, self.pad, self.out_pad = conv.stride[0], conv.padding[0], conv.output_padding[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, L) -> (B, O, (L - 1) stride - 2 padding + K + output_padding), as the ConvTranspose1d it replaces."""
        B, C, L = x.shape
        s, K = self.stride, self.weight.shape[-1]
        if s > 1:  # (B, C, L) -> (B, C, (L - 1) * s + 1) with s - 1 zeros between samples
            x = torch.cat([x[..., None], x.new_zeros(B, C, L, s - 1)], dim=-1).reshape(B, C, L * s)[
                ..., : (L - 1) * s + 1
            ]
        lo = K - 1 - self.pad
        x = F.pad(x, (lo, lo + self.out_pad))
        return conv1d_as_matmul(x, self.weight, self.bias)  # stride 1 with the flipped kernel


class ElementaryGroupNorm(nn.Module):
    """nn.GroupNorm from mean, subtraction, square, sqrt and division (biased variance over each group, affine
    per channel), ops with float64 kernels in onnxruntime."""

    def __init__(self, gn: nn.GroupNorm):
        super().__init__()
        self.groups, self.eps = gn.num_groups, gn.eps
        self.weight = None if gn.weight is None else nn.Parameter(gn.weight.detach().clone(), requires_grad=False)
        self.bias = None if gn.bias is None else nn.Parameter(gn.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, ...) -> (B, C, ...), as the GroupNorm it replaces."""
        shape = x.shape
        g = x.reshape(shape[0], self.groups, -1)
        mean = g.mean(dim=-1, keepdim=True)
        c = g - mean
        var = (c * c).mean(dim=-1, keepdim=True)
        y = (c / torch.sqrt(var + self.eps)).reshape(shape)
        extra = (1,) * (len(shape) - 2)
        if self.weight is not None:
            y = y * self.weight.reshape(-1, *extra)
        if self.bias is not None:
            y = y + self.bias.reshape(-1, *extra)
        return y


class ElementaryMish(nn.Module):
    """x * tanh(softplus(x)) with softplus = log(1 + exp(x)), and x itself above 20 (PyTorch's softplus threshold)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise Mish of x (any shape)."""
        sp = torch.where(x > 20.0, x, torch.log(1.0 + torch.exp(torch.clamp(x, max=20.0))))
        return x * torch.tanh(sp)


_RULES = (
    (nn.ConvTranspose1d, MatmulConvTranspose1d),
    (nn.Conv1d, MatmulConv1d),
    (nn.GroupNorm, ElementaryGroupNorm),
    (nn.Mish, lambda m: ElementaryMish()),
)
_UNSUPPORTED = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Softplus, nn.BatchNorm1d, nn.BatchNorm2d)


def lower_module(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with Conv1d / ConvTranspose1d / GroupNorm / Mish replaced (see the module doc).
    Raises ValueError naming the first submodule that has no float64 lowering (e.g. an image encoder's Conv2d)."""
    out = copy.deepcopy(module)
    for name, m in out.named_modules():
        if isinstance(m, _UNSUPPORTED):
            raise ValueError(
                f"precision=float64: submodule {name!r} ({type(m).__name__}) has no float64 lowering; "
                "export low-dim policies in float64, or use precision=float32"
            )

    def swap(parent: nn.Module) -> None:
        for child_name, child in parent.named_children():
            for cls, make in _RULES:
                if isinstance(child, cls):
                    setattr(parent, child_name, make(child))
                    break
            else:
                swap(child)

    swap(out)
    return out


__all__ = ["lower_module", "MatmulConv1d", "MatmulConvTranspose1d", "ElementaryGroupNorm", "ElementaryMish"]
