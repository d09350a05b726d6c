"""A deliberately small HTTP/1.1 responder for ``/metrics`` and ``/health``.

One GET per connection, deadlines on every connection
(:data:`REQUEST_DEADLINE` seconds to send the request line and headers,
:data:`HTTP_DEADLINE` for everything, the answer included) and at most
:data:`HTTP_CLIENTS` at once, so a local user holding half-sent requests can
neither pin file descriptors nor slow logins. At that bound a new connection
closes the oldest one still sending its request, and is refused only when
all are being answered: refusing the newcomer instead would let 16 half-sent
requests take /health offline (a load balancer would then take the bastion
out of service), the same fair idea as the SSH door's (docs/hostile-clients.md).
A real client sends its whole request at once, in far less than 2 s. It listens on
``host:port`` or, for a path starting with ``/``, a Unix socket (how a
worker hands its page to the supervisor, :mod:`bastion.workers`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from bastion.addresses import split_host_port

HTTP_DEADLINE = 5.0  # seconds for a whole exchange
REQUEST_DEADLINE = 2.0  # seconds to send the request line and headers
HTTP_CLIENTS = 16
HTTP_LINE_MAX = 8192
HTTP_HEADERS_MAX = 64

# (status line, content type, body)
Answer = tuple[str, str, bytes]
Page = Callable[[], Awaitable[Answer]]


class SmallHTTP:
    """Serves ``routes`` (path → coroutine giving the answer) on the event loop."""

    def __init__(self, routes: Mapping[str, Page], default_port: int = 9102) -> None:
        self._routes = dict(routes)
        self._default_port = default_port
        self._server: asyncio.Server | None = None
        # connections being served, oldest first: True while still reading
        # their request (those may be closed to make room)
        self._clients: dict[asyncio.Task[None], bool] = {}
        self._evicted: set[asyncio.Task[None]] = set()  # cancelled to make room

    async def start(self, listen: str) -> None:
        """Listen on ``listen`` (``host:port``, or a Unix socket path).
        Raises OSError when it cannot."""
        if listen.startswith("/"):
            self._server = await asyncio.start_unix_server(self._serve, listen, limit=HTTP_LINE_MAX)
            return
        host, port = split_host_port(listen, self._default_port)
        self._server = await asyncio.start_server(
            self._serve, host or None, port, reuse_address=True, limit=HTTP_LINE_MAX
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def _make_room(self) -> bool:
        """At :data:`HTTP_CLIENTS`: close the oldest connection still sending
        its request. False when every one is being answered."""
        if len(self._clients) < HTTP_CLIENTS:
            return True
        oldest = next((task for task, reading in self._clients.items() if reading), None)
        if oldest is None:
            return False
        del self._clients[oldest]
        self._evicted.add(oldest)
        oldest.cancel()  # its finally closes its socket
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        if me is None or not self._make_room():
            writer.close()
            return
        self._clients[me] = True
        try:
            async with asyncio.timeout(HTTP_DEADLINE):
                async with asyncio.timeout(REQUEST_DEADLINE):
                    line = await reader.readline()
                    for _ in range(HTTP_HEADERS_MAX):  # the headers, ignored
                        if (await reader.readline()) in (b"\r\n", b"\n", b""):
                            break
                if me in self._clients:
                    self._clients[me] = False  # being answered: not evicted
                parts = line.decode("latin-1").split()
                path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
                page = self._routes.get(path)
                if len(parts) < 2 or parts[0] != "GET":
                    status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
                elif page is None:
                    known = " or ".join(sorted(self._routes))
                    status, ctype, body = "404 Not Found", "text/plain", f"{known}\n".encode()
                else:
                    status, ctype, body = await page()
                head = (
                    f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                )
                writer.write(head.encode() + body)
                await writer.drain()
        except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError):
            pass  # a slow, odd or vanished client: nothing to answer
        except asyncio.CancelledError:
            if me not in self._evicted:
                raise
            # closed to make room: end as any cut connection does (Python
            # 3.11's start_server logs a traceback for a cancelled client task)
            me.uncancel()
        finally:
            self._clients.pop(me, None)
            self._evicted.discard(me)
            writer.close()


async def fetch(path: str, what: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET ``what`` from the responder on Unix socket ``path``: (status, body).
    Raises OSError or TimeoutError when it does not answer."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
        try:
            writer.write(f"GET {what} HTTP/1.1\r\nHost: worker\r\n\r\n".encode())
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise OSError(f"not an HTTP answer from {path}") from None
    return status, body
