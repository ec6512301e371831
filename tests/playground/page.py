"""What the browser tests share: Debian's Chromium and Playwright (skipped locally without them, failed in CI), a
tab that has given the server's key, screenshots, and what the page sent."""
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:          # the dev extra brings it; without it the tests skip (fail in CI)
    expect = sync_playwright = None

CHROMIUM = Path("/usr/bin/chromium")
KEY = "playground-test-key"
ROOT = Path(__file__).resolve().parents[2]
# The flags this machine needs: no sandbox as root, and no background calls to the closed network.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def _need(ok: bool, why: str) -> None:
    """Skip locally when the browser tooling is missing; in CI it is installed, so fail instead."""
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why} (CI installs it in .ci/run)")
        pytest.skip(why)


def need_browser() -> None:
    """What a browser test's server fixture checks first."""
    _need(CHROMIUM.exists(), f"{CHROMIUM} is not installed (apt-get install chromium chromium-driver)")
    _need(sync_playwright is not None, "playwright is not installed (pip install -e '.[dev]')")


def open_page(browser, server, width=1280, height=900):
    """A fresh tab (empty session storage): the page asks for the key, we give it.
    Returns the page and the list its uncaught script errors go to."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(60_000)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{server.url}/")
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#key-reason")).to_contain_text("missing API key")
    page.get_by_label("Key", exact=True).fill(KEY)
    page.keyboard.press("Enter")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.locator("#status-text")).to_have_text("ready", timeout=2_500)   # re-polled once the key is in
    return page, errors


def save_shot(page, tmp_path, name):
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    (ROOT / "artifacts").mkdir(exist_ok=True)
    shutil.copy(path, ROOT / "artifacts" / name)
    return path


def sse_messages(body: str) -> list[tuple[str, dict]]:
    """(event line, parsed data) of each message of an SSE body."""
    out = []
    for message in body.replace("\r\n", "\n").split("\n\n"):
        lines = dict(line.split(": ", 1) for line in message.splitlines() if ": " in line)
        if "data" in lines:
            out.append((lines.get("event"), json.loads(lines["data"])))
    return out


def record_forms(page):
    """From now on, each FormData the page sends goes to window.forms, as {name: text or list of bytes}
    (the browser leaves files out of what it reports of a request body)."""
    page.evaluate("""() => {
        window.forms = [];
        const send = window.fetch;
        window.fetch = async (url, init) => {
            if (init?.body instanceof FormData) {
                const form = {};
                for (const [name, value] of init.body)
                    form[name] = typeof value === "string" ? value : [...new Uint8Array(await value.arrayBuffer())];
                window.forms.push(form);
            }
            return send(url, init);
        };
    }""")


def last_form(page) -> dict[str, str | bytes]:
    return {k: v if isinstance(v, str) else bytes(v) for k, v in page.evaluate("window.forms.at(-1)").items()}


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (40, 90, 200)).save(out, "PNG")
    return out.getvalue()
