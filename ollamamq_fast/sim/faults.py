"""Parse the test-only `X-Sim-Fault` request header (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass

# The line Ollama appends when the runner fails after the 200 head went out.
MID_STREAM_ERROR = "an error was encountered while running the model"
# Gap between the two halves of a line with `split-lines`.
SPLIT_GAP_S = 0.02
# Lines written before `mid-stream-error` strikes.
MID_STREAM_ERROR_AFTER = 2


@dataclass(slots=True)
class Faults:
    """What to break in one response; several may be combined with commas."""

    die_after: int | None = None
    split_lines: bool = False
    status: int | None = None
    hang: bool = False
    hang_body: bool = False
    close: bool = False
    mid_stream_error: bool = False

    @property
    def shapes_stream(self) -> bool:
        """True when the stream must be written line by line instead of in batches."""
        return self.die_after is not None or self.split_lines or self.hang_body or self.mid_stream_error


def parse_faults(value: bytes | None) -> Faults | None:
    """`die-after:3, split-lines` -> Faults; unknown words are ignored, None if nothing applies."""
    if not value:
        return None
    faults = Faults()
    found = False
    for word in value.decode("latin-1").lower().split(","):
        name, _, arg = word.strip().partition(":")
        name = name.strip()
        arg = arg.strip()
        if name == "die-after" and arg.isdigit():
            faults.die_after = int(arg)
        elif name == "status" and arg.isdigit() and 100 <= int(arg) <= 999:
            faults.status = int(arg)
        elif name == "split-lines":
            faults.split_lines = True
        elif name == "hang":
            faults.hang = True
        elif name == "hang-body":
            faults.hang_body = True
        elif name == "close":
            faults.close = True
        elif name == "mid-stream-error":
            faults.mid_stream_error = True
        else:
            continue
        found = True
    return faults if found else None


def fault_message(status: int, model: str) -> str:
    """The Ollama error text that goes with a forced status code."""
    messages = {
        400: "bad request",
        401: "unauthorized",
        403: "forbidden",
        404: f"model '{model}' not found",
        429: "too many requests",
        499: "request canceled",
        500: MID_STREAM_ERROR,
        502: "bad gateway",
        503: "server busy, please try again.  maximum pending requests exceeded",
        504: "gateway timeout",
    }
    return messages.get(status, f"simulated error {status}")
