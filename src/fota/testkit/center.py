"""A ControlCenter on its own asyncio loop in a background thread (tests and benchmarks)."""
from __future__ import annotations

import asyncio
import concurrent.futures
import io
import os
import sys
import threading
import time
import traceback

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
            try:
                self.run(self.center.stop())
            except concurrent.futures.TimeoutError:
                raise TimeoutError("the control center did not stop in 30 s; where it waits:\n"
                                   + self.stacks()) from None
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    def stacks(self) -> str:
        """Where the loop's tasks and every thread wait (a diagnosis for a stop that hangs)."""
        out = io.StringIO()
        for task in list(asyncio.all_tasks(self.loop)):
            out.write(f"--- task {task.get_name()}\n")
            task.print_stack(limit=12, file=out)
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            out.write(f"--- thread {names.get(ident, ident)}\n")
            out.write("".join(traceback.format_stack(frame, limit=12)))
        return out.getvalue()
