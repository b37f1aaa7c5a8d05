"""The SPADE neighbour bank: retrieval of comparable normals, patch distances against them only, persistence."""

from __future__ import annotations

import torch

from dicom_node.models.neighbour_bank import NeighbourPatchBank


def _two_kinds(per_kind: int = 6, patches: int = 20, channels: int = 8) -> list[torch.Tensor]:
    """Normals of two kinds (think: two sequences) whose patches live in different parts of feature space."""
    generator = torch.Generator().manual_seed(0)
    images = []
    for kind in (0, 1):
        centre = torch.zeros(channels)
        centre[kind] = 10.0
        for _ in range(per_kind):
            images.append(centre + 0.1 * torch.randn(patches, channels, generator=generator))
    return images


def _as_grid(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, C) rows → (1, C, 1, P) patch grid and an all-foreground mask."""
    return rows.T[None, :, None, :], torch.ones(1, 1, rows.shape[0], dtype=torch.bool)


def test_retrieves_images_of_the_same_kind() -> None:
    images = _two_kinds()
    bank = NeighbourPatchBank(k_images=4, pca_dims=4).fit(images)
    chosen = bank.neighbours(images[8] + 0.01)
    assert all(6 <= int(i) < 12 for i in chosen)


def test_a_patch_normal_elsewhere_is_anomalous_for_its_neighbours() -> None:
    images = _two_kinds()
    bank = NeighbourPatchBank(k_images=4, pca_dims=4, whiten=False).fit(images)
    query = images[0].clone()
    normal_grid, mask = _as_grid(query)
    baseline = bank.distances(normal_grid, mask)
    # One patch of a kind-0 image replaced by a kind-1 patch: normal in the training set as a whole (PatchCore would
    # find a match), anomalous among the kind-0 images SPADE compares it with.
    query[5] = images[7][0]
    grid, mask = _as_grid(query)
    dist = bank.distances(grid, mask)
    assert dist[0, 0, 5] > 5 * float(baseline.max())
    others = torch.cat([dist[0, 0, :5], dist[0, 0, 6:]])
    assert float(others.max()) < 0.5 * float(dist[0, 0, 5])


def test_background_gets_zero_and_state_round_trips() -> None:
    images = _two_kinds()
    bank = NeighbourPatchBank(k_images=3, pca_dims=3).fit(images)
    grid, mask = _as_grid(images[2])
    mask[0, 0, :4] = False
    dist = bank.distances(grid, mask)
    assert torch.all(dist[0, 0, :4] == 0)
    copy = NeighbourPatchBank.from_state(bank.state("spade."), "spade.", k_images=3)
    assert copy.pca_dims == 3
    assert torch.allclose(copy.distances(grid, mask), dist, atol=1e-2)


def test_head_fitted_from_synthetic_copies_is_used_and_persisted() -> None:
    images = _two_kinds()
    bank = NeighbourPatchBank(k_images=3, pca_dims=4, whiten=False).fit(images)
    generator = torch.Generator().manual_seed(1)
    synthetic = []
    for index, rows in enumerate(images):
        copy = rows.clone()
        copy[:5, 2] += 3.0  # "lesions" push channel 2 up
        label = torch.zeros(rows.shape[0], dtype=torch.bool)
        label[:5] = True
        synthetic.append((index, copy + 0.01 * torch.randn(copy.shape, generator=generator), label))
    bank.fit_head(synthetic, weight=2.0)
    assert bank.head is not None
    query = images[1].clone()
    query[7, 2] += 3.0
    grid, mask = _as_grid(query)
    scores = bank.distances(grid, mask)
    assert int(scores[0, 0].argmax()) == 7
    copy = NeighbourPatchBank.from_state(bank.state("spade."), "spade.", k_images=3, head_weight=2.0)
    assert copy.head is not None
    assert torch.allclose(copy.distances(grid, mask), scores, atol=1e-2)
