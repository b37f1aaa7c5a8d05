"""The registry of destination types: the configured ``kind`` → the class that sends to such a destination.

Types are declared as entry points of the ``dicom_node.destinations`` group, name = the kind, value = the class
(``"module:Class"``); dicom-node declares its own in pyproject.toml (C-STORE with Storage Commitment, PS3.4
Annexes B and J; STOW-RS, PS3.18 10.5). Another distribution adds a type the same way, with no change here, and every
process of the node (receivers, workers, the CLI) sees it. The kinds are read from the installed metadata without
importing a transport, so the configuration can check ``destinations[].kind`` against ``known_kinds`` cheaply; a
class is imported when its kind is used (the configuration's check of the fields it ``requires``, or a delivery).
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points

from dicom_node.config import Destination, Settings
from dicom_node.delivery.destinations.base import DestinationType

ENTRY_POINT_GROUP = "dicom_node.destinations"
DISTRIBUTION = "dicom-node"


def _built_in(entry: EntryPoint) -> bool:
    return entry.dist is not None and entry.dist.name == DISTRIBUTION


@cache
def _entries() -> dict[str, EntryPoint]:
    """kind → entry point, the built-in kinds first; read once per process (``clear_cache`` reads again). A kind
    declared by two distributions with different classes is refused: which one would deliver is not for the
    order of sys.path to decide."""
    found: dict[str, EntryPoint] = {}
    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (not _built_in(e), e.name)):
        known = found.get(entry.name)
        if known is not None and known.value != entry.value:
            raise RuntimeError(f"destination kind {entry.name!r} is declared twice: {known.value} and {entry.value}")
        found[entry.name] = entry
    return found


def clear_cache() -> None:
    """Read the installed entry points again (a test that installs a type)."""
    _entries.cache_clear()
    destination_type.cache_clear()


def known_kinds() -> tuple[str, ...]:
    """The installed kinds, the built-in ones first."""
    return tuple(_entries())


@cache
def destination_type(kind: str) -> type[DestinationType]:
    """The class of ``kind``; ValueError naming the known kinds for an unknown one."""
    entry = _entries().get(kind)
    if entry is None:
        raise ValueError(f"unknown destination kind {kind!r} (known kinds: {', '.join(known_kinds())})")
    cls = entry.load()
    if not (isinstance(cls, type) and issubclass(cls, DestinationType)) or cls.kind != kind:
        raise RuntimeError(f"entry point {kind} = {entry.value} is not a DestinationType whose kind is {kind!r}")
    return cls


def open_destination(config: Destination, settings: Settings) -> DestinationType:
    """The configured destination ``config`` as an instance of its type, ready to send."""
    return destination_type(config.kind)(config, settings)
