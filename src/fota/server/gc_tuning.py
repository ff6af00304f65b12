"""Garbage-collector settings of a control-center process (``fota serve``, ``fota worker``).

Ingestion allocates a few dozen container objects per status (MQTT packet, task, future, parsed
message, rows), so with CPython's default thresholds (700, 10, 10) a center taking 4,000
statuses/s ran hundreds of young collections and a few full ones per second; the full ones
walked every object the process had loaded (modules, SQLAlchemy's metadata and caches) and held
the interpreter lock ~100 ms each. Measured in the ingestion benchmark (bench/README.md,
fleet part 2): 0.5-1.0 s of collector time per 20,000 statuses, 0.1-0.16 s with these settings.

Only memory held in reference cycles is affected (it is freed later); nothing is leaked except
cycles among the objects that existed at start-up, which live as long as the process anyway.
"""
from __future__ import annotations

import gc

__all__ = ["THRESHOLDS", "tune_gc"]

# A young collection every 10,000 net allocations (not 700); older generations as rarely.
THRESHOLDS = (10_000, 20, 20)


def tune_gc() -> None:
    """Move what start-up allocated out of the collector's sight (gc.freeze) and collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
