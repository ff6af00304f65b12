"""Where the agent's heap goes: one measured line per part of an update, on a MicroPython.

    ./run bench heap_budget [--interpreter 32-frozen|64] [--image-kib 64] [--chunk 2048]
                            [--window 16384] [--wbits 12] [--delta-format 2] [--steps a,b,...]
                            [--max-heap-kib 512]
                            [--out bench/results/heap_budget.json]

Inputs are made on CPython by the project's server-side tools: a firmware image of --image-kib
KiB and the one before it (fota.testkit.boards.firmware), the image's signed manifest and update
command (fota.server.releases, fota.tools.keyring: a real P-256 signature), an app bundle and its
manifest (fota.tools.bundle), the delta patch between the two images at a 2**--wbits window
(fota.server.delta), and two real Mosquittos (plain and TLS, fota.server.broker / fota.server.tls).
Every line is then measured on the chosen interpreter (fota.testkit.interpreters) by
bench/heap_probe_mp.py, one process per run, calling the agent's own modules:

  retained  gc.mem_alloc() after the step minus before it (gc.collect() each time), with what the
            agent keeps referenced while it works (the client, the inbox, the parsed manifest...).
  needed    the smallest free heap at the step's start that it completes with, without a
            MemoryError: a ballast bytearray taken before anything else leaves less heap (binary
            search, 256-byte steps). This is the step's peak (temporaries included) plus the
            fragmentation it meets. When the setup runs out first the figure is a bound ("<=").

Lines: the interpreter at start; importing the agent (frozen on 32-frozen: bytecode in flash,
only its objects in the heap; .mpy on 64: bytecode in the heap); the MQTT client connected;
one chunk received; a window of --window // --chunk chunks received one at a time (as the
runner reads them: each hashed before the next is read into the client's reused buffer); the manifest parsed; the update command's JSON
parsed; ECDSA P-256 verification of the manifest's signature; a SHA-256 object; a bundle
unpacked and checked; the delta decoder applying the patch (and its state after the feed that
passed half the patch, before finish()); an MQTT client connected over TLS and its share over the
plain client (the MicroPython side only: the unix port's standard build gives mbedTLS the C
library's calloc, so its record buffers are not in the MicroPython heap; docs/heap.md).
Exit 1 when a line cannot be measured (a MemoryError even at the largest heap, any other error).
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from bench._report import print_table

ROOT = Path(__file__).resolve().parent.parent
PROBE = Path(__file__).resolve().parent / "heap_probe_mp.py"
DEFAULT_OUT = ROOT / "bench" / "results" / "heap_budget.json"
STEPS = ("agent_import", "mqtt_client", "chunk", "window", "manifest", "command", "ecdsa", "sha256",
         "bundle", "delta", "tls")
LABELS = {
    "interpreter": "interpreter at start",
    "agent_import": "agent imported (fota.device.runner)",
    "mqtt_client": "MQTT client connected + subscribed",
    "chunk": "one chunk received",
    "window": "chunks in flight (window), read one at a time",
    "manifest": "manifest parsed (core.parse_manifest)",
    "command": "update command JSON parsed (envelope + body)",
    "ecdsa": "ECDSA P-256 verify (ecdsa.verify_digest)",
    "sha256": "SHA-256 object",
    "bundle": "bundle unpacked + checked (bundle.extract)",
    "delta": "delta patch applied (delta.Patcher)",
    "tls": "MQTT client connected over TLS",
}
CHUNK_STEPS = ("chunk", "window")   # the bench publishes chunks to the probe
RESOLUTION = 256   # bytes: the heap search's step


class MeasureError(RuntimeError):
    pass


# ---- inputs, made on CPython by the server-side tools ---------------------------------------

def make_inputs(data: Path, args, broker_port: int, tls_port: int, cadata: bytes) -> dict:
    from fota.device import protocol as P
    from fota.server import delta as server_delta
    from fota.server.releases import build_manifest, update_command
    from fota.testkit.boards.firmware import firmware_image
    from fota.tools.bundle import pack_files
    from fota.tools.keyring import Signer
    from fota.tools.signing import generate_private_key, public_key_bytes, sign

    key = generate_private_key()
    signer = Signer(key)
    base = firmware_image("1.0.0", code_size=args.image_kib * 1024)
    image = firmware_image("1.1.0", code_size=args.image_kib * 1024)
    manifest = build_manifest("1.1.0", ["esp32-devkit"], "image", image)
    signature = sign(key, manifest.encode()).hex()
    release = SimpleNamespace(manifest=manifest, key_id=signer.kid, signature=signature)
    command = update_command(1, "probe", release, signer, chunk=args.chunk, window=args.window // args.chunk)
    rnd = random.Random(1)
    files = {"app.py": b"import lib.util\nprint('app')\n" * 40,
             "lib/util.py": bytes(rnd.choice(b"abcdefgh \n") for _ in range(6000)),
             "lib/data.bin": rnd.randbytes(10000),
             "www/index.html": b"<html>hello</html>\n" * 200}
    bundle = pack_files(files)
    patch = server_delta.encode(base, image, wbits=args.wbits, fmt=args.delta_format)
    (data / "base.bin").write_bytes(base)
    (data / "manifest.json").write_text(manifest)
    (data / "command.json").write_bytes(command)
    (data / "signer.pub").write_bytes(public_key_bytes(key))
    (data / "bundle.bin").write_bytes(bundle)
    (data / "bundle.manifest.json").write_text(build_manifest("1.1.0", ["unix"], "bundle", bundle))
    (data / "patch.bin").write_bytes(patch)
    cfg = {"host": "127.0.0.1", "port": broker_port, "tls_port": tls_port, "cadata": cadata.hex(),
           "client_id": "probe", "chunk": args.chunk, "window_chunks": max(1, args.window // args.chunk),
           "manifest_sig": signature, "bundle_size": len(bundle), "patch_size": len(patch), "wbits": args.wbits}
    assert args.chunk <= P.MAX_CHUNK_SIZE, "--chunk exceeds the largest chunk a device takes"
    (data / "cfg.json").write_text(json.dumps(cfg))
    return {"image_bytes": len(image), "manifest_bytes": len(manifest), "command_bytes": len(command),
            "bundle_bytes": len(bundle), "bundle_files": len(files), "patch_bytes": len(patch)}


# ---- runs on the interpreter ----------------------------------------------------------------

def run_probe(mp, step: str, heap: int, data: Path, run_id: int, timeout: float, ballast: int = 0):
    """The step's RESULT dict; "step" or "setup" when the step or its setup ran out of heap with
    a `ballast`-byte bytearray taken first; MeasureError for any other end."""
    if step == "interpreter":
        argv = mp.argv(str(heap), "-c", "import gc\ngc.collect()\nprint('RESULT {\"before\": 0, \"after\": %d, "
                       "\"free\": %d}' % (gc.mem_alloc(), gc.mem_free()))")
    else:
        argv = mp.argv(str(heap), "-c", f"import sys\nballast = bytearray({ballast})\n"
                       f"sys.argv[:] = ['', {step!r}, {str(data)!r}, '{ballast}']\n"
                       f"sys.path.append({str(data)!r})\nimport heap_probe_mp")
    cfg = json.loads((data / "cfg.json").read_text())
    cfg["client_id"] = f"probe{run_id}"   # a fresh session each run: nothing left from a killed one
    (data / "cfg.json").write_text(json.dumps(cfg))
    try:
        if step in CHUNK_STEPS:
            proc = run_with_chunks(argv, mp.env(), data, cfg, cfg["window_chunks"] if step == "window" else 1, timeout)
        else:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=mp.env(), cwd=data)
    except subprocess.TimeoutExpired:
        raise MeasureError(f"{step} with a {ballast} B ballast: no answer within {timeout} s")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT ") and proc.returncode == 0:
            return json.loads(line[7:])
    after_setup = "SETUP" in proc.stdout.splitlines()
    if "MemoryError" in proc.stderr + proc.stdout:   # the traceback goes to either, by port
        return "step" if after_setup else "setup"
    raise MeasureError(f"{step} with a {ballast} B ballast (heap {heap}): exit {proc.returncode}"
                       f"{'' if after_setup else ' in its setup'}: {(proc.stderr or proc.stdout)[-600:]}")


def publish_chunks(cfg: dict, n: int) -> None:
    """n chunks of cfg's size to the probe's data topic, as the control center sends them (QoS 0),
    with the agent's MQTT client on CPython."""
    import struct
    from fota.device import protocol as P
    from fota.device.mqtt import MQTTClient
    client = MQTTClient(f"{cfg['client_id']}-center", cfg["host"], cfg["port"], clean_session=True)
    client.connect()
    try:
        data = random.Random(n).randbytes(cfg["chunk"])
        for i in range(n):
            client.publish(P.topic(cfg["client_id"], P.DATA), struct.pack(P.CHUNK_HEADER, 1, i) + data)
    finally:
        client.disconnect()


def run_with_chunks(argv, env, data: Path, cfg: dict, n: int, timeout: float):
    """Run the probe; when it says READY (connected, subscribed), publish n chunks to it and let
    it go on."""
    deadline = time.monotonic() + timeout
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=data) as proc:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.strip() == "READY":
                publish_chunks(cfg, n)
                (data / f"go-{cfg['client_id']}").touch()
                break
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        return subprocess.CompletedProcess(argv, proc.returncode, "".join(lines) + out, err)


def measure(mp, step: str, data: Path, max_heap: int, timeout: float, counter) -> dict:
    top = run_probe(mp, step, max_heap, data, next(counter), timeout)
    if isinstance(top, str):
        raise MeasureError(f"{step}: MemoryError even at the largest heap ({max_heap} bytes)")
    result = dict(top, retained=top["after"] - top["before"])
    if step == "interpreter":
        result["needed"] = None
        return result
    # The smallest free heap the step completes with: the largest ballast it completes beside.
    # When the setup is what fails first, the step needs at most the free heap found (a bound).
    lo, hi, best, runs, limit = 0, top["free"], top, 1, "step"
    while hi - lo > RESOLUTION:
        mid = (lo + hi) // 2 // 16 * 16
        got = run_probe(mp, step, max_heap, data, next(counter), timeout, ballast=mid)
        runs += 1
        if isinstance(got, str):
            hi, limit = mid, got
        else:
            lo, best = mid, got
    result.update(needed=best["free"], needed_is_bound=limit == "setup", search_runs=runs)
    for name in ("decoder",):
        if name in top:
            result[name] = top[name]
    return result


def brokers(tmp: Path):
    from fota.server.broker import Mosquitto
    from fota.server.tls import ensure_tls
    plain = Mosquitto(tmp / "mosquitto", auth=False).start()
    tls_files = ensure_tls(tmp / "tls")
    try:
        secure = Mosquitto(tmp / "mosquitto-tls", auth=False, tls=tls_files).start()
    except BaseException:
        plain.stop()
        raise
    return plain, secure, tls_files.ca_der()


def run(args) -> dict:
    import itertools
    from fota.testkit.interpreters import interpreter
    mp = interpreter(args.interpreter, log=lambda m: print(m, file=sys.stderr))
    steps = ["interpreter"] + [s for s in STEPS if s in args.steps]
    max_heap = args.max_heap_kib * 1024
    rows, failures, modules = [], [], []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="heap-budget-") as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        data.mkdir()
        plain, secure, cadata = brokers(tmp)
        try:
            inputs = make_inputs(data, args, plain.port, secure.port, cadata)
            # The probe as .mpy (bytecode only, loads on both): compiling its source would take
            # more heap than most steps need.
            from fota.tools.mpy import compile_module
            compile_module(PROBE, data / "heap_probe_mp.mpy", name="bench/heap_probe_mp.py")
            counter = itertools.count()
            if "agent_import" in steps:   # the import's breakdown per module: one run, no search
                top = run_probe(mp, "agent_modules", max_heap, data, next(counter), args.timeout)
                if isinstance(top, str):
                    failures.append("agent_modules: MemoryError at the largest heap")
                else:
                    modules = top["modules"]
            for step in steps:
                t0 = time.monotonic()
                try:
                    r = measure(mp, step, data, max_heap, args.timeout, counter)
                except MeasureError as e:
                    failures.append(str(e))
                    rows.append({"step": step, "label": LABELS[step], "error": str(e)})
                    continue
                r.update(step=step, label=LABELS[step], wall_s=round(time.monotonic() - t0, 1))
                rows.append(r)
                print(f"  {step}: retained {r['retained']} B, needed {r['needed']} B", file=sys.stderr, flush=True)
        finally:
            plain.stop()
            secure.stop()
    by = {r["step"]: r for r in rows if "error" not in r}
    derived = {}
    if "tls" in by and "mqtt_client" in by:
        derived["tls_share_retained"] = by["tls"]["retained"] - by["mqtt_client"]["retained"]
        derived["tls_share_needed"] = by["tls"]["needed"] - by["mqtt_client"]["needed"]
    if "window" in by and "chunk" in by:
        # what a whole window holds beyond one chunk (the runner reads one message at a time)
        derived["window_over_chunk"] = by["window"]["retained"] - by["chunk"]["retained"]
    return {"bench": "heap_budget", "interpreter": args.interpreter, "executable": mp.executable,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "options": {"image_kib": args.image_kib, "chunk": args.chunk, "window": args.window,
                        "window_chunks": max(1, args.window // args.chunk), "wbits": args.wbits,
                        "delta_format": args.delta_format,
                        "max_heap_kib": args.max_heap_kib},
            "inputs": inputs, "rows": rows, "agent_modules": modules, "derived": derived, "failures": failures,
            "wall_s": round(time.monotonic() - started, 1)}


def render(result: dict) -> None:
    table = []
    for r in result["rows"]:
        if "error" in r:
            table.append([r["label"], "-", "-", "FAILED: " + r["error"][:80]])
            continue
        note = ""
        if r["step"] == "interpreter":
            note = f"heap free at start: {r['free']} B"
        elif "decoder" in r:
            note = f"decoder state while applying: {r['decoder']} B"
        needed = "-" if r["needed"] is None else ("<= %d" % r["needed"] if r.get("needed_is_bound") else r["needed"])
        table.append([r["label"], r["retained"], needed, note])
    o = result["options"]
    d = result["derived"]
    notes = [f"interpreter {result['interpreter']} ({result['executable']}); image {o['image_kib']} KiB, "
             f"chunk {o['chunk']} B, window {o['window']} B = {o['window_chunks']} chunks, delta window 2**{o['wbits']}, "
             f"delta format {o.get('delta_format', 1)}",
             "retained: gc.mem_alloc() after - before (gc.collect()); needed: the smallest free heap at the step's "
             "start it completes with (a ballast taken first; searched in 256 B steps): peak + fragmentation; "
             "'<= N': the setup ran out first, the step needs at most N"]
    if "tls_share_retained" in d:
        notes.append(f"TLS share over the plain client: retained {d['tls_share_retained']} B, needed {d['tls_share_needed']} B")
    for f in result["failures"]:
        notes.append("FAILED: " + f)
    print_table(f"heap budget on {result['interpreter']} ({result['date']})",
                ["line", "retained B", "needed B", "note"], table, notes, left=("line", "note"))
    if result.get("agent_modules"):
        print_table("the agent's import, module by module (retained, in import order)", ["module", "retained B"],
                    result["agent_modules"], [f"sum: {sum(b for _, b in result['agent_modules'])} B"])


def parse(argv):
    p = argparse.ArgumentParser(prog="./run bench heap_budget", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interpreter", default="32-frozen", choices=("64", "32-frozen"))
    p.add_argument("--image-kib", type=int, default=64, help="firmware image size for the delta and manifest")
    p.add_argument("--chunk", type=int, default=2048, help="chunk size in bytes")
    p.add_argument("--window", type=int, default=16384, help="bytes of chunks in flight (max_inflight)")
    p.add_argument("--wbits", type=int, default=None, help="delta window 2**N (default: the device default, protocol.DELTA_WBITS)")
    p.add_argument("--delta-format", type=int, default=None,
                   help="delta patch format (docs/delta.md; default: the newest, what the center sends this agent)")
    p.add_argument("--steps", default=",".join(STEPS), help="lines to measure (comma-separated)")
    p.add_argument("--max-heap-kib", type=int, default=None, help="largest heap tried (default 512, 2048 on 64)")
    p.add_argument("--timeout", type=float, default=120, help="seconds per run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    from fota.device import protocol as P
    if args.wbits is None:
        args.wbits = P.DELTA_WBITS
    if args.delta_format is None:
        args.delta_format = max(P.DELTA_FORMATS)
    if args.max_heap_kib is None:
        args.max_heap_kib = 2048 if args.interpreter == "64" else 512
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(args.steps) - set(STEPS))
    if unknown:
        p.error(f"unknown steps {unknown}; known: {', '.join(STEPS)}")
    if not 1 <= args.chunk <= args.window:
        p.error("--chunk must be 1..--window")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    result = run(args)
    render(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
