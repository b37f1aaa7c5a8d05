"""Study completion: when has a study arrived in full?

DICOM has no "end of study" message for C-STORE (PS3.4 B), so the node decides:

* quiet time: no instance of the study arrived for ``completion.quiet_seconds`` (the study's last arrival from
  any calling AE; the study row records the AE that started it);
* optional rules (``completion.rules``, first match on modality, calling AE, Study Description): the study
  completes once the expected series are in and it has been quiet for ``settle_seconds``, or at
  ``force_complete_seconds`` after its first instance; until then quiet time alone does not complete it (unless the
  rule has no force timeout).

The state lives in the job database, not in memory: the monitor claims a study with one conditional UPDATE
(state still ``receiving``, no instance arrived since it looked), routes its series (selection.py) and records the
reason in the same transaction, and calls ``on_study_complete(study_id)`` only after that commit. A node killed
and restarted picks up where it was and completes each study exactly once. Instances arriving after completion
re-open the study with ``needs_reprocessing``; it completes again (callbacks run again) after another quiet period.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from pydicom import dcmread
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from dicom_node.config import CompletionRule, CompletionSettings, SelectionRule
from dicom_node.db import Database, Instance, Series, Study, StudyState
from dicom_node.db.batch import with_retry
from dicom_node.studies.selection import SeriesAttributes, select_series
from dicom_node.timeutil import utc, utcnow

log = logging.getLogger(__name__)

StudyCompleteCallback = Callable[[int], None]


@dataclass(frozen=True)
class StudySnapshot:
    """What the completion rules look at for one study still receiving."""

    id: int
    first_received_at: datetime
    last_received_at: datetime
    instance_count: int
    modalities: tuple[str, ...] = ()
    calling_ae_title: str | None = None
    series_descriptions: tuple[str, ...] = ()
    study_description: str | None = None
    needs_reprocessing: bool = False
    interruption_reason: str | None = None  # an association delivering it ended abnormally (not resent since)


def matching_rule(study: StudySnapshot, rules: Sequence[CompletionRule]) -> CompletionRule | None:
    for rule in rules:
        if rule.modality and rule.modality.upper() not in {m.upper() for m in study.modalities}:
            continue
        if rule.calling_ae_title and rule.calling_ae_title != (study.calling_ae_title or ""):
            continue
        if rule.study_description_regex and not re.search(rule.study_description_regex, study.study_description or ""):
            continue
        return rule
    return None


def completion_reason(study: StudySnapshot, settings: CompletionSettings, now: datetime) -> str | None:
    """Why ``study`` is complete at ``now``, or None while it is not."""
    quiet_for = (now - utc(study.last_received_at)).total_seconds()
    age = (now - utc(study.first_received_at)).total_seconds()
    # After an abnormal end the sender is expected to send again: waiting only the quiet time would run a job on
    # the partial study and another on the resent one.
    interrupted = study.interruption_reason is not None
    grace = max(settings.quiet_seconds, settings.interrupted_grace_seconds)
    quiet_seconds = grace if interrupted else settings.quiet_seconds
    quiet = quiet_for >= quiet_seconds
    rule = matching_rule(study, settings.rules)
    reason: str | None = None
    if rule is None:
        if quiet:
            reason = f"quiet for {quiet_seconds:g} s"
    else:
        missing = [
            rx for rx in rule.expected_series_regex if not any(re.search(rx, d) for d in study.series_descriptions)
        ]
        enough = study.instance_count >= rule.min_instances
        settle = grace if interrupted else min(rule.settle_seconds, settings.quiet_seconds)
        if not missing and enough and quiet_for >= settle:
            reason = f"rule {rule.name}: expected series received"
        elif rule.force_complete_seconds is not None and age >= rule.force_complete_seconds:
            lacking = f"; missing {', '.join(missing)}" if missing else ""
            if not enough:
                lacking += f"; {study.instance_count} of {rule.min_instances} instances"
            reason = f"rule {rule.name}: forced after {rule.force_complete_seconds:g} s{lacking}"
        elif quiet and rule.force_complete_seconds is None:
            lacking = f" (rule {rule.name}: missing {', '.join(missing)})" if missing else f" (rule {rule.name})"
            reason = f"quiet for {quiet_seconds:g} s{lacking}"
    if reason and interrupted and "forced after" not in reason:
        reason = f"{reason} after an interrupted transfer ({study.interruption_reason}) that was not sent again"
    if reason and study.needs_reprocessing:
        reason = f"re-completed after late instances: {reason}"
    return reason


@dataclass
class CompletionMonitor:
    """Polls the job database for studies that became complete; one thread, started and stopped by the node."""

    db: Database
    settings: CompletionSettings
    selection_rules: Sequence[SelectionRule]
    on_study_complete: Sequence[StudyCompleteCallback] = ()
    enabled_detectors: Collection[str] | None = None
    clock: Callable[[], datetime] = utcnow
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="completion-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - the monitor must outlive a database hiccup
                log.exception("completion check failed; retrying in %.1f s", self.settings.check_interval_seconds)
            self._stop.wait(self.settings.check_interval_seconds)

    def run_once(self) -> list[int]:
        """Complete every study that is due now; returns their ids (callbacks already called)."""
        now = self.clock()
        completed = []
        for snapshot in self._receiving_studies():
            reason = completion_reason(snapshot, self.settings, now)
            if reason is None:
                continue
            if self._complete(snapshot, reason, now):
                completed.append(snapshot.id)
                self._notify(snapshot.id)
        return completed

    def _receiving_studies(self) -> list[StudySnapshot]:
        with self.db.session() as session:
            studies = session.execute(select(Study).where(Study.state == StudyState.RECEIVING)).scalars().all()
            snapshots = []
            for study in studies:
                descriptions: tuple[str, ...] = ()
                study_description = None
                if self.settings.rules:
                    descriptions = tuple(
                        d
                        for d in session.execute(
                            select(Series.series_description).where(Series.study_id == study.id)
                        ).scalars()
                        if d
                    )
                    if any(r.study_description_regex for r in self.settings.rules):
                        study_description = _study_description(session, study.id)
                snapshots.append(
                    StudySnapshot(
                        id=study.id,
                        first_received_at=study.first_received_at,
                        last_received_at=study.last_received_at,
                        instance_count=study.instance_count,
                        modalities=tuple(v for v in (study.modalities or "").split("\\") if v),
                        calling_ae_title=study.calling_ae_title,
                        series_descriptions=descriptions,
                        study_description=study_description,
                        needs_reprocessing=study.needs_reprocessing,
                        interruption_reason=(
                            (study.interruption_reason or "association ended abnormally")
                            if study.interrupted_at is not None
                            else None
                        ),
                    )
                )
            return snapshots

    def _complete(self, snapshot: StudySnapshot, reason: str, now: datetime) -> bool:
        def work(session: Session) -> bool:
            # The claim: only if nothing arrived since the snapshot (PostgreSQL re-checks after a row lock wait).
            claimed = session.execute(
                update(Study)
                .where(
                    Study.id == snapshot.id,
                    Study.state == StudyState.RECEIVING,
                    Study.instance_count == snapshot.instance_count,
                    Study.last_received_at == snapshot.last_received_at,
                )
                .values(
                    state=StudyState.COMPLETE,
                    completed_at=now,
                    completion_reason=reason,
                    completion_count=Study.completion_count + 1,
                )
            ).rowcount  # type: ignore[attr-defined]
            if not claimed:
                return False
            for series in session.execute(select(Series).where(Series.study_id == snapshot.id)).scalars():
                decision = select_series(
                    SeriesAttributes.from_series(series), self.selection_rules, self.enabled_detectors
                )
                series.detector = decision.detector
                series.routing_rule = decision.rule
                series.routing_reason = decision.reason
                series.routed_at = now
                log.info(
                    "series %s: %s (%s)",
                    series.series_instance_uid,
                    decision.detector or "ignored",
                    decision.reason,
                )
            return True

        done = with_retry(self.db, work)
        if done:
            log.info("study id %d complete: %s", snapshot.id, reason)
        return done

    def _notify(self, study_id: int) -> None:
        for callback in self.on_study_complete:
            try:
                callback(study_id)
            except Exception:  # noqa: BLE001 - one failing consumer must not stop the others
                log.exception("on_study_complete callback %r failed for study id %d", callback, study_id)


def _study_description(session: Session, study_id: int) -> str | None:
    path = session.execute(
        select(Instance.file_path).join(Series).where(Series.study_id == study_id).limit(1)
    ).scalar_one_or_none()
    if path is None:
        return None
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["StudyDescription"])
    except Exception:  # noqa: BLE001 - a rule on the description simply does not match
        return None
    value = ds.get("StudyDescription")
    return str(value) if value else None
