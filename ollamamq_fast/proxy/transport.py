"""The transport interface the data plane uses, typed by structure.

uvloop's transports implement asyncio.Transport without subclassing it, and
mypyc-compiled code checks a class annotation at run time, so an attribute
annotated `asyncio.Transport` would refuse uvloop's. A Protocol is checked by
mypy and not at run time; test fakes fit it by having the methods.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

Buffer = bytes | bytearray | memoryview


class Transport(Protocol):
    """The part of asyncio.Transport that the proxy calls."""

    def write(self, data: Buffer, /) -> None: ...

    def writelines(self, list_of_data: Iterable[Buffer], /) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def is_closing(self) -> bool: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...

    def get_extra_info(self, name: str, default: Any = None, /) -> Any: ...
