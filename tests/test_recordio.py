"""The native RecordIO reader/writer against files written by mxnet 1.9.1 (tests/fixtures, see
make_mxnet_fixture.py)."""
from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest

from utils.data import recordio
from utils.data.image import decode_image

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "mxnet_expected.npz") as data:
        return {key: data[key] for key in data.files}


def raw_payloads(expected: dict[str, np.ndarray]) -> list[bytes]:
    flat = expected["raw_payloads"].tobytes()
    ends = np.cumsum(expected["raw_lengths"])
    return [flat[end - length:end] for end, length in zip(ends, expected["raw_lengths"])]


def faces_reader() -> recordio.IndexedRecordReader:
    return recordio.IndexedRecordReader(FIXTURES / "mxnet_faces.idx", FIXTURES / "mxnet_faces.rec")


def test_reader_matches_mxnet_labels_and_pixels(expected):
    reader = faces_reader()
    keys = recordio.image_keys(reader)
    assert keys == expected["keys"].tolist()
    for i, key in enumerate(keys):
        header, payload = recordio.unpack(reader.read_idx(key))
        assert header.flag == expected["flags"][i]
        assert recordio.header_label(header) == expected["labels"][i]
        assert recordio.header_label(reader.read_header(key)) == expected["labels"][i]
        rgb = decode_image(payload, 12, f"record {key}")
        np.testing.assert_array_equal(rgb, expected["images_bgr"][i][..., ::-1])


def test_insightface_header_and_identity_records():
    reader = faces_reader()
    header = reader.read_header(0)
    assert header.flag == 2 and header.label.tolist() == [7.0, 10.0]
    ranges = [reader.read_header(key).label.tolist() for key in range(7, 10)]
    assert ranges == [[1.0, 3.0], [3.0, 5.0], [5.0, 7.0]]


def test_reader_reassembles_records_cut_at_the_magic_number(expected):
    payloads = raw_payloads(expected)
    reader = recordio.IndexedRecordReader(FIXTURES / "mxnet_raw.idx", FIXTURES / "mxnet_raw.rec")
    assert [reader.read_idx(key) for key in reader.keys] == payloads
    assert list(recordio.RecordReader(FIXTURES / "mxnet_raw.rec")) == payloads


def test_writer_is_byte_identical_to_mxnet_for_raw_records(expected, tmp_path):
    with recordio.IndexedRecordWriter(tmp_path / "out.idx", tmp_path / "out.rec") as writer:
        for key, payload in enumerate(raw_payloads(expected)):
            writer.write_idx(key, payload)
    assert (tmp_path / "out.rec").read_bytes() == (FIXTURES / "mxnet_raw.rec").read_bytes()
    assert (tmp_path / "out.idx").read_bytes() == (FIXTURES / "mxnet_raw.idx").read_bytes()


def test_writer_is_byte_identical_to_mxnet_for_image_records(tmp_path):
    reader = faces_reader()
    with recordio.IndexedRecordWriter(tmp_path / "out.idx", tmp_path / "out.rec") as writer:
        for key in reader.keys:
            header, payload = recordio.unpack(reader.read_idx(key))
            # Re-pack from the decoded header so pack() is checked too, not just the framing.
            label = header.label.tolist() if header.flag > 0 else header.label
            writer.write_idx(key, recordio.pack(recordio.IRHeader(0, label, header.id, header.id2), payload))
    assert (tmp_path / "out.rec").read_bytes() == (FIXTURES / "mxnet_faces.rec").read_bytes()
    assert (tmp_path / "out.idx").read_bytes() == (FIXTURES / "mxnet_faces.idx").read_bytes()


def test_read_header_of_a_record_cut_inside_its_header(tmp_path):
    # id = the magic number puts it at byte 8 of the record, an aligned offset, so the writer cuts there.
    record = recordio.pack(recordio.IRHeader(0, [3.0, 4.0], recordio.MAGIC, 0), b"payload")
    assert struct.pack("<I", recordio.MAGIC) in record[8:12]
    with recordio.IndexedRecordWriter(tmp_path / "a.idx", tmp_path / "a.rec") as writer:
        writer.write_idx(5, record)
    reader = recordio.IndexedRecordReader(tmp_path / "a.idx", tmp_path / "a.rec")
    header = reader.read_header(5)
    assert header.id == recordio.MAGIC and header.label.tolist() == [3.0, 4.0]
    assert reader.read_idx(5) == record


def test_pack_unpack_scalar_and_array_labels():
    header, payload = recordio.unpack(recordio.pack(recordio.IRHeader(9, 5.0, 1, 0), b"img"))
    assert (header.flag, header.label, payload) == (0, 5.0, b"img")
    header, payload = recordio.unpack(recordio.pack((0, [2.0, 8.5, 1.0], 1, 0), b"img"))
    assert header.flag == 3 and header.label.tolist() == [2.0, 8.5, 1.0] and payload == b"img"


def test_truncated_and_foreign_files_raise_naming_the_file(tmp_path):
    data = (FIXTURES / "mxnet_raw.rec").read_bytes()
    truncated = tmp_path / "short.rec"
    truncated.write_bytes(data[:-3])
    with pytest.raises(ValueError, match="short.rec"):
        list(recordio.RecordReader(truncated))
    foreign = tmp_path / "foreign.rec"
    foreign.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="foreign.rec.*magic"):
        list(recordio.RecordReader(foreign))
    with pytest.raises(FileNotFoundError, match="missing.idx"):
        recordio.IndexedRecordReader(tmp_path / "missing.idx", FIXTURES / "mxnet_raw.rec")


def test_missing_key_names_the_index_file(tmp_path):
    # Record 0 announces image records 1..4 but the index only lists 1 and 2.
    with recordio.IndexedRecordWriter(tmp_path / "t.idx", tmp_path / "t.rec") as writer:
        writer.write_idx(0, recordio.pack(recordio.IRHeader(0, [5.0, 6.0], 0, 0), b""))
        for key in (1, 2):
            writer.write_idx(key, recordio.pack(recordio.IRHeader(0, 0.0, key, 0), b"img"))
    reader = recordio.IndexedRecordReader(tmp_path / "t.idx", tmp_path / "t.rec")
    assert recordio.image_keys(reader) == [1, 2, 3, 4]
    for read in (reader.read_header, reader.read_idx):
        with pytest.raises(KeyError, match=re.escape(f"record key 3 not in {tmp_path / 't.idx'}")):
            read(3)
