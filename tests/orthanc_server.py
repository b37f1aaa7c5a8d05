"""A real Orthanc (Debian package) as the PACS of the tests: loopback ports, storage in a temp dir.

``Orthanc.start()`` writes a JSON configuration and waits for the REST API; ``stop()`` ends the process (the storage
stays, so a restart finds the earlier instances); objects are read back through the REST API.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    def __init__(self, directory: Path, *, node_ae: str = "DICOMNODE", node_port: int | None = None) -> None:
        self.directory = directory
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.ae_title = "ORTHANC"
        self.node_ae = node_ae
        self.node_port = node_port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def config(self) -> dict[str, Any]:
        return {
            "Name": "dicom-node-test",
            "StorageDirectory": str(self.directory / "storage"),
            "IndexDirectory": str(self.directory / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "HttpServerEnabled": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomModalities": {"node": [self.node_ae, "127.0.0.1", self.node_port]},
            "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StorageCompression": False,
            "SyncStorageArea": False,  # no fsync per instance: a test PACS, not a clinical one
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 4,
        }

    def start(self, timeout: float = 30.0) -> None:
        config = self.directory / "orthanc.json"
        config.write_text(json.dumps(self.config()), encoding="utf-8")
        log = open(self.directory / "orthanc.log", "ab")  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen([str(ORTHANC), str(config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}; see {self.directory}/orthanc.log")
            try:
                if httpx.get(f"{self.url}/system", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("Orthanc did not answer on its REST API in time")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.url}{path}", timeout=30.0)
        response.raise_for_status()
        return response.json()

    def instances(self) -> list[str]:
        return list(self.get("/instances"))

    def tags(self, instance_id: str) -> dict[str, Any]:
        return dict(self.get(f"/instances/{instance_id}/tags?simplify"))

    def instances_of_series_number(self, number: int) -> list[dict[str, Any]]:
        """Tags of the instances in the series with Series Number ``number`` (found through /series?expand)."""
        found = []
        for series in self.get("/series?expand"):
            if str(series["MainDicomTags"].get("SeriesNumber", "")).strip() == str(number):
                found += [self.tags(instance_id) for instance_id in series["Instances"]]
        return found


def running_orthanc(directory: Path) -> Iterator[Orthanc]:
    """Start an Orthanc in ``directory`` for one test (use it from a fixture: ``yield from running_orthanc(...)``)."""
    if not ORTHANC.exists():
        pytest.skip("Orthanc is not installed (make test-deps)")
    directory.mkdir(parents=True, exist_ok=True)
    server = Orthanc(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
