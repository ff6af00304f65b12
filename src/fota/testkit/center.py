"""A ControlCenter on its own asyncio loop in a background thread (tests and benchmarks)."""
from __future__ import annotations

import asyncio
import os
import threading
import time

from fota.server.center import ControlCenter


class CenterThread:
    """Runs a ControlCenter on its own event loop in a thread: start() returns once it is
    connected; run() runs a coroutine on its loop (e.g. center.set_keys)."""

    def __init__(self, store, broker_url, blobs, **settings):
        self.loop = asyncio.new_event_loop()
        # A client id of its own: a shared persistent session would hand one test's queued
        # statuses to the next test's center.
        settings.setdefault("client_id", f"center-{os.getpid()}-{time.monotonic_ns()}")
        self.center = ControlCenter(store, broker_url, blobs, **settings)
        self.thread = threading.Thread(target=self.loop.run_forever, name="center", daemon=True)

    def start(self) -> "CenterThread":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.center.start(), self.loop).result(30)
        return self

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        try:
            self.run(self.center.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
