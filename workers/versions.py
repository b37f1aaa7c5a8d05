"""Model versions for the job scheduler (``dicom_node.jobs.identity.ModelVersions``), read from the model cards.

Lives with the composition root, not in the jobs package: the jobs package never imports the detectors
(``dicom_node.models``), it is given a ``model_version(detector)`` callable by whoever builds the scheduler. Reads
only ``model_card.json``, never the detector code, so the node that schedules jobs never loads torch."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dicom_node.config import Settings
from dicom_node.jobs.identity import UNVERSIONED, ModelVersions

log = logging.getLogger(__name__)


def shipped_model_dir(detector: str) -> Path:
    """``models/weights/<detector>``, found without importing torch or the detector code."""
    import dicom_node.models

    return Path(dicom_node.models.__file__).resolve().parent / "weights" / detector


def model_version(settings: Settings, detector: str) -> str:
    """The ``version`` in the detector's model card (``model_card.json``); "unversioned" when there is none.

    Read from the configured ``detectors.<name>.model_dir`` or the shipped weights."""
    model_dir = settings.detector(detector).model_dir or shipped_model_dir(detector)
    card = Path(model_dir) / "model_card.json"
    try:
        version = json.loads(card.read_text(encoding="utf-8")).get("version")
    except FileNotFoundError:
        return UNVERSIONED
    except (OSError, ValueError, AttributeError) as err:
        log.warning("cannot read model card %s (%s); jobs are keyed as unversioned", card, err)
        return UNVERSIONED
    return str(version)[:64] if version else UNVERSIONED


def model_card_versions(settings: Settings) -> ModelVersions:
    """``model_version`` bound to ``settings``: what ``JobScheduler``, ``Sweeper`` and ``rerun_study`` are given."""

    def version(detector: str) -> str:
        return model_version(settings, detector)

    return version
