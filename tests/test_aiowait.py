"""Bounded waits in the control center's and the simulator's long-running tasks end when the task
is cancelled, even when what they wait for arrives in the same loop turn (fota.aiowait: Python
3.11's asyncio.wait_for loses that cancellation, and ControlCenter.stop then waited for ever)."""
import asyncio
import logging

import pytest

from fota.aiowait import cancel_and_wait, within


async def _waiter_loop(event: asyncio.Event, wait) -> None:
    while True:
        try:
            await wait(event.wait(), 5)
        except TimeoutError:
            pass
        event.clear()


async def _set_and_cancel(wait) -> asyncio.Task:
    event = asyncio.Event()
    task = asyncio.create_task(_waiter_loop(event, wait))
    await asyncio.sleep(0)          # the task now waits on the event
    event.set()                     # what it waits for arrives ...
    task.cancel()                   # ... in the same turn as its cancellation
    await asyncio.wait({task}, timeout=2)
    return task


def test_within_keeps_a_cancellation_that_comes_with_the_result():
    async def scenario():
        task = await _set_and_cancel(within)
        assert task.cancelled(), "the cancelled loop kept running"
    asyncio.run(scenario())


def test_within_times_out_and_returns_results():
    async def scenario():
        assert await within(asyncio.sleep(0, "done"), 1) == "done"
        with pytest.raises(TimeoutError):
            await within(asyncio.Event().wait(), 0.05)
    asyncio.run(scenario())


def test_stop_ends_a_task_that_lost_its_cancellation(caplog):
    """The stop's last resort: a task that swallowed one cancellation is cancelled again."""
    async def stubborn():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            pass                     # lost, as wait_for loses it on 3.11
        await asyncio.sleep(60)

    async def scenario():
        task = asyncio.create_task(stubborn(), name="stubborn")
        await asyncio.sleep(0)
        await asyncio.wait_for(cancel_and_wait(task), 10)
        assert task.cancelled()

    with caplog.at_level(logging.WARNING, logger="fota.aiowait"):
        asyncio.run(scenario())
    assert "stubborn still runs after its cancellation" in caplog.text
