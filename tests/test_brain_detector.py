"""A small real fit/evaluate run of the brain detector on a few files of the shared data (no quality numbers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from safetensors.torch import load_file

from dicom_node.cli import main
from dicom_node.models.base import SeriesResult
from dicom_node.models.brain_mri.detector import BrainMRIDetector
from dicom_node.models.evaluation import REPORT_KEYS
from dicom_node.models.image_detector import sha256_file
from dicom_node.models.region_evaluation import REGION_KEYS
from dicom_node.models.registry import default_registry

pytestmark = pytest.mark.slow


def _largest_tumours(data: Path, count: int) -> list[str]:
    masks = sorted((data / "brain_lgg/val/masks").glob("*.png"))
    tumour_names = {p.name for p in (data / "brain_lgg/val/tumor").glob("*.png")}
    sizes = []
    for path in masks:
        if path.name in tumour_names:
            sizes.append((int((np.asarray(Image.open(path)) > 0).sum()), path.name))
    return [name for _, name in sorted(sizes, reverse=True)[:count]]


@pytest.fixture(scope="module")
def small_set(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("brain")
    folders = {name: root / name for name in ("train", "calibration", "normal", "tumor")}
    for folder in folders.values():
        folder.mkdir()
    lgg = data_dir / "brain_lgg"
    for path in sorted((lgg / "train/normal").glob("*.png"))[::40][:25]:
        shutil.copy(path, folders["train"])
    val_normals = sorted((lgg / "val/normal").glob("*.png"))
    for path in val_normals[::30][:8]:
        shutil.copy(path, folders["calibration"])
    for path in val_normals[5::40][:4]:
        shutil.copy(path, folders["normal"])
    for name in _largest_tumours(data_dir, 4):
        shutil.copy(lgg / "val/tumor" / name, folders["tumor"])
    folders["masks"] = lgg / "val/masks"
    folders["model"] = root / "model"
    code = main(
        [
            "fit", "--detector", "brain_mri", "--device", "cpu",
            "--normal", str(folders["train"]), "--calibration-normal", str(folders["calibration"]),
            "--out", str(folders["model"]), "--coreset-size", "400", "--image-size", "192",
            "--segmenter-steps", "8",
        ]
    )  # fmt: skip
    assert code == 0
    return folders


def test_model_directory_has_weights_and_card(small_set: dict[str, Path]) -> None:
    model = small_set["model"]
    card = json.loads((model / "model_card.json").read_text())
    assert card["weights_sha256"] == sha256_file(model / "weights.safetensors")
    assert card["thresholds"]["image"] > 0 and card["thresholds"]["pixel"] > 0
    assert "CC BY-NC-SA" in card["licence"] and card["citations"]
    assert "Training command" in (model / "MODEL_CARD.md").read_text()
    # The default brain fit trains the residual head and the lesion segmenter on synthetic lesions.
    tensors = load_file(str(model / "weights.safetensors"))
    assert "spade.head.coef" in tensors and any(key.startswith("segmenter.") for key in tensors)
    assert card["method"] == "spade+segmenter" and card["config"]["extra"]["segmenter_training"]["steps_trained"] == 8
    assert card["config"]["score_stats"]["spade_map"][1] > 0  # the SPADE map's scale, set on the calibration normals


def test_fit_without_synthetic_copies_has_no_head(small_set: dict[str, Path], tmp_path: Path) -> None:
    code = main(
        [
            "fit", "--detector", "brain_mri", "--device", "cpu", "--normal", str(small_set["train"]),
            "--calibration-normal", str(small_set["calibration"]), "--out", str(tmp_path / "plain"),
            "--image-size", "192", "--synthetic-copies", "0", "--method", "spade",
        ]
    )  # fmt: skip
    assert code == 0
    tensors = load_file(str(tmp_path / "plain" / "weights.safetensors"))
    assert "spade.patches" in tensors and not any(key.startswith("spade.head.") for key in tensors)
    card = json.loads((tmp_path / "plain" / "model_card.json").read_text())
    assert card["config"]["extra"]["spade"]["synthetic_copies"] == 0


def test_map_marks_the_tumour_above_normal_tissue(small_set: dict[str, Path]) -> None:
    detector = default_registry().load("brain_mri", small_set["model"], "cpu")
    assert isinstance(detector, BrainMRIDetector)
    files = sorted(small_set["tumor"].glob("*.png"))
    images = [np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255.0 for f in files]
    scores, maps = detector.score_each(images)
    wins = 0
    for path, image, amap in zip(files, images, maps, strict=True):
        truth = np.asarray(Image.open(small_set["masks"] / path.name)) > 0
        head = image > 0.05
        assert amap.shape == image.shape
        healthy = head & ~truth
        wins += int(amap[truth].mean() > amap[healthy].mean())
    assert wins >= len(files) - 1, "the anomaly map should be higher on the tumour than on normal tissue"
    assert scores.shape == (len(files),)


def test_evaluate_cli_writes_the_agreed_keys(small_set: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    code = main(
        [
            "evaluate", "--detector", "brain_mri", "--device", "cpu", "--model", str(small_set["model"]),
            "--normal", str(small_set["normal"]), "--abnormal", str(small_set["tumor"]),
            "--masks", str(small_set["masks"]), "--json", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert set(REPORT_KEYS) <= set(report)
    assert all(report[key] is not None for key in REPORT_KEYS)
    # Region figures (issue 19): the product's regions of each image against the masks.
    assert set(REGION_KEYS) <= set(report["regions"])
    assert report["regions"]["n_lesion_truth"] == len(list(small_set["tumor"].glob("*.png")))


def test_calibrate_cli_changes_thresholds(small_set: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "site"
    code = main(
        [
            "calibrate", "--detector", "brain_mri", "--device", "cpu", "--model", str(small_set["model"]),
            "--normal", str(small_set["normal"]), "--specificity", "0.5", "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    before = json.loads((small_set["model"] / "model_card.json").read_text())["thresholds"]["image"]
    after = json.loads((out / "model_card.json").read_text())["thresholds"]
    assert after["image_specificity_on_calibration_normals"] == 0.5
    assert after["image"] != before


def test_sagittal_series_gets_maps_in_source_geometry(small_set: dict[str, Path], data_dir: Path) -> None:
    detector = default_registry().load("brain_mri", small_set["model"], "cpu")
    assert isinstance(detector, BrainMRIDetector)
    detector.config.extra["max_scored_slices"] = 6
    files = sorted((data_dir / "dicom/mr_brain_t1_siemens").glob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]
    shuffled = datasets[::-1]
    result = detector.score_series(shuffled)
    assert sorted(result.sop_instance_uids) == sorted(str(ds.SOPInstanceUID) for ds in datasets)
    assert result.anomaly_maps.shape == (len(files), datasets[0].Rows, datasets[0].Columns)
    assert result.scored[60:120].all()  # mid-sagittal slices contain head
    assert np.isfinite(result.series_score) and result.anomaly_maps.max() > 0
    # Sorted along the slice normal: the first returned instance is the one with the lowest position along it.
    normal = np.cross(*np.reshape(np.asarray(datasets[0].ImageOrientationPatient, dtype=float), (2, 3)))
    positions = {
        str(ds.SOPInstanceUID): float(np.dot(np.asarray(ds.ImagePositionPatient, float), normal)) for ds in datasets
    }
    ordered = [positions[uid] for uid in result.sop_instance_uids]
    assert ordered == sorted(ordered)


def test_series_result_round_trip(small_set: dict[str, Path], tmp_path: Path) -> None:
    detector = default_registry().load("brain_mri", small_set["model"], "cpu")
    image = np.asarray(Image.open(next(small_set["tumor"].glob("*.png"))).convert("L"), dtype=np.float32) / 255.0
    before = detector.score_images([image])
    reloaded = default_registry().load("brain_mri", small_set["model"], "cpu")
    after = reloaded.score_images([image])
    np.testing.assert_allclose(before.scores, after.scores, rtol=1e-5)
    assert reloaded.identity.weights_sha256 == detector.identity.weights_sha256
    result = SeriesResult(
        model=reloaded.identity, series_score=float(after.scores[0]), image_threshold=reloaded.image_threshold,
        pixel_threshold=reloaded.pixel_threshold, sop_instance_uids=["1.2.3"], image_scores=after.scores,
        anomaly_maps=after.maps, scored=np.ones(1, bool),
    )  # fmt: skip
    assert SeriesResult.load(result.save(tmp_path / "r")).model == reloaded.identity
