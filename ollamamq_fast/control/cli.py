"""`ollamamq-fast users|keys|backends ...`: the admin API from the command line.

A thin client of a running gateway's control plane: one HTTP request per
command (stdlib urllib, nothing to start), aligned tables for people and
`--json` for scripts. Errors are one line with exit code 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, urlencode

import orjson

from ollamamq_fast.config import DEFAULT_ADMIN_PORT
from ollamamq_fast.display import printable

COMMANDS = ("users", "keys", "backends", "pools")
DEFAULT_ADMIN_URL = f"http://127.0.0.1:{DEFAULT_ADMIN_PORT}"
# Every admin call answers from memory; a gateway that takes longer is stuck.
TIMEOUT_S = 10.0
# Rows asked for per call of a paged list (the API's own largest page).
PAGE = 10_000


class AdminError(Exception):
    """A failed admin call, already phrased for the operator."""


class AdminClient:
    """Calls one gateway's admin API with its token."""

    def __init__(self, base: str, token: str | None, timeout: float = TIMEOUT_S) -> None:
        if "://" not in base:
            base = "http://" + base
        self.base = base.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             query: dict[str, str] | None = None) -> Any:
        """One request; the decoded JSON answer, or AdminError."""
        url = self.base + path + ("?" + urlencode(query) if query else "")
        data = orjson.dumps(body) if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return orjson.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise AdminError(self._http_error(exc)) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            text = getattr(reason, "strerror", None) or str(reason)
            if isinstance(reason, ConnectionRefusedError):
                text = "connection refused (is the gateway running with its admin port?)"
            raise AdminError(f"cannot reach the admin API at {self.base}: {text}") from None
        except TimeoutError:
            raise AdminError(f"the admin API at {self.base} did not answer within "
                             f"{self.timeout:g} s") from None
        except ValueError as exc:  # a malformed --admin URL
            raise AdminError(f"invalid admin URL {self.base!r}: {exc}") from None

    def _http_error(self, exc: urllib.error.HTTPError) -> str:
        if exc.code == 401:
            how = "wrong" if self.token else "missing"
            return (f"the admin API at {self.base} refused the request (401): {how} token; "
                    "pass --token or set OLLAMAMQ_ADMIN_TOKEN")
        try:
            message = orjson.loads(exc.read()).get("error", "")
        except (orjson.JSONDecodeError, AttributeError):
            message = ""
        return f"{exc.code} {exc.reason}" + (f": {message}" if message else "")


# -- Parsers ------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _common() -> argparse.ArgumentParser:
    # SUPPRESS defaults, so the options work before and after the action
    # (`users --json list` and `users list --json`) without one level's default
    # overwriting the other's value; run() fills in env vars and defaults.
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--admin", default=argparse.SUPPRESS, metavar="URL",
                   help=f"admin API of the gateway (env OLLAMAMQ_ADMIN; "
                        f"default {DEFAULT_ADMIN_URL})")
    p.add_argument("--token", default=argparse.SUPPRESS,
                   help="admin token (env OLLAMAMQ_ADMIN_TOKEN)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="print the API's JSON answer instead of a table")
    return p


def common_options() -> argparse.ArgumentParser:
    """--admin, --token and --json, for admin commands defined in other modules."""
    return _common()


def add_arguments(sub: Any) -> None:
    """Add the `users`, `keys`, `backends` and `pools` subcommands to the main parser."""
    common = _common()
    users = sub.add_parser("users", parents=[common], help="list users, set VIP/boost/weight, "
                           "block (admin API)")
    actions = users.add_subparsers(dest="action", parser_class=type(users),
                                   metavar="{list,set,block,unblock}")
    actions.add_parser("list", parents=[common], help="users with counters and settings")
    set_p = actions.add_parser("set", parents=[common], help="change a user's fair-share settings")
    set_p.add_argument("user")
    set_p.add_argument("--vip", choices=["on", "off"], help="absolute priority")
    set_p.add_argument("--boost", choices=["on", "off"], help="every second dispatch")
    set_p.add_argument("--weight", type=_positive_int, help="turns per round")
    for name, text in (("block", "refuse the user's requests (403)"),
                       ("unblock", "accept the user's requests again")):
        actions.add_parser(name, parents=[common], help=text).add_argument("user")

    keys = sub.add_parser("keys", parents=[common], help="create, list, revoke API keys "
                          "(admin API)")
    actions = keys.add_subparsers(dest="action", parser_class=type(keys),
                                  metavar="{create,list,scopes,revoke}")
    create = actions.add_parser("create", parents=[common], help="a new key (secret shown once)")
    create.add_argument("--user", required=True, help="the user the key identifies")
    create.add_argument("--name", default="", help="a label, e.g. the device")
    create.add_argument("--trusted", action="store_true",
                        help="a service key that may name its end users in X-User-ID "
                             "(they act as USER:NAME)")
    create.add_argument("--scopes", default="inference", metavar="SCOPE[,SCOPE]",
                        help="what the key may do: inference (chat, generate, embed, /v1...), "
                             "models (pull, push, create, copy, delete, blobs) "
                             "(default inference)")
    actions.add_parser("list", parents=[common], help="keys (never their secrets)")
    scopes = actions.add_parser("scopes", parents=[common], help="change what a key may do")
    scopes.add_argument("key_id")
    scopes.add_argument("scopes", metavar="SCOPE[,SCOPE]", help="inference and/or models")
    actions.add_parser("revoke", parents=[common], help="revoke a key").add_argument("key_id")

    backends = sub.add_parser("backends", parents=[common], help="list, add, remove, drain "
                              "backends (admin API)")
    actions = backends.add_subparsers(dest="action", parser_class=type(backends),
                                      metavar="{list,add,remove,drain,undrain,slots,reset}")
    actions.add_parser("list", parents=[common], help="backends with live state")
    add = actions.add_parser("add", parents=[common], help="add a backend at runtime")
    add.add_argument("url")
    add.add_argument("--slots", type=_positive_int, help="requests at once (default: --slots)")
    for name, text in (("remove", "remove a backend (running requests finish)"),
                       ("drain", "send no new requests to a backend"),
                       ("undrain", "send requests to a backend again"),
                       ("reset", ("drop a configured backend's runtime override (removal "
                                  "or slots): its command-line or file entry applies again"))):
        actions.add_parser(name, parents=[common], help=text).add_argument("url")
    slots = actions.add_parser("slots", parents=[common], help="change a backend's slots")
    slots.add_argument("url")
    slots.add_argument("slots", type=_positive_int)

    pools = sub.add_parser("pools", parents=[common], help="list, create, delete pools; "
                           "required models and pulls (admin API)")
    actions = pools.add_subparsers(dest="action", parser_class=type(pools),
                                   metavar="{list,show,create,delete,sync,pulls,access}")
    actions.add_parser("list", parents=[common], help="pools with live numbers")
    actions.add_parser("show", parents=[common],
                       help="a pool's required models per backend and its pulls").add_argument("name")
    create = actions.add_parser("create", parents=[common], help="create or replace a pool")
    create.add_argument("name")
    create.add_argument("--backend", action="append", default=[], metavar="URL",
                        help="a backend of the pool (repeat)")
    create.add_argument("--slots", type=_positive_int, help="slots of its backends")
    create.add_argument("--alias", action="append", default=[], metavar="ALIAS=MODEL",
                        help="a model alias (repeat)")
    create.add_argument("--host", action="append", default=[], metavar="HOST",
                        help="a Host header that reaches the pool (repeat)")
    create.add_argument("--require", action="append", default=[], metavar="MODEL",
                        help="a model each of its Ollama backends must have (repeat)")
    create.add_argument("--remove-unlisted", action="store_true",
                        help="delete models no pool of a backend requires")
    actions.add_parser("delete", parents=[common], help="delete a pool").add_argument("name")
    sync = actions.add_parser("sync", parents=[common],
                              help="compare required models with each backend now; pull the missing")
    sync.add_argument("name")
    sync.add_argument("--remove", action="store_true",
                      help="also delete models the pool does not require (this time)")
    actions.add_parser("pulls", parents=[common], help="model pulls running or queued")
    access = actions.add_parser("access", parents=[common],
                                help="limit a user or an API key to some pools")
    access.add_argument("who", choices=("user", "key"))
    access.add_argument("id", help="user name or key id")
    access.add_argument("pools", metavar="POOL[,POOL]|all", help="pools it may use; 'all' lifts the limit")


# -- Commands -----------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run one admin subcommand; the process exit code."""
    base = getattr(args, "admin", None) or os.environ.get("OLLAMAMQ_ADMIN") or DEFAULT_ADMIN_URL
    token = getattr(args, "token", None) or os.environ.get("OLLAMAMQ_ADMIN_TOKEN") or None
    client = AdminClient(base, token)
    as_json = getattr(args, "json", False)
    if args.action is None:  # `ollamamq-fast backends` alone lists, like `... backends list`
        args.action = "list"
    handler = _HANDLERS[(args.command, args.action)]
    try:
        answer, text = handler(client, args)
    except AdminError as exc:
        print(f"ollamamq-fast: error: {exc}", file=sys.stderr)
        return 1
    except _UsageError as exc:
        print(f"ollamamq-fast {args.command} {args.action}: error: {exc}", file=sys.stderr)
        return 2
    print(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode() if as_json else text)
    return 0


class _UsageError(Exception):
    """A command line argparse accepts but that makes no sense (exit 2)."""


Answer = tuple[Any, str]


def _all_pages(c: AdminClient, path: str, field: str) -> dict[str, Any]:
    """Every row of a paged list route, fetched a page at a time."""
    rows: list[Any] = []
    while True:
        page = c.call("GET", path, query={"offset": str(len(rows)), "limit": str(PAGE)})
        rows.extend(page[field])
        if not page[field] or len(rows) >= page.get("total", len(rows)):
            return {field: rows, "total": len(rows)}


def _users_list(c: AdminClient, args: argparse.Namespace) -> Answer:
    answer = _all_pages(c, "/api/users", "users")
    rows = [[u["user"], _yes(u["vip"]), _yes(u["boost"]), str(u["weight"]), _yes(u["blocked"]),
             str(u.get("queued", 0)), str(u.get("in_flight", 0)), str(u.get("done", 0)),
             str(u.get("rejected", 0)), str(u.get("dropped", 0)), str(u.get("prompt_tokens", 0)),
             str(u.get("completion_tokens", 0)), u.get("last_ip", "")]
            for u in answer["users"]]
    return answer, table(["USER", "VIP", "BOOST", "WEIGHT", "BLOCKED", "QUEUED", "RUNNING",
                          "DONE", "REJECTED", "DROPPED", "TOKENS IN", "TOKENS OUT", "LAST IP"],
                         rows,
                         "no users yet")


def _users_set(c: AdminClient, args: argparse.Namespace) -> Answer:
    body: dict[str, Any] = {}
    if args.vip is not None:
        body["vip"] = args.vip == "on"
    if args.boost is not None:
        body["boost"] = args.boost == "on"
    if args.weight is not None:
        body["weight"] = args.weight
    if not body:
        raise _UsageError("nothing to change: give --vip, --boost and/or --weight")
    u = c.call("PATCH", f"/api/users/{_seg(args.user)}", body)
    return u, (f"{u['user']}: vip {_onoff(u['vip'])}, boost {_onoff(u['boost'])}, "
               f"weight {u['weight']}")


def _users_block(c: AdminClient, args: argparse.Namespace) -> Answer:
    on = args.action == "block"
    answer = c.call("POST", f"/api/users/{_seg(args.user)}/{args.action}")
    return answer, f"{'blocked' if on else 'unblocked'} {args.user}"


def _keys_create(c: AdminClient, args: argparse.Namespace) -> Answer:
    k = c.call("POST", "/api/keys", {"user": args.user, "name": args.name,
                                     "trusted": args.trusted, "scopes": _split(args.scopes)})
    text = table(["KEY ID", "USER", "NAME", "TRUSTED", "SCOPES", "SECRET"],
                 [[k["key_id"], k["user"], k["name"], _yes(k["trusted"]),
                   ",".join(k.get("scopes", [])), k["secret"]]])
    return k, text + "\nThe secret is shown only now: store it; the gateway keeps a digest."


def _keys_list(c: AdminClient, args: argparse.Namespace) -> Answer:
    answer = _all_pages(c, "/api/keys", "keys")
    rows = [[k["key_id"], k["user"], k["name"], _yes(k["trusted"]),
             ",".join(k.get("scopes", [])), _yes(k["revoked"]),
             time.strftime("%Y-%m-%d %H:%M", time.localtime(k["created_at"]))]
            for k in sorted(answer["keys"], key=lambda k: k["created_at"])]
    return answer, table(["KEY ID", "USER", "NAME", "TRUSTED", "SCOPES", "REVOKED", "CREATED"],
                         rows, "no keys")


def _keys_scopes(c: AdminClient, args: argparse.Namespace) -> Answer:
    k = c.call("PATCH", f"/api/keys/{_seg(args.key_id)}", {"scopes": _split(args.scopes)})
    return k, f"{k['key_id']}: scopes {','.join(k['scopes'])}"


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _keys_revoke(c: AdminClient, args: argparse.Namespace) -> Answer:
    answer = c.call("DELETE", f"/api/keys/{_seg(args.key_id)}")
    return answer, f"revoked {args.key_id}"


def _backend_rows(backends: list[dict[str, Any]]) -> str:
    rows = [[b["url"], b["kind"], _backend_state(b), _slots_text(b), str(b["in_flight"]),
             str(b["requests_done"]), str(b["failures"]), ", ".join(b["models"])]
            for b in backends]
    return table(["URL", "KIND", "STATE", "SLOTS", "RUNNING", "DONE", "FAILURES", "MODELS"],
                 rows, "no backends")


def _slots_text(b: dict[str, Any]) -> str:
    """Slots, marked when a runtime change overrides the configuration (README)."""
    if b.get("override"):
        return f"{b['slots']} (config {b.get('configured_slots', '?')})"
    if b.get("source") == "runtime":
        return f"{b['slots']} (runtime)"
    return str(b["slots"])


def _backend_state(b: dict[str, Any]) -> str:
    if b["draining"]:
        return "draining"
    if not b["online"]:
        return "offline"
    return "online" if b["breaker"] == "closed" else f"breaker {b['breaker']}"


def _backends_list(c: AdminClient, args: argparse.Namespace) -> Answer:
    answer = c.call("GET", "/api/backends")
    text = _backend_rows(answer["backends"])
    if answer.get("removed"):
        text += "\nremoved at runtime (configured; `backends reset URL` brings one back): " \
                + ", ".join(answer["removed"])
    return answer, text


def _backends_reset(c: AdminClient, args: argparse.Namespace) -> Answer:
    b = c.call("DELETE", "/api/backends/override", query={"url": args.url})
    return b, _backend_rows([b])


def _backends_add(c: AdminClient, args: argparse.Namespace) -> Answer:
    body: dict[str, Any] = {"url": args.url}
    if args.slots is not None:
        body["slots"] = args.slots
    b = c.call("POST", "/api/backends", body)
    return b, _backend_rows([b])


def _backends_remove(c: AdminClient, args: argparse.Namespace) -> Answer:
    answer = c.call("DELETE", "/api/backends", query={"url": args.url})
    return answer, f"removed {answer['removed']}"


def _backends_drain(c: AdminClient, args: argparse.Namespace) -> Answer:
    b = c.call("POST", f"/api/backends/{args.action}", {"url": args.url})
    return b, _backend_rows([b])


def _backends_slots(c: AdminClient, args: argparse.Namespace) -> Answer:
    b = c.call("PATCH", "/api/backends", {"url": args.url, "slots": args.slots})
    return b, _backend_rows([b])


def _pool_rows(pools: list[dict[str, Any]]) -> str:
    rows = [[p["name"], f"{p['backends_online']}/{p['backends_total']}", str(p["slots_total"]),
             str(p["in_flight"]), str(p["queued"]), ", ".join(p["hosts"]),
             ", ".join(f"{a}={m}" for a, m in p["aliases"].items()),
             ", ".join(p["required_models"]), str(len(p.get("pulls", [])))]
            for p in pools]
    return table(["POOL", "ONLINE", "SLOTS", "RUNNING", "QUEUED", "HOSTS", "ALIASES",
                  "REQUIRED", "PULLS"], rows, "no pools")


def _pull_rows(pulls: list[dict[str, Any]]) -> str:
    rows = [[p["backend"], p["model"], p["state"], p["status"],
             "" if p["percent"] is None else f"{p['percent']:g}%", str(p["attempts"]), p["error"]]
            for p in pulls]
    return table(["BACKEND", "MODEL", "STATE", "STATUS", "DONE", "TRIES", "ERROR"], rows,
                 "no pulls")


def _pools_list(c: AdminClient, args: argparse.Namespace) -> Answer:
    answer = c.call("GET", "/api/pools")
    return answer, _pool_rows(answer["pools"])


def _pools_show(c: AdminClient, args: argparse.Namespace) -> Answer:
    answer = c.call("GET", f"/api/pools/{_seg(args.name)}/models")
    rows = [[b["backend"], b["kind"], ", ".join(b["present"]), ", ".join(b["missing"]),
             "" if b["pulling"] is None else f"{b['pulling']['model']} {b['pulling']['state']}",
             str(len(b["queued"]))]
            for b in answer["backends"]]
    return answer, table(["BACKEND", "KIND", "PRESENT", "MISSING", "PULLING", "QUEUED"], rows,
                         "no backends")


def _pools_create(c: AdminClient, args: argparse.Namespace) -> Answer:
    aliases = {}
    for item in args.alias:
        alias, sep, model = item.partition("=")
        if not sep or not alias.strip() or not model.strip():
            raise _UsageError(f"--alias: expected ALIAS=MODEL, got {item!r}")
        aliases[alias.strip()] = model.strip()
    body: dict[str, Any] = {"backends": args.backend, "aliases": aliases, "hosts": args.host,
                            "required_models": args.require,
                            "remove_unlisted": args.remove_unlisted}
    if args.slots is not None:
        body["slots"] = args.slots
    p = c.call("PUT", f"/api/pools/{_seg(args.name)}", body)
    return p, _pool_rows([p])


def _pools_delete(c: AdminClient, args: argparse.Namespace) -> Answer:
    answer = c.call("DELETE", f"/api/pools/{_seg(args.name)}")
    return answer, f"deleted pool {args.name}"


def _pools_sync(c: AdminClient, args: argparse.Namespace) -> Answer:
    query = {"remove": "true"} if args.remove else None
    answer = c.call("POST", f"/api/pools/{_seg(args.name)}/sync", query=query)
    rows = [[b["backend"], ", ".join(b.get("present", [])), ", ".join(b.get("missing", [])),
             ", ".join(b.get("removed", [])), b.get("error", b.get("skipped", ""))]
            for b in answer["backends"]]
    return answer, table(["BACKEND", "PRESENT", "PULLING", "REMOVED", "NOTE"], rows,
                         "no backend has required models")


def _pools_pulls(c: AdminClient, args: argparse.Namespace) -> Answer:
    answer = c.call("GET", "/api/pulls")
    return answer, _pull_rows(answer["pulls"])


def _pools_access(c: AdminClient, args: argparse.Namespace) -> Answer:
    pools = None if args.pools == "all" else _split(args.pools)
    part = "users" if args.who == "user" else "keys"
    answer = c.call("PUT", f"/api/pool-access/{part}/{_seg(args.id)}", {"pools": pools})
    return answer, f"{args.who} {args.id}: " + ("all pools" if pools is None else ", ".join(pools))


_HANDLERS = {
    ("pools", "list"): _pools_list,
    ("pools", "show"): _pools_show,
    ("pools", "create"): _pools_create,
    ("pools", "delete"): _pools_delete,
    ("pools", "sync"): _pools_sync,
    ("pools", "pulls"): _pools_pulls,
    ("pools", "access"): _pools_access,
    ("users", "list"): _users_list,
    ("users", "set"): _users_set,
    ("users", "block"): _users_block,
    ("users", "unblock"): _users_block,
    ("keys", "create"): _keys_create,
    ("keys", "list"): _keys_list,
    ("keys", "revoke"): _keys_revoke,
    ("keys", "scopes"): _keys_scopes,
    ("backends", "list"): _backends_list,
    ("backends", "add"): _backends_add,
    ("backends", "remove"): _backends_remove,
    ("backends", "drain"): _backends_drain,
    ("backends", "undrain"): _backends_drain,
    ("backends", "slots"): _backends_slots,
    ("backends", "reset"): _backends_reset,
}


# -- Formatting ---------------------------------------------------------------


def table(headers: list[str], rows: list[list[str]], empty: str = "") -> str:
    """Columns aligned on the widest cell; numbers right-aligned."""
    if not rows:
        return empty
    # Names come from clients (model names in the usage) and backends (model
    # lists): no escape sequence of theirs reaches the operator's terminal.
    rows = [[printable(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    numeric = [all(r[i].isdigit() for r in rows) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        out = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers)] + [line(r) for r in rows])


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"


def _seg(text: str) -> str:
    """A path segment: everything percent-encoded, '/' included."""
    return quote(text, safe="")
