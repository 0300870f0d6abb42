"""Scripted Push-T expert with privileged state: greedy search over push primitives on a physics model.

How it works (the env facts it relies on are those of :mod:`shortcut_policy.envs.pusht`):

* **Model.** A separate pymunk space built by :func:`shortcut_policy.envs.pusht.build_space` (same walls, agent, T,
  inertia and CoG) replicates the env. The agent is kinematic, so its path depends only on the action targets:
  it is computed in closed form (the 10-substep PD map is linear in position, velocity and target) and the
  physics runs only for control steps whose agent substeps come near the block (``space.damping = 0`` makes
  the block quasi-static: it does not move otherwise).
* **Deadbeat tracking.** A plan is a list of waypoints, one per control step; each action target is chosen so
  that the agent lands exactly on the next waypoint at the end of the step (the agent would lag and cut
  corners if waypoints were used as targets directly).
* **Push primitive** (block frame): pick a face of the T and a contact point on it; travel there around the
  T's convex hull inflated by the agent radius + a margin, approach along the face normal, push along the
  (slightly tilted) inward normal by a sampled depth at a sampled speed, retreat back out of contact.
* **Search.** ~``n_candidates`` random primitives are rolled out on the model, success (coverage > 0.95) is
  tested inside each rollout after every control step; the best (earliest success, else lowest pose error
  + a small per-step cost) few are refined by perturbation; the best is executed, then the expert re-plans.
* **Learnability / variety.** Travel at ~15 px per step (smoother, human-like), speeds, margins and tilt
  randomised from the expert's seed: different seeds give different demonstrations of the same start.

API: ``expert = PushTExpert(seed); expert.reset(env); action = expert.act(env)`` (one (2,) target per env step)
or ``expert.plan(env)`` -> (K, 2) targets of the next primitive. ``env`` may be wrapped (``env.unwrapped``
must be a :class:`~shortcut_policy.envs.pusht.PushTEnv`).

Demonstrations: :func:`demos` (the ``demos`` verb for ``task.env=pusht``) runs :func:`pusht_episode` per seed, in
worker processes, and writes the successful episodes in Diffusion Policy's zarr layout.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from tqdm import tqdm

from shortcut_policy.datasets.replay_buffer import ReplayBuffer
from shortcut_policy.envs import pusht as P
from shortcut_policy.utils import atomic_path, check_int, default_workers, limit_opencv_threads

R = P.AGENT_RADIUS

# ---------------------------------------------------------------------------------------------------------
# Closed-form agent kinematics. Per substep: v' = (1 - k_v dt) v + k_p dt (u - p); p' = p + v' dt (the env's PD
# update followed by pymunk's integration of a kinematic body). Per control step the map is linear.
_Msub = np.array([[1 - P.K_P * P.DT**2, (1 - P.K_V * P.DT) * P.DT], [-P.K_P * P.DT, 1 - P.K_V * P.DT]])
_bsub = np.array([P.K_P * P.DT**2, P.K_P * P.DT])
_SUB_A = np.zeros((P.N_SUBSTEPS, 2, 2))  # state after substep j+1 = _SUB_A[j] @ (p, v) + _SUB_B[j] * u
_SUB_B = np.zeros((P.N_SUBSTEPS, 2))
_a, _b = np.eye(2), np.zeros(2)
for _j in range(P.N_SUBSTEPS):
    _a, _b = _Msub @ _a, _Msub @ _b + _bsub
    _SUB_A[_j], _SUB_B[_j] = _a, _b
A_STEP, B_STEP = _SUB_A[-1], _SUB_B[-1]


def track_waypoints(p0, v0, waypoints, max_lead: float | None = None):
    """Deadbeat targets for waypoints (K, 2): returns targets U (K, 2), substep positions (K, 10, 2),
    substep velocities (K, 10, 2), and the states (p, v) at the start of each control step (K, 2) x 2.
    With ``max_lead`` the target is kept within that distance of the agent (no target jumps at sharp
    reversals; the agent then lands near, not on, that waypoint — the returned trajectory is the true one)."""
    W = np.asarray(waypoints, dtype=np.float64)
    K = len(W)
    U = np.empty((K, 2))
    Ps = np.empty((K, 2))
    Vs = np.empty((K, 2))
    px, py = float(p0[0]), float(p0[1])
    vx, vy = float(v0[0]), float(v0[1])
    a00, a01, a10, a11 = (float(x) for x in A_STEP.reshape(-1))
    b0, b1 = float(B_STEP[0]), float(B_STEP[1])
    for k, (wx, wy) in enumerate(W.tolist()):
        Ps[k] = px, py
        Vs[k] = vx, vy
        ux = (wx - a00 * px - a01 * vx) / b0
        uy = (wy - a00 * py - a01 * vy) / b0
        if max_lead is not None:
            lead = math.hypot(ux - px, uy - py)
            if lead > max_lead:
                f = max_lead / lead
                ux, uy = px + (ux - px) * f, py + (uy - py) * f
        U[k] = ux, uy
        vx, px = a10 * px + a11 * vx + b1 * ux, a00 * px + a01 * vx + b0 * ux
        vy, py = a10 * py + a11 * vy + b1 * uy, a00 * py + a01 * vy + b0 * uy
    sub_p = (
        _SUB_A[None, :, 0, 0, None] * Ps[:, None]
        + _SUB_A[None, :, 0, 1, None] * Vs[:, None]
        + _SUB_B[None, :, 0, None] * U[:, None]
    )
    sub_v = (
        _SUB_A[None, :, 1, 0, None] * Ps[:, None]
        + _SUB_A[None, :, 1, 1, None] * Vs[:, None]
        + _SUB_B[None, :, 1, None] * U[:, None]
    )
    return U, sub_p, sub_v, Ps, Vs


# ---------------------------------------------------------------------------------------------------------
# Geometry of the T in its body frame.
_OUTLINE = np.array([(-60, 0), (60, 0), (60, 30), (15, 30), (15, 120), (-15, 120), (-15, 30), (-60, 30)], float)
_HULL = np.array([(-60, 0), (60, 0), (60, 30), (15, 120), (-15, 120), (-60, 30)], float)
_CORNERS = _OUTLINE  # pose error = mean distance of these 8 points to their goal positions


def _outward_normals(poly: np.ndarray) -> np.ndarray:
    d = np.roll(poly, -1, axis=0) - poly
    n = np.stack([d[:, 1], -d[:, 0]], axis=1)
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    centroid = poly.mean(axis=0)
    mid = poly + d / 2
    flip = np.sum((mid - centroid) * n, axis=1) < 0  # make them point away from the centroid (convex use)
    n[flip] *= -1
    return n


def _faces():
    """Pushable faces of the T outline: (start, end, outward normal, min/max contact parameter along the face).
    Near the two concave corners (+-15, 30) the agent circle cannot reach closer than R to the other face."""
    normals = [(0, -1), (1, 0), (0, 1), (1, 0), (0, 1), (-1, 0), (0, 1), (-1, 0)]
    out = []
    for i, n in enumerate(normals):
        a, b = _OUTLINE[i], _OUTLINE[(i + 1) % len(_OUTLINE)]
        L = float(np.linalg.norm(b - a))
        lo = R if i in (3, 6) else 0.0  # stem right side / bar underside left start at a concave corner
        hi = L - R if i in (2, 5) else L  # bar underside right / stem left side end at a concave corner
        out.append((a, b, np.array(n, float), lo, hi))
    return out


FACES = _faces()
_FACE_W = np.array([f[4] - f[3] for f in FACES])
_FACE_W = _FACE_W / _FACE_W.sum()


def _rot(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def dist_to_tee_local(pts: np.ndarray) -> np.ndarray:
    """Distance from points (..., 2) in the T's body frame to the T (0 inside)."""
    x, y = pts[..., 0], pts[..., 1]
    dx1 = np.maximum(np.maximum(-60 - x, x - 60), 0)
    dy1 = np.maximum(np.maximum(0 - y, y - 30), 0)
    dx2 = np.maximum(np.maximum(-15 - x, x - 15), 0)
    dy2 = np.maximum(np.maximum(30 - y, y - 120), 0)
    return np.minimum(np.hypot(dx1, dy1), np.hypot(dx2, dy2))


def to_local(pts, pos, angle):
    return (np.asarray(pts) - np.asarray(pos)) @ _rot(angle)  # R^T (p - pos) as row vectors


def to_world(pts, pos, angle):
    return np.asarray(pts) @ _rot(angle).T + np.asarray(pos)


_GOAL_CORNERS = to_world(_CORNERS, P.GOAL_POSE[:2], P.GOAL_POSE[2])


def pose_error(pos, angle) -> float:
    return float(np.mean(np.linalg.norm(to_world(_CORNERS, pos, angle) - _GOAL_CORNERS, axis=1)))


# ---------------------------------------------------------------------------------------------------------
class _Inflated:
    """The T's convex hull inflated by ``rad`` (mitred), in world coordinates, for collision-free travel."""

    def __init__(self, pos, angle, rad):
        hull = to_world(_HULL, pos, angle)
        n = _outward_normals(hull)
        n_prev = np.roll(n, 1, axis=0)
        self.v = hull + rad * (n + n_prev) / (1.0 + np.sum(n * n_prev, axis=1, keepdims=True))
        self.n = _outward_normals(self.v)
        d = np.roll(self.v, -1, axis=0) - self.v
        seg = np.linalg.norm(d, axis=1)
        self.cum = np.concatenate([[0.0], np.cumsum(seg)])
        self.perim = self.cum[-1]

    def signed(self, p):  # max over edges of n . (p - v): > 0 outside
        return np.max(np.sum(self.n * (np.asarray(p)[None] - self.v), axis=1))

    def exit_along(self, p, d):
        """Distance t >= 0 along unit d from p (inside) to leave the polygon."""
        den = self.n @ d
        num = np.sum(self.n * (self.v - p[None]), axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(den > 1e-9, num / den, np.inf)
        return float(max(0.0, np.min(t)))

    def seg_clear(self, a, b) -> bool:
        """True if segment a-b does not cross the polygon interior (Cyrus-Beck)."""
        d = b - a
        t0, t1 = 0.0, 1.0
        num = np.sum(self.n * (self.v - a[None]), axis=1)  # inside iff n.(p - v) < 0  <=>  n.d t < num
        den = self.n @ d
        for nu, de in zip(num, den):
            if abs(de) < 1e-12:
                if nu <= 1e-6:
                    return True  # parallel and outside this edge
                continue
            t = nu / de
            if de > 0:
                t1 = min(t1, t)
            else:
                t0 = max(t0, t)
            if t1 - t0 <= 1e-6:
                return True
        return t1 - t0 <= 1e-6

    def visible(self, p) -> np.ndarray:
        front = np.sum(self.n * (np.asarray(p)[None] - self.v), axis=1) > -1e-6
        return front | np.roll(front, 1)  # vertex j: edges j-1 and j

    def path(self, a, b) -> list[np.ndarray]:
        """Shortest path a -> b around the polygon (both outside): intermediate vertices (possibly none)."""
        if self.seg_clear(a, b):
            return []
        nv = len(self.v)
        va, vb = self.visible(a), self.visible(b)
        da = np.where(va, np.linalg.norm(self.v - a, axis=1), np.inf)
        db = np.where(vb, np.linalg.norm(self.v - b, axis=1), np.inf)
        c = self.cum[:nv]
        fwd = (c[None, :] - c[:, None]) % self.perim  # i -> j going forward
        ring = np.minimum(fwd, self.perim - fwd)
        total = da[:, None] + ring + db[None, :]
        i, j = np.unravel_index(int(np.argmin(total)), total.shape)
        if not np.isfinite(total[i, j]):
            return []
        seq = [i]
        step = 1 if fwd[i, j] <= self.perim - fwd[i, j] else -1
        k = i
        while k != j:
            k = (k + step) % nv
            seq.append(k)
        return [self.v[k] for k in seq]


def resample(points: list[np.ndarray], spacing: float) -> list[np.ndarray]:
    """Points every ``spacing`` px along the polyline (excluding its first point, including its last)."""
    pts = np.asarray(points, dtype=np.float64)
    if len(pts) < 2:
        return []
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    L = cum[-1]
    if L < 1e-9:
        return []
    n = max(1, int(np.ceil(L / spacing - 1e-9)))
    s = np.linspace(L / n, L, n)
    x = np.interp(s, cum, pts[:, 0])
    y = np.interp(s, cum, pts[:, 1])
    return list(np.stack([x, y], axis=1))


# ---------------------------------------------------------------------------------------------------------
@dataclass
class Primitive:
    face: int
    u: float  # contact parameter along the face (px)
    depth: float  # how far past first contact the agent centre travels (px)
    tilt: float  # push direction tilt (rad)
    push_speed: float  # px per control step during approach and push
    margin: float  # approach start distance from the face beyond R
    retreat: float  # retreat distance (px)

    def perturbed(self, rng: np.random.Generator) -> "Primitive":
        a, b, _, lo, hi = FACES[self.face]
        return Primitive(
            self.face,
            float(np.clip(self.u + rng.normal(0, 3.0), lo, hi)),
            float(np.clip(self.depth * np.exp(rng.normal(0, 0.3)), 0.5, 120)),
            float(np.clip(self.tilt + rng.normal(0, 0.08), -0.5, 0.5)),
            self.push_speed,
            self.margin,
            self.retreat,
        )


@dataclass
class Rollout:
    prim: Primitive
    targets: np.ndarray  # (K, 2)
    success_step: int | None  # control steps until success (1-based), None if no success
    final_pose: tuple  # (pos(2,), angle)
    err: float
    score: float


class PushTExpert:
    """Greedy model-based push planner (see the module docstring)."""

    def __init__(
        self,
        seed: int = 0,
        n_candidates: int = 64,
        n_refine: int = 4,
        n_perturb: int = 5,
        travel_speed: tuple[float, float] = (13.0, 17.0),
        push_speed: tuple[float, float] = (6.0, 12.0),
        hull_margin: tuple[float, float] = (8.0, 12.0),
        step_cost: float = 0.5,
        max_primitive_steps: int = 80,
        max_lead: float | None = 60.0,
    ):
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.n_candidates = int(n_candidates)
        self.n_refine = int(n_refine)
        self.n_perturb = int(n_perturb)
        self.travel_speed_range = travel_speed
        self.push_speed_range = push_speed
        self.hull_margin_range = hull_margin
        self.step_cost = float(step_cost)
        self.max_primitive_steps = int(max_primitive_steps)
        self.max_lead = None if max_lead is None else float(max_lead)
        self._queue: deque = deque()
        self._space = None
        self.n_plans = 0
        self.n_rollouts = 0
        self.last_prediction = None

    # -- public API -----------------------------------------------------------------------------------------
    def reset(self, env=None) -> None:
        self._queue.clear()
        self.n_plans = 0
        # episode-level style parameters (variety between demonstrations)
        self.travel_speed = float(self.rng.uniform(*self.travel_speed_range))
        self.hull_margin = float(self.rng.uniform(*self.hull_margin_range))
        if self._space is None:
            self._space, self._agent, self._block = P.build_space()

    def act(self, env) -> np.ndarray:
        if self._space is None:
            self.reset(env)
        if not self._queue:
            self._queue.extend(self.plan(env))
        return np.asarray(self._queue.popleft(), dtype=np.float64)

    def plan(self, env, state: np.ndarray | None = None) -> np.ndarray:
        """Targets (K, 2) of the best primitive from the env's current state (or ``state``, get_state layout).
        The primitive is cut at the predicted success step when it reaches the goal."""
        base = env.unwrapped
        if not isinstance(base, P.PushTEnv):
            raise TypeError(f"PushTExpert needs a PushTEnv (possibly wrapped), got {type(base).__name__}")
        if self._space is None:
            self.reset(env)
        st = base.get_state() if state is None else np.asarray(state, dtype=np.float64)
        self.n_plans += 1
        best = self._search(st)
        self.last_prediction = best
        return best.targets

    # -- search ---------------------------------------------------------------------------------------------
    def _sample(self) -> Primitive:
        f = int(self.rng.choice(len(FACES), p=_FACE_W))
        _, _, _, lo, hi = FACES[f]
        return Primitive(
            face=f,
            u=float(self.rng.uniform(lo, hi)),
            depth=float(np.exp(self.rng.uniform(np.log(1.0), np.log(80.0)))),
            tilt=float(self.rng.normal(0, 0.15)),
            push_speed=float(self.rng.uniform(*self.push_speed_range)),
            margin=float(self.rng.uniform(4.0, 8.0)),
            retreat=float(self.rng.uniform(12.0, 22.0)),
        )

    def _search(self, st: np.ndarray) -> Rollout:
        err0 = pose_error(st[2:4], st[4])
        results = self._candidates(st, self.n_candidates)
        best = results[0] if results else None
        if best is None or (best.success_step is None and best.err > err0 - 1.0):
            # stalled (no candidate improves the pose by 1 px at this step cost): search wider and
            # rank by the pose error alone
            results += self._candidates(st, 2 * self.n_candidates)
            results.sort(key=lambda r: (r.score if r.success_step is not None else r.err))
        if not results:
            raise RuntimeError("PushTExpert: no feasible primitive (all candidates longer than max_primitive_steps)")
        return results[0]

    def _candidates(self, st: np.ndarray, n: int) -> list[Rollout]:
        results = [self._rollout(st, self._sample()) for _ in range(n)]
        results = [r for r in results if r is not None]
        results.sort(key=lambda r: r.score)
        for r in results[: self.n_refine]:
            for _ in range(self.n_perturb):
                q = self._rollout(st, r.prim.perturbed(self.rng))
                if q is not None:
                    results.append(q)
        results.sort(key=lambda r: r.score)
        return results

    def _ctx_hull(self, pos, ang) -> "_Inflated":
        key = (float(pos[0]), float(pos[1]), float(ang), self.hull_margin)
        if getattr(self, "_hull_key", None) != key:
            self._hull_key, self._hull = key, _Inflated(pos, ang, R + self.hull_margin)
        return self._hull

    def _waypoints(self, st: np.ndarray, prim: Primitive) -> tuple[list, int]:
        p_agent = st[0:2]
        pos, ang = st[2:4], st[4]
        a, b, n_loc, _, _ = FACES[prim.face]
        t_dir = (b - a) / np.linalg.norm(b - a)
        c_loc = a + t_dir * prim.u
        rot = _rot(ang)
        n = rot @ n_loc
        c = rot @ c_loc + pos
        s = c + n * (R + prim.margin)
        push_dir = _rot(prim.tilt) @ (-n)
        e_push = s + push_dir * (prim.margin + prim.depth)
        e_ret = e_push - push_dir * (prim.retreat + prim.depth * 0.0)
        hull = self._ctx_hull(pos, ang)
        # entry point: leave the inflated hull from the approach start along the face normal
        entry = s + n * (hull.exit_along(s, n) + 0.5) if hull.signed(s) < 0 else s
        # the agent itself may be inside the inflated hull: first move away from the block
        start_pts = [p_agent]
        if hull.signed(p_agent) < 0:
            loc = to_local(p_agent[None], pos, ang)[0]
            d_loc = dist_to_tee_local(loc[None])[0]
            # direction away from the closest point of the T
            eps = 0.5
            gx = dist_to_tee_local((loc + [eps, 0])[None])[0] - dist_to_tee_local((loc - [eps, 0])[None])[0]
            gy = dist_to_tee_local((loc + [0, eps])[None])[0] - dist_to_tee_local((loc - [0, eps])[None])[0]
            g = np.array([gx, gy])
            if np.linalg.norm(g) < 1e-9 or d_loc <= 0:
                g = loc - np.array(P.TEE_COG)
            g = rot @ (g / (np.linalg.norm(g) + 1e-12))
            start_pts.append(p_agent + g * (hull.exit_along(p_agent, g) + 0.5))
        travel = start_pts + hull.path(start_pts[-1], entry) + [entry]
        wps = resample(travel, self.travel_speed)
        wps += resample([entry, s], prim.push_speed) if np.linalg.norm(entry - s) > 1e-6 else []
        n_pre = len(wps)
        wps += resample([s, e_push], prim.push_speed)
        wps += resample([e_push, e_ret], self.travel_speed)
        return wps, n_pre

    def _rollout(self, st: np.ndarray, prim: Primitive) -> Rollout | None:
        wps, _ = self._waypoints(st, prim)
        if not wps or len(wps) > self.max_primitive_steps:
            return None
        self.n_rollouts += 1
        U, sub_p, sub_v, Ps, Vs = track_waypoints(st[0:2], st[5:7], wps, self.max_lead)
        K = len(U)
        pos, ang = np.array(st[2:4], dtype=np.float64), float(st[4])
        near = R + 3.0
        # first control step whose substeps come near the (static) block
        d0 = dist_to_tee_local(to_local(sub_p.reshape(-1, 2), pos, ang)).reshape(K, -1).min(axis=1)
        hits = np.nonzero(d0 < near)[0]
        success_step = None
        if len(hits):
            space, agent, block = self._space, self._agent, self._block
            block.angle = ang  # angle first: setting it rotates about the CoG and would move the origin
            block.position = (float(pos[0]), float(pos[1]))
            block.velocity = (0.0, 0.0)
            block.angular_velocity = 0.0
            k = int(hits[0])
            while k < K:
                agent.position = (float(Ps[k, 0]), float(Ps[k, 1]))
                agent.velocity = (float(Vs[k, 0]), float(Vs[k, 1]))
                for j in range(P.N_SUBSTEPS):
                    agent.velocity = (float(sub_v[k, j, 0]), float(sub_v[k, j, 1]))
                    space.step(P.DT)
                bp = block.position
                pos = np.array([bp.x, bp.y])
                ang = float(block.angle)
                if pose_error(pos, ang) < 6.0 and P.coverage_of_pose(pos, ang) > P.SUCCESS_THRESHOLD:
                    success_step = k + 1
                    break
                # skip ahead over control steps that stay away from the (now static) block
                k += 1
                if k < K:
                    d = dist_to_tee_local(to_local(sub_p[k:].reshape(-1, 2), pos, ang)).reshape(K - k, -1).min(axis=1)
                    nxt = np.nonzero(d < near)[0]
                    if not len(nxt):
                        break
                    k += int(nxt[0])
        err = pose_error(pos, ang)
        if success_step is not None:
            score = -1e6 + success_step
            U = U[:success_step]
        else:
            score = err + self.step_cost * K
        return Rollout(prim, U, success_step, (pos, ang), err, score)


# ---------------------------------------------------------------------------------------------------------
# demonstrations (the `demos` verb)
def pusht_episode(
    env_seed: int, expert_seed: int = 0, max_steps: int = 300, render: bool = True, expert_kwargs: dict | None = None
) -> dict:
    """Run the scripted expert on one Push-T start; returns the recorded episode (DP's fields, images as
    uint8 to keep transfers small) plus ``success``, ``seed``, ``seconds``."""
    t0, c0 = time.perf_counter(), time.process_time()
    env = P.PushTEnv(obs_type="state", max_steps=max_steps)
    _, info = env.reset(seed=int(env_seed))
    ss = np.random.SeedSequence([int(expert_seed), int(env_seed)])
    expert = PushTExpert(seed=int(ss.generate_state(1)[0]), **(expert_kwargs or {}))
    expert.reset(env)
    rec = {"img": [], "state": [], "keypoint": [], "action": [], "n_contacts": []}
    success = False
    for _ in range(max_steps):
        act = expert.act(env)
        if render:
            rec["img"].append(env.render_image())
        rec["state"].append(env.dp_state())
        rec["keypoint"].append(env.block_keypoints())
        rec["action"].append(act)
        rec["n_contacts"].append([info["n_contacts"]])
        _, _, terminated, truncated, info = env.step(act)
        if terminated:
            success = True
            break
        if truncated:
            break
    out = {
        "state": np.asarray(rec["state"], np.float32),
        "keypoint": np.asarray(rec["keypoint"], np.float32),
        "action": np.asarray(rec["action"], np.float32),
        "n_contacts": np.asarray(rec["n_contacts"], np.float32),
    }
    if render:
        out["img"] = np.asarray(rec["img"], np.uint8)
    return {
        "data": out,
        "success": success,
        "seed": int(env_seed),
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "n_steps": len(rec["action"]),
        "coverage": float(info["coverage"]),
    }


def _pusht_job(args):
    return pusht_episode(*args)


def demos(cfg, run_dir: Path) -> dict:
    """The Push-T ``demos`` writer (registry entry ``pusht``): ``shortcut-policy demos task=pusht n_episodes=200
    out=data/pusht_expert.zarr [workers=N seed=S expert_seed=E max_steps=300 images=true overwrite=false]``
    (configs/demos.yaml). Only successful episodes are written, in seed order, in Diffusion Policy's zarr layout
    (fields img, state, keypoint, action, n_contacts). RESULT: ``n_episodes`` (kept), ``n_dropped`` (failed
    attempts, not written), ``seconds``, ``out``, episode-length and timing statistics."""
    n_episodes = check_int("n_episodes", cfg.get("n_episodes", 200), 1)
    seed = check_int("seed", cfg.get("seed", 0), 0)
    expert_seed = check_int("expert_seed", cfg.get("expert_seed", 0), 0)
    max_steps = check_int("max_steps", cfg.get("max_steps", 300), 1)
    workers = cfg.get("workers", None)
    workers = default_workers() if workers in (None, "auto") else check_int("workers", workers, 1)
    max_attempts = check_int("max_attempts", cfg.get("max_attempts", None) or 2 * n_episodes, n_episodes)
    render = bool(cfg.get("images", True))
    out = Path(str(cfg.get("out", "data/pusht_expert.zarr")))
    overwrite = bool(cfg.get("overwrite", False))
    if out.exists() and not overwrite:
        raise FileExistsError(f"demos: {out} already exists; pass overwrite=true to replace it")
    t0 = time.perf_counter()
    # the zarr store is written aside and renamed onto `out` once complete (deleted on an error)
    with atomic_path(out) as tmp:
        rb = ReplayBuffer.create_empty_zarr(tmp, zarr_format=2)
        kept_seeds, dropped_seeds, lengths, ep_secs, ep_cpu = [], [], [], [], []
        pending: dict[int, dict] = {}
        next_seed = seed  # next start to submit
        next_write = seed  # next seed to write (episodes are written in seed order, whatever the worker order)

        def consume(res):
            pending[res["seed"]] = res
            nonlocal next_write
            while next_write in pending:
                r = pending.pop(next_write)
                next_write += 1
                if r["success"]:
                    if len(kept_seeds) < n_episodes:
                        rb.add_episode(
                            {k: (v.astype(np.float32) if k == "img" else v) for k, v in r["data"].items()},
                            compressors="disk",
                        )
                        kept_seeds.append(r["seed"])
                        lengths.append(r["n_steps"])
                else:
                    dropped_seeds.append(r["seed"])
                ep_secs.append(r["seconds"])
                ep_cpu.append(r["cpu_seconds"])

        bar = tqdm(total=n_episodes, desc="demos pusht", unit="ep", dynamic_ncols=True)
        try:
            if workers == 1:
                while len(kept_seeds) < n_episodes and next_seed - seed < max_attempts:
                    before = len(kept_seeds)
                    consume(pusht_episode(next_seed, expert_seed, max_steps, render))
                    next_seed += 1
                    bar.update(len(kept_seeds) - before)
                    bar.set_postfix(dropped=len(dropped_seeds))
            else:
                ctx = mp.get_context("spawn")
                with ctx.Pool(workers, initializer=limit_opencv_threads) as pool:
                    while len(kept_seeds) < n_episodes and next_seed - seed < max_attempts:
                        need = min(n_episodes - len(kept_seeds), max_attempts - (next_seed - seed))
                        jobs = [(s, expert_seed, max_steps, render) for s in range(next_seed, next_seed + need)]
                        next_seed += need
                        for res in pool.imap_unordered(_pusht_job, jobs):
                            before = len(kept_seeds)
                            consume(res)
                            bar.update(len(kept_seeds) - before)
                            bar.set_postfix(dropped=len(dropped_seeds))
        finally:
            bar.close()
        if rb.n_episodes == 0:
            raise RuntimeError(f"demos: no successful episode in {next_seed - seed} attempts")
        root = zarr.open_group(str(tmp), mode="r+", zarr_format=2)
        root.attrs.update(
            {
                "generator": "shortcut_policy.envs.experts.pusht.PushTExpert",
                "env": "pusht",
                "episode_seeds": [int(s) for s in kept_seeds],
                "dropped_seeds": [int(s) for s in dropped_seeds],
                "expert_seed": expert_seed,
                "max_steps": max_steps,
            }
        )
    seconds = time.perf_counter() - t0
    result = {
        "n_episodes": len(kept_seeds),
        "n_dropped": len(dropped_seeds),
        "seconds": round(seconds, 2),
        "out": str(out),
        "n_steps": int(sum(lengths)),
        "mean_episode_length": float(np.mean(lengths)),
        "max_episode_length": int(max(lengths)),
        "workers": workers,
        "worker_seconds_per_episode": round(float(np.mean(ep_secs)), 3),
        "cpu_seconds_per_episode": round(float(np.mean(ep_cpu)), 3),
        "cpu_seconds_total": round(float(np.sum(ep_cpu)), 1),
    }
    if len(kept_seeds) < n_episodes:
        result["warning"] = f"only {len(kept_seeds)} of {n_episodes} episodes succeeded in {max_attempts} attempts"
    return result


pusht_demos = demos  # the name before the env registry
