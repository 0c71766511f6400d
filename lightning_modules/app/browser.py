"""The app driven in a real browser (Debian's Chromium through Playwright): what the browser test and
``experiments/app_screenshot.py`` (latency, README screenshot) do as a user would."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: headless Chromium on a machine without internet: no background connections to be refused (method of the
#: workplace's probe), no sandbox as root
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PANELS = ("#panel-input", "#panel-counterfactual", "#panel-attribution")


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise FileNotFoundError("no chromium on this machine: `make browser` installs Debian's (apt-get)")
    return path


@contextmanager
def browser_page(url: str, width: int = 1500, height: int = 1000) -> Iterator:
    """A fresh headless Chromium page at ``url``, downloads allowed."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height}, accept_downloads=True)
            page.set_default_timeout(120_000)
            page.goto(url)
            page.wait_for_selector("#run-counterfactual")
            yield page
        finally:
            browser.close()


def upload(page, path: str | Path, box: str = "#upload") -> None:
    """Put ``path`` in the file box ``box`` (its current file, if any, removed first)."""
    holder = page.locator(box)
    clear = holder.locator('button[aria-label="Clear"], button[aria-label="Remove this file"]')
    if clear.count():
        clear.first.click()
    holder.locator("input[type=file]").first.set_input_files(str(path))
    holder.locator(f'[aria-label="{Path(path).name}"]').first.wait_for()  # uploaded: its name is listed


def counterfactual(page) -> float:
    """Click "Make the healthy counterfactual" on a page that shows no result yet and wait for the three panels:
    the seconds from the click to the panels shown."""
    if any(page.locator(f"{panel} img").count() for panel in PANELS):
        raise RuntimeError("the page already shows a result: time a request on a fresh page")
    start = time.perf_counter()
    page.click("#run-counterfactual")
    for panel in PANELS:
        page.locator(f"{panel} img").first.wait_for(state="visible")
    return time.perf_counter() - start


def download(page, name: str, folder: Path) -> Path:
    """Save the result file ``name`` from the downloads box into ``folder``."""
    with page.expect_download() as info:
        page.locator(f'#downloads a[download="{name}"]').first.click()
    target = folder / name
    info.value.save_as(target)
    return target
