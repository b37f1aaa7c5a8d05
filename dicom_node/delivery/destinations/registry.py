"""The registry of destination types: the configured ``kind`` → the class that sends to such a destination.

The built-in types are registered here, once; another type (a plug-in, a test) registers its class with
``register_destination_type`` before the configuration that names its kind is loaded. The configuration checks
``destinations[].kind`` against ``known_kinds`` and each destination's fields against its type's ``requires``.
"""

from __future__ import annotations

from typing import TypeVar

from dicom_node.config import Destination, Settings
from dicom_node.delivery.destinations.base import DestinationType
from dicom_node.delivery.destinations.dimse import DimseDestination
from dicom_node.delivery.destinations.stow_rs import StowRsDestination

T = TypeVar("T", bound=type[DestinationType])

_types: dict[str, type[DestinationType]] = {}


def register_destination_type(cls: T) -> T:
    """Make ``cls.kind`` a destination kind the configuration accepts (usable as a class decorator). Registering
    the same class again does nothing; another class under a kind already taken is refused."""
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"{cls.__name__} does not name its kind")
    known = _types.get(kind)
    if known is not None and known is not cls:
        raise ValueError(f"destination kind {kind!r} is already {known.__module__}.{known.__qualname__}")
    _types[kind] = cls
    return cls


def unregister_destination_type(kind: str) -> None:
    """Forget ``kind`` (a test's or plug-in's own type); a configuration naming it no longer validates."""
    _types.pop(kind, None)


def known_kinds() -> tuple[str, ...]:
    """The registered kinds, in the order they were registered (the built-in ones first)."""
    return tuple(_types)


def destination_type(kind: str) -> type[DestinationType]:
    try:
        return _types[kind]
    except KeyError:
        raise ValueError(f"unknown destination kind {kind!r} (known kinds: {', '.join(known_kinds())})") from None


def open_destination(config: Destination, settings: Settings) -> DestinationType:
    """The configured destination ``config`` as an instance of its type, ready to send."""
    return destination_type(config.kind)(config, settings)


# The built-in types: C-STORE with Storage Commitment (PS3.4 Annexes B and J) and STOW-RS (PS3.18 10.5).
for _builtin in (DimseDestination, StowRsDestination):
    register_destination_type(_builtin)
