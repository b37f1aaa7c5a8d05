"""Many modalities at once: several receiving processes, one job database, nothing lost, each study once."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import DICOM_DATA
from pydicom import dcmread
from pydicom.uid import generate_uid
from receive_support import DICOM_NODE, NodeProcess, echoscu, storescu, wait_for
from sqlalchemy import select

from dicom_node.db import Database, Instance, Study, StudyState

pytestmark = pytest.mark.slow

SIEMENS = DICOM_DATA / "mr_brain_t1_siemens"
SENDERS = 10
PER_STUDY = 12


def _studies(out: Path, count: int, per_study: int) -> list[list[Path]]:
    """``count`` studies of ``per_study`` MR instances each, new UIDs (Siemens slices)."""
    if not SIEMENS.is_dir():
        pytest.skip("shared DICOM data missing")
    sources = sorted(SIEMENS.iterdir())
    studies = []
    for s in range(count):
        study_uid, series_uid = generate_uid(), generate_uid()
        folder = out / f"study{s:02d}"
        folder.mkdir(parents=True)
        files = []
        for i in range(per_study):
            ds = dcmread(sources[(s * per_study + i) % len(sources)])
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = i + 1
            ds.save_as(folder / f"{i:03d}.dcm", enforce_file_format=True)
            files.append(folder / f"{i:03d}.dcm")
        studies.append(files)
    return studies


def _receiver_pids(node: NodeProcess) -> list[int]:
    assert node.process is not None
    tasks = Path(f"/proc/{node.process.pid}/task")
    children = [pid for task in tasks.iterdir() for pid in _read(task / "children").split()]
    return [int(pid) for pid in children if "spawn_main" in _command(int(pid))]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:  # a thread that ended meanwhile
        return ""


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_concurrent_senders_lose_nothing_and_each_study_completes_once(tmp_path: Path, database_url: str) -> None:
    studies = _studies(tmp_path / "in", SENDERS, PER_STUDY)
    node = NodeProcess(tmp_path / "node", database_url, {"network": {"receive_processes": 3}}).start()
    db = Database(database_url, upgrade=False)
    try:
        with ThreadPoolExecutor(SENDERS) as pool:
            results = list(pool.map(lambda s: storescu(node.port, studies[s], calling=f"MOD{s:02d}"), range(SENDERS)))
        assert all(r.returncode == 0 for r in results), [r.stderr[-500:] for r in results if r.returncode]

        def all_complete() -> list[Study] | None:
            with db.session() as session:
                rows = list(session.execute(select(Study)).scalars())
            return rows if len(rows) == SENDERS and all(r.state == StudyState.COMPLETE for r in rows) else None

        rows = wait_for(all_complete, timeout=60)
        assert sorted(r.instance_count for r in rows) == [PER_STUDY] * SENDERS
        assert all(r.completion_count == 1 for r in rows)
        assert all(r.open_associations == 0 and r.interruption_reason is None for r in rows)
        with db.session() as session:
            paths = [Path(p) for p in session.execute(select(Instance.file_path)).scalars()]
        assert len(paths) == SENDERS * PER_STUDY
        assert all(p.is_file() for p in paths)  # every acknowledged instance is on disk
        assert len(_receiver_pids(node)) == 3
    finally:
        db.dispose()
        node.stop()


def test_a_receiving_process_that_dies_is_replaced(tmp_path: Path, sqlite_url: str) -> None:
    studies = _studies(tmp_path / "in", 2, 4)
    node = NodeProcess(tmp_path / "node", sqlite_url, {"network": {"receive_processes": 2}}).start()
    try:
        receivers = _receiver_pids(node)
        assert len(receivers) == 2
        os.kill(receivers[0], signal.SIGKILL)
        assert wait_for(lambda: "exited with -9; starting a new one" in node.log(), timeout=20)
        replaced = wait_for(
            lambda: (lambda pids: pids if len(pids) == 2 and receivers[0] not in pids else None)(_receiver_pids(node)),
            timeout=30,
        )
        assert receivers[1] in replaced
        for files in studies:  # whichever process takes the association
            assert storescu(node.port, files).returncode == 0
        assert echoscu(node.port).returncode == 0
        assert node.alive()
    finally:
        node.stop()
    # The replacement and the first receiver end with the node: none is left behind, handed to init.
    deadline = time.monotonic() + 15
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in replaced):
        assert time.monotonic() < deadline, f"receiving processes {replaced} outlived the stopped node"
        time.sleep(0.1)


def test_receivers_end_with_a_killed_node_and_free_the_port(tmp_path: Path, sqlite_url: str) -> None:
    node = NodeProcess(tmp_path / "node", sqlite_url, {"network": {"receive_processes": 2}}).start()
    receivers = _receiver_pids(node)
    assert len(receivers) == 2
    node.kill()
    deadline = time.monotonic() + 15
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in receivers):
        assert time.monotonic() < deadline, "receiving processes outlived the node"
        time.sleep(0.1)
    node.start()  # the same port again: nothing of the old node holds it
    try:
        assert echoscu(node.port).returncode == 0
    finally:
        node.stop()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "Z"


def test_port_in_use_is_one_clear_start_error(tmp_path: Path, sqlite_url: str) -> None:
    first = NodeProcess(tmp_path / "first", sqlite_url).start()
    try:
        second = NodeProcess(tmp_path / "second", f"sqlite:///{tmp_path / 'second.sqlite'}", port=first.port)
        second.write_config()
        result = subprocess.run(
            [str(DICOM_NODE), "serve", "--config", str(second.config_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 1
        assert f"could not listen on 127.0.0.1:{first.port}" in result.stderr
        assert echoscu(first.port).returncode == 0  # the running node is unaffected
    finally:
        first.stop()
