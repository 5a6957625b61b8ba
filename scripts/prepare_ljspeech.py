"""Prepare LJSpeech-1.1 for ``apps.waveflow``: unpack the downloaded archive, check it, write the split lists.

    wget https://data.keithito.com/data/speech/LJSpeech-1.1.tar.bz2
    python -m scripts.prepare_ljspeech --archive LJSpeech-1.1.tar.bz2 --out data/
    python -m apps.waveflow train experiment=paper data.root=data/LJSpeech-1.1 trainer=gpu

The check: ``metadata.csv`` has 13,100 well-formed lines (``id|transcription|normalized``), every id has its
``wavs/<id>.wav`` and every wav its id. The lists (``train.txt`` / ``val.txt`` / ``test.txt`` in the corpus folder,
one id a line, read by the data module) hold out the references' test set: the first 16 utterances
(LJ001-0001..0016, Parakeet's ``valid_size``; ``--test-size 10`` for the PyTorch port's), then ``--val-size``
utterances after them for validation; the rest is the training set. An already unpacked corpus is checked, not
unpacked again.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path

__all__ = ["LJSPEECH_CLIPS", "unpack", "check_corpus", "write_splits", "main"]

LJSPEECH_CLIPS = 13100
FOLDER = "LJSpeech-1.1"


class PrepareError(RuntimeError):
    """The archive or the unpacked corpus is not what LJSpeech-1.1 should be; the message says what differs."""


def unpack(archive: Path, out: Path) -> Path:
    """Extract ``archive`` (.tar.bz2) into ``out``; returns the corpus folder (``out/LJSpeech-1.1``). Members that
    would land outside ``out`` (absolute paths, ``..``, links) are refused."""
    corpus = out / FOLDER
    if (corpus / "metadata.csv").is_file():
        print(f"{corpus}: already unpacked, checking it")
        return corpus
    if not archive.is_file():
        raise PrepareError(f"--archive {archive}: no such file (download LJSpeech-1.1.tar.bz2 first)")
    out.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                if m.name.startswith("/") or ".." in Path(m.name).parts or not (m.isfile() or m.isdir()):
                    raise PrepareError(f"{archive}: refusing member {m.name!r} (outside the corpus or a link)")
                if Path(m.name).parts[0] != FOLDER:
                    raise PrepareError(f"{archive}: member {m.name!r} is not under {FOLDER}/ (not LJSpeech-1.1?)")
            tar.extractall(out, members=members, filter="data")
    except tarfile.TarError as e:
        raise PrepareError(f"{archive}: cannot read as a tar archive ({e})") from e
    return corpus


def check_corpus(corpus: Path, expected: int = LJSPEECH_CLIPS) -> list[str]:
    """The ids of ``metadata.csv`` in file order, after checking the line format, the count and the wavs."""
    meta = corpus / "metadata.csv"
    if not meta.is_file():
        raise PrepareError(f"{corpus}: no metadata.csv (not an LJSpeech folder)")
    ids = []
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split("|")
        if len(fields) != 3 or not fields[0].strip():
            raise PrepareError(f"{meta}:{n}: expected 'id|transcription|normalized transcription', got {line!r}")
        ids.append(fields[0].strip())
    if len(set(ids)) != len(ids):
        raise PrepareError(f"{meta}: {len(ids) - len(set(ids))} duplicate ids")
    wavs = {p.stem for p in (corpus / "wavs").glob("*.wav")}
    missing = [i for i in ids if i not in wavs]
    extra = sorted(wavs - set(ids))
    if missing or extra or len(ids) != expected:
        raise PrepareError(
            f"{corpus}: {len(ids)} ids in metadata.csv and {len(wavs)} wavs, expected {expected:,} of each"
            + (f"; no wav for {len(missing)} ids ({', '.join(missing[:5])} ...)" if missing else "")
            + (f"; {len(extra)} wavs without an id ({', '.join(extra[:5])} ...)" if extra else "")
        )
    for i in ids[:1] + ids[-1:]:  # a truncated download leaves empty files at the end
        if (corpus / "wavs" / f"{i}.wav").stat().st_size < 1000:
            raise PrepareError(f"{corpus / 'wavs' / f'{i}.wav'}: shorter than a wav header + audio (truncated?)")
    return ids


def write_splits(corpus: Path, ids: list[str], test_size: int = 16, val_size: int = 16) -> dict[str, int]:
    """``test.txt`` = the first ``test_size`` ids in metadata order, ``val.txt`` the next ``val_size``,
    ``train.txt`` the rest (each with a ``#`` line saying so); returns the sizes."""
    if test_size + val_size >= len(ids):
        raise PrepareError(f"{len(ids)} ids cannot hold {test_size} test + {val_size} val + a training set")
    parts = {
        "test": (ids[:test_size], f"the references' held-out set: the first {test_size} utterances of metadata.csv"),
        "val": (ids[test_size : test_size + val_size], f"the {val_size} utterances after the test set"),
        "train": (ids[test_size + val_size :], "every other utterance"),
    }
    for name, (lst, note) in parts.items():
        (corpus / f"{name}.txt").write_text(f"# {note}\n" + "\n".join(lst) + "\n", encoding="utf-8")
    return {name: len(lst) for name, (lst, _) in parts.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", type=Path, default=Path("LJSpeech-1.1.tar.bz2"), help="the downloaded .tar.bz2")
    p.add_argument("--out", type=Path, default=Path("data"), help="where LJSpeech-1.1/ is unpacked")
    p.add_argument("--test-size", type=int, default=16, help="first utterances held out (Parakeet 16, the port 10)")
    p.add_argument("--val-size", type=int, default=16, help="utterances after the test set used for validation")
    p.add_argument("--expected", type=int, default=LJSPEECH_CLIPS, help="clips the corpus must hold")
    args = p.parse_args(argv)
    try:
        corpus = unpack(args.archive, args.out)
        ids = check_corpus(corpus, args.expected)
        sizes = write_splits(corpus, ids, args.test_size, args.val_size)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{corpus}: {len(ids):,} clips checked; split lists written (train {sizes['train']}, val {sizes['val']}, "
          f"test {sizes['test']}: {ids[0]}..{ids[sizes['test'] - 1]})")  # fmt: skip
    print(f"train with: python -m apps.waveflow train experiment=paper data.root={corpus}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
