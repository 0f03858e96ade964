// The live dashboard: ticks and change events over SSE, users and latency
// quantiles polled, every admin action behind the token.

import { api, token, setupLogin, notice, el, formatNumber, formatSeconds, formatDuration } from "./common.js";
import { TimeChart } from "./charts.js";

// /api/users and /api/stats are not on the event stream; every 2 s is live
// enough to watch a queue and costs the gateway one pass over its users.
const POLL_MS = 2000;
// Rows beyond this would make every refresh slow on a gateway with thousands
// of users; the filter narrows the list instead.
const USERS_SHOWN = 200;
const EVENT_LOG_SIZE = 50;
const RECONNECT_MS = 3000;
// Event names of the operator bus (operator.py, gateway.py); EventSource only
// delivers named events that have a listener.
const CHANGE_EVENTS = [
  "backend_added", "backend_removed", "backend_changed", "user_changed", "user_blocked",
  "user_unblocked", "user_limits_changed", "ip_blocked", "ip_unblocked", "key_created",
  "key_revoked", "state_reloaded", "config_reloaded", "pool_added", "pool_changed",
  "pool_removed", "pool_access_changed", "pull_done", "pull_failed", "pull_retrying",
  "model_removed",
];
// Which views each change event makes stale.
const REFRESHES = {
  backend: ["backends"], user: ["users"], ip: ["blocked"], key: ["keys"],
  state: ["backends", "users", "blocked", "keys"], config: ["backends", "users", "pools"],
  pool: ["pools", "backends"], pull: ["pools"], model: ["backends"],
};

let charts = null;
let users = [];
let usersTotal = 0; // all users the gateway knows (the page may hold fewer)
let pollTimer = 0;
const stale = new Set();
let staleTimer = 0;

setupLogin(start);

function start() {
  const style = (series) => series.map(([label, color]) => ({ label, color }));
  charts = {
    rps: new TimeChart(document.getElementById("chart-rps"), style([["completed", "--series-1"]])),
    tps: new TimeChart(document.getElementById("chart-tps"), style([["generated", "--series-2"]])),
    queue: new TimeChart(document.getElementById("chart-queue"),
      style([["queued", "--series-3"], ["in flight", "--series-1"]])),
  };
  wireForms();
  for (const view of ["backends", "users", "blocked", "keys", "stats", "pools"]) stale.add(view);
  refreshStale();
  connectEvents();
  pollTimer = setInterval(poll, POLL_MS);
  // A hidden tab stops polling; the event stream alone is cheap.
  document.addEventListener("visibilitychange", () => {
    clearInterval(pollTimer);
    if (!document.hidden) {
      poll();
      pollTimer = setInterval(poll, POLL_MS);
    }
  });
}

// -- Live data ------------------------------------------------------------------

function connectEvents() {
  const source = new EventSource("/api/events?token=" + encodeURIComponent(token()));
  source.addEventListener("open", () => setLive(true));
  source.addEventListener("error", () => {
    setLive(false);
    if (source.readyState !== EventSource.CLOSED) return; // the browser retries by itself
    // The browser gives up after a non-200 answer (the token changed, the
    // gateway restarted without its control plane): check the token (a 401
    // signs out), then reconnect.
    source.close();
    setTimeout(() => api("GET", "/api/info").catch(() => {}).finally(connectEvents), RECONNECT_MS);
  });
  source.addEventListener("tick", (e) => onTick(JSON.parse(e.data)));
  for (const kind of CHANGE_EVENTS) {
    source.addEventListener(kind, (e) => onChange(JSON.parse(e.data)));
  }
}

function setLive(on) {
  const status = document.getElementById("live-status");
  status.textContent = on ? "live" : "reconnecting…";
  status.classList.toggle("off", !on);
}

function onTick(tick) {
  setText("tile-queued", formatNumber(tick.queued));
  setText("tile-in-flight", formatNumber(tick.in_flight));
  setText("tile-rps", formatNumber(tick.requests_per_s));
  setText("tile-tps", formatNumber(tick.tokens_per_s));
  charts.rps.push(tick.ts, [tick.requests_per_s]);
  charts.tps.push(tick.ts, [tick.tokens_per_s]);
  charts.queue.push(tick.ts, [tick.queued, tick.in_flight]);
  renderBackends(tick.backends);
  if (tick.pulls) renderPulls(tick.pulls);
  if (tick.pools) updatePoolNumbers(tick.pools);
}

function onChange(event) {
  logEvent(event);
  const prefix = event.type.split("_")[0];
  for (const view of REFRESHES[prefix] || []) markStale(view);
  if (event.type === "user_blocked" || event.type === "user_unblocked") markStale("blocked");
}

function markStale(view) {
  stale.add(view);
  // One refresh for a burst of events (a reload announces several changes).
  clearTimeout(staleTimer);
  staleTimer = setTimeout(refreshStale, 50);
}

const LOADERS = {
  backends: async () => {
    const answer = await api("GET", "/api/backends");
    renderBackends(answer.backends);
    renderRemovedBackends(answer.removed || []);
  },
  // The busiest first: beyond one page (1000) the quiet users are the ones left out.
  users: async () => {
    const page = await api("GET", "/api/users?sort=active");
    users = page.users; usersTotal = page.total ?? page.users.length; renderUsers();
  },
  blocked: async () => renderBlocked(await api("GET", "/api/blocked")),
  keys: async () => renderKeys((await api("GET", "/api/keys")).keys),
  stats: async () => renderStats(await api("GET", "/api/stats")),
  pools: async () => {
    const answer = await api("GET", "/api/pools");
    renderPools(answer.pools);
    renderPulls(answer.pools.flatMap((p) => p.pulls || []));
  },
};

async function refreshStale() {
  const views = [...stale];
  stale.clear();
  const results = await Promise.allSettled(views.map((view) => LOADERS[view]()));
  const failed = results.find((r) => r.status === "rejected");
  if (failed) notice("Refresh failed: " + failed.reason.message, true);
}

function poll() {
  stale.add("users");
  stale.add("stats");
  refreshStale();
}

// -- Rendering ------------------------------------------------------------------

function setText(id, text) {
  document.getElementById(id).textContent = text;
}

// Reuses the row of each key so inputs keep focus and open <details> stay
// open across refreshes; moves a row only when its position changed.
function syncRows(tbody, items, keyOf, create, update) {
  const existing = new Map([...tbody.rows].map((row) => [row.dataset.key, row]));
  items.forEach((item, i) => {
    const key = keyOf(item);
    let row = existing.get(key);
    if (row) existing.delete(key);
    else { row = create(item); row.dataset.key = key; }
    update(row, item);
    if (tbody.rows[i] !== row) tbody.insertBefore(row, tbody.rows[i] || null);
  });
  for (const row of existing.values()) row.remove();
}

function renderStats(stats) {
  setText("tile-completed", formatNumber(stats.completed));
  setText("tile-rejected", formatNumber(stats.rejected));
  setText("tile-latency-p50", formatSeconds(stats.latency_p50_s));
  setText("tile-latency-p99", formatSeconds(stats.latency_p99_s));
  setText("tile-ttfb", formatSeconds(stats.ttfb_p50_s));
  setText("tile-wait", formatSeconds(stats.queue_wait_p99_s));
  setText("tile-uptime", formatDuration(stats.uptime_s));
  if (!charts.rps.samples.length) {
    setText("tile-queued", formatNumber(stats.queued));
    setText("tile-in-flight", formatNumber(stats.in_flight));
  }
}

function backendState(b) {
  if (!b.online) return ["offline", "bad"];
  if (b.draining) return ["draining", "warn"];
  if (b.breaker === "open") return ["breaker open", "bad"];
  if (b.breaker === "half-open") return ["breaker half-open", "warn"];
  return ["online", "good"];
}

function renderBackends(backends) {
  syncRows(document.querySelector("#backends-table tbody"), backends, (b) => b.url,
    createBackendRow, updateBackendRow);
}

// -- Pools and model pulls --------------------------------------------------------

function renderPools(pools) {
  syncRows(document.querySelector("#pools-table tbody"), pools, (p) => p.name,
    () => el("tr", {}, el("td", { class: "mono name" }), el("td", { class: "num up" }),
      el("td", { class: "num slots" }), el("td", { class: "num queued" }), el("td", { class: "hosts" }),
      el("td", { class: "aliases" }), el("td", { class: "required" })),
    (row, p) => {
      row.dataset.pool = p.name;
      row.querySelector(".name").textContent = p.name;
      row.querySelector(".up").textContent = `${p.backends_online} / ${p.backends_total}`;
      row.querySelector(".slots").textContent = `${p.in_flight} / ${p.slots_total}`;
      row.querySelector(".queued").textContent = formatNumber(p.queued);
      row.querySelector(".hosts").textContent = (p.hosts || []).join(", ");
      row.querySelector(".aliases").textContent =
        Object.entries(p.aliases || {}).map(([a, m]) => `${a} → ${m}`).join(", ");
      row.querySelector(".required").textContent = (p.required_models || []).join(", ");
    });
}

// Live numbers from the tick, between full refreshes of the pool list.
function updatePoolNumbers(totals) {
  for (const row of document.querySelectorAll("#pools-table tbody tr")) {
    const t = totals[row.dataset.pool];
    if (!t) continue;
    row.querySelector(".up").textContent = `${t.backends_online} / ${t.backends_total}`;
    row.querySelector(".slots").textContent = `${t.in_flight} / ${t.slots}`;
    row.querySelector(".queued").textContent = formatNumber(t.queued);
  }
}

function renderPulls(pulls) {
  document.getElementById("pulls-empty").hidden = pulls.length > 0;
  syncRows(document.querySelector("#pulls-table tbody"), pulls, (j) => `${j.backend} ${j.model}`,
    () => el("tr", {}, el("td", { class: "mono backend" }), el("td", { class: "mono model" }),
      el("td", { class: "state" }), el("td", {}, el("progress", { max: "100" }), el("span", { class: "hint status" })),
      el("td", { class: "num tries" }), el("td", { class: "error" })),
    (row, j) => {
      row.querySelector(".backend").textContent = j.backend;
      row.querySelector(".model").textContent = j.model;
      row.querySelector(".state").textContent = j.state;
      const bar = row.querySelector("progress");
      if (j.percent === null) bar.removeAttribute("value"); else bar.value = j.percent;
      bar.setAttribute("aria-label", `${j.model} on ${j.backend}: ${j.percent ?? 0}%`);
      row.querySelector(".status").textContent = ` ${j.status}`;
      row.querySelector(".tries").textContent = j.attempts;
      row.querySelector(".error").textContent = j.error;
    });
}

// Configured backends removed at runtime: the removal is an override that
// survives restarts; re-adding the URL (or DELETE /api/backends/override) undoes it.
function renderRemovedBackends(urls) {
  const p = document.getElementById("backends-removed");
  p.hidden = urls.length === 0;
  p.textContent = urls.length ? `Configured but removed at runtime (override): ${urls.join(", ")}` : "";
}

function backendOrigin(b) {
  if (b.source === "runtime") return "added at runtime";
  if (b.override && b.override.slots !== undefined) {
    return `slots override (configured: ${b.configured_slots})`;
  }
  return "";
}

function createBackendRow(b) {
  const url = b.url;
  const slots = el("input", { type: "number", min: "1", class: "narrow", "aria-label": `Slots for ${url}` });
  const row = el("tr", { "data-backend": url },
    el("td", { class: "mono" }, url, el("div", { class: "hint origin" }), el("div", { class: "hint last-error" })),
    el("td", { class: "kind" }),
    el("td", {}, el("span", { class: "badge state" })),
    el("td", { class: "num slots" }),
    el("td", { class: "num done" }),
    el("td", { class: "num failures" }),
    el("td", { class: "models" }, el("details", {}, el("summary"), el("ul", { class: "model-list" }))),
    el("td", { class: "actions" },
      el("button", { type: "button", "data-action": "drain", onclick: () => toggleDrain(row) }),
      slots,
      el("button", { type: "button", "data-action": "slots", onclick: () => setSlots(url, slots) }, "Set slots"),
      el("button", { type: "button", class: "danger", "data-action": "remove", onclick: () => removeBackend(url) }, "Remove")));
  return row;
}

function updateBackendRow(row, b) {
  const [label, tone] = backendState(b);
  const badge = row.querySelector(".state");
  badge.textContent = label;
  badge.className = "badge state " + tone;
  row.querySelector(".kind").textContent = b.kind;
  row.querySelector(".last-error").textContent = b.online ? "" : b.last_error || "";
  row.querySelector(".slots").textContent = `${b.in_flight} / ${b.slots}`;
  if (b.source !== undefined) row.querySelector(".origin").textContent = backendOrigin(b);
  row.querySelector(".done").textContent = formatNumber(b.requests_done);
  row.querySelector(".failures").textContent = formatNumber(b.failures);
  row.dataset.draining = b.draining;
  const drain = row.querySelector('[data-action="drain"]');
  drain.textContent = b.draining ? "Undrain" : "Drain";
  drain.setAttribute("aria-label", `${b.draining ? "Undrain" : "Drain"} ${b.url}`);
  const slots = row.querySelector('input[type="number"]');
  if (document.activeElement !== slots) slots.value = b.slots;
  const signature = JSON.stringify([b.models, b.loaded]);
  if (row.dataset.models !== signature) {
    row.dataset.models = signature;
    const loaded = new Set(b.loaded);
    row.querySelector("summary").textContent =
      `${b.models.length} model${b.models.length === 1 ? "" : "s"}, ${b.loaded.length} loaded`;
    row.querySelector(".model-list").replaceChildren(...b.models.map((m) =>
      el("li", { class: loaded.has(m) ? "loaded" : "" }, m)));
  }
}

function matchesFilter(u, filter) {
  return !filter || u.user.toLowerCase().includes(filter) || (u.last_ip || "").includes(filter);
}

function renderUsers() {
  const filter = document.getElementById("user-filter").value.trim().toLowerCase();
  let shown = users.filter((u) => matchesFilter(u, filter));
  const total = shown.length;
  if (total > USERS_SHOWN) {
    // The busiest and most recently seen first, then shown in name order so
    // rows do not jump under the pointer.
    shown = [...shown].sort((a, b) => (b.queued + b.in_flight) - (a.queued + a.in_flight)
      || (b.last_seen || 0) - (a.last_seen || 0)).slice(0, USERS_SHOWN);
    shown.sort((a, b) => a.user.localeCompare(b.user));
  }
  const known = filter ? total : Math.max(total, usersTotal);
  setText("user-count", known > Math.min(total, USERS_SHOWN)
    ? `showing ${Math.min(total, USERS_SHOWN)} of ${known}: filter to narrow`
    : `${known} user${known === 1 ? "" : "s"}`);
  syncRows(document.querySelector("#users-table tbody"), shown, (u) => u.user, createUserRow, updateUserRow);
}

function createUserRow(u) {
  const user = u.user;
  const weight = el("input", { type: "number", min: "1", class: "narrow", "aria-label": `Weight for ${user}` });
  const row = el("tr", { "data-user": user },
    el("td", { class: "mono user" }, user),
    el("td", { class: "mono ip" }),
    el("td", { class: "num queued" }),
    el("td", { class: "num in-flight" }),
    el("td", { class: "num done" }),
    el("td", { class: "num dropped" }),
    el("td", { class: "num rejected" }),
    el("td", { class: "num tokens" }),
    el("td", { class: "markers" }),
    el("td", { class: "actions" },
      el("button", { type: "button", class: "toggle", "data-action": "vip", "aria-label": `VIP for ${user}`,
        onclick: () => toggleUser(row, "vip") }, "VIP"),
      el("button", { type: "button", class: "toggle", "data-action": "boost", "aria-label": `Boost for ${user}`,
        onclick: () => toggleUser(row, "boost") }, "Boost"),
      weight,
      el("button", { type: "button", "data-action": "weight", onclick: () => setWeight(user, weight) }, "Set weight"),
      el("button", { type: "button", "data-action": "block", onclick: () => toggleBlock(row) }),
      el("button", { type: "button", "data-action": "block-ip", onclick: () => blockUserIp(row) }, "Block IP"),
      el("button", { type: "button", "data-action": "limits", onclick: () => openLimits(user) }, "Limits")));
  weight.addEventListener("keydown", (e) => { if (e.key === "Enter") setWeight(user, weight); });
  return row;
}

function updateUserRow(row, u) {
  const cell = (cls, text) => { row.querySelector("." + cls).textContent = text; };
  cell("ip", u.last_ip || "–");
  cell("queued", formatNumber(u.queued ?? 0));
  cell("in-flight", formatNumber(u.in_flight ?? 0));
  cell("done", formatNumber(u.done ?? 0));
  cell("dropped", formatNumber(u.dropped ?? 0));
  cell("rejected", formatNumber(u.rejected ?? 0));
  cell("tokens", `${formatNumber(u.prompt_tokens ?? 0)} / ${formatNumber(u.completion_tokens ?? 0)}`);
  const markers = [];
  if (u.vip) markers.push(el("span", { class: "badge vip" }, "VIP"));
  if (u.boost) markers.push(el("span", { class: "badge boost" }, "Boost"));
  if (u.weight !== 1) markers.push(el("span", { class: "badge", title: "fair-share weight" }, `×${u.weight}`));
  if (u.blocked) markers.push(el("span", { class: "badge bad" }, "blocked"));
  row.querySelector(".markers").replaceChildren(...markers);
  row.dataset.vip = u.vip;
  row.dataset.boost = u.boost;
  row.dataset.blocked = u.blocked;
  row.dataset.ip = u.last_ip || "";
  for (const flag of ["vip", "boost"]) {
    row.querySelector(`[data-action="${flag}"]`).setAttribute("aria-pressed", String(u[flag]));
  }
  const block = row.querySelector('[data-action="block"]');
  block.textContent = u.blocked ? "Unblock" : "Block";
  block.setAttribute("aria-label", `${u.blocked ? "Unblock" : "Block"} ${u.user}`);
  row.querySelector('[data-action="block-ip"]').disabled = !u.last_ip;
  const weight = row.querySelector('input[type="number"]');
  if (document.activeElement !== weight) weight.value = u.weight;
}

function renderBlocked(blocked) {
  const chip = (text, label, action) => el("li", {}, el("span", { class: "mono" }, text),
    el("button", { type: "button", class: "quiet", "aria-label": label, onclick: action }, "Unblock"));
  document.getElementById("blocked-users").replaceChildren(...(blocked.users.length
    ? blocked.users.map((u) => chip(u, `Unblock user ${u}`, () => act(`User ${u} unblocked`,
      () => api("POST", `/api/users/${encodeURIComponent(u)}/unblock`), "blocked", "users")))
    : [el("li", { class: "hint" }, "none")]));
  document.getElementById("blocked-ips").replaceChildren(...(blocked.ips.length
    ? blocked.ips.map((ip) => chip(ip, `Unblock ${ip}`, () => act(`${ip} unblocked`,
      () => api("DELETE", "/api/blocked/ips?ip=" + encodeURIComponent(ip)), "blocked")))
    : [el("li", { class: "hint" }, "none")]));
}

function renderKeys(keys) {
  const sorted = [...keys].sort((a, b) => b.created_at - a.created_at);
  syncRows(document.querySelector("#keys-table tbody"), sorted, (k) => k.key_id, (k) => {
    return el("tr", { "data-key": k.key_id },
      el("td", { class: "mono" }, k.key_id),
      el("td", { class: "mono" }, k.user),
      el("td", {}, k.name || "–"),
      el("td", {}, new Date(k.created_at * 1000).toLocaleString()),
      el("td", { class: "status" }),
      el("td", {}, el("button", { type: "button", class: "danger", "data-action": "revoke",
        "aria-label": `Revoke key ${k.key_id}`, onclick: () => revokeKey(k.key_id) }, "Revoke")));
  }, (row, k) => {
    row.querySelector(".status").textContent = (k.revoked ? "revoked" : "active") + (k.trusted ? ", trusted" : "");
    row.querySelector('[data-action="revoke"]').disabled = k.revoked;
  });
}

function describe(ev) {
  switch (ev.type) {
    case "backend_added": return `backend ${ev.backend.url} added`;
    case "backend_removed": return `backend ${ev.url} removed`;
    case "backend_changed":
      return `backend ${ev.backend.url}: ${ev.backend.draining ? "draining" : "taking requests"}, ${ev.backend.slots} slots`;
    case "user_changed":
      return `user ${ev.user.user}: VIP ${ev.user.vip ? "on" : "off"}, Boost ${ev.user.boost ? "on" : "off"}, weight ${ev.user.weight}`;
    case "user_blocked": return `user ${ev.user} blocked`;
    case "user_unblocked": return `user ${ev.user} unblocked`;
    case "user_limits_changed": return `limits of ${ev.user} changed`;
    case "ip_blocked": return `${ev.ip} blocked`;
    case "ip_unblocked": return `${ev.ip} unblocked`;
    case "key_created": return `key ${ev.key_id} created for ${ev.user}`;
    case "key_revoked": return `key ${ev.key_id} revoked`;
    case "state_reloaded": return `${ev.topic} changed on another replica`;
    case "config_reloaded": return "configuration file reloaded";
    case "pool_added": return `pool ${ev.pool.name} added`;
    case "pool_changed": return `pool ${ev.pool.name} changed`;
    case "pool_removed": return `pool ${ev.pool} removed`;
    case "pool_access_changed": return `pool access of ${ev.user || ev.key} changed`;
    case "pull_done": return `${ev.model} pulled on ${ev.backend}`;
    case "pull_failed": return `pull of ${ev.model} on ${ev.backend} failed: ${ev.error}`;
    case "pull_retrying": return `pull of ${ev.model} on ${ev.backend} failed (try ${ev.attempts}), retrying`;
    case "model_removed": return `${ev.model} removed from ${ev.backend}`;
    default: return ev.type;
  }
}

function logEvent(ev) {
  const log = document.getElementById("event-log");
  const time = new Date(ev.ts * 1000).toLocaleTimeString();
  log.prepend(el("li", {}, el("time", { datetime: new Date(ev.ts * 1000).toISOString() }, time), " ", describe(ev)));
  while (log.children.length > EVENT_LOG_SIZE) log.lastElementChild.remove();
}

// -- Actions --------------------------------------------------------------------

// Runs one admin call, reports the outcome, and refreshes the views it changes
// at once (the change event follows, but the click should show without delay).
async function act(done, call, ...views) {
  try {
    const result = await call();
    if (done) notice(typeof done === "function" ? done(result) : done);
    for (const view of views) markStale(view);
    return result;
  } catch (err) {
    notice(err.message, true);
    return null;
  }
}

function toggleUser(row, flag) {
  const user = row.dataset.key;
  const on = row.dataset[flag] !== "true";
  act(`${flag === "vip" ? "VIP" : "Boost"} ${on ? "on" : "off"} for ${user}`,
    () => api("PATCH", `/api/users/${encodeURIComponent(user)}`, { [flag]: on }), "users");
}

function setWeight(user, input) {
  const weight = Number(input.value);
  if (!Number.isInteger(weight) || weight < 1) {
    notice("The weight is a whole number of at least 1.", true);
    return;
  }
  act(`Weight ${weight} for ${user}`,
    () => api("PATCH", `/api/users/${encodeURIComponent(user)}`, { weight }), "users");
}

function toggleBlock(row) {
  const user = row.dataset.key;
  const block = row.dataset.blocked !== "true";
  act(`User ${user} ${block ? "blocked" : "unblocked"}`,
    () => api("POST", `/api/users/${encodeURIComponent(user)}/${block ? "block" : "unblock"}`),
    "users", "blocked");
}

function blockUserIp(row) {
  const ip = row.dataset.ip;
  if (!ip || !confirm(`Block every request from ${ip}?`)) return;
  act(`${ip} blocked`, () => api("POST", "/api/blocked/ips", { ip }), "blocked");
}

function toggleDrain(row) {
  const url = row.dataset.key;
  const drain = row.dataset.draining !== "true";
  act(`${url} ${drain ? "draining" : "takes requests again"}`,
    () => api("POST", `/api/backends/${drain ? "drain" : "undrain"}`, { url }), "backends");
}

function setSlots(url, input) {
  const slots = Number(input.value);
  if (!Number.isInteger(slots) || slots < 1) {
    notice("Slots are a whole number of at least 1.", true);
    return;
  }
  act(`${url}: ${slots} slots`, () => api("PATCH", "/api/backends", { url, slots }), "backends");
}

function removeBackend(url) {
  if (!confirm(`Remove ${url}? Requests running on it finish; no new ones go there.`)) return;
  act(`${url} removed`, () => api("DELETE", "/api/backends?url=" + encodeURIComponent(url)), "backends");
}

function revokeKey(keyId) {
  if (!confirm(`Revoke key ${keyId}? Requests with it get 401 from now on.`)) return;
  act(`Key ${keyId} revoked`, () => api("DELETE", `/api/keys/${encodeURIComponent(keyId)}`), "keys");
}

function wireForms() {
  document.getElementById("user-filter").addEventListener("input", renderUsers);

  document.getElementById("add-backend").addEventListener("submit", async (e) => {
    e.preventDefault();
    const url = document.getElementById("backend-url");
    const slots = document.getElementById("backend-slots");
    const body = { url: url.value.trim() };
    if (slots.value) body.slots = Number(slots.value);
    if (await act((b) => `${b.url} added; it takes traffic after its first health probe`,
      () => api("POST", "/api/backends", body), "backends")) {
      url.value = slots.value = "";
    }
  });

  document.getElementById("block-ip").addEventListener("submit", async (e) => {
    e.preventDefault();
    const input = document.getElementById("block-ip-input");
    const ip = input.value.trim();
    if (await act(`${ip} blocked`, () => api("POST", "/api/blocked/ips", { ip }), "blocked")) input.value = "";
  });

  document.getElementById("create-key").addEventListener("submit", async (e) => {
    e.preventDefault();
    const body = {
      user: document.getElementById("key-user").value.trim(),
      name: document.getElementById("key-name").value.trim(),
      trusted: document.getElementById("key-trusted").checked,
    };
    const key = await act(null, () => api("POST", "/api/keys", body), "keys");
    if (!key) return;
    setText("key-secret-user", key.user);
    setText("key-secret-value", key.secret);
    document.getElementById("key-secret").hidden = false;
    e.target.reset();
  });
  document.getElementById("key-secret-copy").addEventListener("click", copySecret);
  document.getElementById("key-secret-close").addEventListener("click", () => {
    // The secret leaves the page once dismissed: nothing to find later.
    setText("key-secret-value", "");
    document.getElementById("key-secret").hidden = true;
  });

  document.getElementById("limits-form").addEventListener("submit", saveLimits);
  document.getElementById("limits-cancel").addEventListener("click", () =>
    document.getElementById("limits-dialog").close());
}

async function copySecret() {
  const code = document.getElementById("key-secret-value");
  try {
    await navigator.clipboard.writeText(code.textContent);
    notice("Key copied to the clipboard.");
  } catch {
    // The clipboard API needs a secure context (https or localhost): select
    // the text instead so Ctrl+C copies it.
    const range = document.createRange();
    range.selectNodeContents(code);
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    notice("Selected: press Ctrl+C to copy.");
  }
}

// -- Limits dialog ----------------------------------------------------------------

let limitsUser = null;
let limitsOverrides = {};

async function openLimits(user) {
  let data;
  try {
    data = await api("GET", `/api/users/${encodeURIComponent(user)}/limits`);
  } catch (err) {
    notice(err.message, true);
    return;
  }
  limitsUser = user;
  limitsOverrides = data.overrides;
  setText("limits-title", `Limits for ${user}`);
  document.getElementById("limits-error").hidden = true;
  const fields = Object.entries(data.effective).map(([name, effective]) => {
    const id = "limit-" + name;
    const current = data.overrides[name];
    const input = name === "max_tokens_mode"
      ? el("select", { id, name },
        el("option", { value: "" }, "(default)"),
        el("option", { value: "clamp" }, "clamp"),
        el("option", { value: "reject" }, "reject"))
      : el("input", { id, name, type: "number", min: "0", step: "any", placeholder: "default" });
    input.value = current === undefined ? "" : String(current);
    return [el("label", { for: id }, name.replaceAll("_", " ")), input,
      el("span", { class: "hint" }, `in effect: ${effective}`)];
  });
  document.getElementById("limits-fields").replaceChildren(...fields.flat());
  document.getElementById("limits-dialog").showModal();
}

async function saveLimits(e) {
  e.preventDefault();
  const patch = {};
  for (const input of document.querySelectorAll("#limits-fields [name]")) {
    const value = input.value.trim();
    const old = limitsOverrides[input.name];
    if (value === "") {
      if (old !== undefined) patch[input.name] = null;
    } else {
      const parsed = input.name === "max_tokens_mode" ? value : Number(value);
      if (parsed !== old) patch[input.name] = parsed;
    }
  }
  if (Object.keys(patch).length) {
    try {
      await api("PATCH", `/api/users/${encodeURIComponent(limitsUser)}/limits`, patch);
    } catch (err) {
      const box = document.getElementById("limits-error");
      box.textContent = err.message;
      box.hidden = false;
      return;
    }
    notice(`Limits of ${limitsUser} saved`);
  }
  document.getElementById("limits-dialog").close();
}
