"""PaDiM-style per-position Gaussians with a shared covariance (method ``padim``, the shipped chest_xray since 1.1.0;
the method's history and the reasons for each setting: models/chest_xray/detector.py and docs/benchmarks.md).

The ``config.strides`` features averaged to a ``grid`` x ``grid`` layout; per position the mean over the normals, one
covariance shared by all positions. A cell's distance is the Mahalanobis distance to the nearest position mean within
``radius`` cells; the raw image score (component ``padim``) is the mean distance over the lung-field cells.

Views (1.3.0): fitted with the training images' views, the method also keeps a view classifier (stride-16 layout,
models.radiograph_views) and per-view statistics of the normals' out-of-fold scores: the reported score is the raw
score in standard deviations above the normals of the image's view, shifted so that one image threshold holds each
view at its own specificity. Without views the reported score is the weighted sum of the z-scored components.

Map: a :class:`MapModel` fitted alongside (chest_xray: the intensity atlas, models.chest) when ``extra["map"]`` is
``"atlas"``; otherwise the distances inside the lung-field cells, upsampled and smoothed."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from dicom_node.models.base import DetectorError, ImageInfo
from dicom_node.models.chest_xray.views import ViewCalibration, ViewClassifier, view_features, view_of_logit
from dicom_node.models.config import DetectorConfig, Prepared
from dicom_node.models.labels import VIEWS
from dicom_node.models.methods.base import (
    Calibration,
    MethodScores,
    Progress,
    ScoringMethod,
    component_statistics,
    z_sum,
)
from dicom_node.models.methods.features import PatchFeatures, batches

logger = logging.getLogger(__name__)

PREFIX = "padim."
VIEW_PREFIX = "view."
STRIDE_CHANNELS = {
    8: {"efficientnet-lite0": 40, "efficientnet-lite2": 48},
    16: {"efficientnet-lite0": 112, "efficientnet-lite2": 120},
}
VIEW_STRIDE = 16  # the view classifier's features: layout of the thorax, scapulae, clavicles


@dataclass(frozen=True)
class PadimParams:
    """``extra["padim"]``: ``grid`` cells per side, ``ridge`` added to the (standardised) shared covariance,
    ``lung_fraction``, the share of a cell that must be lung field for the cell to count in the image score, and
    ``radius``, the neighbourhood (in cells) whose nearest mean a cell is compared with (0: its own mean only, the
    1.1.0 model; absent from a saved config means 0)."""

    grid: int = 28
    ridge: float = 1e-2
    lung_fraction: float = 0.5
    radius: int = 0

    @classmethod
    def from_extra(cls, value: dict[str, Any]) -> PadimParams:
        return cls(
            grid=int(value.get("grid", cls.grid)),
            ridge=float(value.get("ridge", cls.ridge)),
            lung_fraction=float(value.get("lung_fraction", cls.lung_fraction)),
            radius=int(value.get("radius", cls.radius)),
        )


class PositionalGaussian:
    """PaDiM with a shared covariance: a mean per grid position, one covariance for all positions.

    Features are standardised per channel (over all positions and normals), centred on their position's mean; the
    covariance of the centred vectors (plus ``ridge`` I) is shared by all positions. A position's distance is the
    Mahalanobis distance of its feature vector from its own position's mean. With 269 normals a covariance per
    position (PaDiM as published) would rest on 269 vectors in 40 dimensions; the shared one on 269 x grid^2."""

    def __init__(self, ridge: float = 1e-2) -> None:
        self.ridge = ridge
        self.tensors: dict[str, torch.Tensor] = {}

    def fit(self, features: torch.Tensor) -> PositionalGaussian:
        """``features`` (n, C, g, g) of the normals."""
        x = features.double()
        channels = x.shape[1]
        scale = x.transpose(0, 1).reshape(channels, -1).std(dim=1).clamp_min(1e-6)
        mean = x.mean(dim=0)
        centred = ((x - mean) / scale[:, None, None]).permute(0, 2, 3, 1).reshape(-1, channels)
        cov = centred.T @ centred / centred.shape[0]
        precision = torch.linalg.inv(cov + self.ridge * torch.eye(channels, dtype=cov.dtype))
        self.tensors = {"mean": mean, "scale": scale, "precision": precision}
        return self

    @torch.inference_mode()
    def distances(self, features: torch.Tensor, radius: int = 0) -> torch.Tensor:
        """Mahalanobis distance per position: (n, C, g, g) -> (n, g, g).

        With ``radius`` r > 0 the distance of a position is the minimum over the means of the (2r + 1)^2 positions
        around it (the grid's edge means repeated beyond the edge): tolerance to films shifted or scaled by up to r
        cells. The shared covariance is the same."""
        t = self.tensors
        x = features.double()
        scale = t["scale"][:, None, None]
        if radius <= 0:
            z = ((x - t["mean"]) / scale).permute(0, 2, 3, 1)
            return torch.einsum("nhwc,cd,nhwd->nhw", z, t["precision"], z).clamp_min(0).sqrt().float()
        rows, cols = t["mean"].shape[1:]
        padded = F.pad(t["mean"][None], (radius, radius, radius, radius), mode="replicate")[0]
        best: torch.Tensor | None = None
        for dy in range(2 * radius + 1):
            for dx in range(2 * radius + 1):
                z = ((x - padded[:, dy : dy + rows, dx : dx + cols]) / scale).permute(0, 2, 3, 1)
                dist = torch.einsum("nhwc,cd,nhwd->nhw", z, t["precision"], z)
                best = dist if best is None else torch.minimum(best, dist)
        assert best is not None
        return best.clamp_min(0).sqrt().float()

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}{name}": value.float().contiguous() for name, value in self.tensors.items()}

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], prefix: str, ridge: float) -> PositionalGaussian:
        model = cls(ridge)
        model.tensors = {
            name[len(prefix) :]: value.double() for name, value in tensors.items() if name.startswith(prefix)
        }
        return model


def lung_mean(dist: torch.Tensor, cells: torch.Tensor) -> np.ndarray:
    """Per image: the mean distance over its lung-field cells (over all cells when it has none)."""
    out = np.zeros(len(dist), dtype=np.float64)
    for i, (d, inside) in enumerate(zip(dist, cells, strict=True)):
        selected = d[inside]
        out[i] = float((selected if selected.numel() else d).mean())
    return out


def stride_channel_ranges(strides: Sequence[int], backbone: str) -> dict[int, tuple[int, int]]:
    """Channel range of each stride's block inside the backbone's concatenated patch features (ascending order)."""
    ranges: dict[int, tuple[int, int]] = {}
    start = 0
    for stride in sorted(strides):
        if stride not in STRIDE_CHANNELS:
            raise DetectorError(f"stride {stride} not available")
        width = STRIDE_CHANNELS[stride][backbone]
        ranges[stride] = (start, start + width)
        start += width
    return ranges


class MapModel(Protocol):
    """A map of the normals fitted in the same pass as the method (chest_xray: the intensity atlas)."""

    def add(self, prepared: Prepared) -> None:
        """Take in one prepared training normal."""

    def finish(self) -> None:
        """Fit from the normals taken in."""

    def maps(self, prepared: Sequence[Prepared]) -> np.ndarray:
        """(n, S, S) maps of prepared images."""

    def state(self) -> dict[str, torch.Tensor]: ...

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None: ...


class PadimMethod(ScoringMethod):
    """``defaults``: the detector's ``config.extra`` defaults (``padim``, ``map``, ``score_weights``) for configs
    that lack them; ``map_model``: fitted, saved and loaded with the method, its maps used when ``extra["map"]`` is
    ``"atlas"`` (an ``atlas`` component = each map's maximum joins the components)."""

    name = "padim"
    prefixes = (PREFIX, VIEW_PREFIX)

    def __init__(
        self,
        config: DetectorConfig,
        features: PatchFeatures,
        defaults: Mapping[str, Any] | None = None,
        map_model: MapModel | None = None,
    ) -> None:
        super().__init__(config, features)
        self.defaults = dict(defaults or {})
        self.map_model = map_model
        self.gaussian: PositionalGaussian | None = None
        self.view_classifier = ViewClassifier()

    def _extra(self, key: str) -> Any:
        return self.config.extra.get(key, self.defaults.get(key))

    def params(self) -> PadimParams:
        return PadimParams.from_extra(dict(self._extra("padim") or {}))

    @property
    def atlas_map(self) -> bool:
        return self._extra("map") == "atlas"

    # ----------------------------------------------------------------------------------------------- features
    def grid_features(self, batch: Sequence[Prepared]) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``config.strides`` features averaged to the grid, and the view classifier's input (the stride-16
        features averaged to 7 x 7); the backbone runs once, to the stride-16 block."""
        images = np.stack([p.image for p in batch])
        cfg = self.config
        strides = tuple(sorted(set(cfg.strides) | {VIEW_STRIDE}))
        feats = self.features.backbone.features(images, strides=strides, pooled=False, pool_size=cfg.pool_size)
        assert feats.patches is not None
        patches = feats.patches.float()
        ranges = stride_channel_ranges(strides, cfg.backbone)
        padim = torch.cat([patches[:, a:b] for s, (a, b) in ranges.items() if s in cfg.strides], dim=1)
        grid = self.params().grid
        view_start, view_end = ranges[VIEW_STRIDE]
        return F.adaptive_avg_pool2d(padim, (grid, grid)).cpu(), view_features(patches[:, view_start:view_end]).cpu()

    def lung_cells(self, batch: Sequence[Prepared], grid: int) -> torch.Tensor:
        """(n, grid, grid): cells that are more than ``lung_fraction`` lung field (all cells when not used)."""
        return self.features.grid_masks(batch, (grid, grid), fraction=self.params().lung_fraction)

    # ------------------------------------------------------------------------------------------------ fitting
    def fit(
        self, prepared: Iterable[Prepared], progress: Progress | None, info: Sequence[ImageInfo] | None
    ) -> dict[str, Any]:
        """The Gaussians (and the map model) on the normals; with their views (``info``) also the view classifier
        and the per-view score normalisation (``extra["views"]``); without views one score scale for both."""
        rows: list[torch.Tensor] = []
        cells: list[torch.Tensor] = []
        views: list[torch.Tensor] = []
        count = 0
        params = self.params()
        for batch in batches(prepared, self.config.batch_size):
            if self.map_model is not None:
                for item in batch:
                    self.map_model.add(item)
            grid, view_input = self.grid_features(batch)
            rows.append(grid)
            cells.append(self.lung_cells(batch, params.grid))
            views.append(view_input)
            count += len(batch)
            if progress:
                progress(count)
        if count == 0:
            raise DetectorError("no training images")
        if self.map_model is not None:
            self.map_model.finish()
        features = torch.cat(rows)
        self.gaussian = PositionalGaussian(params.ridge).fit(features)
        self.view_classifier = ViewClassifier()
        known = [i for i, item in enumerate(info or []) if item.view in VIEWS]
        if info is None or not known:
            logger.warning("chest_xray fitted without the training images' views: one score scale for AP and PA")
            return {"views": None}
        if len(info) != count:
            raise DetectorError(f"{len(info)} image descriptions for {count} training images")
        labels = [str(info[i].view) for i in known]
        self.view_classifier.fit(torch.cat(views)[known], labels)
        out_of_fold = self._out_of_fold_scores(features, torch.cat(cells), info)
        calibration = ViewCalibration.from_normals(out_of_fold[known], labels)
        logger.info("per-view normal scores (out of fold): %s", calibration.stats)
        return {"views": calibration.to_extra()}

    def _out_of_fold_scores(
        self, features: torch.Tensor, cells: torch.Tensor, info: Sequence[ImageInfo], folds: int = 5
    ) -> np.ndarray:
        """Each training normal's raw score from a model fitted on the other folds (a patient's images in one fold):
        the scores a normal the model has not seen gets, which the per-view normalisation must describe."""
        params = self.params()
        groups = [item.patient or f"image-{i}" for i, item in enumerate(info)]
        order = {g: k for k, g in enumerate(np.random.default_rng(self.config.seed).permutation(sorted(set(groups))))}
        fold = np.array([order[g] % folds for g in groups])
        scores = np.zeros(len(groups), dtype=np.float64)
        for k in range(folds):
            held = np.flatnonzero(fold == k)
            if len(held) == 0:
                continue
            model = PositionalGaussian(params.ridge).fit(features[np.flatnonzero(fold != k)])
            dist = model.distances(features[held], radius=params.radius)
            scores[held] = lung_mean(dist, cells[held])
        return scores

    # ------------------------------------------------------------------------------------------------ scoring
    def score(self, prepared: Sequence[Prepared]) -> MethodScores:
        """Raw score = mean per-position Mahalanobis distance (to the nearest mean within ``radius`` cells) over the
        lung-field cells (all cells when none); ``view_logit`` where the view classifier is fitted; map = the map
        model's (plus its maximum as the ``atlas`` component) or the distances inside those cells, upsampled and
        smoothed."""
        if self.gaussian is None:
            raise DetectorError("the model has no per-position Gaussians (fit it again)")
        cfg = self.config
        size = cfg.image_size
        scores: list[float] = []
        maps = np.zeros((len(prepared), size, size), dtype=np.float32)
        offset = 0
        logits: list[float] = []
        atlas = self.atlas_map
        for batch in batches(iter(prepared), cfg.batch_size):
            grid, view_input = self.grid_features(batch)
            dist = self.gaussian.distances(grid, radius=self.params().radius)
            inside = self.lung_cells(batch, int(dist.shape[-1]))
            scores.extend(lung_mean(dist, inside).tolist())
            if self.view_classifier.fitted:
                logits.extend(self.view_classifier.logits(view_input).tolist())
            if not atlas:
                maps[offset : offset + len(batch)] = self.features.distance_maps(batch, dist, inside)
            offset += len(batch)
        components = {"padim": np.asarray(scores, dtype=np.float64)}
        if logits:
            components["view_logit"] = np.asarray(logits, dtype=np.float64)
        if atlas:
            if self.map_model is None:
                raise DetectorError("the detector has no atlas map (extra['map'] is 'atlas')")
            maps = self.map_model.maps(prepared)
            components["atlas"] = maps.reshape(len(prepared), -1).max(axis=1).astype(np.float64)
        return MethodScores(components, maps)

    # ------------------------------------------------------------------------------------------------- views
    def view_calibration(self) -> ViewCalibration | None:
        """The per-view normalisation of a model fitted with views (1.3.0 on); None for older models."""
        value = self.config.extra.get("views")
        return ViewCalibration.from_extra(value) if value else None

    def views_of(self, prepared: Sequence[Prepared], components: Mapping[str, np.ndarray]) -> list[str]:
        """Each image's view: the declared one (View Position, a labels file) where AP or PA, else the classifier's.
        A declared view the image does not look like is logged (a wrong header is worth an admin's look)."""
        logits = components.get("view_logit")
        if logits is None:
            raise DetectorError("the model has no view classifier (fit it again with the training images' views)")
        views = []
        for p, logit in zip(prepared, logits, strict=True):
            seen = view_of_logit(float(logit))
            declared = p.info.view if p.info.view in VIEWS else None
            if declared is not None and declared != seen and abs(float(logit)) > 4.0:
                logger.warning(
                    "View Position %s, but the image looks %s (logit %.1f): using %s", declared, seen, logit, declared
                )
            views.append(declared or seen)
        return views

    def image_scores(
        self, prepared: Sequence[Prepared], components: Mapping[str, np.ndarray], statistics: Mapping[str, Any]
    ) -> np.ndarray:
        """Per view normalised (fitted with views), else the weighted sum of the z-scored components (weights in
        ``extra["score_weights"]``; the view logit and the atlas maximum weigh 0 unless given)."""
        calibration = self.view_calibration()
        if calibration is not None:
            return calibration.scores(components["padim"], self.views_of(prepared, components))
        scored = {k: v for k, v in components.items() if k != "view_logit"}
        if len(scored) == 1:
            return next(iter(scored.values()))
        weights = {"atlas": 0.0, "view_logit": 0.0, **self._extra("score_weights")}
        return z_sum(components, statistics, weights)

    def calibrate(self, prepared: Sequence[Prepared], specificity: float) -> Calibration:
        """With per-view normalisation: a threshold per view (``models.radiograph_views.ViewCalibration``), recorded
        in ``extra["views"]``; the scores returned are the reported ones, the threshold the pooled one."""
        scored = self.score(prepared)
        calibration = self.view_calibration()
        if calibration is None:
            return self.calibration(prepared, scored, {}, specificity)
        raw, views = scored.components["padim"], self.views_of(prepared, scored.components)
        scores = calibration.calibrate(raw, views, specificity)
        statistics = component_statistics(scored.components)
        return Calibration(statistics, scores, scored.maps, calibration.threshold, {"views": calibration.to_extra()})

    def card_thresholds(self) -> dict[str, Any]:
        calibration = self.view_calibration()
        return {"per_view": calibration.to_extra()} if calibration is not None else {}

    # -------------------------------------------------------------------------------------------- persistence
    def state(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.gaussian is not None:
            out.update(self.gaussian.state(PREFIX))
        if self.map_model is not None:
            out.update(self.map_model.state())
        if self.view_classifier.fitted:
            out.update(self.view_classifier.state(VIEW_PREFIX))
        return out

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if self.map_model is not None:
            self.map_model.load_state(tensors)
        if any(k.startswith(PREFIX) for k in tensors):
            self.gaussian = PositionalGaussian.from_state(tensors, PREFIX, self.params().ridge)
        self.view_classifier = ViewClassifier.from_state(tensors, VIEW_PREFIX)
