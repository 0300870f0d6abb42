"""Episode resets during deployment (SimRobot auto_reset, the Reliability issue): after the robot resets to a new
episode no action planned from an observation of an earlier episode reaches the env (queued actions, chunks in
flight, held commands), and the first policy call of the new episode sees a window made only of the new episode's
first frame. Real Push-T sim, short episodes, a high control rate; events are counted, nothing is timed."""

import json
import time

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from shortcut_policy import cli
from shortcut_policy.deploy import ObservationError, SimRobot, validate_observation
from shortcut_policy.deploy.loop import ControlLoop
from shortcut_policy.envs.pusht import make_env

EPISODE_KEY = "episode"  # shortcut_policy.deploy.robot.EPISODE_KEY (checked below); kept literal so that the
# reset tests above also run, and fail on their assertions, against code without it

MAX_STEPS = 8  # env steps per episode: a reset every ~10 cycles
HZ = 50.0
TA = 4  # actions per chunk of the stand-in policy
N_CYCLES = 150


class EpisodeTagger(gym.Wrapper):
    """Test instrumentation that does not rely on the code under test: every observation gets a key ``tag`` =
    [episode index (number of resets - 1), env steps taken in that episode], and every executed action is recorded
    with the episode it was executed in."""

    def __init__(self, env):
        super().__init__(env)
        self.observation_space = spaces.Dict(
            {**env.observation_space.spaces, "tag": spaces.Box(-np.inf, np.inf, (2,), np.float32)}
        )
        self.episode, self.steps = -1, 0
        self.first_obs: list[np.ndarray] = []  # per episode: its first "obs" frame
        self.executed: list[tuple[np.ndarray, int]] = []  # (action, episode it was executed in)

    def _tag(self, obs):
        return {**obs, "tag": np.array([self.episode, self.steps], np.float32)}

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.episode, self.steps = self.episode + 1, 0
        self.first_obs.append(np.asarray(obs["obs"], np.float32).copy())
        return self._tag(obs), info

    def step(self, action):
        self.executed.append((np.array(action, dtype=np.float64, copy=True), self.episode))
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        return self._tag(obs), reward, terminated, truncated, info


class TaggingPolicy:
    """Policy stand-in: call number c returns TA copies of the target (100 + c, 256) px, so an executed action names
    the call that planned it; every call's observation window is kept. ``hold_across_reset`` (async only): the call
    made near the end of an episode blocks until the sim has reset, so its chunk is certainly in flight across it."""

    def __init__(self, tagger, latency_s=0.0, hold_across_reset=False):
        self.tagger, self.latency_s, self.hold_across_reset = tagger, latency_s, hold_across_reset
        self.windows: list[tuple[np.ndarray, np.ndarray]] = []  # per call: (tag window (To, 2), obs window (To, 20))
        self.held_episodes: set[int] = set()

    def __call__(self, obs):
        c = len(self.windows)
        assert c < 400, "target would leave the 512 px workspace: shorten the run"
        tags = np.asarray(obs["tag"]).copy()
        self.windows.append((tags, np.asarray(obs["obs"]).copy()))
        ep = int(tags[-1, 0])
        if self.latency_s:
            time.sleep(self.latency_s)
        if self.hold_across_reset and tags[-1, 1] >= MAX_STEPS - 3 and ep not in self.held_episodes:
            self.held_episodes.add(ep)
            give_up = time.monotonic() + 5.0
            while self.tagger.episode <= ep and time.monotonic() < give_up:
                time.sleep(0.001)
        return np.tile([100.0 + c, 256.0], (TA, 1))

    def planned_in(self, action) -> np.ndarray:
        """Episode indices of the observation window the call that planned ``action`` saw."""
        return self.windows[int(round(action[0] - 100.0))][0][:, 0].astype(int)


def tagged_robot():
    env = EpisodeTagger(make_env({"env": "pusht", "obs_type": "keypoints", "max_steps": MAX_STEPS}, wrap=False))
    return SimRobot(env, HZ, n_obs_steps=2, auto_reset=True), env


def leaked_actions(tagger, policy) -> int:
    """Env steps that executed an action planned (in part) from an observation of an earlier episode."""
    return sum(int(policy.planned_in(a).min() < ep) for a, ep in tagger.executed)


def first_calls_of_new_episodes(policy) -> dict:
    """{episode >= 1: (tag window, obs window) of the first policy call whose latest frame is from that episode}."""
    out = {}
    for tags, obs in policy.windows:
        ep = int(tags[-1, 0])
        if ep >= 1 and ep not in out:
            out[ep] = (tags, obs)
    return out


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_no_action_planned_in_a_previous_episode_is_executed_after_a_reset(mode):
    robot, tagger = tagged_robot()
    policy = TaggingPolicy(tagger, latency_s=1.5 / HZ if mode == "async" else 0.0, hold_across_reset=(mode == "async"))
    loop = ControlLoop(robot, policy, {"obs": (20,), "tag": (2,)}, 2, mode=mode, expected_latency_s=1.5 / HZ)
    st = loop.run(N_CYCLES, seed=100000)
    assert robot.closed and tagger.episode >= 2, f"only {tagger.episode} resets: the test needs a few"
    executed_after_reset = [(a, ep) for a, ep in tagger.executed if ep >= 1]
    assert executed_after_reset, "no action was executed in a later episode"
    assert leaked_actions(tagger, policy) == 0
    # the first call of each new episode sees only that episode's first frame, repeated n_obs_steps times
    firsts = first_calls_of_new_episodes(policy)
    assert len(firsts) >= 1
    for ep, (tags, obs) in firsts.items():
        assert (tags[:, 0] == ep).all() and (tags[:, 1] == 0).all(), (ep, tags)
        np.testing.assert_array_equal(obs, np.repeat(tagger.first_obs[ep][None], 2, axis=0))
    # the loop saw the resets and accounted for what it threw away
    assert tagger.episode - 1 <= st.episode_resets <= tagger.episode
    s = st.summary()
    assert s["episode_resets"] == st.episode_resets == len(st.resets)
    assert s["reset_discarded_chunks"] == sum(r["queued_chunks"] + r["in_flight_chunks"] for r in st.resets)
    assert s["reset_discarded_actions"] == sum(r["queued_actions"] for r in st.resets)
    assert all(r["episode"] >= 1 and 0 <= r["cycle"] < N_CYCLES for r in st.resets)
    if mode == "async":  # the call held across a reset landed afterwards and was thrown away
        assert len(policy.held_episodes) >= 1 and sum(r["in_flight_chunks"] for r in st.resets) >= 1
    # every policy call's latency is recorded, discarded ones included (async: the last may still be in flight)
    assert len(policy.windows) - (mode == "async") <= len(st.inference_s) <= len(policy.windows)


def test_sim_robot_reset_restarts_the_window_and_forgets_the_old_episode_commands():
    now = [0.0]
    r = SimRobot(
        make_env({"env": "pusht", "obs_type": "keypoints", "max_steps": 3}, wrap=False),
        10.0,
        n_obs_steps=2,
        clock=lambda: now[0],
        auto_reset=True,
    )
    r.start(seed=100000)
    obs = r.get_observation()
    assert list(obs[EPISODE_KEY]) == [0, 0]
    r.send_action(obs["obs"][-1, -2:] + 30.0, t_exec=0.0, episode=0)
    now[0] = 0.31  # 3 ticks: the 3-step episode ends at t = 0.3
    obs = r.get_observation()
    assert r.episode == 1 and r.n_env_steps == 3 and len(r.episodes) == 1
    # the window restarts from the new first frame (repeated, as at start), not [old last, new first]
    assert list(obs[EPISODE_KEY]) == [1, 1] and list(obs["timestamp"]) == pytest.approx([0.3, 0.3])
    np.testing.assert_array_equal(obs["obs"][0], obs["obs"][1])
    now[0] = 0.51  # the command held from episode 0 is not applied in episode 1
    obs = r.get_observation()
    assert r.n_env_steps == 3 and list(obs[EPISODE_KEY]) == [1, 1]
    r.send_action(obs["obs"][-1, -2:] + 30.0, t_exec=0.5, episode=0)  # planned in episode 0, arrived late
    now[0] = 0.71
    r.get_observation()
    assert r.n_env_steps == 3 and r.n_reset_dropped_commands == 1 and r.info()["reset_dropped_commands"] == 1
    r.send_action(obs["obs"][-1, -2:] + 30.0, t_exec=0.7, episode=1)
    now[0] = 0.81
    obs = r.get_observation()
    assert r.n_env_steps == 4 and list(obs[EPISODE_KEY]) == [1, 1] and r.info()["episode"] == 1
    with pytest.raises(ValueError, match="episode 5"):
        r.send_action(obs["obs"][-1, -2:], t_exec=0.8, episode=5)
    r.close()


def test_episode_window_keeps_only_the_latest_episode():
    """A robot that only tags its frames (its own window spans the reset) still gives the policy a clean window."""
    from shortcut_policy.deploy import robot
    from shortcut_policy.deploy.loop import episode_window

    assert robot.EPISODE_KEY == EPISODE_KEY
    obs = {
        "obs": np.arange(6, dtype=np.float32).reshape(3, 2),
        "timestamp": np.array([0.0, 0.1, 0.2]),
        EPISODE_KEY: np.array([3, 4, 4]),
    }
    w = episode_window(obs, {"obs": (2,)}, 3)
    np.testing.assert_array_equal(w["obs"], [[2, 3], [2, 3], [4, 5]])
    w = episode_window({**obs, EPISODE_KEY: np.array([3, 3, 4])}, {"obs": (2,)}, 2)
    np.testing.assert_array_equal(w["obs"], [[4, 5], [4, 5]])
    w = episode_window({"obs": obs["obs"], "timestamp": obs["timestamp"]}, {"obs": (2,)}, 2)  # untagged: as is
    np.testing.assert_array_equal(w["obs"], [[2, 3], [4, 5]])


def test_episode_key_is_validated():
    good = {"obs": np.zeros((2, 20), np.float32), "timestamp": np.zeros(2), EPISODE_KEY: np.array([0, 1])}
    validate_observation(good, {"obs": [20]}, 2)
    with pytest.raises(ObservationError, match="'episode' has shape"):
        validate_observation({**good, EPISODE_KEY: np.array([0, 1, 1])}, {"obs": [20]}, 2)
    with pytest.raises(ObservationError, match="'episode' must not decrease"):
        validate_observation({**good, EPISODE_KEY: np.array([1, 0])}, {"obs": [20]}, 2)
    with pytest.raises(ObservationError, match="'episode' must hold integers"):
        validate_observation({**good, EPISODE_KEY: np.array([0.5, 1.0])}, {"obs": [20]}, 2)


def test_deploy_verb_records_resets_in_result_and_timeline(tmp_path_factory, tmp_path):
    from test_deploy import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path_factory)
    res = cli.run_verb(
        "deploy",
        [
            f"checkpoint={ckpt}",
            "hz=50",
            "n_steps=60",
            "warmup=2",
            "mode=sync",
            "auto_reset=true",
            "robot.max_steps=8",
            "status=false",
            f"run_dir={tmp_path}",
        ],
    )
    assert res["episode_resets"] >= 1 and res["episodes"] >= 1
    assert res["reset_discarded_chunks"] >= 0 and res["reset_discarded_actions"] >= 0
    timeline = json.loads((tmp_path / "timeline.json").read_text())
    assert len(timeline["resets"]) == res["episode_resets"]
    assert sum(r["queued_chunks"] + r["in_flight_chunks"] for r in timeline["resets"]) == res["reset_discarded_chunks"]
