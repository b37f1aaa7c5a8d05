"""Synthetic lesions painted into normal images, to teach a detector which *kind* of difference from the normals
matters (self-supervision from normals only; no abnormal image is used).

The family: CutPaste (Li et al., CVPR 2021), Foreign Patch Interpolation (FPI; Tan et al., MIDL 2020), Natural
Synthetic Anomalies (NSA; Schlüter et al., ECCV 2022), DRAEM (Zavrtanik et al., ICCV 2021). Here each lesion is a
smooth random blob inside the head, with one of four appearances, and sometimes a mass effect:

- hyperintense: the blob brightened towards a random level with a fine texture (FLAIR/T2 oedema, enhancing mass);
- hypointense: the blob darkened (necrosis, cyst, T1-hypointense lesion);
- foreign patch: the blob filled by the same place of another normal image, shifted (FPI);
- ring: a bright rim around a dark core (ring-enhancing tumour);
- faint hyperintense (not in the default ``KINDS``; chosen per model, e.g. by the lesion segmenter's
  ``lesion_kinds``): the tissue made only 8-35% brighter, as the infiltrative FLAIR signal change of a low-grade
  glioma often is, where the hyperintense kind would paint a much brighter blob;
- moderate hyperintense (not in ``KINDS`` either): the blob filled up to a level 1.25-1.75 times the head's median
  intensity. The hyperintense kind's level is absolute (0.55-1.0 of the prepared range); in prepared FLAIR slices
  the head's median is about 0.3-0.4, so lesions 1.2-1.5 times as bright as the tissue around them (0.35-0.5, as
  several LGG val tumours are) fell between that kind and the faint one, and the segmenter trained without them
  gave them a probability of about 0.001;
- mass effect (40%): the tissue around the blob pushed outwards, as an expanding lesion compresses ventricles.

The images are the detector's prepared inputs ([0, 1], square, head mask), so the lesions look the same to every
backbone. Everything is drawn from the ``numpy`` generator passed in (reproducible fits).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

KINDS = ("hyperintense", "hypointense", "foreign_patch", "ring")
FAINT = "faint_hyperintense"
MODERATE = "moderate_hyperintense"
ALL_KINDS = (*KINDS, FAINT, MODERATE)
MASS_EFFECT_PROBABILITY = 0.4
MIN_LESION_PIXELS = 30


def check_kinds(kinds: Sequence[str]) -> None:
    """ValueError unless ``kinds`` is a non-empty list of known lesion kinds."""
    unknown = sorted(set(kinds) - set(ALL_KINDS))
    if unknown or not kinds:
        raise ValueError(f"unknown lesion kinds {unknown}; known: {', '.join(ALL_KINDS)}")


def _px(value: float, scale: float) -> int:
    return max(1, int(round(value * scale)))


def lesion_blob(
    mask: np.ndarray, rng: np.random.Generator, scale: float = 1.0
) -> tuple[np.ndarray, tuple[float, float, float]] | None:
    """A soft random blob (float map in [0, 1]) centred in the head, 5-40 px radius (times ``scale``: the sizes are
    for a 256-px prepared image), and (cy, cx, radius); None when the head is too small to hold one."""
    rows, cols = mask.shape
    inner = ndimage.binary_erosion(mask, iterations=_px(int(rng.integers(6, 16)), scale))
    ys, xs = np.nonzero(inner)
    if len(ys) == 0:
        return None
    pick = int(rng.integers(len(ys)))
    cy, cx = float(ys[pick]), float(xs[pick])
    radius = float(rng.uniform(5, 40)) * scale
    angle, aspect = rng.uniform(0, np.pi), rng.uniform(0.6, 1.4)
    yy, xx = np.mgrid[:rows, :cols]
    dy, dx = yy - cy, xx - cx
    u = (dy * np.cos(angle) + dx * np.sin(angle)) * aspect
    v = (-dy * np.sin(angle) + dx * np.cos(angle)) / aspect
    # Low-frequency noise on the radius gives irregular, lobulated outlines instead of ellipses.
    noise = ndimage.gaussian_filter(rng.standard_normal((rows, cols)), 6 * scale)
    noise /= noise.std() + 1e-6
    field = 1.0 - np.sqrt(u**2 + v**2) / radius + 0.35 * noise
    blob = ndimage.gaussian_filter((field > 0).astype(np.float32), rng.uniform(1, 4) * scale)
    return blob * ndimage.binary_erosion(mask, iterations=_px(4, scale)), (cy, cx, radius)


def mass_effect(image: np.ndarray, centre: tuple[float, float, float], strength: float) -> np.ndarray:
    """Push the image radially away from the centre (a Gaussian-weighted displacement of ``strength`` x radius)."""
    cy, cx, radius = centre
    rows, cols = image.shape
    yy, xx = np.mgrid[:rows, :cols].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    distance = np.sqrt(dy**2 + dx**2) + 1e-3
    push = strength * radius * np.exp(-((distance / (1.5 * radius)) ** 2))
    # Sampling nearer the centre expands what is there outwards.
    source = [yy - dy / distance * push, xx - dx / distance * push]
    return ndimage.map_coordinates(image, source, order=1, mode="nearest")


def synthetic_lesion(
    image: np.ndarray,
    mask: np.ndarray,
    donor: np.ndarray,
    rng: np.random.Generator,
    scale: float = 1.0,
    kinds: Sequence[str] = KINDS,
) -> tuple[np.ndarray, np.ndarray] | None:
    """``image`` (S, S) in [0, 1] with one synthetic lesion, and the lesion's mask (S, S) bool; ``donor`` is another
    normal image of the same size (foreign-patch lesions). Pixel sizes are for a 256-px image; ``scale`` (S / 256)
    keeps the lesions' anatomy-relative size at another S; ``kinds``: the appearances to draw from (each entry equally
    likely, so a kind listed twice is drawn twice as often).
    None when the head is too small."""
    check_kinds(kinds)
    drawn = lesion_blob(mask, rng, scale)
    if drawn is None or drawn[0].sum() < MIN_LESION_PIXELS * scale**2:
        return None
    blob, centre = drawn
    if rng.random() < MASS_EFFECT_PROBABILITY:
        strength = float(rng.uniform(0.2, 0.5))
        image, blob = mass_effect(image, centre, strength), mass_effect(blob, centre, strength) * mask
    kind = kinds[int(rng.integers(len(kinds)))]
    texture = ndimage.gaussian_filter(rng.random(image.shape), 2 * scale)
    if kind == "hyperintense":
        level = rng.uniform(0.55, 1.0) * (0.85 + 0.3 * texture)
        out = image * (1 - blob) + blob * np.maximum(image, level)
    elif kind == FAINT:
        out = image * (1 + blob * rng.uniform(0.08, 0.35) * (0.85 + 0.3 * texture))
    elif kind == MODERATE:
        level = float(np.median(image[mask])) * rng.uniform(1.25, 1.75) * (0.9 + 0.2 * texture)
        out = image * (1 - blob) + blob * np.maximum(image, level)
    elif kind == "hypointense":
        out = image * (1 - blob * rng.uniform(0.4, 0.9))
    elif kind == "foreign_patch":
        shift = tuple(int(s * scale) for s in rng.integers(-60, 60, 2))
        out = image * (1 - blob) + blob * np.roll(donor, shift, (0, 1))
    else:
        solid = blob > 0.5
        core = ndimage.gaussian_filter(solid.astype(np.float32), scale) * ndimage.binary_erosion(
            solid, iterations=_px(int(rng.integers(2, 5)), scale)
        )
        rim = np.clip(blob - core, 0, 1)
        out = image * (1 - blob) + rim * rng.uniform(0.7, 1.0) + core * image * rng.uniform(0.2, 0.6)
    return np.clip(out, 0, 1).astype(np.float32), blob > 0.5
