"""Urgency: which series go to the urgent lane (``workers.urgent_rules``) and the priorities of the two lanes."""

from __future__ import annotations

from collections.abc import Sequence

from dicom_node.config import Settings
from dicom_node.db import Series, Study

URGENT_PRIORITY = 0
NORMAL_PRIORITY = 5


def _matches(values: Sequence[str], actual: str | None) -> bool:
    return not values or (actual or "").upper() in {value.upper() for value in values}


def is_urgent(settings: Settings, study: Study, series: Series) -> bool:
    """Whether a triage rule (``workers.urgent_rules``) sends this series to the urgent lane."""
    return any(
        _matches(rule.calling_ae_title, study.calling_ae_title)
        and _matches(rule.modality, series.modality)
        and _matches(rule.detector, series.detector)
        for rule in settings.workers.urgent_rules
    )
