"""Checks on a received data set's encoding (PS3.5 7, PS3.10 7) that need no value to be decoded.

A C-STORE data set can arrive cut short (a sender or a network device that gave up), or with a length field that
runs past what arrived. pydicom parses such a file without complaint when the damage lies in an element it is asked
to skip: a seek past the end of the file simply ends the data set. So before the node answers Success, every
element of the data set is walked, nested sequences and encapsulated pixel data included, and each defined length
must fit in the bytes that arrived.

A Deflated Explicit VR Little Endian data set (PS3.5 A.5) is inflated as a stream into a temporary file, never
into memory, and refused once it inflates past a configured size: a few hundred kilobytes can inflate to gigabytes
(a "deflate bomb"), and every later reader (the worker too) would hold it in memory whole.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

# Tags of the elements whose structure matters (PS3.5 7.5, A.4).
PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_ITEM, _ITEM_DELIMITER, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 Table 7.1-1).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
# Nesting deeper than this is not a real data set; refusing it bounds the recursion.
_MAX_DEPTH = 32

_INFLATE_IN, _INFLATE_OUT = 64 * 1024, 1024 * 1024


class EncodingError(ValueError):
    """The data set's encoding does not match what arrived (truncated, malformed, or too large to inflate)."""


@dataclass(frozen=True)
class Encoding:
    """How a data set is encoded: byte order and VR explicitness (PS3.5 10)."""

    little_endian: bool = True
    implicit_vr: bool = False

    @property
    def prefix(self) -> str:
        return "<" if self.little_endian else ">"


IMPLICIT_LITTLE = Encoding(little_endian=True, implicit_vr=True)
EXPLICIT_LITTLE = Encoding(little_endian=True, implicit_vr=False)
EXPLICIT_BIG = Encoding(little_endian=False, implicit_vr=False)


def encoding_of(transfer_syntax_uid: str) -> Encoding:
    """The encoding of the data set for a transfer syntax (the deflated one once inflated)."""
    if transfer_syntax_uid == "1.2.840.10008.1.2":
        return IMPLICIT_LITTLE
    if transfer_syntax_uid == "1.2.840.10008.1.2.2":
        return EXPLICIT_BIG
    return EXPLICIT_LITTLE


@dataclass(frozen=True)
class PixelDataFound:
    """The top-level pixel data element as found by the walk."""

    tag: int
    length: int | None  # None: encapsulated (undefined length)


@dataclass
class _Reader:
    fp: BinaryIO
    size: int

    def read(self, position: int, count: int, what: str) -> bytes:
        self.fp.seek(position)
        data = self.fp.read(count)
        if len(data) < count:
            raise EncodingError(f"data set is truncated ({what} at byte {position} runs past the end)")
        return data


def walk_data_set(fp: BinaryIO, start: int, encoding: Encoding) -> PixelDataFound | None:
    """Walk every element from ``start`` to the end of the file; raise EncodingError where a length runs past the
    end or a sequence, item or fragment list is not closed. Returns the top-level pixel data element, if any."""
    reader = _Reader(fp, os.fstat(fp.fileno()).st_size)
    pixel_data: PixelDataFound | None = None
    position = start
    if not encoding.implicit_vr and start + 6 <= reader.size and not _is_vr(reader.read(start + 4, 2, "a VR")):
        # Encoded in Implicit VR although the transfer syntax says explicit: pydicom reads such a data set (with a
        # warning), so the walk follows it rather than refusing an instance every reader accepts.
        encoding = IMPLICIT_LITTLE
    while position < reader.size:
        tag, length, position, implicit_sq = _element_header(reader, position, encoding)
        if tag in PIXEL_DATA_TAGS:
            pixel_data = PixelDataFound(tag, None if length == _UNDEFINED else length)
        position = _skip_value(reader, position, tag, length, encoding, implicit_sq, depth=0)
    return pixel_data


def _element_header(reader: _Reader, position: int, encoding: Encoding) -> tuple[int, int, int, bool]:
    """(tag, length, position of the value, whether an undefined-length value is implicit VR: UN per PS3.5 6.2.2)."""
    head = reader.read(position, 8, "an element header")
    group, element = struct.unpack(encoding.prefix + "HH", head[:4])
    tag = group << 16 | element
    if encoding.implicit_vr or group == 0xFFFE:
        (length,) = struct.unpack(encoding.prefix + "I", head[4:8])
        return tag, length, position + 8, False
    vr = head[4:6]
    if vr in _LONG_VRS:
        (length,) = struct.unpack(encoding.prefix + "I", reader.read(position + 8, 4, "an element length"))
        return tag, length, position + 12, vr == b"UN"
    if not _is_vr(vr):
        raise EncodingError(f"data set is malformed (no VR at byte {position})")
    (length,) = struct.unpack(encoding.prefix + "H", head[6:8])
    return tag, length, position + 8, False


def _is_vr(data: bytes) -> bool:
    return len(data) == 2 and 65 <= data[0] <= 90 and 65 <= data[1] <= 90


def _skip_value(
    reader: _Reader, position: int, tag: int, length: int, encoding: Encoding, implicit_sq: bool, depth: int
) -> int:
    if length != _UNDEFINED:
        end = position + length
        if end > reader.size:
            raise EncodingError(
                f"data set is truncated (element ({tag >> 16:04X},{tag & 0xFFFF:04X}) of {length} bytes "
                f"runs {end - reader.size} bytes past the end)"
            )
        return end
    if tag in PIXEL_DATA_TAGS and depth == 0:
        return _skip_fragments(reader, position)
    if depth >= _MAX_DEPTH:
        raise EncodingError("data set is malformed (sequences nested too deep)")
    # An undefined length outside pixel data is a sequence; its items in UN are Implicit VR Little Endian.
    return _skip_sequence(reader, position, IMPLICIT_LITTLE if implicit_sq else encoding, depth + 1)


def _skip_fragments(reader: _Reader, position: int) -> int:
    """Encapsulated pixel data: items (the Basic Offset Table, then fragments) closed by a Sequence Delimitation
    Item (PS3.5 A.4); always little endian."""
    while True:
        group, element, length = struct.unpack("<HHI", reader.read(position, 8, "a pixel data fragment"))
        tag = group << 16 | element
        position += 8
        if tag == _SEQUENCE_DELIMITER:
            return position
        if tag != _ITEM or length == _UNDEFINED:
            raise EncodingError("encapsulated pixel data is malformed")
        position += length
        if position > reader.size:
            raise EncodingError("encapsulated pixel data is truncated")


def _skip_sequence(reader: _Reader, position: int, encoding: Encoding, depth: int) -> int:
    """Items of an undefined-length sequence up to its Sequence Delimitation Item (PS3.5 7.5.2)."""
    while True:
        head = reader.read(position, 8, "a sequence item")
        group, element, length = struct.unpack(encoding.prefix + "HHI", head)
        tag = group << 16 | element
        position += 8
        if tag == _SEQUENCE_DELIMITER:
            return position
        if tag != _ITEM:
            raise EncodingError(f"sequence is malformed (tag {group:04X},{element:04X} where an item belongs)")
        if length != _UNDEFINED:
            position += length
            if position > reader.size:
                raise EncodingError("data set is truncated (a sequence item runs past the end)")
            continue
        position = _skip_item(reader, position, encoding, depth)


def _skip_item(reader: _Reader, position: int, encoding: Encoding, depth: int) -> int:
    """Elements of an undefined-length item up to its Item Delimitation Item."""
    while True:
        tag, length, position, implicit_sq = _element_header(reader, position, encoding)
        if tag == _ITEM_DELIMITER:
            return position
        position = _skip_value(reader, position, tag, length, encoding, implicit_sq, depth)


@contextmanager
def inflated(fp: BinaryIO, start: int, max_bytes: int, directory: Path) -> Iterator[BinaryIO]:
    """The raw-deflated data set from ``start`` (PS3.5 A.5), inflated as a stream into a temporary file in
    ``directory`` that is removed afterwards. EncodingError when it inflates past ``max_bytes`` or the deflate
    stream ends early; memory use stays at a few megabytes whatever the ratio."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    with tempfile.TemporaryFile(dir=directory, prefix="inflate-") as out:
        fp.seek(start)
        while not inflater.eof:
            chunk = inflater.unconsumed_tail or fp.read(_INFLATE_IN)
            if not chunk:
                raise EncodingError("deflated data set is truncated (the deflate stream does not end)")
            try:
                data = inflater.decompress(chunk, _INFLATE_OUT)
            except zlib.error as err:
                raise EncodingError(f"deflated data set cannot be inflated: {err}") from err
            total += len(data)
            if total > max_bytes:
                raise EncodingError(f"deflated data set inflates past the limit of {max_bytes} bytes")
            out.write(data)
        out.flush()
        out.seek(0)
        yield out
