"""The smallest MicroPython heap at which an emulated ESP32 completes firmware updates.

    ./run bench board_heap [--heaps 256,240,224,216,208,200,192] [--runs 2] [--image-kib 256]
                           [--no-delta] [--margin-kib 24] [--timeout 60]
                           [--out bench/results/board_heap.json]

For each heap of --heaps, --runs fresh emulated ESP32 boards (fota.testkit.boards.harness: every
power-on a real `micropython -X heapsize=HEAP` process running the board runner with the emulated
esp32, machine and network modules, the esp32 backend, against a real Mosquitto and control
center): the factory firmware 1.0.0 in ota_0, then a full firmware update of --image-kib KiB
into ota_1, and (unless --no-delta) a delta update on top of it, read from the running partition.
A run passes when every update confirms and the board never hit a MemoryError (a MemoryError
costs a reset and a resumed download; below the floor the board crash-loops or halts).

Reported per heap: runs passed, MemoryErrors seen, resets, outcomes. The floor: the smallest heap
of the list at and above which every run passed. The same run's baseline is the harness's
BOARD_HEAP (the heap the tests and `fota demo --board esp32` give a board): its ratio to the
floor, and the verdict (a target, not a failure) that BOARD_HEAP is at least the floor plus
--margin-kib. The run fails (exit 1) when a run at BOARD_HEAP (if listed) fails, or when no heap
of the list passed. The emulated board is the 64-bit unix port (larger objects than an ESP32's
32-bit port) carrying the emulations (~22 KiB that a board has built in): the numbers are for the
emulation, a bound for a board's shape, not its figure.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench._report import print_table, write_and_judge

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "board_heap.json"
HW = "esp32-devkit"


def _kib(heap: str) -> int:
    return int(heap.rstrip("Kk"))


def wait_job(fleet, board, job_id, timeout):
    """The job's state when terminal, or 'stuck:<state>' when the board halted or time ran out."""
    from fota.device import protocol as P
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = fleet.job(job_id)
        if job.state in P.TERMINAL_STATES or not board.running:
            break
        time.sleep(0.2)
    job = fleet.job(job_id)
    return job, (job.state if job.state in P.TERMINAL_STATES else f"stuck:{job.state}")


def one_run(fleet, tmp: Path, heap_kib: int, n: int, args) -> dict:
    """One board at `heap_kib`: a full update, then a delta."""
    from fota.device import protocol as P
    from fota.server.deployments import create_deployment
    from fota.server.fleet import provision_device
    from fota.server.releases import create_release
    from fota.testkit.boards.firmware import firmware_image
    from fota.testkit.boards.harness import EmulatedBoard, provision
    from fota.testkit.fleet import TEST_DEVICE_SETTINGS
    dev = f"heap{heap_kib}-{n}"
    _, password = provision_device(fleet.store, dev, HW)
    fleet.broker.add_user(dev, password)
    board = EmulatedBoard(tmp / "boards" / dev, heap=f"{heap_kib}K", max_restarts=8)
    provision(board, device_id=dev, hardware=HW, password=password, host=fleet.broker.host, port=fleet.broker.port,
              root_key=fleet.keyring.root_public(), trust=fleet.keyring.trust(), **TEST_DEVICE_SETTINGS)
    board.flash_factory_image(firmware_image("1.0.0"))
    outcomes = []
    started = time.monotonic()
    try:
        board.start()
        try:
            fleet.wait_online(dev, timeout=30)
            updates = [("full", f"1.1.{n}")] + ([] if args.no_delta else [("delta", f"1.2.{n}")])
        except Exception:  # noqa: BLE001 (TimedOut: the board never came online)
            outcomes.append("never online")
            updates = []
        for kind, version in updates:
            image = firmware_image(version, code_size=args.image_kib * 1024)
            rel = create_release(fleet.store, fleet.blobs, fleet.key, image, version, [HW], kind="image")
            job_id = create_deployment(fleet.store, rel, device_ids=[dev]).jobs[0].id
            job, state = wait_job(fleet, board, job_id, args.timeout)
            if kind == "delta" and state == P.CONFIRMED and job.delta_id is None:
                state = "confirmed, not as a delta"
            outcomes.append(f"{kind} {state}")
            if state != P.CONFIRMED:
                break
            fleet.wait_online(dev, version=version, timeout=30)
    finally:
        board.stop()
    log = board.log_text()
    # Each MemoryError that ended a boot ends its traceback with a line "MemoryError: ..."
    memory_errors = sum(1 for line in log.splitlines() if line.startswith("MemoryError"))
    confirmed = len(outcomes) == 1 + (not args.no_delta) and all(o.endswith(" confirmed") for o in outcomes)
    return {"heap_kib": heap_kib, "run": n, "outcomes": outcomes, "memory_errors": memory_errors,
            "exits": board.exits, "passed": confirmed and memory_errors == 0,
            "wall_s": round(time.monotonic() - started, 1)}


def summarize(runs: list[dict], heaps: list[int], board_heap_kib: int, margin_kib: int) -> dict:
    per_heap = {}
    for heap in heaps:
        mine = [r for r in runs if r["heap_kib"] == heap]
        per_heap[heap] = {"passed": sum(r["passed"] for r in mine), "runs": len(mine),
                          "memory_errors": sum(r["memory_errors"] for r in mine),
                          "resets": sum(len(r["exits"]) for r in mine)}
    floor = None
    for heap in sorted(heaps, reverse=True):  # every heap from the top down to the floor passed
        if per_heap[heap]["passed"] != per_heap[heap]["runs"]:
            break
        floor = heap
    summary = {"per_heap": per_heap, "floor_kib": floor, "board_heap_kib": board_heap_kib, "margin_kib": margin_kib}
    if floor is not None:
        summary["board_heap_to_floor"] = round(board_heap_kib / floor, 3)
        summary["verdict"] = "met" if board_heap_kib >= floor + margin_kib else "MISSED"
    return summary


def failures(result: dict) -> list[str]:
    s = result["summary"]
    out = []
    if s["floor_kib"] is None:
        out.append("no heap of the list passed every run")
    at_board = s["per_heap"].get(s["board_heap_kib"])
    if at_board and at_board["passed"] != at_board["runs"]:
        out.append(f"{at_board['runs'] - at_board['passed']} run(s) failed at BOARD_HEAP ({s['board_heap_kib']}K)")
    return out


def render(result: dict) -> None:
    s = result["summary"]
    rows = []
    for heap, h in s["per_heap"].items():
        outcomes = sorted({"; ".join(r["outcomes"]) for r in result["runs"] if r["heap_kib"] == heap})
        rows.append([f"{heap}K", f"{h['passed']}/{h['runs']}", h["memory_errors"], h["resets"], " | ".join(outcomes)])
    notes = [f"floor: {s['floor_kib']}K" if s["floor_kib"] else "floor: none of the heaps listed"]
    if s["floor_kib"]:
        notes.append(f"BOARD_HEAP {s['board_heap_kib']}K = x{s['board_heap_to_floor']} the floor; "
                     f"target: at least the floor + {s['margin_kib']} KiB: {s['verdict']}")
    print_table("emulated ESP32: firmware updates per heap", ["heap", "passed", "MemoryErrors", "resets", "note"],
                rows, notes)


def parse(argv):
    p = argparse.ArgumentParser(prog="./run bench board_heap", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--heaps", default="256,240,224,216,208,200,192", help="heaps to try, in KiB")
    p.add_argument("--runs", type=int, default=2, help="boards per heap")
    p.add_argument("--image-kib", type=int, default=256, help="firmware image size in KiB")
    p.add_argument("--no-delta", action="store_true", help="only the full update")
    p.add_argument("--margin-kib", type=int, default=24, help="BOARD_HEAP's margin above the floor (a verdict)")
    p.add_argument("--timeout", type=float, default=60, help="seconds allowed for each update")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    from fota.testkit.boards.harness import BOARD_HEAP
    from fota.testkit.fleet import Fleet
    heaps = sorted({int(h) for h in args.heaps.split(",")}, reverse=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="fota-board-heap-") as d:
        fleet = Fleet.standalone(Path(d))
        try:
            n = 0
            for heap in heaps:
                for _ in range(args.runs):
                    n += 1
                    runs.append(one_run(fleet, Path(d), heap, n, args))
                    print(json.dumps(runs[-1]), flush=True)
        finally:
            fleet.close()
    result = {"config": {"heaps": heaps, "runs": args.runs, "image_kib": args.image_kib, "delta": not args.no_delta},
              "runs": runs, "summary": summarize(runs, heaps, _kib(BOARD_HEAP), args.margin_kib)}
    return write_and_judge(result, args.out, render, failures)


if __name__ == "__main__":
    sys.exit(main())
