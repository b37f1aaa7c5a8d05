"""A hostile modality: malformed, truncated and oversized instances get a failure status, are recorded with the
reason, and leave the node able to take the next good study, which completes once (PS3.4 B.2.3: never Success for
data the node cannot use)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import DICOM_DATA
from pydicom.dataset import FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE, _config
from receive_support import AE_TITLE, NodeProcess, wait_for
from sqlalchemy import func, select

from dicom_node.db import AuditEvent, Database, Instance, Job, Study, StudyState
from dicom_node.storage.spool import RejectedInstance, read_header

SIEMENS = DICOM_DATA / "mr_brain_t1_siemens"


@pytest.fixture
def siemens_slice() -> Path:
    path = SIEMENS / "00001.dcm"
    if not path.is_file():
        pytest.skip("shared DICOM data missing")
    return path


def _meta_and_body(path: Path) -> tuple[bytes, bytes]:
    """The preamble + File Meta Information, and the encoded data set, of a Part 10 file."""
    data = path.read_bytes()
    with path.open("rb") as fp:
        pydicom.filereader.read_preamble(fp, False)
        pydicom.filereader._read_file_meta_info(fp)
        start = fp.tell()
    return data[:start], data[start:]


def _element_offset(body: bytes, tag: tuple[int, int]) -> int:
    """Byte offset of a top-level explicit VR little endian element in ``body`` (first match of its tag)."""
    return body.index(struct.pack("<HH", *tag))


# --- the spool's reader alone ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [30_000, 60_000, 1_000, 5_000, 130_000, 194_000, -1])
def test_truncated_instance_is_refused_wherever_it_is_cut(tmp_path: Path, siemens_slice: Path, cut: int) -> None:
    data = siemens_slice.read_bytes()
    truncated = tmp_path / "cut.dcm"
    truncated.write_bytes(data[:cut])
    with pytest.raises(RejectedInstance) as refused:
        read_header(truncated)
    assert refused.value.status == 0xC210
    assert "truncated" in refused.value.reason or "missing" in refused.value.reason


def test_whole_instance_is_accepted(siemens_slice: Path) -> None:
    header = read_header(siemens_slice)
    assert header.rows == 256 and header.modality == "MR"


def test_length_past_the_end_of_a_private_element_is_refused(tmp_path: Path, siemens_slice: Path) -> None:
    meta, body = _meta_and_body(siemens_slice)
    at = _element_offset(body, (0x0029, 0x1010))  # Siemens CSA header, OB
    assert body[at + 4 : at + 6] == b"OB"
    forged = body[: at + 8] + struct.pack("<I", 0xFFFFFFF0) + body[at + 12 :]
    path = tmp_path / "forged.dcm"
    path.write_bytes(meta + forged)
    with pytest.raises(RejectedInstance, match="runs .* past the end"):
        read_header(path)


def test_image_cut_before_its_pixel_data_is_refused(tmp_path: Path, siemens_slice: Path) -> None:
    meta, body = _meta_and_body(siemens_slice)
    path = tmp_path / "no-pixels.dcm"
    path.write_bytes(meta + body[: _element_offset(body, (0x7FE0, 0x0010))])
    with pytest.raises(RejectedInstance, match="no Pixel Data"):
        read_header(path)


def _deflate_bomb(path: Path, source: Path, inflated_bytes: int) -> Path:
    """A Deflated Explicit VR LE file whose data set carries a private OB element of ``inflated_bytes`` zeros;
    written as a stream, so the test never holds it inflated either."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    before, after = pydicom.filebase.DicomBytesIO(), pydicom.filebase.DicomBytesIO()
    for encoded, elements in (
        (before, [e for e in ds if e.tag.group < 0x0009]),
        (after, [e for e in ds if e.tag.group > 0x0009 and e.tag.group != 0x0029]),  # no vendor private blocks
    ):
        encoded.is_little_endian, encoded.is_implicit_VR = True, False
        part = pydicom.dataset.Dataset()
        for element in elements:
            part.add(element)
        pydicom.filewriter.write_dataset(encoded, part)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta_bytes = pydicom.filebase.DicomBytesIO()
    pydicom.filewriter.write_file_meta_info(meta_bytes, meta, enforce_standard=True)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    with path.open("wb") as out:
        out.write(b"\0" * 128 + b"DICM" + meta_bytes.getvalue())
        out.write(deflater.compress(before.getvalue()))
        # (0009,0010) private creator, then (0009,1001) OB holding the zeros, in tag order.
        out.write(deflater.compress(struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", 4) + b"BOMB"))
        out.write(deflater.compress(struct.pack("<HH2sHI", 0x0009, 0x1001, b"OB", 0, inflated_bytes)))
        for _ in range(inflated_bytes >> 20):
            out.write(deflater.compress(zeros))
        out.write(deflater.compress(after.getvalue()))
        out.write(deflater.flush())
    return path


def test_deflate_bomb_is_refused_without_inflating_it_in_memory(tmp_path: Path, siemens_slice: Path) -> None:
    import tracemalloc

    bomb = _deflate_bomb(tmp_path / "bomb.dcm", siemens_slice, 300 << 20)
    assert bomb.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(RejectedInstance, match="inflates past the limit") as refused:
            read_header(bomb, max_inflated_bytes=256 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.status == 0xC210
    assert peak < 16 << 20  # a few buffers, never the inflated data set
    assert list(tmp_path.iterdir()) == [bomb]  # the temporary inflated copy is gone


def test_deflated_instance_within_the_limit_is_accepted(tmp_path: Path, siemens_slice: Path) -> None:
    small = _deflate_bomb(tmp_path / "small.dcm", siemens_slice, 1 << 20)
    assert read_header(small).modality == "MR"
    with pytest.raises(RejectedInstance, match="inflates past the limit"):
        read_header(small, max_inflated_bytes=512 << 10)


def _with_raw_uid(source: Path, path: Path, keyword: str, raw: bytes) -> Path:
    """``source`` with ``keyword`` encoded as exactly ``raw`` (pydicom would tidy a leading space away)."""
    padded = raw + b"\0" * (len(raw) % 2)
    placeholder = "1." + "7" * (len(padded) - 2)
    ds = pydicom.dcmread(source)
    setattr(ds, keyword, placeholder)
    ds.save_as(path, enforce_file_format=True)
    path.write_bytes(path.read_bytes().replace(placeholder.encode(), padded))
    return path


@pytest.mark.parametrize("uid", [b"1.02.003", b" 1.2.3", b"1.2..3", b"1.2.3a", b"1." + b"2" * 70])
def test_invalid_uid_is_refused(tmp_path: Path, siemens_slice: Path, uid: bytes) -> None:
    path = _with_raw_uid(siemens_slice, tmp_path / "bad-uid.dcm", "StudyInstanceUID", uid)
    with pytest.raises(RejectedInstance, match="StudyInstanceUID is not a valid UID"):
        read_header(path)


def test_uid_padding_is_normalised(tmp_path: Path, siemens_slice: Path) -> None:
    path = _with_raw_uid(siemens_slice, tmp_path / "padded.dcm", "StudyInstanceUID", b"1.2.3 ")
    assert read_header(path).study_instance_uid == "1.2.3"


# --- through the network, against a running node ------------------------------------------------------------------


def _renamed(source: Path, directory: Path, study_uid: str, series_uid: str) -> Path:
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = directory / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _hostile_files(directory: Path, source: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    meta, body = _meta_and_body(source)
    files: dict[str, Path] = {}
    for cut in (30_000, 60_000, 194_000):
        files[f"cut at {cut}"] = directory / f"cut{cut}.dcm"
        files[f"cut at {cut}"].write_bytes((meta + body)[:cut])
    at = _element_offset(body, (0x0029, 0x1010))
    files["OB length past the end"] = directory / "ob.dcm"
    files["OB length past the end"].write_bytes(meta + body[: at + 8] + struct.pack("<I", 0xFFFFFFF0) + body[at + 12 :])
    files["no pixel data"] = directory / "nopixels.dcm"
    files["no pixel data"].write_bytes(meta + body[: _element_offset(body, (0x7FE0, 0x0010))])
    files["garbage"] = directory / "garbage.dcm"
    files["garbage"].write_bytes(meta + bytes(range(256)) * 40)
    for name, uid in (("leading zero UID", b"1.02.003"), ("leading space UID", b" 1.2.826.0.1.3680043.2.1")):
        files[name] = _with_raw_uid(source, directory / f"{len(files)}.dcm", "SeriesInstanceUID", uid)
    files["deflate bomb"] = _deflate_bomb(directory / "bomb.dcm", source, 300 << 20)
    return files


@pytest.fixture
def node(tmp_path: Path, sqlite_url: str) -> Iterator[NodeProcess]:
    node = NodeProcess(tmp_path / "node", sqlite_url, {"completion": {"quiet_seconds": 2.0}}).start()
    yield node
    node.stop()


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_hostile_modality_gets_failure_statuses_and_a_good_study_completes_once(
    tmp_path: Path, sqlite_url: str, node: NodeProcess, siemens_slice: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Send each file's bytes as they are (pynetdicom would otherwise decode, and tidy, them first).
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    hostile = _hostile_files(tmp_path / "hostile", siemens_slice)
    study_uid, series_uid = generate_uid(), generate_uid()
    good = [_renamed(p, tmp_path, study_uid, series_uid) for p in sorted(SIEMENS.glob("*.dcm"))[:3]]
    ae = AE(ae_title="FUZZER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for syntax in (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):  # one context each: both accepted
        ae.add_requested_context(MRImageStorage, syntax)
    assert node.process is not None
    rss_before = _peak_rss_kib(node.process.pid)

    statuses: dict[str, int] = {}
    for name, path in hostile.items():
        assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
        assert assoc.is_established, name
        status = assoc.send_c_store(path)
        statuses[name] = int(status.Status) if "Status" in status else -1
        assoc.release()
    assert {name: s for name, s in statuses.items() if not 0xC000 <= s <= 0xCFFF} == {}, statuses
    assert node.alive()
    assert _peak_rss_kib(node.process.pid) - rss_before < 100 << 10  # the 300 MB bomb was never inflated in memory

    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    assert [int(assoc.send_c_store(p).Status) for p in good] == [0, 0, 0]
    assoc.release()

    db = Database(sqlite_url, upgrade=False)
    try:

        def complete() -> Study | None:
            with db.session() as session:
                study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
            return study if study is not None and study.state == StudyState.COMPLETE else None

        study = wait_for(complete, timeout=30)

        def jobs_created() -> int | None:
            with db.session() as session:
                return session.scalar(select(func.count(Job.id)).where(Job.study_id == study.id)) or None

        wait_for(jobs_created, timeout=30)
        with db.session() as session:
            refusals = session.scalars(select(AuditEvent.reason).where(AuditEvent.event == "instance_refused")).all()
            instances = session.scalar(select(func.count(Instance.id)))
            jobs = session.scalar(select(func.count(Job.id)).where(Job.study_id == study.id))
            studies = session.scalar(select(func.count(Study.id)))
        assert study.instance_count == 3 and study.completion_count == 1
        assert instances == 3 and studies == 1  # nothing of the refused instances was recorded
        assert jobs == 1
        assert len(refusals) == len(hostile)
        assert all(r.startswith("0xC210") for r in refusals)
        assert any("inflates past the limit" in r for r in refusals)
        assert any("truncated" in r for r in refusals)
        leftovers = list((node.data_dir / "spool" / ".incoming").iterdir())
        assert leftovers == []
        assert "PatientName" not in node.log()
    finally:
        db.dispose()
