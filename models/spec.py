"""What the node needs to know about a detector without loading it: the descriptor every detector package declares.

A detector is one package (``dicom_node.models.brain_mri``, a plugin's ``site_knee``...) whose ``SPEC`` is a
``DetectorSpec``, declared as an entry point of the ``dicom_node.detectors`` group (models/registry.py reads them).
This module imports nothing beyond the standard library: the node that receives studies, validates the
configuration, routes series and builds result objects reads specs and never imports torch or the detector code;
only ``loader`` (a lazily imported ``"module:function"``) does.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CARD_JSON = "model_card.json"
CARD_MARKDOWN = "MODEL_CARD.md"


@dataclass(frozen=True)
class SpecCode:
    """A coded concept (value, coding scheme designator, meaning), turned into a highdicom Code by the result
    builders (kept plain here so that specs need no DICOM library)."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class DetectorSpec:
    """One detector, as the rest of the node sees it.

    * ``name``: the detector's name in the configuration (``detectors.<name>``, ``selection.rules[].detector``), in
      job records and in the result objects' model identity.
    * ``loader``: ``"module:function"``, ``function(model_dir or None for the shipped weights, device)`` → a ready
      ``Detector``; imported only when a worker loads the detector.
    * ``queue``: the Celery queue its jobs go to (default: the name).
    * ``anatomy``: where the regions lie (SEG Anatomic Region Sequence, SR Finding Site); None: not stated.
    * ``procedure``: the SR's Procedure Reported (TID 1500); None: the generic "Diagnostic imaging study".
    * ``selection``: the default series-selection rules that route series to this detector, in order, as the
      fields of ``dicom_node.config.SelectionRule`` (exclusion rules with ``reason`` allowed); they take effect
      only while the configuration sets no ``selection.rules`` of its own.
    * ``weights``: the folder of the shipped weights and model card (``model_card.json``, ``MODEL_CARD.md``); None
      when the detector ships none and needs ``detectors.<name>.model_dir``.
    * ``detector_class`` / ``default_config``: ``"module:attribute"`` of the trainable class and its default
      configuration function, for ``dicom-node fit``; None when the detector cannot be fitted by the CLI.
    * ``region_rules``: how the result objects choose regions from its maps, as fields of
      ``dicom_node.models.regions.RegionRules`` that differ from the defaults (e.g. ``{"max_regions": 1}``).
    * ``unsized_long_side_mm``: how long the long side of one of its images is when the image states no pixel size
      (an image file in ``dicom-node evaluate``); None: 1 mm pixels. A radiograph: its detector, 430 mm, as the
      result builders assume for a DICOM radiograph without Pixel Spacing.
    """

    name: str
    loader: str
    anatomy: SpecCode | None = None
    procedure: SpecCode | None = None
    selection: tuple[Mapping[str, Any], ...] = ()
    weights: Path | None = None
    queue: str = ""
    description: str = ""
    detector_class: str | None = None
    default_config: str | None = None
    region_rules: Mapping[str, Any] = field(default_factory=dict)
    unsized_long_side_mm: float | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"detector name {self.name!r} is not an identifier")
        if ":" not in self.loader:
            raise ValueError(f"detector {self.name!r}: loader {self.loader!r} is not 'module:function'")
        if not self.queue:
            object.__setattr__(self, "queue", self.name)
        for rule in self.selection:
            if rule.get("detector") not in (None, self.name):
                raise ValueError(f"detector {self.name!r}: a default selection rule routes to {rule['detector']!r}")

    @property
    def model_card(self) -> Path | None:
        """The shipped model card (``MODEL_CARD.md``), None when the detector ships no weights."""
        return self.weights / CARD_MARKDOWN if self.weights is not None else None


def import_object(reference: str) -> Any:
    """The object a ``"module:attribute"`` (or ``"module:attribute.attribute"``) reference names."""
    module_name, _, attribute = reference.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target
