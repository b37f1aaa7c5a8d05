"""The identity of a result: which input and which model a job stands for.

``Job.result_key`` is the sha256 of (Study Instance UID, Series Instance UID, detector, model version, sorted SOP
Instance UIDs) and is unique: the same input never gets a second job, hence never a second result set. The model
version comes from outside the jobs package (``ModelVersions``, given to the scheduler by whoever builds it), so
scheduling never loads the detector code or torch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

# detector name → its model version ("unversioned" when the model says none); injected into ``JobScheduler``.
ModelVersions = Callable[[str], str]


def instance_set_hash(sop_instance_uids: Iterable[str]) -> str:
    """sha256 over the sorted SOP Instance UIDs: the same set in any order gives the same hash."""
    digest = hashlib.sha256()
    for uid in sorted(set(sop_instance_uids)):
        digest.update(uid.encode("ascii"))
        digest.update(b"\n")
    return digest.hexdigest()


def compute_result_key(
    study_instance_uid: str,
    series_instance_uid: str,
    detector: str,
    model_version: str,
    sop_instance_uids: Iterable[str],
) -> str:
    """The unique key of one result set: (study, series, detector, model version, instance set)."""
    digest = hashlib.sha256()
    for part in (study_instance_uid, series_instance_uid, detector, model_version):
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    digest.update(instance_set_hash(sop_instance_uids).encode("ascii"))
    return digest.hexdigest()
