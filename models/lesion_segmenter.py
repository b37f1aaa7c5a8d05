"""A lesion segmenter trained end to end on synthetic lesions painted into normal images (self-supervision from
normals only; no abnormal image is used).

Where the residual head (models.residual_head) learns a linear rule on frozen ImageNet features, this network
learns its own features: a small U-Net (Ronneberger et al., MICCAI 2015) is trained to find the lesions of
models.synthetic in the prepared normal slices, the recipe of the Foreign Patch Interpolation / Natural Synthetic
Anomalies family (Tan et al., MIDL 2020; Schlüter et al., ECCV 2022). Clean normals are shown too (with empty
targets), so normal anatomy is what it learns to leave alone.

- Input: the prepared image (head crop, [0, 1]) reduced to ``SEGMENTER_SIZE`` px by area averaging, so that a
  176-slice series stays within the CPU time budget; output: a lesion probability per pixel, upsampled back.
- Training samples: a prepared normal reduced the same way, a synthetic lesion painted at that size; augmentation:
  left-right flip, a random gamma (contrast differs between sequences and sites), blur, sharpening or noise.
- Loss: binary cross-entropy plus soft Dice over the batch (lesions are a small share of the pixels).
- Image score: mean of the ``top_pixels`` highest probabilities inside the head.

It trains in minutes on a GPU (data-loader workers paint the lesions); on a CPU, ``steps`` bounds the work.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dicom_node.models.synthetic import KINDS, check_kinds, synthetic_lesion

logger = logging.getLogger(__name__)

SEGMENTER_SIZE = 128
PAINT_SIZE = 256  # the prepared size models.synthetic's pixel sizes are given for
STATE_PREFIX = "segmenter."


@dataclass
class SegmenterSettings:
    """Training and scoring settings (stored in the model card under ``extra["segmenter"]``)."""

    widths: tuple[int, ...] = (16, 32, 64, 128, 128)
    steps: int = 4000
    seconds: float = 600.0
    batch_size: int = 32
    learning_rate: float = 2e-3
    clean_fraction: float = 0.3  # share of training samples shown without a lesion
    second_lesion: float = 0.25  # probability of a second lesion in a painted sample
    top_pixels: int = 64  # image score: mean of this many highest probabilities (at SEGMENTER_SIZE)
    rim: int = 2  # image score: pixels at the head's edge (at SEGMENTER_SIZE) left out
    score_weight: float = 2.0  # spade+segmenter: weight of the probability against the SPADE map in z units
    lesion_kinds: tuple[str, ...] = KINDS  # synthetic lesion appearances trained on (models.synthetic)
    # Scoring: average the probability of the slice and of its left-right mirror image (test-time augmentation).
    # The network was trained with flips, so both views are in its domain; averaging them halves the noise of a
    # per-pixel probability at twice the segmenter's time. A load-time setting: no refit needed.
    flip_average: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_kinds(self.lesion_kinds)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegmenterSettings:
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known}
        if "widths" in values:
            values["widths"] = tuple(int(w) for w in values["widths"])
        if "lesion_kinds" in values:
            values["lesion_kinds"] = tuple(str(k) for k in values["lesion_kinds"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["widths"] = list(self.widths)
        out["lesion_kinds"] = list(self.lesion_kinds)
        return out


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class LesionUNet(nn.Module):
    """A plain U-Net: one input channel, one output logit per pixel; ``widths`` per resolution level."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128, 128)) -> None:
        super().__init__()
        self.down = nn.ModuleList()
        cin = 1
        for width in widths:
            self.down.append(_block(cin, width))
            cin = width
        self.up = nn.ModuleList(_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(len(widths) - 1)))
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, block in enumerate(self.down):
            if level:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


def to_model_size(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(n, S, S) images or masks -> (n, 1, SEGMENTER_SIZE, SEGMENTER_SIZE) float by area averaging."""
    tensor = torch.as_tensor(np.asarray(images, dtype=np.float32))[:, None]
    if tensor.shape[-1] == SEGMENTER_SIZE and tensor.shape[-2] == SEGMENTER_SIZE:
        return tensor
    return F.interpolate(tensor, size=(SEGMENTER_SIZE, SEGMENTER_SIZE), mode="area")


class SyntheticLesionSet(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """``length`` training samples drawn from the prepared normals: (image, lesion fraction, head mask), each
    (1, SEGMENTER_SIZE, SEGMENTER_SIZE). Sample ``i`` is a function of (seed, i): fits are reproducible whatever
    the number of loader workers.

    Lesions are painted at the segmenter's own size (models.synthetic scaled), never on an upsampled image: a lesion
    drawn at a finer scale than its background would be sharper than the tissue around it, and the network would
    learn to find sharpness instead of lesions. For the same reason the whole sample, lesion and all, is then
    blurred, sharpened or given noise at random."""

    def __init__(
        self, images: np.ndarray, masks: np.ndarray, length: int, settings: SegmenterSettings, seed: int
    ) -> None:
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 255.0
        self.images = to_model_size(images)[:, 0].numpy()
        self.masks = to_model_size(masks.astype(np.float32))[:, 0].numpy() > 0.5
        self.length = length
        self.settings = settings
        self.seed = seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        count = len(self.images)
        pick = int(rng.integers(count))
        image, mask = self.images[pick], self.masks[pick]
        if rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        image = np.ascontiguousarray(image) ** float(rng.uniform(0.7, 1.4))
        mask = np.ascontiguousarray(mask)
        lesion = np.zeros(image.shape, dtype=bool)
        if rng.random() >= self.settings.clean_fraction:
            lesions = 2 if rng.random() < self.settings.second_lesion else 1
            scale = SEGMENTER_SIZE / PAINT_SIZE
            for _ in range(lesions):
                donor = self.images[int(rng.integers(count))]
                painted = synthetic_lesion(image, mask, donor, rng, scale, self.settings.lesion_kinds)
                if painted is not None:
                    image, lesion = painted[0], lesion | painted[1]
        image = _appearance(image, rng) * mask
        return (
            torch.from_numpy(image.astype(np.float32))[None],
            torch.from_numpy(lesion.astype(np.float32))[None],
            torch.from_numpy(mask.astype(np.float32))[None],
        )


def _appearance(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur, sharpen or add noise to the whole image (one of them, or none), so that sharpness and noise level,
    which differ between scanners, say nothing about lesions."""
    choice = rng.random()
    if choice < 0.25:
        image = ndimage.gaussian_filter(image, rng.uniform(0.3, 1.0))
    elif choice < 0.5:
        image = image + rng.uniform(0.3, 1.5) * (image - ndimage.gaussian_filter(image, rng.uniform(0.7, 1.5)))
    elif choice < 0.7:
        image = image + rng.normal(0, rng.uniform(0.01, 0.04), image.shape)
    return np.clip(image, 0, 1)


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    return bce + dice


def _learning_rate(peak: float, done: float) -> float:
    """5% linear warm-up, then cosine decay to 1% of ``peak`` at ``done`` = 1."""
    if done < 0.05:
        return peak * max(done / 0.05, 0.01)
    return peak * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, (done - 0.05) / 0.95))))


def fit_segmenter(
    images: np.ndarray,
    masks: np.ndarray,
    settings: SegmenterSettings,
    device: torch.device,
    progress: Callable[[int, float], None] | None = None,
    start: LesionUNet | None = None,
) -> tuple[LesionUNet, dict[str, Any]]:
    """Train on prepared normals ``images`` (N, S, S) with head ``masks``; stops after ``settings.steps`` steps or
    ``settings.seconds``, whichever comes first. ``start``: a trained network to go on training (fine-tuning, e.g.
    on a changed lesion recipe) instead of a new one. Returns the network (eval mode) and a training record."""
    torch.manual_seed(settings.seed)
    if device.type == "cpu" and settings.steps > 200:
        logger.warning(
            "training the lesion segmenter on the CPU: about 1.5 s per step on 2 cores, so %d steps take hours "
            "(capped at %.0f s); a GPU does them in minutes (--device cuda)",
            settings.steps,
            settings.seconds,
        )
    model = (start if start is not None else LesionUNet(settings.widths)).to(device)
    data = SyntheticLesionSet(images, masks, settings.steps * settings.batch_size, settings, settings.seed)
    on_gpu = device.type == "cuda"
    workers = max(1, (os.cpu_count() or 2) - 2) if on_gpu else 0
    loader = DataLoader(
        data, batch_size=settings.batch_size, num_workers=workers, pin_memory=on_gpu, persistent_workers=False
    )
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    started = time.monotonic()
    model.train()
    step, running = 0, 0.0
    for image, target, _ in loader:
        image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            logits = model(image)
        loss = _loss(logits.float(), target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        # Progress by steps or by time, whichever is further: a fit cut short by its time budget still ends
        # with the learning rate annealed.
        done = max(step / settings.steps, (time.monotonic() - started) / settings.seconds)
        for group in optimiser.param_groups:
            group["lr"] = _learning_rate(settings.learning_rate, done)
        optimiser.step()
        step += 1
        value = loss.item()
        running = 0.98 * running + 0.02 * value if step > 1 else value
        if progress and step % 100 == 0:
            progress(step, running)
        if time.monotonic() - started > settings.seconds:
            logger.info("segmenter: time budget reached after %d of %d steps", step, settings.steps)
            break
    model.eval()
    record = {"steps_trained": step, "seconds": round(time.monotonic() - started, 1), "final_loss": running}
    return model, record


def load_segmenter(state: dict[str, torch.Tensor], settings: SegmenterSettings, device: torch.device) -> LesionUNet:
    model = LesionUNet(settings.widths)
    model.load_state_dict(state)
    return model.to(device).eval()


def segmenter_state(model: LesionUNet) -> dict[str, torch.Tensor]:
    return {STATE_PREFIX + k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


@torch.inference_mode()
def lesion_probability(
    model: LesionUNet, images: np.ndarray, device: torch.device, batch: int = 32, flip_average: bool = False
) -> np.ndarray:
    """Lesion probability (n, SEGMENTER_SIZE, SEGMENTER_SIZE) of prepared images (n, S, S); ``flip_average``: the
    mean of the image's and its left-right mirror's probabilities (mapped back)."""
    out = []
    for start in range(0, len(images), batch):
        x = to_model_size(images[start : start + batch]).to(device)
        probability = torch.sigmoid(model(x).float())
        if flip_average:
            mirrored = torch.sigmoid(model(torch.flip(x, dims=(-1,))).float())
            probability = 0.5 * (probability + torch.flip(mirrored, dims=(-1,)))
        out.append(probability[:, 0].cpu().numpy())
    size = SEGMENTER_SIZE
    return np.concatenate(out) if out else np.zeros((0, size, size), dtype=np.float32)


def image_scores(probability: np.ndarray, masks: np.ndarray, settings: SegmenterSettings) -> np.ndarray:
    """Per image: mean of the ``top_pixels`` highest probabilities inside the head (eroded by ``rim``)."""
    heads = to_model_size(masks.astype(np.float32))[:, 0].numpy() > 0.5
    scores = np.zeros(len(probability))
    for i, (prob, head) in enumerate(zip(probability, heads, strict=True)):
        inside = ndimage.binary_erosion(head, iterations=settings.rim) if settings.rim else head
        values = prob[inside]
        if values.size:
            k = min(settings.top_pixels, values.size)
            scores[i] = float(np.partition(values, values.size - k)[-k:].mean())
    return scores


def full_size(probability: np.ndarray, size: int) -> np.ndarray:
    """(n, s, s) model-size maps -> (n, size, size), bilinear."""
    tensor = torch.from_numpy(np.ascontiguousarray(probability, dtype=np.float32))[:, None]
    return F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
