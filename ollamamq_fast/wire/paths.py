"""Request paths normalized the way a backend will read them.

Routing, authentication and every policy decision are made on the path a
backend acts on, not on its spelling. Ollama's Go server routes on the
percent-decoded path (`net/url` decodes `%63` and `%2F` alike, and gin matches
`URL.Path`), so `/api/%63hat` is `/api/chat` there; other servers and the
proxies in front of them may also resolve dot segments or merge repeated
slashes. Without normalization a spelling the route table does not know would
be forwarded as an "unknown path" with `--allow-all-routes`, skipping the
queue, the caps and the limits of the route it really names.

So the gateway decodes percent escapes, removes dot segments (RFC 3986
§5.2.4), merges repeated slashes, routes on the result, and forwards that same
canonical path (re-encoded where a byte cannot appear in a path), so that what
the backend reads is exactly what the policy saw. A path that cannot be
decoded (a bad escape, a control byte, an encoded NUL) is refused with 400,
as Go's server refuses a bad escape.
"""

from __future__ import annotations

import re
from typing import Final

from ollamamq_fast.wire.routes import CANONICAL


class PathError(ValueError):
    """The request target cannot be read as a path (answered 400)."""


# Bytes that may stand in a path segment unencoded (RFC 3986 `pchar` plus
# "/"): unreserved, sub-delims, ":" and "@". Anything else is re-encoded
# after decoding, so that "%3F" decoded to "?" does not start a query string.
_PATH_SAFE: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/"
)
_ESCAPE: Final = re.compile(rb"%([0-9A-Fa-f]{2})")
_CONTROL: Final = re.compile(rb"[\x00-\x1f\x7f]")
_ABSOLUTE: Final = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


def request_path(target: bytes) -> tuple[bytes, bytes]:
    """(path, rest) of a request target: rest is the query string with its `?`, or b"".

    Origin-form (`/api/chat?x`) is the usual target; absolute-form
    (`http://host/api/chat`, RFC 9112 §3.2.2) is reduced to its path, as Go's
    server does, so it cannot slip past the route table. Anything else (the
    asterisk and authority forms) raises PathError.
    """
    if not target.startswith(b"/"):
        m = _ABSOLUTE.match(target)
        if m is None:
            raise PathError("the request target must be a path starting with '/'")
        target = target[m.end() :] or b"/"
        if not target.startswith(b"/"):
            target = b"/" + target
    # An int's membership in bytes is a memchr; the usual target has no query.
    if 0x3F not in target:  # '?'
        return target, b""
    # Searched as Latin-1 text (the same indexes): compiled, str.find is a
    # direct call where bytes.find goes through Python's argument parsing.
    query = target.decode("latin-1").find("?")
    if query < 0:
        return target, b""
    return target[:query], target[query:]


def normalize(path: bytes) -> bytes:
    """The canonical spelling of a path: the route table's own object for a route's
    path, `path` itself when it is canonical otherwise."""
    known = CANONICAL.get(path)
    if known is not None:
        return known  # a route's own spelling is canonical: one dict lookup, no scan
    if path.find(b"%") < 0 and path.find(b"//") < 0 and path.find(b"/.") < 0:
        return path  # the HTTP parser has already refused control bytes in the target
    decoded = _unescape(path) if path.find(b"%") >= 0 else path
    if _CONTROL.search(decoded) is not None:
        raise PathError("the request path holds a control character")
    out: list[bytes] = []
    segments = decoded.split(b"/")
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        if segment == b"..":
            if out:
                out.pop()
            if i == last:
                out.append(b"")  # "/a/b/.." is "/a/", a directory
        elif segment == b".":
            if i == last:
                out.append(b"")
        elif segment or i == last:
            out.append(segment)  # empty segments (repeated slashes) go, a trailing one stays
    return _encode(b"/" + b"/".join(out))


def _unescape(path: bytes) -> bytes:
    if path.count(b"%") != len(_ESCAPE.findall(path)):
        raise PathError("the request path holds an invalid percent escape")
    return _ESCAPE.sub(lambda m: bytes((int(m.group(1), 16),)), path)


def _encode(path: bytes) -> bytes:
    if all(c in _PATH_SAFE for c in path):
        return path
    return b"".join(bytes((c,)) if c in _PATH_SAFE else b"%%%02X" % c for c in path)
