"""The control center's database threads: the event loop (and so the chunk server) never waits
for the database.

All ingestion and job bookkeeping runs on one thread, so SQLite never sees two writers of ours at
once. Campaign steps and retention passes, which can be long, get a second thread on PostgreSQL
(row locks keep them apart from the other writers; ingestion is not held up); on SQLite they share
the one thread.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable, TypeVar

from fota.server.store import Store

T = TypeVar("T")


class DbThreads:
    def __init__(self, store: Store):
        self.main = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fota-db")
        self.aside = self.main if store.engine.dialect.name == "sqlite" else \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="fota-campaigns")

    async def call(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) on the main database thread."""
        return await asyncio.get_running_loop().run_in_executor(self.main, partial(fn, *args))

    async def call_aside(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) on the thread of long passes (campaign steps, retention)."""
        return await asyncio.get_running_loop().run_in_executor(self.aside, partial(fn, *args))

    def shutdown(self) -> None:
        """Wait for the calls under way, then end the threads."""
        self.main.shutdown(wait=True)
        self.aside.shutdown(wait=True)
