"""Neighbour-conditioned patch memory (SPADE, Cohen & Hoshen 2020, "Sub-Image Anomaly Detection with Deep Pyramid
Correspondences"), with a whitened PCA of the patch features.

PatchCore compares each query patch with the patches of *all* normals. On brain MRI that lets a tumour patch match
a normal patch of another sequence or slice level (bright CSF on T2, bright fat at the skull base), and makes the
unusual anatomy of skull-base and vertex slices look anomalous. SPADE first retrieves the ``k_images`` normal images
most like the query (Euclidean distance of standardised image descriptors, here the mean of the foreground patch
features) and compares each query patch only with the foreground patches of those images: a patch is anomalous
when it is unlike *comparable* normal images.

The patch features are projected onto the leading ``pca_dims`` principal components of the training patches and,
with ``whiten``, each component is divided by its singular value relative to the first (so distances weigh the
components equally, as a Mahalanobis distance in that subspace does). On the brain data this both shrinks the stored
bank (every training patch is kept, 16 numbers each) and raised val AUROC (docs/benchmarks.md).

With a :class:`~models.residual_head.ResidualHead` (``fit_head``), a patch's score is the distance corrected by
the direction of its residual to the nearest normal patch, learnt from synthetic lesions (models.synthetic).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from dicom_node.models.patchcore import PatchMemoryBank
from dicom_node.models.residual_head import ResidualHead

logger = logging.getLogger(__name__)


class NeighbourPatchBank:
    """Per-image foreground patches of the training normals (projected), and the image descriptors to retrieve them."""

    def __init__(self, k_images: int = 20, pca_dims: int = 16, whiten: bool = True, max_pca_samples: int = 50_000):
        self.k_images = int(k_images)
        self.pca_dims = int(pca_dims)
        self.whiten = bool(whiten)
        self.max_pca_samples = int(max_pca_samples)
        self.patch_mean: torch.Tensor | None = None  # (C,)
        self.projection: torch.Tensor | None = None  # (C, d)
        self.descriptor_mean: torch.Tensor | None = None  # (C,)
        self.descriptor_std: torch.Tensor | None = None  # (C,)
        self.descriptors: torch.Tensor | None = None  # (N, C), standardised
        self.patches: torch.Tensor | None = None  # (P, d) float16, image i's rows at offsets[i]:offsets[i+1]
        self.offsets: torch.Tensor | None = None  # (N + 1,) int64
        self.head: ResidualHead | None = None

    @staticmethod
    def descriptor(rows: torch.Tensor) -> torch.Tensor:
        """An image's descriptor: the mean of its foreground patch features (C,)."""
        return rows.float().mean(0) if rows.shape[0] else torch.zeros(rows.shape[1])

    def fit(self, per_image: Sequence[torch.Tensor], seed: int = 0) -> NeighbourPatchBank:
        """``per_image[i]``: (P_i, C) foreground patch features of training image i (images without foreground are
        skipped)."""
        images = [rows for rows in per_image if rows.shape[0] > 0]
        if not images:
            raise ValueError("no training image has foreground patches")
        all_rows = torch.cat(images).float()
        generator = torch.Generator().manual_seed(seed)
        sample = all_rows
        if sample.shape[0] > self.max_pca_samples:
            sample = sample[torch.randperm(sample.shape[0], generator=generator)[: self.max_pca_samples]]
        mean = sample.mean(0)
        _, singular, vh = torch.linalg.svd(sample - mean, full_matrices=False)
        dims = min(self.pca_dims, vh.shape[0])
        projection = vh[:dims].T.contiguous()
        if self.whiten:
            projection = projection / (singular[:dims] / singular[0]).clamp_min(1e-6)
        self.patch_mean, self.projection = mean, projection
        descriptors = torch.stack([self.descriptor(rows) for rows in images])
        self.descriptor_mean = descriptors.mean(0)
        self.descriptor_std = descriptors.std(0) + 1e-6
        self.descriptors = (descriptors - self.descriptor_mean) / self.descriptor_std
        self.patches = self.project(all_rows).to(torch.float16)
        counts = torch.tensor([0] + [rows.shape[0] for rows in images])
        self.offsets = torch.cumsum(counts, 0)
        logger.info("neighbour bank: %d images, %d patches, %d dims", len(images), self.patches.shape[0], dims)
        return self

    @property
    def image_count(self) -> int:
        """Reference images in the bank."""
        return 0 if self.offsets is None else len(self.offsets) - 1

    def add_images(self, per_image: Sequence[torch.Tensor]) -> int:
        """Add reference images (``per_image[i]``: (P_i, C) foreground patch features; those without foreground are
        skipped) to a fitted bank, in its projection and descriptor scale (both stay as fitted). Returns how many
        were added; a fitted residual head is kept as it is."""
        if self.descriptors is None or self.patches is None or self.offsets is None:
            raise RuntimeError("neighbour bank not fitted")
        assert self.descriptor_mean is not None and self.descriptor_std is not None
        images = [rows for rows in per_image if rows.shape[0] > 0]
        if not images:
            return 0
        descriptors = torch.stack([self.descriptor(rows) for rows in images])
        standardised = (descriptors - self.descriptor_mean) / self.descriptor_std
        self.descriptors = torch.cat([self.descriptors, standardised])
        self.patches = torch.cat([self.patches, *(self.project(rows).to(torch.float16) for rows in images)])
        counts = torch.tensor([rows.shape[0] for rows in images])
        self.offsets = torch.cat([self.offsets, self.offsets[-1] + torch.cumsum(counts, 0)])
        return len(images)

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        assert self.patch_mean is not None and self.projection is not None, "bank not fitted"
        return (rows.float() - self.patch_mean.to(rows.device)) @ self.projection.to(rows.device)

    def neighbours(self, rows: torch.Tensor, exclude: int | None = None) -> torch.Tensor:
        """Indices of the ``k_images`` training images nearest to the image whose foreground patches are ``rows``
        (``exclude``: a training image that may not be chosen, for cross-fitting)."""
        assert self.descriptor_mean is not None and self.descriptor_std is not None, "bank not fitted"
        return self._nearest_images((self.descriptor(rows.cpu()) - self.descriptor_mean) / self.descriptor_std, exclude)

    def _nearest_images(self, descriptor: torch.Tensor, exclude: int | None) -> torch.Tensor:
        assert self.descriptors is not None, "bank not fitted"
        distance = torch.cdist(descriptor[None], self.descriptors)[0]
        if exclude is not None:
            distance[exclude] = float("inf")
        k = min(self.k_images, self.descriptors.shape[0] - (exclude is not None))
        return torch.topk(distance, k, largest=False).indices

    def match(self, rows: torch.Tensor, exclude: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances (M,) of an image's foreground patch features ``rows`` (M, C) to their nearest patch among the
        retrieved normals, and the residuals (M, d): projected query minus that patch."""
        return self._residuals(self.project(rows).cpu(), self.neighbours(rows, exclude).tolist())

    def _residuals(self, projected: torch.Tensor, chosen: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        bank = torch.cat([self.image_rows(j) for j in chosen])
        nearest = PatchMemoryBank(bank).nearest(projected)
        residuals = projected - bank[nearest]
        return residuals.norm(dim=1), residuals

    def image_rows(self, index: int) -> torch.Tensor:
        """Projected foreground patches of training image ``index`` (float32)."""
        assert self.patches is not None and self.offsets is not None, "bank not fitted"
        return self.patches[self.offsets[index] : self.offsets[index + 1]].float()

    @torch.inference_mode()
    def distances(self, patches: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
        """Patch scores (n, h, w) of the foreground patches of ``patches`` (n, C, h, w): the nearest-neighbour
        distance to the patches of each image's retrieved normals, corrected by the residual head when there is
        one; 0 outside ``foreground`` (n, h, w) bool."""
        if self.patches is None or self.offsets is None:
            raise RuntimeError("neighbour bank not fitted")
        n, _, h, w = patches.shape
        out = torch.zeros(n, h, w)
        for i in range(n):
            mask = foreground[i].to(patches.device)
            rows = patches[i].permute(1, 2, 0)[mask]
            if rows.shape[0] == 0:
                continue
            distance, residual = self.match(rows)
            out[i][mask.cpu()] = distance if self.head is None else self.head.scores(residual, distance)
        return out

    def fit_head(
        self,
        synthetic: Sequence[tuple[int, torch.Tensor, torch.Tensor]],
        weight: float,
        seed: int = 0,
    ) -> ResidualHead:
        """Fit the residual head. ``synthetic``: (training image index in the bank, foreground patch features
        (M, C) of a synthetic-lesion copy of that image, lesion label per patch (M,) bool). Each training image and
        each copy is matched against the retrieved normals *other than* its own image (cross-fitting)."""
        if self.offsets is None:
            raise RuntimeError("neighbour bank not fitted")
        residuals, distances, labels = [], [], []
        assert self.descriptors is not None
        for index in range(len(self.offsets) - 1):
            rows = self.image_rows(index)
            distance, residual = self._residuals(rows, self._nearest_images(self.descriptors[index], index).tolist())
            residuals.append(residual)
            distances.append(distance)
            labels.append(torch.zeros(rows.shape[0]))
        for index, rows, lesion in synthetic:
            distance, residual = self.match(rows, exclude=index)
            residuals.append(residual)
            distances.append(distance)
            labels.append(lesion.float())
        all_labels = torch.cat(labels)
        self.head = ResidualHead(weight).fit(torch.cat(residuals), torch.cat(distances), all_labels, seed=seed)
        logger.info(
            "residual head: %d normal and %d synthetic-lesion patches",
            int((all_labels == 0).sum()),
            int(all_labels.sum()),
        )
        return self.head

    # ------------------------------------------------------------------------------------------- persistence
    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        tensors = {
            "patch_mean": self.patch_mean,
            "projection": self.projection,
            "descriptor_mean": self.descriptor_mean,
            "descriptor_std": self.descriptor_std,
            "descriptors": self.descriptors,
            "patches": self.patches,
            "offsets": self.offsets,
        }
        if any(v is None for v in tensors.values()):
            raise RuntimeError("neighbour bank not fitted")
        out = {f"{prefix}{k}": v.contiguous() for k, v in tensors.items() if v is not None}
        if self.head is not None:
            out.update(self.head.state(f"{prefix}head."))
        return out

    @classmethod
    def from_state(
        cls, tensors: dict[str, torch.Tensor], prefix: str, k_images: int = 20, head_weight: float = 4.0
    ) -> NeighbourPatchBank:
        """A fitted bank from :meth:`state`; the stored projection is already whitened (``whiten`` is a fit option).
        ``head_weight``: the residual head's weight, when the state has a head (a setting, not a fitted value)."""
        bank = cls(k_images=k_images)
        bank.patch_mean = tensors[f"{prefix}patch_mean"].float()
        bank.projection = tensors[f"{prefix}projection"].float()
        bank.pca_dims = int(bank.projection.shape[1])
        bank.descriptor_mean = tensors[f"{prefix}descriptor_mean"].float()
        bank.descriptor_std = tensors[f"{prefix}descriptor_std"].float()
        bank.descriptors = tensors[f"{prefix}descriptors"].float()
        bank.patches = tensors[f"{prefix}patches"]
        bank.offsets = tensors[f"{prefix}offsets"].long()
        if f"{prefix}head.coef" in tensors:
            bank.head = ResidualHead.from_state(tensors, f"{prefix}head.", head_weight)
        return bank
