"""Where a relayed chunked body ends, found without a parser callback per chunk.

A backend's chunked answer is relayed byte for byte; the gateway only needs to
know where it ends (to reuse the connection, and to refuse bytes past the end).
llhttp finds that too, but httptools wraps every chunk in two Python-level
callbacks: about 340 instructions a chunk, a third of what relaying a 100-line
stream costs when its lines arrive together (a fast backend, or one that got
ahead of a slow client). Compiled, this scanner walks the same framing in about
a tenth of that: it reads each size line and skips each chunk's data.

It is as strict as llhttp is by default (RFC 9112 §7.1): CRLF line ends only,
hex sizes, extensions and trailer lines without control characters. The client
reads the same bytes with its own parser, so a lenient reading here could make
the two disagree on where the answer ends.

Interpreted, a Python loop per chunk costs more than llhttp's callbacks: the
pure-Python build keeps llhttp for the body (`SCAN_CHUNKS`).
"""

from __future__ import annotations

from typing import Final

from mypy_extensions import i64

# Compiled, __file__ names the extension module.
SCAN_CHUNKS: Final = not __file__.endswith(".py")

# Scanner states.
_SIZE: Final = 0  # hex digits of a chunk size
_EXT_NAME: Final = 1  # a chunk extension's name
_SIZE_LF: Final = 2  # the LF that ends a size line
_DATA: Final = 3  # chunk data, `remaining` bytes left
_DATA_CR: Final = 4  # the CR after chunk data
_DATA_LF: Final = 5  # the LF after chunk data
_TRAILER: Final = 6  # the start of a trailer line, or the CR of the blank last line
_TRAILER_LINE: Final = 7  # a trailer field's value, up to the CR
_TRAILER_LF: Final = 8  # the LF that ends a trailer line
_END_LF: Final = 9  # the LF of the blank line that ends the message
_DONE: Final = 10
_TRAILER_NAME: Final = 17  # a trailer field's name, up to its ':' (not an extension state)
# The extension states: _EXT_NAME, and 11 to 16.
_EXT_VALUE: Final = 11  # the first byte of an extension's value (after '=')
_EXT_TOKEN: Final = 12  # an unquoted value
_EXT_QUOTED: Final = 13  # inside a quoted value
_EXT_ESCAPE: Final = 14  # after a backslash in a quoted value
_EXT_CLOSED: Final = 15  # after a quoted value's closing quote
_EXT_START: Final = 16  # right after a ';' (an empty name is taken, as llhttp does)

_CR: Final = 13
_LF: Final = 10
_TAB: Final = 9
_DEL: Final = 127
# RFC 9110 §5.6.2 tchar: what names and unquoted values are made of.
_TCHAR: Final = frozenset(b"!#$%&'*+-.^_`|~0123456789"
                          b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# More hex digits than this is a size no backend sends (llhttp refuses sizes
# past 64 bits); the bound keeps sizes in the compiled code's fast integers.
_MAX_DIGITS: Final = 15
# llhttp refuses a trailer field of this name (any case): the message has a
# Transfer-Encoding, and it reads trailers as it reads header fields.
_CONTENT_LENGTH: Final = b"content-length"


class ChunkError(ValueError):
    """The backend's chunked framing is broken."""


class ChunkScanner:
    """Follows one chunked body across reads: feed() each read, learn where it ends."""

    def __init__(self) -> None:
        self.state = _SIZE
        self.size = 0
        self.digits = 0
        self.remaining = 0
        # How much of a trailer field's name matches _CONTENT_LENGTH so far (-1: none).
        self.matched = 0

    @property
    def done(self) -> bool:
        return self.state == _DONE

    def feed(self, data: bytes, at: int = 0) -> int:
        """Scan data[at:]: the offset just past the body's end, or -1 if it goes on.

        Raises ChunkError on framing that llhttp would refuse.
        """
        end: i64 = len(data)
        i: i64 = at
        state = self.state
        while i < end:
            if state == _SIZE and not self.digits:
                # At a chunk's start: whole chunks of the usual form go at once.
                i = _whole_chunks(data, i, end)
                if i >= end:
                    break
            if state == _DATA:
                left = end - i
                if left < self.remaining:
                    self.remaining -= left
                    self.state = state
                    return -1
                i += self.remaining
                self.remaining = 0
                state = _DATA_CR
                continue
            c = data[i]
            i += 1
            if state == _SIZE:
                digit = _hex_value(c)
                if digit < 0:
                    if self.digits and c == _CR:
                        state = _SIZE_LF
                    elif self.digits and c == 59:  # ';'
                        state = _EXT_START
                    else:
                        raise ChunkError(f"invalid chunk size byte {c:#04x}")
                    continue
                self.digits += 1
                if self.digits > _MAX_DIGITS:
                    raise ChunkError("chunk size too large")
                self.size = self.size * 16 + digit
            elif state == _SIZE_LF:
                if c != _LF:
                    raise ChunkError("chunk size line not ended by CRLF")
                if self.size:
                    self.remaining = self.size
                    state = _DATA
                else:
                    state = _TRAILER
                self.size = 0
                self.digits = 0
            elif state == _DATA_CR:
                if c != _CR:
                    raise ChunkError("chunk data longer than its size")
                state = _DATA_LF
            elif state == _DATA_LF:
                if c != _LF:
                    raise ChunkError("chunk data not ended by CRLF")
                state = _SIZE
            elif state == _TRAILER_LINE:
                if c == _CR:
                    state = _TRAILER_LF
                elif (c < 32 and c != _TAB) or c == _DEL:
                    raise ChunkError(f"control byte {c:#04x} in a trailer")
            elif _EXT_VALUE <= state <= _EXT_START or state == _EXT_NAME:
                state = self._extension(state, c)
            elif state == _TRAILER:
                if c == _CR:
                    state = _END_LF
                elif c in _TCHAR:
                    state = _TRAILER_NAME
                    self.matched = 1 if c | 32 == 99 else -1  # 'c'
                else:
                    raise ChunkError(f"invalid byte {c:#04x} in a trailer field name")
            elif state == _TRAILER_NAME:
                matched = self.matched
                if c == 58:  # ':'
                    if matched == len(_CONTENT_LENGTH):
                        raise ChunkError("a Content-Length trailer")
                    state = _TRAILER_LINE
                elif c not in _TCHAR:
                    raise ChunkError(f"invalid byte {c:#04x} in a trailer field name")
                elif 0 <= matched < len(_CONTENT_LENGTH) and c | 32 == _CONTENT_LENGTH[matched]:
                    self.matched = matched + 1
                else:
                    self.matched = -1
            elif state == _TRAILER_LF:
                if c != _LF:
                    raise ChunkError("trailer line not ended by CRLF")
                state = _TRAILER
            elif state == _END_LF:
                if c != _LF:
                    raise ChunkError("chunked body not ended by CRLF")
                self.state = _DONE
                return i
            else:  # _DONE: nothing is fed after the end
                raise ChunkError("bytes after the end of the chunked body")
        self.state = state
        return -1

    def _extension(self, state: int, c: int) -> int:
        """One byte of a chunk extension (`;name[=token|"quoted"]`, no spaces, as llhttp
        reads it); the next state. Rare: backends send none."""
        if state == _EXT_NAME or state == _EXT_START:
            if c in _TCHAR:
                return _EXT_NAME
            if c == 59:  # ';': another extension
                return _EXT_START
            if c == 61:  # '='
                return _EXT_VALUE
            if c == _CR and state == _EXT_NAME:
                return _SIZE_LF
        elif state == _EXT_VALUE or state == _EXT_TOKEN or state == _EXT_CLOSED:
            # llhttp takes an empty value, and a quote after a token's start.
            if state != _EXT_CLOSED and c == 34:  # '"'
                return _EXT_QUOTED
            if state != _EXT_CLOSED and c in _TCHAR:
                return _EXT_TOKEN
            if c == 59:
                return _EXT_START
            if c == _CR:
                return _SIZE_LF
        elif state == _EXT_QUOTED:
            if c == 34:
                return _EXT_CLOSED
            if c == 92:  # backslash
                return _EXT_ESCAPE
            if c == _TAB or (32 <= c and c != _DEL):
                return state
        elif state == _EXT_ESCAPE and (c == _TAB or (32 <= c and c != _DEL)):
            return _EXT_QUOTED
        raise ChunkError(f"invalid byte {c:#04x} in a chunk extension")


def _whole_chunks(data: bytes, i: i64, end: i64) -> i64:
    """Skip whole chunks of the usual form from i (hex size, CRLF, data, CRLF, all
    in data): where the first other one starts (an extension, the last chunk, one
    cut by the read's end, broken framing), for ChunkScanner's byte-wise states."""
    while True:
        j = i
        size: i64 = 0
        while j < end:
            digit = _hex_value(data[j])
            if digit < 0:
                break
            size = size * 16 + digit
            j += 1
        if j == i or j - i > _MAX_DIGITS or size == 0:
            return i
        after = j + 2 + size  # where the data's CRLF is
        if after + 2 > end or data[j] != _CR or data[j + 1] != _LF or data[after] != _CR \
                or data[after + 1] != _LF:
            return i
        i = after + 2


def _hex_value(c: i64) -> i64:
    """The value of a hex digit's byte, or -1."""
    if 48 <= c <= 57:
        return c - 48
    if 97 <= c <= 102:
        return c - 87
    if 65 <= c <= 70:
        return c - 55
    return -1
