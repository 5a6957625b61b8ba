"""VideoFlow data: the two generators, array files (Moving MNIST layout included), video files, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apps.videoflow.data import (
    VideoDataModule,
    generate_moving_mnist,
    generate_stochastic_movement,
    load_input_clips,
    read_array_file,
)
from apps.videoflow.media import write_gif, write_mp4
from core.cli import compose


def _centroid(frame: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(frame.max(-1))
    return np.array([xs.mean(), -ys.mean()])


def test_stochastic_movement_is_deterministic_and_moves_in_eight_directions():
    a, b = generate_stochastic_movement(40, 4, 64, seed=3), generate_stochastic_movement(40, 4, 64, seed=3)
    assert a.shape == (40, 4, 64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, generate_stochastic_movement(40, 4, 64, seed=4))
    seen = set()
    for v in a:
        assert np.allclose(_centroid(v[0]), [32, -32], atol=4.0)  # starts at the centre (triangles: off-centroid)
        step = _centroid(v[1]) - _centroid(v[0])
        np.testing.assert_allclose(
            _centroid(v[2]) - _centroid(v[1]), step, atol=1.2
        )  # constant velocity (6.4 px, rasterised)
        seen.add(tuple(np.round(step / 6.4).astype(int)))
        assert len({tuple(c) for c in v[0].reshape(-1, 3) if c.any()}) == 1  # one colour
    assert seen <= {(1, 1), (1, 0), (1, -1), (0, 1), (0, -1), (-1, 1), (-1, 0), (-1, -1)} and len(seen) >= 6


def test_moving_mnist_generator():
    digits = np.zeros((5, 28, 28), np.uint8)
    digits[:, 4:24, 10:18] = 255
    v = generate_moving_mnist(digits, 3, frames=20, size=64, seed=0)
    assert v.shape == (3, 20, 64, 64) and v.dtype == np.uint8
    assert np.array_equal(v, generate_moving_mnist(digits, 3, frames=20, size=64, seed=0))
    on = (v > 0).reshape(3, 20, -1).sum(-1)
    assert (on >= 20 * 8).all() and (on <= 2 * 20 * 8).all()  # two 20 x 8 bars, possibly overlapping
    assert not np.array_equal(v[:, 0], v[:, 10])  # they move


def test_datamodule_moving_mnist_from_shipped_digits():
    dm = VideoDataModule("moving_mnist", size=32, channels=1, context_frames=2, target_frames=3, num_train=4,
                         num_val=2, num_test=2)  # fmt: skip
    dm.setup()
    assert tuple(dm.train_set.clips.shape) == (4, 5, 1, 32, 32)
    assert next(iter(dm.val_dataloader())).shape == (2, 5, 1, 32, 32)


@pytest.mark.parametrize("layout", ["NTHW", "NTHWC", "TNHW"])
def test_array_file_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    v = rng.integers(0, 256, (6, 7, 16, 16), dtype=np.uint8)  # N, T, H, W
    if layout == "NTHWC":
        data, name = np.repeat(v[..., None], 3, -1), "clips.npy"
    elif layout == "TNHW":
        data, name = v.transpose(1, 0, 2, 3), "mnist_test_seq.npy"  # Moving MNIST's own layout, picked by name
    else:
        data, name = v, "clips.npy"
    np.save(tmp_path / name, data)
    out = read_array_file(tmp_path / name)
    assert out.shape == (6, 7, 16, 16, 3 if layout == "NTHWC" else 1)
    np.testing.assert_array_equal(out[..., 0], v)
    dm = VideoDataModule("arrays", path=str(tmp_path / name), size=8, channels=1, context_frames=2, target_frames=1,
                         test_fraction=0.2, val_fraction=0.2)  # fmt: skip
    dm.setup()
    # 6 videos: 4 train, 1 val, 1 test; 7 frames -> 2 non-overlapping 3-frame clips each, resized to 8 x 8
    assert tuple(dm.train_set.clips.shape) == (8, 3, 1, 8, 8) and len(dm.test_set) == 2


def test_npz_needs_a_key_when_ambiguous(tmp_path):
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 4, 8, 8), np.uint8), b=np.zeros((2, 4, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="two.npz.*data.key"):
        read_array_file(tmp_path / "two.npz")
    assert read_array_file(tmp_path / "two.npz", key="b").shape == (2, 4, 8, 8, 1)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((4, 8, 8), np.uint8), r"bad.npy.*\(4, 8, 8\)"),
        (np.zeros((2, 5, 8, 8), np.float32), r"bad.npy.*uint8.*float32.*\(2, 5, 8, 8\)"),
        (np.zeros((2, 3, 8, 8), np.uint8), r"bad.npy video 0.*context \+ target = 5.*has 3.*\(3, 8, 8, 1\)"),
    ],
    ids=["wrong_rank", "not_uint8", "too_short"],
)
def test_bad_arrays_are_named(tmp_path, array, match):
    np.save(tmp_path / "bad.npy", array)
    dm = VideoDataModule("arrays", path=str(tmp_path / "bad.npy"), size=8, channels=1, context_frames=2,
                         target_frames=3)  # fmt: skip
    with pytest.raises(ValueError, match=match):
        dm.setup()


def _video(t: int = 9) -> np.ndarray:
    x = np.zeros((t, 3, 32, 32), np.uint8)
    for i in range(t):
        x[i, :, 8:16, 2 + 3 * i : 8 + 3 * i] = 255
    return x


@pytest.mark.parametrize("writer", [write_gif, write_mp4], ids=["gif", "mp4"])
def test_video_files_are_read_and_cut(tmp_path, writer):
    folder = tmp_path / "videos"
    for i in range(3):
        writer(folder / f"v{i}.{'gif' if writer is write_gif else 'mp4'}", _video())
    dm = VideoDataModule("videos", path=str(folder), size=16, channels=3, context_frames=2, target_frames=2,
                         val_fraction=0.3, test_fraction=0.3)  # fmt: skip
    dm.setup()
    clips = dm.train_set.clips
    assert tuple(clips.shape) == (2, 4, 3, 16, 16)  # one training video of 9 frames -> two 4-frame clips
    bright = clips.float().mean((2, 3))  # (N, T, W): the bar moves to the right
    assert (bright[0, 1].argmax() > bright[0, 0].argmax()) or (bright[0, 1] - bright[0, 0]).abs().sum() > 0
    ctx, names = load_input_clips(folder, 2, 16, 1)
    assert ctx.shape == (3, 2, 1, 16, 16) and names == ["v0", "v1", "v2"]


def test_without_the_ffmpeg_plugin_predictions_are_gifs_and_a_strip_with_a_warning(tmp_path, monkeypatch, caplog):
    import sys

    from apps.videoflow.commands import _write_videos

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # what an install without imageio-ffmpeg sees
    with pytest.raises(RuntimeError, match=r"v\.mp4: needs the ffmpeg plugin \(pip install imageio-ffmpeg\)"):
        write_mp4(tmp_path / "v.mp4", _video())
    video = _video()
    with caplog.at_level("WARNING"):
        _write_videos(tmp_path, "clip", video[:2], np.stack([video[2:5], video[5:8]]), None, fps=4.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.png", "clip_sample0.gif", "clip_sample1.gif"]
    assert sum("writing GIFs and the PNG strip only" in r.message for r in caplog.records) == 1


def test_short_video_file_is_named(tmp_path):
    write_gif(tmp_path / "short.gif", _video(3))
    dm = VideoDataModule("videos", path=str(tmp_path / "short.gif"), size=16, channels=3, context_frames=3,
                         target_frames=2)  # fmt: skip
    with pytest.raises(ValueError, match=r"short.gif.*5 frames.*has 3"):
        dm.setup()


def test_unknown_source_is_refused():
    with pytest.raises(ValueError, match="data.source"):
        VideoDataModule("bair")
    with pytest.raises(ValueError, match="data.path"):
        VideoDataModule("arrays")


def test_first_clip_only_keeps_frames_0_to_12(tmp_path):
    """BAIR as the reference (only_keep_videos_from_0th_frame): one clip per video, frames 0-12 (3 context + 10
    targets); without it, 30-frame videos also give a clip starting at frame 13, mid-trajectory."""
    t = np.arange(30, dtype=np.uint8)
    videos = np.broadcast_to(t[None, :, None, None], (5, 30, 8, 8)).copy()  # every pixel of frame i holds i
    np.save(tmp_path / "clips.npy", videos)
    kw = dict(path=str(tmp_path / "clips.npy"), size=8, channels=1, context_frames=3, target_frames=10,
              val_fraction=0.2, test_fraction=0.2)  # fmt: skip
    ref = VideoDataModule("arrays", first_clip_only=True, **kw)
    ref.setup()
    for split in ("train", "val", "test"):
        clips = ref.sets[split].clips
        assert clips.shape[1] == 13 and (clips[:, :, 0, 0, 0] == torch.arange(13)).all()
    assert len(ref.train_set) == 3
    every = VideoDataModule("arrays", **kw)
    every.setup()
    assert len(every.train_set) == 6 and every.train_set.clips[1, 0, 0, 0, 0] == 13  # a clip from frame 13


def test_bair_config_is_the_reference_protocol():
    cfg = compose("videoflow", "train", ["data=bair", "data.path=somewhere"])
    assert cfg.data.first_clip_only is True and cfg.data.source == "arrays"
    assert (cfg.data.context_frames, cfg.data.target_frames, cfg.data.size) == (3, 10, 64)
    paper = compose("videoflow", "train", ["experiment=paper", "data.path=somewhere"])
    assert paper.data.first_clip_only is True and paper.model.bits == 8 and paper.evaluation.num_samples == 100
    assert paper.model.prior == "conv3d" and paper.model.prior_blocks == 5 and paper.model.num_cond == 3
