"""StateCache: the in-memory view of the state the data plane reads, with write-behind.

Reads are plain dict and set lookups on the event loop's thread, so admission
never awaits the store. A write changes the view at once and queues the store
write; a background flusher writes the queue `flush_interval` after the first
change, so a burst of admin calls or a stream of finished requests costs one
round of store calls.

Queued operator writes are coalesced per entity (the last write to a key, user,
block entry or backend wins) and are all idempotent, so a write that failed or
was interrupted is simply queued again. Usage is summed per (user, model, day)
and per (hour, user, key, model, backend), and flushed as deltas; a flush whose commit succeeded but whose reply was lost
(a dropped Redis connection) is retried and counted twice, the price of never
dropping usage.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from ..tasks import cancel_and_wait
from .ipblock import canonical
from .records import (
    META_TOPICS,
    TOPIC_BACKENDS,
    TOPIC_KEYS,
    TOPIC_USERS,
    TOPICS,
    BackendRecord,
    KeyRecord,
    Usage,
    UsageHour,
    UserSettings,
)
from .store import Store
from .tally import UsageTally
from .view import StateView

log = logging.getLogger("ollamamq_fast.state")

# Back-off while the store is unreachable: the first retry is quick (a Redis
# failover takes about a second), later ones slow down to keep the log readable.
RETRY_MIN_S = 0.5
RETRY_MAX_S = 10.0
# The last flush at stop waits this long for a store that hangs (Redis stopped,
# a network partition), so a SIGTERM always ends.
STOP_FLUSH_S = 5.0
# A write the store refuses in this many flushes that stored other writes is
# dropped: the store is up and will not take it (see StateCache._refused).
REFUSED_FLUSHES = 3
# Metadata keys loaded at start and re-read when another replica writes them
# (operator-made pools and pool access rules).
META_KEYS = META_TOPICS


class _Pending(NamedTuple):
    """A queued operator write: how to store it, and how to re-apply it to the view."""

    write: Callable[[Store], Awaitable[object]]
    apply: Callable[[], None]


def _ip_writer(ip: str, blocked: bool) -> Callable[[Store], Awaitable[object]]:
    """The queued store write for one blocklist spelling (bound now, not by the loop variable)."""
    return lambda store: store.set_blocked_ip(ip, blocked)


class StateCache(StateView):
    """In-memory view the data plane reads synchronously; writes go to a background flusher."""

    def __init__(self, store: Store, flush_interval: float = 0.2) -> None:
        super().__init__()
        self.store = store
        self.flush_interval = flush_interval
        # Set by the gateway: called after another replica's change was loaded.
        self.on_change: Callable[[str], None] | None = None

        # Write-behind
        self._pending: dict[tuple[str, str], _Pending] = {}
        # Queued writes that failed, and in how many flushes that stored others (_refused).
        self._failures: dict[tuple[str, str], int] = {}
        self.writes_dropped = 0  # writes the store kept refusing, given up on
        self._dirty = asyncio.Event()
        # Usage rows of ended requests, summed until the next flush (the ledger
        # adds to it directly: it is compiled, this class is not).
        self.tally = UsageTally(on_first=self._dirty.set)
        self._flush_lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None

        # Operator state kept as free-form metadata (pools.py's pools and
        # access rules, as JSON): loaded at start, written behind like the rest.
        self.meta: dict[str, str] = {}

        # Reloads after another replica's change
        self._stale: set[str] = set()
        self._reloader: asyncio.Task[None] | None = None
        self._replay: dict[tuple[str, str], _Pending] | None = None

    # Lifecycle

    async def start(self) -> None:
        """Open the store, subscribe, load the view, start the flusher; called by the gateway."""
        await self.store.open()
        # Subscribed before loading: a change made while we load triggers a reload
        # instead of being lost between the snapshot and the subscription.
        self.store.subscribe(self._on_store_change)
        self._replay = dict(self._pending)
        try:
            snapshot = await self.store.load_all()
        except BaseException:
            await self.store.close()
            raise
        finally:
            replay, self._replay = self._replay, None
        self._install(snapshot, set(TOPICS))
        for key in META_KEYS:
            value = await self.store.get_meta(key)
            if value is not None:
                self.meta.setdefault(key, value)
        for pending in replay.values():
            pending.apply()
        self._flusher = asyncio.get_running_loop().create_task(
            self._flush_loop(), name="ollamamq-state-flush"
        )

    async def stop(self) -> None:
        """Write everything pending and close the store; called by the gateway at shutdown."""
        for task in (self._reloader, self._flusher):
            await cancel_and_wait(task)
        self._reloader = self._flusher = None
        try:
            async with asyncio.timeout(STOP_FLUSH_S):
                await self.flush()
        except Exception as exc:  # noqa: BLE001 -- the store is down or hangs: say what is lost
            log.error("state: the store is unavailable at stop (%s); %d writes and usage rows "
                      "not stored are lost", str(exc) or type(exc).__name__, self.pending)
        finally:
            await self.store.close()

    @property
    def pending(self) -> int:
        """Writes and daily usage rows not yet in the store (each has its hourly rows with it)."""
        return len(self._pending) + len(self.tally.days)

    # Writes: the view changes now, the store write is queued

    def put_key(self, rec: KeyRecord) -> None:
        """Add or replace an API key."""
        self._queue(
            TOPIC_KEYS, rec.key_id, lambda s: s.put_key(rec), lambda: self._set_key(rec)
        )

    def revoke_key(self, key_id: str) -> bool:
        """Revoke a key; False when no such key is known."""
        old = self.keys.get(key_id)
        if old is None:
            return False
        # Stored as a whole record so it coalesces with a put of the same key still queued.
        self.put_key(dataclasses.replace(old, revoked=True))
        return True

    def put_user(self, s: UserSettings) -> None:
        """Add or replace one user's settings."""
        self._queue(
            TOPIC_USERS,
            s.user,
            lambda st: st.put_user(s),
            lambda: self._set_user(s.user, s),
        )

    def delete_user(self, user: str) -> None:
        """Drop one user's settings (back to defaults)."""
        self._queue(
            TOPIC_USERS,
            user,
            lambda st: st.delete_user(user),
            lambda: self._set_user(user, None),
        )

    def set_blocked_user(self, user: str, blocked: bool) -> None:
        """Block or unblock a user."""
        self._queue(
            "blocked_user",
            user,
            lambda st: st.set_blocked_user(user, blocked),
            lambda: self._set_blocked_user(user, blocked),
        )

    def set_blocked_ip(self, ip: str, blocked: bool) -> None:
        """Block or unblock an address or CIDR; raises ValueError if `ip` is neither."""
        key = canonical(ip)
        spellings = self._ips.discard(key) if not blocked else {key}
        for raw in spellings:
            self._queue(
                "blocked_ip",
                raw,
                _ip_writer(raw, blocked),
                lambda: self._set_blocked_ip(key, blocked),
            )

    def put_backend(self, rec: BackendRecord) -> None:
        """Add or replace a runtime backend."""
        self._queue(
            TOPIC_BACKENDS,
            rec.url,
            lambda s: s.put_backend(rec),
            lambda: self._set_backend(rec.url, rec),
        )

    def delete_backend(self, url: str) -> None:
        """Forget a runtime backend."""
        self._queue(
            TOPIC_BACKENDS,
            url,
            lambda s: s.delete_backend(url),
            lambda: self._set_backend(url, None),
        )

    def put_meta(self, key: str, value: str) -> None:
        """Set one metadata value (pools, pool access), stored by the flusher."""
        self._queue("meta", key, lambda s: s.set_meta(key, value),
                    lambda: self.meta.__setitem__(key, value))

    def add_usage(
        self, user: str, model: str, prompt_tokens: int, completion_tokens: int,
        key: str = "", backend: str = "", error: bool = False, cancelled: bool = False,
        estimated: bool = False,
    ) -> None:
        """Count one finished request, summed until the next flush (the data plane
        calls `tally.add_usage` directly)."""
        self.tally.add_usage(user, model, prompt_tokens, completion_tokens, key, backend,
                             error, cancelled, estimated)

    async def incr_window(self, key: str, window_s: float, amount: float) -> float:
        """The store's shared window counter, for rate limits that must hold across replicas."""
        return await self.store.incr_window(key, window_s, amount)

    def _queue(
        self,
        kind: str,
        ident: str,
        write: Callable[[Store], Awaitable[object]],
        apply: Callable[[], None],
    ) -> None:
        """Apply a write to the view and queue it, replacing an older write to the same entity."""
        apply()
        pending = _Pending(write, apply)
        self._failures.pop((kind, ident), None)  # a newer write starts its own count
        for queue in (self._pending, self._replay):
            if queue is not None:
                # Re-inserted, not updated, so the queue stays in order of last write.
                queue.pop((kind, ident), None)
                queue[(kind, ident)] = pending
        self._dirty.set()

    # Flushing

    async def flush(self) -> None:
        """Write everything queued now; called by the flusher, tests and `stop`.

        Usage rows are written even when an operator write fails: one write
        the store keeps refusing must not hold back the accounting."""
        async with self._flush_lock:
            took, failed, error = await self._flush_writes()
            try:
                took = await self._flush_usage() or took
            except Exception:
                if error is None:
                    raise
            if error is not None and self._refused(failed, took):
                raise error

    def _refused(self, failed: list[tuple[str, str]], store_took_writes: bool) -> bool:
        """Count the failed writes a working store refused; drop one at REFUSED_FLUSHES.
        Whether any failed write still waits.

        A write that fails while the same flush stored others is refused by
        the store itself (a value it cannot hold, a bug), not lost to an
        outage: retried for ever it would be logged every few seconds until
        a restart. Kept in the queue while the store may just be down."""
        waiting = False
        for key in failed:
            count = self._failures.get(key, 0) + (1 if store_took_writes else 0)
            if count < REFUSED_FLUSHES:
                self._failures[key] = count
                waiting = True
                continue
            del self._failures[key]
            del self._pending[key]
            self.writes_dropped += 1
            log.error("state: the store refused the %s write for %r %d times while it "
                      "took others; dropped (the running gateway keeps the value until "
                      "restart)", key[0], key[1], count)
        return waiting

    async def _flush_writes(self) -> tuple[bool, list[tuple[str, str]], Exception | None]:
        """Store queued operator writes in order: whether any was stored, the writes that
        failed and are still the latest of their entity, and the first error.

        A failed write is set aside and the next one tried: when that one is
        stored too, the store is up and refused only the first (see
        _refused). Two failures in a row stop the batch (the store is down);
        what was not stored goes back ahead of anything queued since."""
        batch, self._pending = self._pending, {}
        items = list(batch.items())
        unstored: list[tuple[tuple[str, str], _Pending]] = []
        first: Exception | None = None
        took = False
        in_a_row = 0
        i = 0
        try:
            while i < len(items):
                key, pending = items[i]
                i += 1
                try:
                    await pending.write(self.store)
                except Exception as exc:  # noqa: BLE001 -- raised once the batch is settled
                    unstored.append((key, pending))
                    first = first or exc
                    in_a_row += 1
                    if in_a_row == 2:
                        break
                else:
                    took = True
                    in_a_row = 0
                    self._failures.pop(key, None)
        finally:
            # The failed writes and the rest (all of it when cancelled) go back
            # ahead of anything queued since.
            rest = dict(unstored + items[i:])
            for key, newer in self._pending.items():
                rest.pop(key, None)
                rest[key] = newer
            newer_writes = self._pending
            self._pending = rest
        # A failed write replaced meanwhile by a newer one is that one's to retry.
        return took, [key for key, _ in unstored if key not in newer_writes], first

    async def flushed_usage(self, since_day: str | None, cut: Callable[[], None]) -> list[Usage]:
        """Write everything queued, then read the usage rows since `since_day`, None = all
        (the quotas).

        `cut` is called at the instant the summed usage is taken for the write:
        every row added before it is in the rows returned, none added after it
        (no other flush writes usage until the read is done), so a caller that
        counts ended requests beside the tally knows which of its counts the
        read holds. Raises when the usage is not stored or not read; an
        operator write that fails is left to the flusher (reported, retried).
        """
        async with self._flush_lock:
            took, failed, error = await self._flush_writes()
            took = await self._flush_usage(cut) or took
            if error is not None:
                self._refused(failed, took)
                self._dirty.set()
            return await self.store.usage(None, since_day)

    async def _flush_usage(self, cut: Callable[[], None] | None = None) -> bool:
        """Store summed usage as one batch of deltas (whether there was any); on failure add it back.

        `cut` (flushed_usage): called when the sums are taken, or found empty."""
        tally = self.tally
        if not tally.days and not tally.hours:
            if cut is not None:
                cut()
            return False
        batch, hours = tally.take()
        if cut is not None:
            cut()
        items = [Usage(u, m, d, c.requests, c.prompt, c.completion)
                 for (u, m, d), c in batch.items()]
        hour_items = [UsageHour(*dims, *c.counts()) for dims, c in hours.items()]
        try:
            await self.store.add_usage(items, hour_items)
        except BaseException:
            tally.give_back(batch, hours)
            raise
        return True

    async def _flush_loop(self) -> None:
        """Background flusher: wait for a change, let a batch gather, write it."""
        delay = RETRY_MIN_S
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.flush_interval)
            self._dirty.clear()
            try:
                await self.flush()
            except Exception as exc:  # noqa: BLE001 -- any store failure: keep the queue, retry
                log.warning(
                    "state: %d writes not stored yet (%s); retrying in %.1fs",
                    self.pending,
                    exc,
                    delay,
                )
                self._dirty.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
            else:
                delay = RETRY_MIN_S

    # Reloads after another replica's change

    def _on_store_change(self, topic: str) -> None:
        """Store callback (sync, on the loop): schedule a reload of the topic."""
        self._stale.add(topic)
        if self._reloader is None or self._reloader.done():
            self._reloader = asyncio.get_running_loop().create_task(
                self._reload_loop(), name="ollamamq-state-reload"
            )

    async def _reload_loop(self) -> None:
        """Reload stale topics until none are left; notifications during a load coalesce."""
        delay = RETRY_MIN_S
        while self._stale:
            topics, self._stale = self._stale, set()
            # Writes not yet stored, and any made while we load, are re-applied on
            # top of the snapshot, which may predate them.
            self._replay = dict(self._pending)
            try:
                snapshot = await self.store.load_all()
                # Pools and access rules (META_KEYS) are metadata values, read
                # while the replay still records local writes made meanwhile.
                metas = {key: await self.store.get_meta(key)
                         for key in sorted(topics & set(META_KEYS))}
            except Exception as exc:  # noqa: BLE001 -- any store failure: retry the reload
                log.warning(
                    "state: reload of %s failed (%s)", ",".join(sorted(topics)), exc
                )
                self._stale |= topics
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            finally:
                replay, self._replay = self._replay, None
            delay = RETRY_MIN_S
            self._install(snapshot, topics)
            for key, value in metas.items():
                if value is not None:
                    self.meta[key] = value
            for pending in replay.values():
                pending.apply()
            for topic in sorted(topics):
                self._notify(topic)

    def _notify(self, topic: str) -> None:
        """Tell the gateway a topic changed; its hook raising must not stop reloads."""
        if self.on_change is None:
            return
        try:
            self.on_change(topic)
        except Exception:
            log.exception("state: on_change hook failed for topic %s", topic)
