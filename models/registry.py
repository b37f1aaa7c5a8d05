"""The detectors this installation knows, by name: found through entry points, read without importing torch.

Every detector declares a ``DetectorSpec`` (models/spec.py) as an entry point of the ``dicom_node.detectors`` group;
the shipped ones are declared in dicom-node's own pyproject.toml (``brain_mri``, ``chest_xray``). Other
distributions (a site's plugin, the test suite's) may add entry points to the same group. The rule:

* an entry point whose value is a ``DetectorSpec`` declares a detector; a plugin's spec named like a shipped
  detector replaces the shipped one whole;
* an entry point whose value is a loader function (``loader(model_dir, device)`` → Detector) replaces only the loader
  of the detector of that name (a site's own model for ``brain_mri``); everything else (queue, codes, default
  routing, shipped weights) stays that detector's. A loader named like no detector is an error: a new detector
  needs a spec.

A plugin replacing a shipped detector, or adding one, is logged as a warning. An entry point's module is imported
when the detectors are first listed (configuration validation does that), so keep it light: the spec in a
torch-free module, the model code imported by the loader.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.models.spec import CARD_JSON, DetectorSpec, import_object

if TYPE_CHECKING:
    from dicom_node.models.base import Detector, DetectorRegistry
    from dicom_node.models.image_detector import DetectorConfig, ImageAnomalyDetector

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "dicom_node.detectors"
DISTRIBUTION = "dicom-node"
UNVERSIONED = "unversioned"


class UnknownDetectorError(LookupError):
    """A detector name no installed detector has; the message lists the known ones."""


def _distribution_name(entry: EntryPoint) -> str:
    dist = getattr(entry, "dist", None)
    name = dist.metadata["Name"] if dist is not None else ""
    return re.sub(r"[-_.]+", "-", name or "").lower()


@cache
def _discover() -> dict[str, DetectorSpec]:
    """The specs of the installed entry points, read once per process (``clear_cache`` reads them again)."""
    shipped: dict[str, DetectorSpec] = {}
    plugins: list[tuple[EntryPoint, Any]] = []
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            value = entry.load()
        except Exception as err:
            raise RuntimeError(f"detector entry point {entry.name} = {entry.value}: cannot load ({err})") from err
        if _distribution_name(entry) == DISTRIBUTION:
            if not isinstance(value, DetectorSpec) or value.name != entry.name:
                raise RuntimeError(f"shipped detector entry point {entry.name} = {entry.value} is not its DetectorSpec")
            shipped[entry.name] = value
        else:
            plugins.append((entry, value))
    if not shipped:
        log.warning(
            "no shipped detectors found: the %s entry points of %s are missing (reinstall: pip install -e .)",
            ENTRY_POINT_GROUP,
            DISTRIBUTION,
        )
    specs = dict(shipped)
    # Plugin specs first, then plugin loaders: a loader may replace the loader of a plugin's own detector.
    plugins.sort(key=lambda item: (not isinstance(item[1], DetectorSpec), item[0].name))
    for entry, value in plugins:
        log.warning("detector %r provided by plugin %s", entry.name, entry.value)
        if isinstance(value, DetectorSpec):
            if value.name != entry.name:
                raise RuntimeError(f"detector entry point {entry.name} = {entry.value} declares {value.name!r}")
            specs[entry.name] = value
        elif callable(value):
            if entry.name not in specs:
                raise RuntimeError(
                    f"detector entry point {entry.name} = {entry.value} is a loader for an unknown detector (known: "
                    f"{', '.join(sorted(specs)) or 'none'}); a new detector is declared by a DetectorSpec"
                )
            specs[entry.name] = replace(specs[entry.name], loader=entry.value)
        else:
            raise RuntimeError(f"detector entry point {entry.name} = {entry.value} is neither a spec nor a loader")
    return dict(sorted(specs.items()))


def specs() -> dict[str, DetectorSpec]:
    """Every installed detector, name → spec, sorted by name (read once per process; ``clear_cache`` re-reads)."""
    return dict(_discover())


def clear_cache() -> None:
    """Forget the detectors read so far (a test that installs a plugin into the running process calls this)."""
    _discover.cache_clear()


def names() -> list[str]:
    return list(specs())


def spec(name: str) -> DetectorSpec:
    known = specs()
    try:
        return known[name]
    except KeyError:
        raise UnknownDetectorError(
            f"unknown detector {name!r}; known: {', '.join(known) or 'none (is dicom-node installed?)'}"
        ) from None


def model_dir(name: str) -> Path:
    """The shipped weights folder of ``name`` (weights, model_card.json, MODEL_CARD.md), found without importing
    torch or the detector code."""
    detector = spec(name)
    if detector.weights is None:
        raise UnknownDetectorError(f"detector {name!r} ships no weights: set detectors.{name}.model_dir")
    return detector.weights


def model_version(name: str, directory: Path | None = None) -> str:
    """The ``version`` of the model card (``model_card.json``) in ``directory`` (default: the shipped weights of
    ``name``); ``unversioned`` when there is none or it cannot be read."""
    if directory is None:
        weights = spec(name).weights
        if weights is None:
            return UNVERSIONED
        directory = weights
    card = Path(directory) / CARD_JSON
    try:
        version = json.loads(card.read_text(encoding="utf-8")).get("version")
    except FileNotFoundError:
        return UNVERSIONED
    except (OSError, ValueError, AttributeError) as err:
        log.warning("cannot read model card %s (%s); jobs are keyed as unversioned", card, err)
        return UNVERSIONED
    return str(version)[:64] if version else UNVERSIONED


def loader(name: str) -> Any:
    """The loader function of ``name`` (imports the detector's code module)."""
    return import_object(spec(name).loader)


def _lazy_loader(reference: str) -> Any:
    def load(model_dir: Path | None, device: str) -> Detector:
        return import_object(reference)(model_dir, device)  # type: ignore[no-any-return]

    return load


def default_registry() -> DetectorRegistry:
    """A registry with every installed detector (plugins included). Imports are lazy: loading one detector does not
    import the others (or torch, until a detector is used)."""
    from dicom_node.models.base import DetectorRegistry

    registry = DetectorRegistry()
    for name, detector in specs().items():
        registry.register(name, _lazy_loader(detector.loader))
    return registry


def detector_class(name: str) -> tuple[type[ImageAnomalyDetector], DetectorConfig]:
    """The trainable class of a detector and its default (unfitted) configuration, for `dicom-node fit`."""
    from dicom_node.models.base import DetectorError

    try:
        detector = spec(name)
    except UnknownDetectorError as err:
        raise DetectorError(str(err)) from None
    if detector.detector_class is None or detector.default_config is None:
        raise DetectorError(f"detector {name!r} cannot be fitted by dicom-node fit")
    return import_object(detector.detector_class), import_object(detector.default_config)()
