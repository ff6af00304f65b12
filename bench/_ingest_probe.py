"""Who was busy during an ingestion run: the wall time of a status ingestion window split into the
CPU of each party (the publisher, the control center's threads, the broker, the PostgreSQL
backends of the run's database), the center's threads' time waiting for a CPU (run queue), the
machine's CPU in all, and the center's database writes (batches, seconds inside their
transactions).

    probe = IngestProbe(center, store, broker)   # a snapshot now
    ... publish, wait until stored ...
    split = probe.stop()                         # seconds of each, over the window

Linux only (/proc). Thread CPU and run-queue wait come from /proc/self/task/<tid>/schedstat
(nanoseconds), named after the Python thread that runs there ("center": the event loop,
"fota-db_0": ingestion and job bookkeeping, "fota-campaigns_0": campaign steps and retention on
PostgreSQL). The PostgreSQL backends are those pg_stat_activity shows on the run's database (the
center's pooled connections), read in /proc: the server must run on this machine.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from sqlalchemy import text

from bench._report import print_table

TICK = os.sysconf("SC_CLK_TCK")


def thread_times() -> dict[int, tuple[str, float, float]]:
    """{thread id: (Python thread name or 'tid N', CPU s, run-queue wait s)} of this process's
    threads but the main one (the benchmark's own)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    main = threading.main_thread().native_id
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            tid = int(task.name)
            cpu_ns, wait_ns, _ = (int(x) for x in (task / "schedstat").read_text().split())
        except (OSError, ValueError):
            continue
        if tid != main:
            out[tid] = (names.get(tid, f"tid {tid}"), cpu_ns / 1e9, wait_ns / 1e9)
    return out


def machine_cpu() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine so far (/proc/stat, every core)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    total = sum(fields[:8])       # guest time is already in user
    return (total - idle) / TICK, total / TICK


def process_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) of a process, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return None


def processes_cpu() -> dict[int, tuple[str, float]]:
    """{pid: (command name, CPU s)} of every process of the machine that /proc shows."""
    out = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                head, tail = (proc / "stat").read_text().rsplit(")", 1)
                fields = tail.split()
                out[int(proc.name)] = (head.split("(", 1)[1], (int(fields[11]) + int(fields[12])) / TICK)
            except (OSError, IndexError, ValueError):
                continue
    return out


def pg_backends(store) -> list[int]:
    """Process ids of the PostgreSQL backends connected to the store's database ([] on SQLite);
    the one asked through is in it: it goes back to the pool the center draws from."""
    if store.engine.dialect.name != "postgresql":
        return []
    with store.engine.connect() as conn:
        return [pid for (pid,) in conn.execute(text(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"))]


def _group(name: str) -> str:
    """A thread's part: the event loop, the database thread, the long-pass thread, or other."""
    if name == "center":
        return "loop"
    if name.startswith("fota-db"):
        return "db"
    if name.startswith("fota-campaigns"):
        return "campaigns"
    return "other"


class IngestProbe:
    """A snapshot of everyone's CPU at start; stop() returns what each used since (see the module)."""

    def __init__(self, center, store, broker):
        self.center, self.store, self.broker = center, store, broker
        self.pids = pg_backends(store)
        self.t0 = time.monotonic()
        self.threads0 = thread_times()
        self.machine0 = machine_cpu()
        self.broker0 = broker.cpu_s()
        self.pg0 = {pid: process_cpu(pid) for pid in self.pids}
        self.intake0 = self._intake()
        self.procs0 = processes_cpu()

    def _intake(self) -> tuple[int, float, float]:
        i = self.center.intake
        return i.batches, i.batch_write_s, i.batch_wait_s

    def stop(self) -> dict:
        wall = time.monotonic() - self.t0
        threads = thread_times()
        busy, total = machine_cpu()
        parts = {"loop": [0.0, 0.0], "db": [0.0, 0.0], "campaigns": [0.0, 0.0], "other": [0.0, 0.0]}
        for tid, (name, cpu, wait) in threads.items():
            _, cpu0, wait0 = self.threads0.get(tid, (name, 0.0, 0.0))
            part = parts[_group(name)]
            part[0] += cpu - cpu0
            part[1] += wait - wait0
        pg = [(process_cpu(pid), before) for pid, before in self.pg0.items()]
        batches, write_s, wait_s = (a - b for a, b in zip(self._intake(), self.intake0))
        # every process's CPU over the window, by command name: who else was busy (this process,
        # the broker and PostgreSQL are in it too; a process started meanwhile counts from 0)
        by_name: dict[str, float] = {}
        for pid, (name, cpu) in processes_cpu().items():
            key = "this process" if pid == os.getpid() else name
            by_name[key] = by_name.get(key, 0.0) + cpu - self.procs0.get(pid, (name, 0.0))[1]
        top = dict(sorted(((k, v) for k, v in by_name.items() if v > 0), key=lambda kv: -kv[1])[:6])
        return {
            "wall_s": wall,
            "center_threads": {k: {"cpu_s": v[0], "runqueue_s": v[1]} for k, v in parts.items()},
            "broker_cpu_s": self.broker.cpu_s() - self.broker0,
            "postgres_cpu_s": sum(a - b for a, b in pg if a is not None and b is not None) if self.pids else None,
            "postgres_backends": len(self.pids),
            "machine_busy_s": busy - self.machine0[0], "machine_cpu_s": total - self.machine0[1],
            "processes_cpu_s": top,
            "batches": batches, "batch_write_s": write_s, "batch_wait_s": wait_s,
        }


def split_rows(ingest: dict) -> list[list[str]]:
    """Table rows (who, seconds, share of the wall, what) of an ingestion result holding
    "statuses", "publisher" (fleet.Published.summary) and "split" (IngestProbe.stop)."""
    sp, pub, n = ingest.get("split") or {}, ingest.get("publisher") or {}, ingest["statuses"]
    wall = sp.get("wall_s") or ingest.get("wall_s") or 0.0

    def row(who, seconds, what=""):
        share = f"{100 * seconds / wall:.0f} %" if seconds is not None and wall else "-"
        return [who, "-" if seconds is None else f"{seconds:.2f}", share, what]

    drained = ingest.get("start_s") is not None  # fleet._drain_statuses: published before the wall
    rows = [row("wall: " + ("a new center's start until all stored" if drained else "first publish until all stored"),
                ingest.get("wall_s"), f"{n / ingest['wall_s']:,.0f} stored/s")]
    if drained:
        rows.append(row("  of which its start() (the backlog flows from its connection on)", ingest["start_s"]))
        if pub:
            rows.append(["publisher, before the wall, alone: the broker's last PUBACK", f"{pub['acked_s']:.2f}", "-",
                         f"offered {pub['offered_rate']:,.0f}/s, CPU {pub['cpu_s']:.2f} s"])
    elif pub:
        rows += [row("publisher: every message handed to paho", pub["handed_s"]),
                 row("publisher: the broker's last PUBACK", pub["acked_s"],
                     f"offered {pub['offered_rate']:,.0f}/s" if pub.get("offered_rate") else ""),
                 row("publisher CPU (handing + paho's thread)", pub["cpu_s"],
                     f"paho's thread waited {pub['runqueue_s']:.2f} s for a CPU")]
    threads = sp.get("center_threads") or {}
    labels = {"loop": "center event loop CPU", "db": "center database thread CPU",
              "campaigns": "center long-pass thread CPU", "other": "other threads of the process CPU"}
    for key, label in labels.items():
        t = threads.get(key)
        if t and (t["cpu_s"] or t["runqueue_s"]):
            rows.append(row(label, t["cpu_s"], f"waited {t['runqueue_s']:.2f} s for a CPU"))
    if sp.get("batches"):
        rows.append(row("center: inside batch transactions", sp["batch_write_s"],
                        f"{sp['batches']} batches, {n / sp['batches']:.0f} statuses and "
                        f"{1000 * sp['batch_write_s'] / sp['batches']:.1f} ms each"))
        rows.append(row("center: batches waiting for the database thread", sp["batch_wait_s"]))
    if sp:
        rows.append(row("broker CPU", sp["broker_cpu_s"]))
        if sp.get("postgres_cpu_s") is not None:
            rows.append(row("PostgreSQL backends CPU", sp["postgres_cpu_s"], f"{sp['postgres_backends']} backends"))
        rows.append(row("machine CPU busy (all processes, all cores)", sp["machine_busy_s"],
                        f"of {sp['machine_cpu_s']:.2f} s available"))
        for name, cpu in (sp.get("processes_cpu_s") or {}).items():
            rows.append(row(f"  CPU of {name}", cpu))
    return rows


def print_split(what: str, ingest: dict) -> None:
    """split_rows as a table: who was busy over an ingestion run's wall (``what``: which run)."""
    print_table(f"{what}: who was busy over the wall (shares of one core)", ["who", "s", "of wall", "what"],
                split_rows(ingest), left=("who", "what"))
