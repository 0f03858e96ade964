"""Test harness: real simulators and a real gateway on 127.0.0.1, free ports.

Servers run in one background thread with its own uvloop loop, so tests can
use ordinary blocking clients (the official `ollama` and `openai` clients,
httpx, raw sockets) exactly as users do.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import uvloop

from ollamamq_fast.config import Settings, parse_backend_urls
from ollamamq_fast.gateway import Gateway
from ollamamq_fast.sim import SimOptions, SimServer, start_sim

T = TypeVar("T")


class LoopThread:
    """An event loop running in a daemon thread; `run` executes a coroutine on it."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run `coro` on the loop and wait for its result."""
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def call(self, fn: Any, *args: Any) -> Any:
        """Call a plain function on the loop thread and return its result."""

        async def wrapper() -> Any:
            return fn(*args)

        return self.run(wrapper())

    def stop(self) -> None:
        """Stop the loop, join the thread and close the loop (its epoll, io_uring,
        eventfd and pipes: a suite of hundreds of stacks would otherwise pass the
        1024 descriptors `select` takes)."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive() and not self.loop.is_closed():
            self.loop.close()


@dataclass
class Stack:
    """A running gateway in front of one or more simulators."""

    lt: LoopThread
    gateway: Gateway
    sims: list[SimServer]
    extra: list[Any] = field(default_factory=list)

    @property
    def port(self) -> int:
        """The gateway's data-plane port."""
        return self.gateway.port

    @property
    def url(self) -> str:
        """The gateway's base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self) -> Any:
        """The gateway's live state (read it through `lt.call` for consistency)."""
        return self.gateway.state

    def close(self) -> None:
        """Stop the gateway and simulators, then the loop."""

        async def shutdown() -> None:
            await self.gateway.stop(grace=0.5)
            for sim in self.sims:
                await sim.close()

        try:
            self.lt.run(shutdown(), timeout=15)
        finally:
            self.lt.stop()


def fast_sim_options(**overrides: Any) -> SimOptions:
    """Simulator settings that keep tests quick: short TTFT, fast tokens."""
    options = SimOptions(ttft_ms=5.0, tokens_per_s=400.0, tokens=8)
    for key, value in overrides.items():
        setattr(options, key, value)
    return options


def start_stack(
    sims: list[SimOptions] | None = None,
    extra_backends: list[str] | None = None,
    configure: Callable[[Settings, list[SimServer]], None] | None = None,
    **settings: Any,
) -> Stack:
    """Start simulators and a gateway in front of them, on free loopback ports.

    `configure(settings, sims)` may change the settings last, knowing the
    simulators' URLs (pools of some of them, for instance).
    """
    lt = LoopThread()
    sim_options = sims if sims is not None else [fast_sim_options()]

    async def boot() -> tuple[Gateway, list[SimServer]]:
        servers = [await start_sim(o, "127.0.0.1", 0) for o in sim_options]
        s = Settings()
        s.host = "127.0.0.1"
        s.port = 0
        s.tui = False
        urls = [srv.url for srv in servers] + list(extra_backends or [])
        s.backends = parse_backend_urls(",".join(urls))
        s.slots = 4
        # No control plane unless a test asks for one (admin_port=0 picks a port),
        # so parallel stacks never compete for the default admin port.
        s.admin_port = -1
        for key, value in settings.items():
            setattr(s, key, value)
        if configure is not None:
            configure(s, servers)
        gw = Gateway(s)
        await gw.start()
        return gw, servers

    gateway, servers = lt.run(boot())
    return Stack(lt, gateway, servers)


def wait_until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Return once `check()` is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raw_request(port: int, data: bytes, timeout: float = 5.0, read_until_close: bool = False) -> bytes:
    """Send raw bytes to 127.0.0.1:port; return what came back.

    Reads until the peer closes (read_until_close) or until one full response
    has arrived, judged by Content-Length or the final chunk.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_response(sock, timeout, read_until_close)


def read_response(sock: socket.socket, timeout: float = 5.0, until_close: bool = False) -> bytes:
    """Read one HTTP response (or everything until close) from a socket."""
    sock.settimeout(timeout)
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        buf += chunk
        if not until_close and response_complete(buf):
            break
    return buf


def response_complete(buf: bytes) -> bool:
    """Whether `buf` holds at least one complete HTTP response (non-1xx)."""
    while True:
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            return False
        head = buf[:head_end].decode("latin-1")
        status = int(head.split(" ", 2)[1])
        if 100 <= status < 200:
            buf = buf[head_end + 4 :]
            continue
        lower = head.lower()
        body = buf[head_end + 4 :]
        if "transfer-encoding: chunked" in lower:
            return body.endswith(b"0\r\n\r\n")
        for line in lower.split("\r\n"):
            if line.startswith("content-length:"):
                return len(body) >= int(line.split(":", 1)[1])
        return status in (204, 304)


def split_responses(buf: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Parse a byte stream of back-to-back responses into (status, headers, body)."""
    out = []
    while buf:
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            break
        head = buf[:head_end].decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = {}
        for line in head[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        rest = buf[head_end + 4 :]
        if 100 <= status < 200:
            out.append((status, headers, b""))
            buf = rest
            continue
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                line_end = rest.find(b"\r\n")
                size = int(rest[:line_end].split(b";")[0], 16)
                rest = rest[line_end + 2 :]
                if size == 0:
                    rest = rest[2:]
                    break
                body += rest[:size]
                rest = rest[size + 2 :]
            out.append((status, headers, body))
            buf = rest
        else:
            length = int(headers.get("content-length", "0"))
            out.append((status, headers, rest[:length]))
            buf = rest[length:]
    return out


class SocketBackend:
    """A scripted HTTP/1.1 backend on a plain socket, one thread per connection.

    A subclass answers in `answer(conn, head)`, given the request head (up to
    its blank line, body bytes after it possibly included); `path_of(head)`
    reads its path.
    """

    def __init__(self) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.srv.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            self.answer(conn, head)

    def answer(self, conn: socket.socket, head: bytes) -> None:
        raise NotImplementedError

    @staticmethod
    def path_of(head: bytes) -> bytes:
        return head.split(b" ", 2)[1]

    def close(self) -> None:
        self.srv.close()


@contextlib.contextmanager
def admin_client(stack: Stack, token: str) -> Iterator[httpx.Client]:
    """A client of the stack's admin API (its control plane), authorized with `token`."""
    port = stack.gateway.admin_port
    assert port, "the control plane did not start"
    with httpx.Client(base_url=f"http://127.0.0.1:{port}",
                      headers={"Authorization": f"Bearer {token}"}, timeout=5) as client:
        yield client
