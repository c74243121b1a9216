"""Running the dashboard: uvicorn on a socket bound here, in the foreground (``backfill serve``) or in a thread
(``backfill demo --serve``, tests)."""

from __future__ import annotations

import signal
import socket
import threading
import time
from types import FrameType

import uvicorn
from starlette.applications import Starlette

__all__ = ["DashboardServer", "bind_socket"]


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (port 0: a free one), IPv4 or IPv6 as ``host`` resolves.

    Raises:
        OSError: the address cannot be bound (in use, not this machine's).
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


class DashboardServer:
    """uvicorn serving ``app`` on a socket of its own. The library never configures logging: uvicorn's loggers
    are left to the application (``backfill serve`` routes them like its own events)."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 8000) -> None:
        self.socket = bind_socket(host, port)
        self.host, self.port = self.socket.getsockname()[:2]
        self._server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def run(self) -> None:
        """Serve in this thread until SIGINT/SIGTERM or :meth:`stop`, then return (a signal is an ordinary end)."""
        # uvicorn shuts down gracefully on these signals, then raises them again for the handlers it found: ours
        # only ask it to stop, so the process ends normally instead of by the signal.
        main = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, self._exit) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self.socket.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _exit(self, signum: int, frame: FrameType | None) -> None:
        self._server.should_exit = True

    def start(self, timeout: float = 10.0) -> DashboardServer:
        """Serve in a daemon thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self.run, name="backfill-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the dashboard server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
