"""Networks. Contract for every net: net(x_t, t, d_level, cond) -> tensor shaped like x_t."""
from __future__ import annotations


def build_net(net_cfg, **dims):
    """Instantiate a net from a configs/net/*.yaml group entry; `dims` fill task-dependent sizes."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(net_cfg, resolve=True) if not isinstance(net_cfg, dict) else dict(net_cfg)
    kind = cfg.pop("kind")
    cfg.pop("name", None)
    cfg.update({k: v for k, v in dims.items() if v is not None})
    if kind == "unet1d":
        from .unet1d import UNet1D

        return UNet1D(**cfg)
    if kind == "dit":
        from .dit import DiT

        return DiT(**cfg)
    if kind == "mlp":
        from .mlp import MLPNet

        return MLPNet(**cfg)
    raise ValueError(f"unknown net kind {kind!r}: expected one of unet1d, dit, mlp")
