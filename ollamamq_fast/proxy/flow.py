"""Flow-control limits shared by both sides of the proxy.

Backpressure is transport-to-transport: when a client's write buffer passes
HIGH_WATER its backend connection stops being read, and when a backend's write
buffer passes HIGH_WATER (a large upload) the client stops being read. So no
buffer in the gateway grows past about HIGH_WATER per direction per exchange.
"""

from __future__ import annotations

# 256 KiB: a few hundred NDJSON lines, far above one token chunk, so a healthy
# client never trips it, while a stalled one costs at most this much memory.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024

# Request bytes of pipelined requests queued behind the active one before the
# client is paused (each pipelined request waits its turn, RFC 9112 §9.3.2).
PIPELINE_BUFFER_LIMIT = 1024 * 1024

# Request heads larger than this get 431 (h11 and nginx use limits of this order).
MAX_HEAD_BYTES = 64 * 1024
