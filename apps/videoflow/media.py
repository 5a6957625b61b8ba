"""Video files and picture strips for people to look at: GIF, MP4 (imageio + ffmpeg) and PNG strips.

Arrays are uint8 (T, C, H, W) per video, the layout the model works in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["to_hwc", "write_gif", "write_mp4", "write_strip"]


def to_hwc(frames: np.ndarray, scale: int = 1) -> np.ndarray:
    """(T, C, H, W) uint8 -> (T, H*scale, W*scale, 3) uint8 (gray repeated to RGB, nearest-neighbour upscaling)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.dtype != np.uint8:
        raise ValueError(f"expected frames (T, C, H, W) uint8, got {frames.shape} {frames.dtype}")
    x = frames.transpose(0, 2, 3, 1)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if scale > 1:
        x = x.repeat(scale, axis=1).repeat(scale, axis=2)
    return np.ascontiguousarray(x)


def write_gif(path: str | Path, frames: np.ndarray, fps: float = 4.0, scale: int = 1) -> Path:
    """An endlessly looping GIF of (T, C, H, W) uint8 frames."""
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, to_hwc(frames, scale), duration=1000.0 / fps, loop=0)
    return path


def write_mp4(path: str | Path, frames: np.ndarray, fps: float = 4.0, scale: int = 1) -> Path:
    """An H.264 MP4 of (T, C, H, W) uint8 frames (imageio's ffmpeg plugin; sides padded to even sizes by it)."""
    import imageio.v2 as iio2

    try:
        import imageio_ffmpeg  # noqa: F401  (imageio would otherwise pick another plugin and fail obscurely)
    except ImportError as err:
        raise RuntimeError(f"write_mp4 {path}: needs the ffmpeg plugin (pip install imageio-ffmpeg)") from err
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with iio2.get_writer(path, format="FFMPEG", fps=fps, codec="libx264", quality=8, macro_block_size=16) as w:
        for f in to_hwc(frames, scale):
            w.append_data(f)
    return path


def write_strip(path: str | Path, rows: list[np.ndarray], scale: int = 1, gap: int = 2) -> Path:
    """A PNG grid: one row per video (T_i, C, H, W), frames left to right, white gaps between frames and rows."""
    import imageio.v3 as iio

    rows_hwc = [to_hwc(r, scale) for r in rows]
    h, w = rows_hwc[0].shape[1:3]
    cols = max(len(r) for r in rows_hwc)
    canvas = np.full((len(rows) * (h + gap) + gap, cols * (w + gap) + gap, 3), 255, np.uint8)
    for i, r in enumerate(rows_hwc):
        for j, f in enumerate(r):
            canvas[gap + i * (h + gap) : gap + i * (h + gap) + h, gap + j * (w + gap) : gap + j * (w + gap) + w] = f
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, canvas)
    return path
