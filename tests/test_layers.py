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
