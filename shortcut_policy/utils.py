"""Small helpers shared across the package."""
from __future__ import annotations

import copy


def to_plain(cfg):
    """OmegaConf containers -> plain python dict/list (resolved); anything else is deep-copied, so callers may
    mutate the result without touching the caller's config."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return copy.deepcopy(cfg)
