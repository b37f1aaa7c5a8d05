"""Open destinations: where the result objects go, as types registered by ``kind`` rather than an if-chain.

A destination type (``base.DestinationType``) sends result files and states its capabilities as data: the
configured ``kind`` it answers to, the configuration fields it ``requires``, and whether it ``supports_commitment``
(Storage Commitment, PS3.4 Annex J). The registry (``registry``) maps ``kind`` to the class; the configuration
validates ``destinations[].kind`` against it, and the pipeline opens each configured destination through it and
sends to every type the same way. Built in:

* ``dimse`` (``dimse.DimseDestination``): C-STORE (PS3.4 Annex B), with Storage Commitment Push Model (PS3.4
  Annex J) when the destination's profile asks for it;
* ``stow-rs`` (``stow_rs.StowRsDestination``): STOW-RS (PS3.18 10.5).

Adding a type is one class declared in one place: subclass ``DestinationType`` and declare it as an entry point of
the ``dicom_node.destinations`` group named by its kind (pyproject.toml for the built-in ones; another
distribution's metadata for a site's own), so every process of the node finds it.

The triage webhook is not a destination type; it stays a notifier (``dicom_node.delivery.webhook``), because:

* it receives an event (a JSON summary of one result: UIDs, scores, the finding; never patient data), not DICOM
  files: it has no profile of objects, no SOP classes or transfer syntaxes, nothing to commit, and a ``send(files)``
  would have to ignore its argument and reach for the event some other way;
* it is told only of abnormal results, while every destination receives every result (an SR for a normal one);
* it is configured apart (``webhooks:``, a URL and a timeout) with none of a destination's fields; folding it into
  ``destinations:`` would change the configuration for no gain.

What a webhook shares with the destinations (one attempt per delivery, retries with backoff, a DeliveryAttempt row
per attempt) lives in the pipeline's loop over targets, which takes both.
"""

from dicom_node.delivery.destinations.base import DestinationType
from dicom_node.delivery.destinations.registry import (
    destination_type,
    known_kinds,
    open_destination,
)

__all__ = [
    "DestinationType",
    "destination_type",
    "known_kinds",
    "open_destination",
]
