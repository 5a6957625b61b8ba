"""Audio front end and corpus loading: mel vs librosa, resampling, bad files, LJSpeech layout, splits, alignment."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from apps.waveflow.audio import AudioError, MelSpectrogram, load_wav, num_frames, save_wav
from apps.waveflow.data import SegmentDataset, SpeechDataModule, find_utterances, split_utterances

BUILTIN = Path(__file__).resolve().parents[3] / "data" / "waveflow" / "ljspeech"


def _tone(n: int, sr: int = 22050, f: float = 220.0, seed: int = 0) -> np.ndarray:
    t = np.arange(n) / sr
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * f * t) + 0.01 * rng.normal(size=n)).astype(np.float32)


def test_mel_matches_librosa_reference():
    import librosa

    audio = load_wav(BUILTIN / "wavs" / "LJ001-0002.wav")
    ours = MelSpectrogram()(torch.from_numpy(audio)).numpy()
    ref = librosa.feature.melspectrogram(
        y=audio, sr=22050, n_fft=1024, hop_length=256, win_length=1024, window="hann", center=True,
        pad_mode="reflect", power=1.0, n_mels=80, fmin=0.0, fmax=8000.0,
    )  # fmt: skip
    ref = np.log(np.maximum(ref, 1e-5))
    assert ours.shape == ref.shape == (80, num_frames(len(audio)))
    loud = ref > np.log(1e-3)  # compare in log units where there is signal; absolute error elsewhere
    assert np.abs(ours - ref)[loud].max() < 1e-3
    assert np.abs(ours - ref).mean() < 1e-4


def test_mel_batched_equals_unbatched():
    x = torch.from_numpy(np.stack([_tone(5000), _tone(5000, f=440.0)]))
    m = MelSpectrogram()
    torch.testing.assert_close(m(x)[1], m(x[1]))


def test_load_wav_resamples_or_refuses(tmp_path, caplog):
    path = tmp_path / "16k.wav"
    sf.write(path, _tone(16000, sr=16000), 16000)
    with caplog.at_level(logging.INFO):
        audio = load_wav(path)
    assert abs(len(audio) - 22050) <= 1 and "resampling 16000 Hz -> 22050 Hz" in caplog.text
    with pytest.raises(AudioError, match=r"16k.wav: sample rate 16000 Hz, expected 22050"):
        load_wav(path, resample=False)
    stereo = tmp_path / "stereo.wav"
    sf.write(stereo, np.stack([_tone(1000), -_tone(1000)], 1), 22050)
    assert np.abs(load_wav(stereo)).max() < 1e-4  # channels averaged


def test_bad_files_are_named(tmp_path):
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 22050)
    with pytest.raises(AudioError, match="corrupt.wav: cannot read audio"):
        load_wav(tmp_path / "corrupt.wav")
    with pytest.raises(AudioError, match="empty.wav: empty audio file"):
        load_wav(tmp_path / "empty.wav")


@pytest.fixture()
def corpus(tmp_path) -> Path:
    """A tiny LJSpeech tree: 8 good clips, one corrupt, one empty, one metadata id without a wav."""
    root = tmp_path / "LJSpeech-mini"
    (root / "wavs").mkdir(parents=True)
    lines = []
    for i in range(8):
        save_wav(root / "wavs" / f"LJ000-{i:04d}.wav", _tone(3000 + 700 * i, seed=i))
        lines.append(f"LJ000-{i:04d}|Text {i}.|Text {i}.")
    (root / "wavs" / "LJ000-0100.wav").write_bytes(b"not a wav at all")
    sf.write(root / "wavs" / "LJ000-0101.wav", np.zeros(0, np.float32), 22050)
    lines += ["LJ000-0100|bad|bad", "LJ000-0101|empty|empty", "LJ000-0999|missing|missing"]
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def test_ljspeech_loader_skips_bad_files_with_a_count(corpus, caplog):
    with caplog.at_level(logging.WARNING):
        utts = find_utterances(corpus)
    assert len(utts) == 10 and "1 of 11 ids have no wav" in caplog.text and "LJ000-0999" in caplog.text
    splits = split_utterances(utts, None, val_size=2, test_size=2, seed=0, held_out="random")
    assert sorted(len(v) for v in splits.values()) == [2, 2, 6]
    assert not set(u.id for u in splits["train"]) & set(u.id for u in splits["val"] + splits["test"])
    with caplog.at_level(logging.WARNING):
        ds = SegmentDataset(utts, 2048, random_segments=True, name="mini")
    assert len(ds) == 8 and len(ds.skipped) == 2
    assert "mini: skipped 2 of 10 files" in caplog.text and "LJ000-0100.wav" in caplog.text
    item = ds[0]
    assert item["x"].shape == (2048,) and item["context"].shape == (80, 2048 // 256 + 1)


def test_bad_metadata_line_and_split_list_are_named(corpus):
    (corpus / "metadata.csv").write_text("LJ000-0000|ok|ok\nno pipe on this line\n")
    with pytest.raises(ValueError, match=r"metadata.csv:2: expected 'id\|transcription"):
        find_utterances(corpus)
    (corpus / "metadata.csv").write_text("LJ000-0000|ok|ok\nLJ000-0001|ok|ok\n")
    (corpus / "train.txt").write_text("LJ000-0000\nLJ000-0042\n")
    with pytest.raises(ValueError, match=r"train.txt:2: id 'LJ000-0042' is not in the corpus"):
        split_utterances(find_utterances(corpus), corpus)


def test_segments_are_aligned_with_the_whole_utterance_mel():
    utts = find_utterances(BUILTIN)
    ds = SegmentDataset(utts[:2], 4096, random_segments=True)
    mel = MelSpectrogram()
    audio = torch.from_numpy(ds.audio(1))
    full = mel(audio)
    for _ in range(3):
        item = ds[1]
        starts = [s for s in range(0, len(audio) - 4096 + 1, 256) if torch.equal(audio[s : s + 4096], item["x"])]
        assert starts, "a segment is a hop-aligned slice of the clip"
        k = starts[0] // 256
        torch.testing.assert_close(item["context"], full[:, k : k + 4096 // 256 + 1])


def test_first_utterances_are_held_out_as_the_references_do(corpus):
    """Without split lists the test set is the first test_size ids (Parakeet: LJ001-0001..0016), val the next ones."""
    utts = find_utterances(corpus)
    splits = split_utterances(utts, None, val_size=2, test_size=3)
    assert [u.id for u in splits["test"]] == ["LJ000-0000", "LJ000-0001", "LJ000-0002"]
    assert [u.id for u in splits["val"]] == ["LJ000-0003", "LJ000-0004"]
    assert len(splits["train"]) == 5 and splits["test"][0] not in splits["train"]
    dm = SpeechDataModule(root=str(corpus), splits_dir=None, test_size=3, val_size=2, segment_length=2048)
    assert dm.describe("test").startswith(f"the first 3 utterances of {corpus} in id order (LJ000-0000..LJ000-0002")
    with pytest.raises(ValueError, match="held_out='last'"):
        split_utterances(utts, None, held_out="last")


def test_builtin_corpus_and_split_lists():
    dm = SpeechDataModule(segment_length=4096)
    dm.setup()
    assert [len(dm.sets[s].utterances) for s in ("train", "val", "test")] == [26, 3, 3]
    # the built-in test set: the references' held-out utterances (LJ001-0001..0016) that the built-in clips hold
    assert [u.id for u in dm.sets["test"].utterances] == ["LJ001-0002", "LJ001-0008", "LJ001-0013"]
    assert "references' held-out set" in dm.describe("test") and "(3 utterances" in dm.describe("test")
    assert not dm.sets["train"].skipped
    full = dm.full_utterances("test", multiple_of=16)
    item = full[0]
    assert item["x"].shape[0] % 16 == 0 and item["context"].shape[1] == num_frames(item["x"].shape[0])


def test_wav_folder_without_metadata(tmp_path):
    for name in ("a/x.wav", "b/y.wav", "z.wav"):
        save_wav(tmp_path / name, _tone(3000))
    assert [u.id for u in find_utterances(tmp_path)] == ["a/x", "b/y", "z"]
