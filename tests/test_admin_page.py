"""The admin web page in a real browser: Debian Chromium, headless, driven by selenium through /usr/bin/chromedriver,
against the node's HTTP service (uvicorn on a free loopback port) over a SQLite job database with realistic rows."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from admin_rows import DELIVERY_ERROR, DETECTION_ERROR, Rows, fill
from conftest import free_port

from dicom_node.admin.service import HttpService
from dicom_node.config import load_settings
from dicom_node.db import Database

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
READ = "page-reader"
SCREENSHOT = Path(tempfile.gettempdir()) / "dicom-node-admin-page.png"

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="Debian chromium and chromium-driver are needed (make test-deps installs them)",
)


@pytest.fixture
def served(tmp_path: Path, sqlite_url: str) -> Iterator[tuple[str, Rows]]:
    db = Database(sqlite_url)
    rows = fill(db)
    settings = load_settings(
        overrides={
            "node": {"data_dir": str(tmp_path)},
            "database": {"url": sqlite_url},
            "http": {"port": free_port(), "read_tokens": [READ]},
        }
    )
    service = HttpService(settings, db)
    service.start()
    try:
        yield service.url, rows
    finally:
        service.stop()
        db.dispose()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1800",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.slow
def test_admin_page_in_chromium(served: tuple[str, Rows], browser) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, rows = served
    wait = WebDriverWait(browser, 20)
    browser.get(f"{url}/?token={READ}")

    # Recent studies, abnormal first.
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#studies tbody tr")) == 6)
    first = browser.find_elements(By.CSS_SELECTOR, "#studies tbody tr")[0]
    assert first.get_attribute("data-study-uid") == rows.studies["chest_abnormal"]
    assert "ABNORMAL" in first.text
    assert "abnormal" in (first.get_attribute("class") or "")
    # The token left the address bar once read.
    assert "token=" not in browser.current_url

    # Failures with their reasons.
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#failures tbody tr")) == 2)
    failures = browser.find_element(By.ID, "failures").text
    assert DETECTION_ERROR in failures
    assert DELIVERY_ERROR in failures

    # Queue depth and expected wait: the queued chest X-ray, and no live worker to estimate a wait from.
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#queue tbody tr[data-detector="chest_xray"]'))
    queue_row = browser.find_element(By.CSS_SELECTOR, '#queue tbody tr[data-detector="chest_xray"]')
    assert queue_row.find_elements(By.TAG_NAME, "td")[1].text == "1"
    assert "no live worker consumes this queue" in queue_row.text

    # The 24 h plot exists, with bars for both detectors.
    plot = wait.until(ec.presence_of_element_located((By.ID, "throughput-plot")))
    detectors = {bar.get_attribute("data-detector") for bar in plot.find_elements(By.CSS_SELECTOR, "rect.bar")}
    assert detectors == {"brain_mri", "chest_xray"}
    assert "chest_xray" in browser.find_element(By.ID, "stats").text

    # Clicking a job shows its timeline.
    job_id = rows.jobs["brain_normal"]
    browser.find_element(By.CSS_SELECTOR, f'#studies a.job[data-job-id="{job_id}"]').click()
    wait.until(ec.visibility_of_element_located((By.ID, "timeline-section")))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#timeline tbody tr")) == 9)
    steps = [r.get_attribute("data-step") for r in browser.find_elements(By.CSS_SELECTOR, "#timeline tbody tr")]
    assert steps[0] == "received" and steps[-1] == "delivered"
    assert "started" in steps and "finished" in steps and steps.count("delivery") == 2
    assert browser.find_element(By.ID, "timeline-job").text == f"#{job_id}"
    assert "status 0xA700" in browser.find_element(By.ID, "timeline").text
    assert browser.find_elements(By.CSS_SELECTOR, "#timeline-plot rect")

    # A read token cannot retry: the page says so instead of failing silently.
    browser.find_element(By.CSS_SELECTOR, "#failures button.retry").click()
    wait.until(lambda d: "admin token" in d.find_element(By.ID, "status").text)
    browser.save_screenshot(str(SCREENSHOT))


@pytest.mark.slow
def test_admin_page_refuses_wrong_token(served: tuple[str, Rows], browser) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _rows = served
    browser.get(f"{url}/?token=not-a-token")
    WebDriverWait(browser, 20).until(lambda d: "401" in d.find_element(By.ID, "status").text)
    assert browser.find_elements(By.CSS_SELECTOR, "#studies tbody tr") == []


@pytest.mark.slow
def test_api_docs_render_offline(served: tuple[str, Rows], browser) -> None:  # type: ignore[no-untyped-def]
    """/docs renders the OpenAPI 3.1 document with the Swagger UI shipped in the venv (the browser has no internet)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _rows = served
    browser.get(f"{url}/docs")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: "dicom-node admin API" in d.find_element(By.CSS_SELECTOR, ".swagger-ui .info .title").text)
    wait.until(
        lambda d: any(
            "/api/jobs/{job_id}/timeline" in e.text for e in d.find_elements(By.CSS_SELECTOR, ".opblock-summary")
        )
    )
