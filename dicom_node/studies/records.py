"""Bookkeeping of received instances in the job database: one short transaction per instance.

Safe under concurrent associations: study and series rows are created with ``INSERT ... ON CONFLICT DO NOTHING``
(SQLite and PostgreSQL), so two associations delivering the first instances of one study never collide on the
unique UID; the study row is locked (PostgreSQL ``FOR UPDATE``; on SQLite the first statement is a write, which
takes the database write lock) before its state is read, so an instance racing the completion monitor is either
seen by it or re-opens the study as a late arrival.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar, cast

from sqlalchemy import Connection, Table, case, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicom_node.db import AuditEvent, Database, Instance, Series, Study, StudyState
from dicom_node.db.batch import Attempt, GroupCommit, with_retry
from dicom_node.db.models import utcnow
from dicom_node.storage.spool import StoredInstance

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Peer:
    """The remote end of an association; ``association`` names the association (unique while it lasts)."""

    calling_ae_title: str | None
    host: str | None
    association: str | None = None


@dataclass(frozen=True)
class Recorded:
    study_id: int
    duplicate: bool
    after_completion: bool


_STUDIES = cast(Table, Study.__table__)
_SERIES = cast(Table, Series.__table__)
_INSTANCES = cast(Table, Instance.__table__)


class InstanceRecorder:
    """Records received instances and association audit events in the job database.

    The hot path (one more instance of a series already known) is four prepared Core statements; the study and
    series ids are cached per series UID, which is safe because rows are never re-keyed.

    It also counts, per study, the associations delivering it that have not ended (``studies.open_associations``),
    and marks a study interrupted when one of them ends abnormally (:meth:`association_ended`) or was still open
    when the node stopped (:func:`recover_open_associations`). ``deadline_seconds`` bounds :meth:`record`'s
    retries; the database's own lock timeout should not exceed it."""

    def __init__(self, db: Database, cache_size: int = 4096, deadline_seconds: float | None = None) -> None:
        self.db = db
        self.deadline_seconds = deadline_seconds
        self._open: dict[str, set[int]] = {}  # per association: the studies it delivered (counted open)
        self._ids: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._image_types: dict[int, frozenset[str]] = {}  # per series id: Image Type values already recorded
        self._cache_size = cache_size
        self._lock = threading.Lock()
        dialect = db.engine.dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        self._insert_instance = insert(_INSTANCES).on_conflict_do_nothing(index_elements=["sop_instance_uid"])
        self._insert_study = insert(_STUDIES).on_conflict_do_nothing(index_elements=["study_instance_uid"])
        self._insert_series = insert(_SERIES).on_conflict_do_nothing(index_elements=["series_instance_uid"])
        self._commits = GroupCommit(db, deadline_seconds=deadline_seconds)

    def record(self, stored: StoredInstance, peer: Peer, now: datetime | None = None) -> Recorded:
        """Record one stored instance (its file already durable); returns once the row is committed, in a
        transaction shared with the instances other associations of this process delivered meanwhile."""

        def work(session: Session, attempt: Attempt) -> Recorded:
            recorded = self._record(session, stored, peer, now or utcnow())
            if peer.association is not None:
                # Count each (association, study) once, also when two of its instances share one transaction.
                counted: set[tuple[str, int]] = attempt.scratch.setdefault("counted", set())
                key = (peer.association, recorded.study_id)
                if key not in counted and not self._counted(*key):
                    counted.add(key)
                    session.execute(
                        update(_STUDIES)
                        .where(_STUDIES.c.id == recorded.study_id)
                        .values(open_associations=_STUDIES.c.open_associations + 1)
                    )
            return recorded

        try:
            recorded = self._commits.run(work)
        except IntegrityError:
            # A cached id whose row was deleted meanwhile (e.g. an admin purge): forget the cache, try once more.
            with self._lock:
                self._ids.clear()
                self._image_types.clear()
            recorded = self._commits.run(work)
        if peer.association is not None:
            with self._lock:
                self._open.setdefault(peer.association, set()).add(recorded.study_id)
        return recorded

    def close(self) -> None:
        """Commit what is queued and stop the committer thread."""
        self._commits.close()

    def _counted(self, association: str, study_id: int) -> bool:
        with self._lock:
            return study_id in self._open.get(association, ())

    def association_ended(self, association: str, reason: str | None, now: datetime | None = None) -> list[int]:
        """The association ended: normally (``reason`` None: an A-RELEASE), which clears an earlier interruption
        of its studies (the resend arrived in full), or abnormally with ``reason`` (A-ABORT, connection lost,
        node stopping), which marks them interrupted. Returns the ids of the studies it delivered."""
        with self._lock:
            studies = sorted(self._open.pop(association, ()))
        if not studies:
            return []
        when = now or utcnow()
        values = (
            {"interrupted_at": None, "interruption_reason": None}
            if reason is None
            else {"interrupted_at": when, "interruption_reason": reason}
        )

        def work(session: Session) -> None:
            session.execute(
                update(_STUDIES)
                .where(_STUDIES.c.id.in_(studies))
                .values(
                    open_associations=case(
                        (_STUDIES.c.open_associations > 0, _STUDIES.c.open_associations - 1), else_=0
                    ),
                    **values,
                )
            )

        with_retry(self.db, work)
        return studies

    def _cached(self, series_uid: str) -> tuple[int, int] | None:
        with self._lock:
            ids = self._ids.get(series_uid)
            if ids is not None:
                self._ids.move_to_end(series_uid)
            return ids

    def _remember(self, series_uid: str, ids: tuple[int, int]) -> None:
        with self._lock:
            self._ids[series_uid] = ids
            while len(self._ids) > self._cache_size:
                _, (_, series_id) = self._ids.popitem(last=False)
                self._image_types.pop(series_id, None)

    def _record(self, session: Session, stored: StoredInstance, peer: Peer, now: datetime) -> Recorded:
        h = stored.header
        conn = session.connection()
        ids = self._cached(h.series_instance_uid) or self._ensure_study_and_series(conn, stored, peer, now)
        study_id, series_id = ids
        # The first statement writes, so SQLite takes its write lock here (busy_timeout applies, no upgrade race).
        inserted = conn.execute(
            self._insert_instance,
            {
                "series_id": series_id,
                "sop_instance_uid": h.sop_instance_uid,
                "sop_class_uid": h.sop_class_uid,
                "transfer_syntax_uid": h.transfer_syntax_uid,
                "instance_number": h.instance_number,
                "file_path": str(stored.path),
                "size_bytes": stored.size_bytes,
                "calling_ae_title": peer.calling_ae_title,
                "peer_host": peer.host,
                "received_at": now,
                "times_received": 1,
                "after_completion": False,
            },
        ).rowcount
        state = conn.execute(select(_STUDIES.c.state).where(_STUDIES.c.id == study_id).with_for_update()).scalar_one()
        complete = StudyState(state) == StudyState.COMPLETE
        self._merge_image_type(conn, series_id, h.image_type)
        if not inserted:
            conn.execute(
                update(_INSTANCES)
                .where(_INSTANCES.c.sop_instance_uid == h.sop_instance_uid)
                .values(times_received=_INSTANCES.c.times_received + 1, last_duplicate_at=now)
            )
            if not complete:  # a re-send in progress still delays the quiet-time completion
                conn.execute(update(_STUDIES).where(_STUDIES.c.id == study_id).values(last_received_at=now))
            self._remember(h.series_instance_uid, ids)
            return Recorded(study_id, duplicate=True, after_completion=False)
        if complete:
            conn.execute(
                update(_INSTANCES)
                .where(_INSTANCES.c.sop_instance_uid == h.sop_instance_uid)
                .values(after_completion=True)
            )
        conn.execute(
            update(_SERIES).where(_SERIES.c.id == series_id).values(instance_count=_SERIES.c.instance_count + 1)
        )
        conn.execute(
            update(_STUDIES)
            .where(_STUDIES.c.id == study_id)
            .values(
                last_received_at=now,
                instance_count=_STUDIES.c.instance_count + 1,
                state=StudyState.RECEIVING,
                needs_reprocessing=True if complete else _STUDIES.c.needs_reprocessing,
            )
        )
        self._remember(h.series_instance_uid, ids)
        return Recorded(study_id, duplicate=False, after_completion=complete)

    def _merge_image_type(self, conn: Connection, series_id: int, image_type: str | None) -> None:
        """Keep the union of the Image Type values of a series' instances, so that a rule excluding e.g. LOCALIZER
        sees it whichever instance carries it."""
        values = [v for v in (image_type or "").split("\\") if v]
        with self._lock:
            known = self._image_types.get(series_id)
        if known is not None and known.issuperset(values):
            return
        current = conn.execute(select(_SERIES.c.image_type).where(_SERIES.c.id == series_id)).scalar_one()
        merged = [v for v in (current or "").split("\\") if v]
        merged += [v for v in values if v not in merged]
        text = "\\".join(merged)[:128] or None
        if text != current:
            conn.execute(update(_SERIES).where(_SERIES.c.id == series_id).values(image_type=text))
        with self._lock:
            self._image_types[series_id] = frozenset(merged)

    def _ensure_study_and_series(
        self, conn: Connection, stored: StoredInstance, peer: Peer, now: datetime
    ) -> tuple[int, int]:
        """Create the study and series rows if they are new (race-free: INSERT ... ON CONFLICT DO NOTHING)."""
        h = stored.header
        conn.execute(
            self._insert_study,
            {
                "study_instance_uid": h.study_instance_uid,
                "accession_number": (h.accession_number or "")[:16] or None,
                "modalities": h.modality,
                "calling_ae_title": peer.calling_ae_title,
                "state": StudyState.RECEIVING,
                "first_received_at": now,
                "last_received_at": now,
                "completion_count": 0,
                "needs_reprocessing": False,
                "instance_count": 0,
            },
        )
        study_id, modalities = conn.execute(
            select(_STUDIES.c.id, _STUDIES.c.modalities)
            .where(_STUDIES.c.study_instance_uid == h.study_instance_uid)
            .with_for_update()
        ).one()
        merged = _merge_modalities(modalities, h.modality)
        if merged != modalities:
            conn.execute(update(_STUDIES).where(_STUDIES.c.id == study_id).values(modalities=merged))
        conn.execute(
            self._insert_series,
            {
                "study_id": study_id,
                "series_instance_uid": h.series_instance_uid,
                "modality": h.modality,
                "series_number": h.series_number,
                "series_description": (h.series_description or "")[:64] or None,
                "body_part_examined": (h.body_part_examined or "")[:16] or None,
                "view_position": (h.view_position or "")[:16] or None,
                "image_type": (h.image_type or "")[:128] or None,
                "sop_class_uid": h.sop_class_uid,
                "rows": h.rows,
                "columns": h.columns,
                "instance_count": 0,
            },
        )
        series_id = conn.execute(
            select(_SERIES.c.id).where(_SERIES.c.series_instance_uid == h.series_instance_uid)
        ).scalar_one()
        return int(study_id), int(series_id)

    def audit(self, event: str, peer: Peer, called_ae_title: str | None, reason: str | None) -> None:
        deadline = None if self.deadline_seconds is None else time.monotonic() + self.deadline_seconds

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

        with_retry(self.db, work, deadline=deadline)


def _merge_modalities(current: str | None, modality: str | None) -> str | None:
    values = [v for v in (current or "").split("\\") if v]
    if modality and modality not in values:
        values.append(modality)
    merged = "\\".join(values)
    return merged[:64] or None


def recover_open_associations(db: Database, now: datetime | None = None) -> int:
    """At start-up: associations still counted open were cut by the node stopping (kill -9, power cut); their
    studies are interrupted. Returns how many studies."""
    when = now or utcnow()

    def work(session: Session) -> int:
        return int(
            session.execute(
                update(_STUDIES)
                .where(_STUDIES.c.open_associations > 0)
                .values(
                    open_associations=0,
                    interrupted_at=when,
                    interruption_reason="the node stopped while an association was delivering the study",
                )
            ).rowcount  # type: ignore[attr-defined]
        )

    count = with_retry(db, work)
    if count:
        log.warning("%d study(ies) were being received when the node stopped: marked interrupted", count)
    return count
