"""The compiled schema pre-check never accepts what jsonschema rejects, and errors are unchanged."""

from __future__ import annotations

import math
import random

import pytest

import schemas

VALUES = [None, True, False, 0, 1, -1, 99999999, 100000000, 1.0, 2.5, math.nan, math.inf, "",
          "usd", "USD", "us", "usdx", "pi_1", "pi_", "pi_abc\n", "x" * 41, "x" * 300, "x" * 1001,
          "payment_intent", "refund", "succeeded", [], ["a"], {}, {"a": "b"}, {"a": 1},
          {"k" * 41: "v"}, {str(i): "v" for i in range(51)}]
KEYS = ["amount", "currency", "customer", "description", "payment_method", "metadata", "id",
        "object", "status", "livemode", "payment_intent", "reason", "error", "type", "code",
        "decline_code", "message", "param", "to", "subject", "text", "html", "extra"]


GOOD = {"amount": [1, 1999, 99999999], "currency": ["usd", "eur"], "id": ["pi_1", "re_1"],
        "object": ["payment_intent", "refund"], "status": ["succeeded", "x" * 64],
        "metadata": [{}, {"order": "1"}], "customer": ["cus_1"], "payment_intent": ["pi_1"],
        "reason": ["requested_by_customer"], "livemode": [False], "type": ["card_error"]}


def _object(rng: random.Random, schema: dict, depth: int = 0) -> dict:
    props = schema.get("properties", {})
    required = schema.get("required", [])
    doc = {}
    for key in [*required, *rng.sample(sorted(props), rng.randint(0, len(props)))]:
        if rng.random() < 0.05:
            continue
        sub = props.get(key, {})
        if sub.get("type") == "object" and depth < 2 and rng.random() < 0.7:
            doc[key] = _object(rng, sub, depth + 1)
        elif rng.random() < 0.6 and key in GOOD:
            doc[key] = rng.choice(GOOD[key])
        else:
            doc[key] = rng.choice(VALUES)
    if rng.random() < 0.1:
        doc[rng.choice(KEYS)] = rng.choice(VALUES)
    return doc


def documents(rng: random.Random, schema: dict):
    for _ in range(3000):
        yield _object(rng, schema)
    yield from VALUES


ALL = [("operations", n) for n in schemas._index("operations")] + \
      [("responses", n) for n in schemas._index("responses")]


@pytest.mark.parametrize(("kind", "name"), ALL)
def test_precheck_accepts_only_what_jsonschema_accepts(kind, name):
    accepts = schemas._accepts(kind, name)
    validator = schemas._validator(kind, name)
    rng = random.Random(name)
    accepted = 0
    for doc in documents(rng, schemas.load(kind, name)):
        if accepts is not None and accepts(doc):
            assert not list(validator.iter_errors(doc)), (name, doc)
            accepted += 1
    assert accepted > 50 or accepts is None


def test_the_payments_schemas_are_compiled():
    assert schemas._accepts("operations", "payments.charge") is not None
    assert schemas._accepts("responses", "payments.payment_intent") is not None
    assert schemas._accepts("operations", "payments.charge")({"amount": 1999, "currency": "usd"})


@pytest.mark.parametrize(("payload", "message"), [
    ({"amount": 0, "currency": "usd"}, "operations/payments.charge: $.amount: violates exclusiveMinimum 0"),
    ({"amount": 1, "currency": "USD"}, "operations/payments.charge: $.currency: must match pattern '^[a-z]{3}$'"),
    ({"amount": True, "currency": "usd"}, "operations/payments.charge: $.amount: must match type 'integer'"),
    ({"currency": "usd"}, "operations/payments.charge: $: missing required property 'amount'"),
    ({"amount": 1, "currency": "usd", "x": 1}, "operations/payments.charge: $: unexpected property"),
])
def test_errors_still_come_from_jsonschema(payload, message):
    with pytest.raises(schemas.SchemaError) as info:
        schemas.validate_operation("payments", "charge", payload)
    assert str(info.value) == message


def test_unknown_documents_still_raise_key_error():
    with pytest.raises(KeyError):
        schemas.validate_operation("payments", "nope", {})
