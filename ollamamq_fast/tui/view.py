"""Pure functions from admin API answers to table rows and log lines.

Kept apart from the widgets so what the dashboard shows can be tested without
a terminal, and so widgets only decide *where* things go, not *what* they say.
"""

from __future__ import annotations

import time
from typing import Any

from rich.text import Text

from ollamamq_fast.display import printable

# A table row: its stable key (cursor and in-place updates follow it) and cells.
# Cells are always Text: a plain str would be parsed as console markup on every
# redraw, which costs loop time and would turn a user id like "[b]x" into bold.
Cell = Text
Row = tuple[str, tuple[Cell, ...]]

VIP_MARK = "★"
BOOST_MARK = "⚡"
BLOCKED_MARK = "⛔"
COLLAPSED_MARK = "▶"
EXPANDED_MARK = "▼"
LOADED_MARK = "●"

# Key prefixes: one table can hold backends and their model rows.
BACKEND_KEY = "b|"
MODEL_KEY = "m|"
USER_KEY = "u|"
BLOCKED_USER_KEY = "user|"
BLOCKED_IP_KEY = "ip|"

BACKEND_COLUMNS = (("Backend", "url"), ("State", "state"), ("API", "kind"),
                   ("Slots", "slots"), ("Done", "done"), ("Fail", "failures"),
                   ("Models", "models"), ("Pools", "pools"))
USER_COLUMNS = (("", "marks"), ("User", "user"), ("Last IP", "ip"), ("Queued", "queued"),
                ("Running", "in_flight"), ("Done", "done"), ("Dropped", "dropped"),
                ("Tokens", "tokens"), ("Weight", "weight"))
BLOCKED_COLUMNS = (("Kind", "kind"), ("Blocked", "value"))
POOL_COLUMNS = (("Pool", "name"), ("Up", "up"), ("Slots", "slots"), ("Queued", "queued"),
                ("Required", "required"), ("Pulls", "pulls"))
POOL_KEY = "p|"

# Rows beyond this would make every refresh slower for no one: nobody reads
# ten thousand lines in a terminal. The title says how many were left out.
MAX_USER_ROWS = 500
# The Models column shows this many names; Space expands the full list.
MODELS_SHOWN = 3


def backend_state(b: dict[str, Any]) -> Text:
    """online / offline / draining / breaker open, coloured for a glance."""
    if b.get("draining"):
        return Text("draining", style="yellow")
    if not b.get("online"):
        return Text("offline", style="red")
    breaker = b.get("breaker", "closed")
    if breaker != "closed":
        return Text(f"breaker {breaker}", style="dark_orange")
    return Text("online", style="green")


def slots_text(b: dict[str, Any]) -> Text:
    """Slots used / total, marked when a runtime change overrides the configuration.

    "(config N)" (yellow): the slots override a configured backend's N;
    "+" (cyan): a backend added at runtime (README: "Backends: configured
    list and runtime overrides").
    """
    text = Text(f"{b.get('in_flight', 0)}/{b.get('slots', 0)}")
    if b.get("override"):
        text.append(f" (config {b.get('configured_slots', '?')})", style="yellow")
    elif b.get("source") == "runtime":
        text.append(" +", style="cyan")
    return text


def backend_rows(backends: list[dict[str, Any]], expanded: set[str]) -> list[Row]:
    """One row per backend, followed by its models when it is expanded."""
    rows: list[Row] = []
    for b in backends:
        url = str(b["url"])
        models = list(b.get("models", []))
        is_open = url in expanded
        mark = EXPANDED_MARK if is_open else COLLAPSED_MARK
        shown = printable(", ".join(models[:MODELS_SHOWN]))
        if len(models) > MODELS_SHOWN:
            shown += f" +{len(models) - MODELS_SHOWN}"
        rows.append((BACKEND_KEY + url, (
            Text(f"{mark} {url}"), backend_state(b), Text(str(b.get("kind", ""))),
            slots_text(b),
            Text(str(b.get("requests_done", 0))), Text(str(b.get("failures", 0))),
            Text(shown or "-"), Text(",".join(b.get("pools", [])) or "-"))))
        if is_open:
            rows.extend(model_rows(b))
    return rows


def model_rows(b: dict[str, Any]) -> list[Row]:
    """The expanded model list of one backend; loaded models are marked."""
    url = str(b["url"])
    loaded = set(b.get("loaded", []))
    models = list(b.get("models", []))
    if not models:
        return [(f"{MODEL_KEY}{url}|", (Text("    (no models)", style="dim"), *_blank(7)))]
    rows: list[Row] = []
    for i, model in enumerate(models):
        branch = "└" if i == len(models) - 1 else "├"
        mark = Text(f"{LOADED_MARK} loaded", style="green") if model in loaded else Text("")
        rows.append((f"{MODEL_KEY}{url}|{model}", (Text(f"   {branch} {printable(model)}"), mark,
                                                    *_blank(6))))
    return rows


def pull_text(job: dict[str, Any]) -> str:
    """`phi3:mini 45% on host:port` (or its state when it has no size yet)."""
    percent = job.get("percent")
    done = f"{percent:g}%" if isinstance(percent, int | float) else str(job.get("state", ""))
    where = str(job.get("backend", "")).split("://", 1)[-1]
    return printable(f"{job.get('model')} {done} on {where}")


def pool_rows(pools: list[dict[str, Any]]) -> list[Row]:
    """One row per pool: backends up, slots used, queue, required models, pulls running."""
    rows: list[Row] = []
    for p in pools:
        pulls = list(p.get("pulls", []))
        required = list(p.get("required_models", []))
        rows.append((POOL_KEY + str(p["name"]), (
            Text(str(p["name"]), style="bold"),
            Text(f"{p.get('backends_online', 0)}/{p.get('backends_total', 0)}"),
            Text(f"{p.get('in_flight', 0)}/{p.get('slots_total', 0)}"),
            Text(str(p.get("queued", 0))),
            Text(", ".join(required) or "-"),
            Text("; ".join(pull_text(j) for j in pulls) or "-",
                 style="yellow" if pulls else "dim"))))
    return rows


def _blank(n: int) -> tuple[Text, ...]:
    return tuple(Text() for _ in range(n))


def backend_url_of(key: str) -> str | None:
    """The backend a row belongs to (its own row or one of its model rows)."""
    if key.startswith(BACKEND_KEY):
        return key[len(BACKEND_KEY):]
    if key.startswith(MODEL_KEY):
        return key[len(MODEL_KEY):].rsplit("|", 1)[0]
    return None


def user_marks(u: dict[str, Any]) -> Text:
    """★ VIP, ⚡ Boost, ⛔ blocked; ▶ when the user has a request running."""
    text = Text()
    if u.get("blocked"):
        text.append(BLOCKED_MARK, style="red")
    if u.get("vip"):
        text.append(VIP_MARK, style="magenta")
    if u.get("boost"):
        text.append(BOOST_MARK, style="yellow")
    if u.get("in_flight"):
        text.append("▶", style="cyan")
    return text


def user_rows(users: list[dict[str, Any]], blocked_ips: set[str]) -> list[Row]:
    """One row per user (at most MAX_USER_ROWS), in the API's order (by name)."""
    rows: list[Row] = []
    for u in users[:MAX_USER_ROWS]:
        name = str(u["user"])
        ip = str(u.get("last_ip") or "")
        if ip in blocked_ips:
            ip_cell = Text(f"{ip} {BLOCKED_MARK}", style="red")
        else:
            ip_cell = Text(ip or "-")
        tokens = int(u.get("prompt_tokens", 0)) + int(u.get("completion_tokens", 0))
        dropped = int(u.get("dropped", 0)) + int(u.get("rejected", 0))
        rows.append((USER_KEY + name, (
            user_marks(u), Text(name), ip_cell, Text(str(u.get("queued", 0))),
            Text(str(u.get("in_flight", 0))), Text(str(u.get("done", 0))), Text(str(dropped)),
            Text(str(tokens)), Text(str(u.get("weight", 1))))))
    return rows


def user_of(key: str) -> str | None:
    """The user id of a Users row key."""
    return key[len(USER_KEY):] if key.startswith(USER_KEY) else None


def blocked_rows(blocked: dict[str, list[str]]) -> list[Row]:
    """Blocked users first, then addresses and ranges."""
    rows: list[Row] = [(BLOCKED_USER_KEY + u, (Text("user", style="red"), Text(u)))
                       for u in blocked.get("users", [])]
    rows += [(BLOCKED_IP_KEY + ip, (Text("ip", style="red"), Text(ip)))
             for ip in blocked.get("ips", [])]
    return rows


def blocked_item(key: str) -> tuple[str, str] | None:
    """("user" | "ip", value) of a Blocked row key."""
    kind, sep, value = key.partition("|")
    return (kind, value) if sep and kind in ("user", "ip") else None


def rate(value: float) -> str:
    """A per-second figure that stays short: 7, 12.5k, 3.1M."""
    if value >= 1_000_000:
        return f"{value / 1_000_000:.1f}M"
    if value >= 10_000:
        return f"{value / 1000:.1f}k"
    return f"{value:g}"


def clock(ts: float | None = None) -> str:
    """HH:MM:SS in local time, for log lines."""
    return time.strftime("%H:%M:%S", time.localtime(ts if ts is not None else time.time()))


def tick_active(event: dict[str, Any]) -> bool:
    """Whether a tick is worth a log line: idle seconds would only push news away."""
    return any(event.get(k) for k in ("requests_per_s", "tokens_per_s", "queued", "in_flight"))


def tick_line(event: dict[str, Any]) -> Text:
    """`12:00:01  5 req/s  120 tok/s  queued 3  running 4`."""
    return Text.assemble(
        (clock(event.get("ts")), "dim"), "  ",
        (f"{rate(event.get('requests_per_s', 0))} req/s", "bold"), "  ",
        f"{rate(event.get('tokens_per_s', 0))} tok/s  queued {event.get('queued', 0)}  "
        f"running {event.get('in_flight', 0)}")


def event_line(event: dict[str, Any]) -> Text:
    """A change event (VIP set, user blocked, backend drained...) as one log line."""
    kind = str(event.get("type", "event"))
    return Text.assemble((clock(event.get("ts")), "dim"), "  ", (printable(kind), "cyan"), "  ",
                         printable(_event_detail(kind, event)))


def _event_detail(kind: str, event: dict[str, Any]) -> str:
    if "user" in event:
        user = event["user"]
        if isinstance(user, dict):
            flags = [name for name in ("vip", "boost") if user.get(name)]
            return (f"{user.get('user')}: {', '.join(flags) or 'normal'}, "
                    f"weight {user.get('weight', 1)}")
        return str(user)
    if "ip" in event:
        return str(event["ip"])
    backend = event.get("backend")
    if isinstance(backend, dict):
        state = backend_state(backend).plain
        return f"{backend.get('url')}: {state}, {backend.get('slots')} slot(s)"
    rest = {k: v for k, v in event.items() if k not in ("type", "ts")}
    return " ".join(f"{k}={v}" for k, v in rest.items())
