"""BAIR robot pushing (``softmotion30_44k``) TFRecords -> VideoFlow's arrays layout, without TensorFlow.

    python -m scripts.convert_bair <softmotion30_44k dir> <out dir> [--frames 30] [--val-files 2] [--no-verify]

The release (http://rail.eecs.berkeley.edu/datasets/bair_robot_pushing_dataset_v0.tar) holds ``train/*.tfrecords``
and ``test/*.tfrecords``; each record is one ``tf.train.Example`` (or ``SequenceExample``: its context is the same
field) with 30 frames under ``{i}/image_aux1/encoded``: raw 64 x 64 RGB bytes in the release (as tensor2tensor
reads them with ``Image.frombytes``), or an encoded image (JPEG / PNG), decoded with Pillow. Writes ``train.npy``,
``val.npy`` and ``test.npy``, uint8 (N, frames, 64, 64, 3), which ``data=bair data.path=<out dir>`` reads. The split
is the release's and tensor2tensor's: test = ``test/``; val = the last ``--val-files`` (2) files of ``train/`` in
sorted order; train = the rest.

The TFRecord framing (``uint64 length, uint32 masked CRC32C(length), data, uint32 masked CRC32C(data)``) and the
protobuf wire format of ``Example -> Features -> map<string, Feature> -> BytesList`` are parsed here directly. Every
CRC is checked (``--no-verify``: only the length's); the data CRCs use ``google_crc32c`` or ``crc32c`` when one is
installed and a pure-Python table otherwise (slow for the full 30 GB: install one of them, or pass ``--no-verify``).
"""

from __future__ import annotations

import argparse
import io
import re
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = [
    "crc32c",
    "masked_crc32c",
    "read_tfrecord",
    "write_tfrecord",
    "parse_example_bytes",
    "encode_example_bytes",
    "decode_frame",
    "video_frames",
    "convert",
]

# ---- CRC32C (Castagnoli), masked as TFRecord does ----------------------------------------------------------------
_POLY = 0x82F63B78
_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ _POLY if _c & 1 else _c >> 1
    _TABLE.append(_c)


def _crc32c_python(data: bytes) -> int:
    crc, table = 0xFFFFFFFF, _TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _fast_crc32c():
    try:
        import google_crc32c

        return lambda data: google_crc32c.value(bytes(data))
    except ImportError:
        pass
    try:
        import crc32c as _crc

        return lambda data: _crc.crc32c(bytes(data))
    except ImportError:
        return None


crc32c = _fast_crc32c() or _crc32c_python


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: ``((crc >> 15) | (crc << 17)) + 0xa282ead8`` modulo 2^32."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---- TFRecord framing -------------------------------------------------------------------------------------------
def read_tfrecord(path: str | Path, verify: bool = True) -> Iterator[bytes]:
    """The records of a TFRecord file; a bad length CRC, a bad data CRC (``verify``) or a truncated record raise
    ``ValueError`` naming the file and the record."""
    path = Path(path)
    with open(path, "rb") as f:
        i = 0
        while True:
            head = f.read(12)
            if not head:
                return
            if len(head) < 12:
                raise ValueError(f"{path}: record {i} is truncated (header of {len(head)} of 12 bytes)")
            (length,), (length_crc,) = struct.unpack("<Q", head[:8]), struct.unpack("<I", head[8:])
            if masked_crc32c(head[:8]) != length_crc:
                raise ValueError(f"{path}: record {i} has a bad length CRC (not a TFRecord file, or corrupt)")
            data = f.read(length)
            tail = f.read(4)
            if len(data) < length or len(tail) < 4:
                raise ValueError(f"{path}: record {i} is truncated ({len(data)} of {length} bytes)")
            if verify and masked_crc32c(data) != struct.unpack("<I", tail)[0]:
                raise ValueError(f"{path}: record {i} has a bad data CRC (corrupt download?)")
            yield data
            i += 1


def count_records(path: str | Path) -> int:
    """Records in a TFRecord file, from the length headers only (seeks over the data)."""
    n, path = 0, Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        while f.tell() < size:
            head = f.read(12)
            if len(head) < 12 or masked_crc32c(head[:8]) != struct.unpack("<I", head[8:])[0]:
                raise ValueError(f"{path}: record {n} has a bad or truncated header")
            f.seek(struct.unpack("<Q", head[:8])[0] + 4, io.SEEK_CUR)
            n += 1
    return n


def write_tfrecord(path: str | Path, records: list[bytes]) -> None:
    """A TFRecord file of ``records`` (for tests and small exports)."""
    with open(path, "wb") as f:
        for data in records:
            length = struct.pack("<Q", len(data))
            f.write(length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data)))


# ---- protobuf wire format: tf.train.Example ----------------------------------------------------------------------
def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, memoryview | int]]:
    """(field number, wire type, value) of a message: a length-delimited value as a memoryview, others as ints."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated length-delimited field")
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def parse_example_bytes(record: bytes, key_pattern: str = r".*") -> dict[str, list[bytes]]:
    """The ``bytes_list`` features of a serialized ``tf.train.Example`` whose key matches ``key_pattern``.

    Example = {1: Features}; Features = {1: repeated map entry {1: key, 2: Feature}}; Feature = {1: BytesList,
    2: FloatList, 3: Int64List}; BytesList = {1: repeated bytes}. Other feature kinds are skipped."""
    pattern = re.compile(key_pattern)
    out: dict[str, list[bytes]] = {}
    for number, wire, features in _fields(memoryview(record)):
        if number != 1 or wire != 2:
            continue
        for n_entry, w_entry, entry in _fields(features):
            if n_entry != 1 or w_entry != 2:
                continue
            key, feature = None, None
            for n, w, v in _fields(entry):
                if n == 1 and w == 2:
                    key = bytes(v).decode("utf-8")
                elif n == 2 and w == 2:
                    feature = v
            if key is None or feature is None or not pattern.fullmatch(key):
                continue
            for n_kind, w_kind, kind in _fields(feature):
                if n_kind == 1 and w_kind == 2:  # BytesList
                    out[key] = [bytes(v) for n, w, v in _fields(kind) if n == 1 and w == 2]
    return out


def _len_delimited(number: int, payload: bytes) -> bytes:
    out, n = bytearray([number << 3 | 2]), len(payload)
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            break
    return bytes(out) + payload


def encode_example_bytes(features: dict[str, list[bytes]]) -> bytes:
    """A serialized ``tf.train.Example`` of bytes features (the inverse of :func:`parse_example_bytes`)."""
    entries = b"".join(
        _len_delimited(1, _len_delimited(1, k.encode()) + _len_delimited(2, _len_delimited(1, b"".join(
            _len_delimited(1, v) for v in values))))
        for k, values in features.items()
    )  # fmt: skip
    return _len_delimited(1, entries)


# ---- BAIR ----------------------------------------------------------------------------------------------------------
def decode_frame(data: bytes, size: int = 64) -> np.ndarray:
    """One frame (size, size, 3) uint8: raw RGB bytes (the release) or an encoded image (JPEG, PNG)."""
    if len(data) == size * size * 3:
        return np.frombuffer(data, np.uint8).reshape(size, size, 3)
    from PIL import Image

    try:
        img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except Exception as e:  # Pillow raises several types for undecodable bytes
        raise ValueError(f"a frame of {len(data)} bytes is neither raw {size}x{size} RGB nor an image: {e}") from e
    if img.shape != (size, size, 3):
        raise ValueError(f"a frame decoded to shape {img.shape}, expected ({size}, {size}, 3)")
    return img


def video_frames(record: bytes, image_key: str = "image_aux1", frames: int = 30, size: int = 64) -> np.ndarray:
    """The first ``frames`` frames (frames, size, size, 3) uint8 of one BAIR record."""
    found = parse_example_bytes(record, rf"\d+/{re.escape(image_key)}/encoded")
    missing = [i for i in range(frames) if not found.get(f"{i}/{image_key}/encoded")]
    if missing:
        raise ValueError(f"record has no '{{i}}/{image_key}/encoded' for frames {missing[:5]} (found {len(found)})")
    return np.stack([decode_frame(found[f"{i}/{image_key}/encoded"][0], size) for i in range(frames)])


def _write_split(files: list[Path], out: Path, frames: int, image_key: str, verify: bool, max_videos: int | None):
    n = sum(count_records(f) for f in files)
    n = min(n, max_videos) if max_videos else n
    arr = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=(n, frames, 64, 64, 3))
    i = 0
    for f in files:
        if i == n:
            break
        for record in read_tfrecord(f, verify):
            arr[i] = video_frames(record, image_key, frames)
            i += 1
            if i == n:
                break
        print(f"  {f.name}: {i}/{n} videos", file=sys.stderr)
    arr.flush()
    del arr
    return n


def convert(
    src: str | Path,
    out: str | Path,
    frames: int = 30,
    val_files: int = 2,
    image_key: str = "image_aux1",
    verify: bool = True,
    max_videos: int | None = None,
) -> dict[str, int]:
    """``src`` (softmotion30_44k: ``train/``, ``test/``) -> ``out``/{train,val,test}.npy; returns videos per split."""
    src, out = Path(src), Path(out)
    train = sorted((src / "train").glob("*.tfrecord*"))
    test = sorted((src / "test").glob("*.tfrecord*"))
    if not train or not test:
        raise FileNotFoundError(f"{src}: expected TFRecord files in train/ and test/ (softmotion30_44k)")
    if val_files and len(train) <= val_files:
        raise ValueError(f"{src}: {len(train)} train files leave none for training after --val-files {val_files}")
    splits = {"train": train[: len(train) - val_files] if val_files else train, "test": test}
    if val_files:
        splits["val"] = train[len(train) - val_files :]
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, files in splits.items():
        print(f"{name}: {len(files)} files", file=sys.stderr)
        counts[name] = _write_split(files, out / f"{name}.npy", frames, image_key, verify, max_videos)
    return counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="the softmotion30_44k folder (train/ and test/ of .tfrecords)")
    ap.add_argument("out", help="output folder for train.npy, val.npy, test.npy")
    ap.add_argument("--frames", type=int, default=30, help="frames kept per video (30; 13 is all VideoFlow reads)")
    ap.add_argument("--val-files", type=int, default=2, help="last train files that form val (tensor2tensor: 2)")
    ap.add_argument("--image-key", default="image_aux1", help="image_aux1 (the benchmark's camera) or image_main")
    ap.add_argument("--no-verify", action="store_true", help="skip the data CRCs (length CRCs are always checked)")
    ap.add_argument("--max-videos", type=int, default=None, help="at most this many videos per split (a quick try)")
    args = ap.parse_args(argv)
    if not args.no_verify and crc32c is _crc32c_python:
        print("note: pure-Python CRC32C (slow); pip install google-crc32c, or pass --no-verify", file=sys.stderr)
    counts = convert(args.src, args.out, args.frames, args.val_files, args.image_key, not args.no_verify,
                     args.max_videos)  # fmt: skip
    print(", ".join(f"{k} {v} videos" for k, v in counts.items()) + f" -> {args.out}")


if __name__ == "__main__":
    main()
