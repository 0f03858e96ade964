"""A fast fake Ollama server (plus OpenAI-compatible `/v1`) that paces tokens like a GPU.

Used by the gateway's demos, tests and benchmarks instead of real backends::

    sim = await start_sim(SimOptions(ttft_ms=50, tokens_per_s=50))
    ...  # point clients or the gateway at sim.url
    await sim.close()

Wire behaviour follows docs/protocol-notes.md: status codes, content types, NDJSON
and SSE shapes, Go JSON escapes (`\\u003c`), chunked framing (one line per chunk;
JSON bodies over 2 KiB come back chunked as from Go's net/http), `Expect:
100-continue`, HEAD, keep-alive and pipelining.

Simulator choices (where a real model would decide):

* Every completion model advertises `completion`, `tools`, `thinking`; models whose
  name contains `minilm`, `embed` or `bge` are embedding-only (`chat`/`generate` → 400).
* Text is a deterministic walk over an English word list, seeded by the prompt (or
  conversation) and `options.seed`; it contains `R&D`, `<ok>` and `café` so Go's
  escapes and raw UTF-8 show up on the wire.
* `think` (true or a level) emits `max(1, tokens // 4)` reasoning tokens before the
  answer; without `think` there is no reasoning output.
* Tool calls: with `tools` in a chat whose last message is the user's, the model
  calls the tool whose function name appears in that message, or the first tool if
  the message contains the word "tool"/"tools". Arguments are filled from the JSON
  schema (`city`/`location` → "Tokyo", strings → "sim", integers → 1, ...).
* `format` ("json" or a schema) / `response_format` makes the answer valid JSON.
* Pulling a model whose name starts with `missing` or `nonexistent` fails with
  `pull model manifest: file does not exist`; any other name succeeds and appears in
  /api/tags.
* Embeddings are unit vectors from a hash of (model, input); `/api/embed` and
  `/v1/embeddings` wait ttft_ms.
* Tokens are produced lazily, so `X-Sim-Tokens: 10000000` streams in constant
  memory; generate's `context` array is capped at 32768 ids.

Test-only request headers (they pass through a gateway):

``X-Sim-Tokens: N``
    Natural answer length N tokens (num_predict / max_tokens still cap it).
``X-Sim-Delay-Ms: N``
    Wait N ms before handling the request (before the response head).
``X-Sim-Fault: <fault>[, <fault>...]``
    ``die-after:N``      close the TCP connection (FIN, after flushing) right after N
                         NDJSON lines / SSE events of a stream: no terminating chunk
                         (N=0 sends only the head; a shorter stream ends normally).
    ``split-lines``      send each line / event as two chunks ~20 ms apart, split
                         mid-line (a non-stream body is split in two halves).
    ``status:CODE``      answer CODE at once with an Ollama-style error body (OpenAI
                         envelope on /v1), e.g. 500 or 503.
    ``hang``             read the request, never answer.
    ``hang-body``        send the 200 head and the first line, then nothing more.
    ``close``            close the connection without answering.
    ``mid-stream-error`` after 2 lines send ``{"error":"an error was encountered while
                         running the model"}`` and end the stream normally (SSE: a
                         ``data: {"error":{...}}`` event, no [DONE]); non-stream: 500.

Counters for tests are in `SimServer.stats` (`requests`, `active`, `cancelled`,
`cancel_times`, `connection_close_times`, ...); times are `loop.time()` values taken
inside `connection_lost`.
"""

from .options import SimOptions, SimStats
from .server import SimServer, start_sim

__all__ = ["SimOptions", "SimServer", "SimStats", "start_sim"]
