"""Image augmentation of the observation encoder (beside the encoder that uses it, :mod:`.obs_encoders`).

- Crop, as Diffusion Policy / robomimic's CropRandomizer: training draws an independent random crop for every image
  (every frame of every sample); evaluation takes the centre crop.
- Colour jitter (training only; an option Diffusion Policy's real-robot configs enable through torchvision): random
  brightness, contrast and saturation factors per image, uniform in [1 - s, 1 + s], applied in [0, 1] pixel units
  (the encoder's normalised [-1, 1] input is mapped there and back) and clamped to the valid range.
Images are tensors shaped (..., C, H, W) with any leading dims.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["random_crop", "center_crop", "CropRandomizer", "ColorJitter"]


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


class ColorJitter(nn.Module):
    """Random brightness / contrast / saturation in ``train()`` mode, identity in ``eval()`` mode (no parameters).

    Input and output: images (..., C, H, W) in the normaliser's [-1, 1] range. Each strength s in [0, 1) draws a
    factor uniform in [1 - s, 1 + s] per image: brightness scales the pixels, contrast scales the distance to the
    image's mean grey level, saturation the distance to each pixel's grey value (RGB only; ignored for C != 3). The
    result is clamped to [-1, 1]. Raises ``ValueError`` for a strength outside [0, 1).
    """

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0):
        super().__init__()
        for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not 0.0 <= float(v) < 1.0:
                raise ValueError(f"color_jitter.{name}={v!r}: expected a strength in [0, 1)")
        self.brightness, self.contrast, self.saturation = float(brightness), float(contrast), float(saturation)

    def _factor(self, n: int, s: float, device) -> torch.Tensor:
        return (
            (1.0 + s * (2.0 * torch.rand(n, 1, 1, 1, device=device) - 1.0))
            if s
            else torch.ones(n, 1, 1, 1, device=device)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (..., C, H, W) in [-1, 1] -> jittered images of the same shape (training) or the input (eval)."""
        if not self.training or not (self.brightness or self.contrast or self.saturation):
            return images
        shape = images.shape
        x = (images.reshape(-1, *shape[-3:]) + 1.0) / 2.0  # [0, 1]
        n, dev = x.shape[0], x.device
        x = x * self._factor(n, self.brightness, dev)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = mean + (x - mean) * self._factor(n, self.contrast, dev)
        if x.shape[1] == 3 and self.saturation:
            grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
            x = grey + (x - grey) * self._factor(n, self.saturation, dev)
        return (x.clamp(0.0, 1.0) * 2.0 - 1.0).reshape(shape)

    def extra_repr(self) -> str:
        """The three strengths in the module's repr."""
        return f"brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation}"
