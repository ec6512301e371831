"""Janus-Pro served end to end, through the `openai` client: chat (streamed and not, the same text), images
on /v1/images/generations and from chat, and streamed previews of its tokens."""
import pytest

from tests.server.serving import ServerProcess, decode_png, openai_client

pytestmark = pytest.mark.slow
MODEL = "janus-pro-1b"


@pytest.fixture(scope="module")
def server(tiny_janus):
    srv = ServerProcess("--model", f"{MODEL}={tiny_janus}", "--max-batch", "4", ready_timeout=240)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.mark.smoke
def test_chat_streamed_and_not_say_the_same(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                       if c.choices)
    assert whole.choices[0].message.content == streamed
    assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0


def test_images_come_at_the_native_size_and_follow_the_seed(client):
    first = client.images.generate(model=MODEL, prompt="a red cat", n=2, extra_body={"seed": 5})
    again = client.images.generate(model=MODEL, prompt="a red cat", extra_body={"seed": 6})
    images = [decode_png(d.b64_json) for d in first.data]
    assert images[0].shape == (16, 16, 3)
    assert (images[1] == decode_png(again.data[0].b64_json)).all()      # image 1 of seed 5 is seed 6's image 0


def test_a_streamed_image_previews_its_tokens(client):
    events = list(client.images.generate(model=MODEL, prompt="a blue dog", stream=True, partial_images=2,
                                         extra_body={"seed": 1}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    plain = client.images.generate(model=MODEL, prompt="a blue dog", extra_body={"seed": 1})
    assert events[-1].b64_json == plain.data[0].b64_json


def test_chat_can_answer_with_an_image(client):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a green frog"}],
                                           extra_body={"modalities": ["image"], "seed": 2})
    (part,) = reply.choices[0].message.content
    assert part["image_url"]["url"].startswith("data:image/png;base64,")
