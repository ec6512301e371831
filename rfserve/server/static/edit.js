// The edit panel: an uploaded image, a mask painted over it and a prompt, sent to POST /v1/images/edits
// as multipart form data. Results go to the panel's own gallery, as text-to-image's do.
import { api, ApiError, clearErrors, showError } from "./api.js";
import { addCard, fillCard, PARTIALS, seedToSend, setupForm, streamed, usedSeed } from "./t2i.js";

const FIELDS = ["model", "prompt", "strength", "num_inference_steps", "guidance_scale", "size"];

export function setupEdit(models) {
  const form = document.getElementById("edit-form");
  const { image, strength } = form.elements;
  const mask = maskPainter(document.getElementById("edit-mask"), document.getElementById("edit-source"));
  const loras = setupForm(form, models);
  strength.addEventListener("input", () => (document.getElementById("edit-strength-value").value = strength.value));
  image.addEventListener("change", () => mask.load(image.files[0]));
  document.getElementById("edit-clear").addEventListener("click", () => mask.clear());
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    edit(form, mask, loras);
  });
}

async function edit(form, mask, loras) {
  const f = form.elements;
  const streaming = f.stream.checked;
  const button = document.getElementById("edit-submit");
  clearErrors(form);
  // empty fields are left out (the server's default applies); the rest go as typed, for the server to judge
  const data = new FormData();
  if (f.image.files[0]) data.append("image", f.image.files[0]);
  if (mask.painted) data.append("mask", await mask.png(), "mask.png");
  for (const name of FIELDS) {
    if (name === "prompt" || f[name].value.trim() !== "") data.append(name, f[name].value);
  }
  const lora = loras.choice();
  if (lora) data.append("lora", JSON.stringify(lora)); // multipart fields are text: the list goes as JSON
  const seedText = seedToSend(f);
  if (seedText !== null) data.append("seed", seedText);
  data.append("response_format", "b64_json");
  if (streaming) {
    data.append("stream", "true");
    data.append("partial_images", String(PARTIALS));
  }
  const card = addCard("edit-gallery", f.prompt.value, 1);
  button.disabled = true;
  try {
    const resp = await api("/v1/images/edits", { raw: data });
    const result = streaming ? await streamed(resp, card, "image_edit") : await resp.json();
    fillCard(card, result, f.model.value, usedSeed(f, result, seedText));
  } catch (err) {
    card.remove();
    showError(form, err instanceof ApiError ? err : { message: `Request failed: ${err.message}` });
  } finally {
    button.disabled = false;
  }
}

// A canvas the size of the uploaded image, shown over it. The mask sent is a PNG of that size whose
// painted pixels are transparent (alpha 0) and all others opaque: OpenAI's convention.
function maskPainter(canvas, picture) {
  const ctx = canvas.getContext("2d");
  const area = document.getElementById("edit-paint");
  let painted = false;
  let last = null; // the stroke's previous point, in image pixels

  const at = (event) => {
    const box = canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * canvas.width / box.width, (event.clientY - box.top) * canvas.height / box.height];
  };
  const paint = (point) => {
    ctx.lineWidth = Math.max(2, Math.round(Math.min(canvas.width, canvas.height) / 8));
    ctx.lineCap = "round";
    ctx.strokeStyle = "#ff2d55";
    ctx.beginPath();
    ctx.moveTo(...(last ?? point));
    ctx.lineTo(...point);
    ctx.stroke();
    last = point;
    painted = true;
  };
  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    last = null;
    paint(at(event));
  });
  canvas.addEventListener("pointermove", (event) => {
    if (canvas.hasPointerCapture(event.pointerId)) paint(at(event));
  });
  picture.addEventListener("load", () => {
    canvas.width = picture.naturalWidth; // resizing also clears it
    canvas.height = picture.naturalHeight;
    painted = false;
    area.hidden = false;
  });
  picture.addEventListener("error", () => (area.hidden = true)); // the server says what is wrong with the file

  return {
    get painted() {
      return painted;
    },
    load(file) {
      if (picture.src) URL.revokeObjectURL(picture.src);
      area.hidden = true;
      painted = false;
      if (file) picture.src = URL.createObjectURL(file);
    },
    clear() {
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      painted = false;
    },
    png() {
      const { width, height } = canvas;
      const strokes = ctx.getImageData(0, 0, width, height).data;
      const mask = new ImageData(width, height); // black, alpha 0 everywhere
      for (let i = 3; i < strokes.length; i += 4) mask.data[i] = strokes[i] ? 0 : 255;
      const out = new OffscreenCanvas(width, height);
      out.getContext("2d").putImageData(mask, 0, 0);
      return out.convertToBlob({ type: "image/png" });
    },
  };
}
