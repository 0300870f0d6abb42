"""`shortcut-policy <verb> [hydra overrides]` — a thin dispatcher.

Each verb has a config `configs/<verb>.yaml` (composed with Hydra's compose API, so the usual
`key=value`, `group=option`, `+new=value` overrides work) and a command function
`fn(cfg: DictConfig, run_dir: pathlib.Path) -> dict`. The CLI creates the run directory, saves the
resolved config there, runs the command, writes `metrics.json`, and prints `RESULT <json>` last.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import json
import math
import os
import sys
from pathlib import Path

VERBS: dict[str, tuple[str, str]] = {
    "train": ("shortcut_policy.train.trainer", "train_command"),
    "eval": ("shortcut_policy.eval.rollout", "eval_command"),
    "demos": ("shortcut_policy.envs.experts", "demos_command"),
    "bench": ("shortcut_policy.bench", "bench_command"),
    "sample": ("shortcut_policy.generator", "sample_command"),
    "fid": ("shortcut_policy.eval.fid", "fid_command"),
    "latents": ("shortcut_policy.datasets.latents", "latents_command"),
    "deploy": ("shortcut_policy.deploy.loop", "deploy_command"),
    "export": ("shortcut_policy.deploy.export", "export_command"),
}

USAGE = "usage: shortcut-policy {" + "|".join(VERBS) + "} [hydra overrides ...]"


def compose(verb: str, overrides: list[str] | None = None):
    """Compose configs/<verb>.yaml with overrides (also used by tests and the trainer)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_module(config_module="shortcut_policy.configs", version_base="1.3"):
        return hydra_compose(config_name=verb, overrides=list(overrides or []))


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 1) == 0:
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def make_run_dir(cfg, verb: str) -> Path:
    run_dir = cfg.get("run_dir", None) if hasattr(cfg, "get") else None
    if not run_dir:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        run_dir = Path("runs") / verb / stamp
    run_dir = Path(str(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_verb(verb: str, overrides: list[str] | None = None) -> dict:
    from omegaconf import OmegaConf

    if verb not in VERBS:
        raise SystemExit(f"unknown verb {verb!r}. {USAGE}")
    cfg = compose(verb, overrides)
    run_dir = make_run_dir(cfg, verb)
    with _open_dict(cfg):
        cfg.run_dir = str(run_dir)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    module, fn = VERBS[verb]
    result = getattr(importlib.import_module(module), fn)(cfg, run_dir) or {}
    result = _jsonable(result)
    atomic_write_text(run_dir / "metrics.json", json.dumps(result, indent=2))
    return result


class _open_dict:
    def __init__(self, cfg):
        from omegaconf import open_dict

        self._ctx = open_dict(cfg)

    def __enter__(self):
        return self._ctx.__enter__()

    def __exit__(self, *a):
        return self._ctx.__exit__(*a)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        print("verbs: " + ", ".join(VERBS))
        return 0 if argv else 2
    verb, overrides = argv[0], argv[1:]
    # `bench toy dataset=moons` -> what=toy toy.dataset=moons (positional sub-command for bench)
    if verb == "bench" and overrides and "=" not in overrides[0]:
        sub = overrides.pop(0)
        overrides = [f"what={sub}"] + [f"toy.{o}" if sub == "toy" and o.split("=")[0] in ("dataset", "num_steps", "batch_size") else o for o in overrides]
    try:
        result = run_verb(verb, overrides)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print("RESULT " + json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
