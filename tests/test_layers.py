"""The import contracts of docs/architecture.md, checked on the source (``make lint`` runs this file, and so does the
suite).

The installed names map to folders: ``dicom_node.models`` is models/, ``dicom_node.workers`` is workers/ (the
package-dir table of pyproject.toml). Imports are read from the syntax tree, those inside functions included (a lazy
import is still a dependency), so a contract cannot be dodged by moving an import into a function.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {
    "dicom_node": ROOT / "dicom_node",
    "dicom_node.models": ROOT / "models",
    "dicom_node.workers": ROOT / "workers",
}


@dataclass(frozen=True)
class ImportEdge:
    importer: str  # module doing the import
    imported: str  # absolute dotted name imported
    line: int


def module_files() -> Iterator[tuple[str, Path]]:
    """(dotted module name, file) for every module of the installed package, migrations excluded (Alembic's)."""
    for prefix, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder).with_suffix("")
            if "migrations" in relative.parts:
                continue
            if prefix == "dicom_node" and relative.parts[0] in ("models", "workers"):
                continue
            parts = [p for p in relative.parts if p != "__init__"]
            yield ".".join([prefix, *parts]), path


def imports_of(module: str, path: Path) -> Iterator[ImportEdge]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield ImportEdge(module, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield ImportEdge(module, name, node.lineno)
            # `from dicom_node import models` imports the subpackage dicom_node.models
            for alias in node.names:
                yield ImportEdge(module, f"{name}.{alias.name}", node.lineno)


def all_edges() -> list[ImportEdge]:
    return [edge for module, path in module_files() for edge in imports_of(module, path)]


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(importers: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    """Edges from a module inside ``importers`` to a name inside ``forbidden``, as readable lines."""
    found = []
    for edge in all_edges():
        if any(within(edge.importer, p) for p in importers) and any(within(edge.imported, f) for f in forbidden):
            found.append(f"{edge.importer}:{edge.line} imports {edge.imported}")
    return sorted(set(found))


def test_every_package_folder_is_installed() -> None:
    """pyproject.toml lists packages by name (find cannot follow the package-dir mapping): a new subpackage that is
    not listed would work in the editable install and be missing from the wheel."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    present = {module for module, path in module_files() if path.name == "__init__.py"}
    assert present - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - present == set(), "listed in pyproject.toml but not present"


MODEL_FORBIDDEN = (
    "pynetdicom",
    "sqlalchemy",
    "alembic",
    "celery",
    "kombu",
    "redis",
    "fastapi",
    "uvicorn",
    "dicom_node.network",
    "dicom_node.storage",
    "dicom_node.studies",
    "dicom_node.db",
    "dicom_node.jobs",
    "dicom_node.delivery",
    "dicom_node.results",
    "dicom_node.admin",
    "dicom_node.cli",
    "dicom_node.workers",
)


def test_models_never_import_networking_the_database_or_celery() -> None:
    assert violations(("dicom_node.models",), MODEL_FORBIDDEN) == []


def test_the_installed_package_never_imports_experiments_or_bench() -> None:
    """experiments/ (methods no shipped model uses) and bench/ live in the repository, outside the package."""
    assert violations(tuple(PACKAGE_DIRS), ("experiments", "bench")) == []


def test_results_and_delivery_never_import_torch() -> None:
    """Checked twice: no torch import in their source, and importing every one of their modules in a fresh
    interpreter leaves torch unloaded (an indirect import through a model module would show here)."""
    layers = ("dicom_node.results", "dicom_node.delivery")
    assert violations(layers, ("torch",)) == []
    modules = [module for module, _ in module_files() if any(within(module, p) for p in layers)]
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    code += "print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("module", ["dicom_node.models", "dicom_node.workers"])
def test_installed_names_map_to_the_top_level_folders(module: str) -> None:
    """models/ and workers/ import as dicom_node.models and dicom_node.workers, never as top-level names."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import {module}, importlib.util as u; print({module}.__file__); "
            "print(u.find_spec('models') is None and u.find_spec('workers') is None)",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    file, top_level_absent = done.stdout.split()
    assert Path(file).resolve().parent == PACKAGE_DIRS[module]
    assert top_level_absent == "True"


# The layers of docs/architecture.md, each with what it may import from dicom_node (its own package always).
# Data flows receive → studies → jobs → runtime → detectors / results → delivery; imports point the other way only
# where a lower layer's own types are needed, and nothing below the composition roots (dicom_node.cli, which holds
# `serve` and `worker`) imports the runtime (dicom_node.workers).
FOUNDATION = (
    "dicom_node.config",
    "dicom_node.db",
    "dicom_node.timeutil",
    "dicom_node.logconfig",
    "dicom_node.lifetime",
    "dicom_node.heartbeat",
)
LAYERS: dict[str, tuple[str, ...]] = {
    "dicom_node.models": (),
    "dicom_node.storage": FOUNDATION,
    "dicom_node.studies": ("dicom_node.storage", *FOUNDATION),
    "dicom_node.network": ("dicom_node.studies", "dicom_node.storage", *FOUNDATION),
    "dicom_node.node": ("dicom_node.network", "dicom_node.studies", "dicom_node.storage", *FOUNDATION),
    "dicom_node.jobs": ("dicom_node.studies", *FOUNDATION),
    "dicom_node.results": ("dicom_node.models", *FOUNDATION),
    "dicom_node.delivery": ("dicom_node.results", "dicom_node.jobs", "dicom_node.models", *FOUNDATION),
    "dicom_node.workers": (
        "dicom_node.delivery",
        "dicom_node.results",
        "dicom_node.models",
        "dicom_node.jobs",
        "dicom_node.studies",
        "dicom_node.storage",
        *FOUNDATION,
    ),
    "dicom_node.admin": ("dicom_node.jobs", *FOUNDATION),
}
# The open sets' registries, which the configuration reads to validate names (``detectors.<name>``, a destination's
# ``kind``). Both are light: importing them loads neither torch nor a transport (checked below).
REGISTRIES = ("dicom_node.models.registry", "dicom_node.delivery.destinations.registry")
for _module in FOUNDATION:
    LAYERS[_module] = (*FOUNDATION, *REGISTRIES) if _module == "dicom_node.config" else FOUNDATION


def layer_of(module: str) -> str | None:
    """The most specific layer a module belongs to; None for the top (dicom_node.cli, dicom_node.__main__, the
    package root), which may import anything."""
    owners = [layer for layer in LAYERS if within(module, layer)]
    return max(owners, key=len) if owners else None


def _package_of_allowed(imported: str, allowed: tuple[str, ...]) -> bool:
    """``from dicom_node.models import registry`` names the package on its way to an allowed module."""
    return any(a.startswith(imported + ".") for a in allowed)


def layer_violations() -> list[str]:
    found = []
    for edge in all_edges():
        layer = layer_of(edge.importer)
        if layer is None or not within(edge.imported, "dicom_node") or edge.imported == "dicom_node":
            continue
        allowed = (layer, *LAYERS[layer])
        if edge.imported in ("dicom_node.__version__",):
            continue
        if not any(within(edge.imported, a) for a in allowed) and not _package_of_allowed(edge.imported, allowed):
            found.append(f"{edge.importer}:{edge.line} imports {edge.imported} ({layer} may import {allowed})")
    return sorted(set(found))


def test_every_module_has_a_layer() -> None:
    """A new top-level module or package must be placed in LAYERS (or be the top: cli)."""
    top = {"dicom_node", "dicom_node.__main__"}
    unplaced = [
        m for m, _ in module_files() if layer_of(m) is None and m not in top and not within(m, "dicom_node.cli")
    ]
    assert unplaced == []


def test_layers_import_only_downwards() -> None:
    assert layer_violations() == []


def test_reading_the_configuration_loads_no_model_transport_or_runtime() -> None:
    """The configuration validates detector names and destination kinds against the registries; that must not load
    torch, the DICOM network stack, HTTP clients or Celery (every command, `dicom-node jobs list` too, reads it)."""
    code = (
        "import sys\n"
        "from dicom_node.config import load_settings\n"
        "pacs = {'name': 'pacs', 'ae_title': 'PACS', 'host': 'localhost', 'port': 104}\n"
        "load_settings(overrides={'destinations': [pacs]})\n"
        "print(sorted(m for m in ('torch', 'pynetdicom', 'httpx', 'celery') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == "[]"
