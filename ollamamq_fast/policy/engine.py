"""The usage policy at admission: one object the data plane asks about each inference request.

Order of the checks (each one cheap; the body is read only where needed):

1. rate limit (token bucket)            -> 429 + Retry-After
2. token quotas (day / month / total)   -> 403
3. max_in_flight (waiting + running)    -> 429 + Retry-After
4. max_tokens cap (clamp or reject)     -> rewrite, or 400
5. response cache lookup                -> HIT answered here, no backend
6. stream usage injection               -> rewrite (the answer is filtered back)

max_queued is applied by the dispatcher, where a request would wait.
Everything runs on the event loop without locks and without waiting on the
store; only a Redis-backed cache lookup awaits (bounded, a miss on timeout).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Final

from ollamamq_fast.limits import QUOTA_NAMES, Limits, resolve
from ollamamq_fast.policy.cache import (
    CACHEABLE,
    DETERMINISM_KEYS,
    EMBEDDINGS,
    NO_CACHE,
    NO_STORE,
    RedisTier,
    ResponseCache,
    cache_key,
    is_deterministic,
)
from ollamamq_fast.policy.caps import (
    CAP_RULES,
    CapError,
    CapRule,
    Edit,
    cap_native,
    cap_openai,
    mirror_max_tokens,
    parse_object,
    sequences,
    splice,
)
from ollamamq_fast.policy.gate import (
    ADMIT,
    Admission,
    admitted,
    cached,
    pending,
    refused,
)
from ollamamq_fast.policy.quota import REFRESH_S, QuotaBook
from ollamamq_fast.policy.ratelimit import RateLimiter, RateSync, retry_after
from ollamamq_fast.policy.streamusage import INJECT_KEYS, INJECT_ROUTES, usage_edits
from ollamamq_fast.state.records import UserSettings
from ollamamq_fast.tasks import cancel_and_wait
from ollamamq_fast.wire.sniff import Sniffed, any_spelling

if TYPE_CHECKING:
    from ollamamq_fast.plane import DataPlane
    from ollamamq_fast.proxy.exchange import Exchange
    from ollamamq_fast.proxy.upstream import UpstreamConnection

log = logging.getLogger("ollamamq_fast.policy")

CHAT_COMPLETIONS: Final = b"/v1/chat/completions"
# `"stream"` in every spelling some server reads (any case for Go, `\u` escapes for
# every JSON decoder), without copying the body.
_ANY_STREAM: Final = any_spelling("stream")


def _mentions(body: bytes, text: str | None, word: str) -> bool:
    """Whether the body holds the ASCII `word`; `text` is the body as Latin-1, None if too large."""
    if text is not None:
        return word in text
    return body.find(word.encode()) >= 0


# Resolved limits are memoized per user; the memo is dropped beyond this many
# users rather than grown (a flood of ids costs a re-resolve, not memory).
MEMO_MAX: Final = 100_000
# Warnings about the store at most this often.
WARN_EVERY_S: Final = 10.0
# Full, idle rate buckets are dropped every this many background ticks.
FORGET_EVERY_TICKS: Final = 10
# A 200 stream that carries an error object (Ollama's mid-stream error line, or
# an SSE error event) is not an answer worth replaying.
_ERROR_MARK: Final = b'{"error"'


class Policy:
    """Limits, caps, quotas and the response cache for one gateway."""

    def __init__(self, state: DataPlane) -> None:
        self.state = state
        self.settings = state.settings
        self.limiter = RateLimiter(state.loop.time)
        self.sync: RateSync | None = None
        self.quota = QuotaBook(state.cache.flushed_usage)
        self.cache = ResponseCache(state.stats, state.loop.time)
        self.inject = True
        self.quotas_on = False
        self._memo: dict[str, tuple[UserSettings | None, Limits]] = {}
        self._keys: dict[tuple[bytes, bool, bool, bool, bool], tuple[str, ...]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._warned = 0.0
        self.reload()

    # -- Lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Load quota counts, start the background work (called by the gateway after the cache)."""
        settings = self.settings
        if settings.redis_url:
            self.sync = RateSync(self.limiter, self.state.cache.incr_window)
            self.sync.start()
            self.cache.remote = RedisTier(settings.redis_url)
        self.quotas_on, need_total = self._quota_flags()
        if self.quotas_on:
            await self.quota.refresh(need_total)
        self._loop_task = self.state.loop.create_task(self._background(), name="ollamamq-policy")

    async def stop(self) -> None:
        """Stop background work (called by the gateway before the cache stops)."""
        task, self._loop_task = self._loop_task, None
        await cancel_and_wait(task)
        if self.sync is not None:
            await self.sync.stop()
        if self.cache.remote is not None:
            await self.cache.remote.close()
            self.cache.remote = None

    def reload(self) -> None:
        """Settings changed (start, SIGHUP): re-resolve limits, resize the cache."""
        s = self.settings
        self.inject = s.stream_usage == "inject"
        self.cache.configure(s.cache_mode, s.cache_ttl, s.cache_mb)
        self._memo.clear()
        self._keys.clear()
        self.quotas_on = self.quotas_on or self._quota_flags()[0]

    def limits_changed(self) -> None:
        """A user's limits changed here (Operator.set_limits): start counting for quotas now."""
        self.quotas_on = self.quotas_on or self._quota_flags()[0]

    async def _background(self) -> None:
        """Refresh quota counts while any quota is configured; forget idle rate buckets."""
        ticks = 0
        while True:
            await asyncio.sleep(REFRESH_S)
            ticks += 1
            if ticks % FORGET_EVERY_TICKS == 0 and self.sync is None:
                self.limiter.forget_idle()  # the reconciler does it when shared
            self.quotas_on, need_total = self._quota_flags()
            if not self.quotas_on:
                continue
            try:
                await self.quota.refresh(need_total)
            except Exception as exc:  # noqa: BLE001 -- keep the last counts, retry next tick
                now = time.monotonic()
                if now - self._warned > WARN_EVERY_S:
                    self._warned = now
                    log.warning("quotas: cannot read usage from the store (%s); "
                                "using the last counts", exc)

    def _quota_flags(self) -> tuple[bool, bool]:
        """(any quota configured anywhere, any total quota) -- O(users), once a second."""
        layers: list[dict[str, Any]] = [self.settings.limits]
        layers.extend(self.settings.user_limits.values())
        layers.extend(u.limits for u in self.state.cache.users.values())
        on = any(layer.get(name) for layer in layers for name in QUOTA_NAMES)
        total = any(layer.get("quota_total") for layer in layers)
        return on, total

    # -- Reads ------------------------------------------------------------------------

    def limits_for(self, user: str) -> Limits:
        """A user's effective limits (memoized until their settings or the config change)."""
        stored = self.state.cache.users.get(user)
        memo = self._memo.get(user)
        if memo is not None and memo[0] is stored:
            return memo[1]
        settings = self.settings
        layers = [settings.limits, settings.user_limits.get(user, {})]
        if stored is not None:
            layers.append(stored.limits)
        limits = resolve(layers, settings.max_queue_per_user)
        if len(self._memo) >= MEMO_MAX:
            self._memo.clear()
        self._memo[user] = (stored, limits)
        return limits

    def body_keys(self, ex: Exchange, body: bytes, text: str | None) -> tuple[str, ...]:
        """Top-level body keys the policy must read for this request (sets `ex.limits`).

        The determinism and stream checks only need the keys when their names
        occur in the body at all: a substring test is far cheaper than reading
        spans. It looks for the lowercase names that clients send; a key
        spelled otherwise only makes a request uncacheable or its stream
        uncounted, never changes what is forwarded. `text` is the body decoded
        as Latin-1 (see latin1_text), None for a large body.
        """
        limits = ex.limits = self.limits_for(ex.user)
        path = ex.path
        cap = bool(limits.max_tokens) and path in CAP_RULES
        det = self.cache.mode == "deterministic" and path in CACHEABLE and path not in EMBEDDINGS
        inject = self.inject and path in INJECT_ROUTES
        mirror = (not cap and path == CHAT_COMPLETIONS
                  and _mentions(body, text, "max_completion_tokens"))
        if det and not (_mentions(body, text, "temperature")
                        or _mentions(body, text, "seed")):
            det = False
        if (inject and not _mentions(body, text, '"stream"')
                and _ANY_STREAM.search(body) is None):
            inject = False
        if not (cap or det or inject or mirror):
            return ()
        memo_key = (path, cap, det, inject, mirror)
        keys = self._keys.get(memo_key)
        if keys is None:
            native = path.startswith(b"/api/")
            wanted: list[str] = []
            if cap:
                rule = CAP_RULES[path]
                wanted += ["options"] if rule.native else [*rule.keys, rule.insert,
                                                            *rule.fanout,
                                                            *([rule.batch] if rule.batch else [])]
            if det:
                wanted += ["options"] if native else list(DETERMINISM_KEYS)
            if inject:
                wanted += INJECT_KEYS
            if mirror:
                wanted += ["max_tokens", "max_completion_tokens"]
            keys = self._keys[memo_key] = tuple(dict.fromkeys(wanted))
        return keys

    # -- Admission ----------------------------------------------------------------------

    def admit(self, ex: Exchange, body: bytes, sn: Sniffed | None,
              readable: bool = True) -> Admission:
        """Apply the policy to an inference request whose model is known (called by the exchange).

        `sn` holds the top-level values `body_keys` asked for (None when none
        were needed); `readable` is False for a compressed body. Returns what
        to do (policy/gate.py): the shared ADMIT for the usual request.
        """
        limits = ex.limits
        if limits is None:
            limits = ex.limits = self.limits_for(ex.user)
        if sn is None and readable and not limits.checks_requests and not (
                self.cache.enabled and (self.cache.mode == "all" or ex.path in EMBEDDINGS)):
            # Nothing to check, cap, look up or rewrite: the usual request.
            return ADMIT
        if limits.rate > 0:
            wait = self.limiter.take(ex.user, limits.rate, limits.burst)
            if wait:
                after = retry_after(wait)
                return refused(429, f"rate limit exceeded for user {ex.user!r}: "
                               f"{limits.rate:g} requests/s, bursts of {limits.burst:g}; "
                               f"retry in {after} s", after, reason="rate")
        if limits.has_quota:
            why = self.quota.exceeded(ex.user, limits)
            if why is not None:
                return refused(403, why, reason="quota")
        if limits.max_in_flight:
            ustats = ex.ustats
            if ustats is not None and ustats.in_flight + ustats.queued >= limits.max_in_flight:
                return refused(429, f"too many requests in flight for user {ex.user!r}: at "
                               f"most {limits.max_in_flight} at once; retry when one finishes", 1,
                               reason="in_flight")
        path = ex.path
        rule = CAP_RULES.get(path) if limits.max_tokens else None
        if not readable:
            # A compressed body (zstd on /v1/responses) cannot be read or rewritten.
            if rule is not None:
                return refused(400, "this gateway caps max_tokens and cannot check a "
                                    "compressed request body; send it uncompressed",
                               rejected=False)
            if limits.has_quota and self.inject and path in INJECT_ROUTES:
                # A stream that does not ask for usage reports no prompt tokens: the
                # quota would count an estimate of the answer alone (a server that
                # ignores Content-Encoding reads the body as it is, unasked).
                return refused(400, "this gateway counts tokens against a quota and cannot "
                                    "ask a compressed request body for its usage; send it "
                                    "uncompressed", rejected=False)
            return ADMIT
        native = path.startswith(b"/api/")
        options = None
        span = sn.spans.get("options") if native and sn is not None else None
        if span is not None:
            options = parse_object(body[span[0] : span[1]])
        edits: list[Edit] = []
        if rule is not None and sn is not None:
            try:
                if rule.native:
                    edits = cap_native(body, sn, options, limits.max_tokens, limits.reject_over_cap)
                else:
                    edits = self._cap_openai(body, sn, rule, limits.max_tokens,
                                             limits.reject_over_cap)
            except CapError as exc:
                return refused(400, str(exc), rejected=False)
        capped = bool(edits)
        if rule is None and sn is not None and path == CHAT_COMPLETIONS:
            mirrored = mirror_max_tokens(body, sn)
            if mirrored is not None:
                edits.append(mirrored)
        cache = self.cache
        key = None
        if (cache.enabled and path in CACHEABLE and not ex.http10
                and not ex.cache_control & NO_STORE
                and (cache.mode == "all" or path in EMBEDDINGS
                     or (sn is not None and is_deterministic(native, body, sn, options)))):
            key = cache_key(path, ex.url, ex.model or "", limits.max_tokens if rule else 0, body,
                            ex.credential, ex.pool.name)
            if key is not None and not ex.cache_control & NO_CACHE:
                entry = cache.get(key)
                if entry is not None:
                    return cached(entry)
                if cache.remote is not None:
                    task = self.state.loop.create_task(
                        self._remote_lookup(path, key, body, sn, edits, capped))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                    return pending(task)
        return self._finish(path, body, sn, edits, key, capped)

    @staticmethod
    def _cap_openai(body: bytes, sn: Sniffed, rule: CapRule, cap: int,
                    reject: bool) -> list[Edit]:
        """cap_openai, with the cap shared by the sequences `n` / `best_of` ask for."""
        many = sequences(body, sn, rule) if rule.fanout or rule.batch else 1
        if many == 1:
            return cap_openai(body, sn, rule, cap, reject)
        share = cap // many
        if share < 1:
            raise CapError(f"n / best_of / a prompt list ask for {many} sequences, more "
                           f"than this gateway's cap of {cap} tokens allows (one token "
                           "each); ask for fewer")
        try:
            return cap_openai(body, sn, rule, share, reject)
        except CapError as exc:
            raise CapError(f"{exc} (this gateway's cap of {cap} tokens is shared by the "
                           f"{many} sequences n / best_of / a prompt list ask for)"
                           ) from None

    def _finish(self, path: bytes, body: bytes, sn: Sniffed | None, edits: list[Edit],
                key: bytes | None, capped: bool) -> Admission:
        """Last step: ask for stream usage if needed, apply all rewrites at once."""
        strip = 0
        if self.inject and sn is not None:
            per_chunk = INJECT_ROUTES.get(path)
            if per_chunk is not None:
                usage = usage_edits(body, sn)
                if usage:
                    edits.extend(usage)
                    strip = 2 if per_chunk else 1
        return admitted(splice(body, edits) if edits else None, key, strip, capped,
                        cache_miss=key is not None)

    async def _remote_lookup(self, path: bytes, key: bytes, body: bytes, sn: Sniffed | None,
                             edits: list[Edit], capped: bool) -> Admission:
        """The PENDING answer: the shared cache tier, else admit as a miss."""
        cache = self.cache
        remote = cache.remote
        entry = await remote.get(key, self.state.loop.time) if remote is not None else None
        if entry is not None and entry.status == 200:
            cache.adopt(key, entry)
            return cached(entry)
        return self._finish(path, body, sn, edits, key, capped)

    # -- After the response -----------------------------------------------------------

    def tokens_used(self, user: str, prompt: int, completion: int) -> None:
        """A request finished with these token counts (called by the exchange)."""
        if self.quotas_on:
            self.quota.note(user, prompt + completion)

    def response_done(self, ex: Exchange, conn: UpstreamConnection) -> None:
        """Keep a cacheable 200 answer (called by the exchange when the response ended)."""
        tee = conn.tee
        key = ex.cache_key
        if tee is None or key is None or conn.status != 200 or conn.tail().find(_ERROR_MARK) >= 0:
            return
        self.cache.put(key, conn.status, conn.response_headers.pairs(), b"".join(tee))
