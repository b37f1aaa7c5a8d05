"""Static checks of docker/: no Docker engine runs here, so the files are parsed, cross-checked against each other
and against the repository, and validated as dicom-node configuration. Nothing is built or started."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from dicom_node.cli import build_parser
from dicom_node.config import load_settings

DOCKER = REPO / "docker"
INSTRUCTIONS = {
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
}


def check_command(argv: list[str]) -> None:
    """``argv`` parses with the dicom-node CLI. ``worker`` comes from the workers branch: until it is merged, only
    its name is checked."""
    parser = build_parser()
    commands = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices  # type: ignore[union-attr]
    if argv[0] == "worker" and "worker" not in commands:
        return
    parser.parse_args(argv)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined: list[str] = []
    buffer = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        joined.append(buffer + line)
        buffer = ""
    assert not buffer, f"{path.name}: dangling line continuation"
    result = []
    for line in joined:
        keyword, _, args = line.partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile(name: str) -> None:
    steps = instructions(DOCKER / name)
    keywords = [k for k, _ in steps]
    assert set(keywords) <= INSTRUCTIONS, set(keywords) - INSTRUCTIONS
    first_non_arg = next(k for k in keywords if k != "ARG")
    assert first_non_arg == "FROM"
    # torch pinned to 2.13.0 from a PyTorch index, every pip install with the constraints file.
    runs = [args for k, args in steps if k == "RUN"]
    pip_installs = [r for r in runs if "pip install" in r]
    assert pip_installs and all("-c constraints.txt" in r for r in pip_installs)
    torch = [r for r in pip_installs if "torch==2.13.0" in r]
    assert len(torch) == 1 and "--index-url" in torch[0]
    # COPY sources exist in the repository (the build context is the repository root).
    for k, args in steps:
        if k == "COPY":
            *sources, _dest = args.split()
            for source in sources:
                assert (REPO / source).exists(), f"{name}: COPY {source} does not exist"
    # Exec form for the entry point and command (signals reach dicom-node, which shuts down cleanly on SIGTERM).
    for k, args in steps:
        if k in ("ENTRYPOINT", "CMD"):
            assert isinstance(json.loads(args), list)
    assert ("USER", "dicomnode") in steps
    entry = json.loads(dict(steps)["ENTRYPOINT"])
    assert entry == ["dicom-node"]
    command = json.loads(dict(steps)["CMD"])
    check_command(command)  # a command the CLI knows, with valid options


def test_node_image_is_cpu_python_311() -> None:
    steps = instructions(DOCKER / "Dockerfile")
    assert steps[0] == ("FROM", "python:3.11-slim")
    assert any("download.pytorch.org/whl/cpu" in args for k, args in steps if k == "RUN")
    gpu = instructions(DOCKER / "Dockerfile.gpu")
    assert any(k == "ARG" and args.startswith("CUDA_IMAGE=nvidia/cuda:") for k, args in gpu)


def test_compose_file() -> None:
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"node", "worker", "redis", "postgres", "orthanc"} <= set(services)
    for name, service in services.items():
        image = service.get("image")
        assert image and re.fullmatch(r"[\w./-]+:[\w.-]+", image), f"{name}: image without a tag"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: {source} missing"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} not declared"
        if "build" in service:
            assert (DOCKER.parent / service["build"]["dockerfile"]).is_file()
            assert service["build"]["context"] == ".."
    # Node and workers share the spool, the database and the broker.
    for name in ("node", "worker", "worker-cpu"):
        env = services[name]["environment"]
        assert env["DICOM_NODE_DATABASE__URL"].startswith("postgresql+psycopg2://dicomnode:dicomnode@postgres:5432/")
        assert env["DICOM_NODE_BROKER__URL"] == "redis://redis:6379/0"
        assert "spool:/var/lib/dicom-node" in services[name]["volumes"]
        check_command(services[name]["command"])
    postgres_env = services["postgres"]["environment"]
    assert postgres_env["POSTGRES_DB"] == "dicomnode" and postgres_env["POSTGRES_USER"] == "dicomnode"
    assert services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_compose_configuration_is_valid_and_matches_orthanc() -> None:
    settings = load_settings(DOCKER / "dicom-node.yaml")
    orthanc = json.loads((DOCKER / "orthanc" / "orthanc.json").read_text())
    [destination] = settings.destinations
    assert (destination.ae_title, destination.host, destination.port) == ("ORTHANC", "orthanc", orthanc["DicomPort"])
    assert orthanc["DicomAet"] == "ORTHANC"
    # Orthanc knows the node (for C-ECHO/C-MOVE from its UI) under the node's AE title and port.
    assert orthanc["DicomModalities"]["dicomnode"] == [settings.node.ae_title, "node", settings.node.port]
    assert settings.http.port == 8080 and settings.http.bind_address == "0.0.0.0"
    assert settings.workers.embedded is False
