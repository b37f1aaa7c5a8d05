"""Selection and completion rules without the network; bookkeeping and the completion monitor on both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import DICOM_DATA
from pydicom.data import get_testdata_file
from sqlalchemy import select

from dicom_node.config import CompletionRule, CompletionSettings, SelectionRule, Settings, load_settings
from dicom_node.db import Database, Instance, Series, Study, StudyState
from dicom_node.storage.spool import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    InstanceHeader,
    RejectedInstance,
    Spool,
    StoredInstance,
    read_header,
)
from dicom_node.studies.completion import CompletionMonitor, StudySnapshot, completion_reason
from dicom_node.studies.records import InstanceRecorder, Peer
from dicom_node.studies.selection import NO_RULE_MATCHED, SeriesAttributes, select_series

RULES = Settings().selection.rules
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def attributes(path: Path, count: int = 1) -> SeriesAttributes:
    h = read_header(path)
    return SeriesAttributes(
        modality=h.modality,
        body_part_examined=h.body_part_examined,
        series_description=h.series_description,
        image_type=tuple((h.image_type or "").split("\\")),
        view_position=h.view_position,
        sop_class_uid=h.sop_class_uid,
        instance_count=count,
        rows=h.rows,
        columns=h.columns,
    )


@pytest.fixture
def real() -> Path:
    if not DICOM_DATA.is_dir():
        pytest.skip("shared DICOM data missing")
    return DICOM_DATA


def test_defaults_route_the_real_series(real: Path) -> None:
    siemens = attributes(real / "mr_brain_t1_siemens" / "00001.dcm", 176)
    assert select_series(siemens, RULES).detector == "brain_mri"
    chest = select_series(attributes(real / "cr" / "pydicom-data_RG1_J2KI_CR_chest.dcm"), RULES)
    assert (chest.detector, chest.rule) == ("chest_xray", "frontal-chest")
    extremity = select_series(attributes(real / "cr" / "pydicom-data_RG3_J2KR_CR_extremity.dcm"), RULES)
    assert (extremity.detector, extremity.reason) == (None, "not a chest study")


def test_localizer_lateral_derived_and_unmatched_are_ignored_with_reasons() -> None:
    localizer = SeriesAttributes(modality="MR", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), instance_count=3)
    assert select_series(localizer, RULES).reason == "localizer"
    scout = SeriesAttributes(modality="MR", series_description="AAHead_Scout_64ch", instance_count=3)
    assert select_series(scout, RULES).reason == "localizer"
    derived = SeriesAttributes(modality="MR", image_type=("DERIVED", "SECONDARY"), instance_count=3)
    assert select_series(derived, RULES).reason == "derived or secondary image"
    lateral = SeriesAttributes(modality="DX", body_part_examined="CHEST", view_position="LL", instance_count=1)
    assert select_series(lateral, RULES).reason == "lateral view"
    ap = SeriesAttributes(modality="dx", body_part_examined="chest", view_position="AP", instance_count=1)
    assert select_series(ap, RULES).detector == "chest_xray"
    knee_mr = SeriesAttributes(modality="MR", body_part_examined="KNEE", instance_count=30)
    assert select_series(knee_mr, RULES).reason == NO_RULE_MATCHED
    ct = SeriesAttributes(modality="CT", instance_count=30)
    assert select_series(ct, RULES).rule is None


def test_custom_rules_from_yaml_first_match_wins_and_disabled_detectors(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "selection:\n  rules:\n"
        "    - {name: small, reason: too few slices, modality: [MR], max_instances: 9}\n"
        "    - {name: t1, detector: brain_mri, modality: [MR], series_description_regex: '(?i)t1', min_rows: 128}\n"
    )
    rules = load_settings(config).selection.rules
    t1 = SeriesAttributes(modality="MR", series_description="T1 MPRAGE", instance_count=100, rows=256, columns=256)
    assert select_series(t1, rules).detector == "brain_mri"
    assert select_series(SeriesAttributes(modality="MR", series_description="T1", instance_count=5), rules).reason == (
        "too few slices"
    )
    assert select_series(SeriesAttributes(modality="MR", series_description="T2", instance_count=50), rules).reason == (
        NO_RULE_MATCHED
    )
    disabled = select_series(t1, rules, enabled_detectors=["chest_xray"])
    assert (disabled.detector, disabled.reason) == (None, "detector brain_mri is disabled")


def snapshot(**overrides: object) -> StudySnapshot:
    values: dict[str, object] = {
        "id": 1,
        "first_received_at": T0,
        "last_received_at": T0,
        "instance_count": 10,
        "modalities": ("MR",),
        "series_descriptions": ("t1_mprage",),
    }
    values.update(overrides)
    return StudySnapshot(**values)  # type: ignore[arg-type]


def test_quiet_time_completion() -> None:
    settings = CompletionSettings(quiet_seconds=30)
    assert completion_reason(snapshot(), settings, T0 + timedelta(seconds=29)) is None
    assert completion_reason(snapshot(), settings, T0 + timedelta(seconds=30)) == "quiet for 30 s"
    late = snapshot(needs_reprocessing=True)
    assert completion_reason(late, settings, T0 + timedelta(seconds=31)) == (
        "re-completed after late instances: quiet for 30 s"
    )


def test_expected_series_rule_and_force_timeout() -> None:
    rule = CompletionRule(
        name="brain",
        modality="MR",
        expected_series_regex=["(?i)t1", "(?i)flair"],
        force_complete_seconds=600,
        settle_seconds=5,
    )
    settings = CompletionSettings(quiet_seconds=30, rules=[rule])
    only_t1 = snapshot()
    # Quiet time alone does not complete a study whose rule still expects a series...
    assert completion_reason(only_t1, settings, T0 + timedelta(seconds=300)) is None
    # ...the force timeout does, and says what was missing.
    assert completion_reason(only_t1, settings, T0 + timedelta(seconds=600)) == (
        "rule brain: forced after 600 s; missing (?i)flair"
    )
    both = snapshot(series_descriptions=("t1_mprage", "FLAIR_ax"))
    assert completion_reason(both, settings, T0 + timedelta(seconds=4)) is None
    assert completion_reason(both, settings, T0 + timedelta(seconds=5)) == "rule brain: expected series received"
    # Rules select studies: a CR study falls back to quiet time.
    cr = snapshot(modalities=("CR",), series_descriptions=())
    assert completion_reason(cr, settings, T0 + timedelta(seconds=30)) == "quiet for 30 s"
    no_force = CompletionSettings(quiet_seconds=30, rules=[rule.model_copy(update={"force_complete_seconds": None})])
    assert completion_reason(only_t1, no_force, T0 + timedelta(seconds=30)) == (
        "quiet for 30 s (rule brain: missing (?i)flair)"
    )
    by_ae = CompletionSettings(
        quiet_seconds=30, rules=[CompletionRule(name="ct01", calling_ae_title="CT01", min_instances=100)]
    )
    assert completion_reason(snapshot(calling_ae_title="CT01"), by_ae, T0 + timedelta(seconds=30)) == (
        "quiet for 30 s (rule ct01)"
    )


def _header(study: str, series: str, sop: str, description: str = "t1_mprage") -> InstanceHeader:
    return InstanceHeader(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        sop_instance_uid=sop,
        study_instance_uid=study,
        series_instance_uid=series,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="MR",
        series_description=description,
        image_type="ORIGINAL\\PRIMARY\\M",
        rows=256,
        columns=256,
    )


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def test_monitor_completes_once_and_recompletes_after_late_instances(database: Database) -> None:
    recorder = InstanceRecorder(database)
    clock = Clock()
    seen: list[tuple[int, StudyState, bool]] = []

    def callback(study_id: int) -> None:
        # Called after the commit: the completion is visible to another session.
        with database.session() as session:
            study = session.get(Study, study_id)
            assert study is not None
            seen.append((study_id, study.state, study.needs_reprocessing))

    monitor = CompletionMonitor(
        database, CompletionSettings(quiet_seconds=10), RULES, on_study_complete=[callback], clock=clock
    )
    peer = Peer("MRI", "127.0.0.1")
    for i in range(3):
        stored = StoredInstance(_header("1.2.3", "1.2.3.1", f"1.2.3.1.{i}"), Path(f"/x/{i}.dcm"), 100, False)
        recorder.record(stored, peer, now=clock.now)
    duplicate = recorder.record(
        StoredInstance(_header("1.2.3", "1.2.3.1", "1.2.3.1.0"), Path("/x/0.dcm"), 100, True), peer, now=clock.now
    )
    assert duplicate.duplicate
    clock.now = T0 + timedelta(seconds=9)
    assert monitor.run_once() == []
    clock.now = T0 + timedelta(seconds=10)
    [study_id] = monitor.run_once()
    assert monitor.run_once() == []  # exactly once
    assert seen == [(study_id, StudyState.COMPLETE, False)]
    with database.session() as session:
        series = session.execute(select(Series)).scalar_one()
        assert (series.detector, series.instance_count) == ("brain_mri", 3)
        assert session.get(Study, study_id).completion_reason == "quiet for 10 s"  # type: ignore[union-attr]

    clock.now = T0 + timedelta(seconds=100)
    late = recorder.record(
        StoredInstance(_header("1.2.3", "1.2.3.2", "1.2.3.2.0", "localizer"), Path("/x/l.dcm"), 100, False),
        peer,
        now=clock.now,
    )
    assert late.after_completion
    assert monitor.run_once() == []
    clock.now = T0 + timedelta(seconds=110)
    assert monitor.run_once() == [study_id]
    assert seen[-1] == (study_id, StudyState.COMPLETE, True)
    with database.session() as session:
        study = session.get(Study, study_id)
        assert study is not None and study.completion_count == 2 and study.instance_count == 4
        localizer = session.execute(select(Series).where(Series.series_instance_uid == "1.2.3.2")).scalar_one()
        assert (localizer.detector, localizer.routing_reason) == (None, "localizer")
        assert session.execute(select(Instance).where(Instance.after_completion)).scalar_one().sop_instance_uid == (
            "1.2.3.2.0"
        )


def test_spool_refuses_truncated_unparseable_and_full_disk(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    spool.prepare()
    with pytest.raises(RejectedInstance) as err:
        spool.store(Path(str(get_testdata_file("MR_truncated.dcm"))))
    assert err.value.status == STATUS_CANNOT_UNDERSTAND
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + b"\x13\x37" * 500)
    with pytest.raises(RejectedInstance) as err:
        spool.store(garbage)
    assert err.value.status == STATUS_CANNOT_UNDERSTAND
    # An encapsulated (RLE) data set cut inside its fragments.
    rle = Path(str(get_testdata_file("MR_small_RLE.dcm"))).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(rle[: len(rle) - 100])
    with pytest.raises(RejectedInstance):
        spool.store(cut)
    stored = spool.store(Path(str(get_testdata_file("MR_small_RLE.dcm"))))
    assert stored.path.read_bytes() == rle and not stored.already_on_disk
    assert spool.store(Path(str(get_testdata_file("MR_small_RLE.dcm")))).already_on_disk
    full = Spool(tmp_path / "spool", min_free_bytes=2**62)
    with pytest.raises(RejectedInstance) as err:
        full.store(Path(str(get_testdata_file("MR_small_RLE.dcm"))))
    assert err.value.status == STATUS_OUT_OF_RESOURCES


def test_selection_rule_rejects_bad_regex() -> None:
    with pytest.raises(ValueError):
        SelectionRule(name="bad", series_description_regex="(")


def test_series_image_type_is_the_union_over_its_instances(database: Database) -> None:
    from dataclasses import replace

    recorder = InstanceRecorder(database)
    peer = Peer("MRI", None)
    first = replace(_header("7.7", "7.7.1", "7.7.1.1"), image_type="ORIGINAL\\PRIMARY\\M")
    scout = replace(_header("7.7", "7.7.1", "7.7.1.2"), image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    for header in (first, scout, first):
        recorder.record(StoredInstance(header, Path("/x"), 1, False), peer)
    with database.session() as session:
        series = session.execute(select(Series).where(Series.series_instance_uid == "7.7.1")).scalar_one()
        assert series.image_type == "ORIGINAL\\PRIMARY\\M\\LOCALIZER"
        assert select_series(SeriesAttributes.from_series(series), RULES).reason == "localizer"
