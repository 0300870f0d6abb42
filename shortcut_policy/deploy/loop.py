"""Fixed-rate control loop executing timestamped action chunks (sync or async inference); run by `deploy`
(:mod:`shortcut_policy.commands.deploy`).

Cycle j is scheduled at T_j = t0 + j dt (t0 = the robot's tick 0). Each cycle: wait (sleep, then spin the last
``spin_s``) until T_j; read the observation (validated); merge any finished chunk into the ActionQueue (stale
actions dropped); send the action for T_j. Inference:
  sync  - when the queue holds no action beyond T_j, infer in the loop thread on this cycle's observation (blocking);
  async - a background thread infers; a request (the current observation) is made when the queued future actions
          drop below ``margin`` = ceil(expected latency / dt) + 1 ticks, so the next chunk lands before the queue runs
          dry; the robot keeps executing the current chunk meanwhile.
Action k of a chunk is due at obs_time + k dt (Diffusion Policy). A deadline miss is a control tick at which no planned
action was available in time (the queue ran dry, or the loop overran and skipped the tick; in sync mode the first
action of a chunk computed within the period is dropped as stale, as DP, without counting a miss): the robot holds the
last action sent (explicitly re-sent when the loop runs the cycle) and the miss is counted. The loop never tries to
catch up a burst of skipped ticks. ``close()`` is always called on the robot (normal end, KeyboardInterrupt, errors).

The policy may run in another process or machine (``deploy policy=remote``: :mod:`shortcut_policy.deploy.server`):
its ``policy_fn`` then also receives the window's capture times and the loop is otherwise unchanged (a network delay
is inference latency: absorbed by the stale-action drop, or a deadline miss with the last action held).

Episode resets (:mod:`shortcut_policy.deploy.robot`, "Episode resets"): when the latest frame's "episode" id
changes, nothing planned in the old episode is executed in the new one: the queued actions are discarded, a chunk
still in flight (async) is discarded when it lands, the held action is forgotten (no deadline-miss hold until the
new episode has a chunk: those ticks are ``reset_wait_ticks``), and the policy's window is rebuilt from the new
episode's frames only (``episode_window``: the first frame repeated, as the evaluation env wrapper does after
reset). Actions are sent with the episode they were planned in, so the robot can drop one that a reset overtook.
Each reset is recorded in ``LoopStats.resets`` (cycle, episode, queued chunks/actions and in-flight chunks
discarded), in the result and in timeline.json.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..action_queue import ActionQueue, ceil_ticks
from .robot import EPISODE_KEY, TIMESTAMP_KEY, ObservationError, validate_observation


def wait_until(t: float, spin_s: float = 0.002, clock=time.perf_counter) -> float:
    """Sleep until ``spin_s`` before ``t``, then busy-wait (low jitter); returns the time reached."""
    while True:
        now = clock()
        left = t - now
        if left <= 0:
            return now
        if left > spin_s:
            time.sleep(left - spin_s)


def episode_window(obs, obs_shapes, n_obs_steps: int) -> dict:
    """The policy's input from one robot observation: the last ``n_obs_steps`` frames of each key in ``obs_shapes``
    ({key: (To, ...)}). If ``obs`` carries episode ids (EPISODE_KEY, validated), frames of an earlier episode than
    the latest frame's are replaced by the latest episode's first frame in the window, so right after a reset the
    policy sees that first frame repeated (as MultiStepWrapper after reset), never a mix of two episodes."""
    out = {k: np.asarray(obs[k])[-n_obs_steps:] for k in obs_shapes}
    if EPISODE_KEY not in obs:
        return out
    ep = np.asarray(obs[EPISODE_KEY])[-n_obs_steps:]
    first = int(np.argmax(ep == ep[-1]))  # ids never decrease: the latest episode's frames are a suffix
    if first == 0:
        return out
    return {k: np.concatenate([np.repeat(v[first : first + 1], first, axis=0), v[first:]]) for k, v in out.items()}


def _pct(x, q):
    """The q-th percentile of ``x`` as a float (NaN for an empty list)."""
    return float(np.percentile(np.asarray(x, dtype=np.float64), q)) if len(x) else float("nan")


@dataclass
class LoopStats:
    """What a :class:`ControlLoop` run measured: per-cycle work time, period and start jitter (seconds), inference
    latencies, and counts of deadline misses, skipped / startup / absorbed / reset-wait ticks, stale actions, chunks
    and episode resets; ``stopped_by`` is "n_steps", "episode_end" or "interrupt"."""

    hz: float
    mode: str
    cycles: int = 0
    busy_s: list = field(default_factory=list)  # work time inside each cycle (obs, queue, send, sync inference)
    period_s: list = field(default_factory=list)  # actual interval between consecutive cycle starts
    jitter_s: list = field(default_factory=list)  # |actual cycle start - scheduled|
    inference_s: list = field(default_factory=list)  # latency of each policy call
    deadline_misses: int = 0
    skipped_ticks: int = 0
    startup_ticks: int = 0
    absorbed_ticks: int = 0  # sync: ticks whose action was late only by this cycle's within-period inference
    stale_dropped: int = 0
    over_budget: int = 0
    chunks: int = 0  # chunks merged into the queue (a chunk discarded because of a reset is not counted)
    reset_wait_ticks: int = 0  # ticks after a reset before the new episode's first chunk (the robot stands still)
    # one entry per episode reset seen: {"cycle", "episode" (the new id), "queued_chunks", "queued_actions"
    # (discarded from the queue), "in_flight_chunks" (inferences started before the reset, discarded on landing)}
    resets: list = field(default_factory=list)
    stopped_by: str = "n_steps"

    @property
    def episode_resets(self) -> int:
        return len(self.resets)

    @property
    def reset_discarded_chunks(self) -> int:
        return sum(r["queued_chunks"] + r["in_flight_chunks"] for r in self.resets)

    @property
    def reset_discarded_actions(self) -> int:
        return sum(r["queued_actions"] for r in self.resets)

    def summary(self) -> dict:
        """The run's figures as a flat dict: percentiles (p50, p99) in milliseconds and the counters."""
        ms = lambda v: 1e3 * v  # noqa: E731
        return {
            "hz": self.hz,
            "mode": self.mode,
            "cycles": self.cycles,
            "cycle_p50_ms": ms(_pct(self.busy_s, 50)),
            "cycle_p99_ms": ms(_pct(self.busy_s, 99)),
            "period_p50_ms": ms(_pct(self.period_s, 50)),
            "period_p99_ms": ms(_pct(self.period_s, 99)),
            "jitter_p50_ms": ms(_pct(self.jitter_s, 50)),
            "jitter_p99_ms": ms(_pct(self.jitter_s, 99)),
            "inference_p50_ms": ms(_pct(self.inference_s, 50)),
            "inference_p99_ms": ms(_pct(self.inference_s, 99)),
            "deadline_misses": self.deadline_misses,
            "skipped_ticks": self.skipped_ticks,
            "startup_ticks": self.startup_ticks,
            "absorbed_ticks": self.absorbed_ticks,
            "stale_dropped": self.stale_dropped,
            "over_budget": self.over_budget,
            "chunks": self.chunks,
            "episode_resets": self.episode_resets,
            "reset_discarded_chunks": self.reset_discarded_chunks,
            "reset_discarded_actions": self.reset_discarded_actions,
            "reset_wait_ticks": self.reset_wait_ticks,
            "stopped_by": self.stopped_by,
        }


class _Worker(threading.Thread):
    """Background inference: one request at a time; the result (chunk, obs_time, latency s, episode of the
    observation) is picked up by the loop thread."""

    def __init__(self, policy_fn, torch_threads: int | None):
        super().__init__(daemon=True, name="policy-inference")
        self.policy_fn, self.torch_threads = policy_fn, torch_threads
        self._cv = threading.Condition()
        self._request = None
        self._result = None
        self._busy = False
        self._stopping = False
        self.error: BaseException | None = None

    def run(self):
        """Thread body: wait for a request, run ``policy_fn`` on it, store (chunk, obs_time, latency s, episode); an
        exception is kept in ``error`` and ends the thread."""
        if self.torch_threads:
            import torch  # lazy: the loop runs any policy_fn (an exported ONNX policy needs no torch)

            torch.set_num_threads(int(self.torch_threads))
        while True:
            with self._cv:
                while self._request is None and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                obs, obs_time, episode = self._request
                self._request = None
            try:
                t = time.perf_counter()
                chunk = self.policy_fn(obs)
                lat = time.perf_counter() - t
                with self._cv:
                    self._result = (chunk, obs_time, lat, episode)
                    self._busy = False
            except BaseException as e:  # surfaced in the loop thread
                with self._cv:
                    self.error, self._busy = e, False
                return

    @property
    def busy(self) -> bool:
        with self._cv:
            return self._busy or self._request is not None

    def submit(self, obs, obs_time, episode=None):
        """Request inference on ``obs`` (captured at ``obs_time``, in ``episode``), replacing one not yet started."""
        with self._cv:
            self._request, self._busy = (obs, obs_time, episode), True
            self._cv.notify()

    def take(self):
        """The finished result (chunk, obs_time, latency s, episode), or None; taking it clears it."""
        with self._cv:
            r, self._result = self._result, None
            return r

    def stop(self):
        """Ask the thread to exit once the current inference (if any) is done."""
        with self._cv:
            self._stopping = True
            self._cv.notify()


class ControlLoop:
    """Run ``policy_fn(obs) -> (Ta, Da)`` on ``robot`` at ``hz``; obs holds (To, ...) arrays (no batch dim)."""

    def __init__(
        self,
        robot,
        policy_fn,
        obs_shapes,
        n_obs_steps: int,
        hz: float | None = None,
        mode: str = "async",
        tolerance_s: float | None = None,
        ensemble_k: float | None = None,
        expected_latency_s: float = 0.0,
        spin_s: float = 0.002,
        torch_threads: int | None = 1,
        status=None,
        status_every_s: float = 0.5,
        switch_interval_s: float | None = None,
        rt_priority: int = 0,
    ):
        if mode not in ("sync", "async"):
            raise ValueError(f"mode={mode!r}: expected sync | async")
        self.robot, self.policy_fn, self.mode = robot, policy_fn, mode
        self.obs_shapes, self.n_obs_steps = dict(obs_shapes), int(n_obs_steps)
        self.hz = float(hz or robot.control_hz)
        if abs(self.hz - robot.control_hz) > 1e-9:
            raise ValueError(
                f"hz={self.hz} differs from the robot's control rate {robot.control_hz}: build the robot at that rate"
            )
        self.dt = 1.0 / self.hz
        self.tolerance = getattr(robot, "latch_s", 0.25 * self.dt) if tolerance_s is None else float(tolerance_s)
        self.ensemble_k, self.spin_s, self.torch_threads = ensemble_k, spin_s, torch_threads
        self.margin = max(1, ceil_ticks(expected_latency_s, self.dt) + 1)
        self.status, self.status_every_s = status, status_every_s
        self.switch_interval_s = switch_interval_s
        self.rt_priority = int(rt_priority or 0)
        self.rt_applied = False

    def _set_realtime(self):
        """Opt-in SCHED_FIFO for the loop thread (async mode only: the loop thread then only waits, reads, sends;
        inference stays at normal priority). Returns what to restore, or None (not requested / not permitted)."""
        if self.rt_priority <= 0 or self.mode != "async" or not hasattr(os, "SCHED_FIFO"):
            return None
        try:
            old = (os.sched_getscheduler(0), os.sched_getparam(0))
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(self.rt_priority))
        except (PermissionError, OSError) as e:
            print(
                f"warning: rt_priority={self.rt_priority}: SCHED_FIFO not permitted ({e}); running at normal priority",
                file=sys.stderr,
            )
            return None
        self.rt_applied = True
        return old

    def _observe(self):
        """The robot's current observation, validated against the policy's spec (``ObservationError`` otherwise)."""
        obs = self.robot.get_observation()
        validate_observation(obs, self.obs_shapes, self.n_obs_steps)
        return obs

    def _policy_obs(self, obs):
        """The policy's input window {key: (To, ...)} from an observation (frames of the latest episode only), plus
        the frames' "timestamp" (To,) for a ``policy_fn`` with ``accepts_timestamps`` (a remote policy sends them)."""
        window = episode_window(obs, self.obs_shapes, self.n_obs_steps)
        if getattr(self.policy_fn, "accepts_timestamps", False):
            window[TIMESTAMP_KEY] = np.asarray(obs[TIMESTAMP_KEY], dtype=np.float64)[-self.n_obs_steps :]
        if getattr(self.policy_fn, "accepts_episodes", False) and EPISODE_KEY in obs:
            window[EPISODE_KEY] = np.asarray(obs[EPISODE_KEY])[-self.n_obs_steps :]
        return window

    def _send(self, action, t_exec, episode):
        """Send ``action`` for time ``t_exec`` (s), tagged with ``episode`` when the robot reports episodes."""
        if episode is None:  # a robot without episode ids (protocol before resets were signalled)
            self.robot.send_action(action, t_exec)
        else:
            self.robot.send_action(action, t_exec, episode=episode)

    def run(self, n_steps: int, seed: int | None = None) -> LoopStats:
        """Start the robot (``seed``) and run ``n_steps`` control cycles of 1/hz seconds (fewer if the robot reports
        ``done``); returns the LoopStats (episode resets in ``stats.resets``). The robot is closed on every exit.
        Raises ObservationError for an observation that fails validation or whose episode id goes back or
        disappears, RuntimeError (chained) if the inference thread failed, and whatever the policy raises in sync
        mode; KeyboardInterrupt stops the loop (``stopped_by="interrupt"``) instead of propagating."""
        stats = LoopStats(self.hz, self.mode)
        worker = None
        # optional: a shorter GIL switch interval than Python's 5 ms lets the loop thread take the GIL back sooner
        # while the inference thread runs Python code between torch ops
        old_switch = sys.getswitchinterval()
        if self.switch_interval_s:
            sys.setswitchinterval(float(self.switch_interval_s))
        rt_restore = None
        try:
            if self.mode == "async":
                worker = _Worker(self.policy_fn, self.torch_threads)
                worker.start()  # before the RT switch: threads inherit the scheduling policy of their creator
                rt_restore = self._set_realtime()
            elif self.torch_threads:
                import torch  # lazy: the loop runs any policy_fn (an exported ONNX policy needs no torch)

                torch.set_num_threads(int(self.torch_threads))
            self._run(stats, n_steps, seed, worker)
        except KeyboardInterrupt:
            stats.stopped_by = "interrupt"
            if self.status:
                self.status("\ninterrupted: stopping the robot", final=True)
        finally:
            try:
                self.robot.close()  # stop the robot first; an in-flight inference may still take a while
            finally:
                if rt_restore is not None:
                    os.sched_setscheduler(0, *rt_restore)
                sys.setswitchinterval(old_switch)
                if worker is not None:
                    worker.stop()
                    worker.join(timeout=30.0)  # let an in-flight inference finish before the interpreter can exit
        return stats

    def _infer(self, obs, stats):
        """Run the policy on ``obs`` in the calling thread (sync mode), recording the latency; returns the chunk (Ta,
        Da)."""
        t = time.perf_counter()
        chunk = self.policy_fn(self._policy_obs(obs))
        stats.inference_s.append(time.perf_counter() - t)
        return chunk

    def _run(self, stats, n_steps, seed, worker):
        """The cycle loop of :meth:`run` (see the module docstring for the per-cycle steps); fills ``stats``."""
        robot = self.robot
        t0 = robot.start(seed)
        queue = ActionQueue(t0, self.dt, self.tolerance, self.ensemble_k)
        last_action, started = None, False
        episode = None  # id of the episode the loop is acting in (None: the robot reports none)
        prev_start, next_status = None, t0
        j = 0
        while j < n_steps and not robot.done:
            sched = t0 + j * self.dt
            start = wait_until(sched, self.spin_s)
            stats.jitter_s.append(abs(start - sched))
            if prev_start is not None:
                stats.period_s.append(start - prev_start)
            prev_start = start
            obs = self._observe()
            planned_here = False
            obs_time = float(obs[TIMESTAMP_KEY][-1])
            ep = int(obs[EPISODE_KEY][-1]) if EPISODE_KEY in obs else None
            if ep != episode:
                if episode is not None and (ep is None or ep < episode):
                    raise ObservationError(
                        f"observation {EPISODE_KEY!r} went from {episode} to {ep}: episode ids "
                        f"must be reported on every observation and never decrease"
                    )
                if episode is not None:  # the robot reset: void everything planned in the old episode
                    n_actions, n_chunks = queue.discard()
                    stats.resets.append(
                        {
                            "cycle": j,
                            "episode": ep,
                            "queued_chunks": n_chunks,
                            "queued_actions": n_actions,
                            "in_flight_chunks": 0,
                        }
                    )
                    last_action, started = None, False
                episode = ep
            if worker is not None:
                if worker.error is not None:
                    raise RuntimeError(f"inference thread failed: {worker.error!r}") from worker.error
                res = worker.take()
                if res is not None:
                    chunk, c_time, lat, c_ep = res
                    stats.inference_s.append(lat)
                    if c_ep != episode:  # started before a reset: planned from the old episode
                        stats.resets[-1]["in_flight_chunks"] += 1
                    else:
                        stats.stale_dropped += queue.add_chunk(chunk, c_time, time.perf_counter())
                        stats.chunks += 1
                        started = True
            elif not queue.has(sched):  # sync: plan now, on this cycle's observation (blocking)
                planned_here = True
                chunk = self._infer(obs, stats)
                stats.stale_dropped += queue.add_chunk(chunk, obs_time, time.perf_counter())
                stats.chunks += 1
                started = True
            action = queue.pop(sched)
            # sync: the cycle's own (within-deadline) inference makes its first action late; like DP it is dropped
            # and the robot keeps the previous target for this tick: latency absorbed, not a deadline miss
            absorbed = planned_here and stats.inference_s[-1] <= self.dt
            if action is not None:
                last_action = action
                self._send(action, sched, episode)
            elif not started:
                if stats.resets:
                    stats.reset_wait_ticks += 1
                else:
                    stats.startup_ticks += 1
            else:  # no action on time: hold the last safe action (none yet: the robot stands still)
                if absorbed:
                    stats.absorbed_ticks += 1
                else:
                    stats.deadline_misses += 1
                if last_action is not None:
                    self._send(last_action, sched, episode)
            if worker is not None and not worker.busy and queue.remaining(sched) < self.margin:
                worker.submit(self._policy_obs(obs), obs_time, episode)
            now = time.perf_counter()
            stats.busy_s.append(now - start)
            stats.cycles += 1
            if self.status and now >= next_status:
                next_status = now + self.status_every_s
                self.status(self._status_line(j, stats))
            j += 1
            nxt = t0 + j * self.dt
            if now > nxt + self.tolerance:  # overran: skip the ticks already past, do not burst
                skip = int(math.floor((now - t0) / self.dt)) + 1 - j
                skip = min(skip, n_steps - j)
                stats.skipped_ticks += skip
                if started:
                    stats.deadline_misses += skip
                j += skip
        stats.over_budget = queue.n_over_budget
        if robot.done:
            stats.stopped_by = "episode_end"
        if self.status:
            self.status(self._status_line(j - 1, stats), final=True)

    def _status_line(self, j, stats):
        """One status line: mode, rate, step, last jitter and inference time (ms), misses and the robot's reward."""
        info = self.robot.info()
        lat = f"{1e3 * stats.inference_s[-1]:6.1f}" if stats.inference_s else "   -  "
        jit = 1e3 * stats.jitter_s[-1] if stats.jitter_s else float("nan")
        return (
            f"[{self.mode} {self.hz:g} Hz] step {j + 1:4d}  jitter {jit:5.2f} ms  infer {lat} ms  "
            f"misses {stats.deadline_misses:3d}  reward {info.get('reward', 0.0):.3f}  "
            f"max {info.get('max_reward', 0.0):.3f}"
        )


# ----------------------------------------------------------------------------------------------------------------
def status_printer(stream=None):
    """A live one-line status callback for ControlLoop(status=...) (carriage-return redraws on ``stream``)."""

    def status(line, final=False):
        out = stream or sys.stderr
        out.write("\r" + line + ("\n" if final else ""))
        out.flush()

    return status


def measure_latency(policy_fn, obs, n: int) -> list[float]:
    """Wall-clock seconds of ``n`` consecutive ``policy_fn(obs)`` calls (a list)."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        policy_fn(obs)
        out.append(time.perf_counter() - t)
    return out


def sustainable(latency_s: float, mode: str, n_action_steps: int, hz: float) -> tuple[bool, float]:
    """(ok, highest sustainable rate in Hz) for an inference latency L at period dt = 1/hz.

    sync: L <= dt. async: action k of a chunk is due k periods after its observation, so a chunk arrives with only
    its actions k >= ceil(L/dt) still in the future; the next chunk (observed at the earliest ceil(L/dt) ticks later,
    once the previous inference is done) must land before those run out: ceil(L/dt) + L/dt <= Ta. The highest rate
    meeting that is floor(Ta/2)/L (with n = ceil(L/dt) the condition is L/dt <= min(n, Ta - n), largest at
    n = floor(Ta/2))."""
    if mode == "sync":
        return latency_s <= 1.0 / hz, 1.0 / max(latency_s, 1e-9)
    x = latency_s * hz  # latency in periods
    ok = math.ceil(x - 1e-9) + x <= n_action_steps
    return ok, (n_action_steps // 2) / max(latency_s, 1e-9)


def make_policy_fn(policy, steps: int, seed: int | None = None, hz: float | None = None):
    """A ``policy_fn(obs) -> (Ta, Da)`` for the control loop: ``obs`` = {key: (To, ...)} gets a batch dim of 1 and
    goes through ``policy.predict_action`` with ``steps`` sampling steps and a torch generator seeded ``seed`` (on the
    policy's device). Raises ``ValueError`` for an invalid step count.

    With ``policy.warm_start`` set (deploy ``warm_start=``), every chunk after the first of an episode starts from the
    previous chunk (:meth:`Policy.predict_chunk`), shifted by the control ticks between the two observations'
    timestamps (``hz``, Hz, is required then): the function asks the loop for the frames' timestamps and episode ids
    (``accepts_timestamps``, ``accepts_episodes``) and starts from noise again after an episode reset, or when the
    shift is not in [0, horizon)."""
    import torch  # lazy: this module runs without torch for non-torch policies (see ControlLoop)

    steps = policy.check_steps(steps)
    gen = torch.Generator(device=policy.device)
    if seed is not None:
        gen.manual_seed(int(seed))
    warm = policy.check_warm_start(getattr(policy, "warm_start", None), steps) is not None
    if warm and not (hz and float(hz) > 0):
        raise ValueError(f"warm_start={policy.warm_start}: needs the control rate hz > 0 to align chunks, got {hz!r}")
    last: dict = {}  # warm start: the previous chunk's window, observation time (s) and episode id

    def fn(obs):
        batch = {
            k: np.asarray(v, dtype=np.float32)[None] for k, v in obs.items() if k not in (TIMESTAMP_KEY, EPISODE_KEY)
        }
        if not warm:
            return policy.predict_action(batch, steps=steps, generator=gen)[0]
        t = float(np.asarray(obs[TIMESTAMP_KEY])[-1])
        episode = int(np.asarray(obs[EPISODE_KEY])[-1]) if EPISODE_KEY in obs else None
        prior = None
        if last and last["episode"] == episode:
            shift = int(round((t - last["t"]) * float(hz)))
            if 0 <= shift < policy.horizon:
                prior = policy.next_prior(last["window"], shift)
        actions, window = policy.predict_chunk(batch, steps=steps, generator=gen, prior=prior)
        last.update(window=window, t=t, episode=episode)
        return actions[0]

    if warm:
        fn.accepts_timestamps = fn.accepts_episodes = True
    fn.reset = last.clear  # forget the previous chunk (after warm-up inferences: the first real chunk is from noise)
    return fn
