"""An ASGI app served by uvicorn on 127.0.0.1 from a background thread (the demo's stubs)."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any, Self

import uvicorn

__all__ = ["HOST", "LoopbackServer"]

HOST = "127.0.0.1"  # loopback only: the stubs are never reachable from elsewhere


class LoopbackServer:
    """Serve ``app`` on ``127.0.0.1:port``; :meth:`start` returns once uvicorn answers."""

    def __init__(self, app: Any, *, name: str, startup_timeout: float = 10.0) -> None:
        self._app = app
        self._name = name
        self._startup_timeout = startup_timeout
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.base_url: str | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self, port: int = 0) -> str:
        """Serve on ``127.0.0.1:port`` (``0``: a free port); the base URL once it answers."""
        if self._server is not None:
            raise RuntimeError(f"the {self._name} is already running")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((HOST, port))
        except OSError:
            sock.close()
            raise
        config = uvicorn.Config(
            self._app,
            lifespan="off",
            ws="none",
            log_config=None,  # do not reconfigure the host application's logging
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        server = uvicorn.Server(config)
        self._server, self._socket = server, sock
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=self._name, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while not server.started:  # poll uvicorn's own readiness flag
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the {self._name} did not start")
            time.sleep(0.005)
        self.base_url = f"http://{HOST}:{sock.getsockname()[1]}"
        return self.base_url

    def stop(self) -> None:
        """Stop serving and release the port. Safe to call twice."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None
        self.base_url = None

    def __enter__(self) -> Self:
        if self._server is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
