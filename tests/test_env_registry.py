"""The env registry: a new environment is one module (tests/toy_reach_env.py) plus ONE registry entry, and then
every verb works on it through the CLI: demos, train (with its rollout evaluation), eval (checkpoint and
expert), deploy. The task and robot configs are YAML files on an extra Hydra search path, as a user would add them."""

import json
import subprocess
import sys

import numpy as np
import pytest
import toy_reach_env as toy

from shortcut_policy import cli
from shortcut_policy.envs import registry
from shortcut_policy.envs.registry import EnvSpec, register_env

TOY_TASK = """\
name: toy_reach
env: toy_reach
obs_shapes: {obs: [4]}
lowdim_keys: [obs]
image_keys: []
action_dim: 2
horizon: 8
n_obs_steps: 2
n_action_steps: 4
max_steps: 40
control_hz: 50
kind: policy
dataset:
  zarr_path: %(zarr)s
  obs_keys: {obs: [obs]}
  action_keys: [action]
  image_keys: []
  val_ratio: 0.0
  max_train_episodes: null
  seed: 42
eval:
  n_episodes: 2
  seed_start: 100000
  n_workers: 1
  n_videos: 0
"""
TOY_ROBOT = "kind: sim\nname: sim_toy_reach\nenv: toy_reach\nmax_steps: 40\ncontrol_hz: 50\n"
TINY = [
    "net=unet1d_small",
    "net.down_dims=[16,32]",
    "net.step_embed_dim=16",
    "logger=none",
    "train.batch_size=8",
    "train.log_every=1",
    "train.warmup_steps=1",
    "train.threads=1",
]


@pytest.fixture
def toy_env():
    """THE registry entry of the toy env (module-level objects: picklable, so it reaches spawned workers)."""
    spec = register_env("toy_reach", EnvSpec(make=toy.make, expert=toy.ReachExpert))
    yield spec
    registry.unregister_env("toy_reach")


@pytest.fixture
def configs(tmp_path):
    """An extra config directory with configs/task/toy_reach.yaml and configs/robot/toy_reach.yaml."""
    root = tmp_path / "configs"
    (root / "task").mkdir(parents=True)
    (root / "robot").mkdir()
    (root / "task" / "toy_reach.yaml").write_text(TOY_TASK % {"zarr": tmp_path / "toy.zarr"})
    (root / "robot" / "toy_reach.yaml").write_text(TOY_ROBOT)
    return [f"hydra.searchpath=[file://{root}]"]


def test_a_registered_env_runs_demos_train_eval_and_deploy_through_the_cli(tmp_path, toy_env, configs):
    # demos: the default writer records the expert's successful episodes (every observation key + action)
    res = cli.run_verb(
        "demos",
        [*configs, "task=toy_reach", "n_episodes=6", f"out={tmp_path / 'toy.zarr'}", f"run_dir={tmp_path / 'demos'}"],
    )
    assert res["n_episodes"] == 6 and res["n_dropped"] == 0 and (tmp_path / "toy.zarr").is_dir()

    # train: a few steps of a tiny net, with the trainer's rollout evaluation (env workers) at the last step
    run = tmp_path / "train"
    res = cli.run_verb(
        "train", [*configs, "task=toy_reach", *TINY, "train.num_steps=4", "train.eval_every=4", f"run_dir={run}"]
    )
    assert res["steps"] == 4 and "best_test_mean_score" in res
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    evals = [
        json.loads(line) for line in (run / "logs.jsonl").read_text().splitlines() if "eval/test_mean_score" in line
    ]
    assert len(evals) == 1 and evals[0]["eval/n_episodes"] == 2

    # eval: the checkpoint on the env's seeds (workers build the env from the caller's registry entry) ...
    res = cli.run_verb(
        "eval",
        [*configs, "task=toy_reach", f"checkpoint={ckpt}", "steps=[1,2]", "workers=1", f"run_dir={tmp_path / 'eval'}"],
    )
    assert res["n_episodes"] == 2 and res["steps"] == [1, 2] and 0.0 <= res["mean_score@2"] <= 1.0
    # ... and the scripted expert (with a video from the env's render())
    res = cli.run_verb(
        "eval",
        [*configs, "task=toy_reach", "policy=expert", "workers=1", "n_videos=1", f"run_dir={tmp_path / 'expert'}"],
    )
    assert res["success_rate@1"] == 1.0 and len(res["videos"]) == 1

    # deploy: the registry's simulated robot (default SimRobot) runs the bare env in real time
    res = cli.run_verb(
        "deploy",
        [
            *configs,
            "robot=toy_reach",
            f"checkpoint={ckpt}",
            "n_steps=10",
            "warmup=2",
            "mode=sync",
            "status=false",
            f"run_dir={tmp_path / 'deploy'}",
        ],
    )
    # every one of the 10 control ticks ran or, when a loaded machine made a cycle overrun, was counted as skipped
    assert res["env_steps"] > 0 and res["cycles"] >= 1 and res["cycles"] + res["skipped_ticks"] == 10


def test_make_env_wraps_every_registered_env_the_same_way(toy_env):
    from shortcut_policy.envs.wrappers import MultiStepWrapper, VideoRecorder

    task = {"env": "toy_reach", "n_obs_steps": 3, "n_action_steps": 2, "max_steps": 5}
    env = registry.make_env(task, video=True)
    assert isinstance(env, MultiStepWrapper) and isinstance(env.env, VideoRecorder) and env.env.enabled
    obs, _ = env.reset(seed=0)
    assert obs["obs"].shape == (3, 4) and env.max_episode_steps == 5 and env.n_action_steps == 2
    assert isinstance(registry.make_env(task, wrap=False), toy.ToyReachEnv)


def test_register_env_rules(toy_env):
    assert "toy_reach" in registry.registered_envs()
    assert register_env("toy_reach", EnvSpec(make=toy.make, expert=toy.ReachExpert)) == toy_env  # equal: no-op
    with pytest.raises(ValueError, match="already registered"):
        register_env("toy_reach", EnvSpec(make=toy.make))
    register_env("toy_reach", "test_env_registry:_STRING_SPEC", replace=True)  # "module:attr" naming an EnvSpec
    assert registry.get_env_spec("toy_reach").make == "toy_reach_env:make"
    assert registry.stage_names("toy_reach") == ()
    with pytest.raises(ValueError, match=r"no scripted expert for env='toy_reach'"):
        registry.expert_class("toy_reach")
    with pytest.raises(ValueError, match=r"env='nowhere': unknown environment; expected one of \[.*'pusht'"):
        registry.make_env({"env": "nowhere"})
    with pytest.raises(TypeError, match="expected an EnvSpec"):
        register_env("bad", toy.make)
    register_env("missing_dep", EnvSpec(make="no_such_module_xyz:make", requires=("no-such-dist",)))
    try:
        with pytest.raises(ValueError, match=r"needs no_such_module_xyz, which is not available .*no-such-dist"):
            registry.make_env({"env": "missing_dep"})
    finally:
        registry.unregister_env("missing_dep")


_STRING_SPEC = EnvSpec(make="toy_reach_env:make")


def test_builtin_entries_are_lazy_and_complete():
    import shortcut_policy.envs.transport as T

    for name in ("pusht", "transport"):
        spec = registry.get_env_spec(name)
        assert all(isinstance(r, str) for r in (spec.make, spec.expert, spec.demos, spec.sim_robot))
    assert registry.stage_names("transport") == T.TASK_STAGES and registry.stage_names("pusht") == ()
    # importing the CLI, the registry and the rollout runner loads neither robosuite/mujoco nor an env module
    code = (
        "import sys, shortcut_policy.cli, shortcut_policy.envs.registry, shortcut_policy.eval.rollout, "
        "shortcut_policy.deploy.sim_robot; bad = [m for m in ('robosuite', 'mujoco', 'pygame', "
        "'shortcut_policy.envs.pusht', 'shortcut_policy.envs.transport', 'torch') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_default_demos_writer_keeps_only_successes(tmp_path, toy_env):
    from omegaconf import OmegaConf

    from shortcut_policy.datasets.replay_buffer import ReplayBuffer
    from shortcut_policy.envs.demos import expert_demos

    out = tmp_path / "d.zarr"
    cfg = OmegaConf.create(
        {"task": {"env": "toy_reach", "max_steps": 3}, "n_episodes": 2, "out": str(out), "max_attempts": 40, "seed": 0}
    )
    res = expert_demos(cfg, tmp_path)  # 3 steps reach the goal only from close starts: some attempts dropped
    assert res["n_episodes"] == 2 and res["n_dropped"] > 0
    rb = ReplayBuffer.copy_from_path(out)
    assert set(rb.keys()) == {"obs", "action"} and rb["obs"].shape[1:] == (4,) and rb["action"].shape[1:] == (2,)
    assert np.all(np.diff(np.asarray(rb.episode_ends)) > 0)
    with pytest.raises(FileExistsError, match="overwrite=true"):
        expert_demos(cfg, tmp_path)
