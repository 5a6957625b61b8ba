"""The install step did its job: the pinned CPU torch and every field library load, with the system libraries."""

from __future__ import annotations

import numpy as np
import torch


def test_torch_is_the_pinned_release():
    assert torch.__version__.startswith("2.13."), torch.__version__


def test_open3d_writes_a_point_cloud(tmp_path):
    import open3d as o3d  # needs libusb-1.0-0, libgl1, libegl1

    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.random.default_rng(0).normal(size=(50, 3))))
    path = tmp_path / "cloud.ply"
    assert o3d.io.write_point_cloud(str(path), pc)
    assert len(o3d.io.read_point_cloud(str(path)).points) == 50


def test_rdkit_parses_and_draws(tmp_path):
    from rdkit import Chem
    from rdkit.Chem import Draw  # needs libxrender1

    mol = Chem.MolFromSmiles("c1ccccc1O")
    Chem.Kekulize(mol, clearAromaticFlags=True)
    Draw.MolToFile(mol, str(tmp_path / "phenol.png"))
    assert (tmp_path / "phenol.png").stat().st_size > 500


def test_audio_stack_round_trips_and_builds_mel_filters(tmp_path):
    import librosa
    import soundfile as sf

    wave = np.sin(np.linspace(0, 200 * np.pi, 22050)).astype(np.float32)
    sf.write(tmp_path / "tone.wav", wave, 22050, subtype="PCM_16")
    back, sr = sf.read(tmp_path / "tone.wav", dtype="float32")
    assert sr == 22050 and np.abs(back - wave).max() < 1e-3
    assert librosa.filters.mel(sr=22050, n_fft=1024, n_mels=80, fmin=0, fmax=8000).shape == (80, 513)


def test_video_graph_and_ode_libraries_load():
    import imageio.v3 as iio
    import imageio_ffmpeg
    import torch_geometric
    import torchdiffeq

    assert imageio_ffmpeg.get_ffmpeg_exe()
    assert torch_geometric.__version__ and torchdiffeq.__version__ and iio.imread
