// Every request goes through `api`: it adds the API key, asks for one on 401, and turns the
// OpenAI error body {error: {message, param}} into an ApiError. `events` reads a server-sent-event body.
const KEY = "rfserve.apiKey"; // sessionStorage only: the key never outlives the tab

export class ApiError extends Error {
  constructor(status, message, param = null) {
    super(message);
    this.status = status;
    this.param = param;
  }
}

export const apiKey = {
  get: () => sessionStorage.getItem(KEY) || "",
  set: (key) => (key ? sessionStorage.setItem(KEY, key) : sessionStorage.removeItem(KEY)),
};

let pendingPrompt = null; // concurrent 401s share one dialog

export function askForKey(reason) {
  if (pendingPrompt) return pendingPrompt;
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-reason").textContent = reason;
  input.value = apiKey.get();
  pendingPrompt = new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      pendingPrompt = null;
      const saved = dialog.returnValue === "save";
      if (saved) {
        apiKey.set(input.value.trim());
        window.dispatchEvent(new Event("apikeychange")); // let pollers retry now, not on their next tick
      }
      resolve(saved);
    }, { once: true });
  });
  dialog.returnValue = "";
  dialog.showModal();
  return pendingPrompt;
}

// `raw` is sent as is: a JSON string, or FormData (then the browser sets the multipart content type).
// `quiet` requests (the status poll) report 401 instead of opening the dialog.
export async function api(path, { body, raw, signal, quiet = false } = {}) {
  for (;;) {
    const headers = {};
    if (apiKey.get()) headers.authorization = `Bearer ${apiKey.get()}`;
    const payload = raw ?? (body === undefined ? undefined : JSON.stringify(body));
    if (payload && !(payload instanceof FormData)) headers["content-type"] = "application/json";
    const resp = await fetch(path, { method: payload ? "POST" : "GET", headers, body: payload, signal });
    if (resp.ok) return resp;
    const err = await errorOf(resp);
    if (resp.status !== 401 || quiet) throw err;
    if (!(await askForKey(err.message))) throw err;
  }
}

// EventSource cannot POST, so SSE bodies are read from fetch's ReadableStream: yields {event, data} per
// message, `data` being its data lines joined and `event` its type ("message" when it names none).
export async function* events(resp) {
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    const messages = (buffer + value).split(/\r?\n\r?\n/);
    buffer = messages.pop();
    for (const message of messages) {
      let event = "message";
      const data = [];
      for (const line of message.split(/\r?\n/)) {
        const [, field, text] = line.match(/^([^:]*):? ?(.*)$/);
        if (field === "event") event = text;
        if (field === "data") data.push(text);
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
  }
}

async function errorOf(resp) {
  try {
    const { error } = await resp.json();
    return new ApiError(resp.status, error.message, error.param);
  } catch {
    return new ApiError(resp.status, `HTTP ${resp.status} ${resp.statusText}`);
  }
}

// Empty stays empty (the server's default applies); anything else goes as typed, so a bad value
// reaches the server and its message shows next to the field.
export function numberOf(text) {
  return text.trim() === "" ? undefined : Number(text);
}

// Shows an ApiError next to the field its `param` names. A path such as
// "messages.0.content.1.image_url.url" goes to the innermost part that has a slot ("image_url"),
// and anything unmatched to the form-wide slot (data-error-for="").
export function showError(form, err) {
  const parts = (err.param || "").split(".");
  const names = [parts.join("."), ...parts.reverse(), ""];
  const slot = names.map((n) => form.querySelector(`[data-error-for="${CSS.escape(n)}"]`)).find(Boolean);
  slot.textContent = err.message;
  const input = slot.closest(".field")?.querySelector("input, select, textarea");
  if (input) {
    input.setAttribute("aria-invalid", "true");
    input.setAttribute("aria-errormessage", ensureId(slot));
    input.focus();
  }
}

export function clearErrors(form) {
  form.querySelectorAll("[data-error-for]").forEach((el) => (el.textContent = ""));
  form.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
}

let ids = 0;
function ensureId(el) {
  if (!el.id) el.id = `error-${++ids}`;
  return el.id;
}
