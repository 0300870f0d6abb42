"""Export: one graph (normaliser + 1-step sampler), parity with the PyTorch policy in onnxruntime / TorchScript,
atomic writes that never overwrite by default."""

import json

import pytest
from test_deploy import tiny_checkpoint

from shortcut_policy import cli

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.mark.parametrize("fmt,ext", [("onnx", ".onnx"), ("torchscript", ".ts.pt")])
def test_export_parity_and_no_overwrite(ckpt, tmp_path, fmt, ext):
    out = tmp_path / f"policy{ext}"
    args = [f"checkpoint={ckpt}", f"format={fmt}", f"out={out}", "n_parity=100", "n_timing=5"]
    res = cli.run_verb("export", args + [f"run_dir={tmp_path / 'r1'}"])
    assert out.exists() and res["n_parity"] == 100
    # actions are in pixels (up to ~512): float32 rounding differences scale with that; in [-1, 1] units <= 1e-4
    assert res["max_abs_diff_normalized"] <= 1e-4 and res["max_abs_diff"] <= 1e-4 * 512
    assert res["torch_latency_ms"] > 0 and res[f"{fmt}_latency_ms"] > 0
    assert 0 <= res["torch_batch1_vs_batched_diff"] <= 1e-4 * 512  # PyTorch's own float32 spread, reported alongside
    # against the same net in float64 the exported graph is about as exact as float32 PyTorch (not 10x worse)
    assert 0 < res["torch_fp32_vs_fp64"] and res[f"{fmt}_vs_fp64"] <= 10 * res["torch_fp32_vs_fp64"] + 1e-6
    meta = json.loads((tmp_path / f"policy{ext}.json").read_text())
    assert meta["inputs"] == {"obs": ["B", 2, 20], "noise": ["B", 16, 2]} and meta["output"]["action"] == ["B", 8, 2]
    before = out.stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="overwrite=true"):
        cli.run_verb("export", args + [f"run_dir={tmp_path / 'r2'}"])
    assert out.stat().st_mtime_ns == before and not list(tmp_path.glob(".policy*tmp*"))
    cli.run_verb("export", args + ["overwrite=true", f"run_dir={tmp_path / 'r3'}"])


def test_export_rejects_bad_format(ckpt, tmp_path):
    with pytest.raises(ValueError, match="format='tflite'"):
        cli.run_verb("export", [f"checkpoint={ckpt}", "format=tflite", f"run_dir={tmp_path}"])


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_float64_export_matches_the_float64_policy(ckpt, tmp_path, fmt):
    """precision=float64: layers lowered to elementary ops (onnxruntime has no float64 Conv); the graph agrees with
    the PyTorch policy in float64 far below float32 rounding, and float64 inputs are what it takes."""
    out = tmp_path / "p64"
    res = cli.run_verb(
        "export",
        [
            f"checkpoint={ckpt}",
            f"format={fmt}",
            f"out={out}",
            "precision=float64",
            "n_parity=20",
            "n_timing=3",
            f"run_dir={tmp_path / 'r'}",
        ],
    )
    assert res["precision"] == "float64"
    assert res["max_abs_diff"] <= 1e-9 and res[f"{fmt}_vs_fp64"] <= 1e-9
    assert res["torch_fp32_vs_fp64"] > 1e3 * res["max_abs_diff"]  # float32 rounding would have dominated
    assert json.loads((tmp_path / "p64.json").read_text())["precision"] == "float64"
    if fmt == "onnx":
        import onnx

        graph = onnx.load(str(out)).graph
        assert {n.op_type for n in graph.node}.isdisjoint({"Conv", "ConvTranspose", "Softplus", "Mish"})
        assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE


def test_float64_export_rejects_bad_precision(ckpt, tmp_path):
    with pytest.raises(ValueError, match="precision='float16'"):
        cli.run_verb("export", [f"checkpoint={ckpt}", "format=onnx", "precision=float16", f"run_dir={tmp_path}"])


def test_eval_n_action_steps_override(ckpt, tmp_path):
    """eval n_action_steps=N executes N actions of each chunk (reported); more than the horizon allows is an error."""
    res = cli.run_verb(
        "eval",
        [
            f"checkpoint={ckpt}",
            "n_action_steps=3",
            "n_episodes=1",
            "workers=1",
            "n_videos=0",
            "progress=false",
            f"run_dir={tmp_path / 'e'}",
        ],
    )
    assert res["n_action_steps"] == 3 and res["n_episodes"] == 1
    with pytest.raises(ValueError, match="n_action_steps=16: .* 1 to 15 actions"):
        cli.run_verb("eval", [f"checkpoint={ckpt}", "n_action_steps=16", "n_episodes=1", f"run_dir={tmp_path / 'f'}"])


def test_eval_weights_choice(ckpt, tmp_path):
    """eval weights=online evaluates the online weights instead of the EMA (reported); other values are an error."""
    res = cli.run_verb(
        "eval",
        [
            f"checkpoint={ckpt}",
            "weights=online",
            "n_episodes=1",
            "workers=1",
            "n_videos=0",
            "progress=false",
            f"run_dir={tmp_path / 'e'}",
        ],
    )
    assert res["weights"] == "online" and res["n_episodes"] == 1
    with pytest.raises(ValueError, match="weights='best': expected 'ema', 'online'"):
        cli.run_verb("eval", [f"checkpoint={ckpt}", "weights=best", "n_episodes=1", f"run_dir={tmp_path / 'f'}"])


def test_eval_temporal_ensembling_option(ckpt, tmp_path):
    """eval ensemble_k=k runs the checkpoint with temporal ensembling (reported); it is refused for the expert and
    for a value that is not a number."""
    common = ["n_episodes=1", "workers=1", "n_videos=0", "progress=false"]
    res = cli.run_verb("eval", [f"checkpoint={ckpt}", "ensemble_k=0.01", *common, f"run_dir={tmp_path / 'e'}"])
    assert res["ensemble_k"] == 0.01 and res["n_episodes"] == 1 and 0 <= res["mean_score@1"] <= 1
    with pytest.raises(ValueError, match="ensemble_k=0.5: temporal ensembling applies to a learned policy"):
        cli.run_verb("eval", ["policy=expert", "ensemble_k=0.5", *common, f"run_dir={tmp_path / 'f'}"])
    with pytest.raises(ValueError, match="ensemble_k='fast'"):
        cli.run_verb("eval", [f"checkpoint={ckpt}", "ensemble_k=fast", *common, f"run_dir={tmp_path / 'g'}"])
