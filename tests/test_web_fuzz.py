"""Schemathesis on the admin API's own OpenAPI document: generated requests, valid and
invalid (its positive and negative modes), to every operation, with credentials; never a
server error (5xx), and every refusal is JSON with an ``error``.

Driven through Hypothesis with the strategies Schemathesis builds for each operation
(``APIOperation.as_strategy``): its pytest plugin cannot load a schema from a fixture
under this pytest (9.x), and the app needs this test's database."""

from __future__ import annotations

import base64

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

import schemas
from web.admin import create_app
from web.auth import WebAuth

AUTH = {"Authorization": "Basic " + base64.b64encode(b"admin:correct-horse-battery").decode()}
EXAMPLES = 25


@pytest.fixture
def db_url(sqlite_url):
    return sqlite_url


@pytest.fixture
def api_schema(sessions, publisher):
    facts = {"payments": {"protection": {"breaker": {"state": "closed"}}}}
    app = create_app(sessions, WebAuth.from_env({"OUTBOX_WEB_AUTH": "admin:correct-horse-battery"}),
                     facts=lambda: facts, operations=schemas.operations())
    assert TestClient(app).get("/api/openapi.json").status_code == 401
    return schemathesis.openapi.from_asgi("/api/openapi.json", app, headers=AUTH)


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE,
                                  schemathesis.GenerationMode.NEGATIVE])
def test_no_input_makes_a_server_error(api_schema, mode):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} == {
        "GET /api/messages/{message_id}", "GET /api/dead-letters",
        "POST /api/dead-letters/redrive", "POST /api/dead-letters/discard"}
    seen = []
    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            response = case.call(headers=AUTH)
            seen.append(response.status_code)
            assert response.status_code < 500, (case.method, case.path, case.query,
                                                case.body, response.text[:300])
            if response.status_code >= 400:
                assert response.json()["error"]

        run()
    assert len(seen) >= len(operations) * 5   # it really sent requests
