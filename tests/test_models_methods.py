"""The scoring methods behind one interface (models.methods, issue 24): the detectors compose a method from their
``methods`` table, the CLI offers exactly the installed ones, calibration is a step that returns its statistics."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_node.cli.detectors import METHOD_CHOICES
from dicom_node.models.base import DetectorError
from dicom_node.models.brain_mri.detector import BrainMRIDetector
from dicom_node.models.brain_mri.detector import default_config as brain_config
from dicom_node.models.chest_xray.detector import ChestXrayDetector
from dicom_node.models.chest_xray.detector import default_config as chest_config
from dicom_node.models.config import Prepared
from dicom_node.models.methods.base import Calibration, ScoringMethod, z_sum
from dicom_node.models.methods.padim import PadimMethod
from dicom_node.models.methods.spade_segmenter import MAP_SCALE, SpadeSegmenterMethod
from dicom_node.models.preprocessing import square_crop_box


def test_fit_offers_the_methods_of_the_installed_detectors() -> None:
    installed = set(BrainMRIDetector.methods) | set(ChestXrayDetector.methods)
    assert set(METHOD_CHOICES) == installed == {"spade", "segmenter", "spade+segmenter", "padim"}


def test_detectors_compose_the_method_their_config_names() -> None:
    brain = BrainMRIDetector(brain_config())
    assert isinstance(brain.method, SpadeSegmenterMethod) and isinstance(brain.method, ScoringMethod)
    chest = ChestXrayDetector(chest_config())
    assert isinstance(chest.method, PadimMethod) and chest.padim is chest.method and chest.atlas is not None
    config = brain_config()
    config.method = "padim"  # a method of another detector
    with pytest.raises(DetectorError, match="unknown method 'padim'"):
        BrainMRIDetector(config)


def test_z_sum_is_the_component_alone_or_the_sum_of_z_scores() -> None:
    one = {"a": np.array([1.0, 2.0])}
    assert z_sum(one, {}) is one["a"]
    two = {"a": np.array([1.0, 3.0]), "b": np.array([10.0, 10.0])}
    np.testing.assert_allclose(z_sum(two, {"a": [1.0, 2.0], "b": [0.0, 5.0]}), [2.0, 3.0])
    np.testing.assert_allclose(z_sum(two, {"a": [1.0, 2.0], "b": [0.0, 5.0]}, {"b": 0.0}), [0.0, 1.0])


def test_calibrating_the_fused_method_returns_the_map_scale_and_writes_nothing() -> None:
    """The fused method's SPADE map scale comes back in the calibration's statistics; the config is not touched
    until the detector records them (no scoring mode that writes state)."""
    detector = BrainMRIDetector(brain_config())
    method = detector.method
    assert isinstance(method, SpadeSegmenterMethod)
    size = detector.config.image_size
    mask = np.zeros((size, size), dtype=bool)
    mask[40:200, 50:210] = True
    prepared = [Prepared(image=mask * 0.5, mask=mask, box=square_crop_box(mask)) for _ in range(3)]
    spade_maps = np.stack([np.where(mask, 1.0 + i, 0.0) for i in range(3)]).astype(np.float32)
    probability = np.zeros_like(spade_maps)
    method._parts = lambda _: (spade_maps, probability, np.stack([mask] * 3))  # type: ignore[method-assign]
    found = method.calibrate(prepared, 0.95)
    assert isinstance(found, Calibration) and MAP_SCALE not in detector.config.score_stats
    mean, std = found.statistics[MAP_SCALE]
    assert mean == pytest.approx(2.0) and std == pytest.approx(np.sqrt(2 / 3))
    assert list(found.statistics) == [MAP_SCALE, "fused"] and found.scores.shape == (3,)
    with pytest.raises(DetectorError, match="calibrat"):
        method.score(prepared)
    detector.config.score_stats.update(found.statistics)
    np.testing.assert_array_equal(method.score(prepared).components["fused"], found.scores)
