"""`GET /metrics`: Prometheus exposition rendered from the live counters at scrape time.

Nothing here runs on the data plane's hot path: the proxy only adds to plain
ints and histogram slots (stats.py), and this collector turns them into
metric families when Prometheus scrapes. The registry is our own, not
prometheus-client's global one, so two gateways in one process (tests) never
share or collide on series.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from ollamamq_fast import __version__
from ollamamq_fast.stats import Histogram, UserStats

if TYPE_CHECKING:
    from ollamamq_fast.gateway import GatewayState

# Per-user series are exported for at most this many users, the busiest by
# requests seen. Prometheus keeps every label value it ever scraped as a
# separate series; one series per user of a large user base (each key, each
# client address when auth is off) would swamp it. Everyone outside the top
# is still counted in the gateway-wide series.
TOP_USERS = 50

CONTENT_TYPE = CONTENT_TYPE_LATEST
BREAKER_STATES = ("closed", "open", "half-open")


def histogram_family(name: str, doc: str, hist: Histogram) -> HistogramMetricFamily:
    """A Prometheus histogram from one of our fixed-bucket histograms.

    Our bucket i counts values <= bounds[i] (bisect_left), which is exactly
    Prometheus' `le` semantics once the counts are made cumulative.
    """
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip(hist.bounds, hist.counts):
        running += n
        buckets.append((_le(bound), running))
    buckets.append(("+Inf", hist.count))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=hist.total)


def _le(bound: float) -> str:
    # Prometheus renders le values as floats ("0.5", "10.0"); keep that spelling
    # so dashboards built against other exporters match.
    return repr(float(bound))


def user_requests(s: UserStats) -> int:
    """Requests a user has sent: finished, refused, and still in the gateway."""
    return s.done + s.dropped + s.rejected + s.queued + s.in_flight


def top_users(users: dict[str, UserStats], limit: int = TOP_USERS) -> list[UserStats]:
    """The `limit` users with the most requests (ties by name, so scrapes are stable)."""
    ranked = sorted(users.values(), key=lambda s: (-user_requests(s), s.user))
    return ranked[:limit]


class GatewayCollector(Collector):
    """Reads the gateway's counters and fleet state on every scrape."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state

    def describe(self) -> list[Metric]:
        """Nothing up front: the series depend on live backends and users."""
        return []

    def collect(self) -> Iterator[Metric]:
        """All metric families, built from one pass over the current state."""
        state = self.state
        stats = state.stats
        snapshot = state.operator.stats_snapshot()
        yield from self._gateway(snapshot, stats)
        yield from self._backends(snapshot["backends"])
        yield from self._pools(snapshot["backends"])
        yield from self._users(stats.users)

    def _pools(self, backends: list[dict[str, Any]]) -> Iterator[Metric]:
        """Per pool: queue, running, slots, backends up, arrivals; backend membership; pulls."""
        pools = self.state.pools
        families = {
            "queued": GaugeMetricFamily("ollamamq_pool_queue_depth",
                                        "Requests waiting in the pool's queue.", labels=["pool"]),
            "in_flight": GaugeMetricFamily("ollamamq_pool_in_flight",
                                           "Requests running on the pool's backends.",
                                           labels=["pool"]),
            "slots": GaugeMetricFamily("ollamamq_pool_slots",
                                       "Slots of the pool's backends.", labels=["pool"]),
            "backends_online": GaugeMetricFamily("ollamamq_pool_backends_up",
                                                 "The pool's backends passing health probes.",
                                                 labels=["pool"]),
        }
        for name, row in pools.totals().items():
            for key, family in families.items():
                family.add_metric([name], row[key])
        yield from families.values()
        arrivals = CounterMetricFamily(
            "ollamamq_pool_requests",
            "Requests that named a pool (path prefix or Host); the default pool's are the "
            "total minus these.", labels=["pool"])
        for pool in pools.pools()[1:]:
            arrivals.add_metric([pool.name], pool.requests)
        yield arrivals
        member = GaugeMetricFamily("ollamamq_backend_pool", "1 for each pool listing a backend.",
                                   labels=["backend", "pool"])
        for b in backends:
            for name in b.get("pools", []):
                member.add_metric([b["url"], name], 1)
        yield member
        required = self.state.required
        active = GaugeMetricFamily("ollamamq_model_pulls_active",
                                   "Required-model pulls running or queued.", labels=["state"])
        progress = required.progress()
        for kind in ("queued", "pulling", "retrying"):
            active.add_metric([kind], sum(1 for j in progress if j["state"] == kind))
        yield active
        ended = CounterMetricFamily("ollamamq_model_pulls", "Required-model pulls that ended.",
                                    labels=["result"])
        ended.add_metric(["done"], required.done)
        ended.add_metric(["failed"], required.failed)
        yield ended

    def _gateway(self, snapshot: dict[str, Any], stats: Any) -> Iterator[Metric]:
        info = InfoMetricFamily("ollamamq", "Gateway build information.")
        info.add_metric([], {"version": __version__})
        yield info
        yield GaugeMetricFamily("ollamamq_uptime_seconds", "Seconds since the gateway started.",
                                value=snapshot["uptime_s"])
        requests = CounterMetricFamily(
            "ollamamq_requests",
            "Responses sent, by route, status and backend ('' when no backend was involved).",
            labels=["route", "status", "backend"])
        for (route, status, backend), count in sorted(stats.responses.items()):
            requests.add_metric([route, str(status), backend], count.n)
        yield requests
        yield GaugeMetricFamily("ollamamq_queue_depth", "Requests waiting in the fair queue.",
                                value=snapshot["queued"])
        yield GaugeMetricFamily("ollamamq_in_flight", "Queued-route requests running on backends.",
                                value=snapshot["in_flight"])
        yield histogram_family("ollamamq_queue_wait_seconds",
                               "Time from arrival to dispatch to a backend.", stats.queue_wait)
        yield histogram_family("ollamamq_ttfb_seconds",
                               "Time from arrival to the backend's first response byte.",
                               stats.ttfb)
        yield histogram_family("ollamamq_request_duration_seconds",
                               "Time from arrival to the end of the response.", stats.latency)
        for name, doc, value in (
            ("ollamamq_prompt_tokens", "Prompt (input) tokens reported by backends.",
             stats.prompt_tokens),
            ("ollamamq_completion_tokens", "Completion (output) tokens reported by backends.",
             stats.completion_tokens),
            ("ollamamq_estimated_tokens",
             "Tokens estimated from stream events (the backend reported none); in the totals.",
             stats.estimated_tokens),
            ("ollamamq_cancelled", "Requests whose client went away before the end.",
             stats.cancelled),
            ("ollamamq_failovers",
             "Requests re-dispatched to another backend before the first response byte.",
             stats.failovers),
            ("ollamamq_rejected",
             "Requests refused: limits, quotas, queue full or waited too long, blocked.",
             stats.rejected),
            ("ollamamq_rate_limited", "Requests refused by the per-user rate limit (in rejected).",
             stats.rate_limited),
            ("ollamamq_quota_refused", "Requests refused by a token quota (in rejected).",
             stats.quota_refused),
            ("ollamamq_limit_refused",
             "Requests refused by the per-user in-flight limit (in rejected).",
             stats.limit_refused),
            ("ollamamq_tokens_capped", "Requests whose max_tokens / num_predict was capped.",
             stats.tokens_capped),
            ("ollamamq_cache_hits", "Inference requests answered from the response cache.",
             stats.cache_hits),
            ("ollamamq_cache_misses",
             "Cacheable requests that found no cached answer and went to a backend.",
             stats.cache_misses),
            ("ollamamq_cache_evictions",
             "Cached answers evicted to stay within --cache-mb.", stats.cache_evictions),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily("ollamamq_cache_bytes", "Bytes of answers in the local cache.",
                                value=stats.cache_bytes)
        yield GaugeMetricFamily("ollamamq_cache_entries", "Answers in the local cache.",
                                value=stats.cache_entries)
        yield GaugeMetricFamily("ollamamq_users_tracked", "Users with live counters.",
                                value=len(stats.users))
        access = snapshot["access_log"]
        lines = CounterMetricFamily(
            "ollamamq_access_log_lines",
            "Access-log lines written, and dropped because the writer was behind "
            "(a stalled disk or an unread stderr).", labels=["state"])
        lines.add_metric(["written"], access["written"])
        lines.add_metric(["dropped"], access["dropped"])
        yield lines
        yield GaugeMetricFamily("ollamamq_access_log_pending",
                                "Access-log lines waiting for the writer thread.",
                                value=access["pending"])
        store = snapshot["store"]
        yield GaugeMetricFamily("ollamamq_state_pending",
                                "Operator writes and usage rows not yet in the state store "
                                "(it is down or slow).", value=store["pending"])
        yield CounterMetricFamily("ollamamq_state_writes_dropped",
                                  "Operator writes given up on: the store, while taking "
                                  "other writes, refused them three flushes in a row.",
                                  value=store["dropped"])

    def _backends(self, backends: list[dict[str, Any]]) -> Iterator[Metric]:
        up = GaugeMetricFamily("ollamamq_backend_up", "1 if the backend passes health probes.",
                               labels=["backend"])
        draining = GaugeMetricFamily("ollamamq_backend_draining",
                                     "1 if the backend takes no new requests.", labels=["backend"])
        breaker = GaugeMetricFamily("ollamamq_backend_breaker",
                                    "Circuit-breaker state: 1 for the current state.",
                                    labels=["backend", "state"])
        slots = GaugeMetricFamily("ollamamq_backend_slots",
                                  "Requests the backend may run at once.", labels=["backend"])
        in_flight = GaugeMetricFamily("ollamamq_backend_in_flight",
                                      "Queued-route requests running on the backend.",
                                      labels=["backend"])
        done = CounterMetricFamily("ollamamq_backend_requests",
                                   "Requests the backend finished.", labels=["backend"])
        failures = CounterMetricFamily("ollamamq_backend_failures",
                                       "Failed requests and probes on the backend.",
                                       labels=["backend"])
        for b in backends:
            url = b["url"]
            up.add_metric([url], 1 if b["online"] else 0)
            draining.add_metric([url], 1 if b["draining"] else 0)
            for st in BREAKER_STATES:
                breaker.add_metric([url, st], 1 if b["breaker"] == st else 0)
            slots.add_metric([url], b["slots"])
            in_flight.add_metric([url], b["in_flight"])
            done.add_metric([url], b["requests_done"])
            failures.add_metric([url], b["failures"])
        yield from (up, draining, breaker, slots, in_flight, done, failures)

    def _users(self, users: dict[str, UserStats]) -> Iterator[Metric]:
        help_suffix = f" (the {TOP_USERS} busiest users only)"
        requests = CounterMetricFamily("ollamamq_user_requests",
                                       "Requests finished for the user" + help_suffix,
                                       labels=["user"])
        rejected = CounterMetricFamily("ollamamq_user_rejected",
                                       "Requests of the user refused by admission" + help_suffix,
                                       labels=["user"])
        dropped = CounterMetricFamily("ollamamq_user_dropped",
                                      "Requests of the user whose client left before the end"
                                      + help_suffix, labels=["user"])
        queued = GaugeMetricFamily("ollamamq_user_queued",
                                   "Requests of the user waiting" + help_suffix, labels=["user"])
        running = GaugeMetricFamily("ollamamq_user_in_flight",
                                    "Requests of the user running" + help_suffix, labels=["user"])
        tokens = CounterMetricFamily("ollamamq_user_tokens",
                                     "Tokens of the user, by direction" + help_suffix,
                                     labels=["user", "direction"])
        for s in top_users(users):
            requests.add_metric([s.user], s.done)
            rejected.add_metric([s.user], s.rejected)
            dropped.add_metric([s.user], s.dropped)
            queued.add_metric([s.user], s.queued)
            running.add_metric([s.user], s.in_flight)
            tokens.add_metric([s.user, "in"], s.prompt_tokens)
            tokens.add_metric([s.user, "out"], s.completion_tokens)
        yield from (requests, rejected, dropped, queued, running, tokens)


class Metrics:
    """A private registry holding the gateway collector."""

    def __init__(self, state: GatewayState) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(state))

    def render(self) -> bytes:
        """The text exposition format (version 0.0.4)."""
        return generate_latest(self.registry)
