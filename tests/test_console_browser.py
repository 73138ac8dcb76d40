"""The console in a real headless browser: Debian's chromium, driven by Playwright (which
downloads nothing here: it is pointed at /usr/bin/chromium), against a real
`citygw platform serve` process. An operator logs in, sees the vital signs, acknowledges
and resolves an event, opens a point's plot, and watches a live update arrive.

Set CITYGW_SCREENSHOTS=<dir> to keep a PNG of each view there."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from central.store import AlarmBody
from central.stores import open_store
from common import wire
from common.wire import Envelope
from native.stages import AlarmEvent
from tests.helpers import GW, STREAM
from tests.test_console_api import T0, fed
from tests.test_console_live import serving

CHROMIUM = "/usr/bin/chromium"
#: generous for a loaded CI machine; the 2 s promise is held by test_console_live
WAIT_MS = 15_000
expect.set_options(timeout=WAIT_MS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    path = shutil.which("chromium") or CHROMIUM
    if not Path(path).exists():
        pytest.fail(
            f"no chromium at {CHROMIUM}: install Debian's chromium (tests/setup-system.sh "
            "does); the browser tests never download one",
            pytrace=False,
        )
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def shot(page: Page, name: str) -> None:
    folder = os.environ.get("CITYGW_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


def raise_alarm(db: str, seq: int, rule: str) -> None:
    s = open_store(db)
    try:
        e = AlarmEvent(1, rule, "warning", True, T0 + seq * 60_000, 42.0, T0 + seq * 60_000)
        assert s.store_batch(GW, Envelope(wire.LANE_ALARM, STREAM, seq, 1, b""), AlarmBody([e]))
    finally:
        s.close()


def test_an_operator_handles_an_event_and_plots_a_point(browser: Browser, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'platform.db'}"
    fed(db)
    with serving(db, tmp_path, "console") as url:
        page = browser.new_context(
            viewport={"width": 1400, "height": 900}, timezone_id="UTC"
        ).new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.set_default_timeout(WAIT_MS)
        page.goto(url + "/")

        # log in (a wrong password first: refused, said so)
        page.get_by_test_id("login-user").fill("otto")
        page.get_by_test_id("login-password").fill("wrong-password")
        page.get_by_test_id("login-submit").click()
        expect(page.get_by_test_id("login-error")).to_contain_text("Wrong user or password")
        page.get_by_test_id("login-password").fill("pw-otto-1")
        page.get_by_test_id("login-submit").click()

        # the vital signs, coloured by level
        vitals = page.locator("[data-testid^='vital-']")
        expect(vitals.first).to_be_visible()
        assert vitals.count() >= 4
        for i in range(vitals.count()):
            assert vitals.nth(i).get_attribute("data-level") in ("ok", "warn", "alarm", "none")
        expect(page.get_by_test_id("live-status")).to_have_attribute("data-state", "connected")
        shot(page, "overview")

        # the fleet and the gateway's page
        page.get_by_test_id("nav-fleet").click()
        expect(page.get_by_test_id(f"fleet-row-{GW}")).to_be_visible()
        expect(page.get_by_test_id(f"fleet-row-{GW}")).to_contain_text("2026-12")  # its config
        shot(page, "fleet")
        page.get_by_test_id(f"fleet-row-{GW}").get_by_role("link").first.click()
        expect(page.get_by_test_id("devices")).to_contain_text("kerb-1")
        expect(page.get_by_test_id("gateway-configs")).to_contain_text("pushed by ops@desk")
        shot(page, "gateway")
        page.get_by_test_id("nav-map").click()
        expect(page.get_by_test_id(f"map-gw-{GW}")).to_be_visible()
        shot(page, "map")

        # an event: acknowledge, then resolve with a note
        page.get_by_test_id("nav-events").click()
        row = page.locator("[data-testid^='event-row-']")
        expect(row).to_have_count(1)
        shot(page, "events")
        row.locator("a[href^='#/event/']").click()
        expect(page.get_by_test_id("event-state")).to_have_text("raised")
        page.get_by_test_id("event-ack").click()
        expect(page.get_by_test_id("event-state")).to_have_text("acknowledged")
        page.get_by_test_id("event-resolve_note-input").fill("drain cleared by crew 4")
        page.get_by_test_id("event-resolve").click()
        expect(page.get_by_test_id("event-state")).to_have_text("resolved")
        expect(page.get_by_test_id("event-history")).to_contain_text("drain cleared by crew 4")
        expect(page.get_by_test_id("event-history")).to_contain_text("otto")
        shot(page, "event")

        # a live update: a new alarm on the gateway shows up in the open events, no reload
        page.get_by_test_id("nav-events").click()
        expect(page.locator("[data-testid^='event-row-']")).to_have_count(0)
        page.evaluate("window.__noReload = true")
        raise_alarm(db, 50, "rising")
        expect(page.locator("[data-testid^='event-row-']")).to_have_count(1)
        assert page.evaluate("window.__noReload") is True  # the same page, not reloaded

        # a point: find it, plot it, its aggregate and alarm marks, CSV
        page.get_by_test_id("nav-points").click()
        page.get_by_test_id("points-search").fill("level")
        point_row = page.get_by_test_id(f"point-row-{GW}-kerb-1/level")
        point_row.get_by_role("link").first.click()
        page.get_by_test_id("range-from").fill(_local(T0))
        page.get_by_test_id("range-to").fill(_local(T0 + 3_600_000))
        page.get_by_test_id("range-apply").click()
        expect(page.get_by_test_id("plot").locator("canvas").first).to_be_visible()
        expect(page.get_by_test_id("related")).to_contain_text(":max")
        expect(page.get_by_test_id("csv-link")).to_have_attribute("href", _contains("series.csv"))
        shot(page, "point")
        assert errors == [], errors


def _local(ms: int) -> str:
    """A datetime-local input's value for `ms` in the browser's zone (UTC here)."""
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M")


def _contains(text: str) -> object:
    import re

    return re.compile(re.escape(text))
