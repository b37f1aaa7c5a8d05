"""The ``stow-rs`` destination type: a DICOMweb origin server that receives STOW-RS (PS3.18 10.5 Store
Transaction) at ``{url}/studies``.

STOW-RS has no storage commitment of its own (the response says what was stored), so the type does not support
it. ``dicom_node.delivery.stow`` does the HTTP work; it is imported when sending, not with this module (the
configuration imports the registry of destination types to check ``kind``).
"""

from __future__ import annotations

from collections.abc import Sequence

from dicom_node.delivery.destinations.base import DestinationType
from dicom_node.delivery.transfer import ResultFile, SendOutcome


class StowRsDestination(DestinationType):
    """One multipart/related POST per attempt, with ``bearer_token`` when set; the HTTP timeout is the node's
    DIMSE timeout (the time one store operation may take, whatever carries it)."""

    kind = "stow-rs"
    requires = ("url",)

    def send(self, files: Sequence[ResultFile]) -> SendOutcome:
        from dicom_node.delivery.stow import stow_files

        return stow_files(self.config, [item.path for item in files], timeout=self.settings.network.dimse_timeout)
