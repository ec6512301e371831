// The text-to-image panel: a form over POST /v1/images/generations and a gallery of results.
import { api, ApiError, clearErrors, showError } from "./api.js";

const STAGES = ["queue", "encode", "sample", "decode", "total"];

export function setupT2I(models) {
  const form = document.getElementById("t2i-form");
  const picker = form.elements.model;
  const random = document.getElementById("t2i-random");
  const seed = form.elements.seed;
  const byId = new Map(models.map((m) => [m.id, m]));

  picker.replaceChildren(...models.map((m) => new Option(`${m.id} (${m.family})`, m.id)));
  picker.addEventListener("change", () => applyDefaults(form, byId.get(picker.value)));
  applyDefaults(form, models[0]);
  random.addEventListener("change", () => {
    seed.disabled = random.checked;
    if (!random.checked) seed.focus();
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    generate(form, random.checked);
  });
}

// A model's sizes and defaults; max_steps becomes the spinbutton's max (the server still decides).
function applyDefaults(form, model) {
  const { size, num_inference_steps: steps, guidance_scale: guidance } = form.elements;
  const label = (s) => s.replace("x", " × ");
  size.replaceChildren(...model.sizes.map((s) => new Option(label(s), s, false, s === model.default_size)));
  steps.value = model.default_steps;
  steps.max = model.max_steps;
  guidance.value = model.default_guidance_scale;
  clearErrors(form);
}

async function generate(form, randomSeed) {
  const f = form.elements;
  const button = document.getElementById("t2i-submit");
  clearErrors(form);
  const body = {
    model: f.model.value,
    prompt: f.prompt.value,
    size: f.size.value,
    n: numberOf(f.n.value),
    num_inference_steps: numberOf(f.num_inference_steps.value),
    guidance_scale: numberOf(f.guidance_scale.value),
  };
  if (f.negative_prompt.value) body.negative_prompt = f.negative_prompt.value;
  const seedText = f.seed.value.trim();
  const card = addCard(body, Number.isInteger(body.n) && body.n > 0 ? Math.min(body.n, 16) : 1);
  button.disabled = true;
  try {
    const resp = await api("/v1/images/generations", { raw: withSeed(body, randomSeed ? null : seedText) });
    const result = await resp.json();
    const usedSeed = randomSeed ? String(result.seed) : seedText;
    f.seed.value = usedSeed;
    fillCard(card, result, usedSeed);
  } catch (err) {
    card.remove();
    showError(form, err instanceof ApiError ? err : { message: `Request failed: ${err.message}` });
  } finally {
    button.disabled = false;
  }
}

// Empty stays empty (the server's default applies); anything else goes as typed, so a bad value
// reaches the server and its message shows next to the field.
function numberOf(text) {
  return text.trim() === "" ? undefined : Number(text);
}

// Seeds go up to 2^63 - 1, past JavaScript's exact integers, so digits are spliced in verbatim.
function withSeed(body, seedText) {
  if (seedText === null || seedText === "") return JSON.stringify(body);
  if (!/^\d{1,19}$/.test(seedText)) return JSON.stringify({ ...body, seed: seedText });
  return JSON.stringify({ ...body, seed: 0 }).replace(/"seed":0}$/, `"seed":${seedText}}`);
}

function addCard(body, slots) {
  const card = document.createElement("article");
  card.className = "result";
  card.setAttribute("aria-busy", "true");
  const title = document.createElement("h3");
  title.textContent = body.prompt || "(empty prompt)";
  const grid = document.createElement("div");
  grid.className = "images";
  for (let i = 0; i < slots; i++) {
    const ph = document.createElement("div");
    ph.className = "placeholder";
    ph.textContent = "generating…";
    grid.append(ph);
  }
  card.append(title, grid);
  document.getElementById("gallery").prepend(card);
  return card;
}

function fillCard(card, result, seedText) {
  const grid = card.querySelector(".images");
  grid.replaceChildren(...result.data.map((d, i) => figure(d.b64_json, result.model, seedPlus(seedText, i))));
  const meta = document.createElement("p");
  meta.className = "timings";
  const t = result.timings || {};
  meta.textContent = `${result.model} · seed ${seedText} · ` +
    STAGES.filter((s) => s in t).map((s) => `${s} ${t[s].toFixed(1)} ms`).join(" · ");
  card.append(meta);
  card.removeAttribute("aria-busy");
}

function figure(b64, model, seed) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const url = URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
  const fig = document.createElement("figure");
  const img = new Image();
  img.src = url;
  img.alt = `Generated image, seed ${seed}`;
  const link = document.createElement("a");
  link.href = url;
  link.download = `${model}-${seed}.png`;
  link.className = "button ghost";
  link.textContent = "Download";
  link.setAttribute("aria-label", `Download image with seed ${seed}`);
  fig.append(img, link);
  return fig;
}

function seedPlus(seedText, i) {
  return (BigInt(seedText) + BigInt(i)).toString();
}
