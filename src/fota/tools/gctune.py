"""Garbage-collector settings for the long-running server processes (control center, workers,
fleet simulator).

CPython's cyclic collector runs a full pass over every tracked object each time enough young
objects survived; with tens of thousands of sessions, jobs and MQTT connections alive, those
passes cost the control center about a quarter of its CPU during a 10,000-device deployment
(bench/README.md, fleet). Objects made at start-up (modules, the fleet, the engine) are moved out
of the collector's sight with gc.freeze(), and the young generation is collected less often:
short-lived garbage is still freed at once by reference counting, only cycles wait longer.
"""
from __future__ import annotations

import gc
import os

YOUNG_THRESHOLD = 50_000   # CPython's default is 700 allocations


def tune_for_throughput() -> None:
    """Call once, after start-up: freeze what exists, collect the young generation less often.

    FOTA_GC_DEFAULT=1 in the environment keeps CPython's defaults (to measure the difference)."""
    if os.environ.get("FOTA_GC_DEFAULT"):
        return
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
