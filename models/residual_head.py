"""A linear head on the difference between a query patch and its nearest normal patch, trained to tell synthetic
lesions (models.synthetic) from normal tissue.

The nearest-neighbour distance alone says *how far* a patch is from the normals; on brain MRI a bright glioma can
be no farther than normal variation (a FLAIR lesion matches bright scalp fat or a T2 ventricle of a comparable slice
at an ordinary distance), yet it differs in a consistent *direction*. The head sees the residual vector (query
minus its nearest retrieved normal patch, in the bank's whitened PCA space) and the distance, standardised, and a
logistic regression learns which directions lesions take. Training rows: every training patch against the
retrieved normals of *other* images (what a normal patch's residual looks like when its own image is not in the
bank), and the patches of synthetic-lesion copies of the training images (label: the patch is mostly lesion).

The patch score stays on the distance scale so maps, thresholds and the rest of the pipeline are unchanged:

    score = max(0, distance + weight * distance_std * (logit - logit_mean) / logit_std)

with the logit statistics and ``distance_std`` taken on the normal training rows, so ``weight`` says how many
normal standard deviations of distance one normal standard deviation of the head is worth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

STATE_KEYS = ("input_mean", "input_std", "coef", "bias", "logit_mean", "logit_std", "distance_std")


class ResidualHead:
    def __init__(self, weight: float = 4.0) -> None:
        self.weight = float(weight)
        self.input_mean: torch.Tensor | None = None  # (d + 1,)
        self.input_std: torch.Tensor | None = None  # (d + 1,)
        self.coef: torch.Tensor | None = None  # (d + 1,)
        self.bias: torch.Tensor | None = None  # (1,)
        self.logit_mean: torch.Tensor | None = None  # (1,)
        self.logit_std: torch.Tensor | None = None  # (1,)
        self.distance_std: torch.Tensor | None = None  # (1,)

    @staticmethod
    def inputs(residuals: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
        return torch.cat([residuals.float(), distances.float()[:, None]], 1)

    def fit(
        self,
        residuals: torch.Tensor,
        distances: torch.Tensor,
        labels: torch.Tensor,
        epochs: int = 6,
        batch_size: int = 4096,
        seed: int = 0,
    ) -> ResidualHead:
        """``labels``: 1 for synthetic-lesion patches, 0 for normal patches (M,). Class-balanced logistic loss."""
        if labels.sum() == 0 or labels.sum() == labels.numel():
            raise ValueError("the residual head needs both normal and synthetic-lesion patches")
        x = self.inputs(residuals, distances)
        y = labels.float()
        self.input_mean, self.input_std = x.mean(0), x.std(0) + 1e-6
        x = (x - self.input_mean) / self.input_std
        generator = torch.Generator().manual_seed(seed)
        linear = torch.nn.Linear(x.shape[1], 1)
        with torch.no_grad():  # a seeded start: the default init draws from the global generator
            linear.weight.normal_(0.0, 0.01, generator=generator)
            linear.bias.zero_()
        optimiser = torch.optim.Adam(linear.parameters(), lr=3e-3)
        positive_weight = (1 - y.mean()) / y.mean()
        with torch.enable_grad():
            for _ in range(epochs):
                order = torch.randperm(x.shape[0], generator=generator)
                for start in range(0, x.shape[0], batch_size):
                    rows = order[start : start + batch_size]
                    loss = F.binary_cross_entropy_with_logits(
                        linear(x[rows])[:, 0], y[rows], pos_weight=positive_weight
                    )
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
        self.coef, self.bias = linear.weight.detach()[0].clone(), linear.bias.detach().clone()
        normal = y == 0
        logits = self.logits(residuals[normal], distances[normal])
        self.logit_mean, self.logit_std = logits.mean()[None], logits.std()[None] + 1e-6
        self.distance_std = distances[normal].float().std()[None] + 1e-6
        return self

    def logits(self, residuals: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
        if self.coef is None or self.bias is None or self.input_mean is None or self.input_std is None:
            raise RuntimeError("residual head not fitted")
        x = (self.inputs(residuals, distances) - self.input_mean) / self.input_std
        return x @ self.coef + self.bias

    def scores(self, residuals: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
        """Patch scores on the distance scale (M,), never negative."""
        assert self.logit_mean is not None and self.logit_std is not None and self.distance_std is not None
        z = (self.logits(residuals, distances) - self.logit_mean) / self.logit_std
        return (distances.float() + self.weight * self.distance_std * z).clamp_min(0)

    # ------------------------------------------------------------------------------------------- persistence
    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        tensors = {key: getattr(self, key) for key in STATE_KEYS}
        if any(v is None for v in tensors.values()):
            raise RuntimeError("residual head not fitted")
        return {f"{prefix}{k}": v.contiguous() for k, v in tensors.items() if v is not None}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], prefix: str, weight: float) -> ResidualHead:
        head = cls(weight)
        for key in STATE_KEYS:
            setattr(head, key, tensors[f"{prefix}{key}"].float())
        return head
