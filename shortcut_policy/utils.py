"""Small helpers shared across the package (no package-internal imports: everything may import this)."""
from __future__ import annotations

import copy
import importlib

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf


def to_plain(cfg):
    """OmegaConf containers -> plain python dict/list (resolved); anything else is deep-copied, so callers may
    mutate the result without touching the caller's config."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return copy.deepcopy(cfg)


def cfg_get(cfg, key, default=None):
    """``cfg[key]`` for a dict / DictConfig / attribute object; ``default`` when missing or None."""
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        v = cfg.get(key, default)
    else:
        v = getattr(cfg, key, default)
    return default if v is None else v


def check_int(name: str, value, minimum: int | None = None) -> int:
    """An integer config value, or a clear error naming it (floats like 1e5 are accepted when integral)."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name}={value!r}: expected an integer")
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"{name}={value!r}: expected an integer") from None
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name}={value!r}: expected an integer")
        value = int(value)
    if not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}={value!r}: expected an integer")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value}: expected an integer >= {minimum}")
    return int(value)


def import_attr(spec: str):
    """``"package.module:attr"`` (``attr`` may be dotted, e.g. ``Class.method``) -> the object."""
    module, _, attr = str(spec).partition(":")
    if not module or not attr:
        raise ValueError(f"{spec!r}: expected 'module:attribute'")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
