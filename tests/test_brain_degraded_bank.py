"""Degraded copies of the training normals in the brain detector's SPADE bank (``extra["spade"]["degraded_copies"]``):
the bank holds the extra copies, the part fitted on the originals is the same as without them, and the default (no
copies) is today's bank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dicom_node.models.base import DetectorError
from dicom_node.models.brain_mri.detector import BrainMRIDetector
from dicom_node.models.methods.spade import spade_part
from dicom_node.models.neighbour_bank import NeighbourPatchBank
from dicom_node.models.training import new_detector

SIZE = 96


def _heads(count: int = 4) -> list[np.ndarray]:
    """Small textured ellipses ("heads") on black, of different sizes and aspects."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(count):
        rows, cols = 100 + 10 * i, 120 - 6 * i
        y, x = np.mgrid[:rows, :cols]
        inside = ((y - rows / 2) / (0.42 * rows)) ** 2 + ((x - cols / 2) / (0.4 * cols)) ** 2 < 1
        texture = 0.5 + 0.2 * np.sin(x / (3.0 + i)) * np.cos(y / 4.0) + 0.05 * rng.standard_normal((rows, cols))
        images.append(np.clip(np.where(inside, texture, 0.0), 0, 1).astype(np.float32))
    return images


def _fit(copies: list[str] | None, synthetic: int = 1) -> BrainMRIDetector:
    spade = {"synthetic_copies": synthetic, "degraded_copies": copies}
    detector = new_detector("brain_mri", "cpu", spade=spade, method="spade", image_size=SIZE, batch_size=4)
    assert isinstance(detector, BrainMRIDetector)
    detector.fit(iter(_heads()))
    return detector


def _bank(detector: BrainMRIDetector) -> NeighbourPatchBank | None:
    spade = spade_part(detector.method)
    return spade.bank if spade is not None else None


@pytest.fixture(scope="module")
def plain() -> BrainMRIDetector:
    return _fit(None)


def test_default_bank_holds_the_training_images_only(plain: BrainMRIDetector) -> None:
    assert plain.degraded_copy_settings == []
    assert _bank(plain) is not None and _bank(plain).image_count == 4
    assert "spade_bank" not in plain.config.extra
    assert plain.degraded_copies(_heads()[0]) == []


def test_bank_holds_the_degraded_copies_and_the_original_part_is_unchanged(plain: BrainMRIDetector) -> None:
    degraded = _fit(["res40", "xscale0.8", "xscale1.25"])
    bank, base = _bank(degraded), _bank(plain)
    assert bank is not None and base is not None and base.offsets is not None
    assert bank.patches is not None and base.patches is not None
    assert bank.descriptors is not None and base.descriptors is not None
    assert bank.projection is not None and base.projection is not None
    assert bank.image_count == 4 * 4  # each training image and its three copies
    assert degraded.config.extra["spade_bank"] == {"training_images": 4, "degraded_copies": 12}
    # The originals' part (projection, descriptor scale, patches, residual head) is fitted as without copies.
    originals = int(base.offsets[-1])
    assert torch.equal(bank.patches[:originals], base.patches)
    assert torch.equal(bank.descriptors[:4], base.descriptors)
    assert torch.equal(bank.projection, base.projection)
    assert bank.head is not None and base.head is not None
    assert torch.equal(bank.head.state("h.")["h.coef"], base.head.state("h.")["h.coef"])
    # The copies differ from the originals (softer, or another shape).
    assert bank.patches.shape[0] > originals
    assert not torch.equal(bank.descriptors[4:8], base.descriptors)


def test_a_copy_no_softer_than_the_original_is_left_out() -> None:
    detector = new_detector("brain_mri", "cpu", spade={"degraded_copies": ["res1000", "res40"]}, image_size=SIZE)
    assert isinstance(detector, BrainMRIDetector)
    copies = detector.degraded_copies(_heads()[0])
    assert len(copies) == 1 and copies[0].image.shape == (SIZE, SIZE)


def test_unknown_setting_is_refused() -> None:
    detector = new_detector("brain_mri", "cpu", spade={"degraded_copies": ["blur3"]}, image_size=SIZE)
    assert isinstance(detector, BrainMRIDetector)
    with pytest.raises(DetectorError, match="unknown degraded copy"):
        _ = detector.degraded_copy_settings
