// The chat playground: one conversation streamed from the gateway's data
// plane through the admin app's relay (POST /api/playground/chat, NDJSON).

import { api, token, setupLogin, notice, el, signOut } from "./common.js";

const MODEL_KEY = "ollamamq-fast.playground.model";
const WILDCARDS = new Set(["", "0.0.0.0", "::"]);

let history = []; // the conversation so far, as /api/chat messages
let controller = null; // aborts the reply being streamed
const identities = { user: "playground", key: "" }; // typed values, per kind

setupLogin(start);

function start(info) {
  showDataPlane(info);
  loadModels();
  const form = document.getElementById("chat-form");
  form.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  document.getElementById("message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      form.requestSubmit();
    }
  });
  document.getElementById("stop").addEventListener("click", () => controller?.abort());
  document.getElementById("reset").addEventListener("click", reset);
  document.getElementById("reload-models").addEventListener("click", loadModels);
  document.getElementById("model").addEventListener("change", (e) =>
    sessionStorage.setItem(MODEL_KEY, e.target.value));
  const kind = document.getElementById("identity-kind");
  const identity = document.getElementById("identity");
  kind.addEventListener("change", () => {
    identities[kind.value === "key" ? "user" : "key"] = identity.value;
    identity.value = identities[kind.value];
    // An API key is a secret: keep it off the screen like a password.
    identity.type = kind.value === "key" ? "password" : "text";
    identity.placeholder = kind.value === "key" ? "omq-…" : "user id";
  });
}

function showDataPlane(info) {
  const box = document.getElementById("data-plane");
  if (!info.data_plane_port) {
    box.textContent = "data plane port unknown (started on port 0): chat is unavailable";
    document.getElementById("send").disabled = true;
    return;
  }
  // A wildcard bind is reachable under the name this page was loaded from.
  let host = WILDCARDS.has(info.data_plane_host) ? location.hostname : info.data_plane_host;
  if (host.includes(":") && !host.startsWith("[")) host = `[${host}]`;
  box.textContent = `data plane: http://${host}:${info.data_plane_port}`;
}

async function loadModels() {
  const select = document.getElementById("model");
  let listing;
  try {
    listing = await api("GET", "/api/playground/models");
  } catch (err) {
    notice("Cannot list models: " + err.message, true);
    return;
  }
  const { models, loaded } = listing;
  const wanted = select.value || sessionStorage.getItem(MODEL_KEY);
  select.replaceChildren(...models.map((m) =>
    el("option", { value: m }, loaded.includes(m) ? `${m} (loaded)` : m)));
  // The last choice if still offered, else a loaded model (no load delay, and
  // not an embedding model), else the first.
  if (models.includes(wanted)) select.value = wanted;
  else if (loaded.length) select.value = loaded[0];
  if (!models.length) notice("No models: is a backend online?", true);
}

function reset() {
  controller?.abort();
  history = [];
  document.getElementById("conversation").replaceChildren(el("p", { class: "hint" }, "New conversation."));
}

function bubble(role, text) {
  const content = el("div", { class: "content" }, text);
  const node = el("article", { class: `msg ${role}`, "data-state": role === "user" ? "done" : "waiting" },
    el("h3", { class: "who" }, role === "user" ? "You" : "Assistant"), content, el("p", { class: "meta hint" }));
  const conversation = document.getElementById("conversation");
  conversation.querySelector(":scope > .hint")?.remove();
  conversation.append(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

function setBusy(busy) {
  document.getElementById("send").disabled = busy;
  document.getElementById("stop").disabled = !busy;
}

async function send() {
  const input = document.getElementById("message");
  const text = input.value.trim();
  const model = document.getElementById("model").value;
  if (!text || controller) return;
  if (!model) {
    notice("Pick a model first (none listed? reload the list).", true);
    return;
  }
  const kind = document.getElementById("identity-kind").value;
  const identity = document.getElementById("identity").value.trim();
  const system = document.getElementById("system").value.trim();
  input.value = "";
  history.push({ role: "user", content: text });
  bubble("user", text);
  const reply = bubble("assistant", "");
  const messages = system ? [{ role: "system", content: system }, ...history] : [...history];
  const body = { model, messages };
  if (identity) body[kind] = identity;

  controller = new AbortController();
  setBusy(true);
  try {
    const content = await stream(body, reply, controller.signal);
    history.push({ role: "assistant", content });
  } catch (err) {
    if (controller.signal.aborted) {
      reply.dataset.state = "stopped";
      reply.querySelector(".meta").textContent = "stopped";
      // Keep what arrived, so the conversation can go on from there.
      history.push({ role: "assistant", content: reply.querySelector(".content").textContent });
    } else {
      reply.dataset.state = "error";
      reply.querySelector(".content").textContent = err.message;
      history.pop(); // the question was not answered: it may be asked again
      input.value = input.value || text;
    }
  } finally {
    controller = null;
    setBusy(false);
  }
}

// Streams one reply into `reply`; resolves to its full text.
async function stream(body, reply, signal) {
  const started = performance.now();
  let response;
  try {
    response = await fetch("/api/playground/chat", {
      method: "POST",
      headers: { Authorization: "Bearer " + token(), "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal,
    });
  } catch (err) {
    if (signal.aborted) throw err;
    throw new Error("Cannot reach the admin API: " + err.message);
  }
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    if (response.status === 401 && !data.source) signOut("The gateway refused the admin token; sign in again.");
    const who = data.source === "data plane" ? "The gateway" : "The admin API";
    throw new Error(`${who} answered ${response.status}: ${data.error || response.statusText}`);
  }
  reply.dataset.state = "streaming";
  const content = reply.querySelector(".content");
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", text = "", thinking = "", firstAt = 0, last = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).trim();
      buffer = buffer.slice(newline + 1);
      if (!line) continue;
      const chunk = JSON.parse(line);
      if (chunk.error) throw new Error(chunk.error);
      const message = chunk.message || {};
      if (message.thinking) {
        thinking += message.thinking;
        showThinking(reply, thinking);
      }
      if (message.content) {
        if (!firstAt) firstAt = performance.now();
        text += message.content;
        content.textContent = text;
        reply.scrollIntoView({ block: "end" });
      }
      if (chunk.done) last = chunk;
    }
  }
  if (!last) throw new Error("The reply ended before it was complete.");
  reply.dataset.state = "done";
  reply.querySelector(".meta").textContent = summary(last, started, firstAt);
  return text;
}

function showThinking(reply, thinking) {
  let box = reply.querySelector(".thinking");
  if (!box) {
    box = el("details", { class: "thinking" }, el("summary", {}, "Thinking"), el("div"));
    reply.querySelector(".content").before(box);
  }
  box.lastElementChild.textContent = thinking;
}

// "24 tokens · 48.0 tokens/s · first token 130 ms · 0.62 s" from Ollama's final chunk.
function summary(last, started, firstAt) {
  const parts = [];
  if (last.eval_count !== undefined) parts.push(`${last.eval_count} tokens`);
  if (last.eval_count && last.eval_duration) {
    parts.push(`${(last.eval_count / (last.eval_duration / 1e9)).toFixed(1)} tokens/s`);
  }
  if (firstAt) parts.push(`first token ${Math.round(firstAt - started)} ms`);
  parts.push(`${((performance.now() - started) / 1000).toFixed(2)} s`);
  if (last.done_reason && last.done_reason !== "stop") parts.push(`ended: ${last.done_reason}`);
  return parts.join(" · ");
}
