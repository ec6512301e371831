// Entry point: load the model list, then show the panels the served models support.
import { api, askForKey } from "./api.js";
import { setupChat } from "./chat.js";
import { setupEdit } from "./edit.js";
import { startStatus } from "./status.js";
import { setupT2I } from "./t2i.js";

let loaded = false;
let loading = false;

async function loadModels() {
  if (loaded || loading) return;
  loading = true;
  const slot = document.querySelector('#t2i-form [data-error-for=""]');
  try {
    const { data: models } = await (await api("/v1/models")).json();
    slot.textContent = "";
    if (models.length) setupT2I(models);
    const editable = models.filter((m) => m.edits);
    if (editable.length) {
      setupEdit(editable);
      document.getElementById("edit").hidden = false;
    }
    const chatty = models.filter((m) => m.chat);
    if (chatty.length) {
      setupChat(chatty);
      document.getElementById("chat").hidden = false;
    }
    loaded = true;
    document.body.dataset.ready = "true"; // the page is wired up (tests wait on this)
  } catch (err) {
    slot.textContent = `Could not load the model list: ${err.message}`;
  } finally {
    loading = false;
  }
}

document.getElementById("key-button").addEventListener("click", async () => {
  if (await askForKey("Set or clear the API key for this tab.")) loadModels();
});
startStatus();
loadModels();
