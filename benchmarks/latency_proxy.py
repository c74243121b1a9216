"""A TCP proxy that delays every byte by a fixed time each way: a network's latency without netem.

    with DelayProxy("127.0.0.1", 5432, delay=0.001) as proxy:   # 1 ms each way, a 2 ms round trip
        psycopg.connect(proxy.rewrite(url))

    uv run python benchmarks/latency_proxy.py 127.0.0.1 5432 0.001   # standalone: prints the port it listens on

Data keeps its order and its chunking; each chunk is released ``delay`` seconds after it arrived, so throughput is
not limited, only latency added (plus the proxy's own hop). The proxy is an asyncio loop in a process of its own,
so it never waits for the benchmark's Python (the GIL) to forward a packet.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit


class DelayProxy:
    """Forward connections on a free local port to ``host:port``, ``delay`` seconds late in each direction."""

    def __init__(self, host: str, port: int, delay: float) -> None:
        self.host, self.port, self.delay = host, port, delay
        self.listen_port = 0
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> DelayProxy:
        self._process = subprocess.Popen(
            [sys.executable, __file__, self.host, str(self.port), repr(self.delay)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        self.listen_port = int(self._process.stdout.readline())
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._process is not None
        self._process.terminate()
        self._process.wait()

    def rewrite(self, url: str) -> str:
        """``url`` (a ``postgresql://`` URI) pointed at the proxy instead of the server."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        return urlunsplit(parts._replace(netloc=f"{userinfo}127.0.0.1:{self.listen_port}"))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                writer.close()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.ensure_future(deliver())
    try:
        while data := await reader.read(1 << 16):
            queue.put_nowait((loop.time() + delay, data))
    except ConnectionError:
        pass
    finally:
        queue.put_nowait((loop.time() + delay, b""))
        await sender


async def serve(host: str, port: int, delay: float) -> None:
    """Listen on a free local port, print it, and forward every connection until killed."""

    async def forward(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(host, port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            _pipe(client_reader, server_writer, delay),
            _pipe(server_reader, client_writer, delay),
            return_exceptions=True,
        )

    server = await asyncio.start_server(forward, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
