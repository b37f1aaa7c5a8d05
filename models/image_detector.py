"""The generic 2-D image anomaly detector every shipped detector builds on.

A detector = preparation of each image (subclass hook: crop, foreground mask, intensity normalisation) + a frozen
ImageNet backbone + one method fitted on normal images only:

- ``patchcore``: PatchCore memory bank of locally averaged stride-8/16 patch features; image score = mean of the
  top ``topk_fraction`` foreground patch distances; map = patch distances, upsampled and Gaussian smoothed.
- ``msde``: MSDE on the global (pooled) features; image score only (the map is the constant image score).
- ``patchcore+msde``: both, each z-scored against the calibration normals, summed (score) / patch map kept.
- ``autoencoder``: a small denoising autoencoder trained from scratch (models.autoencoder); map = |x - x̂|.
- ``spade``: like ``patchcore``, but each query patch is compared only with the patches of the ``k_images`` most
  similar training normals (models.neighbour_bank), in a whitened PCA subspace; parameters in
  ``config.extra["spade"]``.
- ``segmenter``: no backbone; a U-Net trained from scratch to find synthetic lesions painted into the normals
  (models.lesion_segmenter); map = lesion probability. Trains in minutes on a GPU; settings in
  ``config.extra["segmenter"]``.

Calibration sets the image threshold at a chosen specificity on held-out normal images and the pixel threshold
at a high quantile of the normal maps' foreground pixels; both go in the model card with the weights' sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy import ndimage

from dicom_node.models.backbones import EfficientNetLiteBackbone, select_device
from dicom_node.models.base import Detector, DetectorError, ImageInfo, ImageScores, ModelIdentity, SeriesResult
from dicom_node.models.lesion_segmenter import (
    STATE_PREFIX as SEGMENTER_PREFIX,
)
from dicom_node.models.lesion_segmenter import (
    LesionUNet,
    SegmenterSettings,
    fit_segmenter,
    full_size,
    image_scores,
    lesion_probability,
    load_segmenter,
    segmenter_state,
    to_model_size,
)
from dicom_node.models.metrics import threshold_at_specificity, top_mean
from dicom_node.models.msde import MSDE
from dicom_node.models.neighbour_bank import NeighbourPatchBank
from dicom_node.models.patchcore import PatchMemoryBank
from dicom_node.models.preprocessing import (
    CropBox,
    crop_square,
    dicom_image,
    resize,
    square_crop_box,
    uncrop_square,
)
from dicom_node.models.synthetic import synthetic_lesion

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"
SYNTHETIC_LESION_COVER = 0.3  # a grid patch counts as lesion when more than this fraction of it is
METHODS = ("patchcore", "msde", "patchcore+msde", "autoencoder", "spade", "segmenter", "spade+segmenter")
SPADE_METHODS = ("spade", "spade+segmenter")


@dataclass
class DetectorConfig:
    """Everything that defines a fitted model besides its tensors (stored in model_card.json)."""

    detector: str
    method: str = "patchcore"
    version: str = "0.0.0"
    backbone: str = "efficientnet-lite0"
    image_size: int = 256
    strides: tuple[int, ...] = (8, 16)
    pool_size: int = 3
    coreset_size: int = 6_000
    max_candidates: int = 60_000
    knn: int = 1
    topk_fraction: float = 0.01
    rim_patches: int = 0  # maps: zero patches within this many grid steps of the foreground's edge
    score_rim_patches: int | None = None  # image score: rim excluded from the top-k (None: ``rim_patches``)
    score_pool: int = 1  # image score: patch distances averaged over score_pool x score_pool (foreground) first
    smoothing_sigma: float = 4.0
    use_foreground: bool = True
    batch_size: int = 16
    seed: int = 0
    # Calibration (set by calibrate()).
    image_threshold: float = float("inf")
    pixel_threshold: float = float("inf")
    specificity: float = 0.95
    pixel_quantile: float = 0.999
    score_stats: dict[str, list[float]] = field(default_factory=dict)  # component -> [mean, std] on normals
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "strides" in values:
            values["strides"] = tuple(values["strides"])
        return cls(**values)


@dataclass(frozen=True)
class Prepared:
    """One image ready for the backbone: ``image`` (S, S) in [0, 1], ``mask`` (S, S) foreground, ``box`` where it
    came from in the source image."""

    image: np.ndarray
    mask: np.ndarray
    box: CropBox
    info: ImageInfo = ImageInfo()


class ImageAnomalyDetector(Detector):
    """Generic detector; subclasses set ``name`` and override :meth:`prepare` and :meth:`score_series`."""

    name = "image"
    card_defaults: dict[str, Any] = {}
    methods: tuple[str, ...] = METHODS  # subclasses may add their own

    def __init__(self, config: DetectorConfig, device: str | torch.device | None = "cpu") -> None:
        if config.method not in self.methods:
            raise DetectorError(f"unknown method {config.method!r}; known: {', '.join(self.methods)}")
        self.config = config
        self.device = device if isinstance(device, torch.device) else select_device(device)
        self._backbone: EfficientNetLiteBackbone | None = None
        self.bank: PatchMemoryBank | None = None
        self.msde: MSDE | None = None
        self.neighbour_bank: NeighbourPatchBank | None = None
        self.autoencoder: Any = None
        self.segmenter: LesionUNet | None = None
        self.weights_sha256 = ""
        self.card: dict[str, Any] = {}
        if "segmenter" in config.method:
            self.segmenter_settings()  # a bad setting fails here, not after an hour of fitting

    # ----------------------------------------------------------------------------------------------- contract
    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(
            detector=self.config.detector,
            method=self.config.method,
            version=self.config.version,
            weights_sha256=self.weights_sha256,
        )

    @property
    def image_threshold(self) -> float:
        return float(self.config.image_threshold)

    @property
    def pixel_threshold(self) -> float:
        return float(self.config.pixel_threshold)

    def score_series(self, datasets: Sequence[pydicom.Dataset]) -> SeriesResult:
        """Default for single images (e.g. radiographs): each instance scored alone; series score = maximum."""
        if not datasets:
            raise DetectorError("empty series")
        images = [dicom_image(ds) for ds in datasets]
        result = self.score_images(images)
        return SeriesResult(
            model=self.identity,
            series_score=float(np.max(result.scores)),
            image_threshold=self.image_threshold,
            pixel_threshold=self.pixel_threshold,
            sop_instance_uids=[str(ds.SOPInstanceUID) for ds in datasets],
            image_scores=result.scores,
            anomaly_maps=result.maps,
            scored=np.ones(len(datasets), dtype=bool),
        )

    # ------------------------------------------------------------------------------------------ preparation
    def prepare(self, image: np.ndarray) -> Prepared:
        """Default: the whole image padded to a square, resized to ``image_size``; everything is foreground."""
        box = square_crop_box(np.zeros(image.shape, dtype=bool))
        size = self.config.image_size
        square = resize(crop_square(image, box), (size, size))
        return Prepared(image=square, mask=np.ones((size, size), dtype=bool), box=box)

    def msde_params(self) -> dict[str, Any]:
        """MSDE hyper-parameters (k, iterations, step, pca_dim, ridge) from ``config.extra["msde"]``; paper defaults
        for those not given."""
        integers = {"k", "iterations", "pca_dim"}
        return {
            str(k): int(v) if k in integers else float(v) for k, v in dict(self.config.extra.get("msde", {})).items()
        }

    def spade_params(self) -> dict[str, Any]:
        """SPADE bank hyper-parameters (k_images, pca_dims, whiten) from ``config.extra["spade"]``."""
        params = dict(self.config.extra.get("spade", {}))
        return {
            "k_images": int(params.get("k_images", 20)),
            "pca_dims": int(params.get("pca_dims", 16)),
            "whiten": bool(params.get("whiten", True)),
        }

    def head_params(self) -> tuple[int, float]:
        """Residual head (models.residual_head) settings from ``config.extra["spade"]``: synthetic-lesion copies per
        training image (0: no head, plain distances) and the head's weight."""
        params = dict(self.config.extra.get("spade", {}))
        return int(params.get("synthetic_copies", 0)), float(params.get("head_weight", 4.0))

    def segmenter_settings(self) -> SegmenterSettings:
        """Lesion-segmenter settings (models.lesion_segmenter) from ``config.extra["segmenter"]``."""
        return SegmenterSettings.from_dict({"seed": self.config.seed, **self.config.extra.get("segmenter", {})})

    @property
    def backbone(self) -> EfficientNetLiteBackbone:
        if self._backbone is None:
            self._backbone = EfficientNetLiteBackbone(self.config.backbone, self.device)
        return self._backbone

    # ---------------------------------------------------------------------------------------------- features
    def _needs(self) -> tuple[bool, bool]:
        method = self.config.method
        return ("patchcore" in method or method in SPADE_METHODS, "msde" in method)

    def _features(self, batch: Sequence[Prepared]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        want_patches, want_pooled = self._needs()
        images = np.stack([p.image for p in batch])
        feats = self.backbone.features(
            images,
            strides=self.config.strides if want_patches else (),
            pooled=want_pooled,
            pool_size=self.config.pool_size,
        )
        return feats.patches, feats.pooled

    def _grid_masks(
        self, batch: Sequence[Prepared], grid: tuple[int, int], rim: int = 0, fraction: float = 0.5
    ) -> torch.Tensor:
        """Foreground at feature resolution (a patch counts when more than ``fraction`` of it is foreground), eroded
        by ``rim`` patches: the rim of the head (skull, scalp, orbits) varies most between normals and is not scored."""
        masks = np.stack([p.mask for p in batch]).astype(np.float32)
        if not self.config.use_foreground:
            masks[:] = 1.0
        grid_mask = (F.adaptive_avg_pool2d(torch.from_numpy(masks)[:, None], grid)[:, 0] > fraction).numpy()
        if rim > 0 and self.config.use_foreground:
            grid_mask = np.stack([ndimage.binary_erosion(m, iterations=rim) for m in grid_mask])
        return torch.from_numpy(np.ascontiguousarray(grid_mask))

    # ------------------------------------------------------------------------------------------------ fitting
    def fit(
        self,
        images: Iterable[np.ndarray],
        progress: Callable[[int], None] | None = None,
        info: Sequence[ImageInfo] | None = None,
    ) -> None:
        """Fit on normal images ([0, 1] floats of any size); ``info`` (per image, where known) is for detectors that
        use views or patients (the generic methods do not)."""
        cfg = self.config
        torch.manual_seed(cfg.seed)
        if cfg.method == "autoencoder":
            from dicom_node.models.autoencoder import fit_autoencoder

            self.autoencoder = fit_autoencoder([self.prepare(img) for img in images], cfg, self.device)
            return
        stream: Iterable[Prepared] = (self.prepare(img) for img in images)
        reduced: list[tuple[np.ndarray, np.ndarray]] = []
        if "segmenter" in cfg.method:
            stream = _keep_reduced(stream, reduced)
        if cfg.method == "segmenter":
            for count, _ in enumerate(stream, 1):
                if progress:
                    progress(count)
        else:
            self._fit_features(stream, progress)
        if "segmenter" in cfg.method:
            self._fit_segmenter(reduced)

    def _fit_features(self, prepared: Iterable[Prepared], progress: Callable[[int], None] | None) -> None:
        """Fit the backbone-feature methods (patch bank, SPADE bank and head, MSDE)."""
        cfg = self.config
        want_patches, want_pooled = self._needs()
        spade = cfg.method in SPADE_METHODS
        copies, head_weight = self.head_params() if spade else (0, 0.0)
        rng = np.random.default_rng(cfg.seed)
        patch_rows: list[torch.Tensor] = []
        per_image: list[torch.Tensor] = []
        synthetic: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        pooled_rows: list[torch.Tensor] = []
        count = 0
        for batch in _batches(prepared, cfg.batch_size):
            patches, pooled = self._features(batch)
            if patches is not None:
                grid_mask = self._grid_masks(batch, (int(patches.shape[-2]), int(patches.shape[-1])))
                grid_mask = grid_mask.to(patches.device)
                if spade:  # SPADE keeps which image each patch came from
                    per_image += [
                        p.permute(1, 2, 0)[m].cpu().to(torch.float16) for p, m in zip(patches, grid_mask, strict=True)
                    ]
                    for _ in range(copies):
                        synthetic += self._synthetic_rows(batch, grid_mask.cpu(), count, rng)
                else:
                    patch_rows.append(patches.permute(0, 2, 3, 1)[grid_mask].cpu().to(torch.float16))
            if pooled is not None:
                pooled_rows.append(pooled.cpu())
            count += len(batch)
            if progress:
                progress(count)
        if count == 0:
            raise DetectorError("no training images")
        if spade:
            params = self.spade_params()
            self.neighbour_bank = NeighbourPatchBank(**params).fit(per_image, seed=cfg.seed)
            if copies:
                # Bank indices skip training images without foreground.
                kept = {i: n for n, i in enumerate(i for i, rows in enumerate(per_image) if rows.shape[0] > 0)}
                usable = [(kept[i], rows, lesion) for i, rows, lesion in synthetic if i in kept]
                self.neighbour_bank.fit_head(usable, head_weight, seed=cfg.seed)
        elif want_patches:
            all_patches = torch.cat(patch_rows)
            self.bank = PatchMemoryBank().fit(
                all_patches, cfg.coreset_size, max_candidates=cfg.max_candidates, seed=cfg.seed
            )
        if want_pooled:
            self.msde = MSDE(**self.msde_params()).fit(torch.cat(pooled_rows))

    def _fit_segmenter(self, reduced: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        if not reduced:
            raise DetectorError("no training images")
        settings = self.segmenter_settings()
        self.segmenter, record = fit_segmenter(
            np.stack([image for image, _ in reduced]),
            np.stack([head for _, head in reduced]),
            settings,
            self.device,
            lambda step, loss: logger.info("segmenter step %d loss %.4f", step, loss),
        )
        self.config.extra["segmenter"] = settings.to_dict()
        self.config.extra["segmenter_training"] = {**record, "device": self.device.type}

    def _synthetic_rows(
        self, batch: Sequence[Prepared], grid_mask: torch.Tensor, first: int, rng: np.random.Generator
    ) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """One synthetic-lesion copy of each image of ``batch`` (models.synthetic; the next image is the donor):
        (training image index, foreground patch features (M, C), patch is mostly lesion (M,)). Patches a lesion
        only grazes (0-30% of their area) are left out: neither normal nor lesion."""
        made: list[tuple[int, Prepared, np.ndarray]] = []
        for offset, item in enumerate(batch):
            donor = batch[(offset + 1) % len(batch)].image
            painted = synthetic_lesion(item.image, item.mask, donor, rng)
            if painted is not None:
                made.append((offset, replace(item, image=painted[0]), painted[1]))
        if not made:
            return []
        patches, _ = self._features([copy for _, copy, _ in made])
        assert patches is not None
        grid = (int(patches.shape[-2]), int(patches.shape[-1]))
        out = []
        for (offset, _, lesion), features in zip(made, patches, strict=True):
            cover = F.adaptive_avg_pool2d(torch.from_numpy(lesion.astype(np.float32))[None, None], grid)[0, 0]
            fg = grid_mask[offset]
            keep = (cover[fg] > SYNTHETIC_LESION_COVER) | (cover[fg] == 0)
            rows = features.permute(1, 2, 0).cpu()[fg][keep]
            out.append((first + offset, rows, (cover[fg] > SYNTHETIC_LESION_COVER)[keep]))
        return out

    # ------------------------------------------------------------------------------------------------ scoring
    def _raw(self, prepared: Sequence[Prepared], calibrating: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Component scores {component: (n,)} and maps (n, S, S) in the prepared geometry. ``calibrating``: the
        images are the calibration normals (methods that scale a component on them set the scale first)."""
        cfg = self.config
        if cfg.method == "autoencoder":
            from dicom_node.models.autoencoder import score_autoencoder

            scores, maps = score_autoencoder(self.autoencoder, prepared, cfg, self.device)
            return {"autoencoder": scores}, maps
        if cfg.method == "segmenter":
            return self._segmenter_raw(prepared)
        if cfg.method == "spade+segmenter":
            return self._fused_raw(prepared, calibrating)
        return self._feature_raw(prepared)

    def _feature_raw(self, prepared: Sequence[Prepared]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The backbone-feature methods: patch (PatchCore/SPADE) scores and maps, MSDE scores."""
        cfg = self.config
        size = cfg.image_size
        components: dict[str, list[float]] = {"patchcore": [], "msde": []}
        maps = np.zeros((len(prepared), size, size), dtype=np.float32)
        offset = 0
        for batch in _batches(iter(prepared), cfg.batch_size):
            patches, pooled = self._features(batch)
            if patches is not None and (self.bank is not None or self.neighbour_bank is not None):
                n, c, h, w = patches.shape
                if self.neighbour_bank is not None:
                    dist = self.neighbour_bank.distances(patches, self._grid_masks(batch, (h, w)))
                else:
                    assert self.bank is not None
                    flat = patches.permute(0, 2, 3, 1).reshape(-1, c)
                    dist = self.bank.distances(flat, k=cfg.knn).reshape(n, h, w).cpu()
                components["patchcore"].extend(self._patch_scores(batch, dist))
                grid_mask = self._grid_masks(batch, (h, w), self.config.rim_patches)
                maps[offset : offset + n] = self._distance_maps(batch, dist, grid_mask)
            if pooled is not None and self.msde is not None:
                components["msde"].extend(self.msde.score(pooled.cpu()).tolist())
            offset += len(batch)
        out = {name: np.asarray(values, dtype=np.float64) for name, values in components.items() if values}
        return out, maps

    def _segmenter_raw(self, prepared: Sequence[Prepared]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Score = mean of the top lesion probabilities in the head; map = the probability, at the model size."""
        probability = self._lesion_probability(prepared)
        masks = np.stack([p.mask for p in prepared])
        scores = image_scores(probability, masks, self.segmenter_settings())
        maps = full_size(probability, self.config.image_size) * masks
        return {"segmenter": scores}, maps.astype(np.float32)

    def _lesion_probability(self, prepared: Sequence[Prepared]) -> np.ndarray:
        """The segmenter's lesion probability (n, SEGMENTER_SIZE, SEGMENTER_SIZE) of prepared images."""
        if self.segmenter is None:
            raise DetectorError(f"{self.config.method}: the model has no lesion segmenter (fit one first)")
        images = np.stack([p.image for p in prepared])
        flip = self.segmenter_settings().flip_average
        return lesion_probability(self.segmenter, images, self.device, self.config.batch_size, flip_average=flip)

    def _fused_raw(self, prepared: Sequence[Prepared], calibrating: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """SPADE and the lesion segmenter together. With z the SPADE map in standard deviations of the calibration
        normals' head pixels and p the lesion probability:

        - score = mean of the top ``topk_fraction`` of z + ``score_weight`` x p in the head: either kind of
          evidence raises the slice (detection wants the union);
        - map = sqrt(p x max(z, 0)): a pixel is marked where the tissue is unlike the normals *and* looks like a
          lesion (the outline wants the agreement; on val this gave the best pixel AP and Dice).
        """
        _, spade_maps = self._feature_raw(prepared)
        masks = np.stack([p.mask for p in prepared])
        probability = full_size(self._lesion_probability(prepared), self.config.image_size) * masks
        if calibrating:
            head = spade_maps[masks] if masks.any() else spade_maps.ravel()
            self.config.score_stats["spade_map"] = [float(head.mean()), float(head.std() + 1e-12)]
        if "spade_map" not in self.config.score_stats:
            raise DetectorError("spade+segmenter needs calibrating before it can score (dicom-node calibrate)")
        mean, std = self.config.score_stats["spade_map"]
        z = (spade_maps - mean) / std
        evidence = (z + self.segmenter_settings().score_weight * probability) * masks
        scores = np.array([top_mean(e[m], self.config.topk_fraction) for e, m in zip(evidence, masks, strict=True)])
        maps = np.sqrt(probability * np.clip(z, 0, None)) * masks
        return {"fused": scores}, maps.astype(np.float32)

    def _distance_maps(self, batch: Sequence[Prepared], dist: torch.Tensor, cells: torch.Tensor) -> np.ndarray:
        """Maps (n, S, S) from a distance grid (n, h, w): zero outside ``cells``, upsampled to the model size,
        Gaussian smoothed (``smoothing_sigma``), limited to the foreground."""
        cfg = self.config
        size = cfg.image_size
        dist = torch.where(cells, dist, torch.zeros_like(dist))
        up = F.interpolate(dist[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        maps = np.zeros((len(batch), size, size), dtype=np.float32)
        for i, item in enumerate(batch):
            smooth = ndimage.gaussian_filter(up[i].numpy(), sigma=cfg.smoothing_sigma)
            maps[i] = smooth * item.mask if cfg.use_foreground else smooth
        return maps

    def _patch_scores(self, batch: Sequence[Prepared], dist: torch.Tensor) -> list[float]:
        """Image scores from patch distances (n, h, w): mean of the top ``topk_fraction`` of the distances,
        locally averaged over ``score_pool`` patches within the foreground (a lesion is a blob of high distances,
        noise is isolated patches), taken inside the foreground eroded by ``score_rim_patches``."""
        cfg = self.config
        grid = (dist.shape[1], dist.shape[2])
        rim = cfg.rim_patches if cfg.score_rim_patches is None else cfg.score_rim_patches
        inside = self._grid_masks(batch, grid, rim)
        values = dist
        if cfg.score_pool > 1:
            fg = self._grid_masks(batch, grid, 0).float()[:, None]
            pool = int(cfg.score_pool)
            pad = (pool // 2, pool - 1 - pool // 2, pool // 2, pool - 1 - pool // 2)
            num = F.avg_pool2d(F.pad(dist[:, None].float() * fg, pad), pool, stride=1)
            den = F.avg_pool2d(F.pad(fg, pad), pool, stride=1)
            values = torch.where(den > 0, num / den.clamp_min(1e-6), torch.zeros_like(num))[:, 0]
        out = []
        for i in range(dist.shape[0]):
            selected = values[i][inside[i]]
            if selected.numel() == 0:
                out.append(0.0)
                continue
            k = max(1, int(round(cfg.topk_fraction * selected.numel())))
            out.append(float(torch.topk(selected, k).values.mean()))
        return out

    def _combine(self, components: dict[str, np.ndarray]) -> np.ndarray:
        if len(components) == 1:
            return next(iter(components.values()))
        total = np.zeros_like(next(iter(components.values())))
        for name, values in components.items():
            mean, std = self.config.score_stats.get(name, [0.0, 1.0])
            total = total + (values - mean) / max(std, 1e-12)
        return total

    def _map_scale(self, maps: np.ndarray) -> np.ndarray:
        """Maps on the pixel-threshold scale: for combined methods the patch map is z-scored like its score."""
        if self.config.method == "patchcore+msde":
            mean, std = self.config.score_stats.get("patchcore", [0.0, 1.0])
            return (maps - mean) / max(std, 1e-12)
        return maps

    def score_prepared(self, prepared: Sequence[Prepared]) -> tuple[np.ndarray, np.ndarray]:
        """(scores (n,), maps (n, S, S)) in the prepared (square, model-input) geometry."""
        if not prepared:
            size = self.config.image_size
            return np.zeros(0), np.zeros((0, size, size), dtype=np.float32)
        components, maps = self._raw(prepared)
        scores = self._scores(prepared, components)
        if "patchcore" not in components and self.config.method == "msde":
            maps = np.broadcast_to(scores[:, None, None], maps.shape).astype(np.float32) * np.stack(
                [p.mask for p in prepared]
            )
        return scores, self._map_scale(maps).astype(np.float32)

    def _scores(self, prepared: Sequence[Prepared], components: dict[str, np.ndarray]) -> np.ndarray:
        """The reported image scores from the component scores (subclasses may use ``Prepared.info``)."""
        return self._combine(components)

    def _calibrated_scores(
        self, prepared: Sequence[Prepared], components: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, float]:
        """The calibration normals' reported scores and the image threshold at ``config.specificity`` on them."""
        scores = self._combine(components)
        return scores, threshold_at_specificity(scores, self.config.specificity)

    def prepare_all(self, images: Sequence[np.ndarray], info: Sequence[ImageInfo] | None = None) -> list[Prepared]:
        """:meth:`prepare` each image and attach its ``info`` (where given)."""
        prepared = [self.prepare(np.asarray(img, dtype=np.float32)) for img in images]
        if info is None:
            return prepared
        if len(info) != len(prepared):
            raise DetectorError(f"{len(info)} image descriptions for {len(prepared)} images")
        return [replace(p, info=i) for p, i in zip(prepared, info, strict=True)]

    def score_each(
        self, images: Sequence[np.ndarray], info: Sequence[ImageInfo] | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Scores (n,) and one map per image in that image's own geometry (images may differ in size)."""
        prepared = self.prepare_all(images, info)
        scores, maps = self.score_prepared(prepared)
        return scores, [uncrop_square(m, p.box) for m, p in zip(maps, prepared, strict=True)]

    def score_images(self, images: Sequence[np.ndarray]) -> ImageScores:
        scores, maps = self.score_each(images)
        if len({m.shape for m in maps}) > 1:
            raise DetectorError("score_images needs images of one size; use score_each for mixed sizes")
        size = self.config.image_size
        stacked = np.stack(maps) if maps else np.zeros((0, size, size), dtype=np.float32)
        return ImageScores(scores=scores, maps=stacked)

    # -------------------------------------------------------------------------------------------- calibration
    def calibrate(
        self,
        normal_images: Sequence[np.ndarray],
        specificity: float | None = None,
        info: Sequence[ImageInfo] | None = None,
    ) -> dict[str, float]:
        """Set thresholds from held-out normal images: image threshold at ``specificity`` (default from the
        config), pixel threshold at the ``pixel_quantile`` of the normal maps' foreground pixels."""
        cfg = self.config
        if specificity is not None:
            cfg.specificity = float(specificity)
        prepared = self.prepare_all(normal_images, info)
        if not prepared:
            raise DetectorError("no normal images to calibrate on")
        components, maps = self._raw(prepared, calibrating=True)
        cfg.score_stats.update({name: [float(v.mean()), float(v.std() + 1e-12)] for name, v in components.items()})
        scores, cfg.image_threshold = self._calibrated_scores(prepared, components)
        maps = self._map_scale(maps)
        masks = np.stack([p.mask for p in prepared])
        fg = maps[masks] if masks.any() else maps.ravel()
        cfg.pixel_threshold = float(np.quantile(fg, cfg.pixel_quantile))
        stats = {
            "n_normals": len(prepared),
            "image_threshold": cfg.image_threshold,
            "pixel_threshold": cfg.pixel_threshold,
            "normal_score_mean": float(scores.mean()),
            "normal_score_std": float(scores.std()),
        }
        cfg.extra["calibration"] = {**stats, "normal_scores": sorted(float(v) for v in scores)}
        return stats

    # ----------------------------------------------------------------------------------------- persistence
    def _card_thresholds(self) -> dict[str, Any]:
        """Thresholds beyond the image, pixel and series ones, for the model card (none by default)."""
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.bank is not None:
            out.update(self.bank.state("patchcore."))
        if self.msde is not None:
            out.update(self.msde.state("msde."))
        if self.neighbour_bank is not None:
            out.update(self.neighbour_bank.state("spade."))
        if self.autoencoder is not None:
            out.update(
                {f"autoencoder.{k}": v.detach().cpu().contiguous() for k, v in self.autoencoder.state_dict().items()}
            )
        if self.segmenter is not None:
            out.update(segmenter_state(self.segmenter))
        return out

    def save(self, model_dir: Path, card: dict[str, Any] | None = None) -> None:
        """Write weights.safetensors, model_card.json and MODEL_CARD.md."""
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        weights = model_dir / WEIGHTS_FILE
        tmp = model_dir / f".{WEIGHTS_FILE}.tmp"
        save_file(self.tensors(), str(tmp), metadata={"detector": self.config.detector, "version": self.config.version})
        tmp.chmod(0o644)
        tmp.replace(weights)
        self.weights_sha256 = sha256_file(weights)
        merged = {**self.card_defaults, **self.card, **(card or {})}
        self.card = merged
        document = {
            "detector": self.config.detector,
            "version": self.config.version,
            "method": self.config.method,
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": self.weights_sha256,
            "thresholds": {
                "image": self.config.image_threshold,
                "pixel": self.config.pixel_threshold,
                "image_specificity_on_calibration_normals": self.config.specificity,
                "pixel_quantile_of_normal_maps": self.config.pixel_quantile,
                "series": self.config.extra.get("series_threshold"),
                **self._card_thresholds(),
            },
            "config": _jsonable(asdict(self.config)),
            **merged,
        }
        (model_dir / CARD_JSON).write_text(json.dumps(_jsonable(document), indent=2) + "\n", encoding="utf-8")
        (model_dir / CARD_MD).write_text(render_model_card(document), encoding="utf-8")

    @classmethod
    def load(cls, model_dir: Path, device: str | torch.device | None = "cpu") -> ImageAnomalyDetector:
        model_dir = Path(model_dir)
        card_path, weights = model_dir / CARD_JSON, model_dir / WEIGHTS_FILE
        if not card_path.is_file() or not weights.is_file():
            raise DetectorError(f"{model_dir}: no {CARD_JSON} / {WEIGHTS_FILE} (fit a model first)")
        document = json.loads(card_path.read_text(encoding="utf-8"))
        config = DetectorConfig.from_dict(document["config"])
        detector = cls(config, device)
        digest = sha256_file(weights)
        if document.get("weights_sha256") and document["weights_sha256"] != digest:
            raise DetectorError(f"{weights}: sha256 {digest} does not match the model card")
        detector.weights_sha256 = digest
        tensors = load_file(str(weights))
        if any(k.startswith("patchcore.") for k in tensors):
            detector.bank = PatchMemoryBank.from_state(tensors, "patchcore.")
        if any(k.startswith("msde.") for k in tensors):
            detector.msde = MSDE.from_state(tensors, "msde.", **detector.msde_params())
        if any(k.startswith("spade.") for k in tensors):
            k_images = detector.spade_params()["k_images"]
            detector.neighbour_bank = NeighbourPatchBank.from_state(
                tensors, "spade.", k_images=k_images, head_weight=detector.head_params()[1]
            )
        if any(k.startswith("autoencoder.") for k in tensors):
            from dicom_node.models.autoencoder import load_autoencoder

            detector.autoencoder = load_autoencoder(
                {k[len("autoencoder.") :]: v for k, v in tensors.items() if k.startswith("autoencoder.")},
                config,
                detector.device,
            )
        if any(k.startswith(SEGMENTER_PREFIX) for k in tensors):
            detector.segmenter = load_segmenter(
                {k[len(SEGMENTER_PREFIX) :]: v for k, v in tensors.items() if k.startswith(SEGMENTER_PREFIX)},
                detector.segmenter_settings(),
                detector.device,
            )
        reserved = {"detector", "version", "method", "weights_file", "weights_sha256", "thresholds", "config"}
        detector.card = {k: v for k, v in document.items() if k not in reserved}
        return detector


# ---------------------------------------------------------------------------------------------------- helpers
def _keep_reduced(items: Iterable[Prepared], store: list[tuple[np.ndarray, np.ndarray]]) -> Iterator[Prepared]:
    """Pass the prepared images on, keeping each at the lesion segmenter's size (4x less memory) in ``store``."""
    for item in items:
        image = to_model_size(item.image[None])[0, 0].numpy()
        head = to_model_size(item.mask[None])[0, 0].numpy() > 0.5
        store.append((image, head))
        yield item


def _batches(items: Iterable[Prepared], size: int) -> Iterable[list[Prepared]]:
    batch: list[Prepared] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None if np.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def render_model_card(document: dict[str, Any]) -> str:
    """MODEL_CARD.md from the model_card.json document."""
    lines = [f"# Model card: {document['detector']} {document['version']}", ""]
    if document.get("summary"):
        lines += [str(document["summary"]), ""]
    lines += [
        f"- Method: `{document['method']}`",
        f"- Weights: `{document['weights_file']}`, sha256 `{document['weights_sha256']}`",
        f"- Image threshold: {document['thresholds']['image']} (specificity "
        f"{document['thresholds']['image_specificity_on_calibration_normals']} on the calibration normals)",
        f"- Pixel threshold: {document['thresholds']['pixel']} (quantile "
        f"{document['thresholds']['pixel_quantile_of_normal_maps']} of the normal maps' foreground pixels)",
        *_per_view_lines(document["thresholds"].get("per_view")),
        "",
    ]
    for key, title in (
        ("method_description", "Method"),
        ("training_command", "Training command"),
        ("training_data", "Training data"),
        ("calibration_data", "Calibration data"),
        ("licence", "Licence"),
        ("citations", "Citations"),
        ("metrics", "Validation metrics"),
        ("limitations", "Limitations"),
    ):
        value = document.get(key)
        if value in (None, "", [], {}):
            continue
        lines += [f"## {title}", ""]
        if isinstance(value, list):
            lines += [f"- {v}" for v in value]
        elif isinstance(value, dict):
            lines += ["```json", json.dumps(_jsonable(value), indent=2), "```"]
        elif key == "training_command":
            lines += ["```sh", str(value), "```"]
        else:
            lines.append(str(value))
        lines.append("")
    return "\n".join(lines)


def _per_view_lines(per_view: dict[str, Any] | None) -> list[str]:
    """Model-card lines for per-view thresholds (radiographs): the view's own or, with too few of its normals,
    the pooled one; the reported score is shifted so that the image threshold above stands for each."""
    if not per_view:
        return []
    lines = [
        "- Per view (View Position, else the view classifier): scores in standard deviations above that view's "
        "normals (out-of-fold training scores), shifted so that the image threshold applies to every view"
    ]
    for view, threshold in sorted(per_view.get("thresholds", {}).items()):
        mean, spread = per_view["stats"][view]
        count = per_view.get("counts", {}).get(view, 0)
        source = "own" if threshold != per_view.get("threshold") else "pooled"
        lines.append(
            f"  - {view}: threshold {threshold:.4g} ({source}; {count} calibration normals), normal raw score "
            f"{mean:.4g} ± {spread:.3g}"
        )
    return lines


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start
