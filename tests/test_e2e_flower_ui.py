"""Flower's task list in a real browser: labels in the list, never payloads.

The issue: an operator filtering FAILURE saw bare task uuids and had to open each
task to learn what it was. ``tasks.flower`` now starts Flower with the ``args``
column (our ``argsrepr`` label, ``payments.charge 01J…``). This drives Debian's
Chromium through Playwright against a real worker, Flower and the sandbox
provider, and keeps full-page screenshots in the test's ``tmp_path``
(``failed.png``, ``all.png``) for a person to look at.

Playwright never downloads a browser here: ``scripts/install_system_packages.sh``
installs Debian's ``chromium`` and the test launches ``/usr/bin/chromium``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Locator, Page, expect, sync_playwright
from sqlalchemy import select

from outbox import Message, MessageStatus, enqueue
from tests.harness import wait_until

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
USER, PASSWORD = "ops", "correct-horse-battery"
# Payload values that must never reach the page. Long and unusual, so that a timestamp,
# runtime or random id in the page cannot contain them by chance.
GOOD_AMOUNT, DEAD_AMOUNT = 8675309, 7345127
GOOD_CUSTOMER, DEAD_CUSTOMER = "cus_ui_never_shown", "cus_declined"
SECRET_NOTE = "do-not-show-UI-7Q"
API_KEY = "sk_test_outbox"
# Playwright's own polling bound for one expectation (it retries until then; not a sleep).
EXPECT_TIMEOUT_MS = 15_000


@pytest.fixture
def db_url(sqlite_url):
    """Only SQLite in this module: what is tested is what Flower shows, not the database."""
    return sqlite_url


@pytest.fixture
def chromium() -> Path:
    """Debian's Chromium; the test fails (never skips) when it is missing."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail("Chromium not installed: run scripts/install_system_packages.sh "
                    "(or make test)", pytrace=False)
    return CHROMIUM


@pytest.fixture
def flower_url(chromium, procs) -> str:
    """A worker on ``payments,dead_letter`` and Flower (via ``tasks.flower``) with basic auth.

    Depends on ``chromium`` so that a missing browser fails before any process starts.
    No ``--tasks_columns`` is passed: the launcher's default columns are what is tested.
    """
    procs.worker()
    return procs.flower(USER, PASSWORD)


@pytest.fixture
def page(chromium) -> Iterator[Page]:
    """A headless Chromium page logged in to Flower with basic auth; closed afterwards."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), headless=True,
                                    args=CHROMIUM_ARGS)
        # Wide enough for every column without horizontal scrolling, as on an operator's screen.
        context = browser.new_context(http_credentials={"username": USER, "password": PASSWORD},
                                      viewport={"width": 1600, "height": 900})
        context.set_default_timeout(EXPECT_TIMEOUT_MS)
        yield context.new_page()
        context.close()
        browser.close()


def _enqueue(sessions, key: str, **payload) -> tuple[str, str]:
    """Enqueue and commit one charge (published after commit); return (id, label)."""
    with sessions() as session:
        message = enqueue(session, provider="payments", operation="charge",
                          payload={"currency": "usd", **payload}, idempotency_key=key)
        ids = message.id, message.label
        session.commit()
    return ids


def _status(sessions, message_id: str) -> str | None:
    with sessions() as session:
        return session.scalar(select(Message.status).where(Message.id == message_id))


def _flower_has(flower_url: str, label: str, state: str) -> bool:
    """Whether Flower's API lists an ``outbox.deliver`` task with this label in this state."""
    response = requests.get(flower_url + "/api/tasks", auth=(USER, PASSWORD), timeout=10,
                            params={"taskname": "outbox.deliver", "state": state})
    response.raise_for_status()
    return any(task.get("args") == label for task in response.json().values())


def _row(page: Page, label: str, state: str) -> Locator:
    """The task-list row whose args cell is exactly ``label`` and whose state badge is ``state``.

    Exact cell text matters: the dead-letter task's args start with the same label.
    """
    return (page.locator("#tasks-table tbody tr")
            .filter(has=page.get_by_role("cell", name=label, exact=True))
            .filter(has=page.locator(".badge", has_text=state)))


def _cell(page: Page, row: Locator, column: str = "args") -> Locator:
    """The row's cell in ``column``, found through the server-rendered header."""
    columns = page.locator("#tasks-table thead th").evaluate_all(
        "ths => ths.map(th => th.dataset.column)")
    assert column in columns, f"Flower's task list has no {column} column: {columns}"
    return row.locator("td").nth(columns.index(column))


# Whether the cell's first ``n`` characters are drawn inside its content box, with room
# left for the ellipsis Flower draws over text it cuts (``text-overflow: ellipsis``).
_PREFIX_SHOWN_JS = """(td, n) => {
    const text = td.firstChild, range = document.createRange();
    range.setStart(text, 0);
    range.setEnd(text, n);
    const style = getComputedStyle(td), box = td.getBoundingClientRect();
    const contentRight = box.right - parseFloat(style.paddingRight) - parseFloat(style.borderRightWidth);
    const fullWidth = td.scrollWidth <= td.clientWidth;
    const ellipsis = fullWidth ? 0 : parseFloat(style.fontSize);
    return range.getBoundingClientRect().right + ellipsis <= contentRight;
}"""


def _assert_label_readable(page: Page, label: str, state: str) -> None:
    """The label is the text of the row's args cell, on screen, its operation never cut.

    Flower caps that column at 400px and ends longer text with an ellipsis, which can hide
    the last characters of the id (the whole label stays in the cell: copying it, or
    double-clicking the id, gets all of it). What an operator must read at a glance is
    the operation, ``payments.charge``: that part has to be drawn in full.
    """
    row = _row(page, label, state)
    expect(row).to_have_count(1)
    cell = _cell(page, row)
    expect(cell).to_have_text(label)
    expect(cell).to_be_visible()
    box = cell.bounding_box()
    viewport = page.viewport_size
    assert box and box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"], (
        f"the {label!r} cell is outside the window: {box}")
    operation = label.split(" ", 1)[0]
    assert cell.evaluate(_PREFIX_SHOWN_JS, len(operation)), (
        f"{operation!r} is cut off in the task list's args cell")


def _assert_no_payload(page: Page, view: str) -> None:
    content = page.content()
    for secret in (str(GOOD_AMOUNT), str(DEAD_AMOUNT), GOOD_CUSTOMER, DEAD_CUSTOMER,
                   SECRET_NOTE, API_KEY):
        assert secret not in content, f"{secret!r} is visible on Flower's task list ({view})"


def test_task_list_shows_labels_in_args_column_never_payloads(flower_url, page, sessions,
                                                              celery_publisher, tmp_path):
    """Given a delivered and a dead-lettered charge, /tasks shows both labels, no payload."""
    good_id, good_label = _enqueue(sessions, "ui-good", amount=GOOD_AMOUNT,
                                   customer=GOOD_CUSTOMER)
    dead_id, dead_label = _enqueue(sessions, "ui-declined", amount=DEAD_AMOUNT,
                                   customer=DEAD_CUSTOMER, metadata={"secret_note": SECRET_NOTE})
    wait_until(lambda: _status(sessions, good_id) == MessageStatus.DELIVERED, 30,
               message="the good charge to be delivered")
    wait_until(lambda: _status(sessions, dead_id) == MessageStatus.DEAD, 30,
               message="the declined charge to be dead")
    # The list is loaded once per page view: wait until Flower has both outcomes first.
    wait_until(lambda: _flower_has(flower_url, good_label, "SUCCESS")
               and _flower_has(flower_url, dead_label, "FAILURE"), 30, 0.2,
               message="Flower to show the SUCCESS and FAILURE tasks")

    page.goto(flower_url + "/tasks")
    # Flower's own state filter, as an operator looking for failures would use it.
    page.get_by_role("button", name="Failed").click()
    # The dead letter's row was already listed under "All": wait for the filtered redraw
    # (the delivered row gone) before looking, so the screenshot shows the filtered list.
    expect(page.locator("#tasks-table_info")).to_contain_text("filtered from")
    expect(page.locator("#tasks-table tbody tr", has_text=good_label)).to_have_count(0)
    expect(_row(page, dead_label, "FAILURE")).to_be_visible()
    page.screenshot(path=tmp_path / "failed.png", full_page=True)
    assert page.url.endswith("/tasks")           # the list, not a task's detail page
    _assert_label_readable(page, dead_label, "FAILURE")
    _assert_no_payload(page, "Failed filter")
    # Why it failed, in codes, uncut; and the uuid column still links to the task's page.
    dead_row = _row(page, dead_label, "FAILURE")
    expect(_cell(page, dead_row, "exception")).to_contain_text(
        f"{dead_label} client_error 402 card_declined: not retryable")
    expect(_cell(page, dead_row, "uuid").locator("a[href*='/task/']")).to_have_count(1)

    page.get_by_role("button", name="All").click()
    expect(_row(page, good_label, "SUCCESS")).to_be_visible()
    page.screenshot(path=tmp_path / "all.png", full_page=True)
    _assert_label_readable(page, good_label, "SUCCESS")
    _assert_label_readable(page, dead_label, "FAILURE")
    _assert_no_payload(page, "all tasks")
