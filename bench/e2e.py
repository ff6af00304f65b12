"""End-to-end update benchmark: fota against a bare-MQTT floor, wire overhead, smallest heap.

    ./run bench e2e [--devices 1,5,20] [--image-kib 256] [--chunk 2048] [--window 8] [--heap 160K]
                    [--heap-start 144] [--heap-step 4] [--skip-heap] [--repeat 3]
                    [--timeout 90] [--interpreter 64|32-frozen] [--out bench/results/e2e.json]

Everything runs on 127.0.0.1: a fresh authenticated Mosquitto per measurement, the control
center in a thread, real MicroPython (unix port) devices running the agent as .mpy on the 64-bit
PyPI interpreter, or frozen into the 32-bit build as on a board (--interpreter 32-frozen).
See bench/README.md for what each number means.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from bench._report import print_table
from bench._wire_tally import WireTally
from fota.device import protocol as P
from fota.server.broker import SERVER_USER
from fota.server.deployments import create_deployment
from fota.testkit.broker import ManagedBroker
from fota.testkit.faultproxy import FaultProxy
from fota.testkit.fleet import Fleet, bundle_of_size
from fota.tools.waiting import TimedOut, wait_until
from fota.testkit.interpreters import INTERPRETERS, interpreter as resolve_interpreter
from fota.tools.mpy import SRC, agent_sources
from fota.tools.supervisor import DEFAULT_HEAP

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "e2e.json"

TARGET_OVERHEAD = 0.05      # wire bytes of the download connection <= image size + 5 %
TARGET_RATIO = 2.0          # fota wall <= 2x the bare-MQTT floor ...
TARGET_RATIO_AT = 20        # ... at N = 20 devices
# A full update within this MicroPython heap: 64 KiB on the 64-bit interpreter (the agent's .mpy
# in the heap), 32 KiB on the 32-bit one with the agent frozen in, as on a board (issue 14).
TARGET_HEAP_KIB = {"64": 64, "32-frozen": 32}

DONE_DOWNLOADING = ("rebooting", "trial", "confirmed")
# Not measured in the import footprint: the entry point, and the backend the bench does not use.
FOOTPRINT_SKIP = ("fota.device.main", "fota.device.slots.sim",
                  "fota.device.aio",  # an app's asyncio loop, not the agent's import (the 32-bit build has no asyncio)
                  "fota.device.slots.esp32")  # a board's backend: imports the esp32 module of its firmware


def wire_entries(root: Path) -> list[dict]:
    """The {"tx", "rx"} entries a device appended to wire.json at each reboot."""
    path = Path(root) / "wire.json"
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text())
    except ValueError:
        return []


def log(*args) -> None:
    print("[bench]", *args, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ fota

def _proc_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) of a running process, from /proc; 0 if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return 0.0


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _update(fleet: Fleet, ids: list[str], version: str, size: int, args, tally: WireTally | None = None) -> dict:
    """One deployment of a fresh `size`-byte release to every device; returns its measurements."""
    n = len(ids)
    image = bundle_of_size(version, size)
    rel = fleet.release(image, version)
    center = fleet.center.center
    published0, chunks0 = center.bytes_published, center.chunks
    wire0 = {d: len(wire_entries(fleet.devices[d].root)) for d in ids}
    broker_pid = fleet.broker.mosquitto.proc.pid
    cpu0 = (time.process_time(), _children_cpu(), _proc_cpu(broker_pid))

    t0 = time.monotonic()
    dep = create_deployment(fleet.store, rel, device_ids=ids)
    job_ids = [j.id for j in dep.jobs]
    first_seen: dict[int, dict[str, float]] = {j: {} for j in job_ids}
    deadline = t0 + args.timeout + 3 * n
    states = {}
    while time.monotonic() < deadline:
        states = fleet.job_states(job_ids)
        now = time.monotonic() - t0
        for j, (state, _, _) in states.items():
            first_seen[j].setdefault(state, now)
        if all(s in P.TERMINAL_STATES for s, _, _ in states.values()):
            break
        time.sleep(0.05)
    wall = time.monotonic() - t0
    # This process = the control center (plus this poller); reaped children = the device
    # processes that exited at the reboot after their download; the broker from /proc.
    cpu = {"center": time.process_time() - cpu0[0], "devices_download": _children_cpu() - cpu0[1],
           "broker": _proc_cpu(broker_pid) - cpu0[2]}
    device_of = {j.id: j.device_id for j in dep.jobs}
    confirmed = sum(1 for s, _, _ in states.values() if s == "confirmed")
    failures = {device_of[j]: f"{s} {c or ''} {r or ''}".strip() for j, (s, c, r) in states.items()
                if s != "confirmed"}

    def seen(j, wanted):
        times = [t for s, t in first_seen[j].items() if s in wanted]
        return min(times) if times else None
    started = [seen(j, ("downloading",) + DONE_DOWNLOADING) for j in job_ids]
    downloads = [seen(j, DONE_DOWNLOADING) for j in job_ids]

    per_device = []
    for device_id in ids:
        proc = fleet.devices[device_id]
        entries = wire_entries(proc.root)
        # The entry this update's reboot appended (one reboot per update; none after a crash).
        entry = entries[-1] if len(entries) > wire0[device_id] else None
        wire = entry["rx"] + entry["tx"] if entry else None
        per_device.append({
            "device": device_id, "reboots": proc.reboots, "starts": proc.starts,
            "wire_rx": entry and entry["rx"], "wire_tx": entry and entry["tx"],
            "overhead": None if wire is None else wire / len(image) - 1,
            "memory_error": "MemoryError" in proc.log_text(),
            "breakdown": tally.find(entry["tx"], entry["rx"]) if tally and entry else None,
        })
    overheads = [d["overhead"] for d in per_device if d["overhead"] is not None]
    published = center.bytes_published - published0
    return {
        "version": version, "image_bytes": len(image),
        "wall_s": round(wall, 3), "confirmed": confirmed, "failures": failures,
        "all_started_s": None if None in started else round(max(started), 3),
        "all_downloaded_s": None if None in downloads else round(max(downloads), 3),
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "center_bytes_published": published, "center_chunks": center.chunks - chunks0,
        "center_overhead": published / (n * len(image)) - 1,
        "overhead_mean": statistics.fmean(overheads) if overheads else None,
        "overhead_max": max(overheads) if overheads else None,
        "per_device": per_device,
    }


def _median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def run_fota(n: int, size: int, args, tmp: Path) -> dict:
    """N devices updated by one deployment, --repeat times (1.0.0 -> 1.1.0 -> 1.2.0 ...);
    wall time from the deployment's creation until every job is 'confirmed'. Medians."""
    fleet = Fleet.standalone(tmp / f"fota-{n}", chunk=args.chunk, window=args.window, heap=args.heap,
                             interpreter=args.interpreter)
    proxy = tally = None
    try:
        ids = [f"bench{n}-{i:03d}" for i in range(n)]
        if args.breakdown:  # the devices connect through a proxy that sorts their bytes by packet kind
            tally = WireTally()
            proxy = FaultProxy(fleet.broker.port).start_thread()
            proxy.tap = tally.tap
        t_start = time.monotonic()
        # each reboot appends its connection's bytes to wire.json
        fleet.add_devices(ids, wire_stats=True, port=proxy and proxy.port)
        fleet.wait_online(*ids, timeout=30 + 2 * n)
        online_s = time.monotonic() - t_start
        repeats = []
        for r in range(args.repeat):
            version = f"1.{r + 1}.0"
            run = _update(fleet, ids, version, size, args, tally)
            repeats.append(run)
            log(f"N={n}: update to {version}: {run['wall_s']:.2f}s, {run['confirmed']}/{n} confirmed")
            if run["confirmed"] != n:
                break
            fleet.wait_online(*ids, version=version, timeout=30 + n)
        overheads = [d["overhead"] for run in repeats for d in run["per_device"] if d["overhead"] is not None]
        return {
            "devices": n, "image_bytes": size, "online_s": round(online_s, 3), "repeats": len(repeats),
            "confirmed": min(run["confirmed"] for run in repeats),
            "wall_s": _median(run["wall_s"] for run in repeats),
            "all_started_s": _median(run["all_started_s"] for run in repeats),
            "all_downloaded_s": _median(run["all_downloaded_s"] for run in repeats),
            "cpu_s": {k: _median(run["cpu_s"][k] for run in repeats) for k in repeats[0]["cpu_s"]},
            "center_overhead": statistics.fmean(run["center_overhead"] for run in repeats),
            "overhead_mean": statistics.fmean(overheads) if overheads else None,
            "overhead_max": max(overheads) if overheads else None,
            "runs": repeats,
        }
    finally:
        fleet.close()
        if proxy:
            proxy.stop_thread()


# ----------------------------------------------------------------------------------------- floor

def _paho(client_id: str, user: str, password: str) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    c.username_pw_set(user, password)
    return c


def run_floor(n: int, image: bytes, args, tmp: Path) -> dict:
    """The same image to N subscribers by bare paho at QoS 0 through the same kind of Mosquitto."""
    broker = ManagedBroker(tmp / f"floor-{n}")
    ids = [f"floor{n}-{i:03d}" for i in range(n)]
    broker.add_users({d: os.urandom(9).hex() for d in ids})
    size = len(image)
    received = {d: 0 for d in ids}
    finished: dict[str, float] = {}
    all_done = threading.Event()
    subscribed = threading.Semaphore(0)
    lock = threading.Lock()
    clients: list[mqtt.Client] = []

    def make_sub(device_id):
        c = _paho(f"{device_id}-{os.getpid()}", device_id, broker.users[device_id])

        def on_message(client, userdata, msg):
            received[device_id] += len(msg.payload)
            if received[device_id] >= size and device_id not in finished:
                with lock:
                    finished[device_id] = time.monotonic()
                    if len(finished) == n:
                        all_done.set()

        def on_connect(client, userdata, flags, rc, props):
            client.subscribe(P.topic(device_id, P.DATA), qos=0)

        c.on_message = on_message
        c.on_connect = on_connect
        c.on_subscribe = lambda *a: subscribed.release()
        return c

    try:
        for d in ids:
            c = make_sub(d)
            c.connect(broker.host, broker.port, keepalive=30)
            c.loop_start()
            clients.append(c)
        for _ in ids:
            if not subscribed.acquire(timeout=30):
                raise TimedOut("floor subscribers did not subscribe")
        pub = _paho(f"floor-pub-{os.getpid()}", SERVER_USER, broker.users[SERVER_USER])
        connected = threading.Event()
        pub.on_connect = lambda *a: connected.set()
        pub.connect(broker.host, broker.service_port, keepalive=30)
        pub.loop_start()
        clients.append(pub)
        if not connected.wait(10):
            raise TimedOut("floor publisher did not connect")
        topics = [P.topic(d, P.DATA) for d in ids]
        chunks = [image[i:i + args.floor_chunk] for i in range(0, size, args.floor_chunk)]
        runs = []
        for _ in range(args.repeat):
            with lock:
                received.update((d, 0) for d in ids)
                finished.clear()
                all_done.clear()
            t0 = time.monotonic()
            for chunk in chunks:           # interleaved: every device's transfer runs at once
                for topic in topics:
                    pub.publish(topic, chunk, qos=0)
            t_published = time.monotonic() - t0
            complete = all_done.wait(args.timeout + 3 * n)
            with lock:
                wall = (max(finished.values()) if complete else time.monotonic()) - t0
            runs.append({"wall_s": round(wall, 3), "complete": complete, "publish_loop_s": round(t_published, 3),
                         "received_min": min(received.values())})
            if not complete:
                break
            time.sleep(0.2)
        return {"devices": n, "image_bytes": size, "repeats": len(runs), "chunks_per_device": len(chunks),
                "complete": all(r["complete"] for r in runs),
                "wall_s": _median(r["wall_s"] for r in runs if r["complete"]) or runs[-1]["wall_s"],
                "runs": runs}
    finally:
        for c in clients:
            try:
                c.disconnect()
                c.loop_stop()
            except Exception:
                pass
        broker.stop()


# ------------------------------------------------------------------------------------------ heap

def run_heap(image: bytes, args, tmp: Path) -> dict:
    """N=1 full updates at heap start, start-step, ... until one fails: --heap-repeat updates at each
    heap, a fresh device each time; a heap passes when all of them confirm (--tls: over TLS)."""
    fleet = Fleet.standalone(tmp / "heap", chunk=args.chunk, window=args.window, interpreter=args.interpreter,
                             tls=args.tls)
    attempts = []
    levels = []
    try:
        rel = fleet.release(image, "1.1.0")
        k = args.heap_start
        while k > 0:
            runs = [heap_attempt(fleet, rel, k, r, args) for r in range(args.heap_repeat)]
            attempts += runs
            ok = all(a["ok"] for a in runs)
            levels.append({"heap_kib": k, "ok": ok, "passed": sum(a["ok"] for a in runs), "runs": len(runs),
                           "wall_s": [a["wall_s"] for a in runs],
                           "why": next((a["why"] for a in runs if not a["ok"]), None)})
            if not ok:
                break
            k -= args.heap_step
    finally:
        fleet.close()
    passed = [lv["heap_kib"] for lv in levels if lv["ok"]]
    smallest = min(passed) if passed else None
    return {"attempts": attempts, "levels": levels, "smallest_ok_kib": smallest, "tls": args.tls,
            "first_failed_kib": next((lv["heap_kib"] for lv in levels if not lv["ok"]), None),
            "meets_target": smallest is not None and smallest <= TARGET_HEAP_KIB[args.interpreter]}


def heap_attempt(fleet, rel, k: int, run: int, args) -> dict:
    """One full update of a fresh device at -X heapsize=k KiB."""
    device_id = f"heap-{k}k-{run}"
    proc = fleet.add_devices([device_id], heap=f"{k}K")[0]
    result = {"heap_kib": k, "run": run + 1, "ok": False, "wall_s": None, "why": None}

    def memory_error():
        return "MemoryError" in proc.log_text()
    try:
        try:
            wait_until(lambda: memory_error() or fleet.online([device_id]), timeout=30,
                       interval=0.1, what="the device online")
        except TimedOut as e:
            result["why"] = str(e)
        if memory_error():
            result["why"] = "MemoryError before the update"
        if result["why"] is None:
            t0 = time.monotonic()
            job = create_deployment(fleet.store, rel, device_ids=[device_id]).jobs[0].id

            def finished():
                if memory_error():
                    return ("MemoryError", None, None)
                st = fleet.job_states([job])[job]
                return st if st[0] in P.TERMINAL_STATES else None
            try:
                state, code, reason = wait_until(finished, timeout=args.timeout, interval=0.1,
                                                 what="the job to finish")
                if state == "confirmed" and not memory_error():
                    result.update(ok=True, wall_s=round(time.monotonic() - t0, 3))
                elif state == "MemoryError":
                    result["why"] = "MemoryError during the update"
                else:
                    result["why"] = f"job {state} {code or ''} {reason or ''}".strip()
            except TimedOut as e:
                result["why"] = str(e)
        if not result["ok"]:
            result["log_tail"] = proc.log_text().strip().splitlines()[-12:]
    finally:
        proc.stop()
    log(f"heap {k} KiB run {run + 1}: {'ok' if result['ok'] else 'FAILED: ' + str(result['why'])}")
    return result


def agent_modules() -> list[str]:
    """The agent's modules, each after the agent modules it imports (leaves first), so that
    importing them in this order charges every module its own cost only."""
    deps: dict[str, set[str]] = {}
    for path in agent_sources():
        rel = path.relative_to(SRC).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        text = path.read_text()
        found = set()
        for base, names in re.findall(r"^\s*from (fota\.device(?:\.[\w.]+)?) import ([\w, ]+)", text, re.M):
            found.add(base)
            found.update(f"{base}.{n.split(' as ')[0].strip()}" for n in names.split(","))
        found.update(re.findall(r"^\s*import (fota\.device\.[\w.]+)", text, re.M))
        deps[name] = found
    order: list[str] = []

    def visit(name, stack=()):
        if name in order or name not in deps or name in stack:
            return
        for dep in sorted(deps[name]):
            visit(dep, stack + (name,))
        order.append(name)
    for name in sorted(deps):
        visit(name)
    return [m for m in order if m.startswith("fota.device.") and m not in FOOTPRINT_SKIP]


def import_footprint(heap_kib: int, interpreter: str) -> dict:
    """gc.mem_alloc() after importing each agent module (.mpy, or frozen) in turn, and mem_free at the end."""
    script = "\n".join([
        "import gc",
        "gc.collect()",
        "print('base', gc.mem_alloc(), gc.mem_free())",
        f"for m in {agent_modules()!r}:",
        "    __import__(m)",
        "    gc.collect()",
        "    print(m, gc.mem_alloc(), gc.mem_free())",
    ])
    mp = resolve_interpreter(interpreter)
    out = subprocess.run(mp.argv(f"{heap_kib}K", "-c", script), capture_output=True, text=True, timeout=60,
                         env=mp.env())
    rows, prev = [], None
    lines = out.stdout.splitlines()
    measured = [line for line in lines if len(line.split()) == 3 and line.split()[1].isdigit()]
    for line in measured:
        name, alloc, free = line.split()
        alloc, free = int(alloc), int(free)
        if prev is not None:
            rows.append({"module": name, "bytes": alloc - prev, "alloc_after": alloc, "free_after": free})
        else:
            rows.append({"module": "(interpreter)", "bytes": alloc, "alloc_after": alloc, "free_after": free})
        prev = alloc
    return {"heap_kib": heap_kib, "modules": rows, "total_bytes": prev,
            # MicroPython prints an uncaught exception's traceback to stdout
            "error": ("\n".join(line for line in lines if line not in measured) + out.stderr).strip()[-500:] or None}


# ---------------------------------------------------------------------------------------- output

def pct(x) -> str:
    return "-" if x is None else f"{x * 100:.2f}%"


def render(results: dict) -> None:
    table = print_table

    cfg = results["config"]
    rows = []
    for run in results["runs"]:
        f, fl = run["fota"], run["floor"]
        n = f["devices"]
        ratio = run["ratio"]
        ok_ratio = "" if n != TARGET_RATIO_AT else (" ok" if ratio is not None and ratio <= TARGET_RATIO else " MISSED")
        ok_over = f["overhead_max"] is not None and f["overhead_max"] <= TARGET_OVERHEAD
        rows.append([
            n, f"{f['confirmed']}/{n}", f"{f['wall_s']:.2f}",
            "-" if f["all_started_s"] is None else f"{f['all_started_s']:.2f}",
            "-" if f["all_downloaded_s"] is None else f"{f['all_downloaded_s']:.2f}",
            f"{fl['wall_s']:.2f}" + ("" if fl["complete"] else " (incomplete)"),
            "-" if ratio is None else f"{ratio:.1f}x" + ok_ratio,
            pct(f["overhead_mean"]), pct(f["overhead_max"]) + (" ok" if ok_over else " MISSED"),
            pct(f["center_overhead"]),
            "{center:.1f}/{devices_download:.1f}/{broker:.1f}".format(**f["cpu_s"]),
        ])
    table(f"fota vs bare MQTT floor: {cfg['image_bytes']} B image, chunk at most {cfg['chunk']} (floor {cfg.get('floor_chunk', cfg['chunk'])}), window {cfg['window']}, "
          f"device heap {cfg['heap']}; times are medians of {cfg['repeat']} updates / transfers",
          ["N", "confirmed", "fota wall s", "started s", "downloaded s", "floor wall s", "ratio",
           "overhead mean", "overhead max", "center sent +%", "CPU s ctr/dev/mqtt"], rows,
          [f"targets: overhead (device wire rx+tx / image - 1) <= {TARGET_OVERHEAD:.0%};"
           f" fota wall <= {TARGET_RATIO:g}x floor wall at N={TARGET_RATIO_AT}",
           "confirmed: devices confirmed in every update; overhead: over all devices and updates;"
           " started s / downloaded s: until every job was seen (DB poll) downloading / rebooting or later;"
           " center sent +%: chunk payloads the center published (headers included) / (N x image) - 1",
           f"CPU s during the update: control center process / device processes up to their reboot /"
           f" Mosquitto; {os.cpu_count()} CPUs"])

    for run in results["runs"]:
        for r, upd in enumerate(run["fota"]["runs"]):
            for d in upd["per_device"]:
                if d.get("breakdown"):
                    render_breakdown(d, upd["image_bytes"], f"N={run['fota']['devices']} update {r + 1}")

    heap = results.get("heap")
    if heap:
        rows = [[lv["heap_kib"], f"{'ok' if lv['ok'] else 'FAILED'} {lv['passed']}/{lv['runs']}",
                 " ".join("-" if w is None else f"{w:.2f}" for w in lv["wall_s"]),
                 "" if lv["ok"] else (lv["why"] or "")[:90]] for lv in heap["levels"]]
        smallest = heap["smallest_ok_kib"]
        verdict = (f"smallest heap with a full update: {smallest} KiB" if smallest else "no heap tried passed")
        target = TARGET_HEAP_KIB[cfg.get("interpreter", "64")]
        verdict += f"; target <= {target} KiB: {'met' if heap['meets_target'] else 'MISSED'}"
        over = " over TLS" if heap.get("tls") else ""
        table(f"Smallest heap ({cfg.get('interpreter', '64')}{over}, N=1, {cfg['image_bytes']} B image, "
              f"{cfg.get('heap_repeat', 1)} updates per heap, heap -{cfg['heap_step_kib']} KiB until a failure)",
              ["heap KiB", "confirmed", "update s (each run)", "note"], rows, [verdict])
    fp = results.get("footprint")
    if fp:
        rows = [[m["module"], m["bytes"], m["alloc_after"], m["free_after"]] for m in fp["modules"]]
        table(f"Agent import footprint ({cfg.get('interpreter', '64')}, -X heapsize={fp['heap_kib']}K, after gc.collect())",
              ["module", "bytes", "heap used after", "heap free after"], rows,
              [f"all imported: {fp['total_bytes']} B in use = {fp['total_bytes'] / 1024:.1f} KiB"
               + (f"; error: {fp['error']}" if fp["error"] else "")])


def render_breakdown(d: dict, image: int, label: str) -> None:
    b = d["breakdown"]
    rows = []
    for direction in ("tx", "rx"):
        for kind, (packets, n) in sorted(b[direction].items(), key=lambda kv: -kv[1][1]):
            share = f"image {n - image:+d} B" if kind == "data" else pct(n / image)
            rows.append([direction, kind, packets, n, share])
    wire = d["wire_rx"] + d["wire_tx"]
    print_table(f"Wire breakdown, {label}, {d['device']}: {image} B image, {wire} B on the wire "
                f"(overhead {pct(d['overhead'])})", ["dir", "kind", "packets", "bytes", "% of image"], rows,
                [f"tx: device -> broker, rx: broker -> device (forwarded {b['rx_forwarded']} B, "
                 f"the device read {b['rx_read']} B before it closed); data: chunk bytes only, vs the image"])


# ------------------------------------------------------------------------------------------ main

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="./run bench e2e", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--devices", default="1,5,20", help="comma-separated fleet sizes N")
    p.add_argument("--image-kib", type=int, default=256, help="release (bundle) size in KiB")
    p.add_argument("--chunk", type=int, default=P.MAX_CHUNK_SIZE,
                   help="largest chunk the control center sends (each device asks for a size its heap "
                        "allows, inventory `chunk`)")
    p.add_argument("--floor-chunk", type=int, default=P.DEFAULT_CHUNK_SIZE,
                   help="the bare-MQTT floor's piece size (as before devices chose their chunk size)")
    p.add_argument("--window", type=int, default=8, help="chunks a device has in flight")
    p.add_argument("--heap", default=DEFAULT_HEAP, help="device heap for the fleet runs")
    p.add_argument("--heap-start", type=int, default=None,
                   help="first heap tried by the heap search, KiB (one that passes: the search goes down from it); "
                        "default 144 on the 64-bit interpreter, 80 on 32-frozen")
    p.add_argument("--heap-step", type=int, default=4, help="heap search step, KiB")
    p.add_argument("--heap-repeat", type=int, default=3,
                   help="full updates (fresh devices) per heap in the heap search; a heap passes when all confirm")
    p.add_argument("--tls", action="store_true",
                   help="the heap search's broker speaks only TLS (devices pin its CA); the fleet runs stay plain")
    p.add_argument("--skip-heap", action="store_true", help="skip the heap search and the import footprint")
    p.add_argument("--repeat", type=int, default=3,
                   help="updates (and floor transfers) per N; the table shows medians")
    p.add_argument("--timeout", type=float, default=90, help="seconds allowed per update (+3 s per device)")
    p.add_argument("--interpreter", choices=INTERPRETERS, default="64",
                   help="the devices' MicroPython: 64 (PyPI, agent as .mpy) or 32-frozen (32-bit, agent frozen in)")
    p.add_argument("--breakdown", action="store_true",
                   help="fleet runs through a proxy that counts each update connection's bytes by MQTT packet "
                        "kind and direction (a table per update)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = p.parse_args(argv)
    try:
        args.devices = [int(x) for x in args.devices.split(",") if x.strip()]
    except ValueError:
        p.error("--devices must be comma-separated integers")
    if not args.devices or min(args.devices) < 1:
        p.error("--devices needs fleet sizes >= 1")
    if not 64 <= min(args.chunk, args.floor_chunk) <= max(args.chunk, args.floor_chunk) <= P.MAX_CHUNK_SIZE:
        p.error(f"--chunk and --floor-chunk must be 64..{P.MAX_CHUNK_SIZE}")
    if not 1 <= args.window <= P.MAX_WINDOW:
        p.error(f"--window must be 1..{P.MAX_WINDOW}")
    if args.heap_start is None:
        args.heap_start = 144 if args.interpreter == "64" else 80
    if min(args.image_kib, args.heap_start, args.heap_step, args.repeat, args.heap_repeat) < 1:
        p.error("--image-kib, --heap-start, --heap-step, --repeat and --heap-repeat must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # gmqtt warns about acknowledgements that reach the center's closed socket at teardown.
    logging.getLogger("gmqtt").setLevel(logging.ERROR)
    t_begin = time.monotonic()
    mp = resolve_interpreter(args.interpreter, log=log)  # compile or build once, outside every measurement
    image = bundle_of_size("1.1.0", args.image_kib * 1024)
    mpy_version = subprocess.run([mp.executable, "-c", "import sys; print(sys.version)"],
                                 capture_output=True, text=True).stdout.strip()
    results = {
        "config": {"devices": args.devices, "image_bytes": len(image), "chunk": args.chunk, "floor_chunk": args.floor_chunk, "window": args.window,
                   "heap": args.heap, "repeat": args.repeat, "interpreter": args.interpreter, "heap_start_kib": args.heap_start, "heap_step_kib": args.heap_step,
                   "heap_repeat": args.heap_repeat, "tls": args.tls},
        "targets": {"overhead_max": TARGET_OVERHEAD, "ratio_max": TARGET_RATIO, "ratio_at_devices": TARGET_RATIO_AT,
                    "heap_kib_max": TARGET_HEAP_KIB[args.interpreter]},
        "environment": {"python": platform.python_version(), "micropython": mpy_version,
                        "cpus": os.cpu_count(), "platform": platform.platform()},
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="fota-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for n in args.devices:
            log(f"N={n}: fota update of {len(image)} B ...")
            fota = run_fota(n, len(image), args, tmp)
            log(f"N={n}: fota {fota['wall_s']:.2f}s, {fota['confirmed']}/{n} confirmed; floor ...")
            floor = run_floor(n, image, args, tmp)
            log(f"N={n}: floor {floor['wall_s']:.2f}s")
            ratio = fota["wall_s"] / floor["wall_s"] if floor["complete"] and fota["confirmed"] == n else None
            results["runs"].append({"fota": fota, "floor": floor, "ratio": ratio})
        if not args.skip_heap:
            results["heap"] = run_heap(image, args, tmp)
            probe = results["heap"]["first_failed_kib"] or results["heap"]["smallest_ok_kib"] or args.heap_start
            results["footprint"] = import_footprint(max(probe, 64), args.interpreter)
    results["elapsed_s"] = round(time.monotonic() - t_begin, 1)
    results["failures"] = failures(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    render(results)
    print(f"\nJSON: {args.out}   ({results['elapsed_s']:.0f} s)")
    for problem in results["failures"]:
        print("FAILED:", problem)
    return 1 if results["failures"] else 0


def failures(results: dict) -> list[str]:
    """Why the run failed (empty: it did; the targets are verdicts, not failures): an update not
    confirmed on every device, a floor transfer that did not complete, no heap passing at all."""
    out = []
    for run in results["runs"]:
        n = run["fota"]["devices"]
        if run["fota"]["confirmed"] != n:
            out.append(f"N={n}: {run['fota']['confirmed']}/{n} jobs confirmed")
        if not run["floor"]["complete"]:
            out.append(f"N={n}: the floor transfer did not complete")
    heap = results.get("heap")
    if heap and heap["smallest_ok_kib"] is None:
        out.append("heap search: no heap passed a full update")
    return out


if __name__ == "__main__":
    sys.exit(main())
