"""The detection result handed to the delivery task in memory, when both run in the same worker process.

A detection saves its ``SeriesResult`` to ``results_dir`` and sends a delivery message; the delivery task then loads
that file and reads the headers of every source instance again from the spool. With the embedded worker (one pool
process) and often with others, the delivery task runs in the very process that just did the detection, which
still holds both: ``keep`` leaves them here (the source datasets without their pixel data, as a header read would
give them) and ``take`` hands them to the delivery task once. The file stays the record: a delivery in another
process, a retry or a redelivery reads it as before, and ``take`` answers None unless the result file is still the
one written with this result (a re-run in another process writes a new one under the same path).

One entry per process: the next detection replaces it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from dicom_node.models.base import SeriesResult

RESULT_FILE = "series_result.npz"
FIRST_PIXEL_TAG = 0x7FE00008  # Float Pixel Data; (7FE0,0009) Double Float and (7FE0,0010) Pixel Data follow


@dataclass(frozen=True)
class Handover:
    job_id: int
    result_path: str
    result: SeriesResult
    headers: dict[str, Dataset]  # SOP Instance UID → the source instance without pixel data
    file_id: tuple[int, int, int]  # the result file's (inode, size, mtime_ns) when it was written


_lock = threading.Lock()
_latest: Handover | None = None


def _file_id(result_path: str | Path) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(Path(result_path) / RESULT_FILE)
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def headers_of(datasets: Sequence[Dataset]) -> dict[str, Dataset]:
    """The datasets by SOP Instance UID with their pixel data and what follows it removed, in place (what
    ``dcmread(stop_before_pixels=True)`` gives; the decoded pixel array goes with the pixel data)."""
    headers = {}
    for ds in datasets:
        del ds[FIRST_PIXEL_TAG:]
        headers[str(ds.SOPInstanceUID)] = ds
    return headers


def keep(job_id: int, result_path: str | Path, result: SeriesResult, datasets: Sequence[Dataset]) -> None:
    """Leave the result saved at ``result_path`` and its source ``datasets`` (stripped of pixel data, in place)
    for this process's delivery task; replaces what was kept before."""
    global _latest
    file_id = _file_id(result_path)
    if file_id is None:
        return
    handover = Handover(job_id, str(result_path), result, headers_of(datasets), file_id)
    with _lock:
        _latest = handover


def take(job_id: int, result_path: str | Path) -> Handover | None:
    """What ``keep`` left for job ``job_id`` if its result file is unchanged since; given out once."""
    global _latest
    with _lock:
        handover = _latest
        if handover is None or handover.job_id != job_id or handover.result_path != str(result_path):
            return None
        _latest = None
    return handover if _file_id(result_path) == handover.file_id else None


def clear() -> None:
    global _latest
    with _lock:
        _latest = None
