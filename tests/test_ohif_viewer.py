"""What a radiologist sees: the node's SEG and SR opened in OHIF Viewer 3.13, the most used open viewer.

Orthanc (with its DICOMweb plugin) holds the Siemens T1 series and the SEG and SR the result builders make for an
abnormal finding; OHIF's built app (``make ohif``) is served on the same origin as Orthanc's DICOMweb
(tests/ohif_server.py) and driven in headless Debian Chromium with selenium. The SEG must load and list its
segments; the SR must show the verdict and the score; nothing may land in OHIF's error boundary. Screenshots are
kept in ``test-artifacts/`` (ignored by git) for a person to look at.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from conftest import REPO
from ohif_server import OhifServer, available, serving
from orthanc_server import Orthanc, running_orthanc
from result_data import brain_files, write_brain_seg_and_sr

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = REPO / "test-artifacts"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
        reason="Debian chromium and chromium-driver are needed (make test-deps installs them)",
    ),
    pytest.mark.skipif(not available(), reason="OHIF's built app is missing: run `make ohif`"),
]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Orthanc, str, dict[str, pydicom.Dataset]]]:
    """Orthanc with the source series and the node's SEG and SR for an abnormal result."""
    files = brain_files()
    if not files:
        pytest.skip("shared DICOM data missing")
    directory = tmp_path_factory.mktemp("ohif")
    for orthanc in running_orthanc(directory / "orthanc"):
        for path in files:
            httpx.post(f"{orthanc.url}/instances", content=path.read_bytes(), timeout=30).raise_for_status()
        objects: dict[str, pydicom.Dataset] = {}
        for kind, path in write_brain_seg_and_sr(directory).items():
            httpx.post(f"{orthanc.url}/instances", content=path.read_bytes(), timeout=30).raise_for_status()
            objects[kind] = pydicom.dcmread(path, stop_before_pixels=True)
        yield orthanc, str(objects["SR"].StudyInstanceUID), objects


@pytest.fixture(scope="module")
def ohif(study: tuple[Orthanc, str, dict[str, pydicom.Dataset]]) -> Iterator[OhifServer]:
    yield from serving(study[0].url)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--enable-unsafe-swiftshader",  # WebGL in software: the viewports render without a GPU
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1600,1000",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _page_text(driver: Any) -> str:
    return str(driver.execute_script("return document.body.innerText"))


def _wait(condition: Callable[[], object], what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.5)


def _open_series(driver: Any, ohif: OhifServer, study_uid: str, description: str) -> None:
    """The study in the viewer, the guided tour dismissed, the series with ``description`` double-clicked."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver.get(f"{ohif.url}/viewer?StudyInstanceUIDs={study_uid}")
    _wait(lambda: description in _page_text(driver), f"the series '{description}' in the study browser")
    time.sleep(2)  # the first viewport renders and the tour appears
    for button in driver.find_elements(By.XPATH, "//*[normalize-space(text())='Skip all']"):
        button.click()
    thumbnail = driver.find_element(By.XPATH, f"//*[contains(text(), '{description}')]")
    ActionChains(driver).double_click(thumbnail).perform()


def _click(driver: Any, data_cy: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f"[data-cy='{data_cy}']").click()


def _problems(driver: Any) -> list[str]:
    """Console errors and error-boundary messages (WebGL's software-fallback notices are not problems)."""
    entries = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    text = _page_text(driver)
    boundary = [m for m in ("Something went wrong", "Error boundary", "Cannot read properties") if m in text]
    return entries + boundary


def _screenshot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    return path


def test_seg_loads_in_ohif_and_lists_its_segments(
    study: tuple[Orthanc, str, dict[str, pydicom.Dataset]], ohif: OhifServer, browser: Any
) -> None:
    _, study_uid, objects = study
    seg = objects["SEG"]
    labels = [str(segment.SegmentLabel) for segment in seg.SegmentSequence]
    _open_series(browser, ohif, study_uid, str(seg.SeriesDescription))
    from selenium.webdriver.common.by import By

    def asked_to_open() -> bool:
        return bool(browser.find_elements(By.XPATH, "//*[normalize-space(text())='Yes']"))

    _wait(asked_to_open, "OHIF's 'open this segmentation?' question")
    browser.find_element(By.XPATH, "//*[normalize-space(text())='Yes']").click()
    _click(browser, "panelSegmentation-btn")
    _wait(lambda: all(label in _page_text(browser) for label in labels), f"the segments {labels} in the panel")
    _screenshot(browser, "ohif-seg.png")
    assert "Segmentations" in _page_text(browser)
    assert _problems(browser) == []


def test_sr_shows_verdict_and_score_in_ohif(
    study: tuple[Orthanc, str, dict[str, pydicom.Dataset]], ohif: OhifServer, browser: Any
) -> None:
    _, study_uid, objects = study
    sr = objects["SR"]
    _open_series(browser, ohif, study_uid, str(sr.SeriesDescription))
    _click(browser, "trackedMeasurements-btn")
    _wait(lambda: "Abnormal" in _page_text(browser), "the verdict (Abnormal) from the SR")
    text = _page_text(browser)
    _screenshot(browser, "ohif-sr.png")
    assert "score" in text.lower()
    assert _problems(browser) == []
