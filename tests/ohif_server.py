"""OHIF Viewer 3.13 (the built app from the npm registry) and Orthanc's DICOMweb on one origin, for the viewer tests.

``make ohif`` unpacks ``npm pack @ohif/app@3.13.2`` into ``.ohif/package``; the app in ``package/dist`` is served as
static files, ``/app-config.js`` is replaced by one whose only data source is ``/dicom-web`` on the same origin, and
``/dicom-web/...`` is forwarded to Orthanc. One origin means no CORS setup in Orthanc. Paths the app routes itself
(``/viewer``, ``/segmentation``, ...) get ``index.html``, as a single-page app needs.
"""

from __future__ import annotations

import json
import mimetypes
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
from conftest import REPO

OHIF_DIST = REPO / ".ohif" / "package" / "dist"

APP_CONFIG = """window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  investigationalUseDialog: { option: 'never' },
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (test PACS)',
        name: 'orthanc',
        wadoUriRoot: '/dicom-web',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
"""

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-encoding", "content-length"}


def _without_spaced_patient_id(path: str) -> tuple[str, str | None]:
    """Orthanc-DICOMweb 1.7 answers ``[]`` to a QIDO-RS study search whose PatientID contains a space (the Siemens
    study's is "Rorden Lab"), so OHIF's study list stays empty. Such a search goes to Orthanc without the
    PatientID and is filtered here instead."""
    base, _, query = path.partition("?")
    if not base.rstrip("/").endswith("/studies") or not query:
        return path, None
    pairs = parse_qsl(query, keep_blank_values=True)
    wanted = [v for k, v in pairs if k in ("00100020", "PatientID")]
    if not wanted or " " not in wanted[0]:
        return path, None
    kept = [(k, v) for k, v in pairs if k not in ("00100020", "PatientID")]
    return f"{base}?{urlencode(kept)}", wanted[0]


def _patient_id(study: dict[str, Any]) -> str | None:
    values = study.get("00100020", {}).get("Value") or [None]
    return values[0] if isinstance(values[0], str) else None


def available() -> bool:
    return (OHIF_DIST / "index.html").is_file()


class _Handler(BaseHTTPRequestHandler):
    server: OhifServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        return

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path.startswith("/dicom-web/"):
            self._forward()
        elif path == "/app-config.js":
            self._send(200, APP_CONFIG.encode(), "application/javascript")
        else:
            self._static(path)

    def _forward(self) -> None:
        self.server.requests.append(self.path)
        headers = {k: v for k, v in self.headers.items() if k.lower() in {"accept", "range"}}
        path, patient_id = _without_spaced_patient_id(self.path)
        response = self._get(f"{self.server.orthanc_url}{path}", headers)
        body = response.content
        if patient_id is not None and response.status_code == 200:
            body = json.dumps([s for s in response.json() if _patient_id(s) == patient_id]).encode()
        self.send_response(response.status_code)
        for key, value in response.headers.items():
            if key.lower() not in _HOP_BY_HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _get(self, url: str, headers: dict[str, str], attempts: int = 3) -> httpx.Response:
        """A GET to Orthanc, tried again when the connection fails: under the viewer's burst of frame requests
        Orthanc may close a kept-alive connection just as it is reused, and the browser would see an empty
        response (net::ERR_EMPTY_RESPONSE) from the proxy, not from Orthanc."""
        for attempt in range(attempts):
            try:
                return self.server.client.get(url, headers=headers)
            except httpx.TransportError:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _static(self, path: str) -> None:
        target = (OHIF_DIST / path.lstrip("/")).resolve()
        if not target.is_relative_to(OHIF_DIST.resolve()) or not target.is_file():
            target = OHIF_DIST / "index.html"  # a route of the single-page app
        content_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if target.suffix == ".wasm":
            content_type = "application/wasm"
        self._send(200, target.read_bytes(), content_type)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class OhifServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, orthanc_url: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.orthanc_url = orthanc_url.rstrip("/")
        self.client = httpx.Client(timeout=60.0)
        self.requests: list[str] = []  # DICOMweb paths asked for, for the test's messages

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def serving(orthanc_url: str) -> Iterator[OhifServer]:
    server = OhifServer(orthanc_url)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.client.close()
        server.server_close()
