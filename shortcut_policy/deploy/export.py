"""Export a policy for deployment without PyTorch: the ``export`` verb (:mod:`shortcut_policy.commands.export`,
``shortcut-policy export checkpoint=PATH format=onnx|torchscript [steps=1 out=PATH overwrite=false]``).

Exports the N-step (default 1-step) policy, normalisation included, as ONE graph (diffusion checkpoints: their
deterministic DDIM-N sampler, the DDPM sampler draws noise at every step):
  inputs  = the observation tensors (B, To, ...) in the encoder's key order, then ``noise`` (B, horizon, Da)
  output  = ``action`` (B, Ta, Da), unnormalised, exactly Policy.predict_action's executed slice.
The noise is an input so the graph is deterministic: pass a fixed noise (the metadata records the seed used for the
parity check; zeros are a valid deterministic choice too). Then checks parity against the PyTorch policy fed the same
noise (max abs difference over ``n_parity`` random observations drawn within the normaliser's observed range) and
times onnxruntime / TorchScript against the PyTorch policy at batch 1. Files are written to a temp name, then renamed;
an existing file is only replaced with ``overwrite=true``. A ``<out>.json`` sidecar describes inputs and outputs.

``precision=float64`` exports the graph in float64 instead: onnxruntime's CPU provider has no float64 Conv, so the
layers are first rewritten into elementary ops (``lowering.lower_module``), and the parity reference is the PyTorch
policy in float64 (``policy.double()``), so the parity figure measures the export alone, not float32 rounding (which is
~2e-4 px for a Push-T policy whose outputs reach 500 px: ``torch_fp32_vs_fp64``). Inputs are then float64 arrays.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shortcut_policy.utils import atomic_path

FORMATS = {"onnx": ".onnx", "torchscript": ".ts.pt"}


class ExportablePolicy(nn.Module):
    """Observations + noise -> the Ta executed actions, with the normaliser and the N-step sampler unrolled."""

    def __init__(self, policy, steps: int = 1):
        super().__init__()
        if not policy.objective.deterministic():
            hint = (
                " (sampler=ddim steps=N exports diffusion's deterministic DDIM sampler)"
                if hasattr(policy.objective, "sampler")
                else ""
            )
            raise ValueError(
                f"export: objective={policy.objective.name}"
                f"{f' with sampler={policy.objective.sampler}' if hasattr(policy.objective, 'sampler') else ''} draws "
                f"fresh noise between steps, which a noise-in / actions-out graph cannot reproduce{hint}"
            )
        self.policy = policy
        self.steps = policy.check_steps(steps)
        self.keys = list(policy.obs_encoder.lowdim_keys) + list(policy.obs_encoder.image_keys)
        self.start, self.n_act = policy.n_obs_steps - 1, policy.n_action_steps

    def forward(self, *inputs):
        """``forward(*obs, noise)``: one (B, To, ...) tensor per key of ``self.keys`` in environment units, then the
        initial noise (B, H, Da); returns the executed actions (B, Ta, Da) in environment units (normalise, encode,
        N-step sampling, clamp to [-1, 1], unnormalise, slice from To - 1)."""
        p = self.policy
        obs = {k: x[:, -p.n_obs_steps :] for k, x in zip(self.keys, inputs[:-1])}
        return p.actions_from_noise(obs, inputs[-1], self.steps)


def random_observations(policy, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Observations (n, To, ...) uniform within each field's fitted [min, max] (images: [0, 1])."""
    rng = np.random.default_rng(seed)
    out = {}
    for k in list(policy.obs_encoder.lowdim_keys) + list(policy.obs_encoder.image_keys):
        shape = (n, policy.n_obs_steps, *policy.obs_encoder.obs_shapes[k])
        if k in policy.obs_encoder.image_keys:
            out[k] = rng.uniform(0, 1, shape).astype(np.float32)
        else:
            st = policy.normalizer[k].get_input_stats()
            # float64 arithmetic whatever the policy's dtype: a policy.double() copy draws the same observations
            lo, hi = st["min"].cpu().double().numpy(), st["max"].cpu().double().numpy()
            out[k] = (lo + (hi - lo) * rng.uniform(0, 1, shape)).astype(np.float32)
    return out


def fixed_noise(policy, batch: int, seed: int) -> torch.Tensor:
    """The noise predict_action draws with torch.Generator().manual_seed(seed) for this batch size."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(batch, policy.horizon, policy.action_dim, generator=g)


def _check_target(out: Path, overwrite: bool) -> None:
    """Raise ``FileExistsError`` when ``out`` exists and ``overwrite`` is false."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: pass overwrite=true to replace it")


def export_onnx(module: ExportablePolicy, example: tuple, out: Path, overwrite: bool = False, opset: int = 17) -> Path:
    """Export ``module`` traced on ``example`` to ONNX (opset ``opset``, dynamic batch axis, inputs named after the
    observation keys + "noise", output "action"), check the model with ``onnx.checker`` and write ``out`` atomically.
    Raises ``FileExistsError`` when ``out`` exists and ``overwrite`` is false."""
    _check_target(out, overwrite)
    names = module.keys + ["noise"]
    dyn = {n: {0: "batch"} for n in names + ["action"]}
    with atomic_path(out) as tmp, torch.no_grad():
        torch.onnx.export(
            module,
            example,
            str(tmp),
            input_names=names,
            output_names=["action"],
            dynamic_axes=dyn,
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
        import onnx  # lazy: onnx (optional, the `deploy` extra)

        onnx.checker.check_model(onnx.load(str(tmp)))
    return out


def export_torchscript(module: ExportablePolicy, example: tuple, out: Path, overwrite: bool = False) -> Path:
    """Trace ``module`` on ``example`` with ``torch.jit.trace`` and save it to ``out`` atomically. Raises
    ``FileExistsError`` when ``out`` exists and ``overwrite`` is false."""
    _check_target(out, overwrite)
    with atomic_path(out) as tmp:
        with torch.no_grad():
            traced = torch.jit.trace(module, example, check_trace=False)
        traced.save(str(tmp))
    return out


class Runner:
    """Call an exported file like the policy: run(obs: dict of (B, To, ...) arrays, noise (B, H, Da)) -> (B, Ta, Da)."""

    def __init__(self, path: Path, fmt: str, keys: list[str], threads: int = 1, dtype=np.float32):
        self.fmt, self.keys, self.dtype = fmt, keys, np.dtype(dtype)
        if fmt == "onnx":
            import onnxruntime as ort  # lazy: onnxruntime (optional, the `deploy` extra)

            so = ort.SessionOptions()
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
            self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        else:
            self.mod = torch.jit.load(str(path)).eval()

    def __call__(self, obs, noise):
        if self.fmt == "onnx":
            feed = {k: np.ascontiguousarray(obs[k], dtype=self.dtype) for k in self.keys}
            feed["noise"] = np.ascontiguousarray(noise, dtype=self.dtype)
            return self.sess.run(["action"], feed)[0]
        with torch.no_grad():
            tdt = torch.float64 if self.dtype == np.float64 else torch.float32
            args = [torch.as_tensor(np.asarray(obs[k]), dtype=tdt) for k in self.keys] + [
                torch.as_tensor(np.asarray(noise), dtype=tdt)
            ]
            return self.mod(*args).numpy()


def parity(policy, runner: Runner, steps: int, n: int, seed: int = 0) -> tuple[float, float, np.ndarray]:
    """max |exported - policy.predict_action| over n random observations, the same noise for both: in action units
    and in the normalised [-1, 1] action space (float32 rounding scales with the action magnitude); and the
    exported outputs themselves (for ``float32_reference``)."""
    obs = random_observations(policy, n, seed)
    noise = fixed_noise(policy, n, seed)
    ref = policy.predict_action(obs, steps=steps, generator=torch.Generator().manual_seed(seed))
    got = runner(obs, noise.numpy())
    if got.shape != ref.shape:
        raise AssertionError(f"exported output shape {got.shape} != policy output {ref.shape}")
    diff = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max())
    norm = policy.normalizer["action"]
    ndiff = norm.normalize(torch.as_tensor(got, dtype=torch.float64)) - norm.normalize(
        torch.as_tensor(ref, dtype=torch.float64)
    )
    return diff, float(ndiff.abs().max()), got


def float32_reference(module: ExportablePolicy, policy, got: np.ndarray, n: int, seed: int = 0) -> dict:
    """How big float32 rounding is on the parity inputs, so the parity difference can be read against it:

    * ``torch_batch1_vs_batched_diff``: max |PyTorch batched - PyTorch one observation at a time| (PyTorch float32
      disagreeing with itself: other kernels / summation order per batch size);
    * ``torch_fp32_vs_fp64`` and ``exported_vs_fp64``: PyTorch float32 and the exported outputs ``got`` against the
      same module run in float64 ("exact"). For a float32 graph: when the two are alike, the exported graph is as
      accurate as PyTorch itself. For a float64 graph, ``exported_vs_fp64`` is the lowering's error alone."""
    obs = random_observations(policy, n, seed)
    args = [torch.as_tensor(obs[k]) for k in module.keys] + [fixed_noise(policy, n, seed)]
    with torch.no_grad():
        batched = module(*args).double()
        single = torch.cat([module(*[a[i : i + 1] for a in args]) for i in range(n)]).double()
        exact = copy.deepcopy(module).double()(*[a.double() for a in args])
    return {
        "torch_batch1_vs_batched_diff": float((batched - single).abs().max()),
        "torch_fp32_vs_fp64": float((batched - exact).abs().max()),
        "exported_vs_fp64": float((torch.as_tensor(got, dtype=torch.float64) - exact).abs().max()),
    }


def median_ms(fn, n: int, warmup: int = 5) -> float:
    """Median wall time (ms) of ``fn()`` over ``n`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts))
