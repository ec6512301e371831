// The status strip: polls GET /v1/status (readiness, queue depth, recent p50; for chat models the running
// and waiting sequences, the p50 time to first token and gap between tokens) while the tab is visible.
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
      const ms = (v) => (v === null ? "–" : `${v} ms`);
      models.textContent = Object.entries(s.models).map(([name, m]) => {
        const line = `${name}: queue ${m.queue_depth} · p50 ${ms(m.p50_ms)}`;
        const c = m.chat;
        const kv = c && c.kv_tokens ? ` · KV ${Math.round((100 * c.kv_tokens_used) / c.kv_tokens)}% of ` +
          `${c.kv_tokens.toLocaleString()} tokens` : "";
        return c ? `${line} · chat ${c.running}/${c.slots} running, ${c.waiting} waiting${kv} · first token ` +
          `${ms(c.first_token_p50_ms)} · token gap ${ms(c.token_gap_p50_ms)}` : line;
      }).join("  |  ");
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
