"""Garbage-collector settings for the long-running processes: the control center (`fota serve`,
`fota worker`) and the fleet simulator.

Ingestion allocates a few dozen container objects per status (MQTT packet, task, future, parsed
message, rows) and the simulator as many per chunk, so with CPython's default thresholds
(700, 10, 10) a busy process ran hundreds of young collections and a few full ones per second;
the full ones walked every object the process had loaded (modules, SQLAlchemy's metadata and
caches, thousands of sessions or simulated devices) and held the interpreter lock ~100 ms each.
Measured (bench/README.md, fleet): in the ingestion run 0.5-1.0 s of collector time per 20,000
statuses, 0.1-0.16 s with these settings; in a 2,000-device deployment about 20 % less CPU for
both the control center and the simulator.

`gc.freeze()` moves what start-up allocated out of the collector's sight. Only memory held in
reference cycles is affected (it is freed later; reference counting frees the rest at once).
FOTA_GC_DEFAULT=1 in the environment keeps CPython's defaults, to measure the difference.
"""
from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator

# A young collection every 10,000 net allocations (not 700); older generations as rarely.
THRESHOLDS = (10_000, 20, 20)


def tune_for_throughput() -> None:
    """Call once the process has started: freeze what exists, collect less often."""
    if os.environ.get("FOTA_GC_DEFAULT"):
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


@contextlib.contextmanager
def tuned() -> Iterator[None]:
    """tune_for_throughput() for a block (a benchmark hosting a control center), then back."""
    thresholds = gc.get_threshold()
    tune_for_throughput()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
