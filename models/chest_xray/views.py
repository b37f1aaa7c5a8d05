"""The acquisition view of a frontal chest radiograph (AP or PA) and view-aware score calibration.

Why: an AP (bedside) film and a PA film of the same normal chest look different (magnified heart, scapulae over the
lungs, often supine), so a one-class score is higher for AP normals than for PA normals. With one threshold for both
views a worklist that mixes them ranks AP normals above PA abnormals: on held-out images with AP and PA in equal
shares the 1.2.0 chest detector's AUROC over both (0.696) was below each view's (0.709, 0.768). The remedy here:

- the view of each radiograph is View Position (0018,5101) where the header says AP or PA (CR Series, PS3.3
  C.8.1.1; DX Positioning, PS3.3 C.8.11.5), otherwise a logistic regression on the backbone's features, fitted on
  the training normals' views (no abnormal image is used);
- the raw score is expressed in standard deviations above the normals *of its view* (mean and spread of the
  training normals' out-of-fold scores, so a normal is never scored by a model that saw it);
- ``calibrate`` sets a threshold per view on the calibration normals of that view (the pooled threshold for a view
  with fewer than ``MIN_VIEW_NORMALS`` of them), and the reported score is shifted by the view's threshold minus the
  pooled one, so that one number, the pooled threshold, decides for every view (``is_abnormal``, the SR, the job
  database) while each view is held at its own specificity.

No torch in the calibration part; the classifier takes and returns tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dicom_node.models.base import DetectorError
from dicom_node.models.labels import VIEWS
from dicom_node.models.metrics import threshold_at_specificity

MIN_VIEW_NORMALS = 20  # fewer calibration normals of a view: its threshold is the pooled one
VIEW_GRID = 7  # the classifier reads the stride-16 features averaged to 7 x 7 (layout, not detail)


def view_features(patches: torch.Tensor) -> torch.Tensor:
    """(n, C, h, w) stride-16 features -> (n, C * 7 * 7): the classifier's input."""
    return F.adaptive_avg_pool2d(patches.float(), (VIEW_GRID, VIEW_GRID)).flatten(1)


class ViewClassifier:
    """Logistic regression PA-versus-AP on standardised features, classes weighted equally, L2 penalty.

    Fitted with L-BFGS; on cxr_nih (trained on the 269 train normals, 209 AP / 60 PA) it names the view of 148 of the
    150 val images (normals 50/50, abnormals 98/100) from the stride-16 features."""

    def __init__(self, tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        self.tensors: dict[str, torch.Tensor] = dict(tensors or {})

    @property
    def fitted(self) -> bool:
        return bool(self.tensors)

    def fit(self, features: torch.Tensor, views: Sequence[str], penalty: float = 1e-2) -> ViewClassifier:
        y = torch.tensor([v == "PA" for v in views], dtype=torch.float64)
        if not 0 < int(y.sum()) < len(y):
            raise DetectorError("the view classifier needs training images of both views (AP and PA)")
        x = features.double()
        mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
        z = (x - mean) / scale
        weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        share = y.mean()
        sample = torch.where(y > 0, 0.5 / share, 0.5 / (1 - share))
        optimiser = torch.optim.LBFGS([weight, bias], max_iter=200)

        def closure() -> torch.Tensor:
            optimiser.zero_grad()
            logits = z @ weight + bias
            loss = (sample * F.binary_cross_entropy_with_logits(logits, y, reduction="none")).mean()
            loss = loss + penalty * (weight * weight).sum()
            loss.backward()  # type: ignore[no-untyped-call]
            return loss

        with torch.enable_grad():
            optimiser.step(closure)  # type: ignore[no-untyped-call]
        self.tensors = {"mean": mean, "scale": scale, "weight": weight.detach(), "bias": bias.detach()}
        return self

    def logits(self, features: torch.Tensor) -> np.ndarray:
        """PA-versus-AP logit per image (positive: PA)."""
        if not self.fitted:
            raise DetectorError("the model has no view classifier (fit it again with the training images' views)")
        t = self.tensors
        z = (features.double() - t["mean"]) / t["scale"]
        return (z @ t["weight"] + t["bias"]).numpy()

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}{k}": v.float().contiguous() for k, v in self.tensors.items()}

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], prefix: str) -> ViewClassifier:
        return cls({k[len(prefix) :]: v.double() for k, v in tensors.items() if k.startswith(prefix)})


def view_of_logit(logit: float) -> str:
    return "PA" if logit > 0 else "AP"


@dataclass
class ViewCalibration:
    """Per view: the normals' raw-score mean and spread (``stats``), the threshold on the normalised score
    (``thresholds``) and how many calibration normals set it (``counts``); ``threshold`` is the pooled one."""

    stats: dict[str, tuple[float, float]]
    thresholds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    threshold: float = float("inf")

    @classmethod
    def from_normals(cls, raw: np.ndarray, views: Sequence[str]) -> ViewCalibration:
        """Mean and spread per view of the normals' (out-of-fold) raw scores; every view needs at least 5."""
        stats: dict[str, tuple[float, float]] = {}
        labels = np.asarray(views)
        for view in VIEWS:
            values = raw[labels == view]
            if len(values) < 5:
                raise DetectorError(f"{len(values)} training normals of view {view}: need at least 5 per view")
            stats[view] = (float(values.mean()), float(max(values.std(), 1e-6)))
        return cls(stats=stats)

    def normalised(self, raw: np.ndarray, views: Sequence[str]) -> np.ndarray:
        """Standard deviations above the normals of each image's view."""
        out = np.empty(len(raw), dtype=np.float64)
        for i, (value, view) in enumerate(zip(raw, views, strict=True)):
            mean, spread = self.stats[view]
            out[i] = (float(value) - mean) / spread
        return out

    def calibrate(self, raw: np.ndarray, views: Sequence[str], specificity: float) -> np.ndarray:
        """Thresholds from calibration normals: per view where it has ``MIN_VIEW_NORMALS``, the pooled one otherwise.
        Returns the normals' reported scores (:meth:`scores`)."""
        z = self.normalised(raw, views)
        labels = np.asarray(views)
        self.threshold = threshold_at_specificity(z, specificity)
        self.counts = {view: int((labels == view).sum()) for view in VIEWS}
        self.thresholds = {
            view: (
                threshold_at_specificity(z[labels == view], specificity)
                if self.counts[view] >= MIN_VIEW_NORMALS
                else self.threshold
            )
            for view in VIEWS
        }
        return self.scores(raw, views)

    def scores(self, raw: np.ndarray, views: Sequence[str]) -> np.ndarray:
        """The reported score: normalised, shifted so that the pooled threshold stands for each view's own."""
        z = self.normalised(raw, views)
        shift = np.array([self.thresholds.get(v, self.threshold) - self.threshold for v in views])
        return z - shift if len(z) else z

    def to_extra(self) -> dict[str, Any]:
        return {
            "stats": {k: list(v) for k, v in self.stats.items()},
            "thresholds": dict(self.thresholds),
            "counts": dict(self.counts),
            "threshold": self.threshold,
        }

    @classmethod
    def from_extra(cls, value: Mapping[str, Any]) -> ViewCalibration:
        return cls(
            stats={k: (float(v[0]), float(v[1])) for k, v in value["stats"].items()},
            thresholds={k: float(v) for k, v in value.get("thresholds", {}).items()},
            counts={k: int(v) for k, v in value.get("counts", {}).items()},
            threshold=float(value.get("threshold", float("inf"))),
        )
