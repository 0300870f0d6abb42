"""LeRobot datasets as a data source: a tiny folder written in LeRobot's v3.0 / v2.1 layout (parquet frames, mp4
videos encoded with PyAV) read into SequenceDataset windows (frames found by timestamp), decoded in DataLoader
workers, bad metadata reported naming the file and key, `convert` to zarr, and training / evaluation through the
CLI (a Push-T dataset with the community's keys, no key mapping by hand)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tiny import tiny_train

from shortcut_policy import cli
from shortcut_policy.datasets.lerobot import (
    LeRobotFormatError,
    LeRobotSource,
    write_lerobot_dataset,
    write_video,
)
from shortcut_policy.datasets.zarr_dataset import SequenceDataset

TINY = [
    *tiny_train(batch_size=4, warmup_steps=1),
    "train.checkpoint_every=1000",
]
LENGTHS = (14, 9, 17)


def frames_for(e, n, size=(24, 32)):
    """Frames whose brightness encodes (episode, frame): frame i of episode e is uniform 8 + 60 e + 4 i."""
    return np.broadcast_to((8 + 60 * e + 4 * np.arange(n))[:, None, None, None], (n, *size, 3)).astype(np.uint8)


def episodes(state_dim=3, size=(24, 32), lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "observation.state": rng.uniform(-1, 1, (n, state_dim)).astype(np.float32),
            "observation.images.top": frames_for(e, n, size),
            "action": rng.uniform(-1, 1, (n, 2)).astype(np.float32),
            "next.done": np.arange(n) == n - 1,
        }
        for e, n in enumerate(lengths)
    ]


@pytest.fixture(scope="module", params=["v3.0", "v2.1"])
def folder(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("lr") / f"ds_{request.param}"
    eps = episodes()
    write_lerobot_dataset(
        root, eps, fps=10, video_keys=["observation.images.top"], version=request.param, episodes_per_file=2
    )
    return root, eps


def test_reader_maps_frames_episodes_and_timestamps(folder):
    root, eps = folder
    src = LeRobotSource(root)
    assert src.fps == 10 and src.n_episodes == 3
    np.testing.assert_array_equal(src.episode_ends, np.cumsum(LENGTHS))
    np.testing.assert_array_equal(src["observation.state"], np.concatenate([e["observation.state"] for e in eps]))
    video = src["observation.images.top"]
    assert video.shape == (sum(LENGTHS), 24, 32, 3) and video.dtype == np.uint8
    ref = np.concatenate([e["observation.images.top"] for e in eps]).astype(int)
    rows = [0, 13, 14, 22, 23, 39, 5]  # across episodes and video files, out of order
    np.testing.assert_allclose(video[rows].astype(int), ref[rows], atol=2)
    np.testing.assert_allclose(np.asarray(video).astype(int), ref, atol=2)

    ds = SequenceDataset(
        replay_buffer=src,
        obs_keys={"image": ["observation.images.top"], "state": ["observation.state"]},
        image_keys=["image"],
        horizon=8,
        n_obs_steps=2,
        n_action_steps=4,
        val_ratio=0.0,
    )
    assert ds.lazy_image_keys == ["image"]  # decoded per window, not loaded
    s = ds[0]  # window starting one step before episode 0: the first frame repeated
    assert s["obs"]["image"].shape == (2, 3, 24, 32) and s["obs"]["state"].shape == (8, 3)
    np.testing.assert_allclose(s["obs"]["image"][:, 0, 0, 0].numpy() * 255, [8, 8], atol=2)
    last = ds[len(ds) - 1]  # a window of episode 2
    b = int(255 * last["obs"]["image"][0, 0, 0, 0]) - 8 - 120
    assert 0 <= round(b / 4) < LENGTHS[2]


def test_image_features_stored_as_png_in_parquet(tmp_path):
    eps = [
        {"observation.image": frames_for(e, n), "action": np.zeros((n, 2), np.float32) + e}
        for e, n in enumerate((5, 4))
    ]
    src = LeRobotSource(write_lerobot_dataset(tmp_path / "img", eps, image_keys=["observation.image"]))
    assert src.features["observation.image"]["dtype"] == "image"
    np.testing.assert_array_equal(
        src["observation.image"][[0, 6, 8]], np.concatenate([e["observation.image"] for e in eps])[[0, 6, 8]]
    )


def test_video_windows_are_decoded_in_loader_workers(folder):
    root, _ = folder
    ds = SequenceDataset(
        replay_buffer=LeRobotSource(root),
        obs_keys={"image": ["observation.images.top"], "state": ["observation.state"]},
        image_keys=["image"],
        horizon=8,
        n_obs_steps=2,
        n_action_steps=4,
        val_ratio=0.0,
    )
    ds[3]  # the parent opened a container: the forked workers must open their own
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    batches = list(loader)
    assert sum(b["action"].shape[0] for b in batches) == len(ds)
    ref = torch.stack([ds[i]["obs"]["image"] for i in range(4)])
    torch.testing.assert_close(batches[0]["obs"]["image"], ref)


def test_bad_metadata_names_file_and_key(tmp_path):
    eps = episodes(lengths=(6, 5, 7))
    kw = dict(fps=10, video_keys=["observation.images.top"])

    # a key declared in info.json without data
    root = write_lerobot_dataset(tmp_path / "a", eps, **kw)
    info = json.loads((root / "meta/info.json").read_text())
    info["features"]["observation.velocity"] = {"dtype": "float32", "shape": [2], "names": None}
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(LeRobotFormatError, match=r"file-000\.parquet.*'observation\.velocity'.*meta/info\.json"):
        LeRobotSource(root)

    # an episode index gap in meta/episodes
    root = write_lerobot_dataset(tmp_path / "b", eps, **kw)
    mfile = root / "meta/episodes/chunk-000/file-000.parquet"
    t = pq.read_table(mfile)
    pq.write_table(t.filter(pa.compute.not_equal(t["episode_index"], 1)), mfile)
    with pytest.raises(LeRobotFormatError, match=r"meta/episodes/chunk-000/file-000\.parquet: episode index gap"):
        LeRobotSource(root)

    # a video shorter than its frames' timestamps (the last episode's frames cut off)
    root = write_lerobot_dataset(tmp_path / "c", eps, **kw)
    video = root / "videos/observation.images.top/chunk-000/file-000.mp4"
    video.unlink()
    write_video(video, np.concatenate([e["observation.images.top"] for e in eps])[:14], 10)
    src = LeRobotSource(root)
    with pytest.raises(LeRobotFormatError, match=r"file-000\.mp4: video of 'observation\.images\.top'.*shorter"):
        src["observation.images.top"]

    # a video file missing, a data file missing, no info.json
    (tmp_path / "c/videos/observation.images.top/chunk-000/file-000.mp4").unlink()
    with pytest.raises(LeRobotFormatError, match=r"file-000\.mp4: video file of feature 'observation\.images\.top'"):
        LeRobotSource(tmp_path / "c")["observation.images.top"]
    (tmp_path / "c/data/chunk-000/file-000.parquet").unlink()
    with pytest.raises(LeRobotFormatError, match=r"data/chunk-000/file-000\.parquet: data file missing"):
        LeRobotSource(tmp_path / "c")
    (tmp_path / "c/meta/info.json").unlink()
    with pytest.raises(LeRobotFormatError, match="no meta/info.json"):
        LeRobotSource(tmp_path / "c")

    # rows that disagree with the episode lengths, and irregular timestamps
    root = write_lerobot_dataset(tmp_path / "d", eps, **kw)
    dfile = root / "data/chunk-000/file-000.parquet"
    t = pq.read_table(dfile)
    pq.write_table(t.slice(1), dfile)  # drop frame 0 of episode 0
    with pytest.raises(LeRobotFormatError, match=r"file-000\.parquet: episode 0 has 5 rows.*length 6"):
        LeRobotSource(root)
    root = write_lerobot_dataset(tmp_path / "e", eps, **kw)
    dfile = root / "data/chunk-000/file-000.parquet"
    t = pq.read_table(dfile)
    ts = t["timestamp"].to_numpy().copy()
    ts[3] += 0.05
    pq.write_table(t.set_column(t.schema.get_field_index("timestamp"), "timestamp", pa.array(ts)), dfile)
    with pytest.raises(LeRobotFormatError, match=r"episode 0: timestamp goes from .* 1/fps"):
        LeRobotSource(root)


def pusht_community(root, lengths=(20, 16, 24), seed=0):
    """A tiny dataset with the community Push-T dataset's features and layout (v3.0, AV1 video, 10 fps):
    observation.image (96x96 video), observation.state (agent xy), action, next.reward / next.done / next.success."""
    rng = np.random.default_rng(seed)
    eps = []
    for n in lengths:
        xy = np.cumsum(rng.normal(0, 5, (n, 2)), axis=0) + 256
        eps.append(
            {
                "observation.image": rng.integers(0, 256, (n, 96, 96, 3)).astype(np.uint8),
                "observation.state": xy.astype(np.float32),
                "action": (xy + rng.normal(0, 3, (n, 2))).astype(np.float32),
                "next.reward": rng.uniform(0, 1, n).astype(np.float32),
                "next.done": np.arange(n) == n - 1,
                "next.success": np.zeros(n, bool),
            }
        )
    return write_lerobot_dataset(root, eps, fps=10, video_keys=["observation.image"], codec="libsvtav1"), eps


def test_pusht_community_layout_trains_and_evaluates_through_the_cli(tmp_path):
    root, _ = pusht_community(tmp_path / "pusht")
    run = tmp_path / "run"
    res = cli.run_verb(
        "train",
        [
            "task=pusht_image",
            f"task.dataset.lerobot_path={root}",  # no key mapping: observation.image -> image, .state -> agent_pos
            *TINY,
            "task.encoder.resnet_width=16",
            "task.max_steps=16",
            "train.num_steps=2",
            "train.num_workers=1",
            f"run_dir={run}",
        ],
    )
    assert res["steps"] == 2
    sanity = json.loads((run / "data_sanity.json").read_text())
    assert set(sanity["keys"]) == {"observation.image", "observation.state", "action"}
    ev = cli.run_verb(
        "eval",
        [
            f"checkpoint={run / 'checkpoints' / 'last.ckpt'}",
            "n_episodes=1",
            "workers=1",
            "n_videos=0",
            f"run_dir={tmp_path / 'eval'}",
        ],
    )
    assert ev["n_episodes"] == 1 and 0.0 <= ev["mean_score@1"] <= 1.0


def test_lowdim_training_and_convert_to_zarr(tmp_path):
    eps = episodes(state_dim=20)  # Push-T keypoint observations are 20-d
    root = write_lerobot_dataset(tmp_path / "ds", eps, fps=10, video_keys=["observation.images.top"])
    res = cli.run_verb(
        "train",
        [
            "task=pusht_lowdim",
            f"task.dataset.lerobot_path={root}",
            *TINY,
            "train.num_steps=2",
            f"run_dir={tmp_path / 'run'}",
        ],
    )
    assert res["steps"] == 2
    with pytest.raises(ValueError, match=r"recorded at 10 fps.*task.control_hz=20"):
        cli.run_verb(
            "train",
            [
                "task=pusht_lowdim",
                f"task.dataset.lerobot_path={root}",
                "task.control_hz=20",
                *TINY,
                f"run_dir={tmp_path / 'run_hz'}",
            ],
        )

    out = tmp_path / "ds.zarr"
    conv = cli.run_verb("convert", [f"src={root}", f"out={out}", f"run_dir={tmp_path / 'conv'}"])
    assert conv["episodes"] == 3 and conv["frames"] == sum(LENGTHS)
    from shortcut_policy.datasets.replay_buffer import ReplayBuffer

    rb = ReplayBuffer.open(out)
    np.testing.assert_array_equal(rb.episode_ends, np.cumsum(LENGTHS))
    np.testing.assert_array_equal(rb["observation.state"][:], np.concatenate([e["observation.state"] for e in eps]))
    ref = np.concatenate([e["observation.images.top"] for e in eps]).astype(int)
    np.testing.assert_allclose(rb["observation.images.top"][:].astype(int), ref, atol=2)
    with pytest.raises(FileExistsError, match="already exists"):
        cli.run_verb("convert", [f"src={root}", f"out={out}", f"run_dir={tmp_path / 'conv2'}"])
    # the converted zarr trains without key mapping too (its lerobot attributes say where the keys came from)
    res = cli.run_verb(
        "train",
        [
            "task=pusht_lowdim",
            f"task.dataset.zarr_path={out}",
            *TINY,
            "train.num_steps=1",
            f"run_dir={tmp_path / 'run_zarr'}",
        ],
    )
    assert res["steps"] == 1
