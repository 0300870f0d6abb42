"""Networks. Contract for every net: net(x_t, t, d_level, cond) -> tensor shaped like x_t."""

from __future__ import annotations

from omegaconf import OmegaConf

from .dit import DiT
from .mlp import MLPNet
from .unet1d import UNet1D

# the config key of each net kind's time scale (what t is multiplied by before the sinusoid)
TIME_SCALE_KEY = {"unet1d": "time_scale", "mlp": "time_scale", "dit": "t_scale"}


def build_net(
    net_cfg,
    *,
    step_input: str = "level",
    use_step_size: bool | None = None,
    time_scale: float | None = None,
    **dims,
):
    """Instantiate a net from a configs/net/*.yaml group entry; `dims` fill task-dependent sizes.

    `step_input` is what the objective feeds as the third argument: "level" (dyadic log2(1/d)) or "continuous"
    (the step size d, MeanFlow). A net config that sets `step_input` to something else raises ValueError.
    `use_step_size` (the objective's ``uses_step_size``) decides ``use_step_size: auto`` in the config (no step-size
    branch for objectives that do not use a step size; True when not given); an explicit true/false in the config is
    kept. `time_scale` (the objective's ``net_time_scale``), when not None, replaces the net's time scale.
    """
    cfg = OmegaConf.to_container(net_cfg, resolve=True) if not isinstance(net_cfg, dict) else dict(net_cfg)
    kind = cfg.pop("kind")
    cfg.pop("name", None)
    if cfg.get("use_step_size") in ("auto", None) and "use_step_size" in cfg:
        cfg["use_step_size"] = True if use_step_size is None else bool(use_step_size)
    if time_scale is not None and kind in TIME_SCALE_KEY:
        cfg[TIME_SCALE_KEY[kind]] = float(time_scale)
    asked = cfg.pop("step_input", None)
    if asked not in (None, "auto", step_input):
        raise ValueError(
            f"net.step_input={asked!r}, but the objective feeds a {step_input!r} step-size input "
            "(objective=meanflow needs 'continuous'; the others 'level'); drop the override or pick another objective"
        )
    cfg["step_input"] = step_input
    cfg.update({k: v for k, v in dims.items() if v is not None})
    if kind == "unet1d":
        return UNet1D(**cfg)
    if kind == "dit":
        return DiT(**cfg)
    if kind == "mlp":
        return MLPNet(**cfg)
    raise ValueError(f"unknown net kind {kind!r}: expected one of unet1d, dit, mlp")
