"""Durable spool of received instances: ``<spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.

pynetdicom's chunked receive (``_config.STORE_RECV_CHUNKED_DATASET``) writes each C-STORE data set, undecoded, to a
temporary DICOM Part 10 file (File Meta Information of PS3.10 7.1 + the data set in the negotiated transfer syntax).
The spool reads only the header attributes it needs, checks the data set is complete, fsyncs the file and then
publishes it with an atomic hard link (which, unlike rename, never replaces an instance already stored), fsyncs the
directories, and only then may the SCP answer Success (PS3.4 B.2.3).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

# PS3.5 9.1: UID components are digits separated by periods, at most 64 characters. Checking this also keeps a
# received UID from naming a path outside the spool.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# PS3.4 Table B.2-1 C-STORE status codes the spool can cause.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210

_PIXEL_DATA_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
_ITEM, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE0DD
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}

# Header attributes the node keeps per instance; everything else stays on disk, unread.
HEADER_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "AccessionNumber",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "ViewPosition",
    "ImageType",
    "InstanceNumber",
    "Rows",
    "Columns",
)


class RejectedInstance(Exception):
    """An instance the node refuses, with the DIMSE status to answer and a reason for the log."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class InstanceHeader:
    """The few header attributes the node records (never patient identity)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    accession_number: str | None = None
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    body_part_examined: str | None = None
    view_position: str | None = None
    image_type: str | None = None
    instance_number: int | None = None
    rows: int | None = None
    columns: int | None = None


@dataclass(frozen=True)
class Placement:
    path: Path
    size_bytes: int
    already_on_disk: bool
    new_dirs: bool


@dataclass(frozen=True)
class StoredInstance:
    header: InstanceHeader
    path: Path
    size_bytes: int
    already_on_disk: bool  # the same SOP Instance UID was stored before; the first copy is kept


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip() or None


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _multi(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    return "\\".join(str(v) for v in value)


def _uid(ds: Dataset, keyword: str) -> str:
    value = _text(ds, keyword)
    if value is None:
        raise RejectedInstance(STATUS_CANNOT_UNDERSTAND, f"{keyword} is missing")
    if len(value) > 64 or not _UID.match(value):
        raise RejectedInstance(STATUS_CANNOT_UNDERSTAND, f"{keyword} is not a valid UID")
    return value


def read_header(path: Path) -> InstanceHeader:
    """Parse the header attributes the node needs and check the data set is complete; the pixel data is neither
    read nor decoded."""
    with path.open("rb") as fp:
        try:
            ds = dcmread(fp, stop_before_pixels=True, defer_size="2 KB", specific_tags=list(HEADER_KEYWORDS))
            pixel_data_offset = fp.tell()  # pydicom stops in front of the Pixel Data element
            header = _header(ds)
        except RejectedInstance:
            raise
        except Exception as err:  # noqa: BLE001 - whatever pydicom cannot parse, the node cannot understand
            reason = f"data set cannot be parsed: {type(err).__name__}"
            raise RejectedInstance(STATUS_CANNOT_UNDERSTAND, reason) from err
        if header.transfer_syntax_uid != DeflatedExplicitVRLittleEndian:
            check_complete(fp, pixel_data_offset, header.transfer_syntax_uid)
    return header


def _header(ds: Dataset) -> InstanceHeader:
    return InstanceHeader(
        sop_class_uid=_uid(ds, "SOPClassUID"),
        sop_instance_uid=_uid(ds, "SOPInstanceUID"),
        study_instance_uid=_uid(ds, "StudyInstanceUID"),
        series_instance_uid=_uid(ds, "SeriesInstanceUID"),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        accession_number=_text(ds, "AccessionNumber"),
        modality=_text(ds, "Modality"),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription"),
        body_part_examined=_text(ds, "BodyPartExamined"),
        view_position=_text(ds, "ViewPosition"),
        image_type=_multi(ds, "ImageType"),
        instance_number=_int(ds, "InstanceNumber"),
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
    )


def check_complete(fp: BinaryIO, position: int, transfer_syntax: str) -> None:
    """Raise RejectedInstance when the data set ends before its last element does (a truncated transfer).

    pydicom parsed the header up to the pixel data (``position``); from there the top-level elements are walked
    without reading their values: each defined length must fit in the file, and encapsulated pixel data must end
    with a Sequence Delimitation Item (PS3.5 7.1, A.4)."""
    size = os.fstat(fp.fileno()).st_size
    end = "<" if "BigEndian" not in _ts_name(transfer_syntax) else ">"
    implicit = transfer_syntax == "1.2.840.10008.1.2"
    current: int | None = position
    while current is not None and current < size:
        current = _skip_element(fp, current, size, end, implicit)


def _skip_element(fp: BinaryIO, position: int, size: int, end: str, implicit: bool) -> int | None:
    """Position after the element at ``position``; None when it cannot be checked cheaply (nested sequence)."""
    fp.seek(position)
    head = fp.read(8)
    if len(head) < 8:
        raise RejectedInstance(STATUS_CANNOT_UNDERSTAND, "data set is truncated")
    group, element = struct.unpack(end + "HH", head[:4])
    tag = group << 16 | element
    if implicit or group == 0xFFFE:
        (length,) = struct.unpack(end + "I", head[4:8])
        position += 8
    elif head[4:6] in _LONG_VRS:
        extra = fp.read(4)
        if len(extra) < 4:
            raise RejectedInstance(STATUS_CANNOT_UNDERSTAND, "data set is truncated")
        (length,) = struct.unpack(end + "I", extra)
        position += 12
    else:
        (length,) = struct.unpack(end + "H", head[6:8])
        position += 8
    if length == 0xFFFFFFFF:
        if tag in _PIXEL_DATA_TAGS:
            return _check_fragments(fp, position, size, end)
        return None
    position += length
    if position > size:
        raise RejectedInstance(STATUS_CANNOT_UNDERSTAND, "data set is truncated")
    return position


def _check_fragments(fp: BinaryIO, position: int, size: int, end: str) -> int:
    while True:
        fp.seek(position)
        item = fp.read(8)
        if len(item) < 8:
            raise RejectedInstance(STATUS_CANNOT_UNDERSTAND, "encapsulated pixel data is truncated")
        group, element, length = struct.unpack(end + "HHI", item)
        tag = group << 16 | element
        if tag == _SEQUENCE_DELIMITER:
            return position + 8
        if tag != _ITEM:
            raise RejectedInstance(STATUS_CANNOT_UNDERSTAND, "encapsulated pixel data is malformed")
        position += 8 + length
        if position > size:
            raise RejectedInstance(STATUS_CANNOT_UNDERSTAND, "encapsulated pixel data is truncated")


def _ts_name(transfer_syntax: str) -> str:
    from pydicom.uid import UID

    return str(UID(transfer_syntax).keyword or "")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Files received instances durably; one directory per study and series."""

    def __init__(self, root: Path, min_free_bytes: int) -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self.incoming_dir = self.root / ".incoming"

    def prepare(self) -> None:
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        # Leftovers of a crash were never acknowledged to the sender, who will send them again.
        for leftover in self.incoming_dir.iterdir():
            leftover.unlink(missing_ok=True)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root if self.root.exists() else self.root.parent).free

    def check_space(self) -> None:
        if self.free_bytes() < self.min_free_bytes:
            raise RejectedInstance(
                STATUS_OUT_OF_RESOURCES, f"free disk space under the watermark of {self.min_free_bytes} bytes"
            )

    def path_for(self, header: InstanceHeader) -> Path:
        return self.root / header.study_instance_uid / header.series_instance_uid / f"{header.sop_instance_uid}.dcm"

    def inspect(self, received: Path, affected_sop_instance_uid: str | None = None) -> InstanceHeader:
        """Refuse (RejectedInstance) when disk space is short (0xA700) or the data set cannot be understood
        (0xC210); otherwise the header attributes the node records."""
        self.check_space()
        header = read_header(received)
        if affected_sop_instance_uid and affected_sop_instance_uid.strip("\0 ") != header.sop_instance_uid:
            raise RejectedInstance(
                STATUS_CANNOT_UNDERSTAND, "SOP Instance UID of the data set differs from the C-STORE request"
            )
        return header

    @staticmethod
    def sync_file(path: Path) -> None:
        with path.open("rb") as fp:
            os.fsync(fp.fileno())

    def place(self, received: Path, header: InstanceHeader) -> Placement:
        """Give the (already fsynced) received file its final name with a hard link: atomic, and it never replaces
        a copy stored before or meanwhile by another association. The name is durable after sync_dirs()."""
        target = self.path_for(header)
        size = received.stat().st_size
        if target.exists():
            return Placement(target, target.stat().st_size, already_on_disk=True, new_dirs=False)
        new_dirs = not target.parent.exists()
        target.parent.mkdir(parents=True, exist_ok=True)
        existed = self._link(received, target)
        return Placement(target, target.stat().st_size if existed else size, existed, new_dirs)

    def sync_dirs(self, placement: Placement) -> None:
        _fsync_dir(placement.path.parent)
        if placement.new_dirs:  # the new directory entries must be durable too
            _fsync_dir(placement.path.parent.parent)
            _fsync_dir(self.root)

    def store(self, received: Path, affected_sop_instance_uid: str | None = None) -> StoredInstance:
        """inspect, sync_file, place, sync_dirs in sequence (the receiver overlaps the fsyncs with other work)."""
        header = self.inspect(received, affected_sop_instance_uid)
        self.sync_file(received)
        placement = self.place(received, header)
        self.sync_dirs(placement)
        return StoredInstance(header, placement.path, placement.size_bytes, placement.already_on_disk)

    @staticmethod
    def _link(received: Path, target: Path) -> bool:
        """Link ``received`` to ``target``; True when ``target`` existed already."""
        try:
            os.link(received, target)
            return False
        except FileExistsError:
            return True
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
        # Another file system (or no hard links): a durable copy next to the target, then the link.
        staged = target.parent / f".{uuid.uuid4().hex}.part"
        try:
            shutil.copyfile(received, staged)
            with staged.open("rb") as fp:
                os.fsync(fp.fileno())
            try:
                os.link(staged, target)
            except FileExistsError:
                return True
            return False
        finally:
            staged.unlink(missing_ok=True)
