"""Speech corpora for the vocoder: the LJSpeech layout or any folder of wav files, split by id lists, served as
random fixed-length segments with their aligned log-mel frames.

LJSpeech layout: ``<root>/metadata.csv`` (``id|transcription|normalized transcription``) and
``<root>/wavs/<id>.wav``. Any other folder: every ``*.wav`` below it, the id being the path relative to the root
without the suffix. Splits: ``train.txt`` / ``val.txt`` / ``test.txt`` (one id a line) in ``splits_dir`` (default:
the root), else the references' held-out set: the first ``test_size`` utterances in id order (LJSpeech:
LJ001-0001..0016, Parakeet's 16), the next ``val_size`` for validation (``held_out=random``: a seeded random draw).

Alignment: a segment starts on a hop boundary, ``start = k * hop``; its mel frames are frames ``k .. k + L // hop``
of the whole utterance's centred log-mel (frame ``k`` centred on sample ``k * hop``), so training sees exactly the
mel that synthesis gets from a full wav, edges included.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from apps.waveflow.audio import AudioError, MelConfig, MelSpectrogram, load_wav
from core.paths import resolve_path

__all__ = ["Utterance", "find_utterances", "split_utterances", "describe_split", "SegmentDataset", "SpeechDataModule"]

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Utterance:
    id: str
    path: Path
    text: str = ""


def find_utterances(root: str | Path) -> list[Utterance]:
    """Every utterance of an LJSpeech folder (``metadata.csv`` + ``wavs/``) or of a folder of wavs, sorted by id.

    Malformed metadata lines raise an error naming the file and line; ids whose wav is missing are reported
    (by name, with a count) and left out."""
    root = resolve_path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={root}: no such folder (expected LJSpeech layout or a folder of wavs)")
    meta = root / "metadata.csv"
    if meta.is_file():
        utts, missing = [], []
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("|")
            if len(fields) < 2 or not fields[0].strip():
                raise ValueError(f"{meta}:{n}: expected 'id|transcription[|normalized transcription]', got {line!r}")
            uid = fields[0].strip()
            wav = root / "wavs" / f"{uid}.wav"
            if not wav.is_file():
                missing.append(uid)
                continue
            utts.append(Utterance(uid, wav, fields[-1]))
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            log.warning("%s: %d of %d ids have no wav in %s and are left out: %s", meta, len(missing),
                        len(missing) + len(utts), root / "wavs", shown)  # fmt: skip
    else:
        utts = [Utterance(str(p.relative_to(root).with_suffix("")), p) for p in sorted(root.rglob("*.wav"))]
    if not utts:
        raise FileNotFoundError(f"data.root={root}: no wav files (neither metadata.csv + wavs/ nor *.wav below it)")
    return sorted(utts, key=lambda u: u.id)


def _read_ids(path: Path, known: dict[str, Utterance]) -> list[Utterance]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        uid = line.strip()
        if not uid or uid.startswith("#"):
            continue
        if uid not in known:
            raise ValueError(f"{path}:{n}: id {uid!r} is not in the corpus")
        out.append(known[uid])
    return out


HELD_OUT = ("first", "random")


def split_utterances(
    utts: list[Utterance],
    splits_dir: str | Path | None,
    val_size: int = 3,
    test_size: int = 16,
    seed: int = 0,
    held_out: str = "first",
) -> dict[str, list[Utterance]]:
    """train/val/test lists: from ``<splits_dir>/{train,val,test}.txt`` when ``train.txt`` exists there, else
    ``held_out="first"``: the first ``test_size`` utterances in id order are the test set (as the references hold out
    the start of LJSpeech: Parakeet LJ001-0001..0016, ``test_size=16``; the PyTorch port the first 10), the next
    ``val_size`` the validation set; ``"random"``: a seeded random draw of both."""
    if held_out not in HELD_OUT:
        raise ValueError(f"data.held_out={held_out!r}: choose {' or '.join(HELD_OUT)}")
    known = {u.id: u for u in utts}
    folder = resolve_path(splits_dir) if splits_dir else None
    if folder is not None and (folder / "train.txt").is_file():
        out = {s: (_read_ids(folder / f"{s}.txt", known) if (folder / f"{s}.txt").is_file() else []) for s in SPLITS}
        seen: dict[str, str] = {}
        for s, lst in out.items():
            for u in lst:
                if u.id in seen and seen[u.id] != s:
                    raise ValueError(f"{folder}: id {u.id} is in both {seen[u.id]}.txt and {s}.txt")
                seen[u.id] = s
        return out
    if len(utts) < val_size + test_size + 1:
        raise ValueError(f"{len(utts)} utterances cannot be split into train + {val_size} val + {test_size} test")
    order = sorted(utts, key=lambda u: u.id)
    if held_out == "random":
        random.Random(seed).shuffle(order)
    test, val, train = order[:test_size], order[test_size : test_size + val_size], order[test_size + val_size :]
    return {s: sorted(lst, key=lambda u: u.id) for s, lst in (("train", train), ("val", val), ("test", test))}


def describe_split(
    utts: list[Utterance], split: str, splits_dir: str | Path | None, held_out: str, root: str | Path
) -> str:
    """What a split is, for metrics files: where its ids come from and how many there are."""
    folder = resolve_path(splits_dir) if splits_dir else None
    n = len(utts)
    span = f"{utts[0].id}..{utts[-1].id}" if utts else "empty"
    if folder is not None and (folder / "train.txt").is_file():
        lines = (folder / f"{split}.txt").read_text(encoding="utf-8").splitlines() if n else []
        note = lines[0].lstrip("# ").strip() if lines and lines[0].startswith("#") else "id list"
        return f"{folder / f'{split}.txt'}: {note} ({n} utterances: {', '.join(u.id for u in utts[:20])})"
    if held_out == "first" and split == "test":
        return f"the first {n} utterances of {root} in id order ({span}; the references' held-out set: 16 in Parakeet)"
    return f"{split}: {n} utterances of {root} ({held_out} held-out split)"


class SegmentDataset(Dataset):
    """Fixed-length segments and their mel frames: ``{"x": (L,), "context": (n_mels, L // hop + 1)}``.

    ``random_segments``: a new random hop-aligned start every time (training); else the middle of the utterance
    (validation, reproducible). Clips shorter than ``L`` are zero-padded at the end (the mel is computed on the
    padded clip). With ``segment_length=None`` an item is the whole utterance cropped to a multiple of
    ``multiple_of`` (batch size 1). ``repeat`` lists every utterance that many times per epoch (more random
    segments per epoch of a small corpus). Files are checked once up front: unreadable or empty ones are reported
    by name and skipped, with a count.
    """

    def __init__(
        self,
        utterances: list[Utterance],
        segment_length: int | None = 16000,
        mel: MelConfig | None = None,
        random_segments: bool = True,
        resample: bool = True,
        multiple_of: int = 1,
        preload: bool = True,
        name: str = "data",
        repeat: int = 1,
    ) -> None:
        self.repeat = max(1, int(repeat))
        self.mel_config = mel or MelConfig()
        self.segment_length, self.random_segments = segment_length, random_segments
        self.resample, self.multiple_of = resample, multiple_of
        self.mel = MelSpectrogram(self.mel_config)
        self.utterances, self.cache, bad = [], {}, []
        for u in utterances:
            try:
                audio = load_wav(u.path, self.mel_config.sample_rate, resample)
            except AudioError as e:
                bad.append(str(e))
                continue
            self.utterances.append(u)
            if preload:
                self.cache[u.id] = audio
        if bad:
            log.warning("%s: skipped %d of %d files:\n  %s", name, len(bad), len(utterances), "\n  ".join(bad))
        self.skipped = bad
        if utterances and not self.utterances:
            raise AudioError(f"{name}: none of the {len(utterances)} audio files could be read")

    def __len__(self) -> int:
        return len(self.utterances) * self.repeat

    def audio(self, i: int) -> np.ndarray:
        u = self.utterances[i % len(self.utterances)]
        if u.id in self.cache:
            return self.cache[u.id]
        return load_wav(u.path, self.mel_config.sample_rate, self.resample)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        audio = torch.from_numpy(self.audio(i))
        hop = self.mel_config.hop_length
        L = self.segment_length
        if L is None:  # the whole utterance
            n = len(audio) // self.multiple_of * self.multiple_of
            with torch.no_grad():
                mel = self.mel(audio[:n])
            return {"x": audio[:n], "context": mel}
        if len(audio) < L:
            audio = torch.nn.functional.pad(audio, (0, L - len(audio)))
        frames_avail = (len(audio) - L) // hop
        if self.random_segments:
            k = random.randint(0, frames_avail)
        else:
            k = frames_avail // 2
        with torch.no_grad():
            mel = self.mel(audio)  # (n_mels, len // hop + 1)
        start = k * hop
        return {"x": audio[start : start + L], "context": mel[:, k : k + L // hop + 1]}


class SpeechDataModule(pl.LightningDataModule):
    """LJSpeech-format (or wav-folder) corpus as training segments, validation segments and test utterances."""

    def __init__(
        self,
        root: str = "data/waveflow/ljspeech",
        splits_dir: str | None = None,
        segment_length: int = 16000,
        batch_size: int = 8,
        eval_batch_size: int = 8,
        val_size: int = 3,
        test_size: int = 16,
        held_out: str = "first",
        num_workers: int = 0,
        seed: int = 0,
        train_repeat: int = 1,
        resample: bool = True,
        preload: bool = True,
        sample_rate: int = 22050,
        n_fft: int = 1024,
        hop_length: int = 256,
        win_length: int = 1024,
        n_mels: int = 80,
        fmin: float = 0.0,
        fmax: float = 8000.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        if segment_length % hop_length:
            log.info("segment_length=%d is not a multiple of the hop %d: fine, frames are cropped", segment_length,
                     hop_length)  # fmt: skip
        self.root, self.splits_dir = root, splits_dir if splits_dir is not None else root
        self.segment_length, self.batch_size, self.eval_batch_size = segment_length, batch_size, eval_batch_size
        self.val_size, self.test_size, self.num_workers, self.seed = val_size, test_size, num_workers, seed
        self.held_out = held_out
        self.resample, self.preload, self.train_repeat = resample, preload, train_repeat
        self.mel_config = MelConfig(sample_rate, n_fft, hop_length, win_length, n_mels, fmin, fmax)
        self.sets: dict[str, SegmentDataset] = {}
        self.split_ids: dict[str, list[Utterance]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        self.split_ids = split_utterances(
            find_utterances(self.root), self.splits_dir, self.val_size, self.test_size, self.seed, self.held_out
        )
        for split, utts in self.split_ids.items():
            self.sets[split] = SegmentDataset(
                utts, self.segment_length, self.mel_config, random_segments=(split == "train"),
                resample=self.resample, preload=self.preload, name=f"{self.root} [{split}]",
                repeat=self.train_repeat if split == "train" else 1,
            )  # fmt: skip
        if not len(self.sets["train"]):
            raise ValueError(f"{self.root}: the train split is empty")
        counts = "/".join(str(len(self.sets[s].utterances)) for s in SPLITS)
        log.info("%s: %s utterances (train/val/test)", self.root, counts)

    def describe(self, split: str) -> str:
        """Where the ids of ``split`` come from and how many there are (for metrics files)."""
        self.setup()
        return describe_split(self.split_ids[split], split, self.splits_dir, self.held_out, self.root)

    def full_utterances(self, split: str = "test", multiple_of: int = 1) -> SegmentDataset:
        """Whole utterances of a split (cropped to a multiple of ``multiple_of``), one item each."""
        self.setup()
        return SegmentDataset(
            self.sets[split].utterances, None, self.mel_config, random_segments=False, resample=self.resample,
            multiple_of=multiple_of, preload=False, name=f"{self.root} [{split}]",
        )  # fmt: skip

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.sets[split], batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
            drop_last=shuffle and len(self.sets[split]) >= batch_size, persistent_workers=self.num_workers > 0,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, False)
