"""CLI reliability (the Reliability issue): one live command per run directory (flock), run directories owned by
one verb, the verb preflight hook, cleanup of temp files left by killed atomic writes, evaluations whose episodes
crash, and one-line errors instead of tracebacks.

The run-directory mechanics are exercised through a tiny fake command module (this file) registered under the
`bench` verb name (so configs/bench.yaml composes); its behaviour is chosen with `+fake.mode=...` /
`+fake.preflight=...` overrides. Commands that must run in another process use `python -c` with the same fake.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

from shortcut_policy import cli

TESTS_DIR = str(Path(__file__).resolve().parent)
MODULE = Path(__file__).stem  # importable by this name (tests/ is on sys.path; also in spawned eval workers)
CALLS: list[str] = []  # fake commands that ran in this process


# --- the fake verb module ---------------------------------------------------------------------------------
def fake_command(cfg, run_dir):
    """Behaviour by `fake.mode`: ok | wait (touch `started`, wait for `release`) | keyerror | valueerror |
    filenotfound | interrupt | gl (import mujoco: fails when MUJOCO_GL names no backend)."""
    mode = cfg.fake.mode
    CALLS.append(mode)
    run_dir = Path(run_dir)
    if mode == "wait":
        (run_dir / "started").touch()
        deadline = time.monotonic() + 60
        while not (run_dir / "release").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("fake wait: no release file within 60 s")
            time.sleep(0.05)
        return {"waited": True}
    if mode == "keyerror":
        raise KeyError("nokey")
    if mode == "valueerror":
        raise ValueError("fake.mode='valueerror': expected ok")
    if mode == "filenotfound":
        open(run_dir / "missing_input.txt")
    if mode == "interrupt":
        raise KeyboardInterrupt
    if mode == "gl":
        import mujoco  # noqa: F401
    return {"value": 1}


def _lock_is_held(run_dir) -> bool:
    """Whether some open file description holds the flock on run_dir/.lock (a new one cannot take it)."""
    with open(Path(run_dir) / ".lock", "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return False


def fake_command_preflight(cfg, run_dir):
    """`fake.preflight`: absent -> None; refuse -> ValueError; notes -> what the hook saw when it was called."""
    what = cfg.fake.get("preflight", None)
    if what == "refuse":
        raise ValueError("fake.preflight='refuse': this run_dir cannot be resumed with these settings")
    if what == "notes":
        run_dir = Path(run_dir)
        return {
            "lock_held": _lock_is_held(run_dir),
            "config_written": (run_dir / "config.yaml").exists(),
            "marker_written": (run_dir / "run.json").exists(),
            "run_dir_in_cfg": cfg.run_dir == str(run_dir),
        }
    return None


def plain_command(cfg, run_dir):
    """A command without a `_preflight` hook."""
    CALLS.append("plain")
    return {"plain": True}


class FlakyExpert:
    """Push-T expert stand-in: raises on seeds divisible by 3 (an env/expert exception: status `error`), holds the
    agent still otherwise (a fast, finished episode)."""

    def __init__(self, seed):
        self.seed = seed

    def reset(self, env):
        if self.seed % 3 == 0:
            raise RuntimeError(f"flaky sensor on seed {self.seed}")

    def act(self, env):
        return env.unwrapped.get_state()[:2].copy()


# --- fixtures / helpers -----------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Run in tmp_path (a default run_dir would land there, never in the repository's runs/)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SHORTCUT_POLICY_DEBUG", raising=False)
    CALLS.clear()


@pytest.fixture
def fake_verb(monkeypatch):
    monkeypatch.setitem(cli.VERBS, "bench", (MODULE, "fake_command"))


def _spawn_cli(args, cwd, env_extra=None, fake: str | None = "fake_command"):
    """`shortcut-policy <args>` in a new process (the `bench` verb replaced by `fake` unless None)."""
    patch = f"cli.VERBS['bench'] = ({MODULE!r}, {fake!r}); " if fake else ""
    code = f"import sys; from shortcut_policy import cli; {patch}sys.exit(cli.main(sys.argv[1:]))"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        **(env_extra or {}),
        "PYTHONPATH": os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("SHORTCUT_POLICY_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(path: Path, proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {path} appeared: {proc.stderr.read()}")
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


def _error_line(err: str) -> str:
    """The stderr of a failed command: exactly one `error: ...` line and no traceback."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("error: "), err
    assert sum(ln.startswith("error: ") for ln in lines) == 1, err
    return lines[-1]


# --- A: one live command per run directory ----------------------------------------------------------------
def test_second_command_on_a_locked_run_dir_fails_at_once_and_a_killed_holder_releases_it(tmp_path, fake_verb, capsys):
    run_dir = tmp_path / "run"
    holder = _spawn_cli(["bench", "+fake.mode=wait", f"run_dir={run_dir}"], cwd=tmp_path)
    try:
        _wait_for(run_dir / "started", holder)
        t0 = time.monotonic()
        assert cli.main(["bench", "+fake.mode=ok", f"run_dir={run_dir}"]) == 1
        assert time.monotonic() - t0 < 5  # fails at once, does not wait for the holder
        line = _error_line(capsys.readouterr().err)
        assert f"run_dir {run_dir} is in use" in line and f"pid {holder.pid}" in line, line
        assert CALLS == [] and not (run_dir / "metrics.json").exists()  # the refused command ran nothing
        assert (run_dir / ".lock").read_text().split() == [str(holder.pid)]
        (run_dir / "release").touch()
        out, err = holder.communicate(timeout=60)
        assert holder.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1][len("RESULT ") :]) == {"waited": True}
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    # the lock ended with the command
    assert cli.main(["bench", "+fake.mode=ok", f"run_dir={run_dir}"]) == 0 and not _lock_is_held(run_dir)

    # a killed holder (SIGKILL: no cleanup code runs) leaves the .lock file but not the lock: resuming works
    (run_dir / "started").unlink()
    (run_dir / "release").unlink()
    holder = _spawn_cli(["bench", "+fake.mode=wait", f"run_dir={run_dir}"], cwd=tmp_path)
    try:
        _wait_for(run_dir / "started", holder)
        assert _lock_is_held(run_dir)
        holder.kill()
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert (run_dir / ".lock").exists() and not _lock_is_held(run_dir)
    capsys.readouterr()
    assert cli.main(["bench", "+fake.mode=ok", f"run_dir={run_dir}"]) == 0
    assert json.loads((run_dir / "metrics.json").read_text()) == {"value": 1}


# --- B: a run directory belongs to one verb ---------------------------------------------------------------
def test_other_verb_is_refused_by_the_run_marker_and_the_same_verb_resumes(tmp_path, fake_verb, capsys):
    run_dir = tmp_path / "mine"
    assert cli.main(["bench", "+fake.mode=ok", f"run_dir={run_dir}"]) == 0
    assert json.loads((run_dir / "run.json").read_text())["verb"] == "bench"
    before = {p: (run_dir / p).read_bytes() for p in ("config.yaml", "metrics.json", "run.json")}
    capsys.readouterr()
    assert cli.main(["eval", "policy=expert", "n_episodes=1", "progress=false", f"run_dir={run_dir}"]) == 1
    line = _error_line(capsys.readouterr().err)
    assert f"run_dir {run_dir} belongs to a 'bench' run" in line and "'eval' would overwrite" in line, line
    assert f"choose another run_dir, e.g. run_dir={tmp_path / 'eval'}" in line, line
    assert {p: (run_dir / p).read_bytes() for p in before} == before  # nothing replaced
    # the same verb on its own directory (resume) is allowed
    assert cli.main(["bench", "+fake.mode=ok", f"run_dir={run_dir}"]) == 0
    assert CALLS == ["ok", "ok"]


def test_legacy_training_dir_without_marker_is_detected(tmp_path, capsys):
    """A train run made before run.json existed: checkpoints/ (or, failing that, its config.yaml's keys) show it."""
    from omegaconf import OmegaConf

    train_yaml = OmegaConf.to_yaml(cli.compose("train", []))
    old = tmp_path / "old_train"
    (old / "checkpoints").mkdir(parents=True)
    (old / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    (old / "config.yaml").write_text(train_yaml)
    (old / "metrics.json").write_text('{"steps": 10}')
    assert cli.main(["eval", "policy=expert", "n_episodes=1", f"run_dir={old}"]) == 1
    line = _error_line(capsys.readouterr().err)
    assert f"run_dir {old} belongs to a 'train' run (it has checkpoints/)" in line, line
    assert (old / "config.yaml").read_text() == train_yaml and (old / "metrics.json").read_text() == '{"steps": 10}'
    assert not (old / "run.json").exists()

    cfg_only = tmp_path / "cfg_only"
    cfg_only.mkdir()
    (cfg_only / "config.yaml").write_text(train_yaml)
    assert cli.main(["eval", "policy=expert", "n_episodes=1", f"run_dir={cfg_only}"]) == 1
    line = _error_line(capsys.readouterr().err)
    assert "belongs to a 'train' run (its config.yaml has the keys of configs/train.yaml)" in line, line
    assert (cfg_only / "config.yaml").read_text() == train_yaml


def test_legacy_dir_of_the_same_verb_is_adopted(tmp_path, fake_verb):
    run_dir = tmp_path / "old_bench"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(__import__("omegaconf").OmegaConf.to_yaml(cli.compose("bench", [])))
    assert cli.main(["bench", "+fake.mode=ok", f"run_dir={run_dir}"]) == 0
    assert json.loads((run_dir / "run.json").read_text())["verb"] == "bench"


# --- C: the verb preflight hook ---------------------------------------------------------------------------
def test_preflight_runs_under_the_lock_before_anything_is_written(tmp_path, fake_verb):
    run_dir = tmp_path / "pre"
    res = cli.run_verb("bench", ["+fake.mode=ok", "+fake.preflight=notes", f"run_dir={run_dir}"])
    notes = {"lock_held": True, "config_written": False, "marker_written": False, "run_dir_in_cfg": True}
    assert res == {"value": 1, "preflight": notes}
    assert json.loads((run_dir / "metrics.json").read_text())["preflight"] == notes


def test_preflight_refusal_writes_nothing(tmp_path, fake_verb, capsys):
    run_dir = tmp_path / "refused"
    assert cli.main(["bench", "+fake.mode=ok", "+fake.preflight=refuse", f"run_dir={run_dir}"]) == 1
    assert _error_line(capsys.readouterr().err) == (
        "error: fake.preflight='refuse': this run_dir cannot be resumed with these settings"
    )
    assert CALLS == []  # the command never ran
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"] and not _lock_is_held(run_dir)


def test_verb_without_preflight_and_the_train_hook_name(tmp_path, monkeypatch):
    monkeypatch.setitem(cli.VERBS, "bench", (MODULE, "plain_command"))
    assert cli.run_verb("bench", [f"run_dir={tmp_path / 'plain'}"]) == {"plain": True}
    import importlib

    module, fn = cli.VERBS["train"]
    assert callable(getattr(importlib.import_module(module), fn + "_preflight", None))  # what run_verb calls


# --- D: temp files of killed atomic writes ----------------------------------------------------------------
def test_stale_temp_files_are_removed_at_start_live_ones_kept(tmp_path, fake_verb, capsys):
    run_dir = tmp_path / "tmpfiles"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"verb": "bench"}))
    dead = int(
        subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
        ).stdout
    )
    live = subprocess.Popen(["sleep", "60"])
    try:
        # the names atomic_write_text and save_checkpoint give their temp files: .<name>.tmp<pid>
        stale = [run_dir / f".metrics.json.tmp{dead}", run_dir / "checkpoints" / f".last.ckpt.tmp{dead}"]
        kept = [
            run_dir / f".config.yaml.tmp{live.pid}",
            run_dir / "notes.tmp123",
            run_dir / "checkpoints" / "last.ckpt",
        ]
        for p in stale + kept:
            p.write_text("partial")
        assert cli.main(["bench", "+fake.mode=ok", f"run_dir={run_dir}"]) == 0
        assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
        assert "note: removed 2 stale temp file(s)" in capsys.readouterr().err
    finally:
        live.kill()
        live.wait()


# --- E: evaluations whose episodes crash ------------------------------------------------------------------
def test_eval_where_every_episode_crashes_fails_with_the_cause(tmp_path, capsys):
    run_dir = tmp_path / "bad_env"
    rc = cli.main(
        [
            "eval",
            "policy=expert",
            "task=pusht_lowdim",
            "n_episodes=2",
            "workers=1",
            "progress=false",
            "+task.local_keypoints=[[1,2]]",
            f"run_dir={run_dir}",
        ]
    )
    assert rc == 1
    line = _error_line(capsys.readouterr().err)
    assert line.startswith("error: eval: all 2 episodes crashed at steps=1"), line
    assert "first: seed 100000" in line and "ValueError: local_keypoints: expected shape (9, 2), got (1, 2)" in line
    assert f"{run_dir / 'per_seed.csv'}" in line
    assert (run_dir / "per_seed.csv").exists() and not (run_dir / "metrics.json").exists()


def test_eval_crashes_above_the_default_share_fail_below_it_are_reported(tmp_path, capsys):
    common = [
        "eval",
        "policy=expert",
        "task=pusht_lowdim",
        "task.max_steps=5",
        "n_episodes=3",
        "seed_start=30",
        "workers=1",
        "n_videos=0",
        "progress=false",
        f"expert={MODULE}:FlakyExpert",
    ]
    # 1 of 3 crashed > max_crash_fraction 0.1 (configs/eval.yaml)
    assert cli.main(common + [f"run_dir={tmp_path / 'strict'}"]) == 1
    line = _error_line(capsys.readouterr().err)
    assert "1 of 3 episodes crashed at steps=1 (seeds [30]), more than max_crash_fraction=0.1 allows" in line, line
    assert "first: seed 30 (error): RuntimeError: flaky sensor on seed 30" in line, line

    run_dir = tmp_path / "lenient"
    assert cli.main(common + ["max_crash_fraction=0.5", f"run_dir={run_dir}"]) == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out.strip().splitlines()[-1][len("RESULT ") :])
    assert res["n_crashed@1"] == 1 and res["n_ran@1"] == 2 and res["crashed_seeds@1"] == [30]
    rows = json.loads((run_dir / "per_seed.json").read_text())
    ran = [r["max_reward"] for r in rows if r["status"] == "ok"]
    assert len(ran) == 2 and res["mean_score@1"] == pytest.approx(sum(ran) / 2)  # over the episodes that ran
    assert res["success_ci95@1"] == [round(x, 4) for x in cli_report().wilson_interval(0, 2)]
    assert len(res["warnings"]) == 1 and "RuntimeError: flaky sensor on seed 30" in res["warnings"][0]
    assert "warning: 1 of 3 episodes crashed at steps=1 (seeds [30])" in captured.err


def cli_report():
    from shortcut_policy.eval import report

    return report


def test_summary_and_crash_cause():
    report = cli_report()
    rows = [
        {"seed": 1, "max_reward": 1.0, "success": True, "status": "ok"},
        {"seed": 2, "max_reward": 0.5, "success": False, "status": "ok"},
        {"seed": 3, "max_reward": 0.9, "success": False, "status": "timeout"},
    ]
    m = report.summarize(rows, 2, exclude_crashed=True)
    assert m["success_rate@2"] == 0.5 and m["mean_score@2"] == 0.75
    assert m["n_crashed@2"] == 1 and m["n_ran@2"] == 2 and m["crashed_seeds@2"] == [3]
    try:
        raise ValueError("task.max_steps=0: expected an integer >= 1\nsecond line")
    except ValueError:
        tb = traceback.format_exc()
    assert report.crash_cause(tb) == "ValueError: task.max_steps=0: expected an integer >= 1 second line"
    assert report.crash_cause(f"worker crashed while running seed 7: {tb}") == (
        "ValueError: task.max_steps=0: expected an integer >= 1 second line (worker crashed while running seed 7)"
    )
    assert report.crash_cause("worker timeout while running seed 7: no reply within 4 s") == (
        "worker timeout while running seed 7: no reply within 4 s"
    )
    from shortcut_policy.eval.rollout import evaluate

    with pytest.raises(ValueError, match=r"max_crash_fraction=1.5: expected a number in \[0, 1\] or null"):
        evaluate({"env": "pusht"}, n_episodes=1, max_crash_fraction=1.5)


# --- F: one-line errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, expected",
    [
        (["train", "train.lr="], "error: override 'train.lr=': no value given for train.lr, which is "),
        (["train", "task=nope"], "error: task=nope: no such option in config group 'task'"),
        (["train", "+task.foo=[[1,2]"], "error: cannot parse override '+task.foo=[[1,2]': "),
        (
            ["train", "train.nokey=1"],
            "error: unknown config key 'train.nokey': train has no key 'nokey'; valid keys of train: ",
        ),
        (["eval", "policy=random"], "error: policy='random': expected 'expert' or 'checkpoint'"),
        (["frobnicate"], "error: unknown verb 'frobnicate'; expected one of train, eval,"),
    ],
)
def test_config_and_validation_errors_are_one_line(tmp_path, capsys, args, expected):
    run_dir = tmp_path / "r"
    assert cli.main(args + [f"run_dir={run_dir}"]) == 1
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(expected), line
    if "task=nope" in args:
        assert "valid options: " in line and "pusht_lowdim" in line
    if "train.lr=" in args:
        assert re.search(
            r"which is [0-9.e-]+ in the train config; give a value \(train.lr=[0-9.e-]+\) or "
            r"train.lr=null$",
            line,
        ), line
    if args[0] == "train":  # composition errors stop before the run directory is made
        assert not run_dir.exists()


def test_missing_files_and_command_errors_are_one_line(tmp_path, capsys, fake_verb):
    missing = tmp_path / "nowhere" / "last.ckpt"
    assert cli.main(["eval", f"checkpoint={missing}", f"run_dir={tmp_path / 'e'}"]) == 1
    line = _error_line(capsys.readouterr().err)
    assert str(missing) in line and "no such file" in line and "check the path" in line, line
    assert cli.main(["bench", "+fake.mode=filenotfound", f"run_dir={tmp_path / 'f'}"]) == 1
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {tmp_path / 'f' / 'missing_input.txt'}: no such file or directory; check the path")
    assert cli.main(["bench", "+fake.mode=keyerror", f"run_dir={tmp_path / 'k'}"]) == 1
    assert _error_line(capsys.readouterr().err).startswith("error: missing key 'nokey' (run shortcut-policy --debug")
    assert cli.main(["bench", "+fake.mode=interrupt", f"run_dir={tmp_path / 'i'}"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"


def test_debug_flag_and_env_show_the_traceback(tmp_path, capsys, fake_verb, monkeypatch):
    assert cli.main(["--help"]) == 0 and "--debug" in capsys.readouterr().out
    with pytest.raises(ValueError, match="fake.mode='valueerror'"):
        cli.main(["--debug", "bench", "+fake.mode=valueerror", f"run_dir={tmp_path / 'a'}"])
    monkeypatch.setenv("SHORTCUT_POLICY_DEBUG", "1")
    with pytest.raises(ValueError, match="fake.mode='valueerror'"):
        cli.main(["bench", "+fake.mode=valueerror", f"run_dir={tmp_path / 'b'}"])
    monkeypatch.setenv("SHORTCUT_POLICY_DEBUG", "0")
    assert cli.main(["bench", "+fake.mode=valueerror", f"run_dir={tmp_path / 'c'}"]) == 1
    assert _error_line(capsys.readouterr().err) == "error: fake.mode='valueerror': expected ok"


def test_cli_process_prints_one_line_for_a_bad_override_and_an_opengl_failure(tmp_path):
    """Real processes: `python -m shortcut_policy.cli train train.lr=` and a command whose OpenGL backend cannot
    start (MUJOCO_GL names no backend: mujoco refuses to import)."""
    p = subprocess.run(
        [sys.executable, "-m", "shortcut_policy.cli", "train", "train.lr=", f"run_dir={tmp_path / 't'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "SHORTCUT_POLICY_DEBUG": ""},
    )
    assert p.returncode == 1 and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith("error: override 'train.lr=': no value given for train.lr, which is ")
    assert p.stderr.strip().endswith("or train.lr=null")
    gl = _spawn_cli(
        ["bench", "+fake.mode=gl", f"run_dir={tmp_path / 'gl'}"],
        cwd=tmp_path,
        env_extra={"MUJOCO_GL": "nonexistent_backend"},
    )
    out, err = gl.communicate(timeout=120)
    assert gl.returncode == 1, err
    line = _error_line(err)
    assert "MUJOCO_GL" in line and "nonexistent_backend" in line and "osmesa" in line, line


def test_unknown_config_key_names_the_key_the_group_and_the_valid_keys(capsys):
    """A typo such as objective.bootstrap_fracton fails before anything runs, listing the group's valid keys."""
    assert cli.main(["train", "objective.bootstrap_fracton=0.5", "logger=none"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "objective.bootstrap_fracton" in err[0] and "bootstrap_fraction" in err[0]
    assert "valid keys of objective" in err[0]
