"""Data: zarr ReplayBuffer (Diffusion Policy layout, zarr 3), windows, splits, normalizers, datasets.

Import submodules directly (``shortcut_policy.datasets.replay_buffer`` ...). The names below are also
available from this package, imported lazily so that ``replay_buffer`` alone does not pull in torch/numba.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LinearNormalizer": "normalizer",
    "NormalizerError": "normalizer",
    "SingleFieldLinearNormalizer": "normalizer",
    "PUSHT_OBS_TYPES": "pusht",
    "PushTDataset": "pusht",
    "ReplayBuffer": "replay_buffer",
    "ReplayBufferError": "replay_buffer",
    "SequenceSampler": "sampler",
    "create_indices": "sampler",
    "downsample_mask": "sampler",
    "get_val_mask": "sampler",
    "SequenceDataset": "zarr_dataset",
    "parse_source": "zarr_dataset",
    "DataSanityError": "sanity",
    "DataSanityWarning": "sanity",
    "SanityReport": "sanity",
    "check_dataset": "sanity",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
