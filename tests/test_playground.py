"""The web playground driven in headless Chromium (Debian's package) through Playwright."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from conftest import SLUG

pytestmark = pytest.mark.browser

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
OUTPUT_ROOT = Path(__file__).resolve().parent.parent / "test-output"

# Records every value the progress bar takes, from the page's side.
RECORD_PROGRESS = """
window.__progress = [];
new MutationObserver(() => window.__progress.push(Number(document.getElementById('progress').value)))
  .observe(document.getElementById('progress'), {attributes: true, attributeFilter: ['value']});
"""


@pytest.fixture()
def output_dir(request) -> Path:
    path = OUTPUT_ROOT / re.sub(r"[^\w.-]", "_", request.node.name)
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(
            f"Chromium is not installed at {CHROMIUM} (`make test` installs Debian's chromium package)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_generate_from_the_page(browser, server, output_dir):
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready=true]")

    # The form comes from the API: ranges, defaults and the scheduler table.
    assert page.get_by_label("Width").get_attribute("max") == "2048"
    assert page.get_by_label("Steps").get_attribute("min") == "1"
    schedulers = page.locator("#scheduler option").all_inner_texts()
    assert schedulers[0] == "Euler" and "FlowMatchEulerDiscreteScheduler" in schedulers
    assert page.locator("#slug").inner_text() == SLUG

    page.get_by_label("API key").fill("playground-key")
    page.get_by_label("API key").dispatch_event("change")
    # Slow steps (0.1 s each, see conftest) so the bar is seen between its first and last step on any machine.
    page.get_by_label("Prompt").fill("a lighthouse at dusk, from the playground __slowsteps__")
    page.get_by_label("Width").fill("384")
    page.get_by_label("Height").fill("256")
    page.get_by_label("Steps").fill("24")
    page.get_by_label("Seed").fill("4242")
    page.get_by_label("Output format").select_option("PNG")
    assert '"width":384' in page.locator("#curlSnippet").inner_text()
    assert "seed=4242" in page.locator("#pythonSnippet").inner_text()
    assert f'client.run(\n    "{SLUG}"' in page.locator("#pythonSnippet").inner_text()

    page.evaluate(RECORD_PROGRESS)
    page.get_by_label("Prompt").press("Control+Enter")  # the keyboard path
    page.wait_for_function(
        "() => document.getElementById('image').naturalWidth > 0",
        timeout=180_000,
    )
    size = page.locator("#image").evaluate("image => [image.naturalWidth, image.naturalHeight]")
    assert size == [384, 256]
    progress = page.evaluate("() => window.__progress")
    assert progress == sorted(progress) and progress[-1] == 100
    assert any(0 < value < 100 for value in progress), progress  # it moved, not just jumped to the end
    assert page.locator("#resultSeed").inner_text() == "4242"
    page.screenshot(path=str(output_dir / "playground.png"), full_page=True)

    # The seed can be reused, the run is in the history, and the key is remembered after a reload.
    page.get_by_label("Seed").fill("1")
    page.get_by_role("button", name="Use this seed").click()
    assert page.get_by_label("Seed").input_value() == "4242"
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.get_by_label("API key").input_value() == "playground-key"
    assert page.locator("#history li").count() >= 1
    assert "a lighthouse at dusk" in page.locator("#history li").first.inner_text()
    assert errors == []
    page.close()
