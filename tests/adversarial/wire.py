"""Raw-socket client side: send bytes, read back responses parsed strictly.

`parse_responses` splits a byte stream into responses and raises
`BadResponse` on anything that is not well-framed HTTP/1.1, so that "one
response per request" can be counted exactly, with no guessing.
"""

from __future__ import annotations

import json
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?$")


class BadResponse(Exception):
    """The bytes are not a sequence of well-framed responses."""


@dataclass
class Response:
    """One parsed response."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """The value of the first header called `name` (any case), or None."""
        for key, value in self.headers:
            if key == name.lower():
                return value
        return None

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)


def parse_responses(data: bytes, head_requests: int | list[bool] = 0
                    ) -> tuple[list[Response], bytes]:
    """Complete responses in `data`, and the bytes left over (an incomplete tail).

    `head_requests`: how many of the first responses answer HEAD (no body), or
    for each response in order whether it answers a HEAD.
    1xx responses are dropped (interim, not answers).
    """
    heads = (head_requests if isinstance(head_requests, list)
             else [True] * head_requests)
    out: list[Response] = []
    rest = data
    while rest:
        end = rest.find(b"\r\n\r\n")
        if end < 0:
            break
        lines = rest[:end].split(b"\r\n")
        m = STATUS_LINE.match(lines[0])
        if m is None:
            raise BadResponse(f"bad status line {lines[0][:120]!r}")
        resp = Response(int(m.group(1)))
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise BadResponse(f"bad header line {line[:120]!r}")
            resp.headers.append((name.strip().lower().decode("latin-1"),
                                 value.strip().decode("latin-1")))
        body_start = end + 4
        if 100 <= resp.status < 200:
            rest = rest[body_start:]
            continue
        lengths = [v for k, v in resp.headers if k == "content-length"]
        chunked = any(k == "transfer-encoding" and "chunked" in v.lower()
                      for k, v in resp.headers)
        if len(lengths) > 1 or (lengths and chunked):
            raise BadResponse(f"ambiguous framing: {resp.headers!r}")
        is_head = len(out) < len(heads) and heads[len(out)]
        if is_head or resp.status in (204, 304):
            out.append(resp)
            rest = rest[body_start:]
            continue
        if chunked:
            pos = body_start
            body = bytearray()
            complete = False
            while True:
                line_end = rest.find(b"\r\n", pos)
                if line_end < 0:
                    break
                try:
                    size = int(rest[pos:line_end].split(b";")[0], 16)
                except ValueError:
                    raise BadResponse(f"bad chunk size {rest[pos:line_end][:40]!r}") from None
                pos = line_end + 2
                if size == 0:
                    # Trailer fields, if any, then the empty line.
                    while True:
                        line_end = rest.find(b"\r\n", pos)
                        if line_end < 0:
                            break
                        field_line, pos = rest[pos:line_end], line_end + 2
                        if not field_line:
                            complete = True
                            break
                    break
                if len(rest) < pos + size + 2:
                    break
                body += rest[pos : pos + size]
                if rest[pos + size : pos + size + 2] != b"\r\n":
                    raise BadResponse("chunk not followed by CRLF")
                pos += size + 2
            if not complete:
                break
            resp.body = bytes(body)
            rest = rest[pos:]
        elif lengths:
            length = int(lengths[0])
            if len(rest) < body_start + length:
                break
            resp.body = rest[body_start : body_start + length]
            rest = rest[body_start + length :]
        else:
            # Delimited by close: everything that follows is this body.
            resp.body = rest[body_start:]
            rest = b""
        out.append(resp)
    return out, rest


def exchange(port: int, data: bytes | list[bytes], timeout: float = 5.0,
             expect: int | None = None, head_requests: int | list[bool] = 0,
             pause: float = 0.0) -> tuple[list[Response], bytes, bool]:
    """Write `data` (a list: separate writes, `pause` apart), read until close.

    Returns the parsed responses, any unparsed tail and whether the gateway
    closed the connection before `timeout`. With `expect`, reading stops as
    soon as that many responses arrived (the socket is then closed by us).
    """
    parts = [data] if isinstance(data, bytes) else data
    buf = b""
    closed = False
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        for i, part in enumerate(parts):
            if i and pause:
                time.sleep(pause)
            try:
                sock.sendall(part)
            except OSError:
                break
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(1 << 20)
            except TimeoutError:
                break
            except OSError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            buf += chunk
            if expect is not None:
                got, _ = parse_responses(buf, head_requests)
                if len(got) >= expect:
                    break
    responses, rest = parse_responses(buf, head_requests)
    return responses, rest, closed


def request(method: str, path: str, body: bytes | None = None,
            headers: list[tuple[str, str]] | None = None, host: bool = True) -> bytes:
    """One well-formed HTTP/1.1 request."""
    lines = [f"{method} {path} HTTP/1.1"]
    if host:
        lines.append("Host: gw")
    for name, value in headers or []:
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


# One keep-alive client for the many small requests of the fuzz tests.
CLIENT = httpx.Client(timeout=10)


def bystander_ok(url: str, headers: dict[str, str] | None = None, timeout: float = 10.0,
                 openai: bool = False) -> bool:
    """Another user's ordinary chat request is answered 200 (`openai`: on /v1)."""
    h = {"X-User-ID": "bystander"}
    h.update(headers or {})
    messages = [{"role": "user", "content": "hello"}]
    if openai:
        r = CLIENT.post(url + "/v1/chat/completions", headers=h, timeout=timeout,
                        json={"model": "fake", "messages": messages})
        return r.status_code == 200 and bool(r.json().get("choices"))
    r = CLIENT.post(url + "/api/chat", headers=h, timeout=timeout,
                    json={"model": "fake", "stream": False, "messages": messages})
    return r.status_code == 200 and r.json().get("done") is True


def wait_until(check: Any, timeout: float = 5.0, step: float = 0.01) -> bool:
    """Poll `check()` until it is true or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(step)
    return bool(check())
