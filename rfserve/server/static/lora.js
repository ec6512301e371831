// The LoRA picker of an image form: the adapters loaded for the form's model (its `loras` in /v1/models), each
// with a switch and a scale. Adapters come and go at run time (POST and DELETE /v1/loras), so the list is read
// again whenever the model changes and on "Refresh adapters"; a model that serves no LoRA (`loras` null) gets no
// picker at all.
import { api, numberOf } from "./api.js";

export function loraPicker(form) {
  const box = form.querySelector(".loras");
  const list = box.querySelector(".lora-list");
  const none = box.querySelector(".lora-none");
  const slot = box.querySelector('[data-error-for="lora"]');

  // Rows for `model`'s adapters; one still listed keeps its switch and scale across a refresh.
  function show(model) {
    const before = new Map([...list.children].map((row) => [row.dataset.name, row]));
    list.replaceChildren(...(model.loras ?? []).map((name) => before.get(name) ?? row(name)));
    box.hidden = !model.loras;
    none.hidden = list.children.length > 0;
  }

  // Whatever the answer, it is shown for the model selected when it arrives: a slow answer for a model
  // left since then cannot put that model's adapters under another.
  async function reload() {
    try {
      const { data } = await (await api("/v1/models")).json();
      const model = data.find((m) => m.id === form.elements.model.value);
      if (model) show(model);
    } catch (err) {
      slot.textContent = `Could not refresh the adapters: ${err.message}`;
    }
  }

  // The chosen adapters as the request's `lora` (undefined when none: the field is left out). A chosen row's
  // error slot answers to its place in that list, so a 400 for `lora.1.scale` shows beside the second one.
  function choice() {
    const chosen = [];
    for (const r of list.children) {
      const error = r.querySelector(".error");
      if (r.querySelector('[type="checkbox"]').checked) {
        error.dataset.errorFor = `lora.${chosen.length}.scale`;
        chosen.push({ name: r.dataset.name, scale: numberOf(r.querySelector('[type="number"]').value) });
      } else {
        error.removeAttribute("data-error-for"); // cleared already: every send clears the errors first
      }
    }
    return chosen.length ? chosen : undefined;
  }

  box.querySelector(".lora-refresh").addEventListener("click", reload);
  return { show, reload, choice };
}

// One adapter: its switch, then its scale typed or slid (-4 to 4, the server's range). The scale is locked
// while the switch is off, as the seed is while Random is on, so the keyboard passes over unused adapters.
function row(name) {
  const r = document.createElement("div");
  r.className = "lora";
  r.dataset.name = name;
  const switchLabel = document.createElement("label");
  switchLabel.className = "check";
  const use = Object.assign(document.createElement("input"), { type: "checkbox" });
  switchLabel.append(use, ` ${name}`);
  const field = document.createElement("div");
  field.className = "field";
  const inputs = document.createElement("div");
  inputs.className = "inline";
  const scale = scaleInput("number", name);
  scale.inputMode = "decimal";
  const slider = scaleInput("range", name);
  const error = document.createElement("p");
  error.className = "error";
  inputs.append(scale, slider);
  field.append(inputs, error);
  r.append(switchLabel, field);
  use.addEventListener("change", () => (scale.disabled = slider.disabled = !use.checked));
  scale.addEventListener("input", () => (slider.value = scale.value)); // the slider clamps; the number goes as typed
  slider.addEventListener("input", () => (scale.value = slider.value));
  return r;
}

function scaleInput(type, name) {
  const input = Object.assign(document.createElement("input"), { type, min: "-4", max: "4", step: "0.05", value: "1" });
  input.disabled = true;
  input.setAttribute("aria-label", `Scale of ${name}`); // the roles tell the two apart: spin button, slider
  return input;
}
