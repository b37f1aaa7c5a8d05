"""A small denoising convolutional autoencoder trained from scratch on the normal images (no pretrained weights).

Input: the prepared image at 128 px (the model size is reduced so that it trains on a CPU in minutes); noise:
coarse Gaussian noise (low-resolution noise upsampled), which teaches the network to restore plausible anatomy
rather than to copy its input. The anomaly map is the smoothed absolute residual |x - x̂| inside the foreground,
upsampled to the model size; the image score is the mean of its top ``topk_fraction`` foreground pixels.

The seed's translation-to-healthy GAN (generator with mask, WGAN-GP) is not trained here: on the 2-core CPU of
this project it does not converge in a useful time; the denoising AE is the strongest from-scratch option that does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from dicom_node.models.metrics import top_mean

if TYPE_CHECKING:
    from dicom_node.models.config import DetectorConfig, Prepared

logger = logging.getLogger(__name__)

AE_SIZE = 128


class DenoisingAutoencoder(nn.Module):
    def __init__(self, width: int = 32, latent: int = 128) -> None:
        super().__init__()

        def down(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2))

        def up(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout), nn.ReLU())

        self.encoder = nn.Sequential(
            down(1, width),
            down(width, width * 2),
            down(width * 2, width * 4),
            down(width * 4, width * 4),
            nn.Conv2d(width * 4, latent, 3, 1, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(latent, width * 4, 3, 1, 1),
            nn.ReLU(),
            up(width * 4, width * 4),
            up(width * 4, width * 2),
            up(width * 2, width),
            up(width, width),
            nn.Conv2d(width, 1, 3, 1, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def _tensor(prepared: Sequence[Prepared]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.stack([p.image for p in prepared]))[:, None]
    masks = torch.from_numpy(np.stack([p.mask for p in prepared]).astype(np.float32))[:, None]
    images = F.interpolate(images, size=(AE_SIZE, AE_SIZE), mode="bilinear", align_corners=False)
    masks = F.interpolate(masks, size=(AE_SIZE, AE_SIZE), mode="nearest")
    return images, masks


def _coarse_noise(shape: torch.Size, generator: torch.Generator, std: float = 0.2, res: int = 16) -> torch.Tensor:
    noise = torch.randn((shape[0], 1, res, res), generator=generator) * std
    return F.interpolate(noise, size=shape[-2:], mode="bilinear", align_corners=False)


def fit_autoencoder(prepared: Sequence[Prepared], config: DetectorConfig, device: Any) -> DenoisingAutoencoder:
    seconds = float(config.extra.get("ae_train_seconds", 600))
    epochs = int(config.extra.get("ae_max_epochs", 200))
    generator = torch.Generator().manual_seed(config.seed)
    images, masks = _tensor(prepared)
    model = DenoisingAutoencoder().to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    started = time.monotonic()
    batch = 32
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(images.shape[0], generator=generator)
        total = 0.0
        for start in range(0, images.shape[0], batch):
            idx = order[start : start + batch]
            x, m = images[idx], masks[idx]
            noisy = (x + _coarse_noise(x.shape, generator) * m).clamp(0, 1)
            out = model(noisy.to(device))
            loss = F.mse_loss(out, x.to(device))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss) * len(idx)
        logger.info("autoencoder epoch %d loss %.5f", epoch, total / images.shape[0])
        if time.monotonic() - started > seconds:
            break
    model.eval()
    config.extra["ae_epochs_trained"] = epoch + 1
    return model


def load_autoencoder(state: dict[str, torch.Tensor], config: DetectorConfig, device: Any) -> DenoisingAutoencoder:
    model = DenoisingAutoencoder()
    model.load_state_dict(state)
    return model.to(device).eval()


@torch.inference_mode()
def score_autoencoder(
    model: DenoisingAutoencoder, prepared: Sequence[Prepared], config: DetectorConfig, device: Any
) -> tuple[np.ndarray, np.ndarray]:
    size = config.image_size
    scores = np.zeros(len(prepared))
    maps = np.zeros((len(prepared), size, size), dtype=np.float32)
    for start in range(0, len(prepared), 32):
        chunk = prepared[start : start + 32]
        x, m = _tensor(chunk)
        residual = ((x - model(x.to(device)).cpu()).abs() * m)[:, 0].numpy()
        for i, p in enumerate(chunk):
            smooth = ndimage.gaussian_filter(residual[i], sigma=config.smoothing_sigma / 2)
            full = F.interpolate(torch.from_numpy(smooth)[None, None], size=(size, size), mode="bilinear")[0, 0]
            amap = full.numpy() * p.mask
            scores[start + i] = top_mean(amap[p.mask], config.topk_fraction)
            maps[start + i] = amap
    return scores, maps
