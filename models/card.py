"""The model card, written in one place: ``model_card.json`` (the document a detector is loaded from) and
``MODEL_CARD.md`` (rendered from it) next to ``weights.safetensors``, with the weights' sha256."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dicom_node.models.base import DetectorError
from dicom_node.models.config import DetectorConfig

WEIGHTS_FILE = "weights.safetensors"
CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"
RESERVED = ("detector", "version", "method", "weights_file", "weights_sha256", "thresholds", "config")


def write_model(
    model_dir: Path,
    config: DetectorConfig,
    tensors: dict[str, torch.Tensor],
    card: dict[str, Any],
    thresholds: dict[str, Any],
) -> str:
    """Write the weights, model_card.json and MODEL_CARD.md to ``model_dir``; returns the weights' sha256.

    ``card``: the descriptive entries (summary, training data, licence, ...); ``thresholds``: those beyond the
    image, pixel and series ones (e.g. per view)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    weights = model_dir / WEIGHTS_FILE
    tmp = model_dir / f".{WEIGHTS_FILE}.tmp"
    save_file(tensors, str(tmp), metadata={"detector": config.detector, "version": config.version})
    tmp.chmod(0o644)
    tmp.replace(weights)
    digest = sha256_file(weights)
    document = {
        "detector": config.detector,
        "version": config.version,
        "method": config.method,
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": digest,
        "thresholds": {
            "image": config.image_threshold,
            "pixel": config.pixel_threshold,
            "image_specificity_on_calibration_normals": config.specificity,
            "pixel_quantile_of_normal_maps": config.pixel_quantile,
            "series": config.extra.get("series_threshold"),
            **thresholds,
        },
        "config": _jsonable(asdict(config)),
        **card,
    }
    (model_dir / CARD_JSON).write_text(json.dumps(_jsonable(document), indent=2) + "\n", encoding="utf-8")
    (model_dir / CARD_MD).write_text(render_model_card(document), encoding="utf-8")
    return digest


def read_model(model_dir: Path) -> tuple[DetectorConfig, dict[str, torch.Tensor], str, dict[str, Any]]:
    """(config, tensors, weights sha256, descriptive card entries) of a model directory; the sha256 must match the
    card's where it gives one."""
    model_dir = Path(model_dir)
    card_path, weights = model_dir / CARD_JSON, model_dir / WEIGHTS_FILE
    if not card_path.is_file() or not weights.is_file():
        raise DetectorError(f"{model_dir}: no {CARD_JSON} / {WEIGHTS_FILE} (fit a model first)")
    document = json.loads(card_path.read_text(encoding="utf-8"))
    config = DetectorConfig.from_dict(document["config"])
    digest = sha256_file(weights)
    if document.get("weights_sha256") and document["weights_sha256"] != digest:
        raise DetectorError(f"{weights}: sha256 {digest} does not match the model card")
    card = {k: v for k, v in document.items() if k not in RESERVED}
    return config, load_file(str(weights)), digest, card


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None if np.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def render_model_card(document: dict[str, Any]) -> str:
    """MODEL_CARD.md from the model_card.json document."""
    lines = [f"# Model card: {document['detector']} {document['version']}", ""]
    if document.get("summary"):
        lines += [str(document["summary"]), ""]
    lines += [
        f"- Method: `{document['method']}`",
        f"- Weights: `{document['weights_file']}`, sha256 `{document['weights_sha256']}`",
        f"- Image threshold: {document['thresholds']['image']} (specificity "
        f"{document['thresholds']['image_specificity_on_calibration_normals']} on the calibration normals)",
        f"- Pixel threshold: {document['thresholds']['pixel']} (quantile "
        f"{document['thresholds']['pixel_quantile_of_normal_maps']} of the normal maps' foreground pixels)",
        *_per_view_lines(document["thresholds"].get("per_view")),
        "",
    ]
    for key, title in (
        ("method_description", "Method"),
        ("training_command", "Training command"),
        ("training_data", "Training data"),
        ("calibration_data", "Calibration data"),
        ("licence", "Licence"),
        ("citations", "Citations"),
        ("metrics", "Validation metrics"),
        ("limitations", "Limitations"),
    ):
        value = document.get(key)
        if value in (None, "", [], {}):
            continue
        lines += [f"## {title}", ""]
        if isinstance(value, list):
            lines += [f"- {v}" for v in value]
        elif isinstance(value, dict):
            lines += ["```json", json.dumps(_jsonable(value), indent=2), "```"]
        elif key == "training_command":
            lines += ["```sh", str(value), "```"]
        else:
            lines.append(str(value))
        lines.append("")
    return "\n".join(lines)


def _per_view_lines(per_view: dict[str, Any] | None) -> list[str]:
    """Model-card lines for per-view thresholds (radiographs): the view's own or, with too few of its normals,
    the pooled one; the reported score is shifted so that the image threshold above stands for each."""
    if not per_view:
        return []
    lines = [
        "- Per view (View Position, else the view classifier): scores in standard deviations above that view's "
        "normals (out-of-fold training scores), shifted so that the image threshold applies to every view"
    ]
    for view, threshold in sorted(per_view.get("thresholds", {}).items()):
        mean, spread = per_view["stats"][view]
        count = per_view.get("counts", {}).get(view, 0)
        source = "own" if threshold != per_view.get("threshold") else "pooled"
        lines.append(
            f"  - {view}: threshold {threshold:.4g} ({source}; {count} calibration normals), normal raw score "
            f"{mean:.4g} ± {spread:.3g}"
        )
    return lines
