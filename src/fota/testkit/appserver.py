"""An ASGI app (the API and dashboard) served by uvicorn on a free local port, in a thread: for the
browser tests, the dashboard bench and `fota demo --keep`."""
from __future__ import annotations

import threading
import time

import uvicorn

from fota.server.broker import free_port

__all__ = ["AppServer"]


class AppServer:
    """with AppServer(app) as server: server.url is http://127.0.0.1:<port>."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, *, tls=None):
        """tls: a fota.server.tls TlsFiles: serve HTTPS with its server certificate."""
        self.host, self.port = host, port or free_port()
        self.scheme = "https" if tls else "http"
        options = {"ssl_certfile": str(tls.certfile), "ssl_keyfile": str(tls.keyfile)} if tls else {}
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=1, lifespan="off", **options))
        self.thread = threading.Thread(target=self.server.run, name="appserver", daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def start(self, timeout: float = 20) -> AppServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def __enter__(self) -> AppServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
