"""The schema documents and their validator (fastjsonschema): valid draft-07 documents, the
same verdicts as the reference implementation (jsonschema) except that patterns match the
whole string, errors that name paths and never values, and linear work on large arrays."""

from __future__ import annotations

import math
import random

import pytest
from jsonschema import Draft7Validator

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
        "reason": ["requested_by_customer"], "livemode": [False], "type": ["card_error"],
        "to": ["a@example.com", [{"email": "b@example.com", "name": "B"}, "c@example.com"]],
        "subject": ["Hello"], "text": ["body"], "html": ["<p>body</p>"],
        "reply_to": ["r@example.com"], "categories": [["receipts"]],
        "email": ["a@example.com"], "properties": [{}, {"firstname": "Ann"}],
        "results": [[{"id": "101", "new": True}]],
        "endpoint_id": ["ep_01M98JR2GSHSCNPS42QE6EQ1RP"], "event_type": ["invoice.paid"],
        "data": [{}, {"invoice": "in_1"}], "timestamp": ["2026-12-07T15:00:00.000Z"]}


def _object(rng: random.Random, schema: dict, depth: int = 0) -> dict:
    props = schema.get("properties", {})
    required = schema.get("required", [])
    doc = {}
    one_body = rng.sample(["text", "html"], 1) if "text" in props else []   # email's anyOf
    for key in [*required, *rng.sample(sorted(props), rng.randint(0, len(props))), *one_body]:
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


ALL = [(kind, n) for kind in ("operations", "responses", "common") for n in schemas._index(kind)]


@pytest.mark.parametrize(("kind", "name"), ALL)
def test_every_document_is_a_valid_draft_7_schema(kind, name):
    Draft7Validator.check_schema(schemas.load(kind, name))


def _ends_in_newline(doc) -> bool:
    if isinstance(doc, str):
        return doc.endswith("\n")
    if isinstance(doc, dict):
        return any(_ends_in_newline(v) for v in doc.values())
    if isinstance(doc, list):
        return any(_ends_in_newline(v) for v in doc)
    return False


@pytest.mark.parametrize(("kind", "name"), ALL)
def test_verdicts_match_jsonschema_except_stricter_patterns(kind, name):
    """3,000 generated documents per schema: the same accept/refuse as jsonschema's Draft 7
    validator — except where a string ends in a newline, which our full-match patterns may
    refuse and Python's ``re.search`` accepts (``$`` matches before a final newline)."""
    reference = Draft7Validator(schemas.load(kind, name))
    rng = random.Random(name)
    accepted = 0
    for doc in documents(rng, schemas.load(kind, name)):
        try:
            schemas.validate(kind, name, doc)
            ours = True
        except schemas.SchemaError:
            ours = False
        theirs = reference.is_valid(doc)
        if _ends_in_newline(doc):
            assert theirs or not ours, (name, doc)
        else:
            assert ours == theirs, (name, doc)
        accepted += ours
    assert accepted > 50 or kind == "common"


@pytest.mark.parametrize(("name", "payload", "path"), [
    ("payments.charge", {"amount": 1, "currency": "usd\n"}, "$.currency"),
    ("payments.refund", {"payment_intent": "pi_1\n"}, "$.payment_intent"),
    ("email.send", {"to": "a@example.com\n", "subject": "s", "text": "t"}, "$.to"),
    ("email.send", {"to": [{"email": "a@example.com\n"}], "subject": "s", "text": "t"},
     "$.to[0].email"),
    ("email.send", {"to": "a@example.com", "subject": "line\n", "text": "t"}, "$.subject"),
])
def test_a_trailing_newline_fails_anchored_patterns(name, payload, path):
    provider, operation = name.split(".")
    with pytest.raises(schemas.SchemaError) as info:
        schemas.validate_operation(provider, operation, payload)
    assert info.value.path == path


def test_a_dollar_sign_inside_an_email_is_just_a_character():
    schemas.validate_operation("email", "send", {"to": "a$b@example.com", "subject": "s",
                                                 "text": "t"})


@pytest.mark.parametrize("payload", [
    {"to": "a@example.com", "subject": "s" * 999, "text": "t"},
    {"to": "a@example.com", "subject": "s", "text": "t", "categories": ["c" * 256]},
    {"to": {"email": "a@example.com", "name": "n" * 257}, "subject": "s", "text": "t"},
    {"to": "a@example.com", "subject": "s", "text": "t" * 200_001},
    {"to": "a@example.com", "subject": "s", "html": "h" * 200_001},
])
def test_limits_beside_a_reference_and_on_bodies_apply(payload):
    """A ``$ref`` replaces its siblings in draft-07, so limits sit beside it in ``allOf``:
    they hold (subject 998, category 255, name 256); text and html are capped at 200,000."""
    with pytest.raises(schemas.SchemaError, match="maxLength"):
        schemas.validate_operation("email", "send", payload)


def test_a_huge_recipient_list_fails_on_its_size_first():
    """maxItems is checked before uniqueItems (quadratic in jsonschema), and uniqueItems is
    linear here: 20,000 address objects are refused for their number."""
    payload = {"to": [{"email": f"a{i}@example.com"} for i in range(20_000)], "subject": "s",
               "text": "t"}
    with pytest.raises(schemas.SchemaError) as info:
        schemas.validate_operation("email", "send", payload)
    assert (info.value.path, info.value.reason) == ("$.to", "violates maxItems 50")
    dupes = {"to": ["a@example.com", "b@example.com", "a@example.com"], "subject": "s",
             "text": "t"}
    with pytest.raises(schemas.SchemaError, match="items must be unique"):
        schemas.validate_operation("email", "send", dupes)


@pytest.mark.parametrize("key", ["k", "order-42-charge", "a b", "~" * 255])
def test_idempotency_keys_that_are_header_values(key):
    schemas.check_idempotency_key(key)


@pytest.mark.parametrize("key", ["", " k", "k ", "k\n", "k\x00", "заказ", "k" * 256, None, 42])
def test_idempotency_keys_that_are_not(key):
    with pytest.raises(schemas.SchemaError) as info:
        schemas.check_idempotency_key(key)
    assert str(key) not in str(info.value) or key in ("k", "")


def test_a_remote_reference_is_never_fetched(monkeypatch, tmp_path):
    """Every $ref is local; a remote one fails at compile time instead of being fetched."""
    bad = tmp_path / "operations"
    bad.mkdir()
    (bad / "x.y.v1.json").write_text('{"$ref": "https://example.com/schema.json"}')
    monkeypatch.setattr(schemas, "_ROOT", tmp_path)
    for fn in (schemas._index, schemas.load, schemas._validator):
        fn.cache_clear()
    try:
        with pytest.raises(KeyError, match="remote"):
            schemas.validate_operation("x", "y", {})
    finally:
        monkeypatch.undo()
        for fn in (schemas._index, schemas.load, schemas._validator):
            fn.cache_clear()


@pytest.mark.parametrize(("payload", "message"), [
    ({"amount": 0, "currency": "usd"}, "operations/payments.charge: $.amount: violates exclusiveMinimum 0"),
    ({"amount": 1, "currency": "USD"}, "operations/payments.charge: $.currency: must match pattern '^[a-z]{3}$'"),
    ({"amount": True, "currency": "usd"}, "operations/payments.charge: $.amount: must match type 'integer'"),
    ({"currency": "usd"}, "operations/payments.charge: $: missing required property 'amount'"),
    ({"amount": 1, "currency": "usd", "x": 1}, "operations/payments.charge: $: unexpected property"),
])
def test_errors_name_the_path_and_rule(payload, message):
    with pytest.raises(schemas.SchemaError) as info:
        schemas.validate_operation("payments", "charge", payload)
    assert str(info.value) == message


def test_unknown_documents_still_raise_key_error():
    with pytest.raises(KeyError):
        schemas.validate_operation("payments", "nope", {})


@pytest.mark.parametrize("key, shown", [
    ("order", "$.metadata.order"),
    ("a.b[0]", '$.metadata["a.b[0]"]'),
    ("ann.smith@example.com\r\nInjected: yes", '$.metadata["ann.smith@example.com\\r\\nInjected'),
])
def test_paths_quote_keys_that_are_not_plain_names(key, shown):
    """Keys holding dots or brackets are matched to the document (not split on), and any key
    that is not a plain name is quoted and escaped: no CR/LF reaches a message."""
    with pytest.raises(schemas.SchemaError) as info:
        schemas.validate_operation("payments", "charge",
                                   {"amount": 1, "currency": "usd", "metadata": {key: 5}})
    assert info.value.path.startswith(shown)
    assert "\r" not in str(info.value) and "\n" not in str(info.value)
