"""Synthetic lesions (models.synthetic): inside the head, local, reproducible, every kind drawn, the faint kind
only when asked for."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dicom_node.models.synthetic import ALL_KINDS, FAINT, KINDS, MODERATE, synthetic_lesion


def _head(size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    mask = (yy - size / 2) ** 2 / 50**2 + (xx - size / 2) ** 2 / 40**2 < 1
    image = np.where(mask, 0.25 + 0.05 * np.sin(xx / 5.0), 0.0).astype(np.float32)
    return image, mask


def test_lesion_is_inside_the_head_and_changes_only_its_surroundings() -> None:
    image, mask = _head()
    donor = np.random.default_rng(99).random(image.shape).astype(np.float32)
    for seed in range(12):
        made = synthetic_lesion(image, mask, donor, np.random.default_rng(seed))
        assert made is not None
        painted, lesion = made
        assert painted.shape == image.shape and painted.dtype == np.float32
        assert painted.min() >= 0.0 and painted.max() <= 1.0
        assert lesion.any() and not (lesion & ~mask).any()
        # Far from the lesion only the tail of the mass effect (sub-pixel shifts) may reach.
        far = ~ndimage.binary_dilation(lesion, iterations=45)
        np.testing.assert_allclose(painted[far], image[far], atol=0.03)
        assert np.abs(painted[lesion] - image[lesion]).mean() > 0.02


def test_same_seed_same_lesion_and_no_lesion_without_a_head() -> None:
    image, mask = _head()
    a = synthetic_lesion(image, mask, image, np.random.default_rng(3))
    b = synthetic_lesion(image, mask, image, np.random.default_rng(3))
    assert a is not None and b is not None
    np.testing.assert_array_equal(a[0], b[0])
    empty = np.zeros_like(mask)
    assert synthetic_lesion(image, empty, image, np.random.default_rng(0)) is None


def test_scale_keeps_lesions_the_same_share_of_the_head() -> None:
    """At half the image size (scale 0.5) lesions cover about the same fraction of the head as at full size."""
    shares = {}
    for size, scale in ((256, 1.0), (128, 0.5)):
        yy, xx = np.mgrid[:size, :size]
        mask = (yy - size / 2) ** 2 / (0.4 * size) ** 2 + (xx - size / 2) ** 2 / (0.32 * size) ** 2 < 1
        image = np.where(mask, 0.3, 0.0).astype(np.float32)
        areas = []
        for seed in range(30):
            made = synthetic_lesion(image, mask, image, np.random.default_rng(seed), scale)
            if made is not None:
                areas.append(made[1].sum() / mask.sum())
        shares[size] = float(np.median(areas))
    assert 0.6 < shares[128] / shares[256] < 1.6


def _lesion_cores(image: np.ndarray, mask: np.ndarray, kind: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(painted image, lesion core where the tissue was changed) for 20 seeds of one lesion kind; cores of at least
    20 pixels only."""
    out = []
    for seed in range(20):
        made = synthetic_lesion(image, mask, image, np.random.default_rng(seed), kinds=(kind,))
        if made is None:
            continue
        painted, lesion = made
        core = ndimage.binary_erosion(lesion, iterations=3) & (image > 0) & (painted > image + 1e-3)
        if core.sum() >= 20:
            out.append((painted, core))
    return out


def test_faint_kind_brightens_the_lesion_by_a_fraction_and_unknown_kinds_are_refused() -> None:
    """The faint hyperintense kind raises the lesion's core by 8-35% of the tissue's own value (the infiltrative
    FLAIR change of a low-grade glioma), far less than the hyperintense kind's fixed bright level."""
    image, mask = _head()
    ratios = [float(np.median(painted[core] / image[core])) for painted, core in _lesion_cores(image, mask, FAINT)]
    assert len(ratios) >= 10
    assert min(ratios) > 1.04 and max(ratios) < 1.45
    with pytest.raises(ValueError, match="unknown lesion kinds"):
        synthetic_lesion(image, mask, image, np.random.default_rng(0), kinds=("sparkly",))
    assert set(KINDS) < set(ALL_KINDS) and FAINT not in KINDS


def test_moderate_kind_fills_the_lesion_relative_to_the_head_not_to_a_fixed_level() -> None:
    """The moderate hyperintense kind's level follows the head's own median: a dark head (prepared FLAIR, median
    about 0.35) gets a lesion 1.25-1.75 times as bright as that median, below the hyperintense kind's fixed 0.55."""
    image, mask = _head()
    for gain in (1.0, 0.5):
        dim = image * gain
        median = float(np.median(dim[mask]))
        levels = [float(np.median(painted[core])) / median for painted, core in _lesion_cores(dim, mask, MODERATE)]
        assert len(levels) >= 10
        assert min(levels) > 1.1 and max(levels) < 1.95  # the same share of the median at either brightness
