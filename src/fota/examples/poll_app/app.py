# An example app that owns a plain loop (style "the app calls agent.poll()", docs/boards.md
# "How the app and the agent share the board"). The board runner (fota.device.board) starts the
# slot's app, sees main(agent) and hands the board to it: the app's loop does its own work and
# gives the agent one bounded step per turn. The agent's step also feeds the trial watchdog,
# so a loop that stops calling agent.poll() resets the board during a trial.
#
# Runs as is under MicroPython (a board, or the unix port with the emulated board modules).
import time

VERSION = "1.0.0"
REPORT_MS = 2000       # how often the loop prints what it measured

loops = 0
longest_gap_ms = 0     # the longest time between two turns of the loop


def start():
    print("poll_app", VERSION, "started")


def work():
    # The app's job: read a sensor, drive an output... (here: a little arithmetic)
    global loops
    loops += 1
    return sum(range(50))


def main(agent):
    global longest_gap_ms
    last = reported = time.ticks_ms()
    while True:
        work()
        agent.poll(10)   # at most a bounded step (waits up to 10 ms for messages)
        now = time.ticks_ms()
        longest_gap_ms = max(longest_gap_ms, time.ticks_diff(now, last))
        last = now
        if time.ticks_diff(now, reported) >= REPORT_MS:
            reported = now
            print("poll_app %s: %d loops, longest gap %d ms" % (VERSION, loops, longest_gap_ms))
