"""Affine per-field normalizers (Diffusion Policy semantics) as torch modules that live in a state_dict.

``y = x * scale + offset`` with ``scale``/``offset`` shaped (D,) over the LAST dim of x (or (1,), broadcast
over everything, for the fixed image mode). Works on torch tensors of any leading shape; numpy input is
converted to torch.

Modes (``fit(..., mode=...)``):

* ``"limits"`` (DP default): per last-dim feature, [min, max] -> [output_min, output_max] = [-1, 1];
  a feature whose range is < ``range_eps`` (1e-4) gets scale 1 and offset (output_min+output_max)/2 - min,
  i.e. it is only centred.
* ``"identity"``: scale 1, offset 0 (delta actions, rot6d, quaternions).
* ``"image"``: fixed x * 2 - 1 for images already in [0, 1] (data values are not read).
* ``"max_abs"``: robomimic low-dim obs: ONE scalar scale 1/max|x| over all features (filled per feature), offset 0.
* ``"gaussian"``: (x - mean) / std per feature (std < range_eps -> 1).
* ``[[mode, width], ...]``: consecutive groups of last-dim features, each with its own mode.

State dict layout is Diffusion Policy's: ``params_dict.<field>.{scale, offset, input_stats.{min,max,mean,std}}``
(persistent buffers, not parameters: they never reach an optimizer). A freshly constructed
``LinearNormalizer()`` loads any such state_dict (fields and shapes are created while loading), so a policy
can be rebuilt from a checkpoint before anything is fit.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
from torch import nn

__all__ = ["SingleFieldLinearNormalizer", "LinearNormalizer", "NormalizerError", "MODES"]

MODES = ("limits", "identity", "image", "max_abs", "gaussian")
DEFAULT_KEY = "_default"
_STAT_NAMES = ("min", "max", "mean", "std")


class NormalizerError(ValueError):
    """A normaliser cannot be fit, loaded or applied (unknown mode, non-finite or empty data, a field that was not
    fit, a feature count that does not match). A ``ValueError``."""

    pass


def _as_tensor(x) -> torch.Tensor:
    """A torch tensor for ``x`` (returned as is) or for an array-like (contiguous NumPy copy, then shared memory)."""
    if isinstance(x, torch.Tensor):
        return x
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x)))


class _ResizingBuffers(nn.Module):
    """Buffers whose shapes are taken from the incoming state_dict on load."""

    _names: tuple[str, ...] = ()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Re-create each buffer listed in ``_names`` with the shape and dtype of the incoming state_dict entry before
        the usual load, so an empty (unfit) normaliser can load fitted parameters."""
        for name in self._names:
            key = prefix + name
            if key in state_dict:
                src = state_dict[key]
                cur = self._buffers.get(name)
                if cur is None or tuple(cur.shape) != tuple(src.shape) or cur.dtype != src.dtype:
                    device = cur.device if cur is not None else src.device
                    self._buffers[name] = torch.empty(src.shape, dtype=src.dtype, device=device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class _InputStats(_ResizingBuffers):
    """Per-feature statistics of the data a field was fit on (``min``, ``max``, ``mean``, ``std``, each (D,)), kept as
    buffers so that they travel with checkpoints."""

    _names = _STAT_NAMES

    def __init__(self):
        super().__init__()
        for n in _STAT_NAMES:
            self.register_buffer(n, torch.zeros(0))


class SingleFieldLinearNormalizer(_ResizingBuffers):
    """One field: ``normalize(x) = x * scale + offset``. Build with a ``create_*`` classmethod."""

    _names = ("scale", "offset")

    def __init__(
        self, scale=None, offset=None, input_stats: Mapping[str, object] | None = None, mode: str | None = None
    ):
        super().__init__()
        self.mode = mode  # informative only; not part of the state_dict
        self.register_buffer(
            "scale", torch.zeros(0) if scale is None else _as_tensor(scale).to(torch.float32).reshape(-1).clone()
        )
        self.register_buffer(
            "offset", torch.zeros(0) if offset is None else _as_tensor(offset).to(torch.float32).reshape(-1).clone()
        )
        if self.scale.shape != self.offset.shape:
            raise NormalizerError(
                f"scale {tuple(self.scale.shape)} and offset {tuple(self.offset.shape)} differ in shape"
            )
        self.input_stats = _InputStats()
        for n, v in (input_stats or {}).items():
            if n not in _STAT_NAMES:
                raise NormalizerError(f"unknown input stat {n!r}; expected {_STAT_NAMES}")
            setattr(self.input_stats, n, _as_tensor(v).to(torch.float32).reshape(-1).clone())

    # ------------------------------------------------------------------ construction
    @classmethod
    def create_manual(cls, scale, offset, input_stats: Mapping[str, object] | None = None, mode: str = "manual"):
        """A field with the given ``scale`` and ``offset`` (array-likes of the same length D, or 1 to broadcast)."""
        return cls(scale, offset, input_stats, mode=mode)

    @classmethod
    def create_identity(cls, dim: int = 1, input_stats=None):
        """A field that leaves ``dim`` features unchanged (scale 1, offset 0)."""
        return cls(torch.ones(dim), torch.zeros(dim), input_stats, mode="identity")

    @classmethod
    def create_image(cls):
        """Fixed [0, 1] -> [-1, 1] for images (x * 2 - 1), broadcast over any shape."""
        stats = {"min": [0.0], "max": [1.0], "mean": [0.5], "std": [math.sqrt(1.0 / 12.0)]}
        return cls(torch.tensor([2.0]), torch.tensor([-1.0]), stats, mode="image")

    @classmethod
    def create_fit(
        cls,
        data,
        mode="limits",
        output_min: float = -1.0,
        output_max: float = 1.0,
        range_eps: float = 1e-4,
        name: str = DEFAULT_KEY,
    ) -> "SingleFieldLinearNormalizer":
        """Fit a field on ``data`` (..., D) (NumPy or torch; flattened to rows of D features).

        Modes (Diffusion Policy's ``LinearNormalizer`` conventions): "limits" maps each feature's [min, max] to
        [output_min, output_max] (a feature whose range is below ``range_eps`` is only centred); "identity";
        "image" (fixed [0, 1] -> [-1, 1]); "max_abs" divides every feature by the largest absolute value; "gaussian"
        standardises each feature (std below ``range_eps`` counts as 1). A list of [mode, width] pairs fits
        consecutive feature groups with their own modes. Raises :class:`NormalizerError` for an unknown mode, empty,
        scalar, non-numeric or non-finite data."""
        if not isinstance(mode, str):
            return cls._create_fit_segments(data, mode, output_min, output_max, range_eps, name)
        if mode not in MODES:
            raise NormalizerError(f"field {name!r}: unknown normalizer mode {mode!r}; expected one of {MODES}")
        if mode == "image":
            return cls.create_image()
        x = _as_tensor(data)
        if x.ndim == 0 or x.numel() == 0:
            raise NormalizerError(f"field {name!r}: cannot fit on empty or scalar data (shape {tuple(x.shape)})")
        if not (
            x.is_floating_point()
            or x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)
        ):
            raise NormalizerError(f"field {name!r}: cannot fit on dtype {x.dtype}")
        x = x.detach().to("cpu", torch.float32).reshape(-1, x.shape[-1])
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            bad = (~finite).nonzero()[0].tolist()
            raise NormalizerError(
                f"field {name!r}: data to fit contains {int((~finite).sum())} non-finite values (NaN/inf); "
                f"first at flattened row {bad[0]}, feature {bad[1]}"
            )
        stats = {
            "min": x.min(dim=0).values,
            "max": x.max(dim=0).values,
            "mean": x.double().mean(dim=0).float(),
            "std": x.double().std(dim=0, unbiased=False).float(),
        }
        D = x.shape[-1]
        if mode == "identity":
            scale, offset = torch.ones(D), torch.zeros(D)
        elif mode == "limits":
            in_range = stats["max"] - stats["min"]
            ignore = in_range < range_eps
            in_range = torch.where(ignore, torch.full_like(in_range, output_max - output_min), in_range)
            scale = (output_max - output_min) / in_range
            offset = output_min - scale * stats["min"]
            offset = torch.where(ignore, (output_max + output_min) / 2 - stats["min"], offset)
        elif mode == "max_abs":
            max_abs = float(torch.maximum(stats["max"].max(), stats["min"].abs().max()))
            s = 1.0 / max_abs if max_abs >= range_eps else 1.0
            scale, offset = torch.full((D,), s), torch.zeros(D)
        else:  # gaussian
            std = torch.where(stats["std"] < range_eps, torch.ones_like(stats["std"]), stats["std"])
            scale = 1.0 / std
            offset = -stats["mean"] * scale
        return cls(scale, offset, stats, mode=mode)

    @classmethod
    def _create_fit_segments(cls, data, segments, output_min, output_max, range_eps, name):
        """``mode=[["limits", 3], ["identity", 7], ...]``: consecutive last-dim feature groups fit with
        their own mode (e.g. abs dual-arm actions: positions in limits, rot6d + gripper identity)."""
        try:
            segs = [(str(m), int(w)) for m, w in segments]
        except (TypeError, ValueError):
            raise NormalizerError(
                f"field {name!r}: mode {segments!r} is neither a mode name {MODES} nor a list of [mode, width] pairs"
            ) from None
        x = _as_tensor(data)
        D = x.shape[-1] if x.ndim else 0
        if sum(w for _, w in segs) != D or any(w <= 0 for _, w in segs):
            raise NormalizerError(
                f"field {name!r}: segment widths {[w for _, w in segs]} do not sum to the last dim {D}"
            )
        if any(m == "image" for m, _ in segs):
            raise NormalizerError(f"field {name!r}: 'image' mode cannot be used in a segment list")
        parts, start = [], 0
        for m, w in segs:
            parts.append(
                cls.create_fit(
                    x[..., start : start + w], m, output_min, output_max, range_eps, f"{name}[{start}:{start + w}]"
                )
            )
            start += w
        stats = {n: torch.cat([getattr(p.input_stats, n) for p in parts]) for n in _STAT_NAMES}
        scale, offset = torch.cat([p.scale for p in parts]), torch.cat([p.offset for p in parts])
        return cls(scale, offset, stats, mode="+".join(f"{m}:{w}" for m, w in segs))

    # ------------------------------------------------------------------ use
    @property
    def is_fitted(self) -> bool:
        return self.scale.numel() > 0

    def _params_for(self, x: torch.Tensor, name: str):
        """(scale, offset) on x's device and dtype, checked against x's last dim (``name`` labels errors); raises
        :class:`NormalizerError` when the field is unfit or the feature count differs."""
        if not self.is_fitted:
            raise NormalizerError(f"normalizer field {name!r} has no parameters (not fit and not loaded)")
        n = self.scale.shape[0]
        if n != 1 and (x.ndim == 0 or x.shape[-1] != n):
            raise NormalizerError(
                f"normalizer field {name!r} was fit on {n} features (last dim), got a tensor of shape {tuple(x.shape)}"
            )
        return self.scale.to(device=x.device, dtype=x.dtype), self.offset.to(device=x.device, dtype=x.dtype)

    @staticmethod
    def _prep(x) -> torch.Tensor:
        """x as a tensor, converted to float32 unless it is already floating point."""
        x = _as_tensor(x)
        return x if x.is_floating_point() else x.to(torch.float32)

    def normalize(self, x, name: str = DEFAULT_KEY) -> torch.Tensor:
        """x (..., D) in data units -> x * scale + offset (normalised units, [-1, 1] for "limits")."""
        x = self._prep(x)
        scale, offset = self._params_for(x, name)
        return x * scale + offset

    def unnormalize(self, x, name: str = DEFAULT_KEY) -> torch.Tensor:
        """x (..., D) in normalised units -> (x - offset) / scale (data units)."""
        x = self._prep(x)
        scale, offset = self._params_for(x, name)
        return (x - offset) / scale

    def forward(self, x):
        """Same as :meth:`normalize`."""
        return self.normalize(x)

    def get_input_stats(self) -> dict[str, torch.Tensor]:
        """{"min", "max", "mean", "std"} of the data the field was fit on, each (D,)."""
        return {n: getattr(self.input_stats, n) for n in _STAT_NAMES}

    def extra_repr(self) -> str:
        """``mode=..., dim=D`` in the module's repr."""
        return f"mode={self.mode}, dim={self.scale.numel()}"


class LinearNormalizer(nn.Module):
    """Dict of per-field normalizers. ``normalize({"obs": ..., "action": ...})`` or ``normalize(tensor)``
    (uses the field fit from a bare array, ``"_default"``)."""

    def __init__(self):
        super().__init__()
        self.params_dict = nn.ModuleDict()

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        data,
        mode: str | Mapping[str, str] = "limits",
        output_min: float = -1.0,
        output_max: float = 1.0,
        range_eps: float = 1e-4,
    ) -> "LinearNormalizer":
        """Fit (or refit) fields from ``{key: array}`` (or one array -> field ``"_default"``).
        ``mode`` is one mode for all fields or ``{key: mode}``; other existing fields are kept."""
        items = dict(data) if isinstance(data, Mapping) else {DEFAULT_KEY: data}
        if isinstance(mode, Mapping):
            unknown = [k for k in mode if k not in items]
            if unknown:
                raise NormalizerError(f"mode given for field(s) {unknown} that are not in the data {sorted(items)}")
        for key, value in items.items():
            m = mode.get(key, "limits") if isinstance(mode, Mapping) else mode
            self[key] = SingleFieldLinearNormalizer.create_fit(
                value, mode=m, output_min=output_min, output_max=output_max, range_eps=range_eps, name=key
            )
        return self

    # ------------------------------------------------------------------ fields
    def __setitem__(self, key: str, value: SingleFieldLinearNormalizer) -> None:
        if not isinstance(value, SingleFieldLinearNormalizer):
            raise TypeError(
                f"normalizer field {key!r}: expected a SingleFieldLinearNormalizer, got {type(value).__name__}"
            )
        if not isinstance(key, str) or not key or "." in key:
            raise NormalizerError(f"invalid normalizer field name {key!r} (non-empty, no '.')")
        self.params_dict[key] = value

    def __getitem__(self, key: str) -> SingleFieldLinearNormalizer:
        if key not in self.params_dict:
            raise NormalizerError(
                f"normalizer field {key!r} was not fit; fitted fields: {sorted(self.params_dict.keys())}"
            )
        return self.params_dict[key]

    def __contains__(self, key: str) -> bool:
        return key in self.params_dict

    def keys(self) -> list[str]:
        """Names of the fitted (or loaded) fields."""
        return list(self.params_dict.keys())

    # ------------------------------------------------------------------ use
    def _map(self, x, forward: bool):
        """Apply every field of a dict (nested dicts key by key) or the default field of a bare array."""
        if isinstance(x, Mapping):
            return {k: self._apply_field(k, v, forward) for k, v in x.items()}
        return self._apply_field(DEFAULT_KEY, x, forward)

    def _apply_field(self, key, x, forward: bool):
        """Normalise (``forward``) or unnormalise ``x`` with the field ``key``; nested dicts recurse key by key."""
        if isinstance(x, Mapping):  # nested dicts (e.g. {"obs": {...}}) are normalized key by key
            return {k: self._apply_field(k, v, forward) for k, v in x.items()}
        field = self[key]
        return field.normalize(x, key) if forward else field.unnormalize(x, key)

    def normalize(self, x):
        """{key: (..., D_key)} (or one array for the default field) in data units -> the same structure in
        normalised units. Raises :class:`NormalizerError` for a field that was not fit."""
        return self._map(x, True)

    def unnormalize(self, x):
        """Inverse of :meth:`normalize`: normalised units -> data units, same structure."""
        return self._map(x, False)

    def forward(self, x):
        """Same as :meth:`normalize`."""
        return self.normalize(x)

    def get_input_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """{field: {"min", "max", "mean", "std"}} of the data each field was fit on."""
        return {k: f.get_input_stats() for k, f in self.params_dict.items()}

    # ------------------------------------------------------------------ loading
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Create an empty field for every field name in the incoming state_dict, then load (so a fresh
        ``LinearNormalizer`` loads any checkpoint's normaliser)."""
        head = prefix + "params_dict."
        for key in state_dict:
            if key.startswith(head):
                field = key[len(head) :].split(".", 1)[0]
                if field and field not in self.params_dict:
                    self.params_dict[field] = SingleFieldLinearNormalizer()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> "LinearNormalizer":
        """Build from a normalizer state_dict (or a larger one, e.g. a policy's, with ``prefix='normalizer.'``)."""
        sub = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not sub:
            raise NormalizerError(f"no normalizer entries with prefix {prefix!r} in the state_dict")
        n = cls()
        n.load_state_dict(sub)
        return n
