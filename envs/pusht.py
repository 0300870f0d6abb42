"""Push-T on pymunk 6, matching Diffusion Policy's ``PushTEnv`` (Chi et al. 2023).

Written from the published description of that environment (Diffusion Policy's paper and its released
``diffusion_policy/env/pusht/pusht_env.py``; checks against it in docs/results/pusht_env.md); the numbers below are
the ones that define it:

* 512 x 512 px world, gravity 0, ``space.damping = 0`` (the block is quasi-static: it moves only while pushed),
  four static wall segments of radius 2 along x, y in {5, 506}.
* Agent: KINEMATIC circle of radius 15, velocity-driven by a PD law on the absolute target (x, y):
  ``acc = k_p (target - pos) + k_v (0 - vel)``, k_p = 100, k_v = 20, ``vel += acc dt`` then ``space.step(dt)``,
  10 substeps of dt = 0.01 per 10 Hz action. Actions are not clipped.
* Block "T" (scale 30): bar x in [-60, 60], y in [0, 30]; stem x in [-15, 15], y in [30, 120]; mass 1;
  moment = 2 x moment_for_poly(bar) (the original passes the bar's vertices twice: kept);
  centre of gravity = mean of the two shape centroids = (0, 45). ``friction = 1`` is set on the *bodies*
  (not the shapes), so every contact is frictionless (quirk kept).
* Goal pose (256, 256, pi/4). coverage = area(goal T  intersect  block T) / area(goal T) (shapely);
  reward = clip(coverage / 0.95, 0, 1); terminated (success) when coverage > 0.95; truncated after ``max_steps``.
* Reset: ``np.random.RandomState(seed)``: agent = (randint(50,450), randint(50,450)), block = (randint(100,400),
  randint(100,400)), angle = randn() * 2 pi - pi; with ``legacy=True`` (the evaluation and data setting) the
  block position is set before the angle; then one physics substep resolves any initial overlap.
  Seeds 100000..100049 therefore give Diffusion Policy's 50 test initial conditions.

Observation variants (always dicts, float32):
  ``keypoints`` -> {"obs": (20,)}: 9 block keypoints (x, y interleaved) + agent xy (DP's pusht_lowdim obs);
  ``state``     -> {"obs": (5,)}:  [agent x, agent y, block x, block y, block angle mod 2 pi];
  ``image``     -> {"image": (3, 96, 96) in [0, 1], "agent_pos": (2,)} (DP's pusht_image obs, no action marker).

Keypoints: DP computes 9 body-local keypoints once by rendering the T alone at pose (256, 300, 0) on a white
512 x 512 pygame canvas with its debug-draw style (light fill + 2 px fat edges), taking the non-white pixels,
farthest-point-sampling 9 of them starting from ``default_rng(0).choice(n_pixels)``, then adding
``uniform(0, 1)`` jitter from the same generator. `compute_local_keypoints` does exactly that with our renderer.
If pygame rasterises differently from the version DP used, the points can differ by a pixel or so; users
holding the official ``pusht_cchi_v7_replay.zarr`` can recover DP's exact local keypoints with
:func:`local_keypoints_from_data` and pass them as ``PushTEnv(local_keypoints=...)``.
"""

from __future__ import annotations

import functools
import os

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import cv2  # noqa: E402
import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import pygame  # noqa: E402
import pymunk  # noqa: E402
import pymunk.pygame_util  # noqa: E402
import shapely  # noqa: E402
from gymnasium import spaces  # noqa: E402

from shortcut_policy.conventions import PUSHT_SUCCESS_COVERAGE  # noqa: E402
from shortcut_policy.envs.wrappers import wrap_env  # noqa: E402
from shortcut_policy.utils import check_int  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# Constants of the environment (Diffusion Policy's PushTEnv).
WINDOW_SIZE = 512
SIM_HZ = 100
CONTROL_HZ = 10
N_SUBSTEPS = SIM_HZ // CONTROL_HZ  # 10
DT = 1.0 / SIM_HZ
K_P, K_V = 100.0, 20.0
AGENT_RADIUS = 15.0
AGENT_START = (256.0, 400.0)
BLOCK_START = (256.0, 300.0)
TEE_SCALE = 30.0
TEE_LENGTH = 4.0
GOAL_POSE = np.array([256.0, 256.0, np.pi / 4])
SUCCESS_THRESHOLD = PUSHT_SUCCESS_COVERAGE  # coverage above which an episode succeeds (terminates)
MAX_STEPS = 300
OBS_TYPES = ("keypoints", "state", "image")
N_KEYPOINTS = 9

GOAL_COLOR = pygame.Color("LightGreen")
BLOCK_COLOR = pygame.Color("LightSlateGray")
AGENT_COLOR = pygame.Color("RoyalBlue")
WALL_COLOR = pygame.Color("LightGray")


def tee_vertices(scale: float = TEE_SCALE, length: float = TEE_LENGTH):
    """Body-local vertices of the T's two convex parts: (bar, stem)."""
    h = length * scale / 2
    bar = [(-h, scale), (h, scale), (h, 0.0), (-h, 0.0)]
    stem = [(-scale / 2, scale), (-scale / 2, length * scale), (scale / 2, length * scale), (scale / 2, scale)]
    return bar, stem


TEE_BAR, TEE_STEM = tee_vertices()
TEE_AREA = 120.0 * 30.0 + 30.0 * 90.0  # 6300 px^2
TEE_COG = (0.0, 45.0)


def _add_walls(space: pymunk.Space) -> None:
    """Add the four static wall segments (radius 2 px, along x, y in {5, 506}) to ``space``."""
    walls = [((5, 506), (5, 5)), ((5, 5), (506, 5)), ((506, 5), (506, 506)), ((5, 506), (506, 506))]
    for a, b in walls:
        seg = pymunk.Segment(space.static_body, a, b, 2)
        seg.color = WALL_COLOR
        space.add(seg)


def _add_agent(space: pymunk.Space, position=AGENT_START) -> pymunk.Body:
    """Add the kinematic agent disc (radius 15 px) at ``position`` (px) to ``space``; returns its body."""
    body = pymunk.Body(body_type=pymunk.Body.KINEMATIC)
    body.position = position
    body.friction = 1  # on the body, as in the original: has no effect on contacts (quirk kept)
    shape = pymunk.Circle(body, AGENT_RADIUS)
    shape.color = AGENT_COLOR
    space.add(body, shape)
    return body


def _add_tee(space: pymunk.Space, position=BLOCK_START, angle: float = 0.0) -> pymunk.Body:
    """Add the T block (mass 1, two box parts, the original's inertia) at ``position`` (px, body origin) and ``angle``
    (rad) to ``space``; returns its body."""
    mass = 1.0
    # Inertia bug of the original kept: the bar's vertices are used for both parts.
    inertia = 2.0 * pymunk.moment_for_poly(mass, vertices=TEE_BAR)
    body = pymunk.Body(mass, inertia)
    s1 = pymunk.Poly(body, TEE_BAR)
    s2 = pymunk.Poly(body, TEE_STEM)
    s1.color = BLOCK_COLOR
    s2.color = BLOCK_COLOR
    body.center_of_gravity = (s1.center_of_gravity + s2.center_of_gravity) / 2
    body.position = position
    body.angle = angle
    body.friction = 1  # on the body (quirk kept): contacts are frictionless
    space.add(body, s1, s2)
    return body


def build_space(with_walls: bool = True):
    """A fresh Push-T space: (space, agent_body, block_body). Used by the env and by model-based experts."""
    space = pymunk.Space()
    space.gravity = 0, 0
    space.damping = 0
    if with_walls:
        _add_walls(space)
    agent = _add_agent(space)
    block = _add_tee(space)
    return space, agent, block


# ---------------------------------------------------------------------------------------------------------
# Coverage (shapely). The T is two convex parts with disjoint interiors, so area(goal ∩ block) is the sum of
# the four pairwise part intersections; this is what the original's MultiPolygon intersection computes.
def tee_world_polygons(pos, angle) -> list[np.ndarray]:
    """The T's two convex parts as world-frame vertex arrays [(4, 2), (4, 2)] (px) for a body at ``pos`` (px) with
    ``angle`` (rad)."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return [np.asarray(v) @ rot.T + np.asarray(pos, dtype=np.float64) for v in (TEE_BAR, TEE_STEM)]


@functools.lru_cache(maxsize=1)
def _goal_polygons():
    """The goal T's two parts as shapely polygons (cached: the goal pose is fixed)."""
    return shapely.polygons(np.stack(tee_world_polygons(GOAL_POSE[:2], GOAL_POSE[2])))


def coverage_of_pose(pos, angle) -> float:
    """Fraction of the goal T covered by a block whose body origin is at ``pos`` with ``angle``."""
    goal = _goal_polygons()
    block = shapely.polygons(np.stack(tee_world_polygons(pos, angle)))
    inter = shapely.intersection(goal[:, None], block[None, :])
    return float(shapely.area(inter).sum() / TEE_AREA)


# ---------------------------------------------------------------------------------------------------------
# Rendering, in the style of Diffusion Policy's pymunk debug-draw override (light fill, 2 px edges).
def _light(color) -> tuple[int, int, int, int]:
    """A fill colour 20 % lighter for the shapes' interiors, as Diffusion Policy computes it: each channel x1.2 in
    float32, capped at 255, rounded to the nearest integer (LightSlateGray -> (143, 163, 184, 255))."""
    lit = np.minimum(np.float32(1.2) * np.asarray(tuple(color), dtype=np.float32), np.float32(255.0))
    return tuple(round(float(c)) for c in lit)


class _DrawOptions(pymunk.pygame_util.DrawOptions):
    """pymunk's pygame debug drawer restyled like Diffusion Policy's renderer: light fill with 2 px edges."""

    def draw_circle(self, pos, angle, radius, outline_color, fill_color):  # noqa: D401
        """Draw a circle (the agent) as a filled disc with a lighter inner disc."""
        p = pymunk.pygame_util.to_pygame(pos, self.surface)
        pygame.draw.circle(self.surface, fill_color.as_int(), p, round(radius), 0)
        pygame.draw.circle(self.surface, _light(fill_color), p, round(radius - 4), 0)

    def draw_polygon(self, verts, radius, outline_color, fill_color):
        """Draw a polygon (a T part) lightly filled, with 2 px edges in the shape's colour."""
        pts = [pymunk.pygame_util.to_pygame(v, self.surface) for v in verts]
        pygame.draw.polygon(self.surface, _light(fill_color), pts + [pts[0]])
        for i in range(len(verts)):
            self.draw_fat_segment(verts[i], verts[(i + 1) % len(verts)], 2, fill_color, fill_color)


_BGRX_MASKS = (0xFF0000, 0xFF00, 0xFF, 0)


def _canvas_to_array(canvas: pygame.Surface, size: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB copy of a surface, optionally resized (cv2 bilinear) to ``size`` x ``size``.
    Fast path: read the 32-bit BGRX pixel buffer without a copy, resize, then reorder the channels."""
    w, h = canvas.get_size()
    if canvas.get_bitsize() == 32 and tuple(canvas.get_masks()) == _BGRX_MASKS and canvas.get_pitch() == 4 * w:
        raw = np.frombuffer(canvas.get_buffer(), dtype=np.uint8).reshape(h, w, 4)
        if size is not None and size != w:
            raw = cv2.resize(raw, (size, size))
        return np.ascontiguousarray(raw[:, :, 2::-1])
    img = np.frombuffer(pygame.image.tobytes(canvas, "RGB"), dtype=np.uint8).reshape(h, w, 3).copy()
    if size is not None and size != w:
        img = cv2.resize(img, (size, size))
    return img


@functools.lru_cache(maxsize=4)
def compute_local_keypoints(n: int = N_KEYPOINTS, seed: int = 0) -> np.ndarray:
    """DP's body-local block keypoints, recomputed: mask of the rendered T at (256, 300, 0), FPS + jitter."""
    space = pymunk.Space()
    block = _add_tee(space, BLOCK_START, 0.0)
    canvas = pygame.Surface((WINDOW_SIZE, WINDOW_SIZE))
    canvas.fill(pygame.Color("white"))
    space.debug_draw(_DrawOptions(canvas))
    img = _canvas_to_array(canvas)
    mask = (img != 255).any(axis=-1)
    rows, cols = np.nonzero(mask)  # row-major order, as boolean indexing
    pos = np.array(block.position)
    pts = np.stack([cols, rows], axis=-1).astype(np.float64) - pos  # angle 0: local = pixel - position
    rng = np.random.default_rng(seed)
    chosen = [int(rng.choice(len(pts)))]
    d = np.linalg.norm(pts - pts[chosen[0]], axis=-1)
    for _ in range(n - 1):
        nxt = int(np.argmax(d))
        chosen.append(nxt)
        d = np.minimum(d, np.linalg.norm(pts - pts[nxt], axis=-1))
    kps = pts[chosen] + rng.uniform(0, 1, size=(n, 2))
    kps.setflags(write=False)
    return kps


def keypoints_global(local_kps: np.ndarray, pos, angle) -> np.ndarray:
    """Body-local keypoints (K, 2) placed at ``pos`` (px) rotated by ``angle`` (rad): R(angle) kp + pos, (K, 2) px."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return local_kps @ rot.T + np.asarray(pos, dtype=np.float64)


def local_keypoints_from_data(keypoint: np.ndarray, state: np.ndarray) -> np.ndarray:
    """Invert ``keypoint = R(angle) kp + block_pos`` over a dataset: (N, 9, 2), (N, 5) -> (9, 2) (mean over N)."""
    keypoint = np.asarray(keypoint, dtype=np.float64)
    state = np.asarray(state, dtype=np.float64)
    if keypoint.ndim != 3 or keypoint.shape[-1] != 2 or state.shape[0] != keypoint.shape[0] or state.shape[-1] < 5:
        raise ValueError(f"expected keypoint (N, K, 2) and state (N, 5), got {keypoint.shape} and {state.shape}")
    c, s = np.cos(state[:, 4]), np.sin(state[:, 4])
    d = keypoint - state[:, None, 2:4]
    local = np.stack(
        [c[:, None] * d[..., 0] + s[:, None] * d[..., 1], -s[:, None] * d[..., 0] + c[:, None] * d[..., 1]], -1
    )
    return local.mean(axis=0)


# ---------------------------------------------------------------------------------------------------------
class PushTEnv(gym.Env):
    """Diffusion Policy's Push-T as a gymnasium env (see the module docstring)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}

    def __init__(
        self,
        obs_type: str = "keypoints",
        legacy: bool = True,
        max_steps: int | None = MAX_STEPS,
        render_size: int = 96,
        video_size: int = 256,
        render_action: bool = True,
        local_keypoints: np.ndarray | None = None,
        render_mode: str | None = "rgb_array",
    ):
        if obs_type not in OBS_TYPES:
            raise ValueError(f"unknown Push-T obs_type {obs_type!r}: expected one of {list(OBS_TYPES)}")
        if max_steps is not None and (not float(max_steps).is_integer() or max_steps < 1):
            raise ValueError(f"max_steps={max_steps!r}: expected a positive integer or None")
        self.obs_type = obs_type
        self.legacy = bool(legacy)
        self.max_steps = None if max_steps is None else int(max_steps)
        self.render_size = int(render_size)
        self.video_size = int(video_size)
        self.render_action = bool(render_action)
        self.render_mode = render_mode
        kps = compute_local_keypoints() if local_keypoints is None else np.asarray(local_keypoints, np.float64)
        if kps.shape != (N_KEYPOINTS, 2):
            raise ValueError(f"local_keypoints: expected shape ({N_KEYPOINTS}, 2), got {kps.shape}")
        self.local_kps = kps
        ws = float(WINDOW_SIZE)
        self.action_space = spaces.Box(low=0.0, high=ws, shape=(2,), dtype=np.float64)
        if obs_type == "keypoints":
            self.observation_space = spaces.Dict(
                {"obs": spaces.Box(-np.inf, np.inf, (2 * N_KEYPOINTS + 2,), np.float32)}
            )
        elif obs_type == "state":
            low = np.zeros(5, np.float32)
            high = np.array([ws, ws, ws, ws, 2 * np.pi], np.float32)
            self.observation_space = spaces.Dict({"obs": spaces.Box(low, high, (5,), np.float32)})
        else:
            self.observation_space = spaces.Dict(
                {
                    "image": spaces.Box(0.0, 1.0, (3, self.render_size, self.render_size), np.float32),
                    "agent_pos": spaces.Box(0.0, ws, (2,), np.float32),
                }
            )
        self.space = None
        self.agent = None
        self.block = None
        self.latest_action = None
        self.n_contact_points = 0
        self._n_steps = 0
        self._coverage = 0.0
        self._seed_used = None

    # -- physics ------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        """Build a fresh physics space (walls, agent, block) and count contact points through a post-solve handler."""
        self.space, self.agent, self.block = build_space()
        handler = self.space.add_collision_handler(0, 0)
        handler.post_solve = self._on_contact
        self.n_contact_points = 0

    def _on_contact(self, arbiter, space, data):
        """Post-solve collision callback: add the contact's point count to ``n_contact_points``."""
        self.n_contact_points += len(arbiter.contact_point_set.points)

    def _set_pose(self, state) -> None:
        """DP's ``_set_state``: agent position, block pose (legacy order), then one physics substep."""
        state = [float(x) for x in np.asarray(state, dtype=np.float64).reshape(-1)[:5]]
        self.agent.position = state[:2]
        if self.legacy:
            self.block.position = state[2:4]
            self.block.angle = state[4]
        else:
            self.block.angle = state[4]
            self.block.position = state[2:4]
        self.space.step(DT)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start an episode: a fresh space, then the start state of ``seed`` (Diffusion Policy's: agent and block
        positions uniform integers in [50, 450) and [100, 400) px, angle ~ 2 pi N(0, 1) - pi) or
        ``options["reset_to_state"]`` (5 values). Seeds must be integers in [0, 2^32) (``ValueError`` otherwise); no
        seed draws one from the env's RNG. Returns (observation, info)."""
        if seed is not None:
            seed = check_int("seed", seed, 0, 2**32 - 1, strings=False)
        super().reset(seed=seed)
        options = dict(options or {})
        self._setup()
        state = options.get("reset_to_state")
        if state is None:
            if seed is None:
                seed = int(self.np_random.integers(0, 25536))
            rs = np.random.RandomState(seed=seed)
            state = np.array(
                [
                    rs.randint(50, 450),
                    rs.randint(50, 450),
                    rs.randint(100, 400),
                    rs.randint(100, 400),
                    rs.randn() * 2 * np.pi - np.pi,
                ]
            )
        self._seed_used = seed
        self._set_pose(state)
        self.latest_action = None
        self._n_steps = 0
        self._coverage = coverage_of_pose(self.block.position, self.block.angle)
        return self._get_obs(), self._get_info()

    def step(self, action):
        """Apply one action, the absolute agent target (x, y) in px: 10 physics substeps at 100 Hz of a PD law
        (k_p = 100, k_v = 20) pull the agent towards it (a 10 Hz control step). Returns (obs, reward, terminated,
        truncated, info) with reward = clip(coverage / 0.95, 0, 1), terminated when coverage > 0.95 and truncated at
        ``max_steps``. Raises ``RuntimeError`` before :meth:`reset` and ``ValueError`` for an action that is not 2
        finite numbers."""
        if self.space is None:
            raise RuntimeError("PushTEnv.step() called before reset()")
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (2,) or not np.all(np.isfinite(action)):
            raise ValueError(f"Push-T action: expected 2 finite numbers (absolute target x, y in px), got {action!r}")
        self.latest_action = action
        self.n_contact_points = 0
        target = pymunk.Vec2d(float(action[0]), float(action[1]))
        agent = self.agent
        for _ in range(N_SUBSTEPS):
            acc = K_P * (target - agent.position) + K_V * (pymunk.Vec2d(0, 0) - agent.velocity)
            agent.velocity += acc * DT
            self.space.step(DT)
        self._n_steps += 1
        self._coverage = coverage_of_pose(self.block.position, self.block.angle)
        reward = float(np.clip(self._coverage / SUCCESS_THRESHOLD, 0.0, 1.0))
        terminated = bool(self._coverage > SUCCESS_THRESHOLD)
        truncated = bool(self.max_steps is not None and self._n_steps >= self.max_steps and not terminated)
        return self._get_obs(), reward, terminated, truncated, self._get_info()

    # -- state access (privileged: experts, data) ----------------------------------------------------------
    def get_state(self) -> np.ndarray:
        """Full dynamic state, float64 (10,): [agent xy, block xy, block angle (raw), agent vel xy,
        block vel xy, block angular vel]. The first five are DP's ``state`` layout."""
        a, b = self.agent, self.block
        return np.array(
            [
                a.position.x,
                a.position.y,
                b.position.x,
                b.position.y,
                b.angle,
                a.velocity.x,
                a.velocity.y,
                b.velocity.x,
                b.velocity.y,
                b.angular_velocity,
            ],
            dtype=np.float64,
        )

    def set_state(self, state) -> None:
        """Restore an exact state, no physics step: 10 values from :meth:`get_state`, or a 5-value DP
        ``state`` ([agent xy, block origin xy, angle], e.g. a zarr row) with zero velocities.
        (``reset(options={"reset_to_state": s})`` instead follows DP's ``_set_state``: legacy order on a
        fresh block + one settling substep, which moves the origin when the angle is not 0.)"""
        state = np.asarray(state, dtype=np.float64).reshape(-1)
        if state.shape not in ((5,), (10,)) or not np.all(np.isfinite(state)):
            raise ValueError(f"set_state: expected 5 (DP state) or 10 (get_state) finite values, got {state!r}")
        if self.space is None:
            self._setup()
        vel = state[5:] if state.shape == (10,) else np.zeros(5)
        self.agent.position = (float(state[0]), float(state[1]))
        self.block.angle = float(state[4])  # angle first (it rotates about the CoG), then the exact origin
        self.block.position = (float(state[2]), float(state[3]))
        self.agent.velocity = (float(vel[0]), float(vel[1]))
        self.block.velocity = (float(vel[2]), float(vel[3]))
        self.block.angular_velocity = float(vel[4])
        # pymunk caches each shape's world vertices until the next step; without this a render (an image
        # observation) right after set_state would draw the block and agent where they were before
        for body in (self.agent, self.block):
            self.space.reindex_shapes_for_body(body)
        self._coverage = coverage_of_pose(self.block.position, self.block.angle)

    @property
    def coverage(self) -> float:
        return self._coverage

    @property
    def n_steps(self) -> int:
        return self._n_steps

    # -- observations -------------------------------------------------------------------------------------
    def dp_state(self) -> np.ndarray:
        """[agent x, agent y, block x, block y, block angle (raw)] — the zarr ``state`` field."""
        return self.get_state()[:5]

    def block_keypoints(self) -> np.ndarray:
        """The 9 block keypoints in world coordinates (9, 2) float64 px (the zarr ``keypoint`` field)."""
        return keypoints_global(self.local_kps, self.block.position, self.block.angle)

    def _get_obs(self) -> dict:
        """The observation of ``obs_type``: {"obs": keypoints (18) + agent xy (2)} or {"obs": agent xy, block xy,
        angle mod 2 pi} (float32, px / rad), or {"image": (3, S, S) float32 in [0, 1], "agent_pos": (2,) px}."""
        agent_pos = np.array(self.agent.position, dtype=np.float64)
        if self.obs_type == "keypoints":
            obs = np.concatenate([self.block_keypoints().reshape(-1), agent_pos])
            return {"obs": obs.astype(np.float32)}
        if self.obs_type == "state":
            obs = np.array([*agent_pos, *self.block.position, self.block.angle % (2 * np.pi)])
            return {"obs": obs.astype(np.float32)}
        img = self._render_array(self.render_size, draw_action=False)
        return {
            "image": np.moveaxis(img.astype(np.float32) / 255.0, -1, 0),
            "agent_pos": agent_pos.astype(np.float32),
        }

    def _get_info(self) -> dict:
        """The step info: ``coverage`` (0..1), ``success``, ``n_contacts`` (per substep, rounded up), the DP ``state``,
        agent position and velocity, block and goal poses, and the episode's ``seed``."""
        return {
            "coverage": self._coverage,
            "success": bool(self._coverage > SUCCESS_THRESHOLD),
            "n_contacts": int(np.ceil(self.n_contact_points / N_SUBSTEPS)),
            "state": self.dp_state(),
            "pos_agent": np.array(self.agent.position),
            "vel_agent": np.array(self.agent.velocity),
            "block_pose": np.array([*self.block.position, self.block.angle]),
            "goal_pose": GOAL_POSE.copy(),
            "seed": self._seed_used,
        }

    # -- rendering ----------------------------------------------------------------------------------------
    def _render_array(self, size: int, draw_action: bool) -> np.ndarray:
        """An RGB uint8 frame (size, size, 3) of the scene (goal, block, agent), with the latest action marked by a
        cross when ``draw_action``."""
        canvas = pygame.Surface((WINDOW_SIZE, WINDOW_SIZE))
        canvas.fill((255, 255, 255))
        for verts in tee_world_polygons(GOAL_POSE[:2], GOAL_POSE[2]):
            pts = [pymunk.pygame_util.to_pygame(v, canvas) for v in verts]
            pygame.draw.polygon(canvas, GOAL_COLOR, pts + [pts[0]])
        self.space.debug_draw(_DrawOptions(canvas))
        img = _canvas_to_array(canvas, size)
        if draw_action and self.latest_action is not None:
            coord = (np.asarray(self.latest_action) / WINDOW_SIZE * size).astype(np.int32)
            cv2.drawMarker(
                img,
                (int(coord[0]), int(coord[1])),
                color=(255, 0, 0),
                markerType=cv2.MARKER_CROSS,
                markerSize=max(1, int(8 / 96 * size)),
                thickness=max(1, int(1 / 96 * size)),
            )
        return img

    def render_image(self) -> np.ndarray:
        """The (render_size, render_size, 3) uint8 observation image (no action marker): the zarr ``img`` field."""
        return self._render_array(self.render_size, draw_action=False)

    def render(self):
        """RGB uint8 frame (video_size x video_size) with the latest action marked, for videos."""
        if self.space is None:
            raise RuntimeError("PushTEnv.render() called before reset()")
        return self._render_array(self.video_size, draw_action=self.render_action)

    def close(self):
        """Drop the physics space (the env must be reset before the next step)."""
        self.space = None


def build_env(task_cfg, **kwargs) -> PushTEnv:
    """The bare Push-T env described by a task config (configs/task/pusht_*.yaml): the registry's ``make``.

    Optional task field ``local_keypoints`` ((9, 2) body-local block keypoints, e.g. from
    :func:`local_keypoints_from_data` on DP's official data). Extra keyword arguments go to :class:`PushTEnv`.
    """
    get = task_cfg.get if hasattr(task_cfg, "get") else (lambda k, d=None: getattr(task_cfg, k, d))
    env_name = get("env", "pusht")
    if env_name != "pusht":
        raise ValueError(f"task env {env_name!r} is not Push-T: use the env's own make_env")
    obs_type = get("obs_type", "keypoints")
    max_steps = int(get("max_steps", MAX_STEPS))
    image_shape = (get("obs_shapes", None) or {}).get("image", None) if obs_type == "image" else None
    if image_shape is not None and "render_size" not in kwargs:
        kwargs["render_size"] = int(list(image_shape)[-1])
    local_kps = get("local_keypoints", None)  # optional (9, 2) list, e.g. recovered from DP's official zarr
    if local_kps is not None and "local_keypoints" not in kwargs:
        kwargs["local_keypoints"] = np.asarray(list(local_kps), dtype=np.float64)
    return PushTEnv(obs_type=obs_type, max_steps=max_steps, **kwargs)


def make_env(task_cfg, wrap: bool = True, **kwargs):
    """:func:`build_env`, wrapped for chunked policies when ``wrap`` (:func:`shortcut_policy.envs.wrappers.wrap_env`:
    ``MultiStepWrapper(VideoRecorder(env), n_obs_steps, n_action_steps, max_steps)``)."""
    env = build_env(task_cfg, **kwargs)
    return wrap_env(env, task_cfg, max_steps=MAX_STEPS) if wrap else env
