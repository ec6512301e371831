// The status strip: polls GET /v1/status (readiness, queue depth, recent p50) while the tab is visible.
import { api } from "./api.js";

const EVERY_MS = 3000;

export function startStatus() {
  const dot = document.querySelector("#status .dot");
  const text = document.getElementById("status-text");
  const models = document.getElementById("status-models");

  async function poll() {
    if (document.hidden) return;
    try {
      const s = await (await api("/v1/status", { quiet: true })).json();
      dot.dataset.state = s.healthy ? s.status : "unhealthy";
      text.textContent = s.healthy ? s.status : `${s.status}, unhealthy`;
      models.textContent = Object.entries(s.models).map(([name, m]) =>
        `${name}: queue ${m.queue_depth} · p50 ${m.p50_ms === null ? "–" : `${m.p50_ms} ms`}`).join("  |  ");
      models.title = `p50 over the last ${Math.round(s.window_s)} s`;
    } catch (err) {
      dot.dataset.state = "down";
      text.textContent = err.status === 401 ? "API key needed" : "unreachable";
      models.textContent = "";
    }
  }
  poll();
  setInterval(poll, EVERY_MS);
  document.addEventListener("visibilitychange", poll);
  window.addEventListener("apikeychange", poll);
}
