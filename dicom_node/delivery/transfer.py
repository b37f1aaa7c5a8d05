"""What every transport and destination type shares: the file sent and the outcome of one attempt.

A leaf module (no networking, no pydicom) so that the transports (``scu``, ``stow``, ``commitment``, ``webhook``),
the destination types (``destinations``) and the pipeline can all use it without importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Outcomes after which a target holds the results: nothing more to send to it.
DONE = frozenset({"stored", "warning"})


@dataclass(frozen=True)
class SendOutcome:
    """Result of one attempt: ``outcome`` stored | warning | retry | failed, the worst DIMSE status, a reason."""

    outcome: str
    status: int | None
    detail: str


@dataclass(frozen=True)
class ResultFile:
    """A result object written as a DICOM file (PS3.10), with what its File Meta Information says: SOP Class and
    Instance UIDs (PS3.4 Annex B: what C-STORE presents and Storage Commitment names) and its transfer syntax. The
    pipeline knows these from the data set it has just written, so no transport reads the file back to learn them."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
