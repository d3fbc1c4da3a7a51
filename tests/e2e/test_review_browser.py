"""The review queue in headless Chromium (Playwright driving Debian's /usr/bin/chromium):
log in, open the oldest case, see the clip load, approve; the real publish worker
publishes it. Screenshots of the queue and the case page go to test-artifacts/."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest

import consumers.publish
from pipeline.bootstrap import Container
from pipeline.review.app import create_app
from schemas.jobs import JobState
from tests.integration.pipeline_fixtures import run_workers
from tests.review_support import PASSWORD, XSS_NAME, add_reviewers, needs_review_case, serve, state

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def _wait_for(locator: Any, predicate: str, what: str, timeout_s: float = 20.0) -> None:
    """Poll a JS predicate on an element from here: the review pages' CSP (script-src 'none')
    forbids the eval that Playwright's wait_for_function polls with inside the page."""
    deadline = time.monotonic() + timeout_s
    while not locator.evaluate(predicate):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_review_in_the_browser_and_publish(container: Container, tmp_path: Path) -> None:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (make deps)", pytrace=False)
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    oldest = needs_review_case(container, tmp_path, "r-1", name=XSS_NAME).job_id
    needs_review_case(container, tmp_path, "r-2", name="陳大文", face=True)
    svc = add_reviewers(container, alice="reviewer")
    # Secure cookies are kept for http://127.0.0.1 (a secure context), so no opt-out here.
    assert container.settings.review_cookie_secure
    dialogs: list[str] = []
    with serve(create_app(svc)) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(f"{base}/")
            assert page.url == f"{base}/login"
            page.fill("input[name=name]", "alice")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(f"{base}/")
            rows = page.locator("table.queue tbody tr")
            assert rows.count() == 2
            # Oldest first, and the hostile name shows as text.
            assert rows.nth(0).locator(".name").inner_text() == XSS_NAME
            page.screenshot(path=str(ARTIFACTS / "review-queue.png"), full_page=True)

            rows.nth(0).locator("button", has_text="Review").click()
            page.wait_for_url(f"{base}/cases/{oldest}")
            video = page.locator("video#clip")
            assert video.count() == 1
            _wait_for(video, "v => v.readyState >= 1", "no metadata from the presigned URL")
            duration = float(video.evaluate("v => v.duration"))
            assert 1.5 < duration < 2.5
            # The browser decodes and plays the H.264 clip, as a reviewer pressing play would.
            video.evaluate("v => { v.muted = true; return v.play(); }")
            _wait_for(video, "v => v.currentTime > 0.3", "the clip does not play in Chromium")
            assert video.evaluate("v => v.videoWidth") > 0
            video.evaluate("v => v.pause()")
            assert page.locator("h1 .name").inner_text() == XSS_NAME
            page.screenshot(path=str(ARTIFACTS / "review-case.png"), full_page=True)

            page.fill("textarea[name=reason]", "name is a joke but harmless; clip fine")
            page.click("button[value=approve]")
            page.wait_for_url(f"{base}/?notice=approved")
            assert "Approved" in page.locator(".notice").inner_text()
            assert page.locator("table.queue tbody tr").count() == 1
            page.screenshot(path=str(ARTIFACTS / "review-queue-after.png"), full_page=True)
            # The four-eyes case: face crop with its distances.
            page.locator("table.queue tbody tr").nth(0).locator("a", has_text="view").click()
            page.wait_for_selector("img.crop")
            assert "0.6812" in page.locator("ul.findings").inner_text()
            page.screenshot(path=str(ARTIFACTS / "review-case-face.png"), full_page=True)
        finally:
            browser.close()
    assert dialogs == []  # no script ran
    assert state(container, oldest) == JobState.APPROVED
    run_workers(
        container, [consumers.publish.build], until=lambda: state(container, oldest) == JobState.PUBLISHED
    )
    job = container.jobs.get(oldest)
    assert job is not None and job.published_key
    assert container.store.exists(container.settings.bucket_distribution, job.published_key)
