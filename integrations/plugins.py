"""Providers defined in other packages: adapters found through the ``outbox.providers``
entry point, so a team adds an integration without editing this project (README, "Add your
own integration"; ``tests/plugin_pkg`` is a complete one).

An entry point's name is the provider's name and its object the ``Adapter`` subclass::

    [project.entry-points."outbox.providers"]
    tickets = "outbox_tickets:TicketsAdapter"

The adapter sets ``schema_dir``: a folder laid out like ``schemas/``, with
``operations/<provider>.<operation>.v<N>.json`` for each of its operations (optionally
``responses/``), which ``schemas`` reads as its own. Found once per process;
``discovered.cache_clear()`` looks again (tests).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from types import MappingProxyType

from integrations.base import Adapter
from integrations.errors import ConfigurationError

GROUP = "outbox.providers"
# A provider name becomes a queue, a Redis key part and an environment prefix
# (OUTBOX_<NAME>_…): lower-case letters, digits and underscores.
NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
# Queues of the outbox's own, and the built-in providers (``registry._BUILT_IN``).
RESERVED = frozenset({"inbound", "dead_letter"})
BUILT_IN = frozenset({"payments", "email", "crm", "webhooks"})


@cache
def discovered() -> Mapping[str, type[Adapter]]:
    """Every installed plugin's adapter class, by provider name.

    Raises:
        ConfigurationError: a plugin cannot be imported, is not an ``Adapter``, or has a
            name that cannot be a provider's (one line, naming the entry point).
    """
    found: dict[str, type[Adapter]] = {}
    for point in entry_points(group=GROUP):
        where = f"provider plugin {point.name!r} ({point.value})"
        if not NAME.match(point.name) or point.name in RESERVED:
            raise ConfigurationError(f"{where}: {point.name!r} cannot be a provider name "
                                     "(lower-case letters, digits and _, not inbound or "
                                     "dead_letter)")
        if point.name in BUILT_IN:
            raise ConfigurationError(f"provider plugin {point.name!r} has the name of a "
                                     "built-in provider; rename its entry point and adapter")
        try:
            adapter = point.load()
        except Exception as exc:   # noqa: BLE001  (whatever the plugin's import raises)
            raise ConfigurationError(f"{where} cannot be imported: {type(exc).__name__}: "
                                     f"{exc}") from None
        if not (isinstance(adapter, type) and issubclass(adapter, Adapter)):
            raise ConfigurationError(f"{where} is not an integrations.base.Adapter subclass")
        if getattr(adapter, "name", None) != point.name:
            raise ConfigurationError(f"{where}: the adapter's name is "
                                     f"{getattr(adapter, 'name', None)!r}, not {point.name!r}")
        _check_schemas(where, adapter)
        if point.name in found and found[point.name] is not adapter:
            raise ConfigurationError(f"{where}: two installed plugins are named {point.name!r}")
        found[point.name] = adapter
    return MappingProxyType(found)


def _check_schemas(where: str, adapter: type[Adapter]) -> None:
    """What an operation is, and which exist, is its schema's to say (``enqueue`` reads
    ``schemas``, never the adapters): every operation needs one."""
    folder = getattr(adapter, "schema_dir", None)
    if not folder or not (Path(folder) / "operations").is_dir():
        raise ConfigurationError(f"{where} has no schema_dir with an operations/ folder")
    missing = sorted(op for op in adapter.operations
                     if not any((Path(folder) / "operations").glob(f"{adapter.name}.{op}.v*.json")))
    if missing:
        raise ConfigurationError(f"{where} has no schema for {adapter.name}.{missing[0]} in "
                                 f"{folder}/operations")


def schema_dirs() -> dict[str, Path]:
    """Each plugin provider's schema folder, by provider name."""
    return {name: Path(adapter.schema_dir) for name, adapter in discovered().items()}
