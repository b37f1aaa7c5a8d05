"""Region-level figures of ``evaluate`` (models.region_evaluation) on small synthetic maps, masks and boxes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicom_node.models.region_evaluation import (
    ImageRegions,
    box_mask,
    evaluate_regions,
    format_region_report,
    image_regions,
    region_metrics,
)
from dicom_node.models.regions import RegionRules

SHAPE = (64, 64)
MM = (1.0, 1.0)


def _map(*hot: tuple[slice, slice]) -> np.ndarray:
    """A low field (the detector's mask) with hot squares above the pixel threshold 1.0."""
    amap = np.zeros(SHAPE, dtype=np.float32)
    amap[4:-4, 4:-4] = 0.1
    for rows, cols in hot:
        amap[rows, cols] = 3.0
    return amap


def _lesion(rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[rows, cols] = True
    return mask


def test_an_image_scored_normal_has_no_region_even_with_hot_pixels_on_the_lesion() -> None:
    amap = _map((slice(20, 30), slice(20, 30)))
    got = image_regions(amap, 0.5, 1.0, 1.0, MM, _lesion(slice(20, 30), slice(20, 30)))
    assert got == ImageRegions(count=0, flagged=False, on_lesion=False)


def test_regions_on_and_off_the_lesion() -> None:
    amap = _map((slice(10, 20), slice(10, 20)), (slice(40, 50), slice(40, 50)))
    on = image_regions(amap, 2.0, 1.0, 1.0, MM, _lesion(slice(45, 55), slice(45, 55)))
    assert on == ImageRegions(count=2, flagged=True, on_lesion=True)
    off = image_regions(amap, 2.0, 1.0, 1.0, MM, _lesion(slice(25, 35), slice(25, 35)))
    assert off.on_lesion is False
    assert image_regions(amap, 2.0, 1.0, 1.0, MM, None).on_lesion is None
    assert image_regions(amap, 2.0, 1.0, 1.0, MM, np.zeros(SHAPE, dtype=bool)).on_lesion is None


def test_the_product_rules_apply_cap_and_minimum_size_in_mm() -> None:
    amap = _map(*[(slice(8 + 12 * i, 14 + 12 * i), slice(10, 16)) for i in range(4)])
    assert image_regions(amap, 2.0, 1.0, 1.0, MM).count == 3  # default cap
    assert image_regions(amap, 2.0, 1.0, 1.0, MM, rules=RegionRules(max_regions=1)).count == 1
    # 6 px squares are 3 mm at 0.5 mm pixels: below the 5 mm minimum, so the one evidence region remains.
    assert image_regions(amap, 2.0, 1.0, 1.0, (0.5, 0.5)).count == 1


def test_an_abnormal_image_without_pixels_above_threshold_still_shows_its_evidence() -> None:
    amap = _map()
    amap[30:36, 30:36] = 0.8  # below the pixel threshold 1.0
    got = image_regions(amap, 2.0, 1.0, 1.0, MM, _lesion(slice(32, 40), slice(32, 40)))
    assert got == ImageRegions(count=1, flagged=True, on_lesion=True)


def test_box_mask_scales_from_the_width_the_boxes_were_drawn_on() -> None:
    mask = box_mask(SHAPE, [(256.0, 512.0, 128.0, 256.0, 1024.0)])  # 1024-px box → a 64-px image: /16
    rows, cols = np.nonzero(mask)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (32, 47, 16, 23)
    assert not box_mask(SHAPE, []).any()


def test_region_metrics_by_hand() -> None:
    normal = [ImageRegions(0, False, None), ImageRegions(2, True, None), ImageRegions(1, True, None)]
    abnormal = [
        ImageRegions(1, True, True),
        ImageRegions(3, True, False),
        ImageRegions(0, False, False),  # missed: no region, counts against the lesion rate
        ImageRegions(2, True, None),  # no truth: only in the region counts
    ]
    got = region_metrics(normal, abnormal)
    assert got["fp_regions_per_normal"] == pytest.approx(1.0)
    assert got["normal_images_with_region"] == pytest.approx(2 / 3)
    assert got["lesion_region_rate"] == pytest.approx(1 / 3)
    assert got["lesion_region_rate_flagged"] == pytest.approx(1 / 2)
    assert got["regions_per_abnormal"] == pytest.approx(6 / 4)
    assert got["regions_per_flagged_abnormal"] == pytest.approx(6 / 3)
    assert (got["n_lesion_truth"], got["n_flagged_lesion_truth"], got["n_flagged_abnormal"]) == (3, 2, 3)
    empty = region_metrics([], [])
    assert empty["fp_regions_per_normal"] is None and empty["lesion_region_rate"] is None
    assert "n/a" in format_region_report(empty)


def test_evaluate_regions_over_scored_files() -> None:
    hot = (slice(20, 30), slice(20, 30))
    normal = ([Path("n1.png"), Path("n2.png")], np.array([0.5, 2.0]), [_map(hot), _map(hot)])
    abnormal = ([Path("a1.png"), Path("a2.png")], np.array([2.0, 0.5]), [_map(hot), _map(hot)])
    asked: list[tuple[str, tuple[int, int]]] = []

    def lesion_for(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
        asked.append((path.name, shape))
        return _lesion(*hot)

    got = evaluate_regions(normal, abnormal, 1.0, 1.0, lambda shape: MM, lesion_for)
    assert asked == [("a1.png", SHAPE), ("a2.png", SHAPE)]  # normals are not checked against a lesion
    assert got["fp_regions_per_normal"] == pytest.approx(0.5)
    assert got["lesion_region_rate"] == pytest.approx(0.5)
    assert got["lesion_region_rate_flagged"] == pytest.approx(1.0)
    assert got["regions_per_abnormal"] == pytest.approx(0.5)


def test_a_radiograph_shows_its_strongest_region_only_and_other_detectors_keep_the_defaults() -> None:
    from dicom_node.models.regions import rules_for

    assert rules_for("brain_mri") == RegionRules() and rules_for(None) == RegionRules()
    assert rules_for("chest_xray").max_regions == 1
    two = _map((slice(10, 20), slice(10, 20)), (slice(40, 52), slice(40, 52)))
    normal = ([Path("n.png")], np.array([0.0]), [np.zeros(SHAPE, dtype=np.float32)])
    abnormal = ([Path("a.png")], np.array([2.0]), [two])
    by = {
        detector: evaluate_regions(
            normal, abnormal, 1.0, 1.0, lambda shape: MM, lambda path, shape: None, detector=detector
        )
        for detector in ("brain_mri", "chest_xray")
    }
    assert by["brain_mri"]["regions_per_abnormal"] == 2.0
    assert by["chest_xray"]["regions_per_abnormal"] == 1.0
