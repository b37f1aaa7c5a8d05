"""Backbone features and the patch-grid helpers the feature methods share (SPADE, PaDiM, the experiments' PatchCore).

:class:`PatchFeatures` owns the frozen backbone of one detector (created on first use) and knows the detector's
configuration: which strides, local averaging, foreground rules, map smoothing and top-k image score it uses."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from dicom_node.models.backbones import EfficientNetLiteBackbone
from dicom_node.models.config import DetectorConfig, Prepared


def batches(items: Iterable[Prepared], size: int) -> Iterator[list[Prepared]]:
    """``items`` in lists of ``size`` (the last one shorter)."""
    batch: list[Prepared] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class PatchFeatures:
    """The detector's backbone and patch-grid geometry. ``channels_last``: run the backbone with channels-last
    weights (the depthwise convolutions of EfficientNet-Lite run about 1.3x faster on the CPU that way)."""

    def __init__(self, config: DetectorConfig, device: torch.device, channels_last: bool = False) -> None:
        self.config = config
        self.device = device
        self.channels_last = channels_last
        self._backbone: EfficientNetLiteBackbone | None = None

    @property
    def backbone(self) -> EfficientNetLiteBackbone:
        if self._backbone is None:
            self._backbone = EfficientNetLiteBackbone(self.config.backbone, self.device)
            if self.channels_last:
                self._backbone.model = self._backbone.model.to(memory_format=torch.channels_last)
        return self._backbone

    def extract(
        self, batch: Sequence[Prepared], patches: bool = True, pooled: bool = False
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(patch features (n, C, h, w) at ``config.strides`` or None, pooled global features (n, D) or None)."""
        images = np.stack([p.image for p in batch])
        feats = self.backbone.features(
            images,
            strides=self.config.strides if patches else (),
            pooled=pooled,
            pool_size=self.config.pool_size,
        )
        return feats.patches, feats.pooled

    def grid_masks(
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

    def distance_maps(self, batch: Sequence[Prepared], dist: torch.Tensor, cells: torch.Tensor) -> np.ndarray:
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

    def patch_scores(self, batch: Sequence[Prepared], dist: torch.Tensor) -> list[float]:
        """Image scores from patch distances (n, h, w): mean of the top ``topk_fraction`` of the distances,
        locally averaged over ``score_pool`` patches within the foreground (a lesion is a blob of high distances,
        noise is isolated patches), taken inside the foreground eroded by ``score_rim_patches``."""
        cfg = self.config
        grid = (dist.shape[1], dist.shape[2])
        rim = cfg.rim_patches if cfg.score_rim_patches is None else cfg.score_rim_patches
        inside = self.grid_masks(batch, grid, rim)
        values = dist
        if cfg.score_pool > 1:
            fg = self.grid_masks(batch, grid, 0).float()[:, None]
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
