// Shared by the dashboard and the playground: the admin token, API calls,
// the sign-in form, and small DOM and formatting helpers.

// sessionStorage, not localStorage: the token is gone when the tab closes,
// and is never shared with other tabs or written to disk by the browser.
const TOKEN_KEY = "ollamamq-fast.admin-token";

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body || {};
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

// Signs out and shows the sign-in form again, with a reason when there is one.
export function signOut(reason) {
  sessionStorage.removeItem(TOKEN_KEY);
  if (reason) sessionStorage.setItem(TOKEN_KEY + ".reason", reason);
  location.reload();
}

// One admin API call; resolves to the parsed JSON body or throws ApiError.
// A 401 from the admin API itself means the token is no longer good: sign
// out. A 401 the playground relays from the data plane (marked with
// `source`) is about an API key, and is only reported.
export async function api(method, path, body) {
  const init = { method, headers: { Authorization: "Bearer " + token() } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (response.status === 401 && !data.source) {
    signOut("The gateway refused the admin token; sign in again.");
  }
  if (!response.ok) {
    throw new ApiError(response.status, data.error || `HTTP ${response.status}`, data);
  }
  return data;
}

// Wires the sign-in form; calls onReady() once a token is accepted.
export function setupLogin(onReady) {
  const login = document.getElementById("login");
  const app = document.getElementById("app");
  const form = document.getElementById("login-form");
  const input = document.getElementById("token-input");
  const error = document.getElementById("login-error");
  const reason = sessionStorage.getItem(TOKEN_KEY + ".reason");
  sessionStorage.removeItem(TOKEN_KEY + ".reason");

  const show = (signedIn) => {
    login.hidden = signedIn;
    app.hidden = !signedIn;
    document.getElementById("sign-out").hidden = !signedIn;
    const live = document.getElementById("live-status"); // the dashboard only
    if (live) live.hidden = !signedIn;
  };
  const fail = (message) => {
    error.textContent = message;
    error.hidden = false;
    show(false);
    input.focus();
  };
  // GET /api/info is the cheapest route that needs the token.
  const check = async (candidate) => {
    let response;
    try {
      response = await fetch("/api/info", { headers: { Authorization: "Bearer " + candidate } });
    } catch (err) {
      fail("Cannot reach the gateway's admin API: " + err.message);
      return;
    }
    if (response.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      fail("Wrong admin token: the gateway refused it.");
      return;
    }
    if (!response.ok) {
      fail(`The admin API answered HTTP ${response.status}.`);
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, candidate);
    error.hidden = true;
    show(true);
    onReady(await response.json());
  };

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const candidate = input.value.trim();
    if (!candidate) {
      fail("Enter the admin token (printed at start, or --admin-token).");
      return;
    }
    input.value = "";
    check(candidate);
  });
  document.getElementById("sign-out").addEventListener("click", () => signOut());

  if (token()) {
    check(token());
  } else {
    show(false);
    if (reason) fail(reason);
    else input.focus();
  }
}

// Shows a short message in the page's status line (announced to screen readers).
let noticeTimer = 0;
export function notice(message, isError = false) {
  const box = document.getElementById("notice");
  box.textContent = message;
  box.classList.toggle("error", isError);
  box.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { box.hidden = true; }, isError ? 10000 : 4000);
}

// el("td", {class: "num", text: "3"}, child...) without innerHTML, so no
// value from the API (user ids, model names) is ever parsed as markup.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name in node && typeof value !== "string") node[name] = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

export function formatNumber(n) {
  if (n === null || n === undefined) return "–";
  if (Math.abs(n) >= 1e9) return (n / 1e9).toFixed(1) + "G";
  if (Math.abs(n) >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (Math.abs(n) >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return Number.isInteger(n) ? String(n) : n.toFixed(1);
}

// Quantiles arrive in seconds; null means infinite (beyond the last bucket).
export function formatSeconds(s) {
  if (s === null || s === undefined) return "∞";
  if (s === 0) return "–";
  if (s < 1) return Math.round(s * 1000) + " ms";
  return s.toFixed(s < 10 ? 2 : 1) + " s";
}

export function formatDuration(s) {
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s % 60}s`;
  return `${s}s`;
}
