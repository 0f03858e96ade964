"""Exact-match response cache: repeated questions cost no GPU second.

Key: blake3 of the request URL, the normalized model, the max_tokens cap that
applied, and a canonical form of the body (orjson with sorted keys, so key
order and whitespace do not matter; bodies over CANONICAL_MAX_BODY, or holding
integers orjson would round or numbers beyond a float's range, are keyed by
their raw bytes instead).

What is cached: 200 responses of inference routes, as the raw bytes that were
forwarded to the client (a stream's chunk framing included), so a HIT replays
the same byte stream without calling a backend. By default (`deterministic`)
only requests whose answer is reproducible: temperature 0, a fixed seed, or an
embedding. `all` caches every inference request; `off` none. A request with
`Cache-Control: no-cache` is not answered from the cache (its answer refreshes
the entry); `no-store` bypasses the cache entirely. HTTP/1.0 clients bypass it.

Storage: an in-memory LRU bounded by a byte budget, entries expire after the
TTL, and an entry larger than `entry_limit` is not kept. With `--redis` the
entries are also written to Redis (with the TTL as expiry) and a local miss is
looked up there, so replicas share answers; Redis bounds its own memory
(maxmemory policy), this process bounds only its local tier.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import blake3
import orjson

from ollamamq_fast.wire.sniff import Sniffed, SniffError, duplicate_members, key_text

if TYPE_CHECKING:
    from ollamamq_fast.stats import GatewayStats

log = logging.getLogger("ollamamq_fast.policy")

CACHE_MODES: Final = ("deterministic", "all", "off")
DEFAULT_TTL_S: Final = 300.0
DEFAULT_MB: Final = 64.0
# Canonicalizing means a full parse on the event loop; above this size (images)
# the raw bytes are the key, which still matches a client repeating itself.
CANONICAL_MAX_BODY: Final = 256 * 1024
# One answer may take at most this share of the budget, and never more than
# MAX_ENTRY_BYTES: a few huge answers must not flush every other entry.
ENTRY_SHARE: Final = 8
MAX_ENTRY_BYTES: Final = 8 * 1024 * 1024
# Bookkeeping per entry beyond its bytes (dict slot, object, key), for the budget.
ENTRY_OVERHEAD: Final = 200
# A Redis lookup slower than this counts as a miss: the backend is the fallback.
REDIS_TIMEOUT_S: Final = 0.05

CACHEABLE: Final = frozenset({
    b"/api/generate", b"/api/chat", b"/api/embed", b"/api/embeddings",
    b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings",
})
EMBEDDINGS: Final = frozenset({b"/api/embed", b"/api/embeddings", b"/v1/embeddings"})
DETERMINISM_KEYS: Final = ("temperature", "seed")  # OpenAI: top level; Ollama: inside options

# Request Cache-Control directives the cache honours (RFC 9111 §5.2.1).
NO_CACHE: Final = 1  # do not answer from the cache (the answer still refreshes it)
NO_STORE: Final = 2  # neither answer from nor store in the cache

# orjson turns integers beyond 64 bits into floats, which could make two
# different bodies one key: such bodies are keyed by their raw bytes.
_BIG_INT: Final = re.compile(rb"\d{20}")


def cache_control(value: bytes) -> int:
    """NO_CACHE / NO_STORE flags of a request's Cache-Control header."""
    v = value.lower()
    flags = 0
    if v.find(b"no-store") >= 0:
        flags |= NO_STORE
    if v.find(b"no-cache") >= 0 or v.find(b"max-age=0") >= 0:
        flags |= NO_CACHE
    return flags


class Entry:
    """One cached response: status, backend headers (no Date), the forwarded body bytes."""

    __slots__ = ("body", "expires", "headers", "size", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
                 expires: float) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.expires = expires
        self.size = len(body) + sum(len(n) + len(v) + 4 for n, v in headers) + ENTRY_OVERHEAD

    def pack(self) -> bytes:
        """Serialized for Redis."""
        head = b"\r\n".join(n + b": " + v for n, v in self.headers)
        return struct.pack("!HI", self.status, len(head)) + head + self.body

    @classmethod
    def unpack(cls, data: bytes, expires: float) -> Entry:
        """The inverse of `pack` (ValueError on garbage)."""
        status, hlen = struct.unpack_from("!HI", data)
        head = data[6 : 6 + hlen]
        headers = []
        for line in head.split(b"\r\n") if head else []:
            name, sep, value = line.partition(b": ")
            if not sep:
                raise ValueError("bad cached header")
            headers.append((name, value))
        return cls(status, headers, data[6 + hlen :], expires)


def is_deterministic(native: bool, body: bytes, sn: Sniffed,
                     options: dict[str, Any] | None) -> bool:
    """Temperature 0 or a fixed seed (top level for OpenAI, `options` for Ollama)."""
    if native:
        if options is None:
            return False
        temp = options.get("temperature")
        seed = options.get("seed")
        if isinstance(temp, int | float) and not isinstance(temp, bool) and temp == 0:
            return True
        return isinstance(seed, int | float) and not isinstance(seed, bool) and _integral(seed)
    span = _exact_span(sn, "temperature")
    if span is not None and _raw_num(body[span[0] : span[1]]) == 0:
        return True
    span = _exact_span(sn, "seed")
    if span is not None:
        seed = _raw_num(body[span[0] : span[1]])
        return seed is not None and _integral(seed)
    return False


def _exact_span(sn: Sniffed, key: str) -> tuple[int, int] | None:
    """The value span of `key` when the member every server reads is spelled exactly.

    Go (Ollama) reads `"Temperature"` too, an exact-name server (vLLM, llama.cpp)
    does not and samples at its default: such a body is not deterministic to it.
    """
    seen = sn.occurrences.get(key)
    if not seen:
        return None
    raw, start, end = seen[-1]
    if raw != key.encode() and key_text(raw) != key:
        return None
    return start, end


def _integral(value: float) -> bool:
    return math.isfinite(value) and value == int(value)


def _raw_num(raw: bytes) -> float | None:
    if b"-0123456789".find(raw[:1]) < 0:
        return None
    try:
        return float(raw)
    except ValueError:
        return None


def cache_key(path: bytes, url: bytes, model: str, cap: int, body: bytes,
              credential: bytes = b"", pool: str = "") -> bytes | None:
    """The entry key, or None for a request that must not be cached.

    Not cached: a model load or unload (no prompt / no messages), and any body
    with duplicate keys at any depth (above CANONICAL_MAX_BODY, where the raw
    bytes are the key, at the top level). Ollama's Go decoder merges duplicate
    objects and reuses array elements, so such a body means something other
    than what a last-duplicate-wins parse (orjson's) says, and two different
    requests could share one key: that is how a cache gets poisoned. Keys that
    differ only in case count as duplicates, since Go matches field names
    case-insensitively. `credential` is the client's own Authorization when
    the gateway does not own it (auth off): a backend that checks it decides
    per credential, so the answer is kept per credential too. `pool` is the
    pool's name: pools have their own backends (another model may stand behind
    a name) and access rules, so an answer is replayed only in its own pool.
    """
    canonical = body
    if len(body) <= CANONICAL_MAX_BODY:
        try:
            obj = json.loads(body, object_pairs_hook=_unique_members, parse_constant=_no_constant,
                             parse_float=_finite)
        except _DuplicateKey:
            return None
        except (ValueError, RecursionError):
            obj = None  # e.g. trailing bytes, which Go ignores: keep the raw bytes
        if isinstance(obj, dict):
            if path == b"/api/generate" and not obj.get("prompt"):
                return None  # a model load or unload, not a question
            if path == b"/api/chat" and not obj.get("messages"):
                return None
            if _BIG_INT.search(body) is None:
                try:
                    canonical = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
                except TypeError:
                    # A lone surrogate escape (`"\ud800"`): Go reads it as U+FFFD,
                    # json.loads keeps it. Too odd to be worth a key: not cached.
                    return None
    elif _duplicate_members(body):
        # Too large to parse on the event loop: keyed by its exact bytes, so only
        # a byte-identical request (which the backend reads the same) can hit.
        return None
    h = blake3.blake3(url)
    h.update(b"\0%s\0%d\0%d\0%s\0" % (model.encode("utf-8", "surrogatepass"), cap,
                                         len(credential), pool.encode("utf-8", "surrogatepass")))
    h.update(credential)
    h.update(canonical)
    return h.digest()


class _DuplicateKey(Exception):
    """A JSON object holds the same key twice (up to case)."""


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs) or len({k.casefold() for k in obj}) != len(obj):
        raise _DuplicateKey
    return obj


def _no_constant(name: str) -> Any:
    # NaN and Infinity are not JSON (Go refuses them): key such a body by its bytes.
    raise ValueError(name)


def _finite(text: str) -> float:
    # A number beyond a float's range is read as infinity, which orjson writes as
    # null: such a body and the same one with null would share a key (Go refuses
    # the number, an exact backend may take it). Keyed by its bytes instead.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _duplicate_members(body: bytes) -> bool:
    try:
        return duplicate_members(body)
    except SniffError:
        return False  # unreadable: the backend refuses it, and only its own bytes match


class ResponseCache:
    """The local LRU tier plus the optional Redis tier."""

    def __init__(self, stats: GatewayStats, clock: Callable[[], float]) -> None:
        self.stats = stats
        self.clock = clock
        self.mode = "deterministic"
        self.ttl = DEFAULT_TTL_S
        self.max_bytes = int(DEFAULT_MB * 1024 * 1024)
        self.entries: OrderedDict[bytes, Entry] = OrderedDict()
        self.bytes = 0
        self.remote: RedisTier | None = None

    @property
    def enabled(self) -> bool:
        """Whether anything may be cached."""
        return self.mode != "off" and self.max_bytes > 0

    @property
    def entry_limit(self) -> int:
        """The largest answer kept (bytes as forwarded)."""
        return min(self.max_bytes // ENTRY_SHARE, MAX_ENTRY_BYTES)

    def configure(self, mode: str, ttl: float, mb: float) -> None:
        """Apply settings (start and reload); shrinks to a smaller budget at once."""
        self.mode = mode
        self.ttl = ttl
        self.max_bytes = int(mb * 1024 * 1024)
        if not self.enabled:
            self.clear()
        self._evict()

    def get(self, key: bytes) -> Entry | None:
        """A live local entry (moved to the LRU's young end), or None."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry.expires <= self.clock():
            self._drop(key)
            return None
        self.entries.move_to_end(key)
        return entry

    def put(self, key: bytes, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
            share: bool = True) -> None:
        """Keep an answer (the caller checked status and size); also in Redis if shared."""
        kept = [(n, v) for n, v in headers if n.lower() != b"date"]
        entry = Entry(status, kept, body, self.clock() + self.ttl)
        self._insert(key, entry)
        if share and self.remote is not None:
            self.remote.put(key, entry, self.ttl)

    def _insert(self, key: bytes, entry: Entry) -> None:
        if len(entry.body) > self.entry_limit:
            return
        if key in self.entries:
            self._drop(key)
        self.entries[key] = entry
        self.bytes += entry.size
        self._evict()
        self._publish()

    def adopt(self, key: bytes, entry: Entry) -> None:
        """Keep locally an entry found in Redis."""
        self._insert(key, entry)

    def clear(self) -> None:
        """Forget every local entry."""
        self.entries.clear()
        self.bytes = 0
        self._publish()

    def _evict(self) -> None:
        entries = self.entries
        evicted = 0
        while self.bytes > self.max_bytes and entries:
            _, old = entries.popitem(last=False)
            self.bytes -= old.size
            evicted += 1
        if evicted:
            self.stats.cache_evictions += evicted
            self._publish()

    def _drop(self, key: bytes) -> None:
        old = self.entries.pop(key)
        self.bytes -= old.size
        self._publish()

    def _publish(self) -> None:
        stats = self.stats
        stats.cache_bytes = self.bytes
        stats.cache_entries = len(self.entries)


class RedisTier:
    """Entries shared through Redis: `{namespace}:rc:{key hex}` with a TTL."""

    def __init__(self, url: str, namespace: str = "ollamamq") -> None:
        import redis.asyncio as aioredis  # only with --redis

        self.redis: Any = aioredis.Redis.from_url(url)
        self.prefix = f"{namespace}:rc:"
        self.tasks: set[asyncio.Task[None]] = set()
        self.errors = 0

    async def get(self, key: bytes, clock: Callable[[], float]) -> Entry | None:
        """The entry from Redis, or None (missing, slow, unreachable, garbage)."""
        name = self.prefix + key.hex()
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                pipe = self.redis.pipeline(transaction=False)
                pipe.get(name)
                pipe.pttl(name)
                data, pttl = await pipe.execute()
            if data is None:
                return None
            return Entry.unpack(bytes(data), clock() + max(0, int(pttl)) / 1000)
        except (Exception, TimeoutError) as exc:  # noqa: BLE001 -- any failure is a miss
            self._failed(exc)
            return None

    def put(self, key: bytes, entry: Entry, ttl: float) -> None:
        """Write an entry in the background (the response is already on its way)."""
        task = asyncio.get_running_loop().create_task(self._put(key, entry.pack(), ttl))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _put(self, key: bytes, data: bytes, ttl: float) -> None:
        try:
            await self.redis.set(self.prefix + key.hex(), data, px=max(1, int(ttl * 1000)))
        except Exception as exc:  # noqa: BLE001 -- a cache write may fail
            self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        if self.errors in (1, 10, 100) or self.errors % 1000 == 0:
            log.warning("response cache: Redis tier unavailable (%r); %d failures so far",
                        exc, self.errors)

    async def close(self) -> None:
        """Finish pending writes and close the connection pool."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=1.0)
        await self.redis.aclose()
