"""Chest radiograph views (AP/PA): the view classifier, per-view score normalisation and thresholds, and the view
of a DICOM radiograph taken from View Position (models/chest_xray/views.py, models/chest_xray/detector.py,
models/labels.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from conftest import DATA, DICOM_DATA

from dicom_node.models.base import DetectorError, ImageInfo
from dicom_node.models.chest_xray.views import MIN_VIEW_NORMALS, ViewCalibration, ViewClassifier
from dicom_node.models.labels import declared_view

CXR = DATA / "cxr_nih"


def _labels() -> dict[str, dict[str, str]]:
    with open(CXR / "labels.csv", newline="") as handle:
        return {r["file"]: r for r in csv.DictReader(handle)}


def test_each_view_is_held_at_its_own_specificity_and_one_threshold_decides() -> None:
    """AP normals score higher than PA normals (bedside films): with one raw threshold PA would be flagged far less
    often than AP. After calibration each view's normals exceed the pooled threshold at about 5%, and an abnormal
    PA image that a raw AP-level threshold would miss is flagged."""
    rng = np.random.default_rng(0)
    views = ["AP"] * 200 + ["PA"] * 100
    raw = np.r_[rng.normal(5.0, 1.0, 200), rng.normal(3.0, 0.5, 100)]
    calibration = ViewCalibration.from_normals(raw, views)
    scores = calibration.calibrate(raw, views, specificity=0.95)
    for view in ("AP", "PA"):
        chosen = np.asarray(views) == view
        assert 0.03 <= float((scores[chosen] >= calibration.threshold).mean()) <= 0.07
    assert calibration.counts == {"AP": 200, "PA": 100}
    pa_lesion = calibration.scores(np.array([4.5]), ["PA"])  # 3 SD above PA normals, below most AP normals
    assert pa_lesion[0] >= calibration.threshold
    assert calibration.scores(np.array([4.5]), ["AP"])[0] < calibration.threshold
    restored = ViewCalibration.from_extra(json.loads(json.dumps(calibration.to_extra())))
    np.testing.assert_allclose(restored.scores(raw, views), scores)


def test_a_view_with_few_calibration_normals_uses_the_pooled_threshold() -> None:
    views = ["AP"] * 60 + ["PA"] * (MIN_VIEW_NORMALS - 1)
    raw = np.r_[np.linspace(4, 6, 60), np.linspace(2, 4, MIN_VIEW_NORMALS - 1)]
    calibration = ViewCalibration.from_normals(raw, views)
    calibration.calibrate(raw, views, specificity=0.95)
    assert calibration.thresholds["PA"] == calibration.threshold
    assert calibration.thresholds["AP"] != calibration.threshold
    with pytest.raises(DetectorError, match="view PA"):
        ViewCalibration.from_normals(np.ones(10), ["AP"] * 8 + ["PA"] * 2)


def test_view_classifier_learns_a_separable_layout_and_survives_a_round_trip() -> None:
    rng = np.random.default_rng(1)
    features = torch.from_numpy(rng.normal(size=(80, 12)))
    views = ["PA" if f > 0 else "AP" for f in features[:, 3]]
    classifier = ViewClassifier().fit(features, views)
    predicted = ["PA" if v > 0 else "AP" for v in classifier.logits(features)]
    assert np.mean([p == v for p, v in zip(predicted, views, strict=True)]) >= 0.95
    restored = ViewClassifier.from_state(classifier.state("view."), "view.")
    np.testing.assert_allclose(restored.logits(features), classifier.logits(features), atol=1e-4)
    with pytest.raises(DetectorError, match="both views"):
        ViewClassifier().fit(features[:5], ["AP"] * 5)


def test_view_position_is_read_from_the_header() -> None:
    ds = pydicom.Dataset()
    assert declared_view(ds) is None
    ds.ViewPosition = "PA "
    assert declared_view(ds) == "PA"
    ds.ViewPosition = "LL"  # a lateral view is not one the detector knows
    assert declared_view(ds) is None


def test_labels_and_dicom_headers_describe_files(tmp_path: Path) -> None:
    from dicom_node.models.labels import info_for, read_labels

    table = read_labels(CXR / "labels.csv")
    first = next(iter(_labels().values()))
    assert table[first["file"]] == ImageInfo(view=first["view"], patient=first["patient_id"])
    cr = next((DICOM_DATA / "cr").glob("pydicom-data_RG1_J2KI_CR_chest.dcm"))
    png = tmp_path / "unknown.png"
    png.write_bytes(b"")
    info = info_for([cr, png], table)
    header = pydicom.dcmread(cr, stop_before_pixels=True)
    assert info[0].view == (str(header.get("ViewPosition", "")).strip().upper() or None)
    assert info[1] == ImageInfo()


def _fit_small(views_known: bool) -> tuple[object, list[np.ndarray], list[str]]:
    from dicom_node.models.chest_xray.detector import ChestXrayDetector, default_config
    from dicom_node.models.preprocessing import load_image_file

    labels = _labels()
    files = sorted((CXR / "train" / "normal").iterdir())
    ap = [f for f in files if labels[f.name]["view"] == "AP"][:8]
    pa = [f for f in files if labels[f.name]["view"] == "PA"][:8]
    chosen = ap + pa
    config = default_config()
    config.image_size = 128
    detector = ChestXrayDetector(config)
    images = [load_image_file(f) for f in chosen]
    views = [labels[f.name]["view"] for f in chosen]
    info = [ImageInfo(view=v, patient=labels[f.name]["patient_id"]) for f, v in zip(chosen, views, strict=True)]
    detector.fit(images, info=info if views_known else None)
    detector.calibrate(images, info=info if views_known else None)
    return detector, images, views


def test_chest_fit_with_views_scores_each_image_against_its_view(tmp_path: Path) -> None:
    """Fitted with the training views, the detector keeps a view classifier and per-view statistics; the declared
    view (View Position) decides which statistics an image is scored against; save and load keep all of it."""
    from dicom_node.models.chest_xray.detector import ChestXrayDetector

    detector, images, views = _fit_small(views_known=True)
    assert isinstance(detector, ChestXrayDetector)
    calibration = detector.padim.view_calibration()
    assert calibration is not None and set(calibration.stats) == {"AP", "PA"}
    probe = images[:2]
    as_ap, _ = detector.score_each(probe, [ImageInfo(view="AP")] * 2)
    as_pa, _ = detector.score_each(probe, [ImageInfo(view="PA")] * 2)
    assert not np.allclose(as_ap, as_pa)
    detector.save(tmp_path / "model")
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    assert set(card["config"]["extra"]["views"]["thresholds"]) == {"AP", "PA"}
    loaded = ChestXrayDetector.load(tmp_path / "model")
    assert loaded.padim.view_classifier.fitted
    np.testing.assert_allclose(loaded.score_each(probe, [ImageInfo(view="AP")] * 2)[0], as_ap, rtol=1e-5, atol=1e-5)
    # Without a declared view the classifier names it; the score is then one of the two.
    unknown, _ = loaded.score_each(probe)
    for i in range(2):
        assert np.isclose(unknown[i], as_ap[i], atol=1e-5) or np.isclose(unknown[i], as_pa[i], atol=1e-5)


def test_a_dicom_radiograph_is_scored_with_its_view_position() -> None:
    from dicom_node.models.chest_xray.detector import ChestXrayDetector

    detector, _, _ = _fit_small(views_known=True)
    assert isinstance(detector, ChestXrayDetector)
    ds = pydicom.dcmread(DICOM_DATA / "cr" / "pydicom-data_RG1_J2KI_CR_chest.dcm")
    scores = {}
    for view in ("AP", "PA"):
        ds.ViewPosition = view
        scores[view] = detector.score_series([ds]).series_score
    assert scores["AP"] != scores["PA"]


def test_chest_fit_without_views_keeps_one_scale() -> None:
    detector, images, _ = _fit_small(views_known=False)
    assert detector.padim.view_calibration() is None  # type: ignore[attr-defined]
    as_ap, _ = detector.score_each(images[:2], [ImageInfo(view="AP")] * 2)  # type: ignore[attr-defined]
    as_pa, _ = detector.score_each(images[:2], [ImageInfo(view="PA")] * 2)  # type: ignore[attr-defined]
    np.testing.assert_allclose(as_ap, as_pa)
