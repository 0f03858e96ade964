// The usage page: stored token usage per user, model, key or backend over
// days (GET /api/usage), as a stacked bar chart and a table, with a CSV export.

import { api, token, setupLogin, notice, el, formatNumber } from "./common.js";

const DAY_MS = 86400000;
const DEFAULT_DAYS = 14;
// Groups drawn in their own colour; the rest are summed as "other".
const GROUPS_DRAWN = 6;
const COLORS = ["--series-1", "--series-2", "--series-3", "--series-4", "--series-5",
                "--series-6"];
const HEADINGS = { user: "User", model: "Model", key: "API key", backend: "Backend" };
const PAD = { left: 48, right: 8, top: 8, bottom: 34 };

let lastReport = null;

setupLogin(start);

function start() {
  const today = new Date();
  document.getElementById("usage-to").value = isoDay(today);
  document.getElementById("usage-from").value = isoDay(new Date(today - (DEFAULT_DAYS - 1) * DAY_MS));
  document.getElementById("usage-form").addEventListener("submit", (event) => {
    event.preventDefault();
    load();
  });
  for (const id of ["usage-by", "usage-step"]) {
    document.getElementById(id).addEventListener("change", load);
  }
  document.getElementById("usage-csv").addEventListener("click", downloadCsv);
  new ResizeObserver(() => draw()).observe(document.getElementById("usage-chart"));
  load();
}

function isoDay(date) {
  return date.toISOString().slice(0, 10);
}

function query(extra = {}) {
  const params = new URLSearchParams({
    from: document.getElementById("usage-from").value,
    to: document.getElementById("usage-to").value,
    by: document.getElementById("usage-by").value,
    step: document.getElementById("usage-step").value,
    ...extra,
  });
  return "/api/usage?" + params;
}

async function load() {
  try {
    lastReport = await api("GET", query());
  } catch (err) {
    notice("Usage: " + err.message, true);
    return;
  }
  render(lastReport);
  draw();
}

// The CSV needs the token header, so it is fetched and handed to the browser as a file.
async function downloadCsv() {
  const response = await fetch(query({ format: "csv" }),
                               { headers: { Authorization: "Bearer " + token() } });
  if (!response.ok) {
    notice(`CSV export: HTTP ${response.status}`, true);
    return;
  }
  const url = URL.createObjectURL(await response.blob());
  const link = el("a", { href: url, download: `usage-${document.getElementById("usage-from").value}.csv` });
  document.body.append(link);
  link.click();
  link.remove();
  URL.revokeObjectURL(url);
}

function render(report) {
  const dim = report.by[0];
  document.getElementById("usage-group-heading").textContent = HEADINGS[dim] || dim;
  const body = document.querySelector("#usage-table tbody");
  body.replaceChildren();
  for (const r of report.rows) {
    const name = r[dim] === "" ? "(none)" : r[dim];
    body.append(el("tr", { "data-period": r.period, "data-group": r[dim] },
      el("td", { class: "mono", text: r.period }),
      el("td", { text: name }),
      el("td", { class: "num", text: formatNumber(r.requests) }),
      el("td", { class: "num", text: formatNumber(r.errors) }),
      el("td", { class: "num", text: formatNumber(r.cancelled) }),
      el("td", { class: "num", text: formatNumber(r.prompt_tokens) }),
      el("td", { class: "num", text: formatNumber(r.completion_tokens) }),
      el("td", { class: "num total", text: formatNumber(r.total_tokens) }),
      el("td", { class: r.exact ? "" : "warn",
                 text: r.exact ? "exact" : `~ ${formatNumber(r.estimated_tokens)} estimated` })));
  }
  if (!report.rows.length) {
    body.append(el("tr", {}, el("td", { colspan: "9", class: "hint",
                                        text: "No usage in this range." })));
  }
  const t = report.totals;
  document.getElementById("usage-summary").textContent =
    `${formatNumber(t.requests)} requests, ${formatNumber(t.total_tokens)} tokens` +
    (t.exact ? "" : ` (${formatNumber(t.estimated_tokens)} estimated)`);
}

// Stacked bars: one bar per period, one segment per group (the biggest groups
// in their own colour, the rest as "other").
function draw() {
  const canvas = document.getElementById("usage-chart");
  const report = lastReport;
  if (!report) return;
  const dim = report.by[0];
  const totals = new Map();
  for (const r of report.rows) totals.set(r[dim], (totals.get(r[dim]) || 0) + r.total_tokens);
  const top = [...totals.entries()].sort((a, b) => b[1] - a[1]).slice(0, GROUPS_DRAWN)
    .map(([name]) => name);
  const periods = allPeriods(report);
  const stacks = new Map(periods.map((p) => [p, new Array(top.length + 1).fill(0)]));
  for (const r of report.rows) {
    const i = top.indexOf(r[dim]);
    const stack = stacks.get(r.period);
    if (stack) stack[i < 0 ? top.length : i] += r.total_tokens;
  }
  legend(top, totals.size > top.length);

  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (!width || !height) return;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const style = getComputedStyle(canvas);
  ctx.font = "11px system-ui, sans-serif";
  const plotW = width - PAD.left - PAD.right, plotH = height - PAD.top - PAD.bottom;
  let max = 0;
  for (const values of stacks.values()) max = Math.max(max, values.reduce((a, b) => a + b, 0));
  const ceiling = niceCeil(max / 4) * 4;
  const y = (v) => PAD.top + plotH * (1 - v / ceiling);
  ctx.strokeStyle = style.getPropertyValue("--chart-grid").trim() || "#ddd";
  ctx.fillStyle = style.getPropertyValue("--chart-text").trim() || "#666";
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const v = (ceiling * i) / 4, py = Math.round(y(v)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(PAD.left, py);
    ctx.lineTo(width - PAD.right, py);
    ctx.stroke();
    ctx.fillText(formatNumber(v), PAD.left - 6, py);
  }
  const slot = plotW / Math.max(periods.length, 1);
  const barW = Math.max(2, Math.min(48, slot * 0.7));
  const labelEvery = Math.ceil(periods.length / Math.max(1, Math.floor(plotW / 70)));
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  periods.forEach((period, k) => {
    const x = PAD.left + slot * k + (slot - barW) / 2;
    let base = 0;
    stacks.get(period).forEach((v, i) => {
      if (!v) return;
      const color = i < top.length ? COLORS[i] : "--series-other";
      ctx.fillStyle = style.getPropertyValue(color).trim() || "#888";
      ctx.fillRect(x, y(base + v), barW, y(base) - y(base + v));
      base += v;
    });
    if (k % labelEvery === 0) {
      ctx.fillStyle = style.getPropertyValue("--chart-text").trim() || "#666";
      ctx.fillText(period.length > 10 ? period.slice(5).replace("T", " ") + "h" : period.slice(5),
                   x + barW / 2, height - PAD.bottom + 5);
    }
  });
  canvas.dataset.periods = String(periods.length);
  canvas.dataset.groups = top.join("\n");
}

// Every period of the range, empty ones included, so the x axis is a true time axis.
function allPeriods(report) {
  const step = report.step;
  const cut = step === "hour" ? 13 : step === "day" ? 10 : 7;
  const seen = new Set(report.rows.map((r) => r.period));
  const stepMs = step === "hour" ? 3600000 : DAY_MS;
  const end = Date.parse(report.to.slice(0, 10) + "T" + report.to.slice(11, 13) + ":00:00Z");
  let t = Date.parse(report.from.slice(0, 10) + "T" + report.from.slice(11, 13) + ":00:00Z");
  for (let n = 0; t < end && n < 5000; t += stepMs, n++) {
    seen.add(new Date(t).toISOString().slice(0, cut));
  }
  return [...seen].sort();
}

function legend(top, other) {
  const box = document.getElementById("usage-legend");
  box.replaceChildren(...top.map((name, i) =>
    el("span", { class: "key", "data-series": String(i + 1), text: name === "" ? "(none)" : name })));
  if (other) box.append(el("span", { class: "key", "data-series": "other", text: "other" }));
}

function niceCeil(v) {
  if (v <= 0) return 0.25;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) {
    if (v <= m * p) return m * p;
  }
  return 10 * p;
}
