"""The ``dimse`` destination type: a DICOM AE that receives C-STORE (PS3.4 Annex B Storage Service Class, PS3.7
9.1.1), with Storage Commitment Push Model (PS3.4 Annex J) as its capability.

The protocol work is in ``dicom_node.delivery.scu`` and ``dicom_node.delivery.commitment``; they are imported when
a destination sends, not when this module is imported: the configuration imports the registry of destination types
to check ``kind``, and every command that loads the configuration would otherwise pay for pynetdicom and pydicom.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from dicom_node.delivery.destinations.base import DestinationType
from dicom_node.delivery.transfer import ResultFile, SendOutcome

if TYPE_CHECKING:
    from dicom_node.delivery.scu import ScuTimeouts


class DimseDestination(DestinationType):
    """C-STORE SCU to ``ae_title``@``host``:``port``: one association per attempt (``scu.store_files``); with
    ``profile.storage_commitment``, an N-ACTION asking to commit what was stored (``commitment.request_commitment``)."""

    kind = "dimse"
    requires = ("ae_title", "host", "port")
    supports_commitment = True

    def _timeouts(self) -> ScuTimeouts:
        from dicom_node.delivery.scu import ScuTimeouts

        network = self.settings.network
        return ScuTimeouts(network.acse_timeout, network.dimse_timeout, network.network_timeout)

    def send(self, files: Sequence[ResultFile]) -> SendOutcome:
        from dicom_node.delivery.scu import store_files

        return store_files(self.config, files, calling_ae=self.settings.node.ae_title, timeouts=self._timeouts())

    def commit(self, files: Sequence[ResultFile]) -> SendOutcome:
        from dicom_node.delivery.commitment import Reference, request_commitment

        # PS3.4 J.3.2.1: the request names each SOP Class and Instance UID stored; our files carry them already.
        references = [Reference(item.sop_class_uid, item.sop_instance_uid) for item in files]
        return request_commitment(
            self.config, references, calling_ae=self.settings.node.ae_title, timeouts=self._timeouts()
        )
