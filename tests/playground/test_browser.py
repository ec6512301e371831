"""The playground in a real browser: Debian's headless Chromium driven by Playwright, against a
server process with an API key. Screenshots go to tmp_path and to artifacts/ (gitignored)."""
import io
import re
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import pytest
from PIL import Image

from rfserve.model_zoo.registry import FAMILY_LOADERS
from tests.playground.page import (KEY, ROOT, expect, last_form, need_browser, open_page, png, record_forms, save_shot,
                                   sse_messages)
from tests.server.serving import ServerProcess

pytestmark = pytest.mark.slow

RF_SHAPES = ROOT / "rfserve/model_zoo/rf_shapes/checkpoints/rf-shapes/model_index.json"
CHAT = "janusflow" in FAMILY_LOADERS
MULTI_STEP = "rf-shapes-2rf" if RF_SHAPES.exists() else "instaflow-2rf"   # its previews come between steps
ONE_STEP = "rf-shapes" if RF_SHAPES.exists() else "instaflow-0.9b"
STAGES = ("queue", "encode", "sample", "decode", "total")


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    need_browser()
    if RF_SHAPES.exists():
        image = [ONE_STEP, MULTI_STEP]
    else:
        tiny = request.getfixturevalue("tiny_sd")
        image = [f"{ONE_STEP}={tiny}", f"{MULTI_STEP}={tiny}"]
    chat = []
    if CHAT:
        from rfserve.model_zoo.janusflow.random_checkpoint import save_random_checkpoint

        chat = [f"janusflow-1.3b={save_random_checkpoint(tmp_path_factory.mktemp('tiny-janus'), 'tiny', seed=0)}"]
    args = [a for spec in image + chat for a in ("--model", spec)]
    srv = ServerProcess(*args, "--device", "cpu", "--max-batch", "4", "--api-key", KEY,
                        ready_timeout=300)
    yield srv
    srv.stop()


def record_previews(page, gallery):
    """From now on, the label and image of every preview the gallery shows go to window.previews."""
    page.evaluate("""gallery => {
        window.previews = [];
        new MutationObserver(() => {
            const fig = document.querySelector(`${gallery} figure.preview`);
            const label = fig?.querySelector("figcaption").textContent;
            if (label && label !== window.previews.at(-1)?.label)
                window.previews.push({label, src: fig.querySelector("img").src});
        }).observe(document.querySelector(gallery), {subtree: true, childList: true, characterData: true,
                                                    attributes: true});
    }""", gallery)


def shows_the_servers_seed(form, result, model, completed):
    """With Random on, the seed shown, and put in the Seed field, is the one the stream's completed event
    carries; its timings show as a JSON answer's do (toFixed(1): the nearest tenth, ties up)."""
    seed, timings = completed["seed"], completed["timings"]
    assert {"queue", "encode", "sample", "decode"} <= set(timings), timings
    expect(form.get_by_label("Seed", exact=True)).to_have_value(str(seed))      # to make the image again
    tenths = {s: Decimal(timings[s]).quantize(Decimal("0.1"), ROUND_HALF_UP) for s in STAGES if s in timings}
    text = " · ".join([model, f"seed {seed}", *(f"{s} {t} ms" for s, t in tenths.items())])
    expect(result.locator(".timings")).to_have_text(text)


def shown(page, images):
    """Waits until every image of the locator has loaded, and returns their natural widths."""
    images.first.wait_for()
    page.wait_for_function("imgs => imgs.every(i => i.complete && i.naturalWidth > 0)", arg=images.element_handles())
    return images.evaluate_all("imgs => imgs.map(i => i.naturalWidth)")


def test_generate_shows_images_timings_and_downloads(browser, server, tmp_path):
    page, errors = open_page(browser, server)
    assert page.evaluate("sessionStorage.getItem('rfserve.apiKey')") == KEY
    assert page.evaluate("localStorage.length") == 0
    form = page.locator("#t2i-form")
    form.get_by_label("Prompt", exact=True).fill("two red circles on a blue background")
    form.get_by_label("Images (n)").fill("2")
    random = form.get_by_label("Random")
    random.focus()
    page.keyboard.press("Space")                          # keyboard: unlock the seed field
    seed = form.get_by_label("Seed")
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
    for stage in ("seed 7", *STAGES):
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
    form = page.locator("#t2i-form")
    steps = form.get_by_label("Steps")
    too_many = int(steps.get_attribute("max")) + 1
    form.get_by_label("Prompt", exact=True).fill("a green triangle")
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
    page.locator("#t2i-form").get_by_label("Prompt", exact=True).fill("a blue square")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator(".result figure img")).to_have_count(1)
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    for form in ("#t2i-form", "#edit-form"):
        for label in ("Model", "Prompt", "Size", "Steps", "Guidance", "Seed"):
            box = page.locator(form).get_by_label(label, exact=True).bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= 360, (form, label, box)
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


def test_stream_shows_previews_then_the_image(browser, server, tmp_path):
    page, errors = open_page(browser, server)
    form = page.locator("#t2i-form")
    form.get_by_label("Model").select_option(MULTI_STEP)
    form.get_by_label("Prompt", exact=True).fill("a yellow star on a black background")
    form.get_by_label("Images (n)").fill("3")
    form.get_by_label("Stream previews").check()
    expect(form.get_by_label("Images (n)")).to_be_disabled()            # a stream carries one image
    expect(form.get_by_label("Images (n)")).to_have_value("1")
    record_previews(page, "#gallery")
    with page.expect_response(lambda r: r.url.endswith("/v1/images/generations")) as answer:
        page.get_by_role("button", name="Generate").click()
    sent = answer.value.request.post_data_json
    assert (sent["stream"], sent["partial_images"], sent["n"]) == (True, 2, 1)
    assert "seed" not in sent                                            # Random: the server draws it
    assert answer.value.headers["content-type"].startswith("text/event-stream")
    messages = sse_messages(answer.value.text())
    partial, completed = "image_generation.partial_image", "image_generation.completed"
    assert [(e, m["type"]) for e, m in messages] == [(partial, partial), (partial, partial), (completed, completed)]

    result = page.locator("#gallery .result").first
    expect(result).not_to_have_attribute("aria-busy", "true")
    previews = page.evaluate("window.previews")
    assert [p["label"] for p in previews] == ["preview 1/2", "preview 2/2"], previews
    assert all(p["src"].startswith("blob:") for p in previews)
    assert result.locator("figure.preview").count() == 0                 # the final image replaced the preview
    assert shown(page, result.locator("figure img")) == [64]
    final = messages[-1][1]
    shows_the_servers_seed(form, result, MULTI_STEP, final)
    assert result.get_by_role("link", name="Download").get_attribute("download") == f"{MULTI_STEP}-{final['seed']}.png"
    save_shot(page, tmp_path, "playground-stream.png")

    # a one-step model has no step to preview after: only the completed event, and the image
    form.get_by_label("Model").select_option(ONE_STEP)
    record_previews(page, "#gallery")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#gallery .result")).to_have_count(2)
    expect(page.locator("#gallery .result").first).not_to_have_attribute("aria-busy", "true")
    assert shown(page, page.locator("#gallery .result").first.locator("figure img")) == [64]
    assert page.evaluate("window.previews") == []
    assert errors == []


def test_edit_sends_the_image_and_a_painted_mask(browser, server, tmp_path):
    page, errors = open_page(browser, server)
    expect(page.locator("#edit")).to_be_visible()
    form = page.locator("#edit-form")
    # only the models /v1/images/edits takes: JanusFlow, served for chat and text-to-image, is left out
    served = page.evaluate("""async key => (await (await fetch("/v1/models",
        {headers: {authorization: `Bearer ${key}`}})).json()).data""", KEY)
    assert [m["id"] for m in served if m["edits"]] == [ONE_STEP, MULTI_STEP]
    assert [m["id"] for m in served if not m["edits"]] == (["janusflow-1.3b"] if CHAT else [])
    options = "select => [...select.options].map(o => o.value)"
    assert form.get_by_label("Model").evaluate(options) == [ONE_STEP, MULTI_STEP]
    t2i_models = page.locator("#t2i-form").get_by_label("Model").evaluate(options)
    assert t2i_models == [m["id"] for m in served]
    picture = tmp_path / "source.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(picture)
    form.get_by_label("Model").select_option(MULTI_STEP)
    form.get_by_label("Image", exact=True).set_input_files(str(picture))
    canvas = page.get_by_label("Mask: paint over the area to change")
    expect(canvas).to_be_visible()
    assert canvas.evaluate("c => [c.width, c.height]") == [80, 48]      # the mask is the image's size
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.5, steps=8)
    page.mouse.up()
    form.get_by_label("Prompt", exact=True).fill("a red square")
    expect(form.get_by_label("Strength")).to_have_value("0.6")
    record_forms(page)
    form.get_by_role("button", name="Edit").click()
    result = page.locator("#edit-gallery .result").first
    expect(result).not_to_have_attribute("aria-busy", "true")
    assert shown(page, result.locator("figure img")) == [64]
    expect(result.locator(".timings")).to_contain_text(re.compile(rf"^{MULTI_STEP} · seed \d+"))

    parts = last_form(page)
    assert parts["image"] == picture.read_bytes()
    assert {k: parts[k] for k in ("prompt", "model", "strength", "response_format", "size")} == {
        "prompt": "a red square", "model": MULTI_STEP, "strength": "0.6", "response_format": "b64_json",
        "size": "64x64"}
    assert "seed" not in parts and "stream" not in parts
    mask = Image.open(io.BytesIO(parts["mask"]))
    assert (mask.format, mask.mode, mask.size) == ("PNG", "RGBA", (80, 48))
    alpha = np.asarray(mask)[..., 3]
    assert set(np.unique(alpha)) == {0, 255}
    assert alpha[24, 32] == 0 and alpha[24, 16:48].max() == 0           # painted: transparent, to be changed
    assert alpha[0, 0] == 255 and alpha[:, 70:].min() == 255            # the rest opaque, kept
    save_shot(page, tmp_path, "playground-edit.png")

    # cleared, no mask goes; streamed, the edit's previews show as text-to-image's do
    form.get_by_role("button", name="Clear mask").click()
    form.get_by_label("Stream previews").check()
    record_previews(page, "#edit-gallery")
    with page.expect_response(lambda r: r.url.endswith("/v1/images/edits")) as answer:
        form.get_by_role("button", name="Edit").click()
    parts = last_form(page)
    assert "mask" not in parts and (parts["stream"], parts["partial_images"]) == ("true", "2")
    assert "seed" not in parts                                           # Random: the server draws it
    event, completed = sse_messages(answer.value.text())[-1]
    assert event == completed["type"] == "image_edit.completed"
    expect(page.locator("#edit-gallery .result")).to_have_count(2)
    result = page.locator("#edit-gallery .result").first
    expect(result).not_to_have_attribute("aria-busy", "true")
    assert shown(page, result.locator("figure img")) == [64]
    assert [p["label"] for p in page.evaluate("window.previews")] == ["preview 1/2", "preview 2/2"]
    shows_the_servers_seed(form, result, MULTI_STEP, completed)
    assert errors == []


@pytest.mark.skipif(not RF_SHAPES.exists(), reason="only the embedded rf-shapes models have a vocabulary")
def test_prompt_hints_and_warnings_come_from_the_models_vocabulary(browser, server):
    page, errors = open_page(browser, server)
    served = page.evaluate("""async key => (await (await fetch("/v1/models",
        {headers: {authorization: `Bearer ${key}`}})).json()).data""", KEY)
    vocab = {m["id"]: m["vocabulary"] for m in served}[ONE_STEP]
    t2i, edit = page.locator("#t2i-form"), page.locator("#edit-form")
    prompt = t2i.get_by_label("Prompt", exact=True)
    expect(prompt).to_have_value("")                                     # a hint, not text already typed
    expect(prompt).to_have_attribute("placeholder", f"e.g. {vocab['examples'][0]}")
    expect(edit.get_by_label("Prompt", exact=True)).to_have_attribute("placeholder", f"e.g. {vocab['examples'][1]}")
    style = """el => { const p = getComputedStyle(el, "::placeholder"), hint = getComputedStyle(el.nextElementSibling);
        return [p.color, p.fontStyle, getComputedStyle(el).color, hint.color]; }"""
    placeholder, slant, typed, muted = prompt.evaluate(style)
    assert (placeholder, slant) == (muted, "italic") and placeholder != typed
    hint = page.locator("#t2i-prompt-hint")
    expect(hint).to_be_visible()
    expect(hint).to_contain_text(f"colours {', '.join(vocab['colours'])}")
    expect(hint).to_contain_text(f"shapes {', '.join(vocab['shapes'])}")

    prompt.fill("a cat on a blue background")
    for stream in (False, True):                                         # the JSON answer, then the stream's
        t2i.get_by_label("Stream previews").set_checked(stream)
        page.get_by_role("button", name="Generate").click()
        expect(page.locator("#gallery .result")).to_have_count(1 + stream)
        result = page.locator("#gallery .result").first
        expect(result).not_to_have_attribute("aria-busy", "true")
        expect(result.locator(".warning")).to_have_text(re.compile(rf"^{ONE_STEP} does not know 'cat': "))
    prompt.fill(vocab["examples"][0])
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#gallery .result")).to_have_count(3)
    expect(page.locator("#gallery .result").first).not_to_have_attribute("aria-busy", "true")
    expect(page.locator("#gallery .result").first.locator(".warning")).to_have_count(0)
    assert errors == []


def test_edit_panel_is_hidden_when_no_model_takes_edits(browser, server):
    page, errors = open_page(browser, server)

    def no_edits(route):
        resp = route.fetch()
        models = resp.json()
        for model in models["data"]:
            model["edits"] = False
        route.fulfill(response=resp, json=models)

    page.route("**/v1/models", no_edits)
    page.reload()                                                        # the key stays in the tab's session
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.locator("#t2i")).to_be_visible()
    expect(page.locator("#edit")).to_be_hidden()
    assert errors == []


def test_edit_shows_the_servers_message_next_to_strength(browser, server):
    page, errors = open_page(browser, server)
    form = page.locator("#edit-form")
    form.get_by_label("Image", exact=True).set_input_files(
        {"name": "one.png", "mimeType": "image/png", "buffer": png(32, 32)})
    form.get_by_label("Prompt", exact=True).fill("a blue square")
    strength = form.get_by_label("Strength")
    strength.evaluate("el => { el.max = '2'; el.value = '2'; }")       # past what the slider allows
    form.get_by_role("button", name="Edit").click()
    error = form.locator('[data-error-for="strength"]')
    expect(error).to_contain_text("strength")
    expect(strength).to_have_attribute("aria-invalid", "true")
    assert page.locator("#edit-gallery .result").count() == 0
    assert errors == []

