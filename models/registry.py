"""The detectors the product ships, by name."""

from __future__ import annotations

from models.base import DetectorRegistry


def default_registry() -> DetectorRegistry:
    """A registry with the shipped detectors. Imports are lazy so that loading one does not load the other."""
    registry = DetectorRegistry()
    # Each shipped detector registers its loader here, e.g.:
    #   registry.register("brain_mri", _load_brain_mri)
    return registry
