"""STOW-RS (PS3.18 10.5): store instances over DICOMweb as one multipart/related; type="application/dicom" POST.

200 → stored; 202 (some instances accepted with warnings) → warning; 408/429/5xx or no connection → retry;
other statuses (400, 409 conflict, 415) → failed with the response text.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path

import httpx

from dicom_node.config import Destination
from dicom_node.delivery.transfer import SendOutcome


def multipart_body(files: Sequence[Path], boundary: str) -> bytes:
    parts: list[bytes] = []
    for path in files:
        parts.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii"))
        parts.append(path.read_bytes())
        parts.append(b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(parts)


def stow_files(destination: Destination, files: Sequence[Path], *, timeout: float = 120.0) -> SendOutcome:
    assert destination.url
    boundary = f"dicom-node-{uuid.uuid4().hex}"
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    if destination.bearer_token:
        headers["Authorization"] = f"Bearer {destination.bearer_token}"
    url = destination.url.rstrip("/") + "/studies"
    try:
        response = httpx.post(url, content=multipart_body(files, boundary), headers=headers, timeout=timeout)
    except httpx.HTTPError as err:
        return SendOutcome("retry", None, f"STOW-RS failed: {type(err).__name__}: {err}")
    code = response.status_code
    if code == 200:
        return SendOutcome("stored", code, f"HTTP 200, {len(files)} instance(s)")
    if code == 202:
        return SendOutcome("warning", code, f"HTTP 202: {response.text[:200]}")
    if code in (408, 429) or code >= 500:
        return SendOutcome("retry", code, f"HTTP {code}")
    return SendOutcome("failed", code, f"HTTP {code}: {response.text[:200]}")
