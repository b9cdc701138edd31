"""A safeguarding lead uses the inbox in a real browser, against a real federation.

A matcher and two county nodes run as server processes on loopback (``LocalFederation``) over
a small generated federation. Debian's Chromium, driven headless by Playwright, signs in at
one county, sees a new alert, opens it, reads why the system matched it, marks it "same child"
using only the keyboard, and then, signed in at the other county, sees that alert shown as
reviewed by the first. Screenshots of each step are saved (``JIGSAW_TEST_ARTIFACTS`` or the
test's temporary folder).

Chromium comes from ``.ci/setup.d/10-chromium.sh``; without it the test is skipped, except in
CI, where it fails.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from federation.demo import LocalFederation
from federation.node.accounts import add_user_to_database
from federation.settings import NodeSettings, load_settings
from linkage.synthetic import generate_federation, write_federation

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
NOTE = "Checked with the other county's MASH: same school and GP. (Never leaves this county.)"


def _artifacts(tmp_path: Path) -> Path:
    root = os.environ.get("JIGSAW_TEST_ARTIFACTS")
    folder = Path(root) / "inbox-browser" if root else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _sign_in(page: Page, url: str, password: str) -> None:
    page.goto(f"{url}/inbox")
    expect(page.get_by_role("heading", level=1)).to_have_text("Sign in")
    page.get_by_label("Username").fill("lead")
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Match alerts")


def test_a_lead_marks_an_alert_same_child_and_the_other_county_sees_it_reviewed(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("no /usr/bin/chromium: .ci/setup.d/10-chromium.sh should install it")
        pytest.skip("no system Chromium (apt-get install chromium)")
    shots = _artifacts(tmp_path)
    record_property("screenshots", str(shots))

    fed = generate_federation(counties=2, records=300, seed=5)
    files = sorted(write_federation(fed, tmp_path / "counties", truth_path=tmp_path / "truth.csv"))
    here, there = (f.stem for f in files)
    local = LocalFederation(
        tmp_path / "fed", [here, there], seeds={f.stem: i for i, f in enumerate(files)}
    )
    passwords = {county: secrets.token_urlsafe(12) for county in (here, there)}
    for county, party in local.nodes.items():  # before the nodes start: the CLI's way
        database = load_settings(NodeSettings, party.config).database
        add_user_to_database(database, "lead", passwords[county])

    with local:
        reports = local.ingest_all(files)
        local.wait_for_tokens(sum(int(r["accepted"]) for r in reports.values()))
        assert local.relink(retrain=True)["status"] == "linked"
        local.wait_until_delivered()
        here_url, there_url = local.nodes[here].url, local.nodes[there].url

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
            )
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(15_000)  # actions and navigations
            expect.set_options(timeout=15_000)  # assertions (their own default is 5 s)
            step = "start"
            try:
                # --- county one: sign in and see the new alerts.
                step = "sign-in"
                _sign_in(page, here_url, passwords[here])
                expect(page.locator("#attention-count")).to_contain_text("need your attention")
                expect(page.locator(".badge.new").first).to_have_text("New")
                page.screenshot(path=shots / "1-inbox.png", full_page=True)

                # Filter to person alerts and open the newest.
                step = "open"
                page.get_by_label("Person or family").select_option("person")
                page.get_by_role("button", name="Apply filters").click()
                expect(page).to_have_url(re.compile(r"[?&]kind=person"))
                link = page.locator("table.alerts tbody a").first
                expect(link).to_contain_text("Person:")
                link.click()
                expect(page.get_by_role("heading", level=1)).to_contain_text("Person alert:")
                alert_id = page.url.rsplit("/", 1)[1]

                # The explanation, in plain English, and the confidence.
                step = "read"
                explanation = page.locator("ul.explanation li").all_inner_texts()
                fields = [line.split(":", 1)[0] for line in explanation]
                assert {"Given name", "Family name", "Date of birth"} <= set(fields), explanation
                assert all(re.search(r": .+ \(.+\)$", line) for line in explanation), explanation
                expect(page.locator(".summary")).to_contain_text("that this is the same child")
                expect(page.get_by_role("heading", name=there.capitalize())).to_be_visible()
                page.screenshot(path=shots / "2-alert.png", full_page=True)

                # Keyboard only: the skip link comes first, then the decision form.
                step = "decide"
                page.keyboard.press("Tab")
                focused = page.evaluate("document.activeElement.textContent")
                assert focused == "Skip to main content"
                page.get_by_label("Same child", exact=True).focus()
                page.keyboard.press("Space")
                page.keyboard.press("Tab")  # out of the radio group, to the note
                assert page.evaluate("document.activeElement.id") == "note"
                page.keyboard.type(NOTE)
                page.keyboard.press("Tab")
                page.keyboard.press("Enter")
                expect(page.get_by_role("status")).to_contain_text("Decision recorded")
                expect(page.locator("table.decisions")).to_contain_text(NOTE)
                page.screenshot(path=shots / "3-decided.png", full_page=True)

                # The clerical label reaches the matcher and is counted there.
                step = "label"
                matcher = local.matcher

                def labelled() -> bool:
                    r = httpx.get(
                        f"{matcher.url}/v1/admin/labels",
                        headers={"Authorization": f"Bearer {matcher.admin_token}"},
                    )
                    return {"county": here, "decision": "same", "n": 1} in r.json()["labels"]

                _wait_until(labelled, "the label at the matcher")
                [mine] = [a for a in local.alerts(here) if a["alert_id"] == alert_id]
                [theirs] = [
                    a
                    for a in local.alerts(there)
                    if a["cluster_id"] == mine["cluster_id"] and a["kind"] == "person"
                ]

                # --- county two: its inbox shows the alert reviewed by county one.
                step = "other county"
                page.context.clear_cookies()
                _sign_in(page, there_url, passwords[there])
                reviewed = f"Reviewed by {here.capitalize()}: same child"
                row = page.locator("tr", has=page.locator(f'a[href$="{theirs["alert_id"]}"]'))

                # The filters, as a person would use them: what other counties have reviewed.
                page.get_by_label("Status").select_option(label="Reviewed by another county")
                page.get_by_label("Other county").select_option(label=here.capitalize())
                page.get_by_role("button", name="Apply filters").click()
                # The form's own navigation must finish before the page is loaded again:
                # reloading while it is in flight detaches the page ("Not attached to an
                # active page").
                expect(page).to_have_url(re.compile(r"[?&]status=reviewed_elsewhere"))
                expect(page.get_by_role("heading", level=1)).to_have_text("Match alerts")
                filtered = page.url

                def shows_review() -> bool:
                    if not (row.count() == 1 and reviewed in row.inner_text()):
                        page.goto(filtered, wait_until="load")
                        return False
                    return True

                _wait_until(shows_review, "the review to reach the other county")
                page.screenshot(path=shots / "4-other-county-inbox.png", full_page=True)
                row.get_by_role("link").click()
                expect(page.locator(".review-state")).to_have_text(
                    f"Reviewed by {here.capitalize()}: Same child"
                )
                assert NOTE not in page.content()  # the note stayed at county one
                page.screenshot(path=shots / "5-other-county-alert.png", full_page=True)
            except BaseException:
                page.screenshot(path=shots / f"failed-at-{step.replace(' ', '-')}.png")
                raise
            finally:
                browser.close()
