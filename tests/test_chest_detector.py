"""Chest X-ray detector: radiograph preprocessing on real CR files, regions, per-view metrics, fit/evaluate smoke."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import DATA, DICOM_DATA
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CR = DICOM_DATA / "cr"
J2K_CHEST = CR / "pydicom-data_RG1_J2KI_CR_chest.dcm"
FAKE_MONO1 = CR / "txv_Fake_MONOHR1.dcm"
CXR = DATA / "cxr_nih"


def _siim() -> Path:
    return next(CR.glob("txv_SIIM_*.dcm"))


def _regions(image: np.ndarray) -> dict[str, float]:
    """Mean brightness of the mediastinum, both lung fields and the two lower-inner quadrants (heart side)."""
    h, w = image.shape
    band = slice(int(0.3 * h), int(0.6 * h))
    low = slice(int(0.55 * h), int(0.75 * h))
    return {
        "mediastinum": float(image[band, int(0.45 * w) : int(0.55 * w)].mean()),
        "lung_right": float(image[band, int(0.15 * w) : int(0.35 * w)].mean()),
        "lung_left": float(image[band, int(0.65 * w) : int(0.85 * w)].mean()),
        "heart_side": float(image[low, int(0.55 * w) : int(0.70 * w)].mean()),
        "other_side": float(image[low, int(0.30 * w) : int(0.45 * w)].mean()),
    }


def _assert_chest_upright(image: np.ndarray) -> None:
    r = _regions(image)
    assert r["lung_right"] < r["mediastinum"] and r["lung_left"] < r["mediastinum"], r
    # Patient's left (heart) is on the image's right in a frontal view as stored.
    assert r["heart_side"] > r["other_side"], r


@pytest.mark.parametrize("path", [J2K_CHEST, None], ids=["monochrome1-jpeg2000", "secondary-capture-jpeg"])
def test_real_cr_files_come_out_bright_bone_dark_lung(path: Path | None) -> None:
    from dicom_node.models.chest_xray.detector import radiograph_image

    ds = pydicom.dcmread(path or _siim())
    image = radiograph_image(ds)
    assert image.shape == (ds.Rows, ds.Columns)
    assert image.dtype == np.float32 and image.min() >= 0.0 and image.max() <= 1.0
    _assert_chest_upright(image)


def test_monochrome1_is_inverted() -> None:
    """Without the MONOCHROME1 inversion the J2K CR would have dark bone: the inversion is what makes it right."""
    from dicom_node.models.chest_xray.detector import radiograph_image

    ds = pydicom.dcmread(J2K_CHEST)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    image = radiograph_image(ds)
    ds.PhotometricInterpretation = "MONOCHROME2"
    raw = radiograph_image(ds, check_polarity=False)
    np.testing.assert_allclose(raw, 1.0 - image, atol=1e-5)


def test_inverted_copy_matches_original_after_preprocessing(caplog: pytest.LogCaptureFixture) -> None:
    """txv_Fake_MONOHR1 holds the SIIM pixels but says MONOCHROME1: shown as stored it would be a negative. The
    polarity check turns it back, so both files give the same image, and says so in the log."""
    from dicom_node.models.chest_xray.detector import radiograph_image

    original = radiograph_image(pydicom.dcmread(_siim()))
    fake = pydicom.dcmread(FAKE_MONO1)
    negative = radiograph_image(fake, check_polarity=False)
    r = _regions(negative)
    assert r["mediastinum"] < r["lung_left"] and r["mediastinum"] < r["lung_right"]
    with caplog.at_level("WARNING", logger="dicom_node.models.chest_xray.detector"):
        corrected = radiograph_image(fake)
    assert "treating the pixel data as inverted" in caplog.text
    np.testing.assert_allclose(corrected, original, atol=1e-5)


def _synthetic_cr(photometric: str, rows: int = 300, cols: int = 240) -> pydicom.Dataset:
    """A 16-bit CR with a window: bright 'mediastinum' column, dark 'lungs' either side (in display terms)."""
    display = np.full((rows, cols), 0.3, dtype=np.float32)
    display[:, int(0.42 * cols) : int(0.58 * cols)] = 0.9
    display[: rows // 10] = 0.05
    stored = display if photometric == "MONOCHROME2" else 1.0 - display
    pixels = (1000 + stored * 40000).astype(np.uint16)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.WindowCenter, ds.WindowWidth = 21000, 40000
    ds.PixelData = pixels.tobytes()
    return ds


def test_16_bit_window_and_photometric_agree() -> None:
    from dicom_node.models.chest_xray.detector import radiograph_image

    mono2 = radiograph_image(_synthetic_cr("MONOCHROME2"))
    mono1 = radiograph_image(_synthetic_cr("MONOCHROME1"))
    np.testing.assert_allclose(mono1, mono2, atol=2e-3)
    assert mono2[150, 120] > 0.8 and mono2[150, 20] < 0.4


def test_prepare_keeps_aspect_ratio_and_maps_return_to_source_geometry() -> None:
    from dicom_node.models.chest_xray.detector import ChestXrayDetector, default_config
    from dicom_node.models.preprocessing import uncrop_square

    config = default_config()
    config.image_size = 64
    detector = ChestXrayDetector(config)
    image = np.zeros((300, 200), dtype=np.float32)
    image[100:200, 50:150] = 1.0  # a square stays a square: no stretching
    prepared = detector.prepare(image)
    assert prepared.image.shape == (64, 64) and prepared.box.size == 300
    ys, xs = np.nonzero(prepared.image > 0.5)
    assert abs((ys.max() - ys.min()) - (xs.max() - xs.min())) <= 1
    assert not prepared.mask[:, :5].any()  # the padding is never foreground
    back = uncrop_square(prepared.image, prepared.box)
    assert back.shape == (300, 200) and back[150, 100] > 0.5 and back[20, 20] < 0.5


def test_regions_mask_and_closed_polygon() -> None:
    """The product's one region finder (models.regions.select_regions) on one image, the SR outline of a region
    (polygon_of) and the map maximum."""
    from dicom_node.models.regions import RegionRules, map_maximum, polygon_of, select_regions

    amap = np.zeros((100, 120), dtype=np.float32)
    amap[20:40, 70:100] = 2.0  # strongest finding
    amap[60:70, 10:20] = 1.5
    amap[90, 5] = 1.2  # a single pixel: speckle, dropped
    every = RegionRules(max_regions=10, min_size_mm=2.0, margin_mm=0.0, min_evidence_ratio=0.0)
    regions = select_regions(amap[None], 1.0, (1.0, 1.0, 1.0), abnormal=True, rules=every)
    assert [r.score for r in regions] == [2.0, 1.5]
    first = regions[0].mask[0]
    assert first.shape == amap.shape and int(first.sum()) == 20 * 30
    poly = polygon_of(first)
    assert np.array_equal(poly[0], poly[-1])
    cols, rows = poly[:, 0], poly[:, 1]
    assert cols.min() == pytest.approx(69.5) and cols.max() == pytest.approx(99.5)
    assert rows.min() == pytest.approx(19.5) and rows.max() == pytest.approx(39.5)
    assert regions[0].peak[1:] == (20, 70)
    assert map_maximum(amap) == (70.0, 20.0)
    assert select_regions(amap[None], 5.0, (1.0, 1.0, 1.0), abnormal=False, rules=every) == []


def test_regions_module_does_not_import_torch() -> None:
    code = "import sys, models.regions, models.view_evaluation; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_per_view_and_localisation_by_hand(tmp_path: Path) -> None:
    from dicom_node.models.view_evaluation import localisation_hit_rate, per_view_metrics, read_boxes, read_views

    files = [Path(f"{n}.png") for n in ("n1", "n2", "a1", "a2", "n3", "a3")]
    labels = np.array([False, False, True, True, False, True])
    scores = np.array([0.1, 0.5, 0.4, 0.9, 0.2, 0.1])
    views_csv = tmp_path / "views.csv"
    views_csv.write_text("file,view\nn1.png,AP\nn2.png,AP\na1.png,AP\na2.png,AP\nn3.png,PA\na3.png,PA\n")
    per_view = per_view_metrics(files, labels, scores, read_views(views_csv), threshold=0.45)
    # AP: normals 0.1, 0.5; abnormals 0.4, 0.9 → pairs won: (0.4>0.1), (0.9>0.1), (0.9>0.5) = 3 of 4.
    assert per_view["AP"]["image_auroc"] == pytest.approx(0.75)
    assert per_view["AP"]["sensitivity"] == pytest.approx(0.5) and per_view["AP"]["specificity"] == pytest.approx(0.5)
    assert per_view["PA"]["image_auroc"] == pytest.approx(0.0)
    # At 90% specificity on the AP normals (threshold between 0.1 and 0.5, near 0.5) one AP abnormal of two is found.
    assert per_view["AP"]["sensitivity_at_90"] == pytest.approx(0.5)
    boxes_csv = tmp_path / "boxes.csv"
    boxes_csv.write_text("file,x,y,w,h\na1.png,0,0,512,512\na2.png,512,512,512,512\n")
    maps = [np.zeros((64, 64), dtype=np.float32) for _ in range(2)]
    maps[0][10, 10] = 1.0  # inside a1's box (top-left quarter)
    maps[1][10, 10] = 1.0  # outside a2's box (bottom-right quarter)
    loc = localisation_hit_rate([Path("a1.png"), Path("a2.png")], maps, read_boxes(boxes_csv))
    assert loc == {"localisation_hit_rate": 0.5, "n_with_boxes": 2}


@pytest.mark.slow
def test_fit_evaluate_and_score_a_real_cr_series(tmp_path: Path) -> None:
    """Smoke: fit on 8 normals (small size), evaluate with views and boxes, score the real J2K CR as a series."""
    from dicom_node.models.chest_xray.detector import ChestXrayDetector
    from dicom_node.models.regions import polygon_of, rules_for, select_regions

    with open(CXR / "labels.csv", newline="") as handle:
        labels = {r["file"]: r for r in csv.DictReader(handle)}
    normal, calib, val_n, val_a = (tmp_path / d for d in ("normal", "calib", "val_n", "val_a"))
    for folder, source, count in (
        (normal, CXR / "train" / "normal", 8),
        (calib, CXR / "val" / "normal", 4),
        (val_n, CXR / "val" / "normal", 3),
        (val_a, CXR / "val" / "abnormal", 3),
    ):
        folder.mkdir()
        picked = sorted(source.iterdir())[-count:] if folder is val_n else sorted(source.iterdir())[:count]
        for f in picked:
            (folder / f.name).symlink_to(f)
    model = tmp_path / "model"
    cli = [str(Path(sys.executable).parent / "dicom-node")]
    subprocess.run(
        [*cli, "fit", "--detector", "chest_xray", "--device", "cpu", "--normal", str(normal),
         "--calibration-normal", str(calib), "--image-size", "128", "--coreset-size", "200", "--out", str(model)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    card = json.loads((model / "model_card.json").read_text())
    assert card["detector"] == "chest_xray" and len(card["weights_sha256"]) == 64
    views = tmp_path / "views.csv"
    with open(views, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "view"])
        for folder in (val_n, val_a):
            for f in folder.iterdir():
                writer.writerow([f.name, labels[f.name]["view"]])
    report_file = tmp_path / "report.json"
    out = subprocess.run(
        [*cli, "evaluate", "--detector", "chest_xray", "--device", "cpu", "--model", str(model),
         "--normal", str(val_n), "--abnormal", str(val_a), "--labels", str(views),
         "--boxes", str(CXR / "boxes.csv"), "--json", str(report_file)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    report = json.loads(report_file.read_text())
    assert set(report["per_view"]) == {"AP", "PA"}
    assert report["per_view"]["AP"]["n_normal"] + report["per_view"]["PA"]["n_normal"] == 3
    assert "localisation_hit_rate" in report and "AP" in out.stdout

    detector = ChestXrayDetector.load(model, "cpu")
    ds = pydicom.dcmread(J2K_CHEST)
    result = detector.score_series([ds])
    assert result.anomaly_maps.shape == (1, ds.Rows, ds.Columns)
    assert result.sop_instance_uids == [ds.SOPInstanceUID]
    assert np.isfinite(result.series_score)
    threshold = float(np.quantile(result.anomaly_maps[0], 0.99))
    regions = select_regions(
        result.anomaly_maps[:1], threshold, (1.0, 0.2, 0.2), abnormal=True, rules=rules_for("chest_xray")
    )
    assert len(regions) == 1 and polygon_of(regions[0].mask[0]).shape[1] == 2


def test_positional_gaussian_scores_each_position_against_its_own_mean() -> None:
    """The per-position mean is subtracted before the shared covariance: a normal feature that is normal at its own
    position scores low, the same feature moved to a position where it is unusual scores high; state round-trips."""
    import torch

    from dicom_node.models.methods.padim import PositionalGaussian

    gen = torch.Generator().manual_seed(0)
    layout = torch.zeros(4, 6, 6)
    layout[0, :3] = 5.0  # channel 0 is high in the top half in every normal
    normals = layout + 0.3 * torch.randn(200, 4, 6, 6, generator=gen)
    model = PositionalGaussian(ridge=1e-2).fit(normals)
    query = layout.clone()[None]
    base = model.distances(query)
    assert base.shape == (1, 6, 6) and float(base.max()) < 0.5
    query[0, 0, 5, 5] = 5.0  # the top-half value in the bottom half: unusual *there*
    moved = model.distances(query)
    assert float(moved[0, 5, 5]) > 5.0 and float(moved[0, 0, 0]) == pytest.approx(float(base[0, 0, 0]))
    again = PositionalGaussian.from_state(model.state("padim."), "padim.", ridge=1e-2)
    torch.testing.assert_close(again.distances(query), moved, atol=1e-4, rtol=1e-4)


def test_positional_gaussian_radius_tolerates_a_shift_of_the_layout() -> None:
    """With ``radius`` r a position is compared with the nearest mean within r cells: the normal layout shifted by
    one cell is far from the means at the edge of the pattern with r = 0 and normal with r = 1; a value unusual
    everywhere stays unusual; r = 0 is the plain per-position distance."""
    import torch

    from dicom_node.models.methods.padim import PadimParams, PositionalGaussian

    gen = torch.Generator().manual_seed(0)
    layout = torch.zeros(4, 6, 6)
    layout[0, :3] = 5.0
    normals = layout + 0.3 * torch.randn(200, 4, 6, 6, generator=gen)
    model = PositionalGaussian(ridge=1e-2).fit(normals)
    shifted = torch.roll(layout, shifts=1, dims=1)[None]  # the top-half pattern one row lower
    shifted[0, 0, 0] = 5.0  # (rolled in from the bottom row otherwise)
    assert float(model.distances(shifted)[0, 3].min()) > 5.0
    assert float(model.distances(shifted, radius=1).max()) < 0.5
    odd = layout.clone()[None]
    odd[0, 1, 2, 2] = 10.0  # channel 1 is zero at every position in the normals
    assert float(model.distances(odd, radius=1)[0, 2, 2]) > 5.0
    torch.testing.assert_close(model.distances(odd, radius=0), model.distances(odd))
    assert PadimParams.from_extra({"grid": 28}).radius == 0  # a 1.1.0 config keeps its scoring


def test_padim_method_fits_saves_and_loads(tmp_path: Path) -> None:
    """The shipped method: fit on a few normals at a small size, score, save, load, same scores; the image score is
    the mean per-position distance inside the lung field, so an added bright blob inside the lungs raises it."""
    from dicom_node.models.chest_xray.detector import ChestXrayDetector, default_config
    from dicom_node.models.preprocessing import load_image_file

    config = default_config()
    assert config.method == "padim" and config.version == "1.3.0"
    assert config.extra["padim"]["radius"] == 2
    config.image_size = 128
    normals = [load_image_file(p) for p in sorted((CXR / "train" / "normal").iterdir())[:12]]
    detector = ChestXrayDetector(config)
    detector.fit(normals)
    detector.calibrate(normals[:6])
    probe = normals[6].copy()
    blob = probe.copy()
    h, w = blob.shape
    blob[int(0.35 * h) : int(0.6 * h), int(0.15 * w) : int(0.4 * w)] = 1.0  # a dense opacity in the right lung
    scores, maps = detector.score_each([probe, blob])
    assert scores[1] > scores[0] and maps[0].shape == probe.shape
    detector.save(tmp_path / "model")
    loaded = ChestXrayDetector.load(tmp_path / "model")
    assert loaded.padim.gaussian is not None and loaded.config.method == "padim"
    np.testing.assert_allclose(loaded.score_each([probe, blob])[0], scores, rtol=1e-5, atol=1e-5)


def test_the_map_covers_an_opacity_that_the_image_own_lung_field_leaves_out() -> None:
    """The image's lung field is its dark (aerated) lung, so a consolidated base falls outside it; the map (and so
    the regions) also covers where the normals' lungs are (the lung-field heuristic on the atlas mean)."""
    import torch

    from dicom_node.models.chest_xray.detector import ChestXrayDetector, default_config, lung_field_mask
    from dicom_node.models.image_detector import Prepared
    from dicom_node.models.preprocessing import CropBox

    config = default_config()
    size = config.image_size = 128
    detector = ChestXrayDetector(config)
    atlas = 64
    yy, xx = np.mgrid[0:atlas, 0:atlas] / atlas
    mean = np.full((atlas, atlas), 1.0, dtype=np.float32)  # bright mediastinum and soft tissue
    for cx in (0.3, 0.7):  # two dark lungs in the average normal
        mean[((xx - cx) / 0.14) ** 2 + ((yy - 0.45) / 0.3) ** 2 <= 1.0] = -1.0
    detector.atlas.tensors = {"mean": torch.from_numpy(mean), "std": torch.full((atlas, atlas), 0.5)}
    normal = detector.atlas.normal_lung_field()
    assert normal is not None and normal.shape == (size, size)
    assert normal[int(0.6 * size), int(0.3 * size)] and not normal[int(0.45 * size), size // 2]
    # This image: the same anatomy with a consolidated right base (bright), so its own lung field stops above it.
    image = np.asarray(
        torch.nn.functional.interpolate(torch.from_numpy(mean)[None, None], size=(size, size), mode="bilinear")[0, 0]
    )
    image = (image - image.min()) / (image.max() - image.min())
    base = (slice(int(0.58 * size), int(0.8 * size)), slice(int(0.14 * size), int(0.46 * size)))
    image[base] = 1.0
    own = lung_field_mask(image)
    assert own is not None and own[base].mean() < 0.5
    prepared = Prepared(image=image, mask=own, box=CropBox(top=0, left=0, size=size, source_shape=(size, size)))
    field = detector.atlas.map_field(prepared)
    assert (field >= own).all() and field[base][normal[base]].all() and field[base].mean() > own[base].mean() + 0.2
    amap = detector.atlas.maps([prepared])[0]
    assert amap[base].max() == amap.max() > 0  # the brightest place against the normals is the consolidation
    assert not amap[~field].any()
