# The agent as an asyncio task, for an app that runs its own asyncio loop (MicroPython's
# asyncio; CPython's works too). Every step of the agent is one bounded Device.poll(0) (it never
# waits for the network inside the step); between steps the task gives the loop back for
# step_ms, or at once when messages are waiting. A Reboot raised by a step ends the task, and
# run_with() re-raises it out of asyncio.run(), so the runner can disconnect and reset.
#
#   async def main(agent):                 # the app's main, in the slot's app.py
#       asyncio.create_task(sensor_loop())
#       ...                                # the board runner runs the agent task beside it
import asyncio

STEP_MS = 20  # the pause between two steps of the agent when it has nothing waiting


def _sleep_ms(ms):
    if hasattr(asyncio, "sleep_ms"):  # MicroPython
        return asyncio.sleep_ms(ms)
    return asyncio.sleep(ms / 1000)


async def run(device, step_ms=STEP_MS):
    """The agent's loop as a coroutine: returns only by an exception (Reboot)."""
    busy = getattr(device, "busy", None)
    while True:
        device.poll(0)
        await _sleep_ms(0 if busy is not None and busy() else step_ms)


async def run_with(device, app_coro, step_ms=STEP_MS):
    """Run the app's coroutine and the agent side by side; ends when the agent does (a Reboot,
    re-raised here). An app coroutine that ends or fails leaves the agent running."""
    agent = asyncio.create_task(run(device, step_ms))
    asyncio.create_task(_app(app_coro))
    await agent


async def _app(coro):
    try:
        await coro
    except Exception as e:  # the app's failure is not the agent's: it goes on
        print("[fota] the app's main failed:", type(e).__name__, e)
