// The text-to-image panel: a form over POST /v1/images/generations and a gallery of results. The form
// helpers, the result cards and the reading of an image stream are shared with the edit panel.
import { api, ApiError, clearErrors, events, numberOf, showError } from "./api.js";
import { loraPicker } from "./lora.js";

const STAGES = ["queue", "encode", "sample", "decode", "total"];
const MEDIA = { png: "image/png", jpeg: "image/jpeg", webp: "image/webp" };
export const PARTIALS = 2; // previews asked for when streaming

export function setupT2I(models) {
  const form = document.getElementById("t2i-form");
  const { n, stream } = form.elements;
  const loras = setupForm(form, models);
  stream.addEventListener("change", () => {
    n.disabled = stream.checked; // a stream carries one image
    if (stream.checked) n.value = "1";
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    generate(form, loras);
  });
}

// What both image forms have: a model picker with the model's defaults and LoRA adapters, and a seed field
// that the "Random" switch locks. Returns the form's LoRA picker.
export function setupForm(form, models) {
  const { model: picker, random, seed } = form.elements;
  const byId = new Map(models.map((m) => [m.id, m]));
  const loras = loraPicker(form);
  // the adapters listed at page load show at once, so a request sent before the fresh list arrives
  // cannot carry the previous model's
  const choose = (model) => {
    applyDefaults(form, model);
    loras.show(model);
  };
  picker.replaceChildren(...models.map((m) => new Option(`${m.id} (${m.family})`, m.id)));
  picker.addEventListener("change", () => {
    choose(byId.get(picker.value));
    loras.reload();
  });
  choose(models[0]);
  random.addEventListener("change", () => {
    seed.disabled = random.checked;
    if (!random.checked) seed.focus();
  });
  return loras;
}

// A model's sizes and defaults; max_steps becomes the spinbutton's max (the server still decides).
function applyDefaults(form, model) {
  const { size, num_inference_steps: steps, guidance_scale: guidance } = form.elements;
  const label = (s) => s.replace("x", " × ");
  size.replaceChildren(...model.sizes.map((s) => new Option(label(s), s, false, s === model.default_size)));
  steps.value = model.default_steps;
  steps.max = model.max_steps;
  guidance.value = model.default_guidance_scale;
  showVocabulary(form.elements.prompt, model);
  clearErrors(form);
}

// A model that knows only some words (its `vocabulary` in /v1/models) gets one of its own example prompts as
// the prompt's placeholder, and its words listed below; any other keeps the page's free-text placeholder.
function showVocabulary(prompt, model) {
  const vocab = model.vocabulary;
  const hint = document.getElementById(prompt.getAttribute("aria-describedby"));
  prompt.dataset.freeText ??= prompt.placeholder;
  hint.hidden = !vocab;
  if (!vocab) {
    prompt.placeholder = prompt.dataset.freeText;
    hint.textContent = "";
    return;
  }
  prompt.placeholder = `e.g. ${vocab.examples[Number(prompt.dataset.example) % vocab.examples.length]}`;
  const list = (words) => words.join(", ");
  hint.textContent = `${model.id} knows only these words: counts ${list(vocab.counts)}; colours ${list(vocab.colours)}; ` +
    `shapes ${list(vocab.shapes)} (plural with s); backgrounds ${list(vocab.backgrounds)}.`;
}

async function generate(form, loras) {
  const f = form.elements;
  const streaming = f.stream.checked;
  const button = document.getElementById("t2i-submit");
  clearErrors(form);
  const body = {
    model: f.model.value,
    prompt: f.prompt.value,
    size: f.size.value,
    n: streaming ? 1 : numberOf(f.n.value),
    num_inference_steps: numberOf(f.num_inference_steps.value),
    guidance_scale: numberOf(f.guidance_scale.value),
    lora: loras.choice(),
  };
  if (f.negative_prompt.value) body.negative_prompt = f.negative_prompt.value;
  if (streaming) Object.assign(body, { stream: true, partial_images: PARTIALS });
  const seedText = seedToSend(f);
  const card = addCard("gallery", body.prompt, Number.isInteger(body.n) && body.n > 0 ? Math.min(body.n, 16) : 1);
  button.disabled = true;
  try {
    const resp = await api("/v1/images/generations", { raw: withSeed(body, seedText) });
    const result = streaming ? await streamed(resp, card, "image_generation") : await resp.json();
    fillCard(card, result, body.model, usedSeed(f, result, seedText));
  } catch (err) {
    card.remove();
    showError(form, err instanceof ApiError ? err : { message: `Request failed: ${err.message}` });
  } finally {
    button.disabled = false;
  }
}

// Seeds go up to 2^63 - 1, past JavaScript's exact integers, so digits are spliced in verbatim.
function withSeed(body, seedText) {
  if (seedText === null) return JSON.stringify(body);
  if (!/^\d{1,19}$/.test(seedText)) return JSON.stringify({ ...body, seed: seedText });
  return JSON.stringify({ ...body, seed: 0 }).replace(/"seed":0}$/, `"seed":${seedText}}`);
}

// The seed to send: the one typed, or null for the server to draw one and report it (in a JSON answer
// and in a stream's completed event alike).
export function seedToSend(fields) {
  return (!fields.random.checked && fields.seed.value.trim()) || null;
}

// The seed a result was made with, which then fills the field so the image can be made again.
export function usedSeed(fields, result, seedText) {
  const seed = seedText ?? String(result.seed);
  fields.seed.value = seed;
  return seed;
}

// Reads an image stream (`kind` is image_generation or image_edit): each partial image replaces the
// card's preview; resolves with the completed event (seed and timings included), shaped like a
// non-streamed response.
export async function streamed(resp, card, kind) {
  for await (const { event, data } of events(resp)) {
    const message = JSON.parse(data);
    if (event === "error") throw new ApiError(0, message.error.message, message.error.param);
    if (message.type === `${kind}.partial_image`) preview(card, message);
    if (message.type === `${kind}.completed`) return { ...message, data: [{ b64_json: message.b64_json }] };
  }
  throw new ApiError(0, "the stream ended before the completed image");
}

function preview(card, partial) {
  const grid = card.querySelector(".images");
  let fig = grid.querySelector("figure.preview");
  if (!fig) {
    fig = document.createElement("figure");
    fig.className = "preview";
    fig.append(new Image(), document.createElement("figcaption"));
    grid.replaceChildren(fig);
  }
  const img = fig.querySelector("img");
  const label = `preview ${partial.partial_image_index + 1}/${PARTIALS}`;
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = blobUrl(partial.b64_json, partial.output_format);
  img.alt = `Image in progress, ${label}`;
  fig.querySelector("figcaption").textContent = label;
}

export function addCard(galleryId, prompt, slots) {
  const card = document.createElement("article");
  card.className = "result";
  card.setAttribute("aria-busy", "true");
  const title = document.createElement("h3");
  title.textContent = prompt || "(empty prompt)";
  const grid = document.createElement("div");
  grid.className = "images";
  for (let i = 0; i < slots; i++) {
    const ph = document.createElement("div");
    ph.className = "placeholder";
    ph.textContent = "generating…";
    grid.append(ph);
  }
  card.append(title, grid);
  document.getElementById(galleryId).prepend(card);
  return card;
}

export function fillCard(card, result, model, seedText) {
  const grid = card.querySelector(".images");
  const format = result.output_format;
  grid.querySelectorAll(".preview img").forEach((img) => URL.revokeObjectURL(img.src));
  grid.replaceChildren(...result.data.map((d, i) => figure(d.b64_json, format, model, seedPlus(seedText, i))));
  for (const text of result.warnings ?? []) {
    const warning = document.createElement("p");
    warning.className = "warning";
    warning.textContent = text;
    card.append(warning);
  }
  const meta = document.createElement("p");
  meta.className = "timings";
  const t = result.timings || {};
  const stages = STAGES.filter((s) => s in t).map((s) => `${s} ${t[s].toFixed(1)} ms`);
  meta.textContent = [model, `seed ${seedText}`, ...stages].join(" · ");
  card.append(meta);
  card.removeAttribute("aria-busy");
}

function figure(b64, format, model, seed) {
  const url = blobUrl(b64, format);
  const fig = document.createElement("figure");
  const img = new Image();
  img.src = url;
  img.alt = `Generated image, seed ${seed}`;
  const link = document.createElement("a");
  link.href = url;
  link.download = `${model}-${seed}.${format}`;
  link.className = "button ghost";
  link.textContent = "Download";
  link.setAttribute("aria-label", `Download image with seed ${seed}`);
  fig.append(img, link);
  return fig;
}

function blobUrl(b64, format) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return URL.createObjectURL(new Blob([bytes], { type: MEDIA[format] }));
}

function seedPlus(seedText, i) {
  return (BigInt(seedText) + BigInt(i)).toString();
}
