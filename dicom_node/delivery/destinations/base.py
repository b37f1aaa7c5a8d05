"""The destination interface: what the pipeline may ask of any destination type, and what each type declares.

A type states its capabilities as class data, read by the configuration and the pipeline instead of asking which
kind a destination is:

* ``kind``: the name ``destinations[].kind`` gives in the configuration (the registry's key);
* ``requires``: the ``Destination`` fields a destination of this type cannot do without (the configuration refuses
  one that lacks any of them, naming them);
* ``supports_commitment``: whether the type can ask the receiver to take responsibility for what it stored
  (Storage Commitment, PS3.4 Annex J); the pipeline asks for it, after each successful ``send``, only of a type
  that supports it and whose profile sets ``storage_commitment``.

An instance is one configured destination, opened for one delivery: it holds its ``Destination`` entry and the
node's settings (its AE title, its network timeouts) and sends the files it is given; retries, backoff and the
record of attempts belong to the pipeline, which treats every type alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from dicom_node.config import Destination, Settings
from dicom_node.delivery.transfer import ResultFile, SendOutcome


class DestinationType(ABC):
    """A kind of destination for the result objects. Subclass it, set ``kind`` (and ``requires``,
    ``supports_commitment`` as they apply), implement ``send`` (and ``commit``), and declare the class as an entry
    point of the ``dicom_node.destinations`` group named by its kind (``dicom_node.delivery.destinations.registry``)."""

    kind: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    supports_commitment: ClassVar[bool] = False

    def __init__(self, config: Destination, settings: Settings) -> None:
        self.config = config
        self.settings = settings

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def commits(self) -> bool:
        """Whether each successful ``send`` is followed by ``commit``: the type can, and the profile asks for it."""
        return self.supports_commitment and self.config.profile.storage_commitment

    @abstractmethod
    def send(self, files: Sequence[ResultFile]) -> SendOutcome:
        """One delivery attempt of ``files``, classified: stored | warning (the receiver holds them), retry (try
        again after the backoff) or failed (it refuses them for good; retrying would repeat the refusal)."""

    def commit(self, files: Sequence[ResultFile]) -> SendOutcome:
        """Ask the receiver to commit to keeping ``files``, just stored (types with ``supports_commitment``)."""
        raise NotImplementedError(f"a {self.kind} destination does not support storage commitment")
