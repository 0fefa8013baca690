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
from collections.abc import Callable
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


# A fast pre-check for the common case, a valid document: schemas using only the keywords
# below are compiled into a plain predicate that answers True only when jsonschema would
# find no error (it is stricter where in doubt: exact types, no bool/float look-alikes).
# Anything else — False, or a schema with another keyword — goes to jsonschema, which
# decides and names the error as before. Worth it: a delivery validates twice (payload,
# response), and jsonschema costs tens of µs per small document.
_ANNOTATIONS = frozenset({"$schema", "$id", "$comment", "title", "description", "examples",
                          "default", "deprecated", "readOnly", "writeOnly"})
_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "object": (dict,),
          "array": (list,), "boolean": (bool,), "null": (type(None),)}


class _Unsupported(Exception):
    pass


def _compile(schema) -> Callable[[object], bool]:
    """A predicate: True means ``schema`` certainly accepts the value. Raises _Unsupported."""
    if schema is True:
        return lambda value: True
    if schema is False or not isinstance(schema, dict):
        if schema is False:
            return lambda value: False
        raise _Unsupported
    checks: list[Callable[[object], bool]] = []
    for keyword, arg in schema.items():
        if keyword in _ANNOTATIONS or keyword == "properties" or keyword == "additionalProperties":
            continue
        if keyword == "type":
            names = [arg] if isinstance(arg, str) else arg
            if not isinstance(names, list) or any(n not in _TYPES for n in names):
                raise _Unsupported
            exact = frozenset(t for n in names for t in _TYPES[n])
            checks.append(lambda v, exact=exact: type(v) in exact)
        elif keyword == "required":
            keys = tuple(arg)
            checks.append(lambda v, keys=keys: type(v) is not dict or all(k in v for k in keys))
        elif keyword == "pattern":
            search = re.compile(arg).search
            checks.append(lambda v, search=search: type(v) is not str or search(v) is not None)
        elif keyword in ("minLength", "maxLength", "minItems", "maxItems", "minProperties",
                         "maxProperties"):
            kind_ = {"L": str, "I": list, "P": dict}[keyword[3]]
            bound = arg
            if keyword.startswith("min"):
                checks.append(lambda v, k=kind_, b=bound: type(v) is not k or len(v) >= b)
            else:
                checks.append(lambda v, k=kind_, b=bound: type(v) is not k or len(v) <= b)
        elif keyword in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if type(arg) not in (int, float):
                raise _Unsupported
            test = {"minimum": lambda v, b=arg: v >= b, "maximum": lambda v, b=arg: v <= b,
                    "exclusiveMinimum": lambda v, b=arg: v > b,
                    "exclusiveMaximum": lambda v, b=arg: v < b}[keyword]
            # bool is not a number to jsonschema (the keyword ignores it); NaN fails every test
            checks.append(lambda v, test=test: type(v) not in (int, float) or test(v))
        elif keyword in ("const", "enum"):
            values = [arg] if keyword == "const" else arg
            if not isinstance(values, list) or any(type(x) is not str for x in values):
                raise _Unsupported
            allowed = frozenset(values)
            checks.append(lambda v, allowed=allowed: type(v) is str and v in allowed)
        elif keyword == "propertyNames":
            names = _compile(arg)
            checks.append(lambda v, names=names: type(v) is not dict or all(map(names, v)))
        elif keyword == "items":
            item = _compile(arg)
            checks.append(lambda v, item=item: type(v) is not list or all(map(item, v)))
        else:
            raise _Unsupported   # $ref, anyOf, if/then/else, uniqueItems, format, ...
    properties = schema.get("properties", {})
    additional = schema.get("additionalProperties", True)
    if not isinstance(properties, dict):
        raise _Unsupported
    if properties or additional is not True:
        known = {k: _compile(sub) for k, sub in properties.items()}
        rest = _compile(additional)

        def members(v, known=known, rest=rest) -> bool:
            if type(v) is not dict:
                return True
            for key, item in v.items():
                check = known.get(key, rest)
                if not check(item):
                    return False
            return True
        checks.append(members)
    if not checks:
        return lambda value: True
    if len(checks) == 1:
        return checks[0]
    checks_ = tuple(checks)
    return lambda value: all(check(value) for check in checks_)


@cache
def _accepts(kind: str, name: str) -> Callable[[object], bool] | None:
    """The compiled pre-check of ``kind/name``, or None if its schema uses other keywords."""
    _validator(kind, name)   # KeyError for an unknown document, and the schema is checked
    try:
        return _compile(load(kind, name))
    except (_Unsupported, TypeError, ValueError, re.error):
        return None


def _validate(kind: str, name: str, document: object) -> None:
    accepts = _accepts(kind, name)
    if accepts is not None and accepts(document):
        return
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
