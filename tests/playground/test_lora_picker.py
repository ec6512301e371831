"""The playground's LoRA picker (issue #34) in a real browser, against a server with a tiny SD model that serves an
adapter from the start and a synthetic model that serves none. The picker lists the selected model's adapters,
follows adapters loaded and unloaded at run time, sends the chosen ones with their scales (JSON, streamed, and as
the edit form's JSON text), and shows the server's refusals beside the adapter they name."""
import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from rfserve.model_zoo.instaflow.pipeline import InstaFlowPipeline
from tests.lora.adapters import SPECS, make
from tests.playground.page import (KEY, expect, last_form, need_browser, open_page, png, record_forms, save_shot,
                                   sse_messages)
from tests.server.serving import ServerProcess

pytestmark = pytest.mark.slow

ONE = "instaflow-2rf"        # serves LoRA: adapter "a" from the start
NONE = "synthetic"           # serves none: its `loras` is null


@pytest.fixture(scope="module")
def server(tiny_sd, tmp_path_factory):
    need_browser()
    folder = tmp_path_factory.mktemp("playground-lora")
    base = InstaFlowPipeline.from_pretrained(tiny_sd)
    adapter = make(SPECS["a"], base.parts.unet, base.parts.text_encoder, folder, seed=21).kohya_file
    photos = folder / "photos"
    photos.mkdir()
    (photos / "one.png").write_bytes(png(64, 64))
    # no warm-up: nothing here is timed, and it would cost the module's budget of CPU seconds
    srv = ServerProcess("--model", f"{ONE}={tiny_sd}", "--model", f"{NONE}={photos}", "--lora", f"a={adapter}?model={ONE}",
                        "--max-lora-rank", "4", "--device", "cpu", "--max-batch", "2", "--no-warmup",
                        "--api-key", KEY, ready_timeout=300)
    srv.adapter = adapter            # `load` posts the same file again under other names
    yield srv
    srv.stop()


def loras_api(server, method: str, path: str = "", **kw) -> httpx.Response:
    """/v1/loras[path] with the key: adapters loaded and unloaded behind the page's back."""
    r = httpx.request(method, f"{server.url}/v1/loras{path}", headers={"authorization": f"Bearer {KEY}"},
                      timeout=60, **kw)
    assert r.status_code == 200, r.text
    return r


def load(server, name: str) -> None:
    loras_api(server, "POST", json={"name": name, "path": str(server.adapter), "model": ONE})


def names(picker) -> list[str]:
    return picker.locator(".lora").evaluate_all("rows => rows.map(r => r.dataset.name)")


def decoded(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))).astype(int)


def test_the_picker_lists_the_models_adapters_and_follows_run_time_changes(browser, server, tmp_path):
    page, errors = open_page(browser, server)
    form = page.locator("#t2i-form")
    picker = form.locator("fieldset.loras")
    expect(picker).to_be_visible()
    expect(form.get_by_role("group", name="LoRA adapters")).to_be_visible()
    assert names(picker) == ["a"]
    expect(page.locator("#edit-form fieldset.loras .lora")).to_have_count(1)       # the edit form's model too
    use = picker.get_by_role("checkbox", name="a", exact=True)
    number = picker.get_by_role("spinbutton", name="Scale of a", exact=True)
    slider = picker.get_by_role("slider", name="Scale of a", exact=True)
    expect(use).not_to_be_checked()
    for scale in (number, slider):
        expect(scale).to_be_disabled()                                           # off: the keyboard skips it
        expect(scale).to_have_value("1")
        assert scale.evaluate("e => [e.min, e.max, e.step]") == ["-4", "4", "0.05"]

    # keyboard only: Space switches it on, Tab reaches the number then the slider, whose arrows move both
    use.focus()
    page.keyboard.press("Space")
    expect(use).to_be_checked()
    page.keyboard.press("Tab")
    expect(number).to_be_focused()
    page.keyboard.press("Tab")
    expect(slider).to_be_focused()
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    expect(number).to_have_value("0.9")
    page.set_viewport_size({"width": 360, "height": 780})
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    for scale in (use, number, slider):
        box = scale.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 360, box
    save_shot(page, tmp_path, "playground-lora-360.png")
    page.set_viewport_size({"width": 1280, "height": 900})

    # a model without LoRA has no picker; one loaded meanwhile shows on coming back, read afresh
    form.get_by_label("Model").select_option(NONE)
    expect(picker).to_be_hidden()
    load(server, "a2")
    form.get_by_label("Model").select_option(ONE)
    expect(picker.locator(".lora")).to_have_count(2)
    assert names(picker) == ["a", "a2"]
    # "Refresh adapters" adds and drops, and a kept adapter keeps its switch and scale
    picker.get_by_role("checkbox", name="a", exact=True).check()
    picker.get_by_role("spinbutton", name="Scale of a", exact=True).fill("-2.5")
    load(server, "a3")
    loras_api(server, "DELETE", "/a2")
    try:
        picker.get_by_role("button", name="Refresh adapters").click()
        expect(picker.get_by_role("checkbox", name="a3", exact=True)).to_be_visible()
        assert names(picker) == ["a", "a3"]
        expect(picker.get_by_role("checkbox", name="a", exact=True)).to_be_checked()
        expect(picker.get_by_role("spinbutton", name="Scale of a", exact=True)).to_have_value("-2.5")
        expect(picker.get_by_role("checkbox", name="a3", exact=True)).not_to_be_checked()
        save_shot(page, tmp_path, "playground-lora.png")
    finally:
        loras_api(server, "DELETE", "/a3")
    assert errors == []


def test_the_chosen_adapters_go_with_generations_streams_and_edits(browser, server):
    page, errors = open_page(browser, server)
    form = page.locator("#t2i-form")
    picker = form.locator("fieldset.loras")
    form.get_by_label("Prompt", exact=True).fill("a red square on blue")
    form.get_by_label("Steps").fill("2")
    form.get_by_label("Random").uncheck()
    form.get_by_label("Seed", exact=True).fill("5")

    def generate(count):
        with page.expect_response(lambda r: r.url.endswith("/v1/images/generations")) as answer:
            form.get_by_role("button", name="Generate").click()
        expect(page.locator("#gallery .result")).to_have_count(count)
        expect(page.locator("#gallery .result").first).not_to_have_attribute("aria-busy", "true")
        return answer.value.request.post_data_json, answer.value

    sent, plain = generate(1)
    assert "lora" not in sent                                            # none chosen: the field is left out
    picker.get_by_role("checkbox", name="a", exact=True).check()
    picker.get_by_role("spinbutton", name="Scale of a", exact=True).fill("0.75")
    expect(picker.get_by_role("slider", name="Scale of a", exact=True)).to_have_value("0.75")
    sent, with_a = generate(2)
    assert sent["lora"] == [{"name": "a", "scale": 0.75}] and sent["seed"] == 5
    plain_image, a_image = (decoded(r.json()["data"][0]["b64_json"]) for r in (plain, with_a))
    assert np.abs(plain_image - a_image).max() > 8                       # the adapter changed the picture

    form.get_by_label("Stream previews").check()
    sent, streamed = generate(3)
    assert sent["lora"] == [{"name": "a", "scale": 0.75}] and sent["stream"] is True
    event, completed = sse_messages(streamed.text())[-1]
    assert event == "image_generation.completed"
    assert np.abs(decoded(completed["b64_json"]) - a_image).max() <= 1  # the same image, streamed

    edit = page.locator("#edit-form")
    edit.get_by_label("Image", exact=True).set_input_files({"name": "one.png", "mimeType": "image/png",
                                                            "buffer": png(32, 32)})
    edit.get_by_label("Prompt", exact=True).fill("a blue square")
    edit.get_by_label("Steps").fill("2")
    edit.locator("fieldset.loras").get_by_role("checkbox", name="a", exact=True).check()
    record_forms(page)
    edit.get_by_role("button", name="Edit").click()
    result = page.locator("#edit-gallery .result").first
    expect(result).not_to_have_attribute("aria-busy", "true")
    expect(result.locator("figure img")).to_have_count(1)                # the server took the field
    assert json.loads(last_form(page)["lora"]) == [{"name": "a", "scale": 1}]
    assert errors == []


def test_a_refused_scale_or_adapter_shows_beside_it(browser, server):
    page, errors = open_page(browser, server)
    form = page.locator("#t2i-form")
    picker = form.locator("fieldset.loras")
    load(server, "z")
    try:
        picker.get_by_role("button", name="Refresh adapters").click()
        expect(picker.get_by_role("checkbox", name="z", exact=True)).to_be_visible()
        form.get_by_label("Prompt", exact=True).fill("a green circle")
        for name, scale in (("a", "1"), ("z", "-4.5")):                  # past the slider's reach, typed
            picker.get_by_role("checkbox", name=name, exact=True).check()
            picker.get_by_role("spinbutton", name=f"Scale of {name}", exact=True).fill(scale)
        form.get_by_role("button", name="Generate").click()
        z_scale = picker.get_by_role("spinbutton", name="Scale of z", exact=True)
        z_error = picker.locator('.lora[data-name="z"] .error')
        expect(z_error).to_contain_text("lora.1.scale: must be a finite number between -4 and 4")
        expect(z_scale).to_have_attribute("aria-invalid", "true")
        expect(z_scale).to_be_focused()
        expect(picker.get_by_role("spinbutton", name="Scale of a", exact=True)).not_to_have_attribute("aria-invalid", "true")

        # unloaded since the page listed it: the server's message shows in the picker
        z_scale.fill("-1")
        loras_api(server, "DELETE", "/z")
        form.get_by_role("button", name="Generate").click()
        expect(picker.locator('[data-error-for="lora"]')).to_contain_text("no adapter 'z' is loaded")
        expect(z_error).to_be_empty()                                    # the earlier message went
        expect(z_scale).not_to_have_attribute("aria-invalid", "true")
        assert page.locator("#gallery .result").count() == 0             # refusals leave no empty card
    finally:
        if "z" in [x["id"] for x in loras_api(server, "GET").json()["data"]]:
            loras_api(server, "DELETE", "/z")
    assert errors == []
