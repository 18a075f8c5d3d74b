"""Native reader and writer for MXNet RecordIO files (``.rec`` + ``.idx``), no mxnet needed.

File format (dmlc-core RecordIO, as written by mxnet 1.9):

* A record is stored as one or more chunks. Each chunk is ``magic (uint32 LE, 0xced7230a)``,
  ``lrecord (uint32 LE) = cflag << 29 | length``, ``length`` payload bytes, then zero padding to a
  multiple of 4 bytes.
* ``cflag`` 0 = the whole record; 1/2/3 = first/middle/last chunk of a record that was cut because
  its payload contains the magic number at a 4-byte-aligned offset. The writer drops those four
  magic bytes and starts a new chunk; the reader puts them back between chunks.
* The ``.idx`` file is text, one ``key<TAB>byte offset`` line per record.

Image records (``pack``/``unpack``) start with an ``IRHeader`` packed as ``struct 'IfQQ'``
(flag, label, id, id2). When ``flag > 0`` the scalar label field is 0 and ``flag`` float32
labels follow the header, before the image bytes. insightface training sets put a header-only
record at key 0 whose labels are ``(first identity record, end)``: image records are keys
``1 .. first identity record - 1``.
"""
from __future__ import annotations

import os
import struct
from collections import namedtuple
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import numpy as np

from utils.core.errors import InvalidInputError, MissingInputError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1
_IR_FORMAT = "IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)

IRHeader = namedtuple("IRHeader", ["flag", "label", "id", "id2"])


def _encode_lrecord(cflag: int, length: int) -> bytes:
    return struct.pack("<I", (cflag << 29) | length)


def _pad(length: int) -> int:
    return (4 - length % 4) % 4


def encode_record(payload: bytes) -> bytes:
    """The bytes one record occupies in a ``.rec`` file (chunk headers, payload, padding)."""
    size = len(payload)
    if size >= 1 << 29:
        raise InvalidInputError(f"RecordIO records must be shorter than 2**29 bytes, got {size}")
    out = bytearray()
    start = 0
    # The magic number inside the payload would confuse a reader that resyncs on it, so the
    # record is cut there (only aligned occurrences count, as in dmlc-core).
    for pos in range(0, size - size % 4, 4):
        if payload[pos:pos + 4] == _MAGIC_BYTES:
            out += _MAGIC_BYTES + _encode_lrecord(1 if start == 0 else 2, pos - start)
            out += payload[start:pos]
            start = pos + 4
    out += _MAGIC_BYTES + _encode_lrecord(0 if start == 0 else 3, size - start)
    out += payload[start:]
    out += b"\x00" * _pad(size)
    return bytes(out)


def _read_exact(handle: BinaryIO, size: int, path: Path, pos: int) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise InvalidInputError(f"truncated RecordIO file {path}: wanted {size} bytes at offset {pos}, got {len(data)}")
    return data


def _read_record(handle: BinaryIO, path: Path) -> bytes | None:
    """Read the record at the handle's position; None at a clean end of file."""
    parts: list[bytes] = []
    while True:
        pos = handle.tell()
        head = handle.read(8)
        if not head and not parts:
            return None
        if len(head) != 8:
            raise InvalidInputError(f"truncated RecordIO file {path}: incomplete chunk header at offset {pos}")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise InvalidInputError(f"{path} is not a RecordIO file: bad magic {magic:#x} at offset {pos}")
        cflag, length = lrec >> 29, lrec & _LENGTH_MASK
        data = _read_exact(handle, length + _pad(length), path, pos + 8)
        parts.append(data[:length])
        if cflag in (0, 3):
            return _MAGIC_BYTES.join(parts)


class RecordWriter:
    """Sequential ``.rec`` writer; byte-identical to ``mx.recordio.MXRecordIO(path, 'w')``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._handle: BinaryIO = open(self.path, "wb")

    def tell(self) -> int:
        return self._handle.tell()

    def write(self, payload: bytes) -> None:
        self._handle.write(encode_record(payload))

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class IndexedRecordWriter(RecordWriter):
    """``.rec`` + ``.idx`` writer; byte-identical to ``mx.recordio.MXIndexedRecordIO(idx, rec, 'w')``."""

    def __init__(self, idx_path: str | Path, rec_path: str | Path):
        super().__init__(rec_path)
        self.idx_path = Path(idx_path)
        self._idx = open(self.idx_path, "w", newline="\n")

    def write_idx(self, key: int, payload: bytes) -> None:
        self._idx.write(f"{key}\t{self.tell()}\n")
        self.write(payload)

    def close(self) -> None:
        super().close()
        self._idx.close()


class RecordReader:
    """Sequential ``.rec`` reader. The file is opened lazily in each process, so an instance can be
    handed to DataLoader workers (forked or spawned) before use."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingInputError(f"RecordIO file not found: {self.path}")
        self._handle: BinaryIO | None = None
        self._pid: int | None = None

    def _file(self) -> BinaryIO:
        if self._handle is None or self._pid != os.getpid():
            self._handle = open(self.path, "rb")
            self._pid = os.getpid()
        return self._handle

    def __iter__(self) -> Iterator[bytes]:
        handle = open(self.path, "rb")
        with handle:
            while (record := _read_record(handle, self.path)) is not None:
                yield record

    def read_at(self, offset: int) -> bytes:
        handle = self._file()
        handle.seek(offset)
        record = _read_record(handle, self.path)
        if record is None:
            raise InvalidInputError(f"no record at offset {offset} of {self.path} (end of file)")
        return record

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handle"] = None
        state["_pid"] = None
        return state


class IndexedRecordReader(RecordReader):
    """Random access to a ``.rec`` through its ``.idx`` (keys in file order)."""

    def __init__(self, idx_path: str | Path, rec_path: str | Path):
        super().__init__(rec_path)
        self.idx_path = Path(idx_path)
        if not self.idx_path.is_file():
            raise MissingInputError(f"RecordIO index file not found: {self.idx_path}")
        self.offsets: dict[int, int] = {}
        self.keys: list[int] = []
        with open(self.idx_path) as handle:
            for line_no, line in enumerate(handle, 1):
                fields = line.split("\t")
                if not line.strip():
                    continue
                try:
                    key, offset = int(fields[0]), int(fields[1])
                except (ValueError, IndexError):
                    raise InvalidInputError(f"{self.idx_path}:{line_no}: expected 'key<TAB>offset', got {line!r}") from None
                self.offsets[key] = offset
                self.keys.append(key)

    def __len__(self) -> int:
        return len(self.keys)

    def _offset(self, key: int) -> int:
        try:
            return self.offsets[key]
        except KeyError:
            raise KeyError(f"record key {key} not in {self.idx_path}") from None

    def read_idx(self, key: int) -> bytes:
        return self.read_at(self._offset(key))

    def read_header(self, key: int) -> IRHeader:
        """The IRHeader of an image record, reading only its first bytes when possible."""
        offset = self._offset(key)
        handle = self._file()
        handle.seek(offset)
        head = handle.read(8 + _IR_SIZE)
        if len(head) == 8 + _IR_SIZE:
            magic, lrec = struct.unpack("<II", head[:8])
            length = lrec & _LENGTH_MASK
            flag = struct.unpack("<I", head[8:12])[0]
            needed = _IR_SIZE + 4 * flag
            if magic == MAGIC and lrec >> 29 == 0 and length >= needed:
                rest = handle.read(needed - _IR_SIZE)
                if len(rest) == needed - _IR_SIZE:
                    return unpack(head[8:] + rest)[0]
        # A cut record (magic inside the header) or a damaged one: the full read reports errors.
        return unpack(self.read_at(offset))[0]


def pack(header: IRHeader | Sequence, payload: bytes) -> bytes:
    """Header + payload as one image record (same bytes as ``mx.recordio.pack``).

    A scalar label gives ``flag = 0``; an array label gives ``flag = len(label)`` and the labels as
    float32 after the header.
    """
    header = IRHeader(*header)
    if isinstance(header.label, (int, float, np.number)):
        header = header._replace(flag=0)
        extra = b""
    else:
        labels = np.asarray(header.label, dtype=np.float32)
        header = header._replace(flag=labels.size, label=0)
        extra = labels.tobytes()
    return struct.pack(_IR_FORMAT, *header) + extra + payload


def unpack(record: bytes) -> tuple[IRHeader, bytes]:
    """Split an image record into its header (label: float, or float32 array when flag > 0) and payload."""
    if len(record) < _IR_SIZE:
        raise InvalidInputError(f"record of {len(record)} bytes is shorter than an IRHeader ({_IR_SIZE} bytes)")
    header = IRHeader(*struct.unpack(_IR_FORMAT, record[:_IR_SIZE]))
    payload = record[_IR_SIZE:]
    if header.flag > 0:
        size = 4 * header.flag
        if len(payload) < size:
            raise InvalidInputError(f"record header announces {header.flag} labels but the record is too short")
        header = header._replace(label=np.frombuffer(payload[:size], dtype=np.float32).copy())
        payload = payload[size:]
    return header, payload


def header_label(header: IRHeader) -> float:
    """The class label of an image record: the scalar label, or the first of an array label."""
    if header.flag > 0:
        return float(header.label[0])
    return float(header.label)


def image_keys(reader: IndexedRecordReader) -> list[int]:
    """Keys of the image records of an insightface-layout file (record 0 header), else every key."""
    if 0 in reader.offsets:
        header = reader.read_header(0)
        if header.flag > 0:
            first_id_record = int(header.label[0])
            return list(range(1, first_id_record))
    return list(reader.keys)
