"""`bench policies`: objectives trained and evaluated side by side; resumable; bad input refused before training."""

import json
from pathlib import Path

import pytest

from shortcut_policy import cli
from shortcut_policy.bench.policies import parse_nfe, run_key, split_execution, split_warm


@pytest.fixture(scope="module")
def zarr_path(pusht_lowdim_zarr):
    return pusht_lowdim_zarr


def _args(zarr_path, out, *extra):
    train = [
        "logger=none",
        "net=unet1d_small",
        "net.down_dims=[16,32]",
        "net.step_embed_dim=16",
        "train.batch_size=8",
        "train.num_steps=4",
        "train.eval_every=2",
        "train.eval_episodes=2",
        "train.eval_seed_start=200000",
        "train.topk_key=test_success_rate",
        "train.warmup_steps=1",
        "task.max_steps=16",
        "task.eval.n_workers=1",
        "train.threads=1",
        f"task.dataset.zarr_path={zarr_path}",
    ]
    return [
        "what=policies",
        "policies.task=pusht_lowdim",
        f"policies.out={out}",
        "policies.eval.n_episodes=3",
        "policies.eval.workers=1",
        "policies.latency_rounds=2",
        f"policies.train_overrides={json.dumps(train)}",
        *extra,
    ]


def test_two_objectives_table_figures_and_resume(zarr_path, tmp_path, monkeypatch):
    from shortcut_policy.policy import Policy

    executed = []  # the execution horizon of every predict_action call made by the rollouts and latency probes
    predict = Policy.predict_action

    def spy(self, *a, **k):
        out = predict(self, *a, **k)
        executed.append(int(out.shape[1]))
        return out

    monkeypatch.setattr(Policy, "predict_action", spy)
    out = tmp_path / "bench"
    args = _args(
        zarr_path,
        out,
        "policies.objectives=[regression,shortcut_m16]",
        "policies.seeds=[0]",
        "policies.variants.shortcut_m16=['objective=shortcut','objective.m=16']",
        "policies.nfe.shortcut=[1,128,1a4,1a2w0.5]",
    )
    res = cli.run_verb("bench", args + [f"run_dir={tmp_path / 'r1'}"])
    summary = json.loads((out / "results.json").read_text())["summary"]
    keys = {(r["entry"], r["nfe_key"]) for r in summary["rows"]}
    # 128 capped at M = 16; 1a4: one step, 4 actions of each chunk executed
    assert keys == {
        ("regression", "1"),
        ("shortcut_m16", "1"),
        ("shortcut_m16", "16"),
        ("shortcut_m16", "1a4"),
        ("shortcut_m16", "1a2w0.5"),
    }
    a4 = json.loads((out / "shortcut_m16" / "seed0" / "eval_1a4.json").read_text())
    assert a4["n_action_steps"] == 4 and a4["nfe"] == 1
    w = json.loads((out / "shortcut_m16" / "seed0" / "eval_1a2w0.5.json").read_text())
    assert w["n_action_steps"] == 2 and w["warm_start"] == 0.5 and w["nfe"] == 1
    assert "| shortcut_m16 | 1, executing 2, warm start 0.5 |" in (out / "table.md").read_text()
    assert 4 in executed and 8 in executed, executed  # 1a4 chunks of 4 actions; the others Diffusion Policy's 8
    assert "| shortcut_m16 | 1, executing 4 |" in (out / "table.md").read_text()
    for r in summary["rows"]:
        assert r["n_episodes"] == 3 and 0.0 <= r["success_rate"] <= 1.0 and r["latency_ms"] > 0
        assert r["ci95"][0] <= r["success_rate"] <= r["ci95"][1]
        assert "validation" in r["checkpoint_choice"]["0"]  # chosen on validation seeds
    assert (out / "success_vs_nfe.png").stat().st_size > 0 and (out / "success_vs_latency.png").stat().st_size > 0
    assert "| regression | 1 |" in (out / "table.md").read_text()
    assert "success_rate@regression@1" in res
    # a second run reuses every finished training and evaluation
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name.startswith(("eval_", "metrics"))}
    cli.run_verb("bench", args + [f"run_dir={tmp_path / 'r2'}"])
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}
    # a finished run of another recipe (here: batch 8 where batch 16 is asked for) is never mixed into the table
    with pytest.raises(ValueError, match=r"train.batch_size=8.*train.batch_size=16"):
        cli.run_verb("bench", args + ["policies.batch_size=16", f"run_dir={tmp_path / 'r3'}"])
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}


@pytest.mark.parametrize(
    "extra, match",
    [
        (["policies.objectives=[shortcut,nonexistent]", "policies.seeds=[0]"], "nonexistent"),
        (["policies.objectives=[shortcut]", "policies.seeds=[]"], "seeds"),
        (["policies.objectives=[]", "policies.seeds=[0]"], "objectives"),
    ],
)
def test_bad_input_refused_before_training(zarr_path, tmp_path, extra, match):
    out = tmp_path / "bench"
    with pytest.raises(ValueError, match=match):
        cli.run_verb("bench", _args(zarr_path, out, *extra) + [f"run_dir={tmp_path / 'r'}"])
    assert not out.exists() or not any(out.rglob("train"))


def test_missing_data_file_refused_before_training(tmp_path):
    out = tmp_path / "bench"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.run_verb(
            "bench",
            _args(tmp_path / "missing.zarr", out, "policies.objectives=[shortcut]", "policies.seeds=[0]")
            + [f"run_dir={tmp_path / 'r'}"],
        )
    assert not out.exists() or not any(out.rglob("train"))


def test_parse_nfe():
    assert parse_nfe("ddpm100") == ("ddpm", 100) and parse_nfe(8) == (None, 8) and parse_nfe("ddim10") == ("ddim", 10)
    assert parse_nfe("ddpm100a4") == ("ddpm", 100) and split_execution("ddpm100a4") == ("ddpm100", 4)
    assert split_execution("1a4") == ("1", 4) and split_execution("8") == ("8", None)
    with pytest.raises(ValueError, match="execution horizon"):
        split_execution("1a0")
    with pytest.raises(ValueError):
        parse_nfe("euler8")
    # warm start: '1a2w0.875' = 1 step, 2 actions executed, each chunk from t = 0.875 of the previous one's rest
    assert split_warm("1a2w0.875") == ("1a2", 0.875) and split_execution("1a2w0.875") == ("1", 2)
    assert parse_nfe("1a2w0.875") == (None, 1) and split_warm("ddpm100a4") == ("ddpm100a4", None)
    assert run_key({"nfe": 1, "n_action_steps": 2, "warm_start": 0.875}) == "1a2w0.875"
    for bad in ("1a2w1.5", "1a2wsoon", "1w0"):
        with pytest.raises(ValueError, match="warm start after 'w'"):
            parse_nfe(bad)


def test_bench_shorthand_maps_top_level_and_dotted_keys():
    from shortcut_policy.cli import bench_shorthand

    got = bench_shorthand("policies", ["task=T", "objectives=[a,b]", "eval.n_episodes=100", "train.seed=1"])
    assert got == [
        "what=policies",
        "policies.task=T",
        "policies.objectives=[a,b]",
        "policies.eval.n_episodes=100",
        "train.seed=1",
    ]
    assert bench_shorthand("toy", ["objectives=[a]"]) == ["what=toy", "toy.select=[a]"]


def test_distilled_entry_trains_from_its_teacher_entry_and_needs_it_first(zarr_path, tmp_path):
    out = tmp_path / "bench"
    args = _args(
        zarr_path,
        out,
        "policies.objectives=[diffusion,ddpm_ode1]",
        "policies.seeds=[0]",
        "policies.nfe.diffusion=[ddim2]",
        "policies.distill.ddpm_ode1.fraction=0.5",
        "policies.distill.ddpm_ode1.overrides=['objective=ode_distillation','objective.teacher_steps=2']",
    )
    cli.run_verb("bench", args + [f"run_dir={tmp_path / 'r1'}"])
    runs = json.loads((out / "results.json").read_text())["runs"]
    student = [r for r in runs if r["entry"] == "ddpm_ode1"]
    assert len(student) == 1 and student[0]["objective"] == "ode_distillation" and student[0]["nfe"] == 1
    assert student[0]["train_steps"] == 2  # half of the teacher's 4 steps
    assert student[0]["teacher_train_minutes"] > 0
    with pytest.raises(ValueError, match="must come before it"):
        cli.run_verb(
            "bench",
            _args(zarr_path, out, "policies.objectives=[ddpm_ode1,diffusion]", "policies.seeds=[0]")
            + [f"run_dir={tmp_path / 'r2'}"],
        )


def test_stage_rates_pooled_over_seeds_and_backfilled_from_the_eval_folder(tmp_path):
    from shortcut_policy.bench.policies import _with_stages, aggregate, table_markdown

    def run(seed, stages_per_episode, with_stages=True):
        per_seed = []
        for i, st in enumerate(stages_per_episode):
            row = {"seed": 100000 + i, "success": "success" in st, "score": float("success" in st), "status": "ok"}
            if with_stages:
                row["stages"] = st
            per_seed.append(row)
        return {
            "entry": "shortcut",
            "objective": "shortcut",
            "nfe": 1,
            "sampler": None,
            "train_seed": seed,
            "n_episodes": len(per_seed),
            "n_ok": len(per_seed),
            "n_success": sum(r["success"] for r in per_seed),
            "latency_ms_batch1": 4.0,
            "checkpoint_choice": "last",
            "per_seed": per_seed,
        }

    a = [{"lid_off": 80, "handover": 300, "success": 500}, {"lid_off": 90}]
    b = [{"lid_off": 85, "handover": 320}, {}]
    # seed 1's result was written without stages: they come from its eval folder's per_seed.json
    eval_dir = tmp_path / "eval_1"
    eval_dir.mkdir()
    (eval_dir / "per_seed.json").write_text(json.dumps([{"seed": 100000 + i, "stages": st} for i, st in enumerate(b)]))
    res_b = _with_stages(run(1, b, with_stages=False), eval_dir)
    assert res_b["per_seed"][0]["stages"] == b[0]
    summary = aggregate([run(0, a), res_b])
    (row,) = summary["rows"]
    assert row["n_episodes"] == 4 and row["n_success"] == 1
    assert list(row["stage_rates"]) == ["lid_off", "handover", "success"]  # in the order reached
    assert row["stage_rates"] == {"lid_off": 0.75, "handover": 0.5, "success": 0.25}
    table = table_markdown(summary)
    assert "| entry | NFE | lid_off | handover | success |" in table
    assert "| shortcut | 1 | 0.75 | 0.50 | 0.25 |" in table


def test_merge_bench_results_pools_split_files_like_the_bench(tmp_path):
    """scripts/merge_bench_results.py on the committed Push-T comparison split into two files (one per entry) gives
    the committed pooled rows back; a run present in two inputs and an --out holding an input are refused."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("merge_bench_results", root / "scripts" / "merge_bench_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    full = json.loads((root / "docs/results/pusht_policies_b256/results.json").read_text())
    parts = []
    for entry in ("diffusion", "shortcut_m16"):
        p = tmp_path / entry / "results.json"
        p.parent.mkdir()
        p.write_text(json.dumps({"summary": full["summary"], "runs": [r for r in full["runs"] if r["entry"] == entry]}))
        parts.append(p)
    merged = mod.main([str(p) for p in parts] + ["--out", str(tmp_path / "pooled")])
    want = {(r["entry"], r["nfe_key"]): (r["n_success"], r["n_episodes"]) for r in full["summary"]["rows"]}
    got = {(r["entry"], r["nfe_key"]): (r["n_success"], r["n_episodes"]) for r in merged["summary"]["rows"]}
    assert got == want and len(got) == 7
    for name in ("summary.json", "table.md", "success_vs_nfe.png", "success_vs_latency.png"):
        assert (tmp_path / "pooled" / name).stat().st_size > 0
    with pytest.raises(SystemExit, match="pooled once"):
        mod.merge([parts[0], parts[0]])
    with pytest.raises(SystemExit, match="holds one of the inputs"):
        mod.main([str(parts[0]), "--out", str(parts[0].parent)])
    with pytest.raises(SystemExit, match="no such file"):
        mod.merge([tmp_path / "missing.json"])
