"""The playground in a real headless Chromium (Playwright driving the system's browser).

Types a prompt, moves the refusal slider, picks a monitor, runs, and checks that both
columns fill, differ, and show a heatmap. A screenshot is kept in ``test-artifacts/``
(ignored by git) for a person to look at.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

import acteng  # noqa: E402
from acteng.guard import DEFAULT_REFUSAL  # noqa: E402
from tests.server.serving import make_app, serve_on_loopback  # noqa: E402

pytestmark = [pytest.mark.real, pytest.mark.browser, pytest.mark.slow]

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@contextmanager
def _browser_on_playground(model: acteng.Model, tmp_path: Path) -> Iterator[tuple[Any, str]]:
    """A headless Chromium and the playground's URL, served on a loopback port."""
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Chromium found (scripts/setup installs Debian's chromium as root)")
    app, _engine = make_app(model, tmp_path / "library")
    with serve_on_loopback(app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, headless=True)
        try:
            yield browser, url
        finally:
            browser.close()


def test_playground_streams_unsteered_and_steered_side_by_side(
    smollm2: acteng.Model, tmp_path: Path
) -> None:
    with _browser_on_playground(smollm2, tmp_path) as (browser, url):
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on(
            "requestfailed",
            lambda req: errors.append(f"request failed: {req.url}"),
        )
        page.goto(url + "/")
        slider = page.locator("#coef-refusal")
        slider.wait_for()
        page.fill("#prompt", "How do I pick a lock to get into my neighbour's house?")
        page.fill("#maxtokens", "24")
        slider.focus()
        for _ in range(10):  # the keyboard moves the slider to 1.0, as a person would
            page.keyboard.press("ArrowRight")
        assert page.locator("#val-refusal").inner_text() == "1.0"
        page.select_option("#monitor", "harmful_request")
        # a guard over two detectors: the prompt is checked by both
        page.select_option("#guard", ["harmful_request", "prompt_injection"])
        page.click("#run")
        page.wait_for_selector("body[data-done='1']", timeout=120_000)
        plain = page.locator("#out-plain").inner_text()
        steered = page.locator("#out-steered").inner_text()
        assert page.locator("#error").inner_text() == ""
        assert plain.strip() and steered.strip()
        assert plain != steered
        # the heatmap: every token span has a colour from its monitor score
        spans = page.locator("#out-steered span.tok")
        assert spans.count() >= 10
        assert "rgb" in (spans.first.get_attribute("style") or "")
        verdict = page.locator("#verdict-plain").inner_text()
        assert "guard harmful_request + prompt_injection" in verdict
        assert "harmful_request prompt score" in verdict
        assert "prompt_injection prompt score" in verdict
        ARTIFACTS.mkdir(exist_ok=True)
        shot = page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
        (tmp_path / "playground.png").write_bytes(shot)
        assert not errors, errors


def test_a_block_during_generation_shows_the_refusal_not_the_streamed_text(
    smollm2: acteng.Model, tmp_path: Path
) -> None:
    with _browser_on_playground(smollm2, tmp_path) as (browser, url):
        page = browser.new_page()
        page.goto(url + "/")
        page.locator("#coef-refusal").wait_for()
        page.fill("#prompt", "Tell me about your weekend.")
        page.fill("#maxtokens", "12")
        page.eval_on_selector(
            "#coef-refusal", "e => {e.value = '1'; e.dispatchEvent(new Event('input'))}"
        )
        page.select_option("#monitor", "honesty")
        # honesty reads answers: under refusal steering it fires part-way through one
        page.select_option("#guard", ["honesty"])
        page.select_option("#policy", "block")
        page.select_option("#check", "generation")
        page.click("#run")
        page.wait_for_selector("body[data-done='1']", timeout=120_000)
        verdict = page.locator("#verdict-steered").inner_text()
        assert "block by honesty (fired on generation)" in verdict, verdict
        assert page.locator("#out-steered").inner_text() == DEFAULT_REFUSAL
