# Runs under MicroPython (never CPython): one line of bench/heap_budget.py's table per process.
#
#   micropython -X heapsize=H bench/heap_probe_mp.py STEP DATA_DIR
#   micropython -X heapsize=H -c "import sys; ballast = bytearray(N); sys.argv[:] = ['', STEP, DATA_DIR, 'N'];
#                                  sys.path.append(MPY_DIR); import heap_probe_mp"
#
# DATA_DIR/cfg.json holds the inputs the bench made on CPython with the project's server-side
# tools (signed manifest, bundle, delta patch, broker ports). Each step does its setup (imports,
# inputs read) first, then gc.collect(), notes the heap, runs the agent's real code for that line
# and notes the heap again with what the agent would keep still referenced. Prints one line
# "RESULT {json}" when the step completed. The second form (this script compiled to .mpy by the
# bench: compiling the source would need more heap than most steps) takes a ballast of N bytes
# first, one block at the bottom of the heap, so that less is free when the step starts; a
# MemoryError in the step (after the line "SETUP" was printed) ends the process with a
# traceback, which is how the bench finds the smallest free heap a step completes with. The
# setup's and the step's own allocations meet the heap's holes as an agent's do.
import gc
import sys
import json
import time

STEP = sys.argv[1]
DIR = sys.argv[2]
BALLAST = int(sys.argv[3]) if len(sys.argv) > 3 else 0   # the -c stub holds it
cfg = json.load(open(DIR + "/cfg.json"))
marks = {}


def mark(name):
    # A heap figure inside a step (e.g. the delta decoder's state while it applies).
    gc.collect()
    marks[name] = gc.mem_alloc()


def read(name):
    with open(DIR + "/" + name, "rb") as f:
        return f.read()


def wait_for(client, box, n, consume=None):
    # One message at a time, as the runner's poll() reads them (check_msg with limit 1), until n
    # arrived, or fail after 10 s. consume(msg): what the core does with each before the next
    # read (the message is then dropped from box, as the runner's dispatch pops it).
    t0 = time.ticks_ms()
    got = 0
    while got < n:
        if client.check_msg(50, 1):
            got += 1
            if consume is not None:
                consume(box.pop()[1])
        if time.ticks_diff(time.ticks_ms(), t0) > 10000:
            raise OSError("only %d of %d messages arrived" % (got, n))


def client_for(tls=False):
    from fota.device import protocol as P
    from fota.device.mqtt import MQTTClient
    ctx = None
    port = cfg["port"]
    if tls:
        from fota.device.runner import _TLS
        ctx = _TLS({"host": cfg["host"], "cadata": cfg["cadata"], "server_hostname": "localhost"})
        port = cfg["tls_port"]
    # As the runner makes it (fota.device.runner: manual_ack, max_payload, reuse_payload)
    return MQTTClient(cfg["client_id"], cfg["host"], port, keepalive=30, clean_session=True, ssl_context=ctx,
                      manual_ack=True, timeout=10,
                      max_payload=max(P.MAX_COMMAND_BYTES, P.MAX_CHUNK_SIZE + P.CHUNK_HEADER_SIZE),
                      reuse_payload=True)


def connected_client():
    from fota.device import protocol as P
    c = client_for()
    box = []
    c.set_callback(lambda topic, msg, pid: box.append((topic, msg, pid)))   # the runner's inbox
    c.connect()
    c.subscribe(P.topic(cfg["client_id"], P.DATA), 0)
    return c, box


def chunks_sent(c, n):
    # The bench publishes n chunks (header + --chunk bytes) to this client's data topic once it
    # reads READY, as the control center answers a chunk request, and then makes the file go-ID:
    # the chunks wait in the socket (not the heap) when the step starts.
    import os
    print("READY")
    flag = DIR + "/go-" + cfg["client_id"]
    t0 = time.ticks_ms()
    while True:
        try:
            os.stat(flag)
            return
        except OSError:
            if time.ticks_diff(time.ticks_ms(), t0) > 10000:
                raise OSError("the bench did not publish the chunks")
            time.sleep_ms(20)


# ---- the steps: setup() -> state; run(state) -> what stays referenced ------------------------

def setup_agent_import():
    return None


def run_agent_import(_):
    # What fota.device.main imports: the runner and through it the whole agent.
    from fota.device import runner
    return runner


# The agent's modules in the order the runner's imports load them (each imports only earlier ones)
AGENT_MODULES = ("fota.device", "fota.device.protocol", "fota.device.fsutil", "fota.device.mqtt",
                 "fota.device.ecdsa", "fota.device.trust", "fota.device.core", "fota.device.boot",
                 "fota.device.slots", "fota.device.executor", "fota.device.runner")


def setup_agent_modules():
    return [0] * len(AGENT_MODULES)   # small ints stored in place: no allocation while measuring


def run_agent_modules(after):
    # The heap after each module of the agent's import, one by one (a breakdown of agent_import).
    for i in range(len(AGENT_MODULES)):
        __import__(AGENT_MODULES[i])
        gc.collect()
        after[i] = gc.mem_alloc()
    return after


def setup_mqtt_client():
    from fota.device import mqtt  # noqa: F401  (the agent is imported already on a device)
    from fota.device import protocol  # noqa: F401
    return None


def run_mqtt_client(_):
    return connected_client()


def setup_chunk():
    c, box = connected_client()
    chunks_sent(c, 1)
    return c, box


def run_chunk(state):
    c, box = state
    wait_for(c, box, 1)
    from fota.device import protocol as P
    assert len(box[0][1]) == cfg["chunk"] + P.CHUNK_HEADER_SIZE
    return box


def setup_window():
    c, box = connected_client()
    chunks_sent(c, cfg["window_chunks"])
    return c, box


def run_window(state):
    # The window read one chunk at a time, each hashed (as core.chunk does) before the next is
    # read into the client's reused payload buffer; the rest wait in the socket.
    import hashlib
    c, box = state
    h = hashlib.sha256()

    def consume(msg):
        h.update(memoryview(msg)[8:])
    wait_for(c, box, cfg["window_chunks"], consume)
    return c, h


def setup_manifest():
    from fota.device import core  # noqa: F401
    with open(DIR + "/manifest.json") as f:
        return f.read()


def run_manifest(text):
    from fota.device import core
    try:
        return core.parse_manifest(text, ["image", "bundle"])
    except core.Rejection as e:
        # parse_manifest turns json's MemoryError into a rejection (a device must not crash-loop
        # on it); the manifest is valid (the bench's first run, at the largest heap, parses it),
        # so a rejection here means the heap ran out.
        raise MemoryError("parse_manifest: %s" % e)


def setup_command():
    from fota.device import core  # noqa: F401
    return read("command.json")


def run_command(payload):
    # The update command as Core._authenticate parses it: the envelope, then its signed body.
    env = json.loads(payload)
    body = json.loads(env["body"])
    return env, body


def setup_ecdsa():
    from fota.device import ecdsa
    from binascii import unhexlify
    import hashlib
    return (read("signer.pub"), hashlib.sha256(read("manifest.json")).digest(),
            unhexlify(cfg["manifest_sig"]), ecdsa)


def run_ecdsa(state):
    pub, digest, sig, ecdsa = state
    if not ecdsa.verify_digest(pub, digest, sig):
        raise AssertionError("the manifest's signature did not verify")
    return None


def setup_sha256():
    import hashlib  # noqa: F401  (imported before the step is measured)
    return bytearray(cfg["chunk"])


def run_sha256(data):
    import hashlib
    h = hashlib.sha256()
    h.update(data)
    return h


def setup_bundle():
    from fota.device import bundle
    with open(DIR + "/bundle.manifest.json") as f:
        files = json.loads(f.read())["files"]   # the signed [name, size, sha256] list
    return bundle, files


def run_bundle(state):
    import os
    bundle, files = state
    dest = DIR + "/unpacked-%d" % time.ticks_ms()
    os.mkdir(dest)
    size = cfg["bundle_size"]
    with open(DIR + "/bundle.bin", "rb") as f:
        names = bundle.extract(f, size, dest, files)
    if len(names) != len(files):
        raise AssertionError("unpacked %d of %d files" % (len(names), len(files)))
    return None


def setup_delta():
    from fota.device import delta
    old = open(DIR + "/base.bin", "rb")
    patch = open(DIR + "/patch.bin", "rb")
    head = patch.read(delta.HEADER_SIZE)
    expect = delta.parse_header(head)
    patch.seek(0)
    return delta, old, patch, expect, bytearray(cfg["chunk"])


def run_delta(state):
    delta, old, patch, expect, buf = state
    out = open(DIR + "/new.out", "wb")

    def read_old(at, n):
        old.seek(at)
        return old.read(n)

    p = delta.Patcher(read_old, out.write, cfg["patch_size"], expect, cfg["wbits"])
    half = cfg["patch_size"] // 2
    fed = 0
    mv = memoryview(buf)
    while True:
        n = patch.readinto(buf)
        if not n:
            break
        p.feed(mv[:n])
        fed += n
        if "decoder" not in marks and fed >= half:
            mark("decoder")   # the Patcher at work (after the feed that passed half the patch): window, buffers, inflater, hash
    p.finish()
    out.close()
    return None


def setup_tls():
    from fota.device import runner  # noqa: F401  (_TLS, the agent's ssl_context)
    import ssl  # noqa: F401
    return None


def run_tls(_):
    c = client_for(tls=True)
    c.connect()
    return c


def main():
    if STEP == "interpreter":  # handled by the bench with a one-line -c script
        raise ValueError("the interpreter's baseline is measured with -c")
    state = globals()["setup_" + STEP]()
    run = globals()["run_" + STEP]
    gc.collect()
    before = gc.mem_alloc()
    free = gc.mem_free()
    print("SETUP")
    kept = run(state)
    gc.collect()
    after = gc.mem_alloc()
    out = {"step": STEP, "before": before, "free": free, "after": after, "ballast": BALLAST}
    for name in marks:
        out[name] = marks[name] - before
    if STEP == "agent_modules":
        out["modules"] = [[AGENT_MODULES[i], kept[i] - (kept[i - 1] if i else before)] for i in range(len(kept))]
    print("RESULT " + json.dumps(out))
    del kept


main()
