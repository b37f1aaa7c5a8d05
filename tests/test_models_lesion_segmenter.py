"""The lesion segmenter (models.lesion_segmenter) and the detector methods built on it: training samples, a short
real training run on the CPU, persistence, and the fused method's calibration rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.cli import main
from dicom_node.models.base import DetectorError
from dicom_node.models.image_detector import DetectorConfig, ImageAnomalyDetector, Prepared
from dicom_node.models.lesion_segmenter import (
    SEGMENTER_SIZE,
    LesionUNet,
    SegmenterSettings,
    SyntheticLesionSet,
    _learning_rate,
    fit_segmenter,
    image_scores,
    lesion_probability,
)
from dicom_node.models.methods.spade_segmenter import SpadeSegmenterMethod
from dicom_node.models.preprocessing import square_crop_box
from dicom_node.models.synthetic import ALL_KINDS, KINDS


def _heads(count: int, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    images, masks = [], []
    for _ in range(count):
        a, b = rng.uniform(0.3, 0.42) * size, rng.uniform(0.25, 0.35) * size
        mask = (yy - size / 2) ** 2 / a**2 + (xx - size / 2) ** 2 / b**2 < 1
        texture = 0.35 + 0.1 * np.sin(xx / rng.uniform(4, 8)) * np.cos(yy / rng.uniform(4, 8))
        images.append(np.where(mask, texture, 0.0).astype(np.float32))
        masks.append(mask)
    return np.stack(images), np.stack(masks)


def test_samples_are_reproducible_and_at_the_segmenter_size() -> None:
    images, masks = _heads(4)
    settings = SegmenterSettings(clean_fraction=0.0)
    data = SyntheticLesionSet(images, masks, 8, settings, seed=5)
    image, lesion, head = data[3]
    assert image.shape == lesion.shape == head.shape == (1, SEGMENTER_SIZE, SEGMENTER_SIZE)
    assert lesion.sum() > 0 and not ((lesion > 0) & (head == 0)).any()
    again = SyntheticLesionSet(images, masks, 8, settings, seed=5)[3]
    torch.testing.assert_close(again[0], image)
    clean = SyntheticLesionSet(images, masks, 8, SegmenterSettings(clean_fraction=1.0), seed=5)
    assert all(clean[i][1].sum() == 0 for i in range(4))


def test_learning_rate_warms_up_then_anneals() -> None:
    assert _learning_rate(1.0, 0.0) < _learning_rate(1.0, 0.05) == pytest.approx(1.0)
    assert _learning_rate(1.0, 1.0) == pytest.approx(0.01)
    assert _learning_rate(1.0, 5.0) == pytest.approx(0.01)  # past the budget: stays at the floor


def test_unet_keeps_the_input_size() -> None:
    model = LesionUNet((4, 8, 8)).eval()
    with torch.inference_mode():
        assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 1, 64, 64)


def test_short_training_run_and_scores() -> None:
    images, masks = _heads(6)
    settings = SegmenterSettings(widths=(4, 8, 8), steps=3, batch_size=4, seconds=60)
    model, record = fit_segmenter(images, masks, settings, torch.device("cpu"))
    assert record["steps_trained"] == 3 and np.isfinite(record["final_loss"])
    probability = lesion_probability(model, images, torch.device("cpu"))
    assert probability.shape == (6, SEGMENTER_SIZE, SEGMENTER_SIZE)
    assert probability.min() >= 0 and probability.max() <= 1
    scores = image_scores(probability, masks, settings)
    assert scores.shape == (6,) and np.all(scores >= 0)


def test_flip_average_is_mirror_symmetric_and_the_mean_of_both_views() -> None:
    torch.manual_seed(0)
    model = LesionUNet((4, 8, 8)).eval()  # untrained: not mirror symmetric by itself
    images, _ = _heads(2)
    images[:, 100:130, 60:90] += 0.4  # a lesion on one side
    cpu = torch.device("cpu")
    plain = lesion_probability(model, images, cpu)
    mirrored = lesion_probability(model, images[:, :, ::-1].copy(), cpu)
    averaged = lesion_probability(model, images, cpu, flip_average=True)
    np.testing.assert_allclose(averaged, 0.5 * (plain + mirrored[:, :, ::-1]), atol=1e-6)
    # A mirrored slice gets the mirrored map: the lesion's side does not change how it is scored.
    averaged_mirror = lesion_probability(model, images[:, :, ::-1].copy(), cpu, flip_average=True)
    np.testing.assert_allclose(averaged_mirror, averaged[:, :, ::-1], atol=1e-6)
    assert not np.allclose(plain, averaged)
    assert SegmenterSettings.from_dict({}).flip_average is False  # cards from before 2.2.1 score as they did


def test_settings_round_trip_and_training_goes_on_from_a_given_network() -> None:
    settings = SegmenterSettings(widths=(4, 8, 8), steps=2, batch_size=4, lesion_kinds=ALL_KINDS)
    again = SegmenterSettings.from_dict(settings.to_dict())
    assert again == settings and again.lesion_kinds == ALL_KINDS
    assert SegmenterSettings.from_dict({}).lesion_kinds == KINDS  # models from before the faint kind
    images, masks = _heads(4)
    first, _ = fit_segmenter(images, masks, settings, torch.device("cpu"))
    before = {k: v.clone() for k, v in first.state_dict().items()}
    second, record = fit_segmenter(images, masks, settings, torch.device("cpu"), start=first)
    assert second is first and record["steps_trained"] == 2
    changed = [k for k, v in second.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert changed  # trained on from the given weights, not replaced


def _detector(method: str) -> ImageAnomalyDetector:
    config = DetectorConfig(
        detector="test",
        method=method,
        batch_size=4,
        extra={"segmenter": {"widths": [4, 8, 8], "steps": 2, "batch_size": 4}},
    )
    return ImageAnomalyDetector(config, "cpu")


def test_segmenter_method_saves_and_loads_the_same_scores(tmp_path: Path) -> None:
    images, _ = _heads(5)
    detector = _detector("segmenter")
    detector.fit(list(images))
    detector.calibrate(list(images[:3]))
    assert detector.config.extra["segmenter_training"]["steps_trained"] == 2
    scores, maps = detector.score_each(list(images[3:]))
    detector.save(tmp_path / "model")
    loaded = ImageAnomalyDetector.load(tmp_path / "model")
    again, again_maps = loaded.score_each(list(images[3:]))
    np.testing.assert_allclose(again, scores, rtol=1e-5)
    np.testing.assert_allclose(np.stack(again_maps), np.stack(maps), rtol=1e-4, atol=1e-6)


def test_fused_method_needs_calibration_before_scoring() -> None:
    detector = _detector("spade+segmenter")
    assert isinstance(detector.method, SpadeSegmenterMethod)
    detector.method.segmenter.model = LesionUNet((4, 8, 8)).eval()
    image, mask = _heads(1)
    prepared = [Prepared(image=image[0], mask=mask[0], box=square_crop_box(mask[0]))]
    with pytest.raises(DetectorError, match="calibrat"):
        detector.method.score(prepared)


def test_unknown_lesion_kind_is_refused_before_any_fitting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="unknown lesion kinds"):
        ImageAnomalyDetector(
            DetectorConfig(detector="test", method="segmenter", extra={"segmenter": {"lesion_kinds": ["sparkly"]}})
        )
    code = main(
        [
            "fit", "--detector", "brain_mri", "--normal", str(tmp_path), "--out", str(tmp_path / "model"),
            "--segmenter-lesion-kinds", "hyperintense", "sparkly",
        ]
    )  # fmt: skip
    assert code == 1 and "unknown lesion kinds ['sparkly']" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()
