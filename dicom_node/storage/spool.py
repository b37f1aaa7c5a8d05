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
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.filereader import _at_pixel_data, _read_file_meta_info, read_dataset, read_preamble
from pydicom.pixels.utils import get_expected_length
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from dicom_node.storage.encoding import EncodingError, PixelDataFound, encoding_of, inflated, walk_data_set

# PS3.5 9.1: UID components are digits separated by periods, at most 64 characters, and a component of more than
# one digit does not start with 0. Checking this also keeps a received UID from naming a path outside the spool.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

# PS3.4 Table B.2-1 C-STORE status codes the spool can cause.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210

# A deflated data set may inflate to at most this many bytes unless configured (storage.max_inflated_bytes).
DEFAULT_MAX_INFLATED_BYTES = 256 * 1024 * 1024

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
# Read only to check that an image's pixel data arrived in full.
_IMAGE_KEYWORDS = ("BitsAllocated", "SamplesPerPixel", "NumberOfFrames", "PhotometricInterpretation")


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
    # Checked as encoded: pydicom's UID type strips leading spaces too, which PS3.5 9.1 does not allow, and a
    # PACS would keep the value as sent. Only the trailing NULL (or space) padding to an even length is dropped.
    element = ds.get_item(keyword)
    value = element.value if element is not None else None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    value = str(value or "").rstrip("\0 ")
    if not value:
        raise RejectedInstance(STATUS_CANNOT_UNDERSTAND, f"{keyword} is missing")
    return check_uid(value, keyword)


def check_uid(value: str, keyword: str) -> str:
    """``value`` when it is a valid UID (PS3.5 9.1), else RejectedInstance 0xC210 naming ``keyword``."""
    if len(value) > 64 or not _UID.match(value):
        raise RejectedInstance(STATUS_CANNOT_UNDERSTAND, f"{keyword} is not a valid UID (PS3.5 9.1)")
    return value


def read_header(path: Path, max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES) -> InstanceHeader:
    """Parse the header attributes the node needs and check the whole data set arrived (every element's length
    fits, sequences and encapsulated pixel data are closed, an image has all its pixel data); the pixel data is
    neither read nor decoded. A deflated data set is inflated as a stream to a temporary file next to ``path``,
    at most ``max_inflated_bytes``."""
    with path.open("rb") as fp:
        file_meta = _file_meta(fp)
        start = fp.tell()
        transfer_syntax = str(file_meta.get("TransferSyntaxUID", "")).strip()
        if not transfer_syntax:
            raise RejectedInstance(STATUS_CANNOT_UNDERSTAND, "File Meta Information has no Transfer Syntax UID")
        if transfer_syntax != DeflatedExplicitVRLittleEndian:
            return _read_data_set(fp, start, transfer_syntax, transfer_syntax)
        try:
            with inflated(fp, start, max_inflated_bytes, path.parent) as body:
                return _read_data_set(body, 0, ExplicitVRLittleEndian, transfer_syntax)
        except EncodingError as err:
            raise RejectedInstance(STATUS_CANNOT_UNDERSTAND, str(err)) from err


def _file_meta(fp: BinaryIO) -> Dataset:
    """The File Meta Information (PS3.10 7.1) that pynetdicom wrote in front of the received data set."""
    try:
        read_preamble(fp, False)
        return _read_file_meta_info(fp)
    except Exception as err:  # noqa: BLE001 - whatever pydicom cannot parse, the node cannot understand
        reason = f"File Meta Information cannot be parsed: {type(err).__name__}"
        raise RejectedInstance(STATUS_CANNOT_UNDERSTAND, reason) from err


def _read_data_set(fp: BinaryIO, start: int, encoded_as: str, transfer_syntax: str) -> InstanceHeader:
    """Walk the data set at ``start`` (encoded as ``encoded_as``), then parse the header attributes."""
    encoding = encoding_of(encoded_as)
    try:
        pixel_data = walk_data_set(fp, start, encoding)
    except EncodingError as err:
        raise RejectedInstance(STATUS_CANNOT_UNDERSTAND, str(err)) from err
    fp.seek(start)
    try:
        ds = read_dataset(
            fp,
            is_implicit_VR=encoding.implicit_vr,
            is_little_endian=encoding.little_endian,
            stop_when=_at_pixel_data,
            defer_size="2 KB",
            specific_tags=[Tag(k) for k in (*HEADER_KEYWORDS, *_IMAGE_KEYWORDS)],
        )
        header = _header(ds, transfer_syntax)
    except RejectedInstance:
        raise
    except Exception as err:  # noqa: BLE001 - whatever pydicom cannot parse, the node cannot understand
        raise RejectedInstance(STATUS_CANNOT_UNDERSTAND, f"data set cannot be parsed: {type(err).__name__}") from err
    _check_pixel_data(ds, pixel_data)
    return header


def _check_pixel_data(ds: Dataset, pixel_data: PixelDataFound | None) -> None:
    """An image (Rows and Columns present) must carry its pixel data, native pixel data in full (PS3.5 8.1.1):
    a data set cut at an element boundary parses cleanly but is no image."""
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    if not rows or not columns:
        return
    if pixel_data is None:
        raise RejectedInstance(STATUS_CANNOT_UNDERSTAND, "image has Rows and Columns but no Pixel Data")
    if pixel_data.length is None or pixel_data.tag != 0x7FE00010:
        return  # encapsulated: the fragments were checked by the walk
    try:
        expected = int(get_expected_length(ds, unit="bytes"))
    except Exception:  # noqa: BLE001 - attributes a reader needs are missing or odd: the worker will say so
        return
    if pixel_data.length < expected:
        raise RejectedInstance(
            STATUS_CANNOT_UNDERSTAND,
            f"Pixel Data has {pixel_data.length} bytes where Rows, Columns, Samples per Pixel, Bits Allocated and "
            f"Number of Frames need {expected}",
        )


def _header(ds: Dataset, transfer_syntax: str) -> InstanceHeader:
    return InstanceHeader(
        sop_class_uid=_uid(ds, "SOPClassUID"),
        sop_instance_uid=_uid(ds, "SOPInstanceUID"),
        study_instance_uid=_uid(ds, "StudyInstanceUID"),
        series_instance_uid=_uid(ds, "SeriesInstanceUID"),
        transfer_syntax_uid=transfer_syntax,
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Files received instances durably; one directory per study and series."""

    def __init__(self, root: Path, min_free_bytes: int, max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES) -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self.max_inflated_bytes = max_inflated_bytes
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
        header = read_header(received, self.max_inflated_bytes)
        if affected_sop_instance_uid and affected_sop_instance_uid.rstrip("\0 ") != header.sop_instance_uid:
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
