"""Every shared convention of shortcut_policy, defined once.

Time: t in [0, 1]; t = 0 is noise x0 ~ N(0, I), t = 1 is data x1. Sampling integrates from t = 0 to t = 1.
Interpolant (reference implementation, targets_shortcut.py): x_t = (1 - (1 - EPS) t) x0 + t x1,
velocity target v = x1 - (1 - EPS) x0.

Step sizes are dyadic: d in {1/M, ..., 1/2, 1}, M = 128. The network sees the *level* k = log2(1/d)
(0 = one step of size 1, LOG2_M = 7 = the flow-matching level d = 1/M), never d itself.
N-step sampling (N a power of two <= M) uses d = 1/N, level log2(N), at t = i/N.
"""
from __future__ import annotations

import math

M: int = 128  # number of smallest steps; d_min = 1/M
LOG2_M: int = 7
assert 2**LOG2_M == M
INTERP_EPS: float = 1e-5  # sigma_min of the reference interpolant
T_NOISE: float = 0.0
T_DATA: float = 1.0
CLIP_TARGET: float = 4.0  # reference clips bootstrap targets and half-step states to +-4
VALID_STEPS: tuple[int, ...] = tuple(2**i for i in range(LOG2_M + 1))  # 1, 2, 4, ..., 128

# Robotics windows (Diffusion Policy): horizon, observation steps, executed action steps.
HORIZON: int = 16
N_OBS_STEPS: int = 2
N_ACTION_STEPS: int = 8

# Push-T evaluation protocol (Diffusion Policy).
PUSHT_TEST_SEED_START: int = 100000
PUSHT_SUCCESS_COVERAGE: float = 0.95


def interpolate(x0, x1, t):
    """x_t for t broadcast over trailing dims of x0/x1 (t shaped (B,))."""
    tb = t.reshape(-1, *([1] * (x1.dim() - 1)))
    return (1.0 - (1.0 - INTERP_EPS) * tb) * x0 + tb * x1


def velocity_target(x0, x1):
    return x1 - (1.0 - INTERP_EPS) * x0


def check_steps(n, max_steps: int = M) -> int:
    """Validate an N-step sampling request: a power of two, 1 <= N <= max_steps."""
    if isinstance(n, bool) or not isinstance(n, (int,)) and not (isinstance(n, float) and float(n).is_integer()):
        raise ValueError(f"steps={n!r}: expected an integer power of two between 1 and {max_steps}")
    n = int(n)
    if n < 1 or n > max_steps or (n & (n - 1)) != 0:
        raise ValueError(
            f"steps={n}: expected a power of two between 1 and {max_steps} "
            f"(valid: {[v for v in VALID_STEPS if v <= max_steps]}); shortcut models are only trained on dyadic step sizes"
        )
    return n


def level_of_steps(n: int) -> int:
    """Level k = log2(N) for N-step sampling (d = 1/N)."""
    return int(math.log2(check_steps(n)))


def steps_of_level(k: int) -> int:
    return 2 ** int(k)
