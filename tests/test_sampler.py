"""SequenceSampler windows (Diffusion Policy's create_indices) and the train/val split rules."""

import numpy as np
import pytest

from shortcut_policy.datasets.replay_buffer import ReplayBuffer
from shortcut_policy.datasets.sampler import SequenceSampler, create_indices, downsample_mask, get_val_mask

LENGTHS = [20, 16, 9, 1, 33]


def _buffer(lengths=LENGTHS):
    """Each row encodes (episode, step) so every frame can be traced back."""
    ep = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)])
    step = np.concatenate([np.arange(n) for n in lengths])
    data = {
        "tag": np.stack([ep, step], axis=1).astype(np.int64),
        "img": np.repeat((ep * 100 + step).astype(np.float32)[:, None, None], 4, axis=1).reshape(-1, 2, 2),
    }
    return ReplayBuffer.from_arrays(data, np.cumsum(lengths))


@pytest.mark.parametrize("horizon,pad_before,pad_after", [(16, 1, 7), (16, 0, 0), (4, 3, 3), (10, 2, 0)])
def test_window_counts_padding_and_boundaries(horizon, pad_before, pad_after):
    rb = _buffer()
    s = SequenceSampler(rb, horizon, pad_before=pad_before, pad_after=pad_after)
    expected = [max(0, n - horizon + pad_before + pad_after + 1) for n in LENGTHS]
    assert len(s) == sum(expected)
    counts = np.zeros(len(LENGTHS), int)
    starts = {i: [] for i in range(len(LENGTHS))}
    for idx in range(len(s)):
        w = s.sample_sequence(idx)
        tag, img = w["tag"], w["img"]
        assert tag.shape == (horizon, 2) and img.shape == (horizon, 2, 2)
        ep = tag[:, 0]
        assert (ep == ep[0]).all(), "window crosses an episode boundary"
        e = int(ep[0])
        counts[e] += 1
        L = LENGTHS[e]
        # reconstruct the (possibly out-of-range) start step from the unpadded part
        bs, be, ss, se = s.indices[idx]
        start = int(tag[ss, 1]) - ss
        starts[e].append(start)
        for j in range(horizon):
            want = min(max(start + j, 0), L - 1)  # edge replication
            assert tag[j, 1] == want
            assert img[j, 0, 0] == e * 100 + want
        assert start >= -pad_before and start + horizon <= L + pad_after
    np.testing.assert_array_equal(counts, expected)
    for e, st in starts.items():  # every admissible start exactly once, in order
        assert st == list(range(-pad_before, LENGTHS[e] - horizon + pad_after + 1))


def test_padded_frames_equal_first_and_last_frame():
    rb = _buffer([12])
    s = SequenceSampler(rb, 16, pad_before=1, pad_after=7)
    first = s.sample_sequence(0)["tag"]
    np.testing.assert_array_equal(first[0], first[1])  # frame 0 repeated before the start
    np.testing.assert_array_equal(first[0], rb["tag"][0])
    last = s.sample_sequence(len(s) - 1)["tag"]
    np.testing.assert_array_equal(last[-7:], np.repeat(rb["tag"][-1:], 7, axis=0))


def test_index_rows_and_pad_clamping():
    ends = np.array([5, 8])
    idx = create_indices(ends, 4, pad_before=10, pad_after=-2)  # clamped to 3 and 0
    assert idx.dtype == np.int64 and idx.shape == (5 - 4 + 3 + 1 + 8 - 5 - 4 + 3 + 1, 4)
    np.testing.assert_array_equal(idx[0], [0, 1, 3, 4])  # start -3: one real frame at position 3
    np.testing.assert_array_equal(idx[4], [1, 5, 0, 4])
    np.testing.assert_array_equal(idx[5], [5, 6, 3, 4])  # second episode starts at buffer row 5
    with pytest.raises(ValueError, match="episode_mask"):
        create_indices(ends, 4, episode_mask=np.ones(3, bool))


def test_episode_mask_and_key_first_k():
    rb = _buffer()
    mask = np.array([False, True, False, True, True])
    s = SequenceSampler(rb, 16, pad_before=1, pad_after=7, episode_mask=mask)
    assert len(s) == sum(max(0, n - 7) for n, m in zip(LENGTHS, mask) if m) == 35
    seen = {int(s.sample_sequence(i)["tag"][0, 0]) for i in range(len(s))}
    assert seen == {1, 4}  # episode 3 (length 1) yields no window
    s2 = SequenceSampler(rb, 16, pad_before=1, pad_after=7, keys=["img"], key_first_k={"img": 2})
    w = s2.sample_sequence(3)  # episode 0, start 2: no padding
    assert set(w) == {"img"}
    np.testing.assert_array_equal(w["img"][:2, 0, 0], [2, 3])
    assert np.isnan(w["img"][2:]).all()
    with pytest.raises(KeyError, match="nope"):
        SequenceSampler(rb, 16, keys=["nope"])


def test_get_val_mask_matches_numpy_default_rng_choice():
    m = get_val_mask(206, 0.02, seed=42)
    assert m.dtype == bool and m.shape == (206,) and m.sum() == 4  # round(206 * 0.02) = 4
    expected = np.zeros(206, bool)
    expected[np.random.default_rng(42).choice(206, size=4, replace=False)] = True
    np.testing.assert_array_equal(m, expected)
    assert get_val_mask(206, 0.0, 42).sum() == 0
    assert get_val_mask(10, 0.01, 0).sum() == 1  # at least one
    assert get_val_mask(2, 0.9, 0).sum() == 1  # at most n - 1
    assert not np.array_equal(get_val_mask(206, 0.1, 1), get_val_mask(206, 0.1, 2))


def test_downsample_mask_matches_numpy_default_rng_choice():
    train = ~get_val_mask(206, 0.02, seed=42)
    d = downsample_mask(train, 90, seed=42)
    assert d.sum() == 90 and not (d & ~train).any()
    cur = np.nonzero(train)[0]
    expected = np.zeros(206, bool)
    expected[cur[np.random.default_rng(42).choice(len(cur), size=90, replace=False)]] = True
    np.testing.assert_array_equal(d, expected)
    np.testing.assert_array_equal(downsample_mask(train, None, 42), train)
    np.testing.assert_array_equal(downsample_mask(train, 500, 42), train)
