"""The denoising autoencoder (method ``autoencoder``; experiments.autoencoder): trained from scratch on the
prepared normals; map = smoothed |x - x̂| in the foreground; score = mean of its top pixels (component
``autoencoder``). Settings ``ae_train_seconds``, ``ae_max_epochs`` in ``config.extra``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from dicom_node.models.base import DetectorError, ImageInfo
from dicom_node.models.config import Prepared
from dicom_node.models.methods.base import MethodScores, Progress, ScoringMethod, with_prefix
from experiments.autoencoder import DenoisingAutoencoder, fit_autoencoder, load_autoencoder, score_autoencoder

PREFIX = "autoencoder."


class AutoencoderMethod(ScoringMethod):
    name = "autoencoder"
    prefixes = (PREFIX,)
    model: DenoisingAutoencoder | None = None

    def fit(
        self, prepared: Iterable[Prepared], progress: Progress | None, info: Sequence[ImageInfo] | None = None
    ) -> dict[str, Any]:
        items = list(prepared)
        if not items:
            raise DetectorError("no training images")
        if progress:
            progress(len(items))
        self.model = fit_autoencoder(items, self.config, self.device)
        return {}

    def score(self, prepared: Sequence[Prepared]) -> MethodScores:
        if self.model is None:
            raise DetectorError("the model has no autoencoder (fit it first)")
        scores, maps = score_autoencoder(self.model, prepared, self.config, self.device)
        return MethodScores({"autoencoder": scores}, maps)

    def state(self) -> dict[str, torch.Tensor]:
        if self.model is None:
            return {}
        return {f"{PREFIX}{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if any(k.startswith(PREFIX) for k in tensors):
            self.model = load_autoencoder(with_prefix(tensors, PREFIX), self.config, self.device)
