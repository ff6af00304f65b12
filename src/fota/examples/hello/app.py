# A tiny device app: the part of the firmware that fota updates.
VERSION = "1.0.0"
BROKEN = False

_ticks = 0


def start():
    if BROKEN:
        raise RuntimeError("hello app %s: sensor init failed" % VERSION)
    print("hello app", VERSION, "started")


def tick():
    global _ticks
    _ticks += 1
