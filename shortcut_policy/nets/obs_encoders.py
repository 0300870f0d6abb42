"""Observation encoders: low-dim keys pass through; each camera gets a ResNet18 (GroupNorm, trained from
scratch, written here: torchvision is unusable on CPU-only machines) + SpatialSoftmax(32 keypoints) +
Linear(64) + ReLU, as robomimic / Diffusion Policy. Random crop in training, centre crop in eval."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

from shortcut_policy.conventions import N_OBS_STEPS

from .augment import ColorJitter, CropRandomizer


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs, identity or 1x1 projection shortcut) with GroupNorm(C/16) in place of
    BatchNorm, as Diffusion Policy's ``replace_bn_with_gn``."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        gn = lambda c: nn.GroupNorm(max(1, c // 16), c)  # noqa: E731  (DP: BatchNorm -> GroupNorm(C/16))
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), gn(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), gn(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), gn(cout))

    def forward(self, x):
        """Feature map (B, cin, H, W) -> (B, cout, H / stride, W / stride)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet18Conv(nn.Module):
    """ResNet18 without avgpool/fc: (B, 3, H, W) -> (B, 512, H/32, W/32). GroupNorm with width // 16 groups
    (Diffusion Policy's BatchNorm replacement), so ``width`` must be a positive multiple of 16 (ValueError)."""

    def __init__(self, in_channels: int = 3, width: int = 64):
        super().__init__()
        w = int(width)
        if w < 16 or w % 16:
            raise ValueError(
                f"task.encoder.resnet_width={width}: expected a positive multiple of 16 (GroupNorm uses width // 16 "
                "groups of 16 channels; Diffusion Policy's ResNet18 is 64)"
            )
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, w, 7, 2, 3, bias=False), nn.GroupNorm(w // 16, w), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        layers, cin = [], w
        for i, cout in enumerate([w, 2 * w, 4 * w, 8 * w]):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.out_channels = cin

    def forward(self, x):
        """Images (B, C, H, W) -> feature map (B, 8 * width, H/32, W/32)."""
        return self.layers(self.stem(x))


class SpatialSoftmax(nn.Module):
    """1x1 conv to K keypoint maps, softmax over space, expected (x, y) per keypoint -> (B, 2K)."""

    def __init__(self, in_channels: int, num_kp: int = 32, temperature: float = 1.0):
        super().__init__()
        self.kp = nn.Conv2d(in_channels, num_kp, 1)
        self.temperature = temperature

    def forward(self, feat):
        """Feature map (B, C, H, W) -> keypoints (B, 2K): per keypoint map the softmax-weighted mean (x, y) in
        [-1, 1] image coordinates (Levine et al. 2016; robomimic's SpatialSoftmax)."""
        B, _, H, W = feat.shape
        h = self.kp(feat).flatten(2) / self.temperature
        attn = torch.softmax(h, dim=-1)
        ys, xs = torch.meshgrid(
            torch.linspace(-1, 1, H, device=feat.device), torch.linspace(-1, 1, W, device=feat.device), indexing="ij"
        )
        ex = (attn * xs.reshape(1, 1, -1)).sum(-1)
        ey = (attn * ys.reshape(1, 1, -1)).sum(-1)
        return torch.stack([ex, ey], -1).flatten(1)


class ImageEncoder(nn.Module):
    """One camera's encoder (Diffusion Policy's robomimic ResNet18 variant): random crop in training / centre crop in
    eval (``crop_shape``; None = no crop), optional colour jitter in training (``color_jitter`` = {brightness,
    contrast, saturation} strengths), ResNet18 trunk with GroupNorm, spatial softmax over ``num_kp`` keypoints,
    Linear to ``feature_dim``, ReLU."""

    def __init__(
        self,
        image_shape: Sequence[int],
        crop_shape: Sequence[int] | None = None,
        feature_dim: int = 64,
        num_kp: int = 32,
        width: int = 64,
        color_jitter: Mapping[str, float] | None = None,
    ):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.crop = CropRandomizer(crop_shape) if crop_shape else nn.Identity()
        self.jitter = ColorJitter(**dict(color_jitter)) if color_jitter else nn.Identity()
        self.backbone = ResNet18Conv(self.image_shape[0], width)
        self.pool = SpatialSoftmax(self.backbone.out_channels, num_kp)
        self.proj = nn.Linear(2 * num_kp, feature_dim)
        self.feature_dim = feature_dim

    def forward(self, img):  # (B, C, H, W) in the normaliser's [-1, 1]
        """Images (B, C, H, W) in the normaliser's [-1, 1] -> features (B, feature_dim)."""
        return F.relu(self.proj(self.pool(self.backbone(self.crop(self.jitter(img))))))


class ObsEncoder(nn.Module):
    """Encodes the first To steps of a normalised observation dict into the flat global condition.

    Per step: [image features per camera (in `image_keys` order), low-dim keys (in `lowdim_keys` order)], or the
    features in `obs_order` (every key once; Diffusion Policy concatenates in its shape_meta order, which may
    interleave cameras and low-dim keys); steps concatenated (To major), as Diffusion Policy. Raises ``ValueError``
    for a key without a shape, an `obs_order` that is not a permutation of the keys, a ``crop_shape`` larger than
    an image, or ``share_encoder`` with cameras of different shapes. ``share_encoder``: one image encoder for all
    cameras (default: one per camera, as Diffusion Policy); ``color_jitter``: training-time colour jitter strengths
    (see :class:`.augment.ColorJitter`).
    """

    def __init__(
        self,
        obs_shapes: Mapping[str, Sequence[int]],
        lowdim_keys: Sequence[str] = (),
        image_keys: Sequence[str] = (),
        n_obs_steps: int = N_OBS_STEPS,
        crop_shape=None,
        feature_dim: int = 64,
        resnet_width: int = 64,
        num_kp: int = 32,
        obs_order: Sequence[str] | None = None,
        share_encoder: bool = False,
        color_jitter: Mapping[str, float] | None = None,
    ):
        super().__init__()
        self.obs_shapes = {k: tuple(v) for k, v in obs_shapes.items()}
        self.lowdim_keys, self.image_keys, self.n_obs_steps = list(lowdim_keys), list(image_keys), int(n_obs_steps)
        missing = [k for k in self.lowdim_keys + self.image_keys if k not in self.obs_shapes]
        if missing:
            raise ValueError(f"observation keys {missing} have no entry in obs_shapes {sorted(self.obs_shapes)}")
        keys = self.image_keys + self.lowdim_keys
        self.obs_order = list(obs_order) if obs_order else keys
        if sorted(self.obs_order) != sorted(keys):
            raise ValueError(f"obs_order {self.obs_order} must list every observation key {keys} once")
        self.share_encoder = bool(share_encoder)

        def make(k):
            return ImageEncoder(
                self.obs_shapes[k],
                crop_shape,
                feature_dim,
                num_kp=num_kp,
                width=resnet_width,
                color_jitter=color_jitter,
            )

        if crop_shape:
            for k in self.image_keys:
                shp = self.obs_shapes[k]
                if len(shp) != 3 or int(crop_shape[0]) > shp[1] or int(crop_shape[1]) > shp[2]:
                    raise ValueError(
                        f"task.crop_shape={list(crop_shape)} does not fit image {k!r} of shape {list(shp)} (C, H, W): "
                        "the crop must be at most the image's height and width"
                    )
        if self.share_encoder and self.image_keys:
            shapes = {k: self.obs_shapes[k] for k in self.image_keys}
            if len(set(shapes.values())) > 1:
                raise ValueError(f"encoder.share=true needs cameras of one image shape, got {shapes}")
            shared = make(self.image_keys[0])  # one trunk for every camera (robomimic's share option)
            self.cams = nn.ModuleDict({k: shared for k in self.image_keys})
        else:
            self.cams = nn.ModuleDict({k: make(k) for k in self.image_keys})  # one per camera (Diffusion Policy)
        per_step = sum(feature_dim for _ in self.image_keys) + sum(
            int(torch.tensor(self.obs_shapes[k]).prod()) for k in self.lowdim_keys
        )
        self.out_dim = per_step * self.n_obs_steps

    def forward(self, nobs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Normalised observations {key: (B, T >= To, ...)} -> global condition (B, out_dim); only the first
        ``n_obs_steps`` (To) steps are used."""
        feats = []
        for k in self.obs_order:
            x = nobs[k][:, : self.n_obs_steps]
            if k in self.cams:
                f = self.cams[k](rearrange(x, "b t c h w -> (b t) c h w"))
                feats.append(rearrange(f, "(b t) d -> b t d", b=x.shape[0]))
            else:
                feats.append(x.reshape(x.shape[0], x.shape[1], -1))
        return torch.cat(feats, dim=-1).flatten(1)
