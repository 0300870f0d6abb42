"""Diffusion Policy checkpoints (Chi et al., real-stanford/diffusion_policy) read safely and converted into this
project's :class:`~shortcut_policy.policy.Policy` (the ``import`` verb: :mod:`shortcut_policy.commands.import_`).

A Diffusion Policy ``*.ckpt`` is ``torch.save({"cfg": <OmegaConf DictConfig of the run>, "state_dicts": {"model",
"ema_model", "optimizer", ...}, "pickles": {name: dill.dumps(attribute)}}, pickle_module=dill)``
(``BaseWorkspace.save_checkpoint``). :func:`read_dp_checkpoint` unpickles it with a restricted unpickler that
resolves only omegaconf's config classes, builtin containers and scalars, ``collections``, ``typing.Any``, dill's
builtin-type lookup (answered here, dill is not needed) and torch's tensor / storage rebuild functions (torch's own
``weights_only`` allowlist). Any other class (Diffusion Policy's, numpy's, ...) is never imported: it becomes an
inert placeholder, and the entry holding it is refused (``cfg``, the policy weights) or skipped with a note. The
``pickles`` entry holds dill byte strings: they are never unpickled.

:func:`inspect_dp` checks that the run is one this project can reproduce exactly (the U-Net low-dim policy or the
U-Net hybrid-image policy, FiLM global conditioning, a DDPM / DDIM scheduler the diffusion objective runs) and
returns its settings; :func:`convert_dp` maps the weights onto a Policy built from a composed config of this
project (the task of the same name), loads them strictly and returns the checkpoint payload to write.

Weight mapping (checked strictly: every tensor used, every parameter filled):

* ``model.*`` (ConditionalUnet1D) -> ``net.*`` (UNet1D without the step-size branch): ``diffusion_step_encoder.{1,3}``
  -> ``time_embed.mlp.{0,2}``, the ``.block.`` of Conv1dBlock dropped, ``{down,up}_modules.i.2.conv`` ->
  ``{down,up}_modules.i.2``;
* ``normalizer.params_dict.<field>.*`` -> ``normalizer.params_dict.<field>.*`` (same layout);
* ``obs_encoder.obs_nets.<camera>.*`` (robomimic VisualCore: torchvision ResNet18 children ``nets.0..7`` with
  GroupNorm, SpatialSoftmax ``pool.nets``, Linear ``nets.3``) -> ``obs_encoder.cams.<camera>.{backbone,pool,proj}``.
"""

from __future__ import annotations

import io
import pickle
import re
import types
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .datasets.normalizer import LinearNormalizer
from .policy import build_policy

__all__ = [
    "DPImportError",
    "DPCheckpoint",
    "DPSpec",
    "SUPPORTED_POLICIES",
    "read_dp_checkpoint",
    "inspect_dp",
    "convert_dp",
]

LOWDIM = "diffusion_policy.policy.diffusion_unet_lowdim_policy.DiffusionUnetLowdimPolicy"
HYBRID = "diffusion_policy.policy.diffusion_unet_hybrid_image_policy.DiffusionUnetHybridImagePolicy"
SUPPORTED_POLICIES = {LOWDIM: "lowdim", HYBRID: "hybrid_image"}


class DPImportError(ValueError):
    """A file cannot be imported as a Diffusion Policy checkpoint: the message names what was found and why."""

    user_error = True  # the CLI prints the message as it is


# ---------------------------------------------------------------------------------------------------------------
# restricted unpickling
class _Refused:
    """Placeholder for a class or function the restricted unpickler does not import: accepts whatever unpickling
    does with it (call, __new__, state, list / dict items) and records nothing else."""

    refused_name = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def append(self, item):
        """Accept a list item (APPEND opcodes on a refused object)."""

    def extend(self, items):
        """Accept list items (APPENDS opcodes on a refused object)."""

    def __setitem__(self, key, value):
        pass

    def __repr__(self):
        return f"<not loaded: {self.refused_name}>"


def _refused_class(name: str) -> type:
    """A fresh :class:`_Refused` subclass standing for the global ``name`` (module.qualname)."""
    return type("Refused", (_Refused,), {"refused_name": name})


# dill writes builtin types as dill._dill._load_type(<name>); answered here for these names only (dill's current and
# older spellings)
_BUILTIN_TYPES = {
    t.__name__: t
    for t in (dict, list, tuple, set, frozenset, str, bytes, bytearray, int, float, complex, bool, object, type, slice)
}
_BUILTIN_TYPES.update(
    {
        "NoneType": type(None),
        "DictType": dict,
        "ListType": list,
        "TupleType": tuple,
        "TypeType": type,
        "ObjectType": object,
        "StringType": str,
        "UnicodeType": str,
        "IntType": int,
        "LongType": int,
        "FloatType": float,
        "BooleanType": bool,
        "ComplexType": complex,
        "SetType": set,
        "FrozenSetType": frozenset,
        "BytesType": bytes,
        "ByteArrayType": bytearray,
    }
)


def _safe_globals() -> dict:
    """{"module.name": object} the restricted unpickler resolves: torch's weights_only allowlist (tensor and storage
    rebuilding, dtypes, devices), builtin containers and scalars, collections, copyreg's reconstructor, typing.Any,
    _codecs.encode (protocol-2 bytes)."""
    import builtins
    import copyreg
    import typing
    from codecs import encode

    allowed = {}
    try:  # torch's own list for weights_only loading (private, so guarded)
        from torch import _weights_only_unpickler as wou

        allowed.update(wou._get_allowed_globals())
    except Exception:  # noqa: BLE001 - fall back to the rebuild functions by name
        for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"):
            if hasattr(torch._utils, name):
                allowed[f"torch._utils.{name}"] = getattr(torch._utils, name)
        allowed["torch.nn.parameter.Parameter"] = torch.nn.Parameter
    for t in (dict, list, tuple, set, frozenset, str, bytes, bytearray, int, float, complex, bool, object, slice):
        allowed[f"builtins.{t.__name__}"] = t
    allowed["builtins.NoneType"] = type(None)
    allowed["__builtin__.set"] = builtins.set  # protocol-2 files from Python 2 spell the module so
    allowed.update(
        {
            "collections.OrderedDict": OrderedDict,
            "collections.defaultdict": defaultdict,
            "copyreg._reconstructor": copyreg._reconstructor,
            "typing.Any": typing.Any,
            "_codecs.encode": encode,
        }
    )
    return allowed


def _omegaconf_class(module: str, name: str):
    """omegaconf's config containers, nodes and metadata classes (nothing else from omegaconf), or None."""
    if module not in ("omegaconf.dictconfig", "omegaconf.listconfig", "omegaconf.base", "omegaconf.nodes"):
        return None
    import importlib

    from omegaconf.base import Metadata, Node

    obj = getattr(importlib.import_module(module), name, None)
    if isinstance(obj, type) and issubclass(obj, (Node, Metadata)):
        return obj
    return None


def _restricted_pickle_module(refused: list):
    """A module-like object for ``torch.load(pickle_module=...)`` whose Unpickler resolves only :func:`_safe_globals`
    and omegaconf's classes; every other global is replaced by a placeholder and its name appended to ``refused``."""
    allowed = _safe_globals()

    class RestrictedUnpickler(pickle.Unpickler):
        """pickle.Unpickler that imports nothing outside the allowlist (see the module docstring)."""

        def find_class(self, module, name):
            key = f"{module}.{name}"
            if key in allowed:
                return allowed[key]
            if module == "dill._dill" and name == "_load_type":
                return _load_builtin_type
            cls = _omegaconf_class(module, name)
            if cls is not None:
                return cls
            refused.append(key)
            if module.startswith("dill.") and name in ("_create_type", "_create_class", "_load_type"):
                return _refused_type_factory(key)  # a class pickled by value: a placeholder class for it
            return _refused_class(key)

    def load(f, **kw):
        return RestrictedUnpickler(f, **kw).load()

    mod = types.ModuleType("shortcut_policy_restricted_pickle")
    mod.Unpickler, mod.load, mod.loads = RestrictedUnpickler, load, lambda b, **kw: load(io.BytesIO(b), **kw)
    mod.__name__ = "shortcut_policy_restricted_pickle"
    return mod


def _refused_type_factory(key: str):
    """For dill's class-building functions (a class pickled by value): a function returning a placeholder class named
    after the class it would build (dill's ``_create_type(metaclass, name, bases, namespace)``), so that instances of
    it unpickle into placeholders too."""

    def make(*args, **kwargs):
        name = args[1] if len(args) > 1 and isinstance(args[1], str) else "?"
        return _refused_class(f"{key}({name!r})")

    return make


def _load_builtin_type(name):
    """dill's ``_load_type`` for builtin types only; anything else stays a placeholder."""
    t = _BUILTIN_TYPES.get(name)
    return t if t is not None else _refused_class(f"dill._dill._load_type({name!r})")


def _refused_inside(obj, limit: int = 200_000) -> list[str]:
    """Names of the placeholders (refused globals) reachable from ``obj`` through containers and object __dict__s."""
    found, seen, stack = [], set(), [obj]
    while stack and len(seen) < limit:
        x = stack.pop()
        if isinstance(x, (str, bytes, int, float, bool, type(None), torch.Tensor)) or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, type) and issubclass(x, _Refused):
            found.append(x.refused_name)
            continue
        if isinstance(x, _Refused):
            found.append(type(x).refused_name)
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
        d = getattr(x, "__dict__", None)
        if isinstance(d, dict):
            stack.extend(d.values())
    return sorted(set(found))


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class DPCheckpoint:
    """What :func:`read_dp_checkpoint` read: the run's config as plain containers (resolved), the state dicts of
    the workspace (``model``, ``ema_model``, ...; entries that could not be read safely are absent) and notes on what
    was skipped."""

    path: Path
    cfg: dict
    state_dicts: dict
    skipped: list = field(default_factory=list)


def read_dp_checkpoint(path) -> DPCheckpoint:
    """Read a Diffusion Policy checkpoint safely (restricted unpickler; ``pickles`` never unpickled).

    Raises ``FileNotFoundError`` for a missing file and :class:`DPImportError` when the file is not a torch
    checkpoint, not a Diffusion Policy workspace payload (naming what was found), or when its ``cfg`` or policy
    weights would need a class the restricted unpickler does not import (naming the entry and the class)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint={path}: no such file")
    refused: list[str] = []
    try:
        payload = torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module(refused)
        )
    except Exception as e:  # noqa: BLE001 - any failure to parse is a bad file
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if refused:
            raise DPImportError(
                f"{path}: cannot be unpickled without {sorted(set(refused))} ({why}); the importer never imports "
                "or runs code outside omegaconf / torch / builtins, so it cannot read this file"
            ) from None
        raise DPImportError(
            f"{path}: not a readable torch checkpoint ({why}); expected a Diffusion Policy *.ckpt "
            "(torch.save of {'cfg', 'state_dicts', 'pickles'})"
        ) from None
    if not isinstance(payload, dict):
        raise DPImportError(
            f"{path}: holds a {type(payload).__name__}, not a Diffusion Policy checkpoint (a dict with 'cfg', "
            "'state_dicts', 'pickles')"
        )
    keys = sorted(str(k) for k in payload)
    if "cfg" not in payload or "state_dicts" not in payload:
        if "model" in payload and ("format_version" in payload or "ema" in payload):
            raise DPImportError(
                f"{path}: a shortcut_policy checkpoint (keys {keys}), not a Diffusion Policy one: use it directly"
            )
        raise DPImportError(
            f"{path}: a dict with keys {keys}, not a Diffusion Policy checkpoint (expected 'cfg', 'state_dicts' "
            "and 'pickles', as BaseWorkspace.save_checkpoint writes)"
        )
    bad = _refused_inside(payload["cfg"])
    if bad:
        raise DPImportError(
            f"{path}: entry 'cfg' needs {bad} to be loaded; the importer never imports code outside "
            "omegaconf / torch / builtins (it would run Diffusion Policy's or other code), so it cannot read it"
        )
    cfg = _plain_cfg(payload["cfg"], path)
    sds = payload["state_dicts"]
    if not isinstance(sds, dict):
        raise DPImportError(f"{path}: 'state_dicts' is a {type(sds).__name__}, expected a dict of state dicts")
    skipped, state_dicts = [], {}
    for name, sd in sds.items():
        bad = _refused_inside(sd)
        if bad or not isinstance(sd, dict):
            if name in ("model", "ema_model"):
                what = f"needs {bad}" if bad else f"is a {type(sd).__name__}"
                raise DPImportError(f"{path}: entry 'state_dicts.{name}' {what}; cannot read the policy weights")
            skipped.append(f"state_dicts.{name}: needs {bad}; skipped" if bad else f"state_dicts.{name}: skipped")
            continue
        state_dicts[str(name)] = sd
    if "model" not in state_dicts:
        raise DPImportError(f"{path}: 'state_dicts' has no 'model' entry (found {sorted(map(str, sds))})")
    pickles = payload.get("pickles")
    if isinstance(pickles, dict) and pickles:
        skipped.append(
            f"pickles ({', '.join(sorted(map(str, pickles)))}): dill-serialised workspace attributes, never unpickled"
        )
    for k in payload:
        if k not in ("cfg", "state_dicts", "pickles"):
            bad = _refused_inside(payload[k])
            skipped.append(f"{k}: " + (f"needs {bad}; skipped" if bad else "not used; skipped"))
    if refused and not any("needs" in s for s in skipped):
        skipped.append(f"classes not imported (in unused entries): {sorted(set(refused))}")
    return DPCheckpoint(path, cfg, state_dicts, skipped)


def _plain_cfg(cfg, path) -> dict:
    """The run's DictConfig as resolved plain containers; a cfg that does not resolve is refused (Diffusion Policy
    resolves its config before saving; its ``eval`` resolver would execute code and is not registered here)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, dict):
        return cfg
    if not isinstance(cfg, DictConfig):
        raise DPImportError(f"{path}: 'cfg' is a {type(cfg).__name__}, expected an OmegaConf DictConfig")
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # noqa: BLE001
        raise DPImportError(
            f"{path}: its cfg has interpolations that do not resolve here ({str(e).splitlines()[0]}); Diffusion "
            "Policy's train.py saves a resolved cfg: resolve it there (OmegaConf.resolve) and save again"
        ) from None


# ---------------------------------------------------------------------------------------------------------------
# what the run is, and whether it can be reproduced exactly
@dataclass
class DPSpec:
    """The settings of a supported Diffusion Policy run (from its cfg and weights), in this project's terms."""

    kind: str  # lowdim | hybrid_image
    policy_class: str
    task_name: str
    horizon: int
    n_obs_steps: int
    n_action_steps: int
    action_dim: int
    obs: dict  # key -> {"shape": [...], "type": "low_dim" | "rgb"}, in the run's feature order
    net: dict  # this project's net config
    objective: dict  # this project's objective config
    num_inference_steps: int
    crop_shape: list | None = None
    encoder: dict | None = None
    eval: dict = field(default_factory=dict)
    max_steps: int | None = None
    abs_action: bool | None = None
    notes: list = field(default_factory=list)


_LOWDIM_KEYS = {
    "_target_",
    "model",
    "noise_scheduler",
    "horizon",
    "obs_dim",
    "action_dim",
    "n_action_steps",
    "n_obs_steps",
    "num_inference_steps",
    "obs_as_local_cond",
    "obs_as_global_cond",
    "pred_action_steps_only",
    "oa_step_convention",
}
_HYBRID_KEYS = {
    "_target_",
    "shape_meta",
    "noise_scheduler",
    "horizon",
    "n_action_steps",
    "n_obs_steps",
    "num_inference_steps",
    "obs_as_global_cond",
    "crop_shape",
    "diffusion_step_embed_dim",
    "down_dims",
    "kernel_size",
    "n_groups",
    "cond_predict_scale",
    "obs_encoder_group_norm",
    "eval_fixed_crop",
}
_SCHED_KEYS = {
    "_target_",
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "variance_type",
    "clip_sample",
    "prediction_type",
    "set_alpha_to_one",
    "steps_offset",
}


def _need(d: dict, key: str, where: str):
    """``d[key]``, or a :class:`DPImportError` naming the missing ``where.key``."""
    if key not in d or d[key] is None:
        raise DPImportError(f"Diffusion Policy cfg: {where}.{key} is missing")
    return d[key]


def _objective_from_scheduler(sched: dict, num_inference_steps) -> tuple[dict, int]:
    """This project's diffusion objective config for a DDPM / DDIM scheduler config, and the number of sampling
    steps. Raises :class:`DPImportError` for a scheduler or setting the objective does not reproduce."""
    target = str(sched.get("_target_", ""))
    cls = target.rsplit(".", 1)[-1]
    if cls not in ("DDPMScheduler", "DDIMScheduler"):
        raise DPImportError(
            f"policy.noise_scheduler._target_={target!r}: only diffusers' DDPMScheduler and DDIMScheduler are supported"
        )
    unknown = sorted(set(sched) - _SCHED_KEYS)
    if unknown:
        raise DPImportError(
            f"policy.noise_scheduler: settings {unknown} are not supported (known: {sorted(_SCHED_KEYS)})"
        )
    if cls == "DDPMScheduler" and sched.get("variance_type", "fixed_small") != "fixed_small":
        raise DPImportError(
            f"policy.noise_scheduler.variance_type={sched['variance_type']!r}: only fixed_small is supported"
        )
    if cls == "DDIMScheduler":
        if not sched.get("set_alpha_to_one", True) or int(sched.get("steps_offset", 0) or 0) != 0:
            raise DPImportError(
                "policy.noise_scheduler: DDIM with set_alpha_to_one=False or steps_offset != 0 is not supported "
                f"(got set_alpha_to_one={sched.get('set_alpha_to_one')}, steps_offset={sched.get('steps_offset')})"
            )
    prediction = sched.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "sample"):
        raise DPImportError(f"policy.noise_scheduler.prediction_type={prediction!r}: expected epsilon or sample")
    K = int(sched.get("num_train_timesteps", 1000))
    obj = {
        "name": "diffusion",
        "num_train_timesteps": K,
        "beta_schedule": str(sched.get("beta_schedule", "linear")),
        "beta_start": float(sched.get("beta_start", 1e-4)),
        "beta_end": float(sched.get("beta_end", 0.02)),
        "clip_sample": bool(sched.get("clip_sample", True)),
        "prediction_type": prediction,
        "sampler": "ddim" if cls == "DDIMScheduler" else "ddpm",
        "class_dropout_prob": 0.0,
        "cfg_scale": None,
        "time_input": "step",
    }
    n = K if num_inference_steps is None else int(num_inference_steps)
    if not 1 <= n <= K:
        raise DPImportError(f"policy.num_inference_steps={n}: expected 1..{K}")
    return obj, n


def _net_from_unet(m: dict) -> dict:
    """This project's unet1d config (no step-size branch, DP's time input and sinusoid) for ConditionalUnet1D
    settings ``m``; ``_horizon_multiple`` (2^(levels - 1)) is popped by :func:`inspect_dp`."""
    down = [int(v) for v in m["down_dims"]]
    return {
        "kind": "unet1d",
        "step_embed_dim": int(m.get("diffusion_step_embed_dim", 256)),
        "down_dims": down,
        "kernel_size": int(m.get("kernel_size", 3)),
        "n_groups": int(m.get("n_groups", 8)),
        "cond_predict_scale": bool(m.get("cond_predict_scale", False)),
        "use_step_size": False,
        "time_scale": 1.0,
        "embed_freqs": "dp",
        "_horizon_multiple": 2 ** (len(down) - 1),
    }


def inspect_dp(dp: DPCheckpoint) -> DPSpec:
    """Check that ``dp`` is a run this project reproduces exactly and return its settings (:class:`DPSpec`).

    Raises :class:`DPImportError` naming the unsupported policy class (transformer, IBC, BET, the non-hybrid image
    policy, ...) or setting (inpainting / local conditioning, predicting only the executed steps, the other
    action-step convention, latency steps, BatchNorm in the image encoder, an unsupported scheduler)."""
    cfg = dp.cfg
    pol = cfg.get("policy")
    if not isinstance(pol, dict):
        raise DPImportError(f"{dp.path}: its cfg has no 'policy' section (keys {sorted(cfg)})")
    target = str(pol.get("_target_", ""))
    kind = SUPPORTED_POLICIES.get(target)
    if kind is None:
        raise DPImportError(
            f"{dp.path}: policy class {target or '<none>'} is not supported; supported: "
            f"{', '.join(s.rsplit('.', 1)[-1] for s in SUPPORTED_POLICIES)} (the U-Net low-dim and U-Net hybrid-image "
            "policies)"
        )
    task = cfg.get("task") or {}
    task_name = str(task.get("name") or cfg.get("task_name") or "")
    if int(cfg.get("n_latency_steps", 0) or 0) != 0:
        raise DPImportError(
            f"{dp.path}: n_latency_steps={cfg['n_latency_steps']}: simulated latency (dropping the first actions) "
            "is not supported"
        )
    obj, n_inf = _objective_from_scheduler(_need(pol, "noise_scheduler", "policy"), pol.get("num_inference_steps"))
    horizon, To = int(_need(pol, "horizon", "policy")), int(_need(pol, "n_obs_steps", "policy"))
    Ta = int(_need(pol, "n_action_steps", "policy"))
    notes = []
    runner = task.get("env_runner") or {}
    ev = {}
    if runner.get("test_start_seed") is not None:
        ev["seed_start"] = int(runner["test_start_seed"])
    if runner.get("n_test") is not None:
        ev["n_episodes"] = int(runner["n_test"])
    max_steps = int(runner["max_steps"]) if runner.get("max_steps") is not None else None
    abs_action = task.get("abs_action")
    if kind == "lowdim":
        extra = sorted(set(pol) - _LOWDIM_KEYS)
        if extra:
            raise DPImportError(
                f"{dp.path}: policy settings {extra} (passed to the scheduler's step by Diffusion Policy) are not "
                "supported"
            )
        if pol.get("obs_as_local_cond") or not pol.get("obs_as_global_cond", False):
            how = "local conditioning" if pol.get("obs_as_local_cond") else "inpainting (obs_as_global_cond=False)"
            raise DPImportError(
                f"{dp.path}: observations enter the U-Net by {how}; only global (FiLM) conditioning, "
                "obs_as_global_cond=True, is supported"
            )
        if pol.get("pred_action_steps_only"):
            raise DPImportError(
                f"{dp.path}: pred_action_steps_only=True is not supported (the U-Net predicts Ta steps)"
            )
        if not pol.get("oa_step_convention", False):
            raise DPImportError(
                f"{dp.path}: oa_step_convention=False (actions executed from step To) is not supported; this project "
                "executes from step To - 1, as oa_step_convention=True"
            )
        m = _need(pol, "model", "policy")
        if m.get("local_cond_dim"):
            raise DPImportError(f"{dp.path}: policy.model.local_cond_dim={m['local_cond_dim']}: not supported")
        obs_dim, action_dim = int(_need(pol, "obs_dim", "policy")), int(_need(pol, "action_dim", "policy"))
        if int(m.get("input_dim", action_dim)) != action_dim:
            raise DPImportError(f"{dp.path}: policy.model.input_dim={m['input_dim']} != action_dim {action_dim}")
        if int(m.get("global_cond_dim") or 0) != obs_dim * To:
            raise DPImportError(
                f"{dp.path}: policy.model.global_cond_dim={m.get('global_cond_dim')} != obs_dim x n_obs_steps "
                f"= {obs_dim * To}"
            )
        net = _net_from_unet(m)
        obs = {"obs": {"shape": [obs_dim], "type": "low_dim"}}
        spec = DPSpec(kind, target, task_name, horizon, To, Ta, action_dim, obs, net, obj, n_inf)
    else:
        extra = sorted(set(pol) - _HYBRID_KEYS)
        if extra:
            raise DPImportError(
                f"{dp.path}: policy settings {extra} (passed to the scheduler's step by Diffusion Policy) are not "
                "supported"
            )
        if not pol.get("obs_as_global_cond", True):
            raise DPImportError(
                f"{dp.path}: obs_as_global_cond=False (inpainting) is not supported; only global (FiLM) conditioning"
            )
        if not pol.get("obs_encoder_group_norm", False):
            raise DPImportError(
                f"{dp.path}: obs_encoder_group_norm=False (the ResNet keeps BatchNorm) is not supported; this "
                "project's encoder uses GroupNorm (C/16 groups), as obs_encoder_group_norm=True"
            )
        sm = _need(pol, "shape_meta", "policy")
        action_dim = int(_need(_need(sm, "action", "policy.shape_meta"), "shape", "policy.shape_meta.action")[0])
        obs = {}
        for key, attr in _need(sm, "obs", "policy.shape_meta").items():
            typ = (attr or {}).get("type", "low_dim")
            if typ not in ("rgb", "low_dim"):
                raise DPImportError(f"{dp.path}: observation {key!r} has type {typ!r}; supported: rgb, low_dim")
            obs[str(key)] = {"shape": [int(v) for v in attr["shape"]], "type": typ}
        crop = pol.get("crop_shape")
        crop = [int(v) for v in crop] if crop is not None else None
        if crop is not None:
            for key, o in obs.items():
                if o["type"] == "rgb" and any((s - c) % 2 for s, c in zip(o["shape"][1:], crop)):
                    raise DPImportError(
                        f"{dp.path}: crop {crop} of observation {key!r} {o['shape']}: an odd margin is centred one "
                        "pixel differently here (torchvision rounds half the margin); not supported"
                    )
            if not pol.get("eval_fixed_crop", False):
                notes.append(
                    "eval_fixed_crop=False: Diffusion Policy evaluated with random crops; this project uses the centre "
                    "crop in evaluation (as eval_fixed_crop=True)"
                )
        # the hybrid policy's own defaults for the U-Net settings its cfg leaves out
        net = _net_from_unet(
            {
                "diffusion_step_embed_dim": pol.get("diffusion_step_embed_dim", 256),
                "down_dims": pol.get("down_dims", [256, 512, 1024]),
                "kernel_size": pol.get("kernel_size", 5),
                "n_groups": pol.get("n_groups", 8),
                "cond_predict_scale": pol.get("cond_predict_scale", True),
            }
        )
        spec = DPSpec(kind, target, task_name, horizon, To, Ta, action_dim, obs, net, obj, n_inf, crop_shape=crop)
    mult = spec.net.pop("_horizon_multiple")
    if horizon % mult:
        raise DPImportError(f"{dp.path}: horizon {horizon} is not a multiple of {mult} (2^(levels - 1))")
    if To - 1 + Ta > horizon:
        raise DPImportError(f"{dp.path}: n_obs_steps - 1 + n_action_steps = {To - 1 + Ta} > horizon {horizon}")
    spec.eval, spec.max_steps, spec.abs_action, spec.notes = ev, max_steps, abs_action, notes
    return spec


# ---------------------------------------------------------------------------------------------------------------
# weights
def _unet_key(k: str) -> str:
    """A ConditionalUnet1D state-dict key (without ``model.``) -> the UNet1D key (module docstring)."""
    m = re.match(r"^diffusion_step_encoder\.(\d+)\.(.+)$", k)
    if m:
        idx = {"1": "0", "3": "2"}.get(m.group(1))
        if idx is None:
            raise DPImportError(f"model.{k}: unexpected tensor in the diffusion step encoder")
        return f"time_embed.mlp.{idx}.{m.group(2)}"
    if k.startswith("local_cond_encoder."):
        raise DPImportError(f"model.{k}: local conditioning (local_cond_encoder) is not supported")
    k = k.replace(".block.", ".")
    return re.sub(r"^(down_modules|up_modules)\.(\d+)\.2\.conv\.", r"\1.\2.2.", k)


def _resnet_key(rest: str, where: str) -> str:
    """A torchvision-ResNet18-children key (robomimic ResNet18Conv ``nets.<i>.<...>``) -> ResNet18Conv's key."""
    m = re.match(r"^(\d+)\.(.+)$", rest)
    if not m:
        raise DPImportError(f"{where}: unexpected ResNet tensor {rest!r}")
    i, tail = int(m.group(1)), m.group(2)
    if tail.endswith(("running_mean", "running_var", "num_batches_tracked")):
        raise DPImportError(f"{where}: BatchNorm statistics ({rest}): only GroupNorm encoders are supported")
    if i in (0, 1):
        return f"stem.{i}.{tail}"
    if 4 <= i <= 7:
        b = re.match(r"^(\d+)\.(.+)$", tail)
        if not b or int(b.group(1)) > 1:
            raise DPImportError(f"{where}: unexpected ResNet tensor {rest!r}")
        inner = b.group(2).replace("downsample.", "down.")
        return f"layers.{2 * (i - 4) + int(b.group(1))}.{inner}"
    raise DPImportError(f"{where}: unexpected ResNet tensor {rest!r}")


def _map_policy_state(sd: dict, spec: DPSpec, where: str) -> tuple[dict, dict]:
    """(policy state dict of this project without the normaliser, normaliser state dict) from a Diffusion Policy
    policy state dict. Raises :class:`DPImportError` for a tensor with no counterpart or two aliases that differ."""
    out, norm, alias = {}, {}, {}
    image_keys = [k for k, o in spec.obs.items() if o["type"] == "rgb"]
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise DPImportError(f"{where}: {key} is a {type(value).__name__}, not a tensor")
        if key == "_dummy_variable" or key.endswith("._dummy_variable"):
            continue
        if key.startswith("model."):
            out["net." + _unet_key(key[len("model.") :])] = value
        elif key.startswith("normalizer."):
            norm[key[len("normalizer.") :]] = value
        elif key.startswith("obs_encoder.") and spec.kind == "hybrid_image":
            m = re.match(r"^obs_encoder\.obs_nets\.([^.]+)\.(.+)$", key)
            if not m or m.group(1) not in image_keys:
                raise DPImportError(f"{where}: {key} has no counterpart (observation encoder keys: {image_keys})")
            cam, rest = m.group(1), m.group(2)
            base = f"obs_encoder.cams.{cam}."
            if rest.startswith("backbone.nets."):
                target = base + "backbone." + _resnet_key(rest[len("backbone.nets.") :], key)
            elif rest.startswith("nets.0.nets."):
                target = base + "backbone." + _resnet_key(rest[len("nets.0.nets.") :], key)
            elif rest.startswith(("pool.", "nets.1.")):
                tail = rest.split(".", 1)[1] if rest.startswith("pool.") else rest[len("nets.1.") :]
                if tail.startswith("nets."):
                    target = base + "pool.kp." + tail[len("nets.") :]
                elif tail == "temperature":
                    if not torch.allclose(value.float(), torch.ones_like(value.float())):
                        raise DPImportError(f"{where}: {key} = {value.tolist()}: only temperature 1 is supported")
                    continue
                elif tail in ("pos_x", "pos_y"):
                    continue  # the keypoint grid, recomputed (linspace(-1, 1) over the feature map)
                else:
                    raise DPImportError(f"{where}: {key} has no counterpart")
            elif rest.startswith("nets.3."):
                target = base + "proj." + rest[len("nets.3.") :]
            else:
                raise DPImportError(
                    f"{where}: {key} has no counterpart (expected a VisualCore: ResNet18Conv, SpatialSoftmax, Linear)"
                )
            if target in out:
                if not torch.equal(out[target], value):
                    raise DPImportError(f"{where}: {key} differs from its alias {alias[target]}")
                continue
            out[target], alias[target] = value, key
        else:
            raise DPImportError(f"{where}: tensor {key} has no counterpart in this project's policy")
    return out, norm


def _encoder_settings(sd: dict, spec: DPSpec, where: str) -> dict:
    """ResNet width, keypoints and feature size of the image encoders, read off the weights (all cameras alike)."""
    found = set()
    for cam in (k for k, o in spec.obs.items() if o["type"] == "rgb"):
        pre = f"obs_encoder.obs_nets.{cam}."
        w = sd.get(pre + "backbone.nets.0.weight", sd.get(pre + "nets.0.nets.0.weight"))
        kp = sd.get(pre + "pool.nets.weight", sd.get(pre + "nets.1.nets.weight"))
        lin = sd.get(pre + "nets.3.weight")
        if w is None or kp is None or lin is None:
            raise DPImportError(
                f"{where}: camera {cam!r} lacks the ResNet / SpatialSoftmax / Linear weights of a VisualCore "
                f"(looked for {pre}backbone.nets.0.weight, {pre}pool.nets.weight, {pre}nets.3.weight)"
            )
        if lin.shape[1] != 2 * kp.shape[0]:
            raise DPImportError(
                f"{where}: {pre}nets.3.weight {tuple(lin.shape)} does not follow {kp.shape[0]} keypoints"
            )
        found.add((int(w.shape[0]), int(kp.shape[0]), int(lin.shape[0])))
    if len(found) != 1:
        raise DPImportError(f"{where}: the cameras' encoders differ in size ({sorted(found)}); not supported")
    width, num_kp, feature_dim = found.pop()
    return {"resnet_width": width, "num_kp": num_kp, "feature_dim": feature_dim}


def project_task(spec: DPSpec, base_task: dict) -> dict:
    """This project's task config for the run: ``base_task`` (the project's task of the same name) with the run's
    horizon, steps, action size, crop, encoder sizes, feature order and evaluation settings. Raises
    :class:`DPImportError` naming an observation key with no counterpart or a shape that differs."""
    task = {k: v for k, v in base_task.items()}
    shapes = {k: list(v) for k, v in (task.get("obs_shapes") or {}).items()}
    img_keys, low_keys = list(task.get("image_keys") or []), list(task.get("lowdim_keys") or [])
    name = task.get("name")
    for key, o in spec.obs.items():
        if key not in shapes:
            raise DPImportError(
                f"observation key {key!r} of the Diffusion Policy run has no counterpart in task {name!r} "
                f"(its observation keys: {sorted(shapes)})"
            )
        want_img = o["type"] == "rgb"
        if (key in img_keys) != want_img or (not want_img and key not in low_keys):
            raise DPImportError(
                f"observation key {key!r} is {'an image' if want_img else 'low-dim'} in the Diffusion Policy run but "
                f"not in task {name!r}"
            )
        if list(o["shape"]) != shapes[key]:
            raise DPImportError(
                f"observation key {key!r} has shape {o['shape']} in the Diffusion Policy run, {shapes[key]} in task "
                f"{name!r}"
            )
    unused = sorted(set(img_keys + low_keys) - set(spec.obs))
    if unused:
        raise DPImportError(
            f"task {name!r} observes {unused}, which the Diffusion Policy run does not: the policies' inputs differ"
        )
    order = list(spec.obs)
    default = [k for k in order if spec.obs[k]["type"] == "rgb"] + [k for k in order if spec.obs[k]["type"] != "rgb"]
    task["image_keys"] = [k for k in order if spec.obs[k]["type"] == "rgb"]
    task["lowdim_keys"] = [k for k in order if spec.obs[k]["type"] != "rgb"]
    task["obs_order"] = order if order != default else None
    if "abs_action" in task and spec.abs_action is not None:
        task["abs_action"] = bool(spec.abs_action)
    task.update(
        horizon=spec.horizon,
        n_obs_steps=spec.n_obs_steps,
        n_action_steps=spec.n_action_steps,
        action_dim=spec.action_dim,
        default_steps=spec.num_inference_steps,
    )
    if spec.kind == "hybrid_image":
        task["crop_shape"] = spec.crop_shape
    if spec.max_steps is not None:
        task["max_steps"] = spec.max_steps
    if spec.eval:
        task["eval"] = {**(task.get("eval") or {}), **spec.eval}
    return task


def convert_dp(dp: DPCheckpoint, spec: DPSpec, base_cfg: dict, weights: str = "auto") -> tuple[dict, dict]:
    """(checkpoint payload of this project, summary) for the run ``dp`` (settings ``spec``).

    ``base_cfg`` is a composed, resolved ``train`` config of this project for the run's task (plain dicts): its task
    section is adapted (:func:`project_task`), its net and objective replaced by the run's. ``weights``: "auto"
    (the EMA weights when the run trained with EMA, as Diffusion Policy evaluates), "ema" or "model". The online
    weights become the checkpoint's ``model``, the evaluated ones its ``ema`` and ``train.eval_model`` says which one
    evaluation uses. Every weight is loaded strictly into a Policy built from the resulting config. Raises
    :class:`DPImportError` when something has no counterpart."""
    where = str(dp.path)
    sds = dp.state_dicts
    use_ema = bool((dp.cfg.get("training") or {}).get("use_ema", "ema_model" in sds))
    if weights not in ("auto", "ema", "model"):
        raise DPImportError(f"weights={weights!r}: expected auto, ema or model")
    pick = (
        ("ema_model" if use_ema else "model") if weights == "auto" else ("ema_model" if weights == "ema" else "model")
    )
    if pick not in sds:
        raise DPImportError(f"{where}: weights={weights} asks for state_dicts.{pick}, which the file does not have")
    cfg = {k: v for k, v in base_cfg.items()}
    cfg["task"] = project_task(spec, base_cfg["task"])  # observation keys and shapes first, then the weights
    if spec.kind == "hybrid_image":
        spec.encoder = _encoder_settings(sds[pick], spec, f"{where} state_dicts.{pick}")
        cfg["task"]["encoder"] = {**(cfg["task"].get("encoder") or {}), **spec.encoder}
    cfg["net"], cfg["objective"] = dict(spec.net), dict(spec.objective)
    cfg["train"] = {**(base_cfg.get("train") or {}), "eval_model": "ema" if pick == "ema_model" else "online"}
    mapped, policy = {}, None
    for name in dict.fromkeys(("model", pick)):  # one Policy, loaded with each weight set in turn
        body, norm_sd = _map_policy_state(sds[name], spec, f"{where} state_dicts.{name}")
        needed = ["action"] + list(spec.obs)
        missing = [f for f in needed if f"params_dict.{f}.scale" not in norm_sd]
        if missing:
            raise DPImportError(
                f"{where} state_dicts.{name}: the normaliser has no field(s) {missing} (fields: "
                f"{sorted({k.split('.')[1] for k in norm_sd if k.startswith('params_dict.')})})"
            )
        norm_sd = {k: v for k, v in norm_sd.items() if k.split(".")[1] in needed}
        if policy is None:
            policy = build_policy(cfg, LinearNormalizer.from_state_dict(norm_sd))
        state = {**body, **{f"normalizer.{k}": v for k, v in norm_sd.items()}}
        try:
            result = policy.load_state_dict(state, strict=False)
        except RuntimeError as e:  # a shape that differs
            raise DPImportError(
                f"{where} state_dicts.{name}: the weights do not fit this project's policy built from the run's "
                f"cfg: {str(e).splitlines()[-1].strip()}"
            ) from None
        if result.missing_keys or result.unexpected_keys:
            raise DPImportError(
                f"{where} state_dicts.{name}: the weights do not fill this project's policy: missing "
                f"{result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}"
            )
        for k, v in policy.state_dict().items():
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise DPImportError(f"{where} state_dicts.{name}: {k} contains NaN or inf")
        mapped[name] = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    n_params = sum(p.numel() for p in policy.net.parameters())
    payload = {
        "cfg": cfg,
        "model": mapped["model"],
        "ema": {"model": mapped[pick], "step": 0},
        "step": 0,
        "metrics": {},
        "imported_from": {
            "path": str(Path(dp.path).resolve()),
            "policy_class": spec.policy_class,
            "task": spec.task_name,
            "weights": pick,
            "skipped": list(dp.skipped),
        },
    }
    summary = {
        "policy_class": spec.policy_class.rsplit(".", 1)[-1],
        "task": cfg["task"]["name"],
        "weights": pick,
        "eval_model": cfg["train"]["eval_model"],
        "sampler": spec.objective["sampler"],
        "num_inference_steps": spec.num_inference_steps,
        "horizon": spec.horizon,
        "n_obs_steps": spec.n_obs_steps,
        "n_action_steps": spec.n_action_steps,
        "unet_params": int(n_params),
        "encoder_params": int(sum(p.numel() for p in policy.obs_encoder.parameters())),
        "skipped": list(dp.skipped),
        "notes": list(spec.notes),
    }
    return payload, summary
