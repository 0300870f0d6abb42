"""CLI skeleton: verbs, run directory contents, RESULT line, toy integration."""

import json

import pytest

from shortcut_policy import cli


def test_help_and_unknown_verb(capsys):
    assert cli.main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown verb"):
        cli.run_verb("frobnicate", [])


@pytest.mark.parametrize("verb", ["train", "bench"])
def test_configs_compose_with_groups(verb):
    cfg = cli.compose(verb, [])
    assert cfg is not None
    if verb == "train":
        assert {"task", "net", "objective", "logger", "train"} <= set(cfg)


def test_train_config_group_overrides():
    cfg = cli.compose("train", ["objective=flow_matching", "net=unet1d_small", "logger=none"])
    assert cfg.objective.name == "flow_matching" and cfg.net.down_dims == [64, 128, 256] and cfg.logger.kind == "none"


def test_cpu_recipes_set_net_and_train_defaults():
    """The CPU task recipes (`# @package _global_`) set the net and the trainer as well as the task."""
    low = cli.compose("train", ["task=pusht_lowdim_cpu"])
    assert low.task.name == "pusht_lowdim_cpu" and list(low.net.down_dims) == [32, 64, 128]
    img = cli.compose("train", ["task=pusht_image_cpu", "train.batch_size=8"])
    assert img.task.name == "pusht_image_cpu" and img.task.encoder.resnet_width == 16
    assert list(img.task.crop_shape) == [84, 84] and list(img.task.obs_shapes.image) == [3, 96, 96]
    assert list(img.net.down_dims) == [32, 64, 128] and img.train.max_minutes == 120 and img.train.batch_size == 8


def test_toy_bench_shortcut_beats_flow_matching_at_one_step(tmp_path, capsys):
    """A few hundred CPU steps on a 2-D mixture: 1-step shortcut samples are measurably closer to the data."""
    run_dir = tmp_path / "toy"
    rc = cli.main(
        [
            "bench",
            "toy",
            "dataset=8gaussians",
            "toy.num_steps=200",
            "toy.batch_size=256",
            "toy.n_eval=2000",
            "toy.steps=[1,128]",
            f"run_dir={run_dir}",
        ]
    )
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT ")
    res = json.loads(last[len("RESULT ") :])
    assert res["metric"] == "sliced_w2"
    assert res["shortcut@1"] < 0.5 * res["flow_matching@1"], res
    assert (run_dir / "config.yaml").exists() and (run_dir / "toy_samples.png").exists()
    assert (run_dir / "quality_vs_nfe.png").stat().st_size > 0
    assert json.loads((run_dir / "metrics.json").read_text())["shortcut@1"] == pytest.approx(res["shortcut@1"])
