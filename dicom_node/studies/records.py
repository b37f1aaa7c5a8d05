"""Bookkeeping of received instances in the job database: one short transaction per instance.

Safe under concurrent associations: study and series rows are created with ``INSERT ... ON CONFLICT DO NOTHING``
(SQLite and PostgreSQL), so two associations delivering the first instances of one study never collide on the
unique UID; the study row is locked (PostgreSQL ``FOR UPDATE``; on SQLite the first statement is a write, which
takes the database write lock) before its state is read, so an instance racing the completion monitor is either
seen by it or re-opens the study as a late arrival.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import case, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from dicom_node.db import AuditEvent, Database, Instance, Series, Study, StudyState
from dicom_node.db.models import utcnow
from dicom_node.storage.spool import StoredInstance

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Peer:
    """The remote end of an association."""

    calling_ae_title: str | None
    host: str | None


@dataclass(frozen=True)
class Recorded:
    study_id: int
    instance_id: int
    duplicate: bool
    after_completion: bool


def _insert(session: Session, table: Any) -> Any:
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def with_retry(db: Database, work: Callable[[Session], T], attempts: int = 8) -> T:
    """Run ``work`` in a transaction, retrying when SQLite reports the database locked by another process."""
    delay = 0.05
    for attempt in range(attempts):
        try:
            with db.session() as session:
                return work(session)
        except OperationalError as err:
            if "locked" not in str(err).lower() or attempt == attempts - 1:
                raise
            log.warning("job database busy, retrying (%s)", type(err.orig).__name__)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
    raise AssertionError("unreachable")


class InstanceRecorder:
    """Records received instances and association audit events in the job database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def record(self, stored: StoredInstance, peer: Peer, now: datetime | None = None) -> Recorded:
        return with_retry(self.db, lambda session: self._record(session, stored, peer, now or utcnow()))

    def _record(self, session: Session, stored: StoredInstance, peer: Peer, now: datetime) -> Recorded:
        h = stored.header
        session.execute(
            _insert(session, Study.__table__)
            .values(
                study_instance_uid=h.study_instance_uid,
                accession_number=(h.accession_number or "")[:16] or None,
                modalities=h.modality,
                calling_ae_title=peer.calling_ae_title,
                state=StudyState.RECEIVING,
                first_received_at=now,
                last_received_at=now,
                completion_count=0,
                needs_reprocessing=False,
                instance_count=0,
            )
            .on_conflict_do_nothing(index_elements=["study_instance_uid"])
        )
        study_id, state, modalities = session.execute(
            select(Study.id, Study.state, Study.modalities)
            .where(Study.study_instance_uid == h.study_instance_uid)
            .with_for_update()
        ).one()
        complete = StudyState(state) == StudyState.COMPLETE

        session.execute(
            _insert(session, Series.__table__)
            .values(
                study_id=study_id,
                series_instance_uid=h.series_instance_uid,
                modality=h.modality,
                series_number=h.series_number,
                series_description=(h.series_description or "")[:64] or None,
                body_part_examined=(h.body_part_examined or "")[:16] or None,
                view_position=(h.view_position or "")[:16] or None,
                image_type=(h.image_type or "")[:128] or None,
                sop_class_uid=h.sop_class_uid,
                rows=h.rows,
                columns=h.columns,
                instance_count=0,
            )
            .on_conflict_do_nothing(index_elements=["series_instance_uid"])
        )
        series_id = session.execute(
            select(Series.id).where(Series.series_instance_uid == h.series_instance_uid)
        ).scalar_one()

        inserted = session.execute(
            _insert(session, Instance.__table__)
            .values(
                series_id=series_id,
                sop_instance_uid=h.sop_instance_uid,
                sop_class_uid=h.sop_class_uid,
                transfer_syntax_uid=h.transfer_syntax_uid,
                instance_number=h.instance_number,
                file_path=str(stored.path),
                size_bytes=stored.size_bytes,
                calling_ae_title=peer.calling_ae_title,
                peer_host=peer.host,
                received_at=now,
                times_received=1,
                after_completion=complete,
            )
            .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
        ).rowcount  # type: ignore[attr-defined]
        instance_id = session.execute(
            select(Instance.id).where(Instance.sop_instance_uid == h.sop_instance_uid)
        ).scalar_one()

        if not inserted:
            session.execute(
                update(Instance)
                .where(Instance.id == instance_id)
                .values(times_received=Instance.times_received + 1, last_duplicate_at=now)
            )
            if not complete:  # a re-send in progress still delays the quiet-time completion
                session.execute(update(Study).where(Study.id == study_id).values(last_received_at=now))
            return Recorded(study_id, instance_id, duplicate=True, after_completion=False)

        session.execute(
            update(Series).where(Series.id == series_id).values(instance_count=Series.instance_count + 1)
        )
        session.execute(
            update(Study)
            .where(Study.id == study_id)
            .values(
                last_received_at=now,
                instance_count=Study.instance_count + 1,
                modalities=_merge_modalities(modalities, h.modality),
                state=StudyState.RECEIVING,
                needs_reprocessing=case((Study.state == StudyState.COMPLETE, True), else_=Study.needs_reprocessing),
            )
        )
        return Recorded(study_id, instance_id, duplicate=False, after_completion=complete)

    def audit(self, event: str, peer: Peer, called_ae_title: str | None, reason: str | None) -> None:
        def work(session: Session) -> None:
            session.add(
                AuditEvent(
                    event=event,
                    calling_ae_title=(peer.calling_ae_title or "")[:16] or None,
                    called_ae_title=(called_ae_title or "")[:16] or None,
                    peer_host=(peer.host or "")[:64] or None,
                    reason=reason,
                )
            )

        with_retry(self.db, work)


def _merge_modalities(current: str | None, modality: str | None) -> str | None:
    values = [v for v in (current or "").split("\\") if v]
    if modality and modality not in values:
        values.append(modality)
    merged = "\\".join(values)
    return merged[:64] or None
