"""Model versions for the job scheduler (``dicom_node.jobs.identity.ModelVersions``), read from the model cards.

Lives with the composition roots, not in the jobs package: the jobs package never imports the detectors
(``dicom_node.models``); it is given a ``model_version(detector)`` callable by whoever builds the scheduler. The
registry reads only ``model_card.json``, never the detector code, so the node that schedules jobs never loads torch.
"""

from __future__ import annotations

from dicom_node.config import Settings
from dicom_node.jobs.identity import ModelVersions
from dicom_node.models import registry


def model_card_versions(settings: Settings) -> ModelVersions:
    """The version in each detector's model card: from the configured ``detectors.<name>.model_dir``, else the
    shipped weights (``registry.model_version``); what ``JobScheduler``, ``Sweeper`` and ``rerun_study`` are given."""

    def version(detector: str) -> str:
        model_dir = settings.detector(detector).model_dir
        return registry.model_version(detector, model_dir)

    return version
