"""The admin app in a real browser, against a real stack: worker, relay, ``outbox web`` and
the sandbox.

The demo an operator lives through: declined cards make ten dead letters, the dashboard
shows payments critical and says why; the operator logs in, filters the dead letters,
previews a bulk re-drive, confirms it once the cause is fixed, and watches a message's
timeline go from 402 to delivered. A form posted without the page's CSRF token is refused.

Debian's Chromium through Playwright (``executable_path``), no browser download. Full-page
screenshots land in the test's ``tmp_path``, and also in ``$OUTBOX_SCREENSHOT_DIR`` when
set (how the README's pictures are made: ``OUTBOX_SCREENSHOT_DIR=docs/screenshots pytest
tests/test_e2e_web_ui.py``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright
from sqlalchemy import select

from outbox import Message, MessageStatus, enqueue
from tests.harness import wait_until
from tests.test_e2e_flower_ui import CHROMIUM_ARGS, EXPECT_TIMEOUT_MS, chromium  # noqa: F401

pytestmark = pytest.mark.slow

USER, PASSWORD = "ops", "correct-horse-battery"
DECLINED = "cus_declined"
DEAD = 10


@pytest.fixture
def db_url(sqlite_url):
    """SQLite only: what is tested is the pages, not the database."""
    return sqlite_url


@pytest.fixture
def web_url(chromium, procs, sandbox) -> str:  # noqa: F811
    sandbox.state.configure(declined_customers=[DECLINED])
    procs.worker()
    procs.relay()
    return procs.web(USER, PASSWORD)


@pytest.fixture
def page(chromium) -> Iterator[Page]:  # noqa: F811
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), headless=True,
                                    args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        context.set_default_timeout(EXPECT_TIMEOUT_MS)
        yield context.new_page()
        context.close()
        browser.close()


def _shot(page: Page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
    if os.environ.get("OUTBOX_SCREENSHOT_DIR"):
        target = Path(os.environ["OUTBOX_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(target / f"{name}.png"), full_page=True)


def _status(sessions, message_id: str) -> str | None:
    with sessions() as session:
        return session.scalar(select(Message.status).where(Message.id == message_id))


def test_an_operator_finds_previews_and_redrives_dead_letters(web_url, page, sessions,
                                                             celery_publisher, sandbox,
                                                             tmp_path):
    ids = []
    with sessions() as session:
        for i in range(DEAD):
            ids.append(enqueue(session, provider="payments", operation="charge",
                               payload={"amount": 1000 + i, "currency": "usd",
                                        "customer": DECLINED},
                               idempotency_key=f"ui-order-{i}").id)
        session.commit()
    wait_until(lambda: all(_status(sessions, m) == MessageStatus.DEAD for m in ids), 60,
               message="the declined charges to be dead-lettered")

    # Log in (the page asked for first comes back after the login).
    page.goto(web_url + "/dead-letters")
    expect(page).to_have_url(re.compile(r"/login\?next="))
    page.get_by_label("User name").fill(USER)
    page.get_by_label("Password").fill("wrong-password-1")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_have_text("wrong user name or password")
    page.get_by_label("User name").fill(USER)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(web_url + "/dead-letters")

    # The dashboard: payments is critical, and says why.
    page.goto(web_url + "/")
    row = page.locator("#provider-payments")
    expect(row.locator(".level")).to_have_text("critical")
    expect(page.locator("tr.findings").first).to_contain_text(
        f"{DEAD} dead letter(s) in the last hour ≥ 10")
    expect(page.locator("#dead-awaiting")).to_have_text(str(DEAD))
    _shot(page, tmp_path, "dashboard")

    # Filter the dead letters: by provider and error class, then by one key.
    page.get_by_role("link", name="Dead letters", exact=True).click()
    page.get_by_label("provider", exact=True).select_option("payments")
    page.get_by_label("error class").select_option("client_error")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#dead-total")).to_have_text(f"({DEAD})")
    expect(page.locator("tbody tr")).to_have_count(DEAD)
    _shot(page, tmp_path, "dead-letters")
    page.get_by_label("id, key or correlation id").fill("ui-order-3")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#dead-total")).to_have_text("(1)")
    page.get_by_label("id, key or correlation id").fill("")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#dead-total")).to_have_text(f"({DEAD})")

    # A form without the page's CSRF token is refused, and nothing happens.
    refused = page.request.post(web_url + "/dead-letters/apply", form={
        "action": "redrive", "reason": "forged", "provider": "payments", "confirm": "true"})
    assert refused.status == 403
    assert all(_status(sessions, m) == MessageStatus.DEAD for m in ids)

    # Preview the bulk re-drive: a count, and nothing done yet.
    page.get_by_label("reason", exact=True).fill("customer updated the card")
    page.get_by_role("button", name="Preview…").click()
    expect(page.locator("#would-count")).to_have_text(str(DEAD))
    _shot(page, tmp_path, "redrive-preview")
    assert all(_status(sessions, m) == MessageStatus.DEAD for m in ids)

    # The cause is fixed; confirm.
    sandbox.state.configure(declined_customers=[])
    page.get_by_role("button", name=re.compile("^Yes, re-drive them")).click()
    expect(page.locator(".flash")).to_have_text(f"redrive: {DEAD} of {DEAD} dead letter(s) "
                                                "re-driven")
    wait_until(lambda: all(_status(sessions, m) == MessageStatus.DELIVERED for m in ids), 60,
               message="the re-driven charges to be delivered")

    # The message page: 402, then delivered; the audit trail names the operator.
    page.goto(f"{web_url}/messages/{ids[0]}")
    expect(page.locator("#message-status")).to_have_text("delivered")
    timeline = page.locator("#timeline tbody tr")
    expect(timeline).to_have_count(2)
    expect(timeline.nth(0)).to_contain_text("402")
    expect(timeline.nth(1)).to_contain_text("200")
    expect(page.get_by_text("customer updated the card")).to_be_visible()
    _shot(page, tmp_path, "message")
    page.get_by_role("link", name="Audit log").click()
    expect(page.locator("tbody tr").first).to_contain_text(f"{USER}")
    expect(page.locator("tbody tr").first).to_contain_text(str(DEAD))
