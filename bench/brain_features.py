"""Cache prepared images and backbone features of the brain data, for comparing methods quickly.

    nice .venv/bin/python -m bench.brain_features --out /tmp/brain_feats --size 256 --backbone efficientnet-lite0

Writes one .pt file per split with: files, prepared images (uint8), masks, patch features of the foreground
(training) or full grids (validation), pooled global features, labels and masks of the validation images.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from dicom_node.models.brain_mri.detector import BrainMRIDetector, default_config
from dicom_node.models.preprocessing import list_image_files, load_image_file

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

SPLITS = {
    "kaggle_train": [("brain_kaggle/train/normal", 0)],
    "lgg_train": [("brain_lgg/train/normal", 0)],
    "kaggle_val": [("brain_kaggle/val/normal", 0), ("brain_kaggle/val/tumor", 1)],
    "lgg_val": [("brain_lgg/val/normal", 0), ("brain_lgg/val/tumor", 1)],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("/tmp/brain_feats"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--splits", nargs="*", default=list(SPLITS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = default_config()
    config.image_size = args.size
    config.backbone = args.backbone
    detector = BrainMRIDetector(config, "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    for split in args.splits:
        target = args.out / f"{split}_{args.backbone}_{args.size}.pt"
        if target.exists():
            continue
        files, labels = [], []
        for folder, label in SPLITS[split]:
            found = list_image_files(DATA / folder)
            files += found
            labels += [label] * len(found)
        started = time.time()
        images, masks, patches, pooled, sources = [], [], [], [], []
        for start in range(0, len(files), 16):
            raw = [load_image_file(f) for f in files[start : start + 16]]
            prepared = [detector.prepare(img) for img in raw]
            p, g = detector.features.extract(prepared, patches=True, pooled=True)
            assert p is not None and g is not None
            patches.append(p.to(torch.float16))
            pooled.append(g)
            images += [np.round(x.image * 255).astype(np.uint8) for x in prepared]
            masks += [x.mask for x in prepared]
            sources += [(x.box.top, x.box.left, x.box.size, *x.box.source_shape) for x in prepared]
            print(split, start + len(raw), "/", len(files), f"{time.time() - started:.0f}s", flush=True)
        torch.save(
            {
                "files": [str(f) for f in files],
                "labels": torch.tensor(labels),
                "images": torch.from_numpy(np.stack(images)),
                "masks": torch.from_numpy(np.stack(masks)),
                "patches": torch.cat(patches),
                "pooled": torch.cat(pooled),
                "boxes": torch.tensor(sources),
            },
            target,
        )


if __name__ == "__main__":
    main()
