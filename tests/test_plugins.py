"""Provider plugins (issue 10 §5): a provider defined in a package of its own
(``tests/plugin_pkg``, a helpdesk's ``tickets.create``), installed with pip, is found through
the ``outbox.providers`` entry point and delivers end to end, without editing this project.

pip installs it into a folder of the test's own (``--target``), not the virtualenv, so no
other test sees a third provider; processes and this one see it through ``sys.path``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select

import schemas
from integrations import plugins, registry
from integrations.errors import ConfigurationError
from outbox import Message, MessageStatus, config, enqueue
from outbox.errors import OutboxError
from tests.harness import BIN, ROOT, served, wait_until

PLUGIN_SOURCE = ROOT / "tests" / "plugin_pkg"
TICKET = {"subject": "Printer on fire", "requester": "ann@example.com"}


def _forget_providers() -> None:
    """Make the next lookup read the installed plugins and their schemas again."""
    plugins.discovered.cache_clear()
    for cached in (schemas._index, schemas.load, schemas._validator, schemas.operations):
        cached.cache_clear()
    registry.reset()


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """The example plugin, installed by pip (from a copy: pip builds in the source folder)."""
    source = tmp_path_factory.mktemp("plugin-src") / "plugin_pkg"
    shutil.copytree(PLUGIN_SOURCE, source)
    site = tmp_path_factory.mktemp("plugin-site")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
                           "--target", str(site), str(source)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, f"pip install failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    assert list(site.glob("outbox_example_tickets-*.dist-info/entry_points.txt"))
    return site


@pytest.fixture
def with_plugin(plugin_site):
    """This process sees the installed plugin for the test, and forgets it after."""
    sys.path.insert(0, str(plugin_site))
    _forget_providers()
    yield plugin_site
    sys.path.remove(str(plugin_site))
    sys.modules.pop("outbox_tickets", None)
    _forget_providers()


def test_an_installed_plugin_is_a_provider_like_the_built_in_ones(with_plugin):
    assert registry.known_providers() == ["crm", "email", "payments", "tickets", "webhooks"]
    assert schemas.operations()["tickets"] == {"create"}
    assert "tickets" in config.queues()
    assert registry.supports_idempotency("tickets")
    provider = registry.build_provider("tickets", {"OUTBOX_TICKETS_BASE_URL": "http://127.0.0.1:9",
                                                   "OUTBOX_TICKETS_API_KEY": "tk_test_0123456789"})
    assert type(provider.adapter).__module__ == "outbox_tickets"
    request = provider.adapter.build_request("create", TICKET, "key-1")
    assert (request.method, request.path, request.headers["Idempotency-Key"]) == (
        "POST", "/v1/tickets", "key-1")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_enqueue_checks_a_plugin_payload_against_the_plugin_schema(with_plugin, sessions):
    with sessions() as session:
        with pytest.raises(OutboxError, match=r"\$\.requester"):
            enqueue(session, provider="tickets", operation="create",
                    payload={"subject": "x", "requester": 42}, idempotency_key="bad")
        with pytest.raises(OutboxError, match="unknown operation tickets.'close'; known: create"):
            enqueue(session, provider="tickets", operation="close", payload={},
                    idempotency_key="bad2")
        enqueue(session, provider="tickets", operation="create", payload=TICKET,
                idempotency_key="good")
        session.commit()
        assert session.scalar(select(Message.provider)) == "tickets"


def test_without_the_plugin_there_is_no_such_provider():
    assert "tickets" not in registry.known_providers()
    assert "tickets" not in schemas.operations()


def _fake_distribution(site, name: str, entry_point: str) -> None:
    """An installed distribution as importlib.metadata finds one: its dist-info folder."""
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[outbox.providers]\n{entry_point}\n")


@pytest.mark.parametrize("entry_point, says", [
    ("helpdesk = no_such_module:Adapter",
     "provider plugin 'helpdesk' (no_such_module:Adapter) cannot be imported: "
     "ModuleNotFoundError"),
    ("helpdesk = outbox_tickets:TicketsAdapter", "the adapter's name is 'tickets'"),
    ("payments = outbox_tickets:TicketsAdapter",
     "provider plugin 'payments' has the name of a built-in provider"),
    ("Bad-Name = outbox_tickets:TicketsAdapter", "'Bad-Name' cannot be a provider name"),
    ("tickets = json:JSONDecoder", "is not an integrations.base.Adapter subclass"),
])
def test_a_broken_plugin_stops_the_cli_with_one_line(plugin_site, tmp_path, entry_point, says):
    database = {"DATABASE_URL": f"sqlite:///{tmp_path / 'outbox.db'}"}
    subprocess.run([str(BIN / "outbox"), "db", "upgrade"], check=True, capture_output=True,
                   env={**os.environ, **database}, timeout=60)
    site = tmp_path / "site"
    _fake_distribution(site, "broken-plugin", entry_point)
    env = {**os.environ, **database, "PYTHONPATH": f"{site}{os.pathsep}{plugin_site}"}
    done = subprocess.run([str(BIN / "outbox"), "status"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 2
    assert says in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_plugin_cannot_take_a_built_in_provider_name(plugin_site, tmp_path):
    site = tmp_path / "site"
    _fake_distribution(site, "clash", "payments = clash_plugin:Payments")
    (site / "clash_plugin.py").write_text(
        "from pathlib import Path\n"
        "from outbox_tickets import TicketsAdapter\n\n\n"
        "class Payments(TicketsAdapter):\n"
        "    name = 'payments'\n"
        "    schema_dir = Path(__file__).parent / 'clash_schemas'\n")
    (site / "clash_schemas" / "operations").mkdir(parents=True)
    shutil.copy(PLUGIN_SOURCE / "outbox_tickets/schemas/operations/tickets.create.v1.json",
                site / "clash_schemas/operations/payments.create.v1.json")
    sys.path[:0] = [str(site), str(plugin_site)]
    _forget_providers()
    try:
        with pytest.raises(ConfigurationError, match="provider plugin 'payments' has the name "
                                                     "of a built-in provider"):
            registry.known_providers()
    finally:
        del sys.path[:2]
        for module in ("clash_plugin", "outbox_tickets"):
            sys.modules.pop(module, None)
        _forget_providers()


def test_a_worker_with_a_broken_plugin_refuses_to_start_with_one_line(tmp_path):
    _fake_distribution(tmp_path, "broken-plugin", "helpdesk = no_such_module:Adapter")
    done = subprocess.run([str(BIN / "celery"), "-A", "tasks", "worker", "-Q", "payments"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: provider plugin 'helpdesk' (no_such_module:Adapter) "
                                   "cannot be imported: ModuleNotFoundError: No module named "
                                   "'no_such_module'")


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_the_plugin_provider_delivers_end_to_end(plugin_site, procs, sessions):
    """``outbox enqueue tickets create`` → the relay's ``tickets`` queue → a worker → the
    plugin's adapter → the tickets API (a loopback stand-in), with its key and credential."""
    received = []
    api = FastAPI()

    @api.post("/v1/tickets")
    async def create(request: Request):
        received.append({"authorization": request.headers.get("authorization"),
                         "key": request.headers.get("idempotency-key"),
                         "body": await request.json()})
        return JSONResponse({"id": f"tkt_{len(received)}", "object": "ticket"}, status_code=201)

    with served(api) as url:
        env = {"PYTHONPATH": str(plugin_site), "OUTBOX_TICKETS_BASE_URL": url,
               "OUTBOX_TICKETS_API_KEY": "tk_test_0123456789abcdef"}
        procs.worker("tickets", queues="tickets", **env)
        procs.relay(**env)
        done = subprocess.run([str(BIN / "outbox"), "enqueue", "tickets", "create", "--key",
                               "ticket-1", "--payload", json.dumps(TICKET)],
                              capture_output=True, text=True, env={**procs.env, **env},
                              timeout=60)
        assert done.returncode == 0, done.stderr

        def delivered():
            with sessions() as s:
                return s.scalar(select(Message).where(Message.idempotency_key == "ticket-1")
                                .where(Message.status == MessageStatus.DELIVERED))

        message = wait_until(delivered, 60, message="the ticket to be delivered")
    assert received == [{"authorization": "Bearer tk_test_0123456789abcdef", "key": "ticket-1",
                         "body": TICKET}]
    assert message.provider_ref == "tkt_1"
