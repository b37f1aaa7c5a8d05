"""The residual head: learns the direction in which lesions differ from their nearest normal patch, which the
distance alone cannot see; persists; refuses one-class training data."""

from __future__ import annotations

import pytest
import torch

from dicom_node.models.metrics import auroc
from dicom_node.models.residual_head import ResidualHead


def _residuals(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal residuals point anywhere; lesion residuals point along +x; both have the same length distribution."""
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(n, 4, generator=generator)
    lesion = torch.randn(n, 4, generator=generator)
    lesion = lesion.norm(dim=1, keepdim=True) * torch.tensor([1.0, 0.0, 0.0, 0.0]) + 0.1 * lesion
    return normal, lesion


def test_head_separates_what_the_distance_cannot() -> None:
    normal, lesion = _residuals(2000, 0)
    residuals = torch.cat([normal, lesion])
    labels = torch.cat([torch.zeros(len(normal)), torch.ones(len(lesion))])
    head = ResidualHead(weight=4.0).fit(residuals, residuals.norm(dim=1), labels)
    test_normal, test_lesion = _residuals(500, 1)
    test = torch.cat([test_normal, test_lesion])
    truth = torch.cat([torch.zeros(500), torch.ones(500)]).numpy()
    by_distance = auroc(truth, test.norm(dim=1).numpy())
    by_head = auroc(truth, head.scores(test, test.norm(dim=1)).numpy())
    assert by_distance < 0.65
    assert by_head > 0.8
    assert float(head.scores(test, test.norm(dim=1)).min()) >= 0.0


def test_state_round_trip_and_one_class_data_refused() -> None:
    normal, lesion = _residuals(300, 2)
    residuals = torch.cat([normal, lesion])
    labels = torch.cat([torch.zeros(300), torch.ones(300)])
    head = ResidualHead(weight=2.0).fit(residuals, residuals.norm(dim=1), labels)
    copy = ResidualHead.from_state(head.state("h."), "h.", weight=2.0)
    assert torch.allclose(copy.scores(normal, normal.norm(dim=1)), head.scores(normal, normal.norm(dim=1)))
    with pytest.raises(ValueError, match="both normal and synthetic"):
        ResidualHead().fit(normal, normal.norm(dim=1), torch.zeros(300))
