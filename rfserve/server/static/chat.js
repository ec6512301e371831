// The chat panel: multi-turn conversation over POST /v1/chat/completions with `stream: true`.
import { api, ApiError, clearErrors, events, showError } from "./api.js";

export function setupChat(models) {
  const form = document.getElementById("chat-form");
  const text = form.elements.messages;
  const files = form.elements.image;
  const stop = document.getElementById("chat-stop");
  const log = document.getElementById("chat-log");
  const history = []; // OpenAI messages sent so far, answers included
  let attached = []; // data: URLs of the images for the next message
  let inFlight = null;

  form.elements.model.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
  files.addEventListener("change", async () => {
    attached = await Promise.all([...files.files].map(dataUrl));
    const previews = attached.map((url, i) => thumb(url, `Attachment ${i + 1}`));
    document.getElementById("chat-previews").replaceChildren(...previews);
  });
  text.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  stop.addEventListener("click", () => inFlight?.abort());
  document.getElementById("chat-clear").addEventListener("click", () => {
    inFlight?.abort();
    history.length = 0;
    log.replaceChildren();
    clearErrors(form);
    text.focus();
  });

  const resetInputs = () => {
    text.value = "";
    files.value = "";
    attached = [];
    document.getElementById("chat-previews").replaceChildren();
  };

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (inFlight || (!text.value.trim() && !attached.length)) return;
    clearErrors(form);
    const parts = [...attached.map((url) => ({ type: "image_url", image_url: { url } })),
      { type: "text", text: text.value }];
    const message = { role: "user", content: parts };
    const userItem = addTurn("user", text.value, attached);
    const answer = addTurn("assistant", "");
    inFlight = new AbortController();
    stop.disabled = false;
    log.setAttribute("aria-busy", "true");
    try {
      const onDelta = (delta) => (answer.text.textContent += delta);
      const reply = await stream(form, [...history, message], inFlight.signal, onDelta);
      history.push(message, { role: "assistant", content: reply });
      resetInputs();
    } catch (err) {
      if (err.name === "AbortError" && answer.text.textContent) {
        // stopped mid-answer: what was said stays in the conversation
        history.push(message, { role: "assistant", content: answer.text.textContent });
        resetInputs();
      } else {
        answer.item.remove();
        userItem.item.remove();
        if (err.name !== "AbortError") {
          showError(form, err instanceof ApiError ? err : { message: `Request failed: ${err.message}` });
        }
      }
    } finally {
      inFlight = null;
      stop.disabled = true;
      log.removeAttribute("aria-busy");
    }
  });
}

// Posts the conversation and feeds each `choices[0].delta.content` to `onDelta`; resolves with the full text.
async function stream(form, messages, signal, onDelta) {
  const body = {
    model: form.elements.model.value,
    messages,
    stream: true,
    max_tokens: form.elements.max_tokens.value === "" ? undefined : Number(form.elements.max_tokens.value),
  };
  const resp = await api("/v1/chat/completions", { body, signal });
  let full = "";
  for await (const { data } of events(resp)) {
    if (data === "[DONE]") return full;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new ApiError(500, chunk.error.message, chunk.error.param);
    const delta = chunk.choices?.[0]?.delta?.content;
    if (typeof delta === "string" && delta) {
      full += delta;
      onDelta(delta);
    }
  }
  throw new ApiError(0, "the stream ended before [DONE]");
}

function addTurn(role, content, images = []) {
  const item = document.createElement("li");
  item.className = `turn ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Model";
  const text = document.createElement("p");
  text.textContent = content;
  item.append(who, ...images.map((url, i) => thumb(url, `Your image ${i + 1}`)), text);
  document.getElementById("chat-log").append(item);
  item.scrollIntoView({ block: "nearest" });
  return { item, text };
}

function thumb(url, alt) {
  const img = new Image();
  img.src = url;
  img.alt = alt;
  img.className = "thumb";
  return img;
}

function dataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}
