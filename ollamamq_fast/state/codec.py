"""JSON encoding of state records, shared by both stores.

Decoding keeps only the fields this version knows, so a replica running an
older gateway next to a newer one (during a rolling upgrade) reads records that
carry extra fields instead of failing on them.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import orjson

from ollamamq_fast.wire.errors import printable_message

from .records import (
    DEFAULT_SCOPES,
    SCOPES,
    BackendRecord,
    KeyRecord,
    UserSettings,
    parse_scopes,
)


def storable(name: str) -> str:
    """A usage row's name (user, key, model, backend) as the stores can write it.

    A model name a client sent can hold a lone UTF-16 surrogate; UTF-8 (SQLite,
    Redis, orjson) cannot encode one, and a failed batch is kept and retried,
    so one such name would block every later usage write. It is stored with
    U+FFFD instead, as Go's decoder (Ollama) reads it.
    """
    return name if name.isascii() else printable_message(name)


def dumps(rec: KeyRecord | UserSettings | BackendRecord) -> bytes:
    """Encode one record as compact JSON; called by the stores on every put."""
    return orjson.dumps(asdict(rec))


def _obj(raw: bytes | str) -> dict[str, Any]:
    """Parse a JSON object or fail with a message that names the problem."""
    value = orjson.loads(raw)
    if not isinstance(value, dict):
        raise TypeError(f"state record is not a JSON object: {raw!r:.80}")
    return value


def limits_from(value: object) -> dict[str, float | int]:
    """Keep only numeric limits; called when decoding user settings from either store."""
    if not isinstance(value, dict):
        return {}
    return {
        str(k): v
        for k, v in value.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def load_key(raw: bytes | str) -> KeyRecord:
    """Decode a KeyRecord written by `dumps`."""
    d = _obj(raw)
    return KeyRecord(
        key_id=str(d["key_id"]),
        digest=str(d["digest"]),
        user=str(d["user"]),
        name=str(d.get("name", "")),
        created_at=float(d.get("created_at", 0.0)),
        revoked=bool(d.get("revoked", False)),
        trusted=bool(d.get("trusted", False)),
        scopes=_scopes(d.get("scopes")),
    )


def _scopes(value: object) -> tuple[str, ...]:
    """A stored key's scopes; a record written before scopes existed gets the default."""
    try:
        return parse_scopes(value) if value is not None else DEFAULT_SCOPES
    except ValueError:  # a scope a newer gateway knows: keep the ones we know
        known = [v for v in value if v in SCOPES] if isinstance(value, list) else []
        return tuple(known) or DEFAULT_SCOPES


def load_user(raw: bytes | str) -> UserSettings:
    """Decode a UserSettings written by `dumps`."""
    d = _obj(raw)
    return UserSettings(
        user=str(d["user"]),
        vip=bool(d.get("vip", False)),
        boost=bool(d.get("boost", False)),
        weight=int(d.get("weight", 1)),
        limits=limits_from(d.get("limits")),
    )


def load_backend(raw: bytes | str) -> BackendRecord:
    """Decode a BackendRecord written by `dumps`."""
    d = _obj(raw)
    slots = d.get("slots")
    return BackendRecord(url=str(d["url"]), slots=None if slots is None else int(slots),
                         removed=bool(d.get("removed", False)))
