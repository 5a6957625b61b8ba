"""scripts.convert_bair: TFRecord framing with CRCs, the tf.train.Example wire format, BAIR's split, and the
datamodule reading the converted folder with the reference's clips."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest

from apps.videoflow.data import VideoDataModule
from scripts.convert_bair import (
    convert,
    crc32c,
    encode_example_bytes,
    masked_crc32c,
    parse_example_bytes,
    read_tfrecord,
    video_frames,
    write_tfrecord,
)


def test_crc32c_and_tfrecord_mask_on_known_values():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    crc = crc32c(b"abc")
    assert masked_crc32c(b"abc") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _video(seed: int, frames: int = 30) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, 64, 64, 3), dtype=np.uint8)


def _record(video: np.ndarray, encode: str = "raw") -> bytes:
    features = {}
    for i, frame in enumerate(video):
        if encode == "raw":  # the release: raw RGB bytes
            data = frame.tobytes()
        else:
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format="PNG")
            data = buf.getvalue()
        features[f"{i}/image_aux1/encoded"] = [data]
        features[f"{i}/image_main/encoded"] = [b"other camera"]
    return encode_example_bytes(features)


def test_tfrecord_framing_round_trip_and_corruption_is_named(tmp_path):
    records = [b"", b"x" * 300, bytes(range(256))]
    path = tmp_path / "a.tfrecords"
    write_tfrecord(path, records)
    raw = path.read_bytes()
    # the framing of the first (empty) record on known values: length 0, its masked CRC, no data, the data CRC
    assert raw[:8] == struct.pack("<Q", 0) and raw[8:12] == struct.pack("<I", masked_crc32c(bytes(8)))
    assert raw[12:16] == struct.pack("<I", masked_crc32c(b""))
    assert list(read_tfrecord(path)) == records
    bad = bytearray(raw)
    bad[16 + 12 + 5] ^= 1  # one bit of the second record's data
    (tmp_path / "bad.tfrecords").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match=r"bad.tfrecords: record 1 has a bad data CRC"):
        list(read_tfrecord(tmp_path / "bad.tfrecords"))
    assert len(list(read_tfrecord(tmp_path / "bad.tfrecords", verify=False))) == 3
    (tmp_path / "cut.tfrecords").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match=r"cut.tfrecords: record 2 is truncated"):
        list(read_tfrecord(tmp_path / "cut.tfrecords"))


def test_example_wire_format_matches_protobuf():
    """Our parser reads an Example serialised by the protobuf library itself (with the float and int64 features
    BAIR records also hold), built from tf.train.Example's schema."""
    pytest.importorskip("google.protobuf")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(name="example_test.proto", package="tfx", syntax="proto3")
    F = descriptor_pb2.FieldDescriptorProto
    for name, ftype in (("BytesList", F.TYPE_BYTES), ("FloatList", F.TYPE_FLOAT), ("Int64List", F.TYPE_INT64)):
        fdp.message_type.add(name=name).field.add(name="value", number=1, type=ftype, label=F.LABEL_REPEATED)
    feature = fdp.message_type.add(name="Feature")
    for i, kind in enumerate(("BytesList", "FloatList", "Int64List"), 1):
        feature.field.add(name=kind.lower(), number=i, type=F.TYPE_MESSAGE, type_name=f".tfx.{kind}",
                          label=F.LABEL_OPTIONAL, oneof_index=0)  # fmt: skip
    feature.oneof_decl.add(name="kind")
    features = fdp.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry", options=descriptor_pb2.MessageOptions(map_entry=True))
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, type_name=".tfx.Feature", label=F.LABEL_OPTIONAL)
    features.field.add(name="feature", number=1, type=F.TYPE_MESSAGE, type_name=".tfx.Features.FeatureEntry",
                       label=F.LABEL_REPEATED)  # fmt: skip
    fdp.message_type.add(name="Example").field.add(name="features", number=1, type=F.TYPE_MESSAGE,
                                                   type_name=".tfx.Features", label=F.LABEL_OPTIONAL)  # fmt: skip
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    Example = message_factory.GetMessageClass(pool.FindMessageTypeByName("tfx.Example"))
    ex = Example()
    video = _video(0, 3)
    for i, frame in enumerate(video):
        ex.features.feature[f"{i}/image_aux1/encoded"].byteslist.value.append(frame.tobytes())
        ex.features.feature[f"{i}/action"].floatlist.value.extend([0.5, -1.0, 2.0, 3.0])
        ex.features.feature[f"{i}/endeffector_pos"].floatlist.value.extend([1.0, 2.0, 3.0])
    ex.features.feature["frame_count"].int64list.value.append(300)
    record = ex.SerializeToString()
    np.testing.assert_array_equal(video_frames(record, frames=3), video)
    assert set(parse_example_bytes(record)) == {f"{i}/image_aux1/encoded" for i in range(3)}  # bytes features only
    # ... and protobuf reads what we write
    ours = Example.FromString(encode_example_bytes({"0/image_aux1/encoded": [b"abc"], "k": [b"", b"xy"]}))
    assert list(ours.features.feature["k"].byteslist.value) == [b"", b"xy"]
    assert ours.features.feature["0/image_aux1/encoded"].byteslist.value[0] == b"abc"


def test_convert_keeps_the_release_split_and_reads_raw_and_encoded_frames(tmp_path):
    src = tmp_path / "softmotion30_44k"
    (src / "train").mkdir(parents=True)
    (src / "test").mkdir()
    videos = {name: [_video(100 * k + i) for i in range(2)] for k, name in enumerate(["t0", "t1", "t2", "t3", "s0"])}
    for name in ("t0", "t1", "t2", "t3"):  # sorted: traj_0.., traj_1.. train files; the last two form val
        write_tfrecord(src / "train" / f"traj_{name}.tfrecords", [_record(v) for v in videos[name]])
    write_tfrecord(src / "test" / "traj_s0.tfrecords", [_record(videos["s0"][0]), _record(videos["s0"][1], "png")])
    out = tmp_path / "bair"
    counts = convert(src, out, frames=30, val_files=2)
    assert counts == {"train": 4, "val": 4, "test": 2}
    train, val, test = (np.load(out / f"{s}.npy") for s in ("train", "val", "test"))
    assert train.shape == (4, 30, 64, 64, 3) and train.dtype == np.uint8
    np.testing.assert_array_equal(train, np.stack(videos["t0"] + videos["t1"]))
    np.testing.assert_array_equal(val, np.stack(videos["t2"] + videos["t3"]))
    np.testing.assert_array_equal(test, np.stack(videos["s0"]))  # raw and PNG-encoded frames alike
    # the datamodule reads the folder with the reference's clips: frames 0-12 of every video, nothing later
    dm = VideoDataModule("arrays", path=str(out), size=64, channels=3, context_frames=3, target_frames=10,
                         first_clip_only=True)  # fmt: skip
    dm.setup()
    assert [len(dm.sets[s]) for s in ("train", "val", "test")] == [4, 4, 2]
    got = dm.test_set.clips.numpy().transpose(0, 1, 3, 4, 2)
    np.testing.assert_array_equal(got, np.stack(videos["s0"])[:, :13])


def test_convert_refuses_a_folder_without_the_release_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/ and test/"):
        convert(tmp_path, tmp_path / "out")
