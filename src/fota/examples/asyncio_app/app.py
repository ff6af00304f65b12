# An example app with its own asyncio loop (style "the agent as an asyncio task", docs/boards.md
# "How the app and the agent share the board"). The board runner (fota.device.board) starts the
# slot's app, sees `async def main(agent)` and runs it with asyncio, the agent beside it as a task
# (fota.device.aio): each of the agent's steps is bounded, and between steps it gives the loop
# back. A task that never awaits starves the agent, which then stops feeding the trial watchdog:
# during a trial the board resets and the update is rolled back.
#
# Runs as is under MicroPython (a board, or the unix port with the emulated board modules).
import asyncio
import time

VERSION = "1.0.0"
PERIOD_MS = 10         # the blink task's period
REPORT_MS = 2000

blinks = 0
longest_gap_ms = 0     # the longest time between two wake-ups of the blink task


def start():
    print("asyncio_app", VERSION, "started")


async def blink():
    # The app's job, on a fixed period: here it only counts (a board would toggle an LED).
    global blinks, longest_gap_ms
    last = time.ticks_ms()
    while True:
        await asyncio.sleep_ms(PERIOD_MS)
        now = time.ticks_ms()
        longest_gap_ms = max(longest_gap_ms, time.ticks_diff(now, last) - PERIOD_MS)
        last = now
        blinks += 1


async def main(agent):
    asyncio.create_task(blink())
    while True:
        await asyncio.sleep_ms(REPORT_MS)
        print("asyncio_app %s: %d blinks, longest lateness %d ms" % (VERSION, blinks, longest_gap_ms))
