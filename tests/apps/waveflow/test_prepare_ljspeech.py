"""scripts/prepare_ljspeech.py on a tiny fake LJSpeech-1.1.tar.bz2: unpack, the count check, the split lists the data
module reads (the first utterances held out), and archives that are not LJSpeech."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from apps.waveflow.audio import save_wav
from apps.waveflow.data import SpeechDataModule
from scripts.prepare_ljspeech import main


def _fake_archive(tmp_path: Path, n: int = 24, drop_wav: str | None = None) -> Path:
    src = tmp_path / "src" / "LJSpeech-1.1"
    (src / "wavs").mkdir(parents=True)
    ids = [f"LJ001-{i:04d}" for i in range(1, n + 1)]
    (src / "metadata.csv").write_text("".join(f"{i}|Text {i}.|Text {i}.\n" for i in ids), encoding="utf-8")
    rng = np.random.default_rng(0)
    for i in ids:
        if i != drop_wav:
            save_wav(src / "wavs" / f"{i}.wav", (0.1 * rng.standard_normal(3000)).astype(np.float32))
    archive = tmp_path / "LJSpeech-1.1.tar.bz2"
    with tarfile.open(archive, "w:bz2") as tar:
        tar.add(src, arcname="LJSpeech-1.1")
    return archive


def test_prepare_unpacks_checks_and_writes_the_reference_split(tmp_path, capsys):
    archive = _fake_archive(tmp_path)
    out = tmp_path / "data"
    assert main(["--archive", str(archive), "--out", str(out)]) == 1  # 24 clips, not LJSpeech's 13,100
    assert "24 ids in metadata.csv and 24 wavs, expected 13,100 of each" in capsys.readouterr().err
    assert main(["--archive", str(archive), "--out", str(out), "--expected", "24", "--val-size", "3"]) == 0
    corpus = out / "LJSpeech-1.1"
    test = (corpus / "test.txt").read_text().splitlines()
    assert test[0].startswith("#") and test[1:] == [f"LJ001-{i:04d}" for i in range(1, 17)]
    dm = SpeechDataModule(root=str(corpus), segment_length=2048)
    dm.setup()
    assert [len(dm.sets[s].utterances) for s in ("train", "val", "test")] == [5, 3, 16]
    assert dm.sets["test"].utterances[0].id == "LJ001-0001" and "references' held-out set" in dm.describe("test")
    # a second run checks the unpacked corpus instead of unpacking again
    again = ["--archive", str(tmp_path / "gone.tar.bz2"), "--out", str(out), "--expected", "24", "--val-size", "3"]
    assert main(again) == 0
    assert "already unpacked" in capsys.readouterr().out


def test_prepare_names_what_is_wrong(tmp_path, capsys):
    archive = _fake_archive(tmp_path, n=20, drop_wav="LJ001-0007")
    assert main(["--archive", str(archive), "--out", str(tmp_path / "a"), "--expected", "20"]) == 1
    assert "no wav for 1 ids (LJ001-0007" in capsys.readouterr().err
    evil = tmp_path / "evil.tar.bz2"
    with tarfile.open(evil, "w:bz2") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    assert main(["--archive", str(evil), "--out", str(tmp_path / "b")]) == 1
    assert "refusing member '../outside.txt'" in capsys.readouterr().err and not (tmp_path / "outside.txt").exists()
    assert main(["--archive", str(tmp_path / "missing.tar.bz2"), "--out", str(tmp_path / "c")]) == 1
    assert "no such file" in capsys.readouterr().err
