"""`shortcut-policy bench policies`: every objective trained on the same data, net, batch and steps, with each
training seed, then evaluated on the same test seeds at its natural step counts, side by side in one table.

Layout under `policies.out` (default runs/bench/<task>), one folder per (entry, seed), resumable at every stage:

    <out>/<entry>/seed<k>/train/            the training run (the train verb's run directory; resumes when killed)
    <out>/<entry>/seed<k>/eval_<nfe>/       per-seed rollouts on the test seeds (per_seed.json, videos)
    <out>/<entry>/seed<k>/eval_<nfe>.json   the summary of that evaluation + batch-1 latency (written last)
    <out>/results.json, table.md, success_vs_nfe.png, success_vs_latency.png

An entry is an objective name (`shortcut`, `flow_matching`, `diffusion`, `regression`, `meanflow`, ...) or a named
variant from `policies.variants` (a list of train overrides, e.g. `shortcut_m16: [objective=shortcut,
objective.m=16]`). A finished training (its metrics.json has the requested step count) is never retrained and a
finished evaluation never re-run, so a killed comparison restarts where it stopped.

Protocol (Diffusion Policy's, see the README): the checkpoint of each run is the best of its rollout evaluations
during training on the VALIDATION seeds (`train.eval_seed_start`, disjoint from the test seeds), else its last one;
the test seeds are used once per (checkpoint, NFE). Success rates pool all episodes of all training seeds with a
Wilson 95 % interval; mean score is the mean over those episodes; latency is the median of `predict_action` at
batch 1 (normalisation included, one thread).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import OmegaConf

from ..eval.report import summarize, wilson_interval
from ..eval.rollout import evaluate
from ..objectives import OBJECTIVES
from ..policy import load_policy
from ..utils import atomic_path, atomic_write_text

NFE_SPECS = ("ddpm", "ddim")


def split_warm(spec) -> tuple[str, float | None]:
    """An NFE entry with an optional warm start (eval ``warm_start=``): '1a2w0.875' -> ('1a2', 0.875) (each chunk
    after an episode's first starts at t = 0.875 from the previous chunk's unexecuted actions); '1a4' -> ('1a4',
    None). Raises ValueError for a value that is not a number in (0, 1)."""
    s = str(spec).strip()
    head, sep, tail = s.partition("w")
    if not sep:
        return s, None
    try:
        tau = float(tail)
    except ValueError:
        tau = float("nan")
    if not 0.0 < tau < 1.0:
        raise ValueError(
            f"policies.nfe entry {spec!r}: the warm start after 'w' must be a number in (0, 1), e.g. 1a2w0.875"
        )
    return head, tau


def split_execution(spec) -> tuple[str, int | None]:
    """An NFE entry with an optional execution horizon: '1a4' -> ('1', 4) (1 step, 4 actions of each predicted
    chunk executed before replanning); 'ddpm100a4' -> ('ddpm100', 4); '8' -> ('8', None) (the policy's own
    n_action_steps, Diffusion Policy's 8 on Push-T); a warm-start suffix ('1a2w0.875') is dropped
    (:func:`split_warm`). Raises ValueError for a non-positive horizon."""
    s = split_warm(spec)[0]
    head, sep, tail = s.rpartition("a")
    if sep and head and tail.isdigit():
        if int(tail) < 1:
            raise ValueError(f"policies.nfe entry {spec!r}: the execution horizon after 'a' must be >= 1")
        return head, int(tail)
    return s, None


def run_key(run: dict) -> str:
    """The (NFE, execution horizon, warm start) key of an evaluation result: '8', 'ddpm100', '1a4' (4 actions
    executed), '1a2w0.875' (warm start at t = 0.875)."""
    key = f"{run['sampler']}{run['nfe']}" if run.get("sampler") else str(run["nfe"])
    key = f"{key}a{run['n_action_steps']}" if run.get("n_action_steps") else key
    return f"{key}w{run['warm_start']:g}" if run.get("warm_start") else key


def parse_nfe(spec) -> tuple[str | None, int]:
    """'8' -> (None, 8); 'ddpm100' -> ('ddpm', 100); 'ddim10' -> ('ddim', 10); an execution-horizon suffix ('1a4')
    is ignored here (:func:`split_execution`). Raises ValueError otherwise."""
    s = split_execution(spec)[0]
    for sampler in NFE_SPECS:
        if s.startswith(sampler) and s[len(sampler) :].isdigit():
            return sampler, int(s[len(sampler) :])
    if s.isdigit() and int(s) >= 1:
        return None, int(s)
    raise ValueError(
        f"policies.nfe entry {spec!r}: expected a step count (e.g. 8) or ddpm<N> / ddim<N>, optionally followed by "
        "a<K> to execute K actions per chunk (e.g. 1a4)"
    )


def _atomic_json(path: Path, obj) -> None:
    """Write `obj` as indented JSON to `path` through a temp file and a rename."""
    atomic_write_text(path, json.dumps(obj, indent=1, default=float))


def _entries(pc) -> dict[str, list[str]]:
    """entry label -> train overrides; raises ValueError for an unknown label or an empty list."""
    labels = list(pc.objectives or [])
    if not labels:
        raise ValueError(
            "bench policies: objectives=[] is empty; give at least one, e.g. objectives=[shortcut,diffusion]"
        )
    variants = {k: list(v) for k, v in (pc.get("variants") or {}).items()}
    distilled = dict(pc.get("distill") or {})
    out = {}
    for label in labels:
        label = str(label)
        if label in distilled:
            teacher = str(distilled[label].get("teacher"))
            if teacher not in out:
                raise ValueError(
                    f"bench policies: entry {label!r} is distilled from {teacher!r}, which must come before it in "
                    f"objectives=[...] (e.g. objectives=[{teacher},{label}])"
                )
            out[label] = list(distilled[label].get("overrides") or [])
        elif label in variants:
            out[label] = variants[label]
        elif label in OBJECTIVES:
            out[label] = [f"objective={label}"]
        else:
            raise ValueError(
                f"bench policies: objective {label!r} does not exist; valid: {sorted(OBJECTIVES)}, a "
                f"variant of policies.variants {sorted(variants)} or a distilled entry of policies.distill "
                f"{sorted(distilled)}"
            )
    return out


def _objective_of(overrides: list[str]) -> str:
    for o in overrides:
        if o.startswith("objective="):
            return o.split("=", 1)[1]
    return "shortcut"


def _nfes(pc, objective: str, m: int | None) -> list[str]:
    specs = list((pc.get("nfe") or {}).get(objective, [1]))
    out = []
    for s in specs:
        sampler, n = parse_nfe(s)
        k, w = split_execution(s)[1], split_warm(s)[1]
        if sampler is None and m is not None and objective in ("shortcut", "flow_matching") and n > m:
            n = m  # a shortcut model with M = 16 samples at most 16 steps
        key = (f"{sampler}{n}" if sampler else str(n)) + (f"a{k}" if k else "") + (f"w{w:g}" if w else "")
        if key not in out:
            out.append(key)
    return out


def _train_overrides(pc, task: str, entry_overrides: list[str], seed: int, run_dir: Path) -> list[str]:
    batch = pc.get("batch_size")
    return [
        f"task={task}",
        *list(pc.get("train_overrides") or []),
        *([f"train.batch_size={int(batch)}"] if batch is not None else []),
        *entry_overrides,
        f"train.seed={seed}",
        f"run_dir={run_dir}",
    ]


# the parts of a training run's config that make two runs comparable: a finished run is reused only if they match
_RECIPE_KEYS = (
    "train.batch_size",
    "train.num_steps",
    "train.lr",
    "train.weight_decay",
    "train.lr_schedule",
    "net.kind",
    "net.down_dims",
    "objective.name",
    "objective.m",
)


def _check_reusable(train_dir: Path, tcfg) -> None:
    """Refuse to reuse a finished run whose stored recipe differs from the one composed now.

    Compares the recipe keys `_RECIPE_KEYS` (batch size, steps, learning rate and schedule, weight decay, the net's
    kind and widths, the objective and its M) of ``train_dir/config.yaml`` with ``tcfg``; a key missing from either
    is skipped (a run that predates it). Raises ValueError naming the run directory, the first differing key and
    both values (a table must never mix recipes silently).
    """
    stored_path = train_dir / "config.yaml"
    if not stored_path.exists():
        return
    stored = OmegaConf.load(stored_path)
    for key in _RECIPE_KEYS:
        a, b = OmegaConf.select(stored, key), OmegaConf.select(tcfg, key)
        if a is not None and b is not None and a != b:
            raise ValueError(
                f"bench policies: the finished run {train_dir} was trained with {key}={a}, but this comparison asks "
                f"for {key}={b}; use another policies.out for the new recipe, or ask for the run's value (e.g. "
                "policies.batch_size=64 for the batch-64 Push-T runs)"
            )


def _pick_checkpoint(train_dir: Path) -> tuple[Path, str]:
    ck_dir = train_dir / "checkpoints"
    topk = ck_dir / "topk.json"
    if topk.exists():
        entries = json.loads(topk.read_text())
        if entries:
            best = max(entries, key=lambda e: (e["score"], e["step"]))
            return ck_dir / best["path"], f"best validation {best['score']:.3f} at step {best['step']}"
    return ck_dir / "last.ckpt", "last (no validation rollouts)"


def _latency_ms(policy, task_cfg, nfe: int, sampler: str | None, rounds: int) -> float:
    rng = np.random.default_rng(0)
    obs = {
        k: rng.uniform(0, 1, (1, int(task_cfg["n_obs_steps"]), *v)).astype(np.float32)
        for k, v in task_cfg["obs_shapes"].items()
    }
    kw = {"sampler": sampler} if sampler else {}
    policy.predict_action(obs, steps=nfe, **kw)  # warm-up
    times = []
    with torch.inference_mode():
        for _ in range(rounds):
            t0 = time.perf_counter()
            policy.predict_action(obs, steps=nfe, **kw)
            times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def _evaluate_one(pc, ckpt: Path, nfe_key: str, eval_dir: Path) -> dict:
    sampler, n = parse_nfe(nfe_key)
    n_act, warm = split_execution(nfe_key)[1], split_warm(nfe_key)[1]
    policy = load_policy(ckpt)
    policy.warm_start = policy.check_warm_start(warm, n)  # ValueError naming warm_start for e.g. a regression policy
    task_cfg = policy.task_cfg
    if sampler is not None:
        if getattr(policy.objective, "name", "") != "diffusion":
            raise ValueError(f"{ckpt}: NFE {nfe_key} needs a diffusion checkpoint, not {policy.objective.name}")
        policy.objective.sampler = sampler
    if n_act is not None:  # execute n_act actions of each chunk (the policy's own n_action_steps otherwise)
        policy.set_execution_horizon(n_act, f"policies.nfe entry {nfe_key!r} ({ckpt}): n_action_steps")
        task_cfg = {**OmegaConf.to_container(OmegaConf.create(task_cfg), resolve=True), "n_action_steps": n_act}
    torch.set_num_threads(1)
    ev = pc.eval
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # regression: 'ignores steps' is expected at NFE 1 only
        res = evaluate(
            task_cfg,
            policy=policy,
            steps_list=[n],
            n_episodes=int(ev.n_episodes),
            seed_start=int(ev.seed_start),
            n_workers=ev.get("workers"),
            n_videos=int(ev.get("n_videos", 0)),
            run_dir=eval_dir,
            progress=False,
            envs_per_worker=ev.get("envs_per_worker"),
        )
    rows = json.loads((eval_dir / "per_seed.json").read_text())
    ok = [r for r in rows if r.get("status") == "ok"]
    out = {
        "nfe": n,
        "sampler": sampler,
        **({"n_action_steps": n_act} if n_act is not None else {}),
        **({"warm_start": warm} if warm is not None else {}),
        "n_episodes": len(rows),
        "n_ok": len(ok),
        "n_success": int(sum(bool(r.get("success")) for r in ok)),
        "mean_score": float(np.mean([float(r.get("max_reward") or 0.0) for r in ok])) if ok else float("nan"),
        "seconds": res.get("seconds"),
        "checkpoint": str(ckpt),
        "per_seed": [
            {
                "seed": int(r["seed"]),
                "success": bool(r.get("success")),
                "score": r.get("max_reward"),
                "status": r.get("status"),
                **({"stages": r["stages"]} if isinstance(r.get("stages"), dict) else {}),
            }
            for r in rows
        ],
    }
    out["latency_ms_batch1"] = _latency_ms(policy, policy.task_cfg, n, sampler, int(pc.latency_rounds))
    return out


def _with_stages(res: dict, eval_dir: Path) -> dict:
    """Fill the task stages (Transport: lid off, hand-over, ...) of each per-seed entry of an evaluation result from
    its folder's per_seed.json when the result was written without them (results of earlier versions)."""
    src = eval_dir / "per_seed.json"
    if any("stages" in s for s in res.get("per_seed", [])) or not src.exists():
        return res
    by_seed = {int(r["seed"]): r.get("stages") for r in json.loads(src.read_text())}
    for s in res.get("per_seed", []):
        if isinstance(by_seed.get(int(s["seed"])), dict):
            s["stages"] = by_seed[int(s["seed"])]
    return res


def check_inputs(pc, compose: Callable) -> tuple[dict, list[int], str]:
    """Validate everything before any training: entries, seeds, the task's data file (`compose(verb, overrides)`
    builds the train config of each entry). Raises ValueError / FileNotFoundError naming the bad value."""
    entries = _entries(pc)
    seeds = list(pc.seeds or [])
    if not seeds:
        raise ValueError("bench policies: seeds=[] is empty; give at least one training seed, e.g. seeds=[0,1]")
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise ValueError(f"bench policies: seeds={seeds}: expected non-negative integers")
    task = str(pc.task)
    distilled = dict(pc.get("distill") or {})
    for label, ov in entries.items():
        if label in distilled:  # trained on its teacher entry's data (checked there)
            for spec in (pc.get("nfe") or {}).get(_objective_of(ov), [1]):
                parse_nfe(spec)
            continue
        cfg = compose("train", [f"task={task}", *list(pc.get("train_overrides") or []), *ov])
        ds = cfg.task.dataset
        path = ds.get("lerobot_path") or ds.get("hdf5_path") or ds.get("zarr_path")
        if not path or not Path(str(path)).exists():
            raise FileNotFoundError(
                f"bench policies: task {task}'s data file {path!r} does not exist (entry {label}); "
                f"generate it with `shortcut-policy demos task={cfg.task.get('env', '?')} out=...` "
                "or pass policies.train_overrides=[task.dataset.zarr_path=...]"
            )
        for spec in (pc.get("nfe") or {}).get(_objective_of(ov), [1]):
            parse_nfe(spec)
    return entries, seeds, task


def run_bench_policies(
    cfg, run_dir: Path, compose: Callable, run_train: Callable, run_distill: Callable | None = None
) -> dict:
    """Train (or resume) every (entry, seed), evaluate each chosen checkpoint at its NFEs, write the table.

    `compose(verb, overrides) -> DictConfig`, `run_train(overrides)` (the train verb, with its run directory,
    lock and resume rules) and `run_distill(overrides)` (the distill verb, for entries of ``policies.distill``:
    a student of the teacher entry's chosen checkpoint of the same seed) come from the command layer: this module
    never composes configs itself.
    """
    pc = cfg.policies
    entries, seeds, task = check_inputs(pc, compose)
    out = Path(str(pc.out)) if pc.get("out") else Path("runs/bench") / task
    out.mkdir(parents=True, exist_ok=True)
    num_steps = None
    per_run = []
    distilled = dict(pc.get("distill") or {})
    for label, ov in entries.items():
        objective = _objective_of(ov)
        for seed in seeds:
            rdir = out / label / f"seed{seed}"
            train_dir = rdir / "train"
            metrics = train_dir / "metrics.json"
            teacher_minutes = None
            if label in distilled:
                spec = distilled[label]
                t_dir = out / str(spec.teacher) / f"seed{seed}" / "train"
                if not (t_dir / "metrics.json").exists():
                    print(
                        f"[bench policies] skipping {label} seed {seed}: teacher {spec.teacher} not trained", flush=True
                    )
                    continue
                t_ckpt, _ = _pick_checkpoint(t_dir)
                teacher_minutes = json.loads((t_dir / "metrics.json").read_text()).get("minutes")
                overrides = [
                    f"teacher={t_ckpt}",
                    f"fraction={float(spec.get('fraction', 0.1))}",
                    *ov,
                    f"train.seed={seed}",
                    f"run_dir={train_dir}",
                ]
                tcfg = None
                done = metrics.exists() and not json.loads(metrics.read_text()).get("stopped_early", False)
            else:
                overrides = _train_overrides(pc, task, ov, seed, train_dir)
                tcfg = compose("train", overrides)
                num_steps = int(tcfg.train.num_steps)
                done = metrics.exists() and json.loads(metrics.read_text()).get("steps") == num_steps
                if done:
                    _check_reusable(train_dir, tcfg)
            if not done and pc.get("only_finished", False):
                print(
                    f"[bench policies] skipping {label} seed {seed}: its training is not finished "
                    f"(policies.only_finished=true)",
                    flush=True,
                )
                continue
            if not done:
                print(f"[bench policies] training {label} seed {seed} -> {train_dir}", flush=True)
                if label in distilled:
                    if run_distill is None:
                        raise ValueError(f"bench policies: entry {label!r} needs the distill verb (run_distill)")
                    run_distill(overrides)
                else:
                    run_train(overrides)
            tres = json.loads(metrics.read_text())
            ckpt, how = _pick_checkpoint(train_dir)
            m = None if tcfg is None else (int(tcfg.objective.get("m", 0) or 0) or None)
            for key in _nfes(pc, objective, m):
                res_path = rdir / f"eval_{key}.json"
                if not res_path.exists():
                    print(
                        f"[bench policies] evaluating {label} seed {seed} at NFE {key} on {pc.eval.n_episodes} test "
                        f"seeds from {pc.eval.seed_start}",
                        flush=True,
                    )
                    res = _evaluate_one(pc, ckpt, key, rdir / f"eval_{key}")
                    res.update(
                        {
                            "entry": label,
                            "objective": objective,
                            "train_seed": seed,
                            "checkpoint_choice": how,
                            "train_minutes": tres.get("minutes"),
                            "train_steps": tres.get("steps"),
                            **({"teacher_train_minutes": teacher_minutes} if teacher_minutes is not None else {}),
                        }
                    )
                    _atomic_json(res_path, res)
                per_run.append(_with_stages(json.loads(res_path.read_text()), rdir / f"eval_{key}"))
    summary = aggregate(per_run)
    summary.update(
        {
            "task": task,
            "seeds": seeds,
            "entries": {k: v for k, v in entries.items()},
            "train_steps": num_steps,
            "test_seed_start": int(pc.eval.seed_start),
            "test_episodes_per_checkpoint": int(pc.eval.n_episodes),
        }
    )
    _atomic_json(out / "results.json", {"summary": summary, "runs": per_run})
    atomic_write_text(out / "table.md", table_markdown(summary))
    figs = plot(summary, out)
    return {
        "results": str(out / "results.json"),
        "table": str(out / "table.md"),
        **figs,
        **{f"success_rate@{r['entry']}@{r['nfe_key']}": r["success_rate"] for r in summary["rows"]},
    }


def aggregate(per_run: list[dict]) -> dict:
    """Pool the runs of each (entry, NFE) over training seeds: success k/n with Wilson interval, mean score over
    episodes, median latency, per-seed success rates and, for tasks with stages (Transport), the share of the episodes
    that reached each stage (``stage_rates``, stages in the order they are reached on average)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in per_run:
        groups.setdefault((r["entry"], run_key(r)), []).append(r)
    rows = []
    for (entry, key), rs in groups.items():
        k, n = sum(r["n_success"] for r in rs), sum(r["n_ok"] for r in rs)
        lo, hi = wilson_interval(k, n)
        scores = [s["score"] or 0.0 for r in rs for s in r["per_seed"] if s["status"] == "ok"]
        rows.append(
            {
                "entry": entry,
                "objective": rs[0]["objective"],
                "nfe_key": key,
                "nfe": rs[0]["nfe"],
                "sampler": rs[0].get("sampler"),
                "n_action_steps": rs[0].get("n_action_steps"),
                "warm_start": rs[0].get("warm_start"),
                "success_rate": k / n if n else float("nan"),
                "n_success": k,
                "n_episodes": n,
                "ci95": [lo, hi],
                "mean_score": float(np.mean(scores)) if scores else float("nan"),
                "latency_ms": float(np.median([r["latency_ms_batch1"] for r in rs])),
                "train_seeds": sorted(r["train_seed"] for r in rs),
                "per_train_seed_success": {str(r["train_seed"]): r["n_success"] / max(r["n_ok"], 1) for r in rs},
                "n_crashed": sum(r["n_episodes"] - r["n_ok"] for r in rs),
                "checkpoint_choice": {str(r["train_seed"]): r["checkpoint_choice"] for r in rs},
                "train_minutes": {str(r["train_seed"]): r.get("train_minutes") for r in rs},
            }
        )
        staged = [
            {
                "seed": s["seed"],
                "max_reward": s["score"],
                "success": s["success"],
                "status": s["status"],
                "stages": s["stages"],
            }
            for r in rs
            for s in r["per_seed"]
            if isinstance(s.get("stages"), dict)
        ]
        if staged:
            rows[-1]["stage_rates"] = summarize(staged, 0, exclude_crashed=True).get("stage_rate@0", {})
    rows.sort(key=lambda r: (r["entry"], r["n_action_steps"] or 0, r.get("warm_start") or 0.0, r["nfe"]))
    return {"rows": rows}


def _nfe_label(r: dict) -> str:
    """A table row's NFE cell: '1', '100 (DDPM)', '1, executing 4' (actions per chunk, when not the policy's own)."""
    nfe = f"{r['nfe']} ({r['sampler'].upper()})" if r["sampler"] else str(r["nfe"])
    nfe = f"{nfe}, executing {r['n_action_steps']}" if r.get("n_action_steps") else nfe
    return f"{nfe}, warm start {r['warm_start']:g}" if r.get("warm_start") else nfe


def table_markdown(summary: dict) -> str:
    """The objective x NFE table as Markdown, then (tasks with stages) the stage-rate table."""
    lines = [
        "| entry | NFE | success rate [95% Wilson] | successes / episodes | mean score | latency ms (batch 1) "
        "| per training seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        nfe = _nfe_label(r)
        per = ", ".join(f"s{s}: {v:.3f}" for s, v in r["per_train_seed_success"].items())
        lines.append(
            f"| {r['entry']} | {nfe} | {r['success_rate']:.3f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] | "
            f"{r['n_success']}/{r['n_episodes']} | {r['mean_score']:.3f} | {r['latency_ms']:.2f} | {per} |"
        )
    staged = [r for r in summary["rows"] if r.get("stage_rates")]
    if staged:  # tasks with stages: the share of episodes that reached each one, stages in the order reached
        names = list(staged[0]["stage_rates"])
        names += [k for r in staged for k in r["stage_rates"] if k not in names]
        lines += ["", "| entry | NFE | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for r in staged:
            nfe = _nfe_label(r)
            rates = " | ".join(f"{r['stage_rates'].get(k, 0.0):.2f}" for k in names)
            lines.append(f"| {r['entry']} | {nfe} | {rates} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, out: Path) -> dict:
    """success_vs_nfe.png and success_vs_latency.png (the Pareto view) with Wilson intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_entry: dict[str, list[dict]] = {}
    for r in summary["rows"]:  # a different execution horizon is its own curve
        label = r["entry"] + (f" (executing {r['n_action_steps']})" if r.get("n_action_steps") else "")
        label += f" (warm start {r['warm_start']:g})" if r.get("warm_start") else ""
        by_entry.setdefault(label, []).append(r)
    paths = {}
    for xkey, fname, xlabel in (
        ("nfe", "success_vs_nfe.png", "NFE (network evaluations per action chunk)"),
        ("latency_ms", "success_vs_latency.png", "predict_action latency, batch 1 (ms)"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for entry, rs in sorted(by_entry.items()):
            rs = sorted(rs, key=lambda r: r[xkey])
            x = [r[xkey] for r in rs]
            y = [r["success_rate"] for r in rs]
            err = np.array(
                [[r["success_rate"] - r["ci95"][0] for r in rs], [r["ci95"][1] - r["success_rate"] for r in rs]]
            )
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=entry)
            for r in rs:
                if r["sampler"]:
                    ax.annotate(
                        r["nfe_key"].upper(),
                        (r[xkey], r["success_rate"]),
                        fontsize=7,
                        xytext=(3, 3),
                        textcoords="offset points",
                    )
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("success rate (test seeds, all training seeds)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / fname
        with atomic_path(path, keep_suffix=True) as tmp:
            fig.savefig(tmp, dpi=120)
        plt.close(fig)
        paths[fname.rsplit(".", 1)[0]] = str(path)
    return paths
