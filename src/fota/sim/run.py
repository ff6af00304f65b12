"""Run a simulated fleet in its own process (used by `fota simulate` and bench/fleet.py).

    python -m fota.sim.run CONFIG.json

CONFIG: {"host", "port", "root": hex, "trust": {...}, "passwords": {id: password},
         "plan": {FailurePlan keyword arguments}, "device": {SimDevice keyword arguments},
         "verify": "cryptography" | "pure", "connect_batch": 500, "connect_pause": 0.05 (s between batches)}
Prints one JSON line {"event": "ready", ...} once every device has connected, then runs until
stdin reaches its end or a line "stop" arrives, and prints {"event": "summary", ...}. A line
"summary" prints {"event": "report", ...} (the same counters; http_first_chunk_s since the last
report) and goes on.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import sys
import time
from binascii import unhexlify

from fota.sim.fleet import FailurePlan, SimFleet
from fota.tools.gctune import tune_for_throughput


def raise_fd_limit() -> int:
    """Thousands of sockets: raise the soft open-files limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def build(config: dict) -> SimFleet:
    return SimFleet.build(config["passwords"], host=config["host"], port=config["port"],
                          root_key=unhexlify(config["root"]), trust=config["trust"],
                          plan=FailurePlan(**config.get("plan", {})), verify=config.get("verify", "cryptography"),
                          **config.get("device", {}))


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _stdin_closed(report=None) -> None:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or line.strip() == "stop":
            return
        if line.strip() == "summary" and report is not None:
            report()


async def main_async(config: dict, out=sys.stdout) -> dict:
    fleet = build(config)
    t0 = time.monotonic()
    await fleet.start(config.get("connect_batch", 500), config.get("connect_pause", 0.05))
    await fleet.wait_connected(config.get("connect_timeout", 300))
    tune_for_throughput()  # the fleet is built: thousands of long-lived objects
    print(json.dumps({"event": "ready", "devices": len(fleet.devices), "connect_s": time.monotonic() - t0,
                      "rss_mib": _rss_mib()}), file=out, flush=True)
    cpu0 = time.process_time()

    def report():
        print(json.dumps({**fleet.summary(), "event": "report", "cpu_s": time.process_time() - cpu0,
                          "rss_mib": _rss_mib()}), file=out, flush=True)
        for d in fleet.devices.values():
            d.fetch_waits.clear()  # the next report's http_first_chunk_s: since this one
    await _stdin_closed(report)
    summary = fleet.summary()
    summary.update(event="summary", cpu_s=time.process_time() - cpu0, rss_mib=_rss_mib())
    await fleet.stop()
    print(json.dumps(summary), file=out, flush=True)
    return summary


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    raise_fd_limit()
    with open(argv[0]) as f:
        config = json.load(f)
    profile_to = os.environ.get("FOTA_SIM_PROFILE")
    if profile_to:  # developer aid: a cProfile of the whole simulator run
        import cProfile
        cProfile.runctx("asyncio.run(main_async(config))", globals(), {"config": config}, profile_to)
    else:
        asyncio.run(main_async(config))


if __name__ == "__main__":
    main()
