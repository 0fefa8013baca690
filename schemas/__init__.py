"""JSON Schema documents for operation payloads and provider responses, and a tiny loader.

Layout (data, versioned by file name)::

    schemas/operations/<provider>.<operation>.v<N>.json   payloads accepted by ``enqueue``
    schemas/responses/<provider>.<name>.v<N>.json         provider responses the code reads

The newest version of each document is the one used. Validation errors name the
JSON path of the first offending value (``$.amount``), never the value itself,
so an error message cannot leak a payload into a log.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

from jsonschema import Draft202012Validator

__all__ = ["SchemaError", "operations", "validate_operation", "validate_response", "load"]

_ROOT = Path(__file__).resolve().parent
_NAME = re.compile(r"^(?P<name>[a-z0-9_]+\.[a-z0-9_]+)\.v(?P<version>\d+)\.json$")


class SchemaError(ValueError):
    """A document failed its schema. ``path`` is a JSON path such as ``$.metadata.order``."""

    def __init__(self, document: str, path: str, reason: str):
        self.document = document
        self.path = path
        self.reason = reason
        super().__init__(f"{document}: {path}: {reason}")


@cache
def _index(kind: str) -> dict[str, Path]:
    """Map ``provider.name`` to the file of its newest version, for ``kind`` in operations/responses."""
    newest: dict[str, tuple[int, Path]] = {}
    for path in (_ROOT / kind).glob("*.json"):
        match = _NAME.match(path.name)
        if not match:
            continue
        version = int(match["version"])
        name = match["name"]
        if name not in newest or newest[name][0] < version:
            newest[name] = (version, path)
    return {name: path for name, (_, path) in newest.items()}


@cache
def load(kind: str, name: str) -> dict:
    """Return the newest schema document ``kind/name`` (e.g. ``load("operations", "payments.charge")``).

    Raises:
        KeyError: no such document.
    """
    return json.loads(_index(kind)[name].read_text(encoding="utf-8"))


@cache
def _validator(kind: str, name: str) -> Draft202012Validator:
    schema = load(kind, name)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def operations() -> dict[str, frozenset[str]]:
    """Every provider and the operations it accepts, as declared by the operation schemas."""
    found: dict[str, set[str]] = {}
    for name in _index("operations"):
        provider, operation = name.split(".", 1)
        found.setdefault(provider, set()).add(operation)
    return {provider: frozenset(ops) for provider, ops in found.items()}


def _validate(kind: str, name: str, document: object) -> None:
    errors = sorted(_validator(kind, name).iter_errors(document), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        path = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        raise SchemaError(f"{kind}/{name}", path, _reason(error))


def _reason(error) -> str:
    """Describe the failure without quoting the offending value (it may be secret)."""
    if error.validator == "required":
        missing = [p for p in error.validator_value if p not in (error.instance or {})]
        return f"missing required property {missing[0]!r}" if missing else "missing required property"
    if error.validator == "additionalProperties":
        return "unexpected property"
    if error.validator in ("type", "enum", "const", "pattern", "format"):
        return f"must match {error.validator} {error.validator_value!r}"
    if error.validator in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum",
                           "minLength", "maxLength", "minItems", "maxItems", "minProperties"):
        return f"violates {error.validator} {error.validator_value!r}"
    if error.validator in ("anyOf", "oneOf"):
        return "matches none of the allowed shapes"
    return f"fails {error.validator}"


def validate_operation(provider: str, operation: str, payload: object) -> None:
    """Validate an operation payload. Raises KeyError if unknown, SchemaError if invalid."""
    _validate("operations", f"{provider}.{operation}", payload)


def validate_response(provider: str, name: str, document: object) -> None:
    """Validate a provider response body against ``responses/<provider>.<name>``. Raises SchemaError."""
    _validate("responses", f"{provider}.{name}", document)
