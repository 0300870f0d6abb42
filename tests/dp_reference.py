"""A reference of Diffusion Policy's U-Net policies for the import tests, written here from its architecture (no code
of Diffusion Policy or robomimic is imported or copied): modules named as Diffusion Policy's, so their state dicts
have its exact key names, and its inference (normalise, encode the first To steps, the scheduler loop from Gaussian
noise, the executed slice from To - 1).

- :class:`DPUnet` — ConditionalUnet1D: step encoder Sequential(SinusoidalPosEmb, Linear, Mish, Linear); residual
  blocks with ``blocks.{0,1}.block`` (Conv1d, GroupNorm, Mish), FiLM ``cond_encoder.1`` (scale first, then bias),
  ``residual_conv``; ``Downsample1d.conv`` / ``Upsample1d.conv``; ``final_conv`` = (Conv1dBlock, Conv1d).
- :class:`DPNormalizer` — LinearNormalizer's ``params_dict.<field>.{scale, offset, input_stats.*}``.
- :class:`VisualCore` — robomimic's: ``backbone`` (ResNet18Conv: torchvision ResNet18's children in ``nets``,
  BatchNorm replaced by GroupNorm(C/16)), ``pool`` (SpatialSoftmax: ``nets`` 1x1 conv, buffers temperature, pos_x,
  pos_y), ``nets`` = Sequential(backbone, pool, Flatten, Linear); the encoder applies ReLU after it.
- :class:`DPLowdimPolicy`, :class:`DPHybridPolicy` — the policies' attribute layout (``_dummy_variable``,
  ``mask_generator._dummy_variable``, ``model``, ``normalizer``, ``obs_encoder.obs_nets.<key>``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        half = self.dim // 2
        step = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=x.device) * -step)
        arg = x[:, None] * freqs[None, :]
        return torch.cat([arg.sin(), arg.cos()], dim=-1)


class Conv1dBlock(nn.Module):
    def __init__(self, cin, cout, k, n_groups=8):
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(cin, cout, k, padding=k // 2), nn.GroupNorm(n_groups, cout), nn.Mish())

    def forward(self, x):
        return self.block(x)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, cond_dim, k, n_groups, cond_predict_scale):
        super().__init__()
        self.blocks = nn.ModuleList([Conv1dBlock(cin, cout, k, n_groups), Conv1dBlock(cout, cout, k, n_groups)])
        self.out_channels, self.cond_predict_scale = cout, cond_predict_scale
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * cout if cond_predict_scale else cout))
        self.residual_conv = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, cond):
        out = self.blocks[0](x)
        embed = self.cond_encoder(cond)[..., None]
        if self.cond_predict_scale:
            embed = embed.reshape(embed.shape[0], 2, self.out_channels, 1)
            out = embed[:, 0] * out + embed[:, 1]
        else:
            out = out + embed
        return self.blocks[1](out) + self.residual_conv(x)


class Downsample1d(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x):
        return self.conv(x)


class Upsample1d(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x):
        return self.conv(x)


class DPUnet(nn.Module):
    def __init__(self, input_dim, global_cond_dim, dsed, down_dims, kernel_size=5, n_groups=8, cps=True):
        super().__init__()
        self.diffusion_step_encoder = nn.Sequential(
            SinusoidalPosEmb(dsed), nn.Linear(dsed, 4 * dsed), nn.Mish(), nn.Linear(4 * dsed, dsed)
        )
        cond_dim = dsed + global_cond_dim
        dims = [input_dim] + list(down_dims)
        in_out = list(zip(dims[:-1], dims[1:]))

        def rb(a, b):
            return ResBlock(a, b, cond_dim, kernel_size, n_groups, cps)

        self.mid_modules = nn.ModuleList([rb(dims[-1], dims[-1]), rb(dims[-1], dims[-1])])
        self.down_modules = nn.ModuleList(
            nn.ModuleList([rb(a, b), rb(b, b), Downsample1d(b) if i < len(in_out) - 1 else nn.Identity()])
            for i, (a, b) in enumerate(in_out)
        )
        self.up_modules = nn.ModuleList(
            nn.ModuleList([rb(b * 2, a), rb(a, a), Upsample1d(a)]) for a, b in reversed(in_out[1:])
        )
        self.final_conv = nn.Sequential(
            Conv1dBlock(dims[1], dims[1], kernel_size, n_groups), nn.Conv1d(dims[1], input_dim, 1)
        )

    def forward(self, sample, timestep, global_cond):
        x = sample.moveaxis(-1, -2)
        t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], dtype=torch.long)
        t = (t[None] if t.dim() == 0 else t).expand(x.shape[0])
        feat = torch.cat([self.diffusion_step_encoder(t), global_cond], dim=-1)
        skips = []
        for r1, r2, down in self.down_modules:
            x = r2(r1(x, feat), feat)
            skips.append(x)
            x = down(x)
        for m in self.mid_modules:
            x = m(x, feat)
        for r1, r2, up in self.up_modules:
            x = up(r2(r1(torch.cat([x, skips.pop()], dim=1), feat), feat))
        return self.final_conv(x).moveaxis(-1, -2)


class DPNormalizer(nn.Module):
    """fields: {name: (scale, offset, {min, max, mean, std})}."""

    def __init__(self, fields):
        super().__init__()
        self.params_dict = nn.ParameterDict()
        for name, (scale, offset, stats) in fields.items():
            p = lambda v: nn.Parameter(torch.as_tensor(v, dtype=torch.float32), requires_grad=False)  # noqa: E731
            self.params_dict[name] = nn.ParameterDict(
                {
                    "scale": p(scale),
                    "offset": p(offset),
                    "input_stats": nn.ParameterDict({k: p(v) for k, v in stats.items()}),
                }
            )

    def normalize(self, key, x):
        scale, offset = self.params_dict[key]["scale"], self.params_dict[key]["offset"]
        shape = x.shape
        return (x.reshape(-1, scale.shape[0]) * scale + offset).reshape(shape)

    def unnormalize(self, key, x):
        scale, offset = self.params_dict[key]["scale"], self.params_dict[key]["offset"]
        shape = x.shape
        return ((x.reshape(-1, scale.shape[0]) - offset) / scale).reshape(shape)


def limits_field(data: torch.Tensor):
    """Diffusion Policy's 'limits' fit of (N, D) data to [-1, 1] (range_eps 1e-4)."""
    lo, hi = data.min(0).values, data.max(0).values
    rng = hi - lo
    ignore = rng < 1e-4
    rng = torch.where(ignore, torch.full_like(rng, 2.0), rng)
    scale = 2.0 / rng
    offset = torch.where(ignore, -lo, -1.0 - scale * lo)
    stats = {"min": lo, "max": hi, "mean": data.mean(0), "std": data.std(0)}
    return scale, offset, stats


def image_field():
    return [2.0], [-1.0], {"min": [0.0], "max": [1.0], "mean": [0.5], "std": [math.sqrt(1 / 12)]}


class _Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self._dummy_variable = nn.Parameter()


class DPLowdimPolicy(nn.Module):
    def __init__(self, obs_dim, action_dim, To, unet_kw, norm_fields):
        super().__init__()
        self._dummy_variable = nn.Parameter()
        self.model = DPUnet(action_dim, obs_dim * To, **unet_kw)
        self.mask_generator = _Holder()
        self.normalizer = DPNormalizer(norm_fields)
        self.To = To

    def global_cond(self, obs: dict):
        nobs = self.normalizer.normalize("obs", obs["obs"])
        return nobs[:, : self.To].reshape(nobs.shape[0], -1)


# --- robomimic's encoder with torchvision's ResNet18 layout
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        gn = lambda c: nn.GroupNorm(c // 16, c)  # noqa: E731
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), gn(cout)
        self.relu = nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), gn(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), gn(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18Conv(nn.Module):
    def __init__(self):
        super().__init__()
        layers = []
        cin = 64
        for i, cout in enumerate([64, 128, 256, 512]):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.nets = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.GroupNorm(4, 64), nn.ReLU(), nn.MaxPool2d(3, 2, 1), *layers
        )

    def forward(self, x):
        return self.nets(x)


class SpatialSoftmax(nn.Module):
    def __init__(self, c, h, w, num_kp):
        super().__init__()
        self.nets = nn.Conv2d(c, num_kp, 1)
        self.h, self.w, self.k = h, w, num_kp
        self.register_buffer("temperature", torch.ones(1))
        px, py = np.meshgrid(np.linspace(-1.0, 1.0, w), np.linspace(-1.0, 1.0, h))
        self.register_buffer("pos_x", torch.from_numpy(px.reshape(1, h * w)).float())
        self.register_buffer("pos_y", torch.from_numpy(py.reshape(1, h * w)).float())

    def forward(self, x):
        f = self.nets(x).reshape(-1, self.h * self.w)
        att = F.softmax(f / self.temperature, dim=-1)
        ex = torch.sum(self.pos_x * att, dim=1, keepdim=True)
        ey = torch.sum(self.pos_y * att, dim=1, keepdim=True)
        return torch.cat([ex, ey], 1).view(-1, self.k, 2)


class VisualCore(nn.Module):
    def __init__(self, crop_hw, num_kp=32, feature_dim=64):
        super().__init__()
        h, w = (math.ceil(s / 32) for s in crop_hw)
        self.backbone = ResNet18Conv()
        self.pool = SpatialSoftmax(512, h, w, num_kp)
        self.nets = nn.Sequential(self.backbone, self.pool, nn.Flatten(1), nn.Linear(2 * num_kp, feature_dim))

    def forward(self, x):
        return self.nets(x)


class ObsEncoder(nn.Module):
    def __init__(self, shape_meta_obs: dict, crop):
        super().__init__()
        self.meta, self.crop = shape_meta_obs, crop
        self.obs_nets = nn.ModuleDict(
            {k: (VisualCore(crop) if v.get("type") == "rgb" else None) for k, v in shape_meta_obs.items()}
        )

    def forward(self, obs: dict):
        feats = []
        for k, v in self.meta.items():
            x = obs[k]
            if v.get("type") == "rgb":
                H, W = x.shape[-2:]
                top, left = int(round((H - self.crop[0]) / 2.0)), int(round((W - self.crop[1]) / 2.0))
                x = x[..., top : top + self.crop[0], left : left + self.crop[1]]  # eval-fixed (centre) crop
                x = F.relu(self.obs_nets[k](x))
            feats.append(x.flatten(1))
        return torch.cat(feats, dim=-1)


class DPHybridPolicy(nn.Module):
    def __init__(self, shape_meta_obs, action_dim, To, crop, unet_kw, norm_fields):
        super().__init__()
        self._dummy_variable = nn.Parameter()
        self.obs_encoder = ObsEncoder(shape_meta_obs, crop)
        feat = sum(64 if v.get("type") == "rgb" else int(np.prod(v["shape"])) for v in shape_meta_obs.values())
        self.model = DPUnet(action_dim, feat * To, **unet_kw)
        self.mask_generator = _Holder()
        self.normalizer = DPNormalizer(norm_fields)
        self.To = To

    def global_cond(self, obs: dict):
        nobs = {k: self.normalizer.normalize(k, v) for k, v in obs.items()}
        B = next(iter(nobs.values())).shape[0]
        flat = {k: v[:, : self.To].reshape(-1, *v.shape[2:]) for k, v in nobs.items()}
        return self.obs_encoder(flat).reshape(B, -1)


@torch.no_grad()
def dp_sample(policy, obs: dict, scheduler, num_inference_steps: int, horizon: int, action_dim: int, generator):
    """Diffusion Policy's conditional_sample: noise, then the scheduler loop; returns the normalised (B, T, Da)."""
    cond = policy.global_cond(obs)
    traj = torch.randn(size=(cond.shape[0], horizon, action_dim), generator=generator)
    scheduler.set_timesteps(num_inference_steps)
    for t in scheduler.timesteps:
        out = policy.model(traj, t, global_cond=cond)
        traj = scheduler.step(out, t, traj, generator=generator).prev_sample
    return traj
