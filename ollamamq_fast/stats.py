"""Live counters of the data plane: plain integers and fixed-bucket histograms.

The hot path only adds to ints and list slots (no locks, no prometheus-client
calls, which take a lock per update); the control plane reads these at scrape
time and renders Prometheus or JSON from them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Final

from mypy_extensions import i64

# Latency buckets in seconds: sub-millisecond proxy overheads up to long generations.
# Not Final: mypyc leaves a Final that is a default argument unset (NameError).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# Per-user series are kept for at most this many users (the most recently seen
# evict the least recently seen), so a flood of distinct ids cannot grow memory
# or metric cardinality without bound.
MAX_TRACKED_USERS = 10_000
# How much of the table one eviction frees: a tenth.
EVICT_DIVISOR: Final = 10

# The counts' keys: Ollama's final line, then OpenAI's `usage` object. The
# quote before each name keeps `"eval_count"` from matching inside
# `"prompt_eval_count"`; the closing quote keeps `"prompt_tokens"` from
# matching `"prompt_tokens_details"`. Text, not bytes: the tail is searched
# as Latin-1 text (see tokens_in_tail).
_OLLAMA_PROMPT: Final = '"prompt_eval_count"'
_OLLAMA_COMPLETION: Final = '"eval_count"'
_OPENAI_PROMPT: Final = '"prompt_tokens"'
_OPENAI_COMPLETION: Final = '"completion_tokens"'
# The tail's end searched first (see tokens_in_tail): Ollama's final line ends
# with its counts and two durations, about 100 bytes.
NEAR_BYTES: Final = 256
# Bytes after a count's key within which its value must end (spaces, the
# colon and 20 digits).
_COUNT_SPAN: Final = 40
# A token count has at most this many digits; more is no count. A trillion
# tokens is beyond any model's context, and the stores' sums (64-bit: SQLite
# turns an overflow into a float, Redis refuses the write) then need millions
# of such answers in one user's day to overflow, where 18 digits needed ten.
_COUNT_DIGITS: Final = 12


def tokens_in_tail(tail: bytes) -> tuple[int, int]:
    """(prompt, completion) token counts from a response's last bytes.

    The final NDJSON line carries `prompt_eval_count`/`eval_count`; OpenAI
    bodies and usage chunks carry `usage.prompt_tokens`/`completion_tokens`.
    An embedding answer has only the prompt count. Only the tail is searched,
    from its end (`rfind`): no JSON parse of the stream. Spaces around the
    colon are allowed (some servers write `"eval_count": 5`).

    The tail's last NEAR_BYTES are looked at first (ollama_counts_near); the
    rest is read only when both of Ollama's counts are not there.
    """
    if len(tail) > NEAR_BYTES:
        found = ollama_counts_near(tail[-NEAR_BYTES:])
        if found is not None:
            return found
    return whole_tail_counts(tail)


def ollama_counts_near(near: bytes) -> tuple[int, int] | None:
    """Ollama's two counts when both keys are in `near`, a tail's last NEAR_BYTES; else None.

    Ollama's counts end its final line (two durations follow them), so for
    Ollama answers the rest of the tail need not be decoded. The last
    occurrence of a key in such a suffix is its last in the whole tail, so
    this agrees with whole_tail_counts whenever it answers.

    The bytes are decoded as Latin-1, byte for byte, so that the searches are
    str.rfind: compiled, a direct call, where bytes.rfind goes through
    Python's argument parsing (about 900 instructions each). Indexes are the
    same in both.
    """
    text = near.decode("latin-1")
    i = text.rfind(_OLLAMA_COMPLETION)
    j = text.rfind(_OLLAMA_PROMPT)
    if i >= 0 and j >= 0:  # what _counts gives when both keys are there
        return (_int_at(near, j + len(_OLLAMA_PROMPT)),
                _int_at(near, i + len(_OLLAMA_COMPLETION)))
    return None


def whole_tail_counts(tail: bytes) -> tuple[int, int]:
    """tokens_in_tail's answer from the whole tail: Ollama's keys, else OpenAI's, else (0, 0)."""
    text = tail.decode("latin-1")
    found = _counts(tail, text, _OLLAMA_PROMPT, _OLLAMA_COMPLETION)
    if found is None:
        found = _counts(tail, text, _OPENAI_PROMPT, _OPENAI_COMPLETION)
    return found if found is not None else (0, 0)


def _counts(tail: bytes, text: str, prompt_key: str, completion_key: str) -> tuple[int, int] | None:
    """The two counts under these keys (0 for a missing one); None when neither is there."""
    i = text.rfind(completion_key)
    j = text.rfind(prompt_key)
    if i >= 0:
        return (_int_at(tail, j + len(prompt_key)) if j >= 0 else 0,
                _int_at(tail, i + len(completion_key)))
    if j >= 0:
        return _int_at(tail, j + len(prompt_key)), 0
    return None


def _int_at(data: bytes, at: i64) -> int:
    """The number after the key ending at `at` (a colon, spaces around it); 0 if none.

    A count is followed by the next member or the object's end; anything else
    (a string, null, a negative or fractional number, more than
    _COUNT_DIGITS digits) counts as none. Byte by byte on native integers
    rather than find/slice/int(): compiled, this is a few dozen instructions,
    where each bytes method call costs a thousand.
    """
    n: i64 = len(data)
    end: i64 = at + _COUNT_SPAN
    if end > n:  # noqa: PLR1730 - a compare, not a call, on the per-request path
        end = n
    i = _skip_space(data, at, end)
    if i >= end or data[i] != 0x3A:  # ':'
        return 0
    i = _skip_space(data, i + 1, end)
    value: i64 = 0
    first = i
    while i < end:
        c: i64 = data[i]
        if c < 0x30 or c > 0x39:
            break
        if i - first == _COUNT_DIGITS:
            return 0
        value = value * 10 + (c - 0x30)
        i += 1
    if i == first:
        return 0
    i = _skip_space(data, i, n)
    if i < n and (data[i] == 0x2C or data[i] == 0x7D):  # ',' or '}'
        return value
    return 0


def _skip_space(data: bytes, i: i64, end: i64) -> i64:
    """The index of the first non-space byte at or after `i` (JSON's four spaces), or `end`."""
    while i < end:
        c: i64 = data[i]
        if c != 0x20 and c != 0x0A and c != 0x0D and c != 0x09:
            return i
        i += 1
    return end


def _last_seen(s: UserStats) -> float:
    return s.last_seen


class Count:
    """One counter in a table: a native field, so counting is one lookup and an
    integer add (a dict of ints is looked up twice and boxes every sum)."""

    def __init__(self) -> None:
        self.n = 0


class Histogram:
    """Cumulative-ready bucket counts, sum, count, and the extremes seen."""

    __slots__ = ("bounds", "count", "counts", "high", "low", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0
        self.low = float("inf")  # smallest observation
        self.high = 0.0  # largest observation

    def observe(self, value: float) -> None:
        """Record one observation (O(log buckets))."""
        # bisect_left by hand: compiled, a few compares instead of a call
        # through the C API (about 800 instructions on every request).
        bounds = self.bounds
        lo = 0
        hi = len(bounds)
        while lo < hi:
            mid = (lo + hi) >> 1
            if bounds[mid] < value:
                lo = mid + 1
            else:
                hi = mid
        counts = self.counts
        seen: int = counts[lo]  # typed: a native add, not the generic +=
        counts[lo] = seen + 1
        self.total += value
        self.count += 1
        # Compares, not max()/min(): no call on the per-request path.
        if value > self.high:  # noqa: PLR1730
            self.high = value
        if value < self.low:  # noqa: PLR1730
            self.low = value

    def quantile(self, q: float) -> float:
        """Estimated quantile, interpolated linearly within the bucket that holds it.

        Reporting the bucket's upper edge would round p50 of 2.6 s to 5 s; as
        Prometheus' histogram_quantile does, assume the bucket's observations
        are spread evenly. The answer stays within the smallest and largest
        observations (which also bound the open last bucket).
        """
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        last = len(self.bounds)
        for i, n in enumerate(self.counts):
            if n and seen + n >= rank:
                lo = self.bounds[i - 1] if i > 0 else 0.0
                hi = self.bounds[i] if i < last else self.high
                value = lo + (hi - lo) * max(0.0, rank - seen) / n
                return min(max(value, self.low), self.high)
            seen += n
        return self.high


class UserStats:
    """What the gateway knows about one user's traffic."""

    __slots__ = (
        "completion_tokens",
        "done",
        "dropped",
        "estimated_tokens",
        "in_flight",
        "last_ip",
        "last_seen",
        "prompt_tokens",
        "queued",
        "rejected",
        "user",
    )

    def __init__(self, user: str) -> None:
        self.user = user
        self.queued = 0
        self.in_flight = 0
        self.done = 0
        self.dropped = 0
        self.rejected = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        # Of those tokens, how many were estimated from stream events rather
        # than reported by the backend (shown beside the totals).
        self.estimated_tokens = 0
        self.last_ip = ""
        self.last_seen = 0.0

    def snapshot(self) -> dict[str, object]:
        """JSON-ready view (listed, not read from __slots__: compiled classes have none)."""
        return {
            "user": self.user,
            "queued": self.queued,
            "in_flight": self.in_flight,
            "done": self.done,
            "dropped": self.dropped,
            "rejected": self.rejected,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "estimated_tokens": self.estimated_tokens,
            "last_ip": self.last_ip,
            "last_seen": self.last_seen,
        }


@dataclass
class GatewayStats:
    """Gateway-wide counters, keyed for Prometheus labels."""

    started: float = field(default_factory=time.time)
    # (route path, status, backend url) -> count
    responses: dict[tuple[str, int, str], Count] = field(default_factory=dict)
    cancelled: int = 0
    failovers: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Tokens estimated from stream events (a backend that reports no usage, a
    # stream cut short); included in the totals above.
    estimated_tokens: int = 0
    queue_wait: Histogram = field(default_factory=Histogram)
    ttfb: Histogram = field(default_factory=Histogram)
    latency: Histogram = field(default_factory=Histogram)
    users: dict[str, UserStats] = field(default_factory=dict)
    # Completed requests and tokens, for per-second rates on dashboards.
    completed: int = 0
    # Usage policy (policy/): refusals by rate limit, quota and max_in_flight
    # (also counted in `rejected`), requests whose max_tokens was capped.
    rate_limited: int = 0
    quota_refused: int = 0
    limit_refused: int = 0
    tokens_capped: int = 0
    # Response cache: lookups answered / not, and the local tier's size
    # (bytes and entries are gauges; evictions count LRU budget evictions).
    cache_hits: int = 0
    cache_misses: int = 0
    cache_bytes: int = 0
    cache_entries: int = 0
    cache_evictions: int = 0
    # The last response's key parts and its counter: consecutive responses
    # mostly share them (one route, one backend, 200), and identity tests cost
    # less than building and hashing the key tuple.
    last_path: str = ""
    last_status: int = 0
    last_backend: str = ""
    last_count: Count = field(default_factory=Count)

    def user(self, user: str) -> UserStats:
        """The stats of a user, created on first sight (bounded, LRU-evicted)."""
        users = self.users
        stats = users.get(user)
        if stats is None:
            if len(users) >= MAX_TRACKED_USERS:
                self._evict()
            stats = users[user] = UserStats(user)
        return stats

    def _evict(self) -> None:
        # Drop the idle users seen longest ago (users with work in the gateway
        # stay), a tenth of the table at a time: one scan per thousand new users
        # in a flood of distinct ids, not one per new user.
        idle = [s for s in self.users.values() if not s.queued and not s.in_flight]
        idle.sort(key=_last_seen)
        for victim in idle[: max(1, len(self.users) // EVICT_DIVISOR)]:
            del self.users[victim.user]

    def response(self, path: str, status: int, backend: str) -> None:
        """Count one finished response."""
        if path is self.last_path and status == self.last_status and backend is self.last_backend:
            count = self.last_count
        else:
            key = (path, status, backend)
            found = self.responses.get(key)
            if found is None:
                found = self.responses[key] = Count()
            count = found
            self.last_path = path
            self.last_status = status
            self.last_backend = backend
            self.last_count = count
        count.n += 1
        self.completed += 1
