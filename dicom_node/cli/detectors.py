"""``dicom-node fit | calibrate | evaluate``: train a detector on normal images, set its thresholds on a site's
normals, measure it. torch and the models package are imported inside the command functions only."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

# Methods `fit --method` offers: those of the installed detector classes' ``methods`` tables (a detector refuses one
# that is not in its own table). Methods no shipped model uses are in the repository's experiments/ folder.
METHOD_CHOICES: tuple[str, ...] = ("spade+segmenter", "spade", "segmenter", "padim")


def _common(parser: argparse.ArgumentParser) -> None:
    # The installed detectors (models/registry.py: read from entry points, without importing torch).
    from dicom_node.models import registry

    parser.add_argument("--detector", required=True, choices=registry.names())
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (CUDA when present; default)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    fit = subparsers.add_parser("fit", help="fit a detector on folders of normal images")
    _common(fit)
    fit.add_argument("--normal", type=Path, action="append", required=True, help="folder of normal images (repeat)")
    fit.add_argument(
        "--calibration-normal",
        type=Path,
        action="append",
        default=[],
        help="held-out normal folder for the thresholds (repeat); default: 10%% of the --normal images",
    )
    fit.add_argument("--out", type=Path, required=True, help="model directory to write")
    fit.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="CSV with columns file, view (AP/PA), patient_id: chest_xray learns each view's normal scores from it "
        "(DICOM files carry View Position and Patient ID themselves)",
    )
    fit.add_argument("--specificity", type=float, default=0.95, help="image threshold specificity (default 0.95)")
    fit.add_argument(
        "--method",
        default=None,
        choices=METHOD_CHOICES,
        help="the installed package's methods: brain_mri spade+segmenter (default), spade or segmenter; chest_xray "
        "padim (default). PatchCore, MSDE, patchcore+msde and the autoencoder are not installed (experiments/ in the "
        "repository)",
    )
    fit.add_argument("--backbone", default=None, help="efficientnet-lite0 or efficientnet-lite2")
    fit.add_argument("--image-size", type=int, default=None)
    fit.add_argument(
        "--coreset-size", type=int, default=None, help="PatchCore (experiments/) only; the installed methods ignore it"
    )
    fit.add_argument("--version", default=None, help="model version recorded in the model card")
    fit.add_argument(
        "--synthetic-copies",
        type=int,
        default=None,
        help="spade: synthetic-lesion copies per training image for the residual head (0: no head, plain distances)",
    )
    fit.add_argument("--head-weight", type=float, default=None, help="spade: weight of the residual head")
    fit.add_argument(
        "--degraded-copies",
        nargs="+",
        default=None,
        metavar="SETTING",
        help="brain_mri spade: degraded copies of each training normal that join the bank (resN: head crop reduced "
        "to N px, e.g. res128 res192; xscaleF: width scaled by F, e.g. xscale0.8 xscale1.25); default none",
    )
    fit.add_argument(
        "--segmenter-steps",
        type=int,
        default=None,
        help="segmenter: training steps (brain_mri default 6000; hours on a CPU, minutes on a GPU)",
    )
    fit.add_argument(
        "--segmenter-seconds",
        type=float,
        default=None,
        help="segmenter: stop training after this long (brain_mri default 3600)",
    )
    fit.add_argument(
        "--segmenter-lesion-kinds",
        nargs="+",
        default=None,
        metavar="KIND",
        help="segmenter: synthetic lesion appearances to train on (default hyperintense hypointense foreign_patch "
        "ring; also faint_hyperintense)",
    )
    fit.set_defaults(func=run_fit)

    calibrate = subparsers.add_parser("calibrate", help="set a detector's thresholds on a site's normal images")
    _common(calibrate)
    calibrate.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped one)")
    calibrate.add_argument("--normal", type=Path, action="append", required=True)
    calibrate.add_argument("--specificity", type=float, default=0.95)
    calibrate.add_argument("--pixel-quantile", type=float, default=None)
    calibrate.add_argument("--out", type=Path, default=None, help="where to write (default: --model, in place)")
    calibrate.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="CSV with columns file, view: chest_xray sets a threshold per view (DICOM files: View Position; "
        "otherwise the view is read from the image)",
    )
    calibrate.set_defaults(func=run_calibrate)

    evaluate = subparsers.add_parser("evaluate", help="measure a detector on normal and abnormal images")
    _common(evaluate)
    evaluate.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped one)")
    evaluate.add_argument("--normal", type=Path, action="append", required=True)
    evaluate.add_argument("--abnormal", type=Path, action="append", required=True)
    evaluate.add_argument("--masks", type=Path, action="append", default=[], help="masks folder (same file names)")
    evaluate.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="CSV with columns file, view: the images are scored with their view, as View Position would give it, "
        "and AUROC is also reported per view (AP, PA)",
    )
    evaluate.add_argument(
        "--boxes",
        type=Path,
        default=None,
        help="CSV with columns file, x, y, w, h (1024-px coordinates unless a width column says otherwise): "
        "localisation hit rate (map maximum inside a box) and region figures against the boxes",
    )
    evaluate.add_argument(
        "--pixel-mm",
        type=float,
        default=None,
        help="pixel size in mm of the images, for the region rules' sizes in mm (default: the detector's "
        "unsized_long_side_mm spread over the long side, e.g. chest_xray 430 mm as the result builders assume "
        "without a Pixel Spacing; 1 mm pixels for a detector without one, e.g. brain_mri)",
    )
    evaluate.add_argument("--json", type=Path, default=None, help="also write the metrics as JSON here")
    evaluate.add_argument(
        "--record-in-card", default=None, metavar="LABEL", help="store the metrics in the model card under LABEL"
    )
    evaluate.set_defaults(func=run_evaluate)


def _logging(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _load(args: argparse.Namespace) -> Any:
    from dicom_node.models.base import DetectorError
    from dicom_node.models.registry import default_registry

    try:
        return default_registry().load(args.detector, args.model, args.device)
    except DetectorError as err:
        print(f"dicom-node: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def _model_dir(args: argparse.Namespace) -> Path:
    if args.model is not None:
        return Path(args.model)
    from dicom_node.models import registry

    return registry.model_dir(args.detector)


def run_fit(args: argparse.Namespace) -> int:
    _logging(args)
    from dicom_node.models.base import DetectorError
    from dicom_node.models.training import fit_detector

    try:
        detector = fit_detector(
            args.detector,
            args.normal,
            args.out,
            calibration_dirs=args.calibration_normal,
            specificity=args.specificity,
            device=args.device,
            method=args.method,
            backbone=args.backbone,
            image_size=args.image_size,
            coreset_size=args.coreset_size,
            version=args.version,
            spade={
                "synthetic_copies": args.synthetic_copies,
                "head_weight": args.head_weight,
                "degraded_copies": args.degraded_copies,
            },
            segmenter={
                "steps": args.segmenter_steps,
                "seconds": args.segmenter_seconds,
                "lesion_kinds": args.segmenter_lesion_kinds,
            },
            labels=args.labels,
        )
    except (DetectorError, ValueError) as err:
        print(f"dicom-node: {err}", file=sys.stderr)
        return 1
    print(f"fitted {args.detector} ({detector.config.method}) → {args.out}")
    print(f"image threshold {detector.image_threshold:.6g}, pixel threshold {detector.pixel_threshold:.6g}")
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    _logging(args)
    from dicom_node.models.base import DetectorError
    from dicom_node.models.training import calibrate_detector

    detector = _load(args)
    out = args.out or _model_dir(args)
    try:
        stats = calibrate_detector(detector, args.normal, args.specificity, out, args.pixel_quantile, args.labels)
    except (DetectorError, ValueError) as err:
        print(f"dicom-node: {err}", file=sys.stderr)
        return 1
    print(f"calibrated {args.detector} on {int(stats['n_normals'])} normals → {out}")
    print(f"image threshold {stats['image_threshold']:.6g}, pixel threshold {stats['pixel_threshold']:.6g}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    _logging(args)
    from dicom_node.models.evaluation import evaluate, format_report

    detector = _load(args)
    scored: list[Any] = []
    try:
        from dicom_node.models.labels import read_labels

        table = read_labels(args.labels) if args.labels is not None else None
        report = evaluate(detector, args.normal, args.abnormal, args.masks, scored_out=scored, known=table)
        extra_text = _view_and_box_metrics(args, detector, report, scored)
        region_text = _region_metrics(args, detector, report, scored)
    except ValueError as err:
        print(f"dicom-node: {err}", file=sys.stderr)
        return 1
    print(format_report(report))
    if extra_text:
        print(extra_text)
    print(region_text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.record_in_card:
        metrics = dict(detector.card.get("metrics", {}))
        metrics[args.record_in_card] = {
            **report,
            "normal": [str(p) for p in args.normal],
            "abnormal": [str(p) for p in args.abnormal],
            "masks": [str(p) for p in args.masks],
        }
        detector.card["metrics"] = metrics
        detector.save(_model_dir(args))
    return 0


def _view_and_box_metrics(args: argparse.Namespace, detector: Any, report: dict[str, Any], scored: list[Any]) -> str:
    """Add ``per_view`` (with --labels) and ``localisation_hit_rate`` (with --boxes) to ``report``; the text to
    print."""
    import numpy as np

    from dicom_node.models.view_evaluation import (
        format_per_view,
        localisation_hit_rate,
        per_view_metrics,
        read_boxes,
        read_views,
    )

    normal, abnormal = scored
    parts: list[str] = []
    if args.labels is not None:
        labels = np.r_[np.zeros(len(normal.files), dtype=bool), np.ones(len(abnormal.files), dtype=bool)]
        scores = np.r_[normal.scores, abnormal.scores]
        report["per_view"] = per_view_metrics(
            [*normal.files, *abnormal.files], labels, scores, read_views(args.labels), detector.image_threshold
        )
        parts.append(format_per_view(report["per_view"]))
    if args.boxes is not None:
        loc = localisation_hit_rate(abnormal.files, abnormal.maps, read_boxes(args.boxes))
        report.update(loc)
        rate = loc["localisation_hit_rate"]
        parts.append(f"{'localisation_hit':<18} {'n/a' if rate is None else f'{rate:.4f}'} (n={loc['n_with_boxes']})")
    return "\n".join(parts)


def _region_metrics(args: argparse.Namespace, detector: Any, report: dict[str, Any], scored: list[Any]) -> str:
    """Add ``regions`` (models.region_evaluation: the product's regions of each image, against --masks or --boxes)
    to ``report``; the text to print."""
    import numpy as np

    from dicom_node.models import registry
    from dicom_node.models.evaluation import mask_for
    from dicom_node.models.preprocessing import resize
    from dicom_node.models.region_evaluation import box_mask, evaluate_regions, format_region_report
    from dicom_node.models.view_evaluation import read_boxes

    normal, abnormal = scored
    boxes = read_boxes(args.boxes) if args.boxes is not None else {}
    masks_dirs = [Path(d) for d in args.masks]

    def lesion_for(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
        if masks_dirs:
            mask = mask_for(masks_dirs, path, shape)
            if mask.shape != shape:
                mask = resize(mask.astype(np.float32), shape, order=0) > 0.5
            return mask if mask.any() else None
        entries = boxes.get(path.name)
        return box_mask(shape, entries) if entries else None

    def spacing_for(shape: tuple[int, int]) -> tuple[float, float]:
        if args.pixel_mm is not None:
            return args.pixel_mm, args.pixel_mm
        long_side_mm = registry.spec(args.detector).unsized_long_side_mm
        if long_side_mm is not None:
            side = long_side_mm / max(shape)
            return side, side
        return 1.0, 1.0

    regions = evaluate_regions(
        (normal.files, normal.scores, normal.maps),
        (abnormal.files, abnormal.scores, abnormal.maps),
        detector.image_threshold,
        detector.pixel_threshold,
        spacing_for,
        lesion_for,
        detector=args.detector,
    )
    report["regions"] = regions
    return format_region_report(regions)
