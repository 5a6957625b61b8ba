"""Video data: frame arrays (.npy/.npz, Moving-MNIST layout included), video files, and two generated sets.

Every source ends as a uint8 array of clips (N, T, C, H, W); the datamodule serves uint8 tensors (B, T, C, H, W)
and the model quantizes/dequantizes them itself.

Sources (``VideoDataModule(source=...)``):

* ``stochastic_movement`` (built-in default): the VideoFlow paper's Stochastic Movement set. A circle, square or
  triangle of one of six colours and random size starts at the centre of a black frame and moves with constant
  speed in one of eight directions (tensor2tensor's ``video_stochastic_shapes10k``), generated from the seed.
* ``moving_mnist``: two MNIST digits bouncing in 64 x 64 frames (Srivastava et al. 2015), generated from the seed
  and the digits in ``digits_path`` (``data/videoflow/mnist_digits_dev.npz`` ships 7,000 real digits).
* ``arrays``: a ``.npy``/``.npz`` file of uint8 frames, (N, T, H, W), (N, T, H, W, C), or the Moving MNIST file
  layout (T, N, H, W) of ``mnist_test_seq.npy`` (``layout=auto`` picks it by that file name; or ``layout=TNHW``);
  or a folder of split files ``train.npy``, ``test.npy`` (and optionally ``val.npy``), as ``scripts/convert_bair.py``
  writes BAIR robot pushing with the release's own train/test split.
* ``videos``: a video file or a folder of ``.mp4``/``.gif``/``.avi`` files read with imageio, cut into clips.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from core.paths import resolve_path

__all__ = [
    "SOURCES",
    "VIDEO_SUFFIXES",
    "generate_stochastic_movement",
    "generate_moving_mnist",
    "read_array_file",
    "read_video_file",
    "cut_clips",
    "ClipDataset",
    "VideoDataModule",
]

log = logging.getLogger(__name__)

SOURCES = ("stochastic_movement", "moving_mnist", "arrays", "videos")
VIDEO_SUFFIXES = (".mp4", ".gif", ".avi")
DEFAULT_DIGITS = "data/videoflow/mnist_digits_dev.npz"

# tensor2tensor's matplotlib colours b, g, r, c, m, y as RGB
_COLOURS = np.array([[0, 0, 255], [0, 128, 0], [255, 0, 0], [0, 191, 191], [191, 0, 191], [191, 191, 0]], np.uint8)
_DIRECTIONS = np.array([[1, 1], [1, 0], [1, -1], [0, 1], [0, -1], [-1, 1], [-1, 0], [-1, -1]], np.float64)


# ---- generated sets -------------------------------------------------------------------------------------------
def _shape_mask(kind: int, cx: float, cy: float, s: float, size: int) -> np.ndarray:
    """(size, size) bool mask of a circle (0), square (1) or triangle (2) centred at (cx, cy), half-size s (pixels).

    Coordinates as matplotlib's axes: x to the right, y upwards (row 0 is the top of the image)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    y = size - yy  # upward axis
    if kind == 0:
        return (xx - cx) ** 2 + (y - cy) ** 2 <= s * s
    if kind == 1:
        return (np.abs(xx - cx) <= s) & (np.abs(y - cy) <= s)
    # equilateral triangle with base from (cx - s, cy - s) to (cx + s, cy - s), apex at (cx, cy - s + s sqrt 3)
    h = s * math.sqrt(3.0)
    u = y - (cy - s)
    return (u >= 0) & (u <= h) & (np.abs(xx - cx) <= s * (1 - u / h))


def generate_stochastic_movement(n: int, frames: int = 5, size: int = 64, seed: int = 0) -> np.ndarray:
    """The Stochastic Movement set: (n, frames, size, size, 3) uint8, deterministic in ``seed``.

    As tensor2tensor: a 10 x 10 canvas, the shape starts at its centre, moves 1 unit per frame in one of 8
    directions, half-size uniform in [0.5, 1.5] units, one of 6 colours, on black."""
    rng = np.random.default_rng(seed)
    unit = size / 10.0
    out = np.zeros((n, frames, size, size, 3), np.uint8)
    for i in range(n):
        direction = _DIRECTIONS[rng.integers(len(_DIRECTIONS))]
        colour = _COLOURS[rng.integers(len(_COLOURS))]
        kind = int(rng.integers(3))
        half = rng.uniform(0.5, 1.5) * unit
        pos = np.array([5.0, 5.0]) * unit
        for t in range(frames):
            out[i, t][_shape_mask(kind, pos[0], pos[1], half, size)] = colour
            pos = pos + direction * unit
    return out


def generate_moving_mnist(
    digits: np.ndarray, n: int, frames: int = 20, size: int = 64, num_digits: int = 2, seed: int = 0
) -> np.ndarray:
    """Moving MNIST: (n, frames, size, size) uint8, ``num_digits`` 28 x 28 digits bouncing off the borders.

    As Srivastava et al. (2015): a random start position and direction per digit, a step of 0.1 of the free
    range per frame, reflection at the borders, digits combined with a pixel-wise maximum."""
    if digits.ndim != 3 or digits.dtype != np.uint8:
        raise ValueError(f"moving_mnist: expected digit images (N, h, w) uint8, got {digits.shape} {digits.dtype}")
    dh, dw = digits.shape[1:]
    if dh > size or dw > size:
        raise ValueError(f"moving_mnist: digits of {dh} x {dw} do not fit in {size} x {size} frames")
    rng = np.random.default_rng(seed)
    out = np.zeros((n, frames, size, size), np.uint8)
    lim_y, lim_x = size - dh, size - dw
    for i in range(n):
        for _ in range(num_digits):
            img = digits[rng.integers(len(digits))]
            theta = rng.uniform(0, 2 * np.pi)
            vy, vx = np.sin(theta), np.cos(theta)
            y, x = rng.uniform(0, 1), rng.uniform(0, 1)
            for t in range(frames):
                top, left = int(round(y * lim_y)), int(round(x * lim_x))
                view = out[i, t, top : top + dh, left : left + dw]
                np.maximum(view, img, out=view)
                y, x = y + 0.1 * vy, x + 0.1 * vx
                if not 0 <= y <= 1:
                    vy, y = -vy, min(max(y, 0.0), 1.0)
                if not 0 <= x <= 1:
                    vx, x = -vx, min(max(x, 0.0), 1.0)
    return out


# ---- files ----------------------------------------------------------------------------------------------------
def _to_nthwc(arr: np.ndarray, layout: str, name: str) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 frames, found dtype {arr.dtype} with shape {arr.shape}")
    if layout == "TNHW":
        if arr.ndim != 4:
            raise ValueError(f"{name}: layout TNHW needs a 4-D array (T, N, H, W), found shape {arr.shape}")
        arr = arr.transpose(1, 0, 2, 3)
    elif layout not in ("NTHW", "NTHWC"):
        raise ValueError(f"{name}: unknown layout {layout!r}; choose auto, NTHW, NTHWC or TNHW")
    if arr.ndim == 4:
        arr = arr[..., None]
    if arr.ndim != 5 or arr.shape[-1] not in (1, 3):
        raise ValueError(
            f"{name}: expected frames (N, T, H, W), (N, T, H, W, C) with C in (1, 3) or (T, N, H, W), "
            f"found shape {arr.shape}"
        )
    return arr


def read_array_file(path: str | Path, layout: str = "auto", key: str | None = None) -> np.ndarray:
    """Videos (N, T, H, W, C) uint8 from a ``.npy`` or ``.npz`` file; errors name the file and the shape found."""
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.path: {path} does not exist")
    if path.suffix == ".npz":
        with np.load(path) as z:
            names = list(z.keys())
            pick = key or next((k for k in ("videos", "frames", "clips", "arr_0") if k in names), None)
            if pick is None:
                pick = names[0] if len(names) == 1 else None
            if pick not in names:
                raise ValueError(f"{path}: give data.key, one of the arrays {names}")
            arr = z[pick]
    elif path.suffix == ".npy":
        arr = np.load(path, mmap_mode="r")  # clips are cut from the mapped file: a converted BAIR split is GBs
    else:
        raise ValueError(f"{path}: expected a .npy or .npz file of frames")
    if layout == "auto":
        layout = "TNHW" if path.name.startswith("mnist_test_seq") else ("NTHW" if arr.ndim == 4 else "NTHWC")
    return _to_nthwc(arr, layout, str(path))


def read_video_file(path: str | Path) -> np.ndarray:
    """All frames of a video file (T, H, W, C) uint8, read with imageio."""
    import imageio.v3 as iio

    path = Path(path)
    try:
        frames = np.asarray(iio.imread(path, index=None))
    except Exception as e:  # imageio raises many types; say which file
        raise ValueError(f"{path}: could not read the video with imageio: {e}") from e
    if frames.ndim == 3:  # (T, H, W) gray
        frames = frames[..., None]
    if frames.ndim != 4:
        raise ValueError(f"{path}: expected frames (T, H, W[, C]), found shape {frames.shape}")
    if frames.shape[-1] == 4:  # GIFs are read as RGBA
        frames = frames[..., :3]
    if frames.dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 frames, found dtype {frames.dtype} with shape {frames.shape}")
    return frames


def cut_clips(
    video: np.ndarray, length: int, stride: int | None, name: str, first_clip_only: bool = False
) -> np.ndarray:
    """Non-overlapping (or ``stride``-spaced) clips of ``length`` frames of one video (T, ...) -> (n, length, ...).

    ``first_clip_only``: only frames 0..length-1, one clip per video (tensor2tensor's
    ``only_keep_videos_from_0th_frame``, how VideoFlow and SAVP evaluate BAIR: every clip starts where the video
    starts, none mid-trajectory)."""
    t = video.shape[0]
    if t < length:
        raise ValueError(
            f"{name}: a clip needs context + target = {length} frames, but the video has {t} (shape {video.shape})"
        )
    starts = [0] if first_clip_only else range(0, t - length + 1, stride or length)
    return np.stack([np.asarray(video[s : s + length]) for s in starts])


def _fit_frames(clips: np.ndarray, size: int, channels: int, name: str) -> np.ndarray:
    """(N, T, H, W, C) -> (N, T, channels, size, size): colour conversion, centre crop to square, area resize."""
    c = clips.shape[-1]
    if c != channels:
        if c == 3 and channels == 1:
            clips = np.round(clips.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
            clips = clips.clip(0, 255).astype(np.uint8)
        elif c == 1 and channels == 3:
            clips = np.repeat(clips, 3, axis=-1)
        else:
            raise ValueError(f"{name}: frames have {c} channels, data.channels={channels}")
    n, t, h, w, _ = clips.shape
    if h != w:
        m = min(h, w)
        clips = clips[:, :, (h - m) // 2 : (h - m) // 2 + m, (w - m) // 2 : (w - m) // 2 + m]
    out = np.ascontiguousarray(clips.transpose(0, 1, 4, 2, 3))  # (N, T, C, H, W)
    if out.shape[-1] != size:
        x = torch.from_numpy(out).reshape(n * t, channels, *out.shape[-2:]).float()
        mode = "area" if out.shape[-1] > size else "bilinear"
        x = F.interpolate(x, size=(size, size), mode=mode)
        out = x.round().clamp(0, 255).to(torch.uint8).reshape(n, t, channels, size, size).numpy()
    return out


# ---- datasets -------------------------------------------------------------------------------------------------
class ClipDataset(Dataset):
    """uint8 clips (N, T, C, H, W); ``crop`` frames at a random start per item (training), else the whole clip."""

    def __init__(self, clips: np.ndarray, crop: int | None = None) -> None:
        self.clips = torch.from_numpy(np.ascontiguousarray(clips))
        if crop is not None and not 1 <= crop <= self.clips.shape[1]:
            raise ValueError(f"data.train_frames={crop} must lie in [1, {self.clips.shape[1]}] (the clip length)")
        self.crop = crop

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> torch.Tensor:
        clip = self.clips[i]
        if self.crop is None or self.crop == clip.shape[0]:
            return clip
        # torch's generator: seeded by Lightning per rank and re-seeded per DataLoader worker, so workers and ranks
        # draw different crops (a numpy generator copied into each worker would repeat the same offsets)
        s = int(torch.randint(0, clip.shape[0] - self.crop + 1, (1,)))
        return clip[s : s + self.crop]


class VideoDataModule(pl.LightningDataModule):
    """Train/val/test clips of ``context_frames + target_frames`` frames from one of :data:`SOURCES`.

    Arguments:
        source: ``stochastic_movement`` | ``moving_mnist`` | ``arrays`` | ``videos``.
        path: the array file (``arrays``) or a video file / folder (``videos``).
        size, channels: frames are served as (channels, size, size); files are centre-cropped and resized.
        context_frames, target_frames: K conditioning frames and the frames to predict (clip length K + target).
        train_frames: train on random crops of this many frames (tensor2tensor's ``num_train_frames``); null: whole.
        num_train, num_val, num_test: clips per split for the generated sources.
        val_fraction, test_fraction: the last videos of a file source form test, the ones before them val (a folder
            of split files keeps its own test split and takes val from ``val.npy`` or, without it, from train).
        stride: frames between clip starts within a file's video (null: non-overlapping clips).
        first_clip_only: one clip per video, frames 0..K+T-1 (BAIR as the reference); otherwise every clip.
    """

    def __init__(
        self,
        source: str = "stochastic_movement",
        path: str | None = None,
        size: int = 32,
        channels: int = 3,
        context_frames: int = 3,
        target_frames: int = 10,
        train_frames: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        num_train: int = 2000,
        num_val: int = 64,
        num_test: int = 64,
        layout: str = "auto",
        key: str | None = None,
        stride: int | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        digits_path: str = DEFAULT_DIGITS,
        num_digits: int = 2,
        max_videos: int | None = None,
        first_clip_only: bool = False,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"data.source={source!r}: choose one of {', '.join(SOURCES)}")
        if source in ("arrays", "videos") and not path:
            raise ValueError(f"data.source={source} needs data.path=<file or folder>")
        if context_frames < 1 or target_frames < 1:
            raise ValueError(f"context_frames={context_frames} and target_frames={target_frames} must be >= 1")
        self.source, self.path, self.size, self.channels = source, path, size, channels
        self.context_frames, self.target_frames, self.train_frames = context_frames, target_frames, train_frames
        self.batch_size, self.eval_batch_size, self.num_workers, self.seed = (
            batch_size,
            eval_batch_size,
            num_workers,
            seed,
        )
        self.counts = {"train": num_train, "val": num_val, "test": num_test}
        self.layout, self.key, self.stride = layout, key, stride
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.digits_path, self.num_digits, self.max_videos = digits_path, num_digits, max_videos
        self.first_clip_only = first_clip_only
        self.sets: dict[str, ClipDataset] = {}

    @property
    def clip_length(self) -> int:
        return self.context_frames + self.target_frames

    # ---- building the splits --------------------------------------------------------------------------------
    def _generated(self, split: str) -> np.ndarray:
        n, seed = self.counts[split], self.seed * 1000 + {"train": 0, "val": 1, "test": 2}[split]
        if self.source == "stochastic_movement":
            clips = generate_stochastic_movement(n, self.clip_length, self.size, seed)
        else:
            path = resolve_path(self.digits_path)
            if not path.is_file():
                raise FileNotFoundError(f"data.digits_path: {path} does not exist (an .npz with 'images' (N, 28, 28))")
            with np.load(path) as z:
                if "images" not in z:
                    raise ValueError(f"{path}: expected an array 'images' (N, 28, 28) uint8, found {list(z.keys())}")
                digits = z["images"]
            # digits are split too: train clips use the first 80 %, val the next 10 %, test the last 10 %
            a, b = int(0.8 * len(digits)), int(0.9 * len(digits))
            part = {"train": digits[:a], "val": digits[a:b], "test": digits[b:]}[split]
            clips = generate_moving_mnist(part, n, self.clip_length, 64, self.num_digits, seed)[..., None]
        return _fit_frames(clips, self.size, self.channels, self.source)

    def _read_videos(self, path: Path) -> tuple[list[np.ndarray], list[str]]:
        if self.source == "arrays":
            videos = list(read_array_file(path, self.layout, self.key))
            return videos, [f"{path} video {i}" for i in range(len(videos))]
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES) if path.is_dir() else [path]
        if not files:
            raise FileNotFoundError(f"data.path: no {'/'.join(VIDEO_SUFFIXES)} files in {path}")
        videos = [read_video_file(f) for f in tqdm(files, desc="reading videos", unit="file", disable=len(files) < 4)]
        return videos, [str(f) for f in files]

    def _clips(self, videos: Sequence[np.ndarray], names: Sequence[str], where: Path) -> np.ndarray:
        clips = [cut_clips(v, self.clip_length, self.stride, n, self.first_clip_only) for v, n in zip(videos, names)]
        return _fit_frames(np.concatenate(clips), self.size, self.channels, str(where))

    def _split_files(self, path: Path) -> dict[str, np.ndarray]:
        """A folder of ``train.npy`` / ``test.npy`` (/ ``val.npy``): the files' own split."""
        found = {s: path / f"{s}.npy" for s in ("train", "val", "test") if (path / f"{s}.npy").is_file()}
        videos = {s: self._read_videos(f) for s, f in found.items()}
        if self.max_videos:
            videos = {s: (v[: self.max_videos], n[: self.max_videos]) for s, (v, n) in videos.items()}
        if "val" not in videos:  # the last val_fraction of train
            v, n = videos["train"]
            k = len(v) - max(1, int(round(self.val_fraction * len(v))))
            videos["train"], videos["val"] = (v[:k], n[:k]), (v[k:], n[k:])
        return {s: self._clips(v, n, found.get(s, found["train"])) for s, (v, n) in videos.items()}

    def _from_files(self) -> dict[str, np.ndarray]:
        path = resolve_path(self.path)
        if self.source == "arrays" and path.is_dir():
            if not (path / "train.npy").is_file() or not (path / "test.npy").is_file():
                raise FileNotFoundError(f"data.path: the folder {path} needs train.npy and test.npy (val.npy optional)")
            return self._split_files(path)
        videos, names = self._read_videos(path)
        if self.max_videos:
            videos, names = videos[: self.max_videos], names[: self.max_videos]
        n = len(videos)
        n_test = max(1, int(round(self.test_fraction * n))) if n >= 3 else 0
        n_val = max(1, int(round(self.val_fraction * n))) if n >= 3 else 0
        bounds = {"train": (0, n - n_val - n_test), "val": (n - n_val - n_test, n - n_test), "test": (n - n_test, n)}
        out = {}
        for split, (a, b) in bounds.items():
            if b <= a:  # one or two videos: cut every split from the same clips (said in the log)
                a, b = 0, n
                log.warning("data: only %d video(s); the %s split reuses them", n, split)
            out[split] = self._clips(videos[a:b], names[a:b], path)
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        if self.source in ("stochastic_movement", "moving_mnist"):
            arrays = {s: self._generated(s) for s in ("train", "val", "test")}
        else:
            arrays = self._from_files()
        for split, clips in arrays.items():
            crop = self.train_frames if split == "train" else None
            self.sets[split] = ClipDataset(clips, crop)
        log.info("data: %s", ", ".join(f"{k} {tuple(v.clips.shape)}" for k, v in self.sets.items()))

    @property
    def train_set(self) -> ClipDataset:
        return self.sets["train"]

    @property
    def val_set(self) -> ClipDataset:
        return self.sets["val"]

    @property
    def test_set(self) -> ClipDataset:
        return self.sets["test"]

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(
            self.sets[split],
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            drop_last=shuffle,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)


def load_input_clips(
    path: str | Path, context_frames: int, size: int, channels: int, layout: str = "auto", key: str | None = None
) -> tuple[np.ndarray, list[str]]:
    """Context clips (N, K, C, size, size) uint8 for ``predict input=...``: the first K frames of every video in an
    array file, a video file or a folder of videos (or of array files)."""
    path = resolve_path(path)
    if not path.exists():
        raise FileNotFoundError(f"input: {path} does not exist")
    files: Sequence[Path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (*VIDEO_SUFFIXES, ".npy", ".npz"))
        if not files:
            raise FileNotFoundError(f"input: no video or .npy/.npz files in {path}")
    else:
        files = [path]
    clips, names = [], []
    for f in files:
        if f.suffix.lower() in (".npy", ".npz"):
            videos = read_array_file(f, layout, key)
            for i, v in enumerate(videos):
                clips.append(cut_clips(v, context_frames, None, f"{f} video {i}")[:1])
                names.append(f"{f.stem}_{i:04d}")
        elif f.suffix.lower() in VIDEO_SUFFIXES:
            clips.append(cut_clips(read_video_file(f), context_frames, None, str(f))[:1])
            names.append(f.stem)
        else:
            raise ValueError(f"input: {f} is neither a video ({', '.join(VIDEO_SUFFIXES)}) nor a .npy/.npz file")
    return _fit_frames(np.concatenate(clips), size, channels, str(path)), names
