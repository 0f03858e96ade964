"""Small asyncio helpers shared by the background parts (flusher, syncers, probes)."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait until it has finished.

    The task's own CancelledError is absorbed; a cancellation of the caller
    (the one awaiting this) is passed on, never swallowed.
    """
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
