"""The playground in a real browser: Debian's headless Chromium driven by Playwright, against a
server process with an API key. Screenshots go to tmp_path and to artifacts/ (gitignored)."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model_zoo.registry import FAMILY_LOADERS
from tests.server.serving import ServerProcess

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:          # the dev extra brings it; without it the tests skip (fail in CI)
    sync_playwright = None

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
KEY = "playground-test-key"
ROOT = Path(__file__).resolve().parents[2]
RF_SHAPES = ROOT / "model_zoo/rf_shapes/checkpoints/rf-shapes/model_index.json"
# The flags this machine needs: no sandbox as root, and no background calls to the closed network.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
CHAT = "janusflow" in FAMILY_LOADERS


def _need(ok: bool, why: str) -> None:
    """Skip locally when the browser tooling is missing; in CI it is installed, so fail instead."""
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why} (CI installs it in .ci/run)")
        pytest.skip(why)


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    _need(CHROMIUM.exists(), f"{CHROMIUM} is not installed (apt-get install chromium chromium-driver)")
    _need(sync_playwright is not None, "playwright is not installed (pip install -e '.[dev]')")
    image = ["rf-shapes"] if RF_SHAPES.exists() else [f"instaflow-0.9b={request.getfixturevalue('tiny_sd')}"]
    chat = []
    if CHAT:
        from model_zoo.janusflow.random_checkpoint import save_random_checkpoint

        chat = [f"janusflow-1.3b={save_random_checkpoint(tmp_path_factory.mktemp('tiny-janus'), 'tiny', seed=0)}"]
    args = [a for spec in image + chat for a in ("--model", spec)]
    srv = ServerProcess(*args, "--device", "cpu", "--max-batch", "4", "--api-key", KEY,
                        ready_timeout=300)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser(server):
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        yield browser
        browser.close()


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


def test_generate_shows_images_timings_and_downloads(browser, server, tmp_path):
    page, errors = open_page(browser, server)
    assert page.evaluate("sessionStorage.getItem('rfserve.apiKey')") == KEY
    assert page.evaluate("localStorage.length") == 0
    page.get_by_label("Prompt", exact=True).fill("two red circles on a blue background")
    page.get_by_label("Images (n)").fill("2")
    random = page.get_by_label("Random")
    random.focus()
    page.keyboard.press("Space")                          # keyboard: unlock the seed field
    seed = page.get_by_label("Seed")
    expect(seed).to_be_enabled()
    seed.fill("7")
    assert page.evaluate("getComputedStyle(document.activeElement).outlineWidth") == "3px"
    page.locator("#t2i-submit").focus()
    page.keyboard.press("Enter")

    result = page.locator(".result").first
    expect(result).not_to_have_attribute("aria-busy", "true")
    images = result.locator("figure img")
    expect(images).to_have_count(2)
    page.wait_for_function("[...document.querySelectorAll('.result figure img')].every(i => i.complete)")
    widths = images.evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
    assert all(w > 0 for w in widths), widths
    timings = result.locator(".timings")
    for stage in ("seed 7", "queue", "encode", "sample", "decode", "total"):
        expect(timings).to_contain_text(stage)
    downloads = result.get_by_role("link", name="Download image with seed 8")
    assert downloads.get_attribute("download").endswith("-8.png")
    assert downloads.get_attribute("href").startswith("blob:")

    # the status strip polls /v1/status: queue depth, and a p50 now that a request finished
    expect(page.locator("#status-models")).to_contain_text("queue 0", timeout=15_000)
    expect(page.locator("#status-models")).to_contain_text(" ms", timeout=15_000)
    save_shot(page, tmp_path, "playground.png")
    assert errors == []


def test_rejected_field_shows_the_message_next_to_it(browser, server):
    page, errors = open_page(browser, server)
    steps = page.get_by_label("Steps")
    too_many = int(steps.get_attribute("max")) + 1
    page.get_by_label("Prompt", exact=True).fill("a green triangle")
    steps.fill(str(too_many))
    page.get_by_role("button", name="Generate").click()
    error = page.locator('#t2i-form [data-error-for="num_inference_steps"]')
    expect(error).to_contain_text("num_inference_steps must be between 1 and")
    expect(steps).to_have_attribute("aria-invalid", "true")
    expect(steps).to_be_focused()
    assert page.locator(".result").count() == 0           # the failed request leaves no empty card
    assert errors == []


def test_fits_a_360px_screen(browser, server, tmp_path):
    page, errors = open_page(browser, server, width=360, height=780)
    page.get_by_label("Prompt", exact=True).fill("a blue square")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator(".result figure img")).to_have_count(1)
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    for label in ("Model", "Prompt", "Size", "Steps", "Guidance", "Seed"):
        box = page.locator("#t2i-form").get_by_label(label, exact=True).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 360, (label, box)
    save_shot(page, tmp_path, "playground-360.png")
    assert errors == []


@pytest.mark.skipif(not CHAT, reason="the janusflow family is not registered yet")
def test_chat_streams_and_keeps_the_history(browser, server, tmp_path):
    page, errors = open_page(browser, server)
    expect(page.locator("#chat")).to_be_visible()
    picture = tmp_path / "pic.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(picture)
    log = page.locator("#chat-log")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    page.get_by_label("Attach images").set_input_files(str(broken))
    page.get_by_label("Message").fill("what is this?")
    page.get_by_role("button", name="Send").click()
    expect(page.locator('#chat-form [data-error-for="image_url"]')).to_contain_text("cannot be decoded")
    expect(log.locator(".turn")).to_have_count(0)         # a rejected turn leaves the history as it was

    page.get_by_label("Max tokens").fill("6")
    page.get_by_label("Attach images").set_input_files(str(picture))
    expect(page.locator("#chat-previews img")).to_have_count(1)

    def send(text):
        page.get_by_label("Message").fill(text)
        with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as answer:
            page.get_by_label("Message").press("Enter")
        assert answer.value.headers["content-type"].startswith("text/event-stream")
        expect(log).not_to_have_attribute("aria-busy", "true")
        return answer.value.request.post_data_json

    first = send("describe the image")
    assert first["stream"] is True and first["max_tokens"] == 6
    assert first["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    second = send("and the colours?")
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    assert second["messages"][1]["content"] == log.locator(".turn.assistant p").first.text_content()
    expect(log.locator(".turn")).to_have_count(4)
    expect(page.locator('#chat-form [data-error-for=""]')).to_be_empty()
    save_shot(page, tmp_path, "playground-chat.png")
    assert errors == []
