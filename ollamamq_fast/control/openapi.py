"""The OpenAPI 3.1 document of the admin API, served at `/openapi.json`.

Written by hand next to the handlers in app.py; tests/test_admin.py checks
that every route of the router appears here with the same methods, so the
two cannot drift apart silently.
"""

from __future__ import annotations

from typing import Any

from ollamamq_fast import __version__
from ollamamq_fast.fleet.backend import ApiKind
from ollamamq_fast.state.records import SCOPES

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(props: dict[str, Any], required: list[str] | None = None,
         closed: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        schema["required"] = required
    if closed:
        # Request bodies: unknown fields are refused with 400.
        schema["additionalProperties"] = False
    return schema


def _json_body(schema_name: str) -> dict[str, Any]:
    return {"required": True, "content": {JSON: {"schema": _ref(schema_name)}}}


def _ok(schema_name: str, description: str, status: str = "200") -> dict[str, Any]:
    return {status: {"description": description,
                     "content": {JSON: {"schema": _ref(schema_name)}}}}


_ERRORS = {
    "400": "Invalid JSON, a missing, unknown or ill-typed field",
    "401": "Missing or wrong admin token",
    "404": "No such backend, key, pool or route",
    "409": "The backend or pool already exists, or there is no config file to reload",
    "413": "Request body over 64 KiB",
}


def _errors(*codes: str) -> dict[str, Any]:
    return {code: {"description": _ERRORS[code],
                   "content": {JSON: {"schema": _ref("Error")}}} for code in codes}


def _op(summary: str, op_id: str, responses: dict[str, Any], *, body: str | None = None,
        params: list[dict[str, Any]] | None = None, tag: str = "admin",
        codes: tuple[str, ...] = ("401",)) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "operationId": op_id, "tags": [tag],
                          "responses": {**responses, **_errors(*codes)}}
    if body is not None:
        op["requestBody"] = _json_body(body)
    if params:
        op["parameters"] = params
    return op


def _param(name: str, where: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": where, "required": True, "description": description,
            "schema": {"type": "string"}}


def _page_params(sort: bool = False) -> list[dict[str, Any]]:
    """`limit` and `offset` of a paged list (and `sort` for users)."""
    out: list[dict[str, Any]] = [
        {"name": "limit", "in": "query", "required": False,
         "description": "rows per page (default 1000, at most 10000)",
         "schema": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 1000}},
        {"name": "offset", "in": "query", "required": False, "description": "rows to skip",
         "schema": {"type": "integer", "minimum": 0, "default": 0}},
    ]
    if sort:
        out.append({"name": "sort", "in": "query", "required": False,
                    "description": "name, or active: queued and running first, then most "
                                   "recently seen",
                    "schema": {"type": "string", "enum": ["name", "active"],
                               "default": "name"}})
    return out


_URL_QUERY = _param("url", "query", "Backend URL (http:// is added when missing)")
_USER_PATH = _param("user", "path",
                    "User id, percent-encoded (an id containing '/' cannot be addressed)")


def _paths(metrics_public: bool) -> dict[str, Any]:
    bad = ("400", "401")
    metrics_op = _op("Prometheus metrics (per-user series for the 50 busiest users only)",
                     "metrics",
                     {"200": {"description": "Text exposition format 0.0.4",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}},
                     tag="observability", codes=() if metrics_public else ("401",))
    if metrics_public:
        metrics_op["security"] = []
    return {
        "/api/backends": {
            "get": _op("List backends with live state", "listBackends",
                       _ok("BackendList", "Every backend")),
            "post": _op("Add a backend at runtime", "addBackend",
                        _ok("Backend", "The new backend", "201"), body="BackendAdd",
                        codes=("400", "401", "409", "413")),
            "patch": _op("Change a backend's slots", "setBackendSlots",
                         _ok("Backend", "The changed backend"), body="BackendSlots",
                         codes=("400", "401", "404", "413")),
            "delete": _op("Remove a backend (running requests finish)", "removeBackend",
                          _ok("Removed", "The backend is gone"), params=[_URL_QUERY],
                          codes=("400", "401", "404")),
        },
        "/api/backends/override": {
            "delete": _op("Drop a configured backend's runtime override (removal or slots): "
                          "its command-line or file entry applies again", "resetBackend",
                          _ok("Backend", "The backend as configured"), params=[_URL_QUERY],
                          codes=("400", "401", "404")),
        },
        "/api/backends/drain": {
            "post": _op("Drain a backend: no new requests", "drainBackend",
                        _ok("Backend", "The draining backend"), body="BackendUrl",
                        codes=("400", "401", "404", "413")),
        },
        "/api/backends/undrain": {
            "post": _op("Undrain a backend: take requests again", "undrainBackend",
                        _ok("Backend", "The backend"), body="BackendUrl",
                        codes=("400", "401", "404", "413")),
        },
        "/api/users": {
            "get": _op("List users with counters and fair-share settings (paged)", "listUsers",
                       _ok("UserList", "A page of the users seen or configured"),
                       params=_page_params(sort=True), codes=("400", "401")),
        },
        "/api/users/{user}": {
            "patch": _op("Set a user's VIP, Boost and/or weight", "setUser",
                         _ok("UserSettings", "The user's settings now"), body="UserPatch",
                         params=[_USER_PATH], codes=("400", "401", "413")),
        },
        "/api/users/{user}/block": {
            "post": _op("Block a user (403 at arrival and dispatch)", "blockUser",
                        _ok("UserBlocked", "The user is blocked"), params=[_USER_PATH]),
        },
        "/api/users/{user}/unblock": {
            "post": _op("Unblock a user", "unblockUser",
                        _ok("UserBlocked", "The user is not blocked"), params=[_USER_PATH]),
        },
        "/api/blocked": {
            "get": _op("Blocked users and addresses (each list paged)", "listBlocked",
                       _ok("Blocked", "The blocklist"), params=_page_params(),
                       codes=("400", "401")),
        },
        "/api/blocked/ips": {
            "post": _op("Block an IP address or CIDR range", "blockIp",
                        _ok("Blocked", "The blocklist after the change"), body="IpBlock",
                        codes=("400", "401", "413")),
            "delete": _op("Unblock an IP address or CIDR range (idempotent)", "unblockIp",
                          _ok("Blocked", "The blocklist after the change"),
                          params=[_param("ip", "query", "Address or CIDR range")], codes=bad),
        },
        "/api/keys": {
            "get": _op("List API keys (never the secrets; paged, oldest first)", "listKeys",
                       _ok("KeyList", "Key records"), params=_page_params(),
                       codes=("400", "401")),
            "post": _op("Create an API key; the secret is in this answer only", "createKey",
                        _ok("KeyCreated", "The key with its secret", "201"), body="KeyCreate",
                        codes=("400", "401", "413")),
        },
        "/api/keys/{key_id}": {
            "delete": _op("Revoke an API key", "revokeKey", _ok("KeyRevoked", "Revoked"),
                          params=[_param("key_id", "path", "Key id from the key list")],
                          codes=("401", "404")),
            "patch": _op("Change an API key's scopes", "setKeyScopes", _ok("Key", "The key"),
                         body="KeyPatch",
                         params=[_param("key_id", "path", "Key id from the key list")],
                         codes=("400", "401", "404", "413")),
        },
        "/api/stats": {
            "get": _op("Gateway-wide numbers", "stats", _ok("Stats", "Counters and quantiles"),
                       tag="observability"),
        },
        "/api/reload": {
            "post": {**_op("Re-read the TOML config file (as SIGHUP)", "reload",
                           _free_json("`reloaded` and the backends added, removed, re-slotted"),
                           codes=("400", "401")),
                     "requestBody": {"required": False, "content": {JSON: {"schema": {
                         "type": "object"}}}}},
        },
        "/api/events": {
            "get": _op(
                "Server-Sent Events: `tick` every second (queued, in_flight, requests_per_s, "
                "tokens_per_s, backends) and one event per operator change "
                "(backend_added, user_changed, key_created, ...); `: keep-alive` every 15 s",
                "events",
                {"200": {"description": "`event: <type>` / `data: <json>` messages",
                         "content": {"text/event-stream": {"schema": {"type": "string"}}}}},
                tag="observability"),
        },
        "/metrics": {"get": metrics_op},
        "/openapi.json": {
            "get": _op("This document", "openapi",
                       {"200": {"description": "OpenAPI 3.1",
                                "content": {JSON: {"schema": {"type": "object"}}}}},
                       tag="observability"),
        },
        "/health": {
            "get": {**_op("Liveness: the process is alive (no token needed)", "health",
                          _ok("Alive", "Alive"), tag="observability", codes=()),
                    "security": []},
        },
        "/ready": {
            "get": {**_op("Readiness: 200 when the gateway can serve (not stopping, a backend "
                          "available, Redis answering when configured), else 503 with the "
                          "reasons; the data port answers the same at /ready (no token needed)",
                          "ready",
                          {**_ok("Readiness", "Ready"),
                           "503": {"description": "Not ready: see `reasons`",
                                   "content": {JSON: {"schema": _ref("Readiness")}}}},
                          tag="observability", codes=()),
                    "security": []},
        },
    }


_INT = {"type": "integer"}
_NUM = {"type": "number"}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_SLOTS = {"type": "integer", "minimum": 1}
_QUANTILE = {"type": "number",
             "description": "seconds, interpolated within a histogram bucket; 0 before any"}


def _free_json(description: str, status: str = "200") -> dict[str, Any]:
    return {status: {"description": description,
                     "content": {JSON: {"schema": {"type": "object"}}}}}


def _web_paths() -> dict[str, Any]:
    """Routes used by the web dashboard and playground (control/web/)."""
    return {
        "/api/info": {
            "get": _op("Version and the data plane's address", "info",
                       _free_json("`version`, `data_plane_url`, `data_plane_host`, "
                                  "`data_plane_port`"), tag="observability"),
        },
        "/api/playground/models": {
            "get": _op("Model ids the data plane serves, loaded ones marked", "playgroundModels",
                       _free_json("Model list"), tag="playground"),
        },
        "/api/playground/chat": {
            "post": {**_op("Stream a chat through the gateway's own data plane (NDJSON)",
                           "playgroundChat",
                           {"200": {"description": "The data plane's /api/chat stream",
                                    "content": {"application/x-ndjson":
                                                {"schema": {"type": "string"}}}}},
                           tag="playground", codes=("400", "401")),
                     "requestBody": {"required": True, "content": {JSON: {"schema": {
                         "type": "object", "required": ["model", "messages"],
                         "properties": {"model": _STR, "messages": {"type": "array"},
                                        "user": _STR, "api_key": _STR}}}}}},
        },
        "/api/users/{user}/limits": {
            "get": _op("A user's limit overrides and the limits in effect", "getLimits",
                       _free_json("Overrides and effective limits"), params=[_USER_PATH]),
            "patch": _op("Set or drop (null) a user's limit overrides", "setLimits",
                         _free_json("The user's limits after the change"),
                         params=[_USER_PATH], codes=("400", "401")),
        },
    }


def _query(name: str, description: str, **schema: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": {"type": "string", **schema}}


def _usage_paths() -> dict[str, Any]:
    """`GET /api/usage` (control/usage.py)."""
    params = [
        _query("from", "First day or hour, UTC: YYYY-MM-DD or YYYY-MM-DDTHH (default: 6 days "
                       "before today)"),
        _query("to", "Last day or hour, UTC, included (default: now)"),
        _query("step", "Time bucket of each row", enum=["hour", "day", "month", "total"],
               default="day"),
        _query("by", "Comma-separated dimensions to group by: user, key, model, backend",
               default="user,model"),
        _query("user", "Only this user"),
        _query("key", "Only this API key id (\"\" = requests without a key)"),
        _query("model", "Only this model"),
        _query("backend", "Only this backend URL"),
        _query("format", "Answer format (default: JSON, or CSV when Accept asks for text/csv)",
               enum=["json", "csv"]),
    ]
    return {"/api/usage": {"get": _op(
        "Stored usage (tokens in/out, requests, errors, cancelled, estimated tokens) per hour, day or "
        "month, grouped by user, key, model and/or backend", "usage",
        {"200": {"description": "The report",
                 "content": {JSON: {"schema": _ref("UsageReport")},
                             "text/csv": {"schema": {"type": "string"}}}}},
        params=params, tag="observability", codes=("400", "401"))}}


def _usage_schemas() -> dict[str, Any]:
    counters = {"requests": _INT, "errors": _INT, "cancelled": _INT,
                "estimated_tokens": {"type": "integer",
                                     "description": "of the tokens, those estimated from "
                                                    "stream events (the backend reported none)"},
                "prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT,
                "exact": {"type": "boolean",
                          "description": "every token figure was the backend's own"}}
    row = _obj({"period": {"type": "string", "description": "hour, day or month (absent for "
                                                              "step=total)"},
                "user": _STR, "key": _STR, "model": _STR, "backend": _STR, **counters},
               list(counters))
    return {
        "UsageRow": row,
        "UsageReport": _obj({
            "from": _STR, "to": {"type": "string", "description": "exclusive hour"},
            "step": _STR, "by": {"type": "array", "items": _STR},
            "filters": {"type": "object"},
            "rows": {"type": "array", "items": _ref("UsageRow")},
            "totals": _obj(counters, list(counters)),
        }, ["from", "to", "step", "by", "rows", "totals"]),
    }


_POOL_PATH = _param("name", "path", "Pool name ('default' is the top-level backends)")


def _pool_paths() -> dict[str, Any]:
    bad = ("400", "401", "413")
    access = {"requestBody": _json_body("PoolAccessSet")}
    return {
        "/api/pools": {
            "get": _op("List pools with their definitions and live numbers", "listPools",
                       _ok("PoolList", "Every pool, default first"), tag="pools"),
            "post": _op("Create a pool (stored)", "createPool", _ok("Pool", "The pool", "201"),
                        body="PoolCreate", tag="pools", codes=(*bad, "409")),
        },
        "/api/pools/{name}": {
            "get": _op("One pool", "getPool", _ok("Pool", "The pool"), params=[_POOL_PATH],
                       tag="pools", codes=("401", "404")),
            "put": _op("Replace a pool's definition, or create it (stored)", "replacePool",
                       {**_ok("Pool", "The pool"), **_ok("Pool", "Created", "201")},
                       body="PoolDefinition", params=[_POOL_PATH], tag="pools", codes=bad),
            "patch": _op("Change some fields of a pool's definition (stored)", "patchPool",
                         _ok("Pool", "The pool"), body="PoolDefinition", params=[_POOL_PATH],
                         tag="pools", codes=(*bad, "404")),
            "delete": _op("Delete a pool; its queued requests are answered 503", "removePool",
                          _free_json("`removed`: the pool's name"), params=[_POOL_PATH],
                          tag="pools", codes=("400", "401", "404")),
        },
        "/api/pools/{name}/models": {
            "get": _op("Required models per backend of the pool: present, missing, the pull "
                       "running, queued and recent pulls", "poolModels",
                       _ok("RequiredStatus", "Per backend"), params=[_POOL_PATH], tag="pools",
                       codes=("401", "404")),
        },
        "/api/pools/{name}/sync": {
            "post": _op("Compare the required models with each backend's /api/tags now and "
                        "pull what is missing (one pull per backend at a time)", "syncPool",
                        _ok("RequiredCheck", "What each backend has, lacks and lost"),
                        params=[_POOL_PATH, {
                            "name": "remove", "in": "query", "required": False,
                            "description": "true: also delete models no pool of the backend "
                                           "requires (this time); false: never; absent: the "
                                           "pools' remove_unlisted",
                            "schema": {"type": "string", "enum": ["true", "false"]}}],
                        tag="pools", codes=("400", "401", "404")),
        },
        "/api/pulls": {
            "get": _op("Model pulls running or queued now", "listPulls",
                       _ok("PullList", "Pulls with progress"), tag="pools"),
        },
        "/api/pool-access": {
            "get": _op("Users and API keys limited to some pools", "poolAccess",
                       _ok("PoolAccess", "user / key id -> pools"), tag="pools"),
        },
        "/api/pool-access/users/{user}": {
            "put": {**_op("Limit a user to some pools (null: all pools)", "setUserPools",
                          _free_json("`user` and its `pools`"), params=[_USER_PATH],
                          tag="pools", codes=bad), **access},
        },
        "/api/pool-access/keys/{key_id}": {
            "put": {**_op("Limit an API key to some pools (null: all pools)", "setKeyPools",
                          _free_json("`key` and its `pools`"),
                          params=[_param("key_id", "path", "Key id from the key list")],
                          tag="pools", codes=bad), **access},
        },
    }


def _pool_schemas() -> dict[str, Any]:
    names = {"type": "array", "items": _STR}
    backend = {"oneOf": [_STR, _obj({
        "url": _STR, "slots": _SLOTS, "kind": {"enum": ["auto", "ollama", "openai", "llamacpp",
                                                       "vllm", "lmstudio"]},
        "probe_path": _STR, "probe_interval": _NUM}, ["url"], closed=True)]}
    definition = {
        "backends": {"type": "array", "items": backend,
                     "description": "required except for the default pool, which has none"},
        "slots": _SLOTS, "balance": {"enum": ["least-conn", "round-robin", "random", "affinity"]},
        "aliases": {"type": "object", "additionalProperties": _STR,
                    "description": "alias -> model name the backend reads"},
        "hosts": names, "required_models": names, "remove_unlisted": _BOOL,
        "users": _obj({"vip": names, "boost": names,
                       "weights": {"type": "object", "additionalProperties": _INT}}),
    }
    job = _obj({
        "backend": _STR, "model": _STR, "pools": names,
        "state": {"enum": ["queued", "pulling", "retrying", "done", "failed"]},
        "status": _STR, "completed": _INT, "total": _INT,
        "percent": {"type": ["number", "null"]}, "attempts": _INT, "error": _STR,
        "queued_at": _NUM, "started_at": _NUM, "finished_at": _NUM, "next_try_at": _NUM,
    }, ["backend", "model", "state", "percent", "attempts", "error"])
    return {
        "PoolDefinition": _obj(definition, closed=True),
        "PoolCreate": _obj({"name": _STR, **definition}, ["name"], closed=True),
        "Pool": _obj({
            "name": _STR, "backends": names, "definition": _obj(definition),
            "aliases": {"type": "object"}, "hosts": names, "required_models": names,
            "remove_unlisted": _BOOL, "backends_online": _INT, "backends_total": _INT,
            "slots_total": _INT, "in_flight": _INT, "queued": _INT, "requests": _INT,
            "models": names, "pulls": {"type": "array", "items": _ref("PullJob")},
        }, ["name", "backends", "definition", "backends_online", "backends_total"]),
        "PoolList": _obj({"pools": {"type": "array", "items": _ref("Pool")}}, ["pools"]),
        "PullJob": job,
        "PullList": _obj({"pulls": {"type": "array", "items": _ref("PullJob")}}, ["pulls"]),
        "RequiredStatus": _obj({"pool": {"type": ["string", "null"]}, "backends": {
            "type": "array", "items": _obj({
                "backend": _STR, "kind": _STR, "online": _BOOL, "pools": names,
                "required": names, "present": names, "missing": names,
                "remove_unlisted": _BOOL, "pulling": {"oneOf": [_ref("PullJob"),
                                                                {"type": "null"}]},
                "queued": {"type": "array", "items": _ref("PullJob")},
                "recent": {"type": "array", "items": _ref("PullJob")}, "removed": names,
            }, ["backend", "required", "present", "missing"])}, "last_check": {
                "type": "object"}}, ["backends"]),
        "RequiredCheck": _obj({"reason": _STR, "pool": {"type": ["string", "null"]},
                               "at": _NUM, "backends": {"type": "array", "items": _obj({
                                   "backend": _STR, "pools": names, "present": names,
                                   "missing": names, "extra": names, "removed": names,
                                   "error": _STR, "skipped": _STR}, ["backend"])}},
                              ["backends"]),
        "PoolAccess": _obj({"users": {"type": "object", "additionalProperties": names},
                            "keys": {"type": "object", "additionalProperties": names}},
                           ["users", "keys"]),
        "PoolAccessSet": _obj({"pools": {"oneOf": [names, {"type": "null"}]}}, ["pools"],
                              closed=True),
    }


def _schemas() -> dict[str, Any]:
    backend = _obj({
        "url": _STR, "kind": {"enum": [k.value for k in ApiKind]},
        "online": _BOOL, "draining": _BOOL, "breaker": {"enum": ["closed", "open", "half-open"]},
        "slots": _INT, "in_flight": _INT, "requests_done": _INT, "failures": _INT,
        "models": {"type": "array", "items": _STR}, "loaded": {"type": "array", "items": _STR},
        "version": {"type": ["string", "null"]}, "last_error": _STR,
        "pools": {"type": "array", "items": _STR, "description": "pools listing the backend"},
        "source": {"enum": ["config", "runtime"],
                   "description": "config: from the command line or the TOML file; "
                                  "runtime: added through the admin API"},
        "configured_slots": {"type": "integer",
                             "description": "slots in the configured entry (config only)"},
        "override": {"type": ["object", "null"], "properties": {"slots": _INT},
                     "description": "the runtime change replacing the configured entry, "
                                    "stored and applied on every replica and restart"},
    }, ["url", "kind", "online", "draining", "breaker", "slots", "in_flight"])
    user = _obj({
        "user": _STR, "vip": _BOOL, "boost": _BOOL, "weight": _INT, "blocked": _BOOL,
        "queued": _INT, "in_flight": _INT, "done": _INT, "dropped": _INT, "rejected": _INT,
        "prompt_tokens": _INT, "completion_tokens": _INT, "estimated_tokens": _INT,
        "last_ip": _STR, "last_seen": _NUM,
    }, ["user", "vip", "boost", "weight", "blocked"])
    scopes = {"type": "array", "items": {"type": "string", "enum": list(SCOPES)},
              "minItems": 1, "description": "inference: chat, generate, embed, show, /v1 and "
              "forwarded unknown paths; models: pull, push, create, copy, delete, blobs"}
    page = {"total": {"type": "integer", "description": "rows in all pages"},
            "limit": _INT, "offset": _INT}
    key_props = {"key_id": _STR, "user": _STR, "name": _STR, "created_at": _NUM,
                 "revoked": _BOOL, "trusted": _BOOL, "scopes": scopes}
    key_required = ["key_id", "user", "name", "created_at", "revoked", "trusted", "scopes"]
    return {
        "Error": _obj({"error": _STR}, ["error"]),
        "Backend": backend,
        "BackendList": _obj({"backends": {"type": "array", "items": _ref("Backend")},
                             "removed": {"type": "array", "items": _STR,
                                         "description": "configured backends removed at "
                                                        "runtime (removal overrides)"}},
                            ["backends"]),
        "BackendAdd": _obj({"url": _STR, "slots": _SLOTS}, ["url"], closed=True),
        "BackendSlots": _obj({"url": _STR, "slots": _SLOTS}, ["url", "slots"], closed=True),
        "BackendUrl": _obj({"url": _STR}, ["url"], closed=True),
        "Removed": _obj({"removed": _STR}, ["removed"]),
        "Alive": _obj({"status": {"enum": ["alive"]}}, ["status"]),
        "Readiness": _obj({
            "ready": _BOOL, "reasons": {"type": "array", "items": _STR},
            "backends_available": _INT, "backends_total": _INT,
            "redis": {"enum": ["off", "ok", "unreachable"]},
        }, ["ready", "reasons", "backends_available", "backends_total", "redis"]),
        "User": user,
        "UserList": _obj({"users": {"type": "array", "items": _ref("User")}, **page},
                         ["users", "total", "limit", "offset"]),
        "UserPatch": {**_obj({"vip": _BOOL, "boost": _BOOL, "weight": _SLOTS}, closed=True),
                      "minProperties": 1},
        "UserSettings": _obj({"user": _STR, "vip": _BOOL, "boost": _BOOL, "weight": _INT},
                             ["user", "vip", "boost", "weight"]),
        "UserBlocked": _obj({"user": _STR, "blocked": _BOOL}, ["user", "blocked"]),
        "Blocked": _obj({"users": {"type": "array", "items": _STR},
                         "ips": {"type": "array", "items": _STR},
                         "total_users": _INT, "total_ips": _INT},
                        ["users", "ips", "total_users", "total_ips"]),
        "IpBlock": _obj({"ip": {"type": "string", "description": "address or CIDR"}}, ["ip"],
                        closed=True),
        "KeyCreate": _obj({"user": _STR, "name": _STR, "trusted": _BOOL, "scopes": scopes},
                          ["user"], closed=True),
        "KeyPatch": _obj({"scopes": scopes}, ["scopes"], closed=True),
        "Key": _obj(key_props, key_required),
        "KeyCreated": _obj({**key_props, "secret": {
            "type": "string", "description": "the API key; not retrievable later"}},
            key_required + ["secret"]),
        "KeyList": _obj({"keys": {"type": "array", "items": _ref("Key")}, **page},
                        ["keys", "total", "limit", "offset"]),
        "KeyRevoked": _obj({"key_id": _STR, "revoked": _BOOL}, ["key_id", "revoked"]),
        "Stats": _obj({
            "uptime_s": _NUM, "queued": _INT, "in_flight": _INT, "completed": _INT,
            "cancelled": _INT, "failovers": _INT, "rejected": _INT, "prompt_tokens": _INT,
            "completion_tokens": _INT, "estimated_tokens": _INT, "latency_p50_s": _QUANTILE, "latency_p99_s": _QUANTILE,
            "ttfb_p50_s": _QUANTILE, "queue_wait_p99_s": _QUANTILE,
            "backends": {"type": "array", "items": _ref("Backend")}, "users": _INT,
            "build": {"enum": ["mypyc", "python", "mixed"],
                      "description": "whether the request path runs compiled (mypyc) or as Python"},
            "access_log": _obj({"written": _INT, "dropped": _INT, "pending": _INT},
                               ["written", "dropped", "pending"]),
            "store": _obj({"pending": _INT, "dropped": _INT}, ["pending", "dropped"]),
            "gc": _obj({"frozen": _INT, "collections": {"type": "array", "items": _INT}},
                       ["frozen", "collections"]),
            "shared_slots": {"type": ["object", "null"],
                             "description": "with --redis: `leases` (backend URL -> slots this "
                                            "replica holds), `degraded` (scheduling locally: "
                                            "Redis unreachable), `rounds`, `failures`"},
        }, ["uptime_s", "queued", "in_flight", "backends", "build"]),
    }


def build_openapi(metrics_public: bool = False) -> dict[str, Any]:
    """The whole document; `metrics_public` marks /metrics as needing no token."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ollamamq-fast admin API",
            "version": __version__,
            "description": "Control plane of an ollamamq-fast gateway: backends, users, "
                           "blocklist, API keys, live statistics and events. Every route "
                           "needs `Authorization: Bearer <admin token>`.",
        },
        "tags": [{"name": "admin", "description": "Operator actions"},
                 {"name": "observability", "description": "Statistics, events, metrics"},
                 {"name": "playground", "description": "The web chat playground"},
                 {"name": "pools", "description": "Pools of backends, access, required models"}],
        "security": [{"adminToken": []}],
        "paths": {**_paths(metrics_public), **_web_paths(), **_usage_paths(), **_pool_paths()},
        "components": {
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}},
            "schemas": {**_schemas(), **_usage_schemas(), **_pool_schemas()},
        },
    }
