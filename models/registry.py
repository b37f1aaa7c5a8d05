"""The detectors the product ships, by name."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.models.base import Detector, DetectorError, DetectorRegistry

if TYPE_CHECKING:
    from dicom_node.models.image_detector import DetectorConfig, ImageAnomalyDetector

# name -> (module, detector class, default-config function). Imported lazily: loading one detector does not import
# the others (or torch, until a detector is used).
DETECTOR_CLASSES: dict[str, tuple[str, str, str]] = {
    "brain_mri": ("dicom_node.models.brain", "BrainMRIDetector", "default_config"),
    "chest_xray": ("dicom_node.models.chest", "ChestXrayDetector", "default_config"),
}


def _load_brain_mri(model_dir: Path | None, device: str) -> Detector:
    from dicom_node.models.brain import load_brain_mri

    return load_brain_mri(model_dir, device)


def _load_chest_xray(model_dir: Path | None, device: str) -> Detector:
    from dicom_node.models.chest import load_chest_xray

    return load_chest_xray(model_dir, device)


def default_registry() -> DetectorRegistry:
    """A registry with the shipped detectors. Imports are lazy so that loading one does not load the other."""
    registry = DetectorRegistry()
    registry.register("brain_mri", _load_brain_mri)
    registry.register("chest_xray", _load_chest_xray)
    return registry


def detector_class(name: str) -> tuple[type[ImageAnomalyDetector], DetectorConfig]:
    """The trainable class of a detector and its default (unfitted) configuration, for `dicom-node fit`."""
    try:
        module_name, class_name, config_fn = DETECTOR_CLASSES[name]
    except KeyError:
        raise DetectorError(f"unknown detector {name!r}; known: {', '.join(sorted(DETECTOR_CLASSES))}") from None
    module = importlib.import_module(module_name)
    return getattr(module, class_name), getattr(module, config_fn)()
