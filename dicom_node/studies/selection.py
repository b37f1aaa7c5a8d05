"""Series selection: which detector (if any) a received series goes to, and why.

Rules (``settings.selection.rules``, :class:`dicom_node.config.SelectionRule`) are tried in order; the first rule
whose conditions all hold decides. A rule with a ``detector`` routes the series there; a rule without one ignores
the series with its ``reason``. No matching rule: ignored, "no rule matched". Conditions look at the header
attributes recorded per series (PS3.3 C.7.3.1 General Series: Modality, Series Description, Body Part Examined;
C.7.6.1 General Image: Image Type; C.8.2.1 / C.8.11.1: View Position; SOP Class; instance count; Rows/Columns).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from dicom_node.config import SelectionRule
from dicom_node.db import Series

NO_RULE_MATCHED = "no rule matched"


@dataclass(frozen=True)
class SeriesAttributes:
    """What the selection rules may look at; built from a Series row or directly in tests."""

    modality: str | None = None
    body_part_examined: str | None = None
    series_description: str | None = None
    image_type: tuple[str, ...] = ()
    view_position: str | None = None
    sop_class_uid: str | None = None
    instance_count: int = 0
    rows: int | None = None
    columns: int | None = None

    @classmethod
    def from_series(cls, series: Series) -> SeriesAttributes:
        return cls(
            modality=series.modality,
            body_part_examined=series.body_part_examined,
            series_description=series.series_description,
            image_type=tuple(v for v in (series.image_type or "").split("\\") if v),
            view_position=series.view_position,
            sop_class_uid=series.sop_class_uid,
            instance_count=series.instance_count,
            rows=series.rows,
            columns=series.columns,
        )


@dataclass(frozen=True)
class RoutingDecision:
    detector: str | None  # None: ignored
    rule: str | None  # the rule that decided; None when no rule matched
    reason: str


def _in(value: str | None, allowed: Sequence[str]) -> bool:
    """Case-insensitive membership; an empty string in ``allowed`` matches a missing value."""
    normalised = (value or "").strip().upper()
    return normalised in {a.strip().upper() for a in allowed}


def rule_matches(rule: SelectionRule, series: SeriesAttributes) -> bool:
    image_type = {v.strip().upper() for v in series.image_type}
    description = series.series_description or ""
    checks = (
        not rule.modality or _in(series.modality, rule.modality),
        not rule.body_part_examined or _in(series.body_part_examined, rule.body_part_examined),
        not rule.view_position or _in(series.view_position, rule.view_position),
        not rule.sop_class_uid or (series.sop_class_uid or "") in rule.sop_class_uid,
        rule.series_description_regex is None or re.search(rule.series_description_regex, description) is not None,
        rule.series_description_excludes_regex is None
        or re.search(rule.series_description_excludes_regex, description) is None,
        all(v.upper() in image_type for v in rule.image_type_includes),
        not any(v.upper() in image_type for v in rule.image_type_excludes),
        series.instance_count >= rule.min_instances,
        rule.max_instances is None or series.instance_count <= rule.max_instances,
        (series.rows or 0) >= rule.min_rows,
        (series.columns or 0) >= rule.min_columns,
    )
    return all(checks)


def select_series(
    series: SeriesAttributes,
    rules: Sequence[SelectionRule],
    enabled_detectors: Collection[str] | None = None,
) -> RoutingDecision:
    """The first matching rule decides. A detector that is disabled in the configuration ignores the series."""
    for rule in rules:
        if not rule_matches(rule, series):
            continue
        if rule.detector is None:
            return RoutingDecision(None, rule.name, rule.reason or f"ignored by rule {rule.name}")
        if enabled_detectors is not None and rule.detector not in enabled_detectors:
            return RoutingDecision(None, rule.name, f"detector {rule.detector} is disabled")
        reason = rule.reason or f"rule {rule.name} matched"
        return RoutingDecision(rule.detector, rule.name, reason)
    return RoutingDecision(None, None, NO_RULE_MATCHED)
