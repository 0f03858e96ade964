"""Replay of instant non-stream answers for repeated identical requests.

Benchmarks send the same tiny body again and again (`ttft_ms=0, tokens_per_s=0`).
Such an answer is fully determined by the body except for `created_at`, so after
answering it once the simulator keeps the rendered body split around that
timestamp and replays it: no JSON parsing, validation, planning or rendering per
request. What stays observable: /api/ps is refreshed (touch), stats.requests
counts the request, max_parallel still applies, and any change to the model set
drops every recipe. The durations are the ones measured for the first answer
(they are microseconds: nothing is paced in this mode).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from . import wire
from .exchange import Exchange, Request
from .models import ModelEntry
from .sources import TokenSource

if TYPE_CHECKING:
    from .app import SimApp
    from .protocol import SimProtocol

# Bodies larger than this are not worth a dictionary key.
MAX_BODY = 16384
# Distinct recipes kept; the table is simply cleared when full.
MAX_RECIPES = 1024
TOKENS_HEADER = b"x-sim-tokens"

RecipeKey = tuple[str, bytes, bytes | None]


class Recipe:
    """Everything needed to answer one known request body again."""

    __slots__ = ("after", "before", "content_type", "entry", "head", "keep_alive", "version")

    def __init__(
        self, before: bytes, after: bytes, entry: ModelEntry, keep_alive: float | None, content_type: bytes, version: int
    ) -> None:
        # The body is before + created_at + after.
        self.before = before
        self.after = after
        self.entry = entry
        self.keep_alive = keep_alive
        self.content_type = content_type
        self.head = wire.length_head_pieces(200, content_type, False)
        self.version = version


class FastLane:
    """The recipe table of one simulator."""

    def __init__(self, app: SimApp) -> None:
        self.app = app
        self.recipes: dict[RecipeKey, Recipe] = {}

    @staticmethod
    def key(req: Request) -> RecipeKey | None:
        """The table key, or None if the request carries headers that change its answer."""
        headers = req.headers
        if headers and (len(headers) > 1 or TOKENS_HEADER not in headers):
            return None
        body = req.body
        if len(body) > MAX_BODY or req.method != "POST":
            return None
        return (req.path, body, headers.get(TOKENS_HEADER) if headers else None)

    def remember(self, ex: Exchange, source: TokenSource, entry: ModelEntry, keep_alive: float | None, content_type: bytes) -> None:
        """Called for an instant non-stream native answer, before it is sent: keep its rendering."""
        if ex.faults is not None or ex.head_only:
            return
        key = self.key(ex.req)
        if key is None:
            return
        if len(self.recipes) >= MAX_RECIPES:
            self.recipes.clear()
        source.first = time.perf_counter()
        before, after = source.whole_parts()
        self.recipes[key] = Recipe(before, after, entry, keep_alive, content_type, self.app.store.version)

    def try_answer(self, conn: SimProtocol, req: Request) -> bool:
        """Answer `req` from a recipe if one applies; False means take the normal path."""
        key = self.key(req)
        if key is None:
            return False
        recipe = self.recipes.get(key)
        app = self.app
        if recipe is None or recipe.version != app.store.version:
            return False
        limit = app.options.max_parallel
        if limit and app.stats.active >= limit:
            return False
        app.store.touch(recipe.entry, recipe.keep_alive)
        clock = app.clock
        body = recipe.before + clock.created_at().encode() + recipe.after
        if req.keep_alive and len(body) <= wire.GO_CHUNKING_THRESHOLD:
            # Hot path: the cached head halves around Content-Length and Date.
            first, second = recipe.head
            conn.write(first + b"%d" % len(body) + second + clock.http_date() + b"\r\n\r\n" + body)
            return True
        close = not req.keep_alive
        if len(body) > wire.GO_CHUNKING_THRESHOLD:
            data = wire.head(200, clock.http_date(), recipe.content_type, None, close) + wire.frame(body) + wire.LAST_CHUNK
        else:
            data = wire.head(200, clock.http_date(), recipe.content_type, len(body), close) + body
        conn.write(data)
        if close:
            conn.close()
        return True
