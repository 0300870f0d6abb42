"""Every shared convention of shortcut_policy, defined once.

Time: t in [0, 1]; t = 0 is noise x0 ~ N(0, I), t = 1 is data x1. Sampling integrates from t = 0 to t = 1.
Interpolant (reference implementation kvfrans/shortcut-models, targets_shortcut.py): x_t = (1 - (1 - EPS) t) x0 + t x1,
velocity target v = x1 - (1 - EPS) x0.

Step sizes are dyadic: d in {1/M, ..., 1/2, 1}, M = 128. The network sees the *level* k = log2(1/d)
(0 = one step of size 1, LOG2_M = 7 = the flow-matching level d = 1/M), never d itself.
N-step sampling (N a power of two <= M) uses d = 1/N, level log2(N), at t = i/N.
"""

from __future__ import annotations

M: int = 128  # number of smallest steps; d_min = 1/M
LOG2_M: int = 7
assert 2**LOG2_M == M
INTERP_EPS: float = 1e-5  # sigma_min of the reference interpolant
CLIP_TARGET: float = 4.0  # reference clips bootstrap targets and half-step states to +-4
VALID_STEPS: tuple[int, ...] = tuple(2**i for i in range(LOG2_M + 1))  # 1, 2, 4, ..., 128

# Robotics windows (Diffusion Policy): horizon, observation steps, executed action steps.
HORIZON: int = 16
N_OBS_STEPS: int = 2
N_ACTION_STEPS: int = 8

# Evaluation protocol (Diffusion Policy): test episodes use env seeds TEST_SEED_START, TEST_SEED_START + 1, ...
# (Push-T's 50 test initial conditions are seeds 100000..100049; Transport uses the same range). Training demos
# use seeds from 0, so the two never overlap.
TEST_SEED_START: int = 100000
# Push-T succeeds when the T block's overlap with the goal region exceeds 95 % of the goal's area
# (reward = clip(coverage / PUSHT_SUCCESS_COVERAGE, 0, 1)).
PUSHT_SUCCESS_COVERAGE: float = 0.95

# Stable Diffusion's VAE (sd-vae-ft-mse, as used by DiT and the shortcut-models reference): latents are multiplied
# by this factor so that they have roughly unit variance (Rombach et al. 2022).
VAE_LATENT_SCALE: float = 0.18215


def interpolate(x0, x1, t):
    """The interpolant x_t = (1 - (1 - eps) t) x0 + t x1, eps = INTERP_EPS (kvfrans/shortcut-models
    targets_shortcut.py).

    x0 (noise) and x1 (data) are (B, ...) tensors of the same shape; t is (B,) in [0, 1] and is broadcast over the
    trailing dims. Returns a tensor shaped like x1.
    """
    tb = t.reshape(-1, *([1] * (x1.dim() - 1)))
    return (1.0 - (1.0 - INTERP_EPS) * tb) * x0 + tb * x1


def velocity_target(x0, x1):
    """The flow-matching velocity d x_t / d t = x1 - (1 - eps) x0 of :func:`interpolate` (constant in t);
    x0, x1 (B, ...) -> (B, ...)."""
    return x1 - (1.0 - INTERP_EPS) * x0


def check_steps(n, max_steps: int = M) -> int:
    """Validate an N-step sampling request: a power of two, 1 <= N <= max_steps; returns N as an int.

    Integral floats (4.0) are accepted; bools, strings and other values raise ``ValueError`` listing the valid
    step counts (shortcut models are trained only on the dyadic step sizes d = 1/N).
    """
    if isinstance(n, bool) or not isinstance(n, (int,)) and not (isinstance(n, float) and float(n).is_integer()):
        raise ValueError(f"steps={n!r}: expected an integer power of two between 1 and {max_steps}")
    n = int(n)
    if n < 1 or n > max_steps or (n & (n - 1)) != 0:
        raise ValueError(
            f"steps={n}: expected a power of two between 1 and {max_steps} "
            f"(valid: {[v for v in VALID_STEPS if v <= max_steps]}); "
            "shortcut models are only trained on dyadic step sizes"
        )
    return n
