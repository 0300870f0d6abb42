"""Image crop augmentation as in Diffusion Policy / robomimic's CropRandomizer.

Training: an independent random crop for every image (every frame of every sample); evaluation: the centre
crop. Images are tensors shaped (..., C, H, W) with any leading dims.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["random_crop", "center_crop", "CropRandomizer"]


def _crop_hw(images: torch.Tensor, crop_shape: Sequence[int]) -> tuple[int, int, int, int]:
    """(crop height, crop width, H, W) for images (..., C, H, W); ``ValueError`` when the images have fewer than 3
    dims or the crop does not fit."""
    if images.ndim < 3:
        raise ValueError(f"images must be shaped (..., C, H, W), got {tuple(images.shape)}")
    ch, cw = (int(v) for v in crop_shape)
    H, W = images.shape[-2], images.shape[-1]
    if not (0 < ch <= H and 0 < cw <= W):
        raise ValueError(f"crop_shape {(ch, cw)} does not fit images of size {(H, W)}")
    return ch, cw, H, W


def center_crop(images: torch.Tensor, crop_shape: Sequence[int]) -> torch.Tensor:
    """The centre ``crop_shape`` = (ch, cw) window of images (..., C, H, W) -> (..., C, ch, cw) (a view; top-left
    offset ((H - ch) // 2, (W - cw) // 2)). Raises ``ValueError`` when the crop does not fit."""
    ch, cw, H, W = _crop_hw(images, crop_shape)
    top, left = (H - ch) // 2, (W - cw) // 2
    return images[..., top : top + ch, left : left + cw]


def random_crop(
    images: torch.Tensor, crop_shape: Sequence[int], generator: torch.Generator | None = None
) -> torch.Tensor:
    """An independent uniformly random crop (offsets in [0, H-ch] x [0, W-cw]) for every image."""
    ch, cw, H, W = _crop_hw(images, crop_shape)
    lead, (C,) = images.shape[:-3], images.shape[-3:-2]
    flat = images.reshape(-1, C, H, W)
    B = flat.shape[0]
    dev = images.device
    top = torch.randint(0, H - ch + 1, (B,), generator=generator, device="cpu").to(dev)
    left = torch.randint(0, W - cw + 1, (B,), generator=generator, device="cpu").to(dev)
    rows = (top[:, None] + torch.arange(ch, device=dev)[None, :])[:, :, None]  # (B, ch, 1)
    cols = (left[:, None] + torch.arange(cw, device=dev)[None, :])[:, None, :]  # (B, 1, cw)
    b = torch.arange(B, device=dev)[:, None, None]
    out = flat.permute(0, 2, 3, 1)[b, rows, cols]  # (B, ch, cw, C)
    return out.permute(0, 3, 1, 2).reshape(*lead, C, ch, cw)


class CropRandomizer(nn.Module):
    """Random crop in ``train()`` mode, centre crop in ``eval()`` mode (no parameters)."""

    def __init__(self, crop_shape: Sequence[int]):
        super().__init__()
        self.crop_shape = tuple(int(v) for v in crop_shape)
        if len(self.crop_shape) != 2:
            raise ValueError(f"crop_shape must be (height, width), got {crop_shape!r}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (..., C, H, W) -> (..., C, ch, cw): a random crop per image in training mode, the centre crop in
        evaluation mode."""
        if self.training:
            return random_crop(images, self.crop_shape)
        return center_crop(images, self.crop_shape)

    def extra_repr(self) -> str:
        """``crop_shape=(ch, cw)`` in the module's repr."""
        return f"crop_shape={self.crop_shape}"
