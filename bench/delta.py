"""Delta patches: size against reference delta tools, encoder time, smallest MicroPython heap.

    ./run bench delta [--corpus DIR ...] [--formats 1,2] [--windows 10,12,15] [--copy-run 32]
                      [--chunk 2048] [--target-wbits 12] [--skip-refs] [--skip-heap] [--skip-agent]
                      [--interpreter 64|32-frozen] [--out bench/results/delta.json]

For every consecutive pair of images in each corpus (sorted by name; by default the esp8266 and
the thumb corpus): the fota patch in each format at each window, and the same pair with bsdiff4
(BSDIFF40), detools (sequential; heatshrink and lzma),
xdelta3 and zstd --patch-from; the smallest `micropython -X heapsize` at which the device decoder
applies the patch (bisection); and, with a real agent, the smallest heap for a whole delta update.
The heap searches run on --interpreter: the 64-bit PyPI MicroPython with the agent as .mpy, or
the 32-bit build with the agent frozen in, as on a board (fota.testkit.interpreters).
See bench/README.md for what each number means.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._report import print_table
from fota.device.delta import FORMATS
from fota.server.delta import DEFAULT_COPY_RUN, encode
from fota.testkit.corpus import corpus_dir
from fota.testkit.deltarun import SCRIPT, apply_with_micropython, path_line
from fota.testkit.interpreters import INTERPRETERS, Interpreter, interpreter as resolve_interpreter

ROOT = Path(__file__).resolve().parent.parent
# $FOTA_CORPUS/{esp8266,thumb}, or shared/corpus/... beside the checkout (fota.testkit.corpus)
DEFAULT_CORPORA = [(corpus_dir(ROOT) or ROOT.parent / "shared" / "corpus") / name for name in ("esp8266", "thumb")]
DEFAULT_OUT = ROOT / "bench" / "results" / "delta.json"
TARGET_RATIO = 1.0       # the newest format's patch at the target window <= the smallest reference
TARGET_HEAP_KIB = 24     # decoder (code + state) within 24 KiB of MicroPython heap

# The same script without applying anything: what importing the decoder and opening the files
# costs (the interpreter and the decoder's bytecode, which a board keeps in flash when frozen).
BASELINE = SCRIPT.split("p = D.Patcher")[0] + "print('OK')\n"
# ... and without even importing the decoder: the interpreter alone.
INTERPRETER = SCRIPT.split("from fota.device")[0] + "print('OK')\n"


def log(*args) -> None:
    print("[bench]", *args, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ reference tools

def _timed(fn):
    t = time.perf_counter()
    size = fn()
    return {"bytes": size, "encode_s": round(time.perf_counter() - t, 3)}


REFERENCE_TOOLS = ("bsdiff4", "detools", "xdelta3", "zstd")


def references(old: Path, new: Path, tmp: Path, tools=REFERENCE_TOOLS) -> dict[str, dict]:
    """name -> {"bytes", "encode_s"} or {"skipped": why}, for the requested `tools`."""
    out: dict[str, dict] = {}
    a, b = old.read_bytes(), new.read_bytes()
    if "bsdiff4" in tools:
        try:
            import bsdiff4
            out["bsdiff4 (BSDIFF40)"] = _timed(lambda: len(bsdiff4.diff(a, b)))
        except ImportError:
            out["bsdiff4 (BSDIFF40)"] = {"skipped": "pip install bsdiff4"}
    if "detools" in tools:
        try:
            import detools
            for comp in ("heatshrink", "lzma"):
                def run(comp=comp):
                    f = io.BytesIO()
                    detools.create_patch(io.BytesIO(a), io.BytesIO(b), f, compression=comp,
                                         patch_type="sequential")
                    return len(f.getvalue())
                out[f"detools sequential {comp}"] = _timed(run)
        except ImportError:
            for comp in ("heatshrink", "lzma"):
                out[f"detools sequential {comp}"] = {"skipped": "pip install detools"}
    if "xdelta3" in tools:
        if shutil.which("xdelta3"):
            def xd():
                subprocess.run(["xdelta3", "-e", "-9", "-f", "-s", str(old), str(new), str(tmp / "x.vcdiff")],
                               check=True, capture_output=True)
                return (tmp / "x.vcdiff").stat().st_size
            out["xdelta3 -9"] = _timed(xd)
        else:
            out["xdelta3 -9"] = {"skipped": "xdelta3 not installed (apt-get install xdelta3)"}
    if "zstd" in tools:
        if shutil.which("zstd"):
            def zs():
                subprocess.run(["zstd", "-q", "-19", "-f", "--single-thread", "--patch-from", str(old), str(new),
                                "-o", str(tmp / "z.zst")], check=True, capture_output=True)
                return (tmp / "z.zst").stat().st_size
            out["zstd -19 --patch-from"] = _timed(zs)
        else:
            out["zstd -19 --patch-from"] = {"skipped": "zstd not installed (apt-get install zstd)"}
    return out


# ------------------------------------------------------------------------------ heap

def _runs(script: str, heap_kib: int, mp: Interpreter) -> bool:
    proc = subprocess.run(mp.argv(f"{heap_kib}K", "-c", script), capture_output=True, text=True, timeout=300,
                          env=mp.env())
    return proc.returncode == 0 and "OK" in proc.stdout


def bisect(ok, lo: int = 4, hi: int = 256) -> int | None:
    """Smallest KiB in (lo, hi] for which ok(k) holds, assuming monotonic; None if not even hi."""
    if not ok(hi):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def decoder_heap(old: Path, patch: Path, tmp: Path, chunk: int, mp: Interpreter) -> dict:
    out = tmp / "out.bin"
    fields = dict(path=path_line(None), old=str(old), out=str(out), patch=str(patch),
                  size=patch.stat().st_size, chunk=chunk, max_wbits=15)
    full = bisect(lambda k: _runs(SCRIPT.format(**fields), k, mp))
    base = bisect(lambda k: _runs(BASELINE.format(**fields), k, mp))
    interp = bisect(lambda k: _runs(INTERPRETER.format(**fields), k, mp), 1)
    t = time.perf_counter()
    proc = apply_with_micropython(old, patch, out, heap="256K", chunk=chunk, interpreter=mp.name)
    secs = time.perf_counter() - t
    return {"smallest_heap_kib": full, "baseline_heap_kib": base, "interpreter_heap_kib": interp,
            # state: buffers, inflate window, the chunk being fed; with_code: plus the decoder's
            # bytecode, which the unix port loads into the heap (frozen on a board: in flash)
            "decoder_kib": None if full is None or base is None else full - base,
            "decoder_with_code_kib": None if full is None or interp is None else full - interp,
            "apply_s_256k": round(secs, 3), "applied_ok": proc.returncode == 0}


# ------------------------------------------------------------------------------ agent

def agent_heap(tmp: Path, wbits: int, interpreter: str = "64", lo: int | None = None, hi: int = 160,
               fmt: int = 2, heaps: list[int] | None = None, repeat: int = 1) -> dict:
    """Smallest heap at which the whole agent applies a bundle delta through Mosquitto: a fresh
    device per try gets 1.1.0 in full, then 1.2.0 (one file changed) as a delta in format `fmt`
    (the only one the device declares). lo: 64 KiB on the 64-bit interpreter (the agent's .mpy in
    the heap), 16 KiB on the frozen one. heaps: instead of bisecting, try each of these heaps
    `repeat` times (largest first); the smallest heap is then the smallest of a run of heaps
    from the largest down where every try passed."""
    if lo is None:
        lo = 64 if interpreter == "64" else 16
    from fota.testkit.fleet import Fleet, bundle_of_size
    from fota.tools.waiting import TimedOut
    from fota.server.deployments import create_deployment
    from fota.tools.bundle import unpack, pack_files

    fleet = Fleet.standalone(tmp / "agent", chunk=2048, window=8, interpreter=interpreter)
    fleet.center.center.delta_wbits = wbits
    attempts = []
    try:
        v1 = bundle_of_size("1.1.0", 64 * 1024)
        files = unpack(v1)
        files["app.py"] = files["app.py"].replace(b"1.1.0", b"1.2.0")
        v2 = pack_files(files)
        rel1, rel2 = fleet.release(v1, "1.1.0"), fleet.release(v2, "1.2.0")

        def update(dev, rel, version):
            dep = create_deployment(fleet.store, rel, device_ids=[dev])
            try:
                j = fleet.wait_job(dep.jobs[0].id, timeout=60)
            except TimedOut:
                return "timeout", None, None
            return j.state, (j.code, j.reason) if j.code else None, j.delta_id

        def ok(k):
            dev = f"agent-{k}k-{len(attempts)}"
            fleet.add_devices([dev], heap=f"{k}K", delta_formats=[fmt])
            result = {"heap_kib": k, "ok": False}
            try:
                fleet.wait_online(dev, timeout=30)
                state, code, _ = update(dev, rel1, "1.1.0")
                result["full"] = [state, code]
                if state == "confirmed":
                    fleet.wait_online(dev, timeout=30, version="1.1.0")
                    state, code, delta_id = update(dev, rel2, "1.2.0")
                    result["delta"] = [state, code, delta_id is not None]
                    result["ok"] = state == "confirmed" and delta_id is not None
            except TimedOut as e:
                result["why"] = str(e)
            finally:
                fleet.devices[dev].stop()
            attempts.append(result)
            log(f"agent heap {k} KiB: {'ok' if result['ok'] else 'failed'} {result}")
            return result["ok"]

        if heaps:
            smallest = None
            for k in sorted(heaps, reverse=True):
                passed = sum(ok(k) for _ in range(repeat))
                if passed < repeat:
                    break
                smallest = k
        else:
            smallest = bisect(ok, lo, hi)
    finally:
        fleet.close()
    return {"smallest_heap_kib": smallest, "attempts": attempts, "bundle_bytes": len(v1), "format": fmt,
            "repeat": repeat if heaps else 1}


# ------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="./run bench delta", description=__doc__.split("\n")[0])
    p.add_argument("--corpus", type=Path, nargs="+", default=DEFAULT_CORPORA,
                   help="directories of images (*.bin), each in version order by name (default: esp8266 and thumb)")
    p.add_argument("--formats", default="1,2", help="patch formats to measure (docs/delta.md); the last is the one checked against the target")
    p.add_argument("--windows", default="10,12,15", help="fota patch windows, as wbits (2**N bytes)")
    p.add_argument("--target-wbits", type=int, default=12, help="window the targets are checked at")
    p.add_argument("--copy-run", type=int, default=DEFAULT_COPY_RUN, help="zero diff bytes in a row that become a copy")
    p.add_argument("--chunk", type=int, default=2048, help="patch bytes fed to the decoder at a time")
    p.add_argument("--refs", default=",".join(REFERENCE_TOOLS),
                   help="reference tools to measure, comma-separated; one that is missing fails the run")
    p.add_argument("--skip-refs", action="store_true", help="skip the reference tools (= --refs '')")
    p.add_argument("--skip-heap", action="store_true", help="skip the decoder heap bisection")
    p.add_argument("--skip-agent", action="store_true", help="skip the whole-agent delta update heap search")
    p.add_argument("--agent-format", type=int, choices=FORMATS, default=None,
                   help="patch format of the whole-agent search (default: the last of --formats)")
    p.add_argument("--agent-heaps", default=None,
                   help="comma-separated heaps (KiB) for the whole-agent search instead of a bisection, tried "
                        "largest first until one fails")
    p.add_argument("--agent-repeat", type=int, default=1,
                   help="whole-agent updates per heap with --agent-heaps; a heap passes when all confirm")
    p.add_argument("--interpreter", choices=INTERPRETERS, default="64",
                   help="MicroPython of the heap searches: 64 (PyPI, agent as .mpy) or 32-frozen (32-bit, agent frozen in)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results")
    args = p.parse_args(argv)
    args.refs = [] if args.skip_refs else [t for t in args.refs.split(",") if t]
    unknown = set(args.refs) - set(REFERENCE_TOOLS)
    if unknown:
        p.error(f"--refs: unknown {', '.join(sorted(unknown))} (known: {', '.join(REFERENCE_TOOLS)})")
    formats = [int(f) for f in args.formats.split(",") if f]
    if not formats or set(formats) - set(FORMATS):
        p.error(f"--formats: one or more of {', '.join(map(str, FORMATS))}")
    windows = [int(w) for w in args.windows.split(",") if w]
    if args.target_wbits not in windows:
        windows.append(args.target_wbits)
    corpora = []
    for corpus in args.corpus:
        images = sorted(corpus.glob("*.bin"))
        if len(images) < 2:
            p.error(f"{corpus}: needs at least two *.bin images")
        corpora.append((corpus, images))
    mp = resolve_interpreter(args.interpreter, log=log)  # built or compiled once, outside the measurements
    results = {"config": {"corpus": [str(c) for c in args.corpus], "formats": formats, "windows": windows,
                          "copy_run": args.copy_run, "chunk": args.chunk, "target_wbits": args.target_wbits},
               "targets": {"ratio_max": TARGET_RATIO, "decoder_heap_kib_max": TARGET_HEAP_KIB,
                           "format": formats[-1]},
               "env": {"python": platform.python_version(), "cpus": os.cpu_count(),
                       "interpreter": args.interpreter,
                       "micropython": subprocess.run([mp.executable, "-c", "import sys; print(sys.version)"],
                                                     capture_output=True, text=True).stdout.strip()},
               "pairs": []}
    with tempfile.TemporaryDirectory(prefix="bench-delta-") as tmpdir:
        tmp = Path(tmpdir)
        for corpus, images in corpora:
            for old, new in zip(images, images[1:]):
                results["pairs"].append(measure_pair(corpus, old, new, formats, windows, args, mp, tmp))
        if not args.skip_agent:
            heaps = [int(k) for k in args.agent_heaps.split(",")] if args.agent_heaps else None
            results["agent"] = agent_heap(tmp, args.target_wbits, args.interpreter, fmt=args.agent_format or formats[-1],
                                          heaps=heaps, repeat=args.agent_repeat)
    report(results, args)
    results["failures"] = failures(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    log(f"wrote {args.out}")
    for problem in results["failures"]:
        print("FAILED:", problem)
    return 1 if results["failures"] else 0


def key(fmt: int, wbits: int) -> str:
    """A fota row's name in a pair's results: format and window."""
    return f"f{fmt} 2^{wbits}"


def measure_pair(corpus: Path, old: Path, new: Path, formats, windows, args, mp: Interpreter, tmp: Path) -> dict:
    a, b = old.read_bytes(), new.read_bytes()
    log(f"{corpus.name}: {old.name} -> {new.name}")
    pair = {"corpus": corpus.name, "old": old.name, "new": new.name, "old_bytes": len(a), "new_bytes": len(b),
            "fota": {}}
    for fmt in formats:
        for w in windows:
            t = time.perf_counter()
            patch = encode(a, b, w, copy_run=args.copy_run, fmt=fmt)
            row = {"format": fmt, "wbits": w, "bytes": len(patch), "encode_s": round(time.perf_counter() - t, 3)}
            path = tmp / f"p{fmt}-{w}.bin"
            path.write_bytes(patch)
            if not args.skip_heap:
                row.update(decoder_heap(old, path, tmp, args.chunk, mp))
                if not row["applied_ok"] or hashlib.sha256((tmp / "out.bin").read_bytes()).digest() != hashlib.sha256(b).digest():
                    row["applied_ok"] = False
            pair["fota"][key(fmt, w)] = row
            log(f"  fota {key(fmt, w)}: {row}")
    if args.refs:
        pair["refs"] = references(old, new, tmp, args.refs)
        sizes = [r["bytes"] for r in pair["refs"].values() if "bytes" in r]
        pair["smallest_ref"] = min(sizes) if sizes else None
        pair["ratio"] = {str(fmt): round(pair["fota"][key(fmt, args.target_wbits)]["bytes"] / pair["smallest_ref"], 3)
                         if sizes else None for fmt in formats}
    return pair


def failures(results: dict) -> list[str]:
    """Why the run failed (empty: it did; the targets are verdicts, not failures): a requested
    reference tool missing, a patch the MicroPython decoder did not apply, a heap search that
    found no heap at all."""
    out = []
    for p in results["pairs"]:
        name = _name(p)
        out += [f"{name}: {tool} {r['skipped']}" for tool, r in p.get("refs", {}).items() if "skipped" in r]
        for k, r in p["fota"].items():
            if r.get("applied_ok") is False:
                out.append(f"{name}: the {k} patch was not applied correctly under MicroPython")
            if "smallest_heap_kib" in r and r["smallest_heap_kib"] is None:
                out.append(f"{name}: the {k} patch does not apply within any heap tried")
    agent = results.get("agent")
    if agent and agent["smallest_heap_kib"] is None:
        out.append("whole agent: no heap tried completed a delta update")
    return out


def report(results: dict, args) -> None:
    cfg = results["config"]
    formats, windows, target = cfg["formats"], cfg["windows"], args.target_wbits
    checked = results["targets"]["format"]
    refs = sorted({name for p in results["pairs"] for name in p.get("refs", {})})
    keys = [key(f, w) for f in formats for w in windows]
    rows = []
    for p in results["pairs"]:
        ratios = p.get("ratio") or {}
        rows.append([p["corpus"], f"{_short(p['old'])} → {_short(p['new'])}", p["new_bytes"]]
                    + [p["fota"][k]["bytes"] for k in keys]
                    + [p["refs"][n].get("bytes", "skipped") for n in refs]
                    + [_ratio(ratios.get(str(f)), f == checked) for f in formats])
    print_table("Patch bytes per consecutive pair",
                ["corpus", "pair", "new image"] + keys + refs + [f"f{f} 2^{target} / best ref" for f in formats],
                rows, left=("corpus", "pair"))
    rows = [[p["corpus"], _short(p["new"])] + [f"{p['fota'][k]['encode_s']:.2f}" for k in keys]
            + [f"{p['refs'][n]['encode_s']:.2f}" if "encode_s" in p["refs"][n] else "-" for n in refs]
            for p in results["pairs"]]
    print_table("Encoder seconds", ["corpus", "new image"] + keys + refs, rows, left=("corpus", "new image"))
    if not args.skip_heap:
        rows = []
        for p in results["pairs"]:
            for k in keys:
                r = p["fota"][k]
                rows.append([p["corpus"], _short(p["new"]), k, r["smallest_heap_kib"], r["interpreter_heap_kib"],
                             r["baseline_heap_kib"], r["decoder_kib"], r["decoder_with_code_kib"],
                             f"{r['apply_s_256k']:.2f}", "yes" if r["applied_ok"] else "NO"])
        print_table(f"Decoder heap KiB ({args.interpreter} micropython -X heapsize, bisected; patch fed in {args.chunk}-byte chunks)",
                    ["corpus", "new image", "patch", "smallest heap", "interpreter", "+ decoder import", "decoder state",
                     "decoder code+state", "apply s", "ok"], rows, left=("corpus", "new image", "patch"))
        if len(formats) > 1:
            first, last = key(formats[0], target), key(checked, target)
            rows = [[p["corpus"], _short(p["new"]), f"{p['fota'][first]['apply_s_256k']:.2f}",
                     f"{p['fota'][last]['apply_s_256k']:.2f}",
                     f"{p['fota'][last]['apply_s_256k'] / max(p['fota'][first]['apply_s_256k'], 1e-3):.2f}"]
                    for p in results["pairs"]]
            print_table(f"Decoder seconds under MicroPython ({args.interpreter}, whole process, same run)",
                        ["corpus", "new image", first, last, "ratio"], rows, left=("corpus", "new image"))
    agent = results.get("agent")
    if agent:
        print(f"Whole agent ({args.interpreter}) applying a {agent['bundle_bytes']}-byte bundle delta "
              f"(format {agent.get('format', 1)}) through Mosquitto: "
              f"smallest heap {agent['smallest_heap_kib']} KiB"
              + (f" ({agent['repeat']} of {agent['repeat']} updates at each heap down to it)" if agent.get("repeat", 1) > 1 else ""))
        for k in sorted({a["heap_kib"] for a in agent["attempts"]}, reverse=True):
            tries = [a["ok"] for a in agent["attempts"] if a["heap_kib"] == k]
            print(f"  {k} KiB: {sum(tries)}/{len(tries)} confirmed")
    ratios = [(p.get("ratio") or {}).get(str(checked)) for p in results["pairs"]]
    sizes_ok = all(r is not None and r <= TARGET_RATIO for r in ratios)
    worst_ratio = max((r for r in ratios if r is not None), default=None)
    line = (f"Targets at 2^{target}, format {checked}: patch <= {TARGET_RATIO}x smallest reference on every pair: "
            f"{'met' if sizes_ok else 'MISSED or not measured'} (worst {worst_ratio})")
    if not args.skip_heap:
        worst = max(p["fota"][key(checked, target)]["decoder_with_code_kib"] or 10**6 for p in results["pairs"])
        line += (f"; decoder (code + state) <= {TARGET_HEAP_KIB} KiB of heap: {worst} KiB, "
                 f"{'met' if worst <= TARGET_HEAP_KIB else 'MISSED'}")
    print(line)
    results["verdict"] = line


def _ratio(ratio, checked: bool) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.3f}" + ((" ok" if ratio <= TARGET_RATIO else " MISSED") if checked else "")


def _name(p: dict) -> str:
    return f"{p['corpus']} {_short(p['old'])} -> {_short(p['new'])}"


def _short(name: str) -> str:
    return name.removesuffix(".bin").removeprefix("micropython-").removeprefix("qemu-")


if __name__ == "__main__":
    sys.exit(main())
