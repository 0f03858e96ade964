"""Per-user fair queue: VIP ring, boost ring and normal ring of per-user FIFOs.

Who calls it: the downstream protocol pushes (and cancels on disconnect), the
dispatcher pops when a backend slot frees, the timeout sweeper calls expired().

Dispatch rules (the exact contract the tests check):

* Rings. Every user with live queued requests sits in exactly one ring: the
  VIP ring if the user is VIP, else the boost ring if boosted, else the normal
  ring. Users with nothing queued are in no ring.
* VIP. While the VIP ring holds a request that can run, every dispatch comes
  from the VIP ring. VIP beats boost.
* Boost. Among non-VIP dispatches the boost ring is preferred when the previous
  non-VIP dispatch came from the normal ring (or there was none yet) and the
  normal ring is preferred otherwise; if the preferred ring has nothing that
  can run, the other ring serves. So while both rings are backlogged the
  dispatches alternate boost, normal, boost, normal: the boost ring as a whole
  gets half the non-VIP dispatches. With B boosted and N normal users of equal
  weight each boosted user gets N/B times the share of each normal user
  (1 boosted vs 2 normal: exactly 2x; 1 vs 1: equal shares).
* Weights. Inside each ring users take turns in ring order (deficit round
  robin, quantum = weight, cost 1 per request): a user of weight w gets up to
  w consecutive dispatches, then moves to the tail of the ring. A user who
  runs dry leaves the ring and forfeits the rest of the turn.
* Newcomers. A user who joins a ring goes to its tail, but ahead of the
  user served by the very last dispatch when that dispatch ended their turn
  (they sit at the tail): they have just been served, the newcomer has not.
  So one user flooding delays another's request by the flooder's running
  request only, not by a second one. A request that started without waiting
  (served(): the queue was empty) is such a dispatch too, and a user who
  runs dry and comes back is still the one served last. Only the last
  dispatch counts: a user who sends again right after each of their own
  dispatches still gets 1/(k+1) of the dispatches against k backlogged
  users, as in plain round robin.
* Blocked heads. pop(can_run) only ever considers each user's OLDEST live
  request. A user whose oldest request cannot run is skipped without losing
  their place (still first in line next time); their later requests never
  overtake it, so each user's order is strict FIFO.
* Settings changes. A user who becomes (or stops being) VIP or boosted while
  queued moves to the tail of the target ring with a fresh turn and the same
  FIFO. Configuration grants (grant(), per source) are replaced by the next
  grant of the same source; the operator's settings (set_*) win over them. A weight change takes effect from the user's next turn, except that
  lowering it also caps the turns left in the current one.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Final

# Dispatch bookkeeping lives in dicts keyed by user, so users must be hashable
# strings; the payload is never inspected except by the caller's can_run.
RunPredicate = Callable[[object], bool]
Ring = OrderedDict[str, "_UserQueue"]

DEFAULT_WEIGHT: Final = 1  # every user gets one request per round unless told otherwise


def _checked_weight(weight: object) -> int:
    """A weight as given (an int >= 1); ValueError otherwise."""
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise ValueError(f"weight must be an integer >= 1, got {weight!r}")
    return weight


class Ticket:
    """One queued request; returned by push() and handed back by pop()."""

    # Tickets are the only per-request allocation, so they carry their own
    # links (an intrusive doubly linked list per user and one in push order)
    # instead of sitting in deques: unlinking is O(1) and exact, so cancelled
    # tickets (and the exchanges they hold) are freed at once rather than
    # lingering until lazy deletion reaches them.
    __slots__ = (
        "_all_next",
        "_all_prev",
        "_owner",
        "_user_next",
        "_user_prev",
        "cancelled",
        "enqueued_at",
        "payload",
        "user",
    )

    def __init__(self, user: str, payload: object, enqueued_at: float) -> None:
        """Create a ticket; only FairQueue.push() calls this."""
        self.user = user
        self.payload = payload
        self.enqueued_at = enqueued_at
        self.cancelled = False
        # The queue holding this ticket while it is live, None once popped or
        # cancelled: makes cancel() idempotent and rejects foreign tickets.
        self._owner: FairQueue | None = None
        self._user_prev: Ticket | None = None
        self._user_next: Ticket | None = None
        self._all_prev: Ticket | None = None
        self._all_next: Ticket | None = None

    @property
    def queued(self) -> bool:
        """True while the ticket is waiting in a queue (not popped, not cancelled)."""
        return self._owner is not None

    def __repr__(self) -> str:
        """Debug view for logs and test failures."""
        state = (
            "queued" if self.queued else ("cancelled" if self.cancelled else "popped")
        )
        return f"<Ticket user={self.user!r} {state} at={self.enqueued_at:.6f}>"


class _UserQueue:
    """One user's live tickets in FIFO order plus their place in a ring."""

    __slots__ = ("deficit", "head", "live", "ring", "tail", "user")

    def __init__(self, user: str, ring: Ring) -> None:
        """Create an empty FIFO for a user who is about to get a first ticket."""
        self.user = user
        self.head: Ticket | None = None
        self.tail: Ticket | None = None
        self.live = 0
        # Dispatches left in the user's current turn; 0 means the next
        # dispatch starts a fresh turn of `weight` dispatches.
        self.deficit = 0
        self.ring = ring


class FairQueue:
    """Round-robin queue of per-user FIFOs with VIP, boost, weights; not thread-safe."""

    def __init__(self) -> None:
        """Create an empty queue with no user settings."""
        # User settings: persist for users with nothing queued; only
        # non-default values are stored so idle users cost nothing.
        self._vip: set[str] = set()
        self._boost: set[str] = set()
        self._weights: dict[str, int] = {}
        # What configuration grants, by source (grant()): a new grant of a
        # source replaces its last one, so a user it no longer names loses
        # what it gave. Users the operator set (set_vip, set_boost,
        # set_weight) keep the operator's values over any grant.
        self._grants: dict[str, tuple[frozenset[str], frozenset[str], dict[str, int]]] = {}
        self._pinned: set[str] = set()

        # Queue state: only users with live tickets have a _UserQueue.
        self._queues: dict[str, _UserQueue] = {}
        self._vip_ring: Ring = OrderedDict()
        self._boost_ring: Ring = OrderedDict()
        self._normal_ring: Ring = OrderedDict()
        self._len = 0
        # Global push-order list, for peek_oldest() and expired().
        self._all_head: Ticket | None = None
        self._all_tail: Ticket | None = None
        # Alternation state between the boost and normal rings.
        self._boost_preferred = True
        # The user served by the last dispatch (a newcomer may go ahead of them).
        self._last_served: _UserQueue | None = None

    # Queue interface

    def push(self, user: str, payload: object, now: float | None = None) -> Ticket:
        """Enqueue a request for user (downstream, after admission); O(1)."""
        uq = self._queues.get(user)
        if uq is None:
            ring = self._ring_for(user)
            last = self._last_served
            if last is not None and last.live == 0 and last.user == user:
                # The user served last, back: the same place in the bookkeeping
                # (a newcomer after them still goes ahead), with a fresh turn.
                uq = last
                uq.ring = ring
                uq.deficit = 0
            else:
                uq = _UserQueue(user, ring)
            self._queues[user] = uq
            # The last dispatch ended that user's turn and they still sit at
            # the tail where it put them (deficit 0 with requests left).
            passed = (last is not None and last.ring is ring and last.live > 0
                      and last.deficit == 0 and next(reversed(ring)) == last.user)
            ring[user] = uq  # newcomers join the tail of their ring...
            if passed and last is not None:
                ring.move_to_end(last.user)  # ...ahead of the user just served
        # uq.user, not user: a backlogged user's tickets share one key string
        # instead of each pinning the copy its request was parsed into.
        ticket = Ticket(uq.user, payload, time.monotonic() if now is None else now)
        ticket._owner = self
        ticket._user_prev = uq.tail
        if uq.tail is None:
            uq.head = ticket
        else:
            uq.tail._user_next = ticket
        uq.tail = ticket
        uq.live += 1
        ticket._all_prev = self._all_tail
        if self._all_tail is None:
            self._all_head = ticket
        else:
            self._all_tail._all_next = ticket
        self._all_tail = ticket
        self._len += 1
        return ticket

    def cancel(self, ticket: Ticket) -> bool:
        """Remove a queued ticket (client went away); O(1); False if already gone."""
        if ticket._owner is not self:
            return False
        self._remove(ticket)
        ticket.cancelled = True
        return True

    def pop(self, can_run: RunPredicate | None = None) -> Ticket | None:
        """Take the next fair ticket that can run (dispatcher, on a free slot), or None.

        Without can_run this is O(1). With it, each backlogged user's oldest
        ticket is offered to can_run at most once, in fair order. can_run must
        not modify this queue.
        """
        if self._len == 0:
            return None
        if self._vip_ring:
            uq = self._first_runnable(self._vip_ring, can_run)
            if uq is not None:
                return self._serve(uq)
        if self._boost_preferred:
            first, second = self._boost_ring, self._normal_ring
        else:
            first, second = self._normal_ring, self._boost_ring
        for ring in (first, second):
            if ring:
                uq = self._first_runnable(ring, can_run)
                if uq is not None:
                    self._boost_preferred = ring is not self._boost_ring
                    return self._serve(uq)
        return None

    def served(self, user: str) -> None:
        """A request of `user` started without waiting (the dispatcher, while the
        queue is empty): the last dispatch, as if pushed and popped. O(1).

        So the newcomer rule counts it: a user who arrives while that request
        runs goes ahead of the user's next one."""
        last = self._last_served
        if last is None or last.live or last.user != user:
            if user in self._queues:
                return  # waiting requests: not the case the dispatcher calls for
            last = self._last_served = _UserQueue(user, self._ring_for(user))
        if last.deficit == 0:
            last.deficit = self._weights.get(user, DEFAULT_WEIGHT)
        last.deficit -= 1

    def peek_oldest(self) -> Ticket | None:
        """Oldest live ticket in push order (timeout sweeper); O(1)."""
        return self._all_head

    def expired(self, older_than: float) -> list[Ticket]:
        """Cancel and return tickets queued before older_than (timeout sweeper).

        O(expired): walks the push-order list from its head and stops at the
        first ticket that is young enough, so it relies on enqueued_at being
        non-decreasing in push order (always true with the default clock).
        """
        out: list[Ticket] = []
        ticket = self._all_head
        while ticket is not None and ticket.enqueued_at < older_than:
            self._remove(ticket)
            ticket.cancelled = True
            out.append(ticket)
            ticket = self._all_head
        return out

    def take_where(self, pred: RunPredicate) -> list[Ticket]:
        """Cancel and return every live ticket whose payload `pred` accepts; O(queued).

        For rare fleet changes only (a model no backend lists any more).
        """
        out: list[Ticket] = []
        ticket = self._all_head
        while ticket is not None:
            nxt = ticket._all_next
            if pred(ticket.payload):
                self._remove(ticket)
                ticket.cancelled = True
                out.append(ticket)
            ticket = nxt
        return out

    # Settings interface

    def set_vip(self, user: str, on: bool) -> None:
        """Grant or revoke VIP (admin API); a queued user changes ring at once."""
        self._pinned.add(user)
        self._put_vip(user, on)

    def set_boost(self, user: str, on: bool) -> None:
        """Grant or revoke boost (admin API); a queued user changes ring at once."""
        self._pinned.add(user)
        self._put_boost(user, on)

    def grant(self, vip: Iterable[str], boost: Iterable[str],
              weights: Mapping[str, object], source: str = "config") -> None:
        """Configured VIP, Boost and weights (the config file, a pool's defaults).

        Replaces what `source` granted last (a reload): a user it no longer
        names goes back to what the other sources grant, else the defaults.
        Users the operator set keep the operator's values.
        """
        checked = {user: _checked_weight(weight) for user, weight in weights.items()}
        old = self._grants.get(source)
        new = (frozenset(vip), frozenset(boost), checked)
        self._grants[source] = new
        named = set(new[0]) | new[1] | set(checked)
        if old is not None:
            named |= old[0] | old[1] | set(old[2])
        for user in named:
            if user not in self._pinned:
                self._settle(user)

    def _settle(self, user: str) -> None:
        """Give an unpinned user what the grants say (a weight: the last source's)."""
        vip = boost = False
        weight = DEFAULT_WEIGHT
        for vips, boosts, weights in self._grants.values():
            vip = vip or user in vips
            boost = boost or user in boosts
            weight = weights.get(user, weight)
        self._put_vip(user, vip)
        self._put_boost(user, boost)
        self._put_weight(user, weight)

    def set_weight(self, user: str, weight: object) -> None:
        """Set the user's turns per round (admin API); ValueError if weight < 1.

        `weight` is typed object because it is checked here: compiled code would
        otherwise turn True into 1 and refuse 1.5 with a TypeError at the call.
        """
        checked = _checked_weight(weight)
        self._pinned.add(user)
        self._put_weight(user, checked)

    def _put_vip(self, user: str, on: bool) -> None:
        if on:
            self._vip.add(user)
        else:
            self._vip.discard(user)
        self._rering(user)

    def _put_boost(self, user: str, on: bool) -> None:
        if on:
            self._boost.add(user)
        else:
            self._boost.discard(user)
        self._rering(user)

    def _put_weight(self, user: str, weight: int) -> None:
        if weight == DEFAULT_WEIGHT:
            self._weights.pop(user, None)
        else:
            self._weights[user] = weight
        uq = self._queues.get(user)
        if uq is not None and uq.deficit > weight:
            # A lowered weight must not leave the user more turns than it now
            # allows; a raised one waits for the next turn, like DRR quanta.
            uq.deficit = weight

    def is_vip(self, user: str) -> bool:
        """True if the user is VIP (admin API, TUI)."""
        return user in self._vip

    def is_boost(self, user: str) -> bool:
        """True if the user is boosted (admin API, TUI)."""
        return user in self._boost

    def weight(self, user: str) -> int:
        """The user's weight, DEFAULT_WEIGHT unless set (admin API, TUI)."""
        return self._weights.get(user, DEFAULT_WEIGHT)

    # Introspection

    def depth(self, user: str) -> int:
        """Live queued requests of user (metrics, admission limits); O(1)."""
        uq = self._queues.get(user)
        return 0 if uq is None else uq.live

    def __len__(self) -> int:
        """Live queued requests in total (metrics); O(1)."""
        return self._len

    def oldest(self, limit: int) -> list[Ticket]:
        """Up to `limit` live tickets, oldest first (demand estimates); O(limit)."""
        out: list[Ticket] = []
        ticket = self._all_head
        while ticket is not None and len(out) < limit:
            out.append(ticket)
            ticket = ticket._all_next
        return out

    def users(self) -> list[str]:
        """Users with live queued requests (metrics, TUI); O(users)."""
        return list(self._queues)

    # Internals

    def _ring_for(self, user: str) -> Ring:
        """The ring a user belongs in under the current settings."""
        if user in self._vip:
            return self._vip_ring
        if user in self._boost:
            return self._boost_ring
        return self._normal_ring

    def _rering(self, user: str) -> None:
        """Move a queued user to the ring their settings now call for."""
        uq = self._queues.get(user)
        if uq is None:
            return
        target = self._ring_for(user)
        if target is uq.ring:
            return
        del uq.ring[user]
        uq.ring = target
        uq.deficit = 0
        if uq is self._last_served:
            self._last_served = None  # a fresh turn at the tail, not just served
        target[user] = uq

    @staticmethod
    def _first_runnable(ring: Ring, can_run: RunPredicate | None) -> _UserQueue | None:
        """First user in ring order whose oldest ticket can run; ring is non-empty."""
        if can_run is None:
            # OrderedDict iteration follows its linked list, so this is O(1)
            # even after many deletions (a plain dict would scan the holes).
            return next(iter(ring.values()))
        for uq in ring.values():
            head = uq.head
            # Every user in a ring has live > 0, so head is never None.
            if head is not None and can_run(head.payload):
                return uq
        return None

    def _serve(self, uq: _UserQueue) -> Ticket:
        """Pop uq's oldest ticket and charge one dispatch to the user's turn."""
        ticket = uq.head
        if ticket is None:
            raise AssertionError(f"user {uq.user!r} is in a ring with no ticket")
        if uq.deficit == 0:
            uq.deficit = self._weights.get(uq.user, DEFAULT_WEIGHT)
        uq.deficit -= 1
        self._last_served = uq
        ring = uq.ring
        self._remove(ticket)  # drops the user from the ring if that was the last one
        if uq.live and uq.deficit == 0:
            ring.move_to_end(uq.user)
        return ticket

    def _remove(self, ticket: Ticket) -> None:
        """Unlink a live ticket from both lists; drop its user when they run dry."""
        uq = self._queues[ticket.user]
        prev, nxt = ticket._user_prev, ticket._user_next
        if prev is None:
            uq.head = nxt
        else:
            prev._user_next = nxt
        if nxt is None:
            uq.tail = prev
        else:
            nxt._user_prev = prev
        prev, nxt = ticket._all_prev, ticket._all_next
        if prev is None:
            self._all_head = nxt
        else:
            prev._all_next = nxt
        if nxt is None:
            self._all_tail = prev
        else:
            nxt._all_prev = prev
        # Clearing the links lets a popped ticket, held by the caller, not keep
        # its neighbours (and their payloads) alive.
        ticket._user_prev = ticket._user_next = None
        ticket._all_prev = ticket._all_next = None
        ticket._owner = None
        uq.live -= 1
        self._len -= 1
        if uq.live == 0:
            del uq.ring[uq.user]
            del self._queues[uq.user]
