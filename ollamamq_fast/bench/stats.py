"""Statistics for the load generator: mergeable histograms, percentiles, Jain's index.

Everything here is plain data that pickles cheaply, because worker processes
send their results to the parent, which merges them. Nothing here does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# Histogram layout (log-linear, like HdrHistogram with 2 significant digits):
# values below 2**(SUB_BITS + 1) get one bucket each (exact); above that every
# power of two is split into 2**SUB_BITS buckets, so a bucket is at most
# 1/128 of its value wide and the midpoint we report is within 0.4 %.
SUB_BITS = 7
# Values are microseconds; 2**36 us is about 19 hours, far beyond any timeout,
# so clamping there loses nothing and keeps the bucket list small (4 096).
MAX_VALUE = (1 << 36) - 1
_EXACT_LIMIT = 1 << (SUB_BITS + 1)
N_BUCKETS = (((MAX_VALUE.bit_length() - SUB_BITS - 1) << SUB_BITS) + _EXACT_LIMIT)

# The percentiles every report shows, as fractions of 100.
REPORT_PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0, 99.9)


def bucket_index(value: int) -> int:
    """Bucket of a non-negative integer value (pure; used by `Histogram.record`)."""
    if value < _EXACT_LIMIT:
        return max(value, 0)
    value = min(value, MAX_VALUE)
    shift = value.bit_length() - SUB_BITS - 1
    return (shift << SUB_BITS) + (value >> shift)


def bucket_bounds(index: int) -> tuple[int, int]:
    """Inclusive lowest and highest value that fall into bucket `index`."""
    if index < _EXACT_LIMIT:
        return index, index
    shift = (index >> SUB_BITS) - 1
    mantissa = index - (shift << SUB_BITS)
    low = mantissa << shift
    return low, low + (1 << shift) - 1


class Histogram:
    """Log-linear histogram of non-negative integers (we store microseconds).

    Recording is O(1) and allocation-free; two histograms merge by adding
    their bucket lists, which is how per-process results are combined.
    """

    __slots__ = ("counts", "max", "min", "sum", "total")

    def __init__(self) -> None:
        self.counts: list[int] = [0] * N_BUCKETS
        self.total = 0
        self.sum = 0
        self.min = MAX_VALUE
        self.max = 0

    def record(self, value: int) -> None:
        """Add one value; called on the measuring path once per sample."""
        # Plain comparisons instead of min()/max(): this runs several times
        # per request and a builtin call costs more than a compare.
        if value < 0:  # noqa: PLR1730
            value = 0
        self.counts[bucket_index(value)] += 1
        self.total += 1
        self.sum += value
        if value < self.min:  # noqa: PLR1730
            self.min = value
        if value > self.max:  # noqa: PLR1730
            self.max = value

    def record_n(self, value: int, n: int) -> None:
        """Add `n` copies of one value (e.g. the zero gaps of lines read together)."""
        if n <= 0:
            return
        value = max(value, 0)
        self.counts[bucket_index(value)] += n
        self.total += n
        self.sum += value * n
        self.min = min(self.min, value)
        self.max = max(self.max, value)

    def merge(self, other: Histogram) -> None:
        """Fold another histogram into this one (parent merging worker results)."""
        if other.total == 0:
            return
        counts = self.counts
        for i, c in enumerate(other.counts):
            if c:
                counts[i] += c
        self.total += other.total
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def percentile(self, q: float) -> int:
        """Nearest-rank percentile `q` (0..100); 0 when empty.

        The answer is the midpoint of the bucket holding the rank, clamped to
        the exact min and max so p0/p100 are never invented values.
        """
        if self.total == 0:
            return 0
        rank = max(1, math.ceil(q / 100.0 * self.total))
        seen = 0
        for i, c in enumerate(self.counts):
            if not c:
                continue
            seen += c
            if seen >= rank:
                low, high = bucket_bounds(i)
                mid = (low + high) // 2
                return min(max(mid, self.min), self.max)
        return self.max

    def mean(self) -> float:
        """Arithmetic mean of the recorded values (exact, from the running sum)."""
        return self.sum / self.total if self.total else 0.0

    def cdf(self) -> list[tuple[int, float]]:
        """(value, cumulative fraction) per non-empty bucket, for plots."""
        out: list[tuple[int, float]] = []
        if self.total == 0:
            return out
        seen = 0
        for i, c in enumerate(self.counts):
            if c:
                seen += c
                low, high = bucket_bounds(i)
                out.append((min(max((low + high) // 2, self.min), self.max), seen / self.total))
        return out

    def __getstate__(self) -> dict[str, object]:
        # Sparse form: a worker's histogram is mostly zeros, so send only the
        # non-empty buckets through the pipe.
        sparse = {i: c for i, c in enumerate(self.counts) if c}
        return {"sparse": sparse, "total": self.total, "sum": self.sum, "min": self.min, "max": self.max}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.counts = [0] * N_BUCKETS
        sparse = state["sparse"]
        assert isinstance(sparse, dict)
        for i, c in sparse.items():
            self.counts[i] = c
        total, vsum, vmin, vmax = state["total"], state["sum"], state["min"], state["max"]
        assert isinstance(total, int) and isinstance(vsum, int)
        assert isinstance(vmin, int) and isinstance(vmax, int)
        self.total, self.sum, self.min, self.max = total, vsum, vmin, vmax


def exact_percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of a list (for small samples such as RSS readings)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def jain_index(shares: Iterable[float]) -> float:
    """Jain's fairness index (sum x)^2 / (n * sum x^2): 1.0 is perfectly fair, 1/n worst.

    An empty set or all-zero shares count as fair (1.0): nobody was favoured.
    """
    xs = list(shares)
    if not xs:
        return 1.0
    total = sum(xs)
    squares = sum(x * x for x in xs)
    if squares == 0:
        return 1.0
    return (total * total) / (len(xs) * squares)


def linear_slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope dy/dx (soak: RSS growth per second); 0 for < 2 points."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return 0.0
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx


# Error kinds, in report order. `http` = a complete response with a non-2xx
# status; `stream_error` = a 2xx stream carrying an {"error": ...} frame;
# `malformed` = unparsable HTTP, or a 2xx stream/body that ended without its
# terminator (NDJSON `"done":true`, SSE `[DONE]`).
ERROR_KINDS: tuple[str, ...] = ("connect", "reset", "timeout", "http", "malformed", "stream_error")


@dataclass
class GroupStats:
    """Everything measured for one workload group in one process (mergeable)."""

    name: str
    users: int
    latency: Histogram = field(default_factory=Histogram)
    ttfb: Histogram = field(default_factory=Histogram)
    ttft: Histogram = field(default_factory=Histogram)
    gaps: Histogram = field(default_factory=Histogram)
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    status: dict[int, int] = field(default_factory=dict)
    chunks: int = 0
    body_bytes: int = 0
    # Requests cut short when the run was stopped (Ctrl-C, or the finish
    # grace ran out): still in flight, or waiting in the open-loop backlog.
    unfinished: int = 0
    # Per-user counts, indexed by user number (0..users-1).
    user_sent: list[int] = field(default_factory=list)
    user_ok: list[int] = field(default_factory=list)
    # Per-second buckets since the measured start: successes and errors.
    ok_timeline: list[int] = field(default_factory=list)
    err_timeline: list[int] = field(default_factory=list)
    elapsed: float = 0.0

    def __post_init__(self) -> None:
        if not self.user_sent:
            self.user_sent = [0] * self.users
        if not self.user_ok:
            self.user_ok = [0] * self.users

    @property
    def error_total(self) -> int:
        """All failed requests, whatever the kind."""
        return sum(self.errors.values())

    def add_error(self, kind: str, second: int) -> None:
        """Count one failed request of `kind` that ended `second` seconds in."""
        self.errors[kind] = self.errors.get(kind, 0) + 1
        _bump(self.err_timeline, second)

    def add_ok(self, user: int, second: int) -> None:
        """Count one successful request of `user` that ended `second` seconds in."""
        self.ok += 1
        self.user_ok[user] += 1
        _bump(self.ok_timeline, second)

    def merge(self, other: GroupStats, parallel: bool = True) -> None:
        """Fold another process's (`parallel`) or a later round's stats into these.

        Processes ran side by side, so elapsed time is the longest of them and
        timelines add up; rounds ran one after another, so elapsed times add
        and the later round's timeline is appended.
        """
        for mine, theirs in (
            (self.latency, other.latency),
            (self.ttfb, other.ttfb),
            (self.ttft, other.ttft),
            (self.gaps, other.gaps),
        ):
            mine.merge(theirs)
        self.ok += other.ok
        for k, v in other.errors.items():
            self.errors[k] = self.errors.get(k, 0) + v
        for s, v in other.status.items():
            self.status[s] = self.status.get(s, 0) + v
        self.chunks += other.chunks
        self.body_bytes += other.body_bytes
        self.unfinished += other.unfinished
        _add_lists(self.user_sent, other.user_sent)
        _add_lists(self.user_ok, other.user_ok)
        if parallel:
            _add_lists(self.ok_timeline, other.ok_timeline)
            _add_lists(self.err_timeline, other.err_timeline)
            self.elapsed = max(self.elapsed, other.elapsed)
        else:
            # Pad to equal length first so the appended round starts aligned.
            width = max(len(self.ok_timeline), len(self.err_timeline))
            for line in (self.ok_timeline, self.err_timeline):
                line.extend([0] * (width - len(line)))
            self.ok_timeline.extend(other.ok_timeline)
            self.err_timeline.extend(other.err_timeline)
            width = max(len(self.ok_timeline), len(self.err_timeline))
            for line in (self.ok_timeline, self.err_timeline):
                line.extend([0] * (width - len(line)))
            self.elapsed += other.elapsed


def _bump(timeline: list[int], second: int) -> None:
    second = max(second, 0)
    while len(timeline) <= second:
        timeline.append(0)
    timeline[second] += 1


def _add_lists(into: list[int], other: list[int]) -> None:
    if len(into) < len(other):
        into.extend([0] * (len(other) - len(into)))
    for i, v in enumerate(other):
        into[i] += v
