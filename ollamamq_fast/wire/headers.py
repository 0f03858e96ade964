"""Request heads: what the gateway reads from them and what it forwards. Pure functions.

`RequestHead` reads a request's headers one by one as the parser meets them
(`read_request_head` does so for a list of pairs): framing headers
(Content-Length, Transfer-Encoding, Expect), identity (X-User-ID,
Authorization, X-API-Key, X-Forwarded-For), what the policy reads
(Cache-Control, Content-Encoding), hop-by-hop headers that never go on
(RFC 9110 §7.6.1), and everything else, forwarded as it came. Identity,
credentials, Host and Origin may come once (`RequestHead.repeated`): the gateway and
the backend would otherwise read different ones (Go's `Header.Get` takes the
first); a Transfer-Encoding must be `chunked` alone (`RequestHead.coding`),
as Go requires, since the body is forwarded de-chunked.
`forwarded_block` builds the header lines a backend receives (`KeptLines` keeps a
connection's last ones).
Nothing here touches a socket, so each rule is tested with plain bytes.
"""

from __future__ import annotations

import re
from typing import Final

from mypy_extensions import mypyc_attr

# What happens to a request header, by lowercased name.
KEEP: Final = 0  # forwarded as it is
LENGTH: Final = 1
TRANSFER_ENCODING: Final = 2
EXPECT: Final = 3
USER: Final = 4
FORWARDED_FOR: Final = 5
DROP: Final = 6
CONNECTION: Final = 7
CONTENT_ENCODING: Final = 8
AUTHORIZATION: Final = 9
API_KEY: Final = 10
CACHE_CONTROL: Final = 11
REQUEST_ID: Final = 12
HOST: Final = 13  # not forwarded (the backend gets its own); read for Host-routed pools
ORIGIN: Final = 14  # a browser's: the gateway answers CORS itself (wire/cors.py), not forwarded

_SPECIAL: Final[dict[bytes, int]] = {
    b"content-length": LENGTH,
    b"transfer-encoding": TRANSFER_ENCODING,
    b"expect": EXPECT,
    b"x-user-id": USER,
    b"x-forwarded-for": FORWARDED_FOR,
    b"host": HOST,  # rewritten to the backend's authority (docs/protocol-notes.md)
    b"connection": CONNECTION,
    b"content-encoding": CONTENT_ENCODING,
    b"authorization": AUTHORIZATION,
    b"x-api-key": API_KEY,
    b"cache-control": CACHE_CONTROL,  # forwarded; also read by the response cache
    b"x-request-id": REQUEST_ID,  # the client's, if sane, else the gateway's: sent on
    b"origin": ORIGIN,
    b"keep-alive": DROP,
    b"proxy-connection": DROP,
    b"proxy-authorization": DROP,
    b"te": DROP,
    b"trailer": DROP,
    b"upgrade": DROP,
    # CGI-style servers (WSGI, PHP, nginx with underscores_in_headers) read
    # `X_User_ID` as `X-User-ID`: such spellings of what the gateway decides on
    # never go on (nginx drops every underscore name by default).
    b"x_user_id": DROP,
    b"x_api_key": DROP,
    b"x_forwarded_for": DROP,
}
# Kinds a request may name once (as bits of a mask): which of two would the
# backend read? Go's Header.Get takes the first, the gateway took the last.
_ONCE: Final = (1 << USER) | (1 << AUTHORIZATION) | (1 << API_KEY) | (1 << HOST) | (1 << ORIGIN)

# Header names as spelled on the wire -> what happens to them. Peers repeat the
# same few spellings, so each is lowercased and looked up once, then kept with
# the others of its shape; at most this many per shape, so that a peer
# inventing spellings cannot grow the table (beyond it: a lowercase and a look-up).
_SPELLINGS_PER_SHAPE: Final = 8


# Names are sorted by shape, (length, first letter lowercased): a table of
# this many shapes, for names shorter than _SHAPE_LEN bytes.
_SHAPE_LEN: Final = 32


class NameKinds:
    """What a table of lowercase header names says of a name, by its spelling.

    `kind` answers for any spelling. Header names arrive as new bytes objects
    on every request, so a dict lookup would hash each one (about 400
    instructions). Instead names are sorted by shape: most names have a shape
    no table name has, and answer the default at once; the others are
    compared with the few spellings of their shape seen before (a length
    check and a memcmp each), learned on first sight. Used for request heads
    here and response heads in framing.py.
    """

    def __init__(self, table: dict[bytes, int], default: int) -> None:
        self.table = table
        self.default = default
        spellings: list[list[tuple[bytes, int]] | None] = [None] * (_SHAPE_LEN * 256)
        for name in table:
            assert 0 < len(name) < _SHAPE_LEN and name == name.lower(), name
            spellings[len(name) << 8 | name[0]] = []
        self.spellings = spellings

    def kind(self, name: bytes) -> int:
        """The kind of a header called `name`, in any spelling."""
        n = len(name)
        if n == 0 or n >= _SHAPE_LEN:
            return self.default
        # `| 0x20` lowercases an ASCII letter; table names start with one.
        seen = self.spellings[n << 8 | (name[0] | 0x20)]
        if seen is None:
            return self.default
        for spelling, kind in seen:
            if spelling == name:
                return kind
        return self.learn(name, seen)

    def learn(self, name: bytes, seen: list[tuple[bytes, int]]) -> int:
        """The kind of a spelling not seen yet (then kept with its shape's, within the bound)."""
        kind = self.table.get(name.lower(), self.default)
        if len(seen) < _SPELLINGS_PER_SHAPE:
            seen.append((name, kind))
        return kind

# `Content-Length: N` plus the blank line, made once for the small bodies
# that nearly all requests have.
_LENGTH_LINES: Final = 4096
_length_lines: Final = [b"Content-Length: %d\r\n\r\n" % n for n in range(_LENGTH_LINES)]

# A client's X-Request-ID is kept when it is a sane token (what request-id
# generators emit: UUIDs, ULIDs, hex, with dots, dashes, colons); anything
# else is replaced by the gateway's own, so it never breaks a log line.
_SANE_REQUEST_ID: Final = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")
# What some backends accept as X-Request-ID: llama-cpp-python's server
# (starlette-context) answers 400 to any request whose id is not a UUID.
_UUID_ID: Final = re.compile(
    rb"[0-9A-Fa-f]{8}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{12}")

# A user name sent on to the backend as X-User-ID: printable ASCII only, so
# that no name can break the header it is written into.
_PRINTABLE_ID: Final = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,254}[\x21-\x7e])?")


_REQUEST_NAMES: Final = NameKinds(_SPECIAL, KEEP)


def classify(name: bytes) -> int:
    """What happens to a request header called `name` (any spelling)."""
    return _REQUEST_NAMES.kind(name)


@mypyc_attr(free_list_len=1)  # one per request: the freed one's memory is reused
class RequestHead:
    """What the gateway reads from a request's headers, header by header.

    The parser hands each header to `add` as it reads it (ClientProtocol.on_header),
    so a header that is not forwarded is never kept in a list to be sorted later;
    `finish` completes the reading once the head has ended.
    """

    __slots__ = ("api_key", "authorization", "bad_length", "cache_control", "chunked",
                 "coding", "coding_read", "connection_tokens", "content_length", "encoded_body",
                 "expect_continue", "forwarded_for", "host", "kept", "origin",
                 "owns_credentials", "repeated", "request_id", "seen", "user")

    def __init__(self, owns_credentials: bool = False) -> None:
        # `--auth keys`: the gateway's own keys and the client's claimed
        # identity are the gateway's to read, never forwarded.
        self.owns_credentials = owns_credentials
        self.content_length = -1
        self.chunked = False
        # An `Expect: 100-continue` (honoured for HTTP/1.1 only: finish()).
        self.expect_continue = False
        self.user = b""  # the client's X-User-ID, as sent
        self.forwarded_for = b""  # the client's X-Forwarded-For value
        self.authorization = b""
        self.api_key = b""
        self.cache_control = b""
        # A compressed body (zstd on /v1/responses, as codex sends it) cannot be
        # sniffed; it is passed through untouched to any backend of the route's kind.
        self.encoded_body = False
        self.coding_read = False  # the first Content-Encoding line was read
        self.kept: list[tuple[bytes, bytes]] = []  # forwarded as they came, in order
        self.request_id = b""  # the client's X-Request-ID, when it is sane
        self.host = b""  # the Host header as sent (pools may be chosen by it)
        self.origin = b""  # a browser's Origin (wire/cors.py)
        # The name (as sent) of an identity, credential or Host header that came
        # twice, b"" if none: such a request is refused (400).
        self.repeated = b""
        # A Transfer-Encoding other than `chunked` alone, or on a second line
        # (b"": none): refused with 501, as Go refuses it.
        self.coding = b""
        self.seen = 0  # the kinds met so far, as bits
        # Header names the Connection headers list (lowercase), beyond close and keep-alive.
        self.connection_tokens: set[bytes] | None = None
        # A Content-Length that is not a number (finish() raises on it).
        self.bad_length: bytes | None = None

    def add(self, name: bytes, value: bytes) -> None:
        """Read one header as it came. Never raises: the parser calls this."""
        action = _REQUEST_NAMES.kind(name)
        if action == KEEP:
            self.kept.append((name, value))
            return
        bit = 1 << action
        if self.seen & bit & _ONCE and not self.repeated:
            self.repeated = name
        self.seen |= bit
        if action == LENGTH:
            try:
                self.content_length = _decimal(value)
            except ValueError:
                self.bad_length = value
        elif action == TRANSFER_ENCODING:
            # The parser takes any list that ends in chunked; the body goes on
            # de-chunked, so any other coding would be lost on the way.
            if self.chunked or value.strip(b" \t").lower() != b"chunked":
                self.coding = value
            self.chunked = self.chunked or value.lower().find(b"chunked") >= 0
        elif action == EXPECT:
            self.expect_continue = value.strip().lower() == b"100-continue"
        elif action == USER:
            self.user = value  # checked by the policy (policy/identity.check_user_id)
            if not self.owns_credentials:
                self.kept.append((name, value))
        elif action == FORWARDED_FOR:
            # Several lines are one list (RFC 9110 §5.3), in order.
            self.forwarded_for = self.forwarded_for + b", " + value if self.forwarded_for \
                else value
        elif action == AUTHORIZATION:
            self.authorization = value
            if not self.owns_credentials:
                self.kept.append((name, value))
        elif action == API_KEY:
            self.api_key = value
            if not self.owns_credentials:
                self.kept.append((name, value))
        elif action == CACHE_CONTROL:
            # A list too: `no-store` on any line holds.
            self.cache_control = self.cache_control + b", " + value if self.cache_control \
                else value
            self.kept.append((name, value))
        elif action == CONTENT_ENCODING:
            self.kept.append((name, value))
            # What a backend decodes: Ollama's /v1 routes a body whose first
            # Content-Encoding is exactly `zstd` (Go's Header.Get); its native
            # routes, vLLM and llama.cpp none, reading the body as it came
            # whatever the header says. So that body alone is taken as
            # compressed (on /v1 routes: intake.py); any other is read, and
            # policed, as it is, as the backend reads it.
            if not self.coding_read:
                self.coding_read = True
                self.encoded_body = value.strip(b" \t") == b"zstd"
        elif action == REQUEST_ID:
            value = value.strip()
            if _SANE_REQUEST_ID.fullmatch(value):
                self.request_id = value
        elif action == HOST:
            self.host = value
        elif action == ORIGIN:
            self.origin = value
        elif action == CONNECTION:
            tokens = {t.strip().lower() for t in value.split(b",")}
            tokens -= {b"close", b"keep-alive"}
            if tokens:
                # Every Connection line counts (a list, like the others).
                if self.connection_tokens is None:
                    self.connection_tokens = tokens
                else:
                    self.connection_tokens |= tokens

    def finish(self, http_11: bool) -> None:
        """The head has ended: ValueError on a Content-Length that is not a number."""
        if self.bad_length is not None:
            raise ValueError(f"invalid Content-Length {self.bad_length[:40]!r}")
        if not http_11:
            self.expect_continue = False  # HTTP/1.0 has no 100 Continue
        tokens = self.connection_tokens
        if tokens:
            # RFC 9110 §7.6.1: headers named in Connection are hop-by-hop too.
            self.kept = [h for h in self.kept if h[0].lower() not in tokens]
            if b"content-encoding" in tokens:
                self.encoded_body = False  # not forwarded: the backend reads the body as it is


def _decimal(value: bytes) -> int:
    """A Content-Length value: ASCII digits only (ValueError otherwise).

    By hand, not int(): compiled, a loop over a few bytes costs less than the
    call, and int() would also take signs, spaces and underscores.
    """
    n = len(value)
    if n == 0 or n > 18:
        if n > 18 and value.isdigit():
            return int(value)
        return _decimal_trimmed(value)
    total = 0
    for c in value:
        if c < 0x30 or c > 0x39:
            return _decimal_trimmed(value)
        total = total * 10 + (c - 0x30)
    return total


def _decimal_trimmed(value: bytes) -> int:
    """A Content-Length with blanks after it (a field value's own, RFC 9110 §5.5;
    the parser drops those before it), else ValueError."""
    trimmed = value.rstrip(b" \t")
    if not trimmed or trimmed == value:
        raise ValueError(f"invalid Content-Length {value[:40]!r}")
    return _decimal(trimmed)


def read_request_head(headers: list[tuple[bytes, bytes]], http_11: bool,
                      owns_credentials: bool) -> RequestHead:
    """A request's headers read at once (RequestHead.add each, then finish):
    ValueError on a Content-Length that is not a number."""
    head = RequestHead(owns_credentials)
    for name, value in headers:
        head.add(name, value)
    head.finish(http_11)
    return head


def kept_lines(kept: list[tuple[bytes, bytes]]) -> bytes:
    """The `Name: value` lines of the headers a backend receives as the client sent them."""
    # The pieces of every line, joined once (compiled, appends are cheap and
    # each intermediate `name: value` would be an allocation).
    parts: list[bytes] = []
    for name, value in kept:
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")
    return b"".join(parts)


class KeptLines:
    """A connection's last kept header lines, reused while its requests keep the same headers.

    A client sends the same headers on every request of a connection (its
    library's defaults): comparing the parsed list with the last one is a few
    byte compares, where joining the lines again is a dozen appends and a join.
    """

    def __init__(self) -> None:
        self.kept: list[tuple[bytes, bytes]] = []
        self.lines = b""

    def of(self, kept: list[tuple[bytes, bytes]]) -> bytes:
        """kept_lines(kept), from the last request's when the headers are the same."""
        if not _same_pairs(kept, self.kept):
            self.kept = kept
            self.lines = kept_lines(kept)
        return self.lines


def _same_pairs(a: list[tuple[bytes, bytes]], b: list[tuple[bytes, bytes]]) -> bool:
    """`a == b` for header pairs. Compiled, each value is a typed bytes compare (a
    memcmp); the list compare goes through the generic tuple and object compares
    (about 230 instructions a value)."""
    n = len(a)
    if n != len(b):
        return False
    for i in range(n):
        x = a[i]
        y = b[i]
        if x[0] != y[0] or x[1] != y[1]:
            return False
    return True


_RID_NAME: Final = b"X-Request-ID: "


def forwarded_block(lines: bytes, user: str | None,
                    forwarded_for: bytes, peer_ip: bytes, request_id: bytes = b"") -> bytes:
    """The header lines a backend receives after its own Host line.

    `lines`: the client's headers that are kept (kept_lines). `user`: the
    authenticated user to send as X-User-ID (None: none is added; a name
    that could not be a header value is left out too). The client's address
    is appended to X-Forwarded-For; `request_id` is sent as X-Request-ID, so
    one request can be followed into the backend's logs.
    """
    uid = b""
    if user is not None and _PRINTABLE_ID.fullmatch(user):
        uid = b"X-User-ID: " + user.encode() + b"\r\n"
    # One join, empty pieces for what is absent: no intermediate bytes objects.
    return b"".join((
        lines,
        _RID_NAME if request_id else b"", request_id, b"\r\n" if request_id else b"",
        uid,
        b"X-Forwarded-For: ", forwarded_for, b", " if forwarded_for else b"", peer_ip, b"\r\n",
    ))


def backend_request_id(client_id: bytes, own_id: bytes) -> bytes:
    """The X-Request-ID a backend is sent: the gateway's own (always a UUID), or the
    client's when it is a UUID too; b"" (none) for any other client id."""
    if not client_id:
        return own_id
    return client_id if _UUID_ID.fullmatch(client_id) else b""


_JSON_TYPE_LINE: Final = b"Content-Type: application/json\r\n"
_CONTENT_TYPE: Final = b"content-type:"


def json_content_type(lines: bytes) -> bytes:
    """Forwarded header lines (forwarded_block's) that name the JSON body as JSON.

    An OpenAI-compatible server built on FastAPI (llama-cpp-python, vLLM) reads a
    body sent as another type (`curl -d` says application/x-www-form-urlencoded)
    as no object at all and answers 500 or 422, where Ollama, and the gateway,
    read any body as JSON: a Content-Type that is not JSON, or none, becomes
    `application/json`. The lines are returned as they are when they already say so.
    """
    low = lines.lower()
    if not low.startswith(_CONTENT_TYPE) and low.find(b"\r\n" + _CONTENT_TYPE) < 0:
        return lines + _JSON_TYPE_LINE
    kept: list[bytes] = []
    json_type = True
    for line in lines.split(b"\r\n"):
        if line[:13].lower() == _CONTENT_TYPE:
            media = line[13:].split(b";", 1)[0].strip().lower()
            json_type = json_type and (media == b"application/json" or (
                media.startswith(b"application/") and media.endswith(b"+json")))
        elif line:
            kept.append(line + b"\r\n")
    if json_type:
        return lines
    kept.append(_JSON_TYPE_LINE)
    return b"".join(kept)


def length_line(n: int) -> bytes:
    """`Content-Length: n` and the blank line that ends the head."""
    return _length_lines[n] if n < _LENGTH_LINES else b"Content-Length: %d\r\n\r\n" % n

