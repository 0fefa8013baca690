"""JSON Schema documents for operation payloads, provider responses and shared rules, and a
tiny loader that validates with them.

Layout (data, versioned by file name)::

    schemas/operations/<provider>.<operation>.v<N>.json   payloads accepted by ``enqueue``
    schemas/responses/<provider>.<name>.v<N>.json         provider responses the code reads
    schemas/common/<name>.v<N>.json                       rules shared by several packages
                                                          (``idempotency_key``)

The newest version of each document is the one used. Documents are JSON Schema draft-07,
compiled once per process by ``fastjsonschema`` (a few µs per small document; checks run in
a fixed order, ``maxItems`` before ``uniqueItems``, and ``uniqueItems`` is linear). Two
details of that library are relied on and tested: a ``$`` in a ``pattern`` means the end of
the string (``"usd\\n"`` does not match ``^[a-z]{3}$``; a literal dollar is written ``\\$``),
and ``$ref`` replaces its sibling keywords (as draft-07 says), so a constraint added to a
referenced definition goes beside it in ``allOf``.

Validation errors name the JSON path of the offending value (``$.to[3].email``) and the
rule it broke, never the value itself, so an error message cannot leak a payload into a log.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from types import MappingProxyType

import fastjsonschema

__all__ = ["SchemaError", "load", "operations", "validate", "validate_operation",
           "validate_response", "check_idempotency_key", "json_path"]

_ROOT = Path(__file__).resolve().parent
_NAME = re.compile(r"^(?P<name>[a-z0-9_]+(?:\.[a-z0-9_]+)?)\.v(?P<version>\d+)\.json$")


class SchemaError(ValueError):
    """A document failed its schema. ``path`` is a JSON path such as ``$.metadata.order``."""

    def __init__(self, document: str, path: str, reason: str):
        self.document = document
        self.path = path
        self.reason = reason
        super().__init__(f"{document}: {path}: {reason}")


@cache
def _index(kind: str) -> dict[str, Path]:
    """Map each name of ``kind`` (operations, responses, common) to its newest version's
    file: ours, and a provider plugin's own (``<its name>.…`` in its ``schema_dir``)."""
    newest: dict[str, tuple[int, Path]] = {}
    for path, provider in _files(kind):
        match = _NAME.match(path.name)
        if not match or (provider and not match["name"].startswith(provider + ".")):
            continue
        version = int(match["version"])
        name = match["name"]
        if name not in newest or newest[name][0] < version:
            newest[name] = (version, path)
    return {name: path for name, (_, path) in newest.items()}


def _files(kind: str) -> list[tuple[Path, str | None]]:
    """(file, the plugin provider it belongs to, or None for ours) for every document."""
    from integrations.plugins import schema_dirs  # here: integrations imports schemas

    found: list[tuple[Path, str | None]] = [(p, None) for p in (_ROOT / kind).glob("*.json")]
    if kind != "common":
        for provider, folder in schema_dirs().items():
            found += [(p, provider) for p in (folder / kind).glob("*.json")]
    return found


@cache
def load(kind: str, name: str) -> dict:
    """Return the newest schema document ``kind/name`` (e.g. ``load("operations", "payments.charge")``).

    Raises:
        KeyError: no such document.
    """
    return json.loads(_index(kind)[name].read_text(encoding="utf-8"))


@cache
def _validator(kind: str, name: str) -> Callable[[object], object]:
    # No handlers for remote references: every $ref in these documents is local, and a
    # remote one must fail here rather than be fetched.
    return fastjsonschema.compile(load(kind, name), handlers={"http": _no_remote,
                                                               "https": _no_remote})


def _no_remote(uri: str):
    raise KeyError(f"remote $ref {uri!r} is not allowed in schemas/")


def compile_all() -> None:
    """Compile every document now (a few ms each), so that no delivery pays for it: a worker
    calls this at start-up, before its threads race for their first rate-limit slots."""
    for kind in ("operations", "responses", "common"):
        for name in _index(kind):
            _validator(kind, name)


@cache
def operations() -> Mapping[str, frozenset[str]]:
    """Every provider and the operations it accepts, as declared by the operation schemas
    (read once per process: ``enqueue`` asks on every call)."""
    found: dict[str, set[str]] = {}
    for name in _index("operations"):
        provider, operation = name.split(".", 1)
        found.setdefault(provider, set()).add(operation)
    return MappingProxyType({provider: frozenset(ops) for provider, ops in found.items()})


def validate(kind: str, name: str, document: object) -> None:
    """Validate ``document`` against ``kind/name``.

    Raises:
        KeyError: no such schema.
        SchemaError: the document is invalid; names the path and the rule, not the value.
    """
    try:
        _validator(kind, name)(document)
    except fastjsonschema.JsonSchemaValueException as exc:
        steps = _steps(document, exc.name or "data")
        raise SchemaError(f"{kind}/{name}", json_path(steps),
                          _reason(exc.rule, exc.rule_definition, _at(document, steps))) from None


def validate_operation(provider: str, operation: str, payload: object) -> None:
    """Validate an operation payload. Raises KeyError if unknown, SchemaError if invalid."""
    validate("operations", f"{provider}.{operation}", payload)


def validate_response(provider: str, name: str, document: object) -> None:
    """Validate a provider response body against ``responses/<provider>.<name>``. Raises SchemaError."""
    validate("responses", f"{provider}.{name}", document)


def check_idempotency_key(key: object) -> None:
    """Apply the one idempotency-key rule (``common/idempotency_key``): 1–255 printable ASCII
    characters without a space at either end, because the key travels in an HTTP header.

    Raises:
        SchemaError: the key breaks the rule (the message never quotes the key).
    """
    validate("common", "idempotency_key", key)


def json_path(parts: tuple | list) -> str:
    """The one way a path is written in errors: ``$.metadata.order``, ``$.to[3]``. A key that
    is not a plain name is quoted, escaped and shortened (``$.metadata["ann@exa…"]``), so a
    path never carries control characters, or much of a key that may be data, into a message.
    """
    out = "$"
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif (part.isascii() and part.replace("_", "a").replace("-", "a").isalnum()
              and len(part) <= 64):
            out += f".{part}"
        else:
            out += f"[{json.dumps(part[:40])}]"
    return out


def _steps(document: object, name: str) -> list[int | str]:
    """The keys and indexes of fastjsonschema's ``name`` (``data.to[3].email``), read against
    the document itself: a key may hold dots or brackets, so the text is matched to the
    document's own keys (the longest that fits), not split on them."""
    steps: list[int | str] = []
    node, rest = document, name[len("data"):]
    while rest:
        if isinstance(node, list) and rest.startswith("["):
            index = rest[1:rest.index("]")]
            steps.append(int(index))
            node = node[int(index)] if int(index) < len(node) else None
            rest = rest[len(index) + 2:]
        elif isinstance(node, dict) and rest.startswith("."):
            keys = [k for k in node if isinstance(k, str) and rest[1:].startswith(k)
                    and rest[1 + len(k):][:1] in ("", ".", "[")]
            if not keys:
                break
            key = max(keys, key=len)
            steps.append(key)
            node, rest = node[key], rest[1 + len(key):]
        else:
            break
    return steps


def _at(document: object, steps: list[int | str]) -> object:
    node = document
    for step in steps:
        if isinstance(node, list) and isinstance(step, int) and step < len(node):
            node = node[step]
        elif isinstance(node, dict):
            node = node.get(step)
        else:
            return None
    return node


def _reason(rule: str | None, definition: object, value: object) -> str:
    """Describe the failure without quoting the offending value (it may be secret)."""
    if rule == "required":
        missing = [p for p in definition if not isinstance(value, dict) or p not in value]
        return f"missing required property {missing[0]!r}" if missing else "missing required property"
    if rule == "additionalProperties":
        return "unexpected property"
    if rule in ("type", "enum", "const", "pattern", "format"):
        return f"must match {rule} {definition!r}"
    if rule in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum", "minLength",
                "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"):
        return f"violates {rule} {definition!r}"
    if rule in ("anyOf", "oneOf"):
        return "matches none of the allowed shapes"
    if rule == "uniqueItems":
        return "items must be unique"
    return f"fails {rule}"
