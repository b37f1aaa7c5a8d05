"""What is known about image files besides their pixels: a labels CSV, or the DICOM header.

Used by ``dicom-node fit|calibrate|evaluate --labels CSV`` so that files are scored as the same images arriving
over DICOM would be: a radiograph's view comes from View Position (0018,5101) in the header, or from the CSV's
``view`` column for PNG/JPG files. The patient (``patient_id`` or ``patient`` column, Patient ID (0010,0020) of a
DICOM file) keeps one patient's images in one fold when a fit splits its normals; it is never logged.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import pydicom

from dicom_node.models.base import ImageInfo
from dicom_node.models.preprocessing import is_dicom_file

VIEWS = ("AP", "PA")  # the frontal radiograph views the chest detector knows


def declared_view(ds: pydicom.Dataset) -> str | None:
    """AP or PA from View Position (0018,5101) (CR Series, PS3.3 C.8.1.1; DX Positioning, PS3.3 C.8.11.5); None
    when absent or another value (LL, RL, ...)."""
    value = str(ds.get("ViewPosition", "") or "").strip().upper()
    return value if value in VIEWS else None


def read_labels(path: Path) -> dict[str, ImageInfo]:
    """file name -> :class:`ImageInfo` from a CSV with a ``file`` column and optional ``view`` and ``patient_id`` (or
    ``patient``) columns; empty cells are unknown."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "file" not in reader.fieldnames:
            raise ValueError(f"{path}: needs a 'file' column (and 'view' and/or 'patient_id')")
        table = {}
        for row in reader:
            view = (row.get("view") or "").strip().upper() or None
            patient = (row.get("patient_id") or row.get("patient") or "").strip() or None
            table[row["file"]] = ImageInfo(view=view, patient=patient)
        return table


def info_for(files: Sequence[Path], labels: Mapping[str, ImageInfo] | None = None) -> list[ImageInfo]:
    """Per file: its row of ``labels`` (by file name) where there is one, else what its DICOM header says."""
    out = []
    for path in files:
        known = (labels or {}).get(Path(path).name)
        if known is not None:
            out.append(known)
        elif is_dicom_file(Path(path)):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            out.append(ImageInfo(view=declared_view(ds), patient=str(ds.get("PatientID", "") or "") or None))
        else:
            out.append(ImageInfo())
    return out
