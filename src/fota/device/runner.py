# The blocking runner for MicroPython (and CPython): boot selection, starting the app, the MQTT
# loop, and the order in which the core's actions run. The executor (fota.device.executor)
# performs every action but a publish, against the slot backend and the device's files.
#
# Device directory (root):
#   config.json        id, hardware, broker, pubkey, backend, ... (written at provisioning)
#   boot.json, agent.json, journal.json, keys.json   the stored state (fota.device.executor)
#   wire.json          bytes moved per connection, only with config "wire_stats" (bench/e2e)
#   slots/a, slots/b   the slots (files backend) or flash.bin (sim backend)
import sys
import time
import json
from binascii import unhexlify

from fota.device import protocol as P
from fota.device import core as C
from fota.device import fsutil
from fota.device import boot as bootrec
from fota.device.executor import Executor, Reboot
from fota.device.mqtt import MQTTClient, MQTTError, backoff_ms, ticks_ms, ticks_diff, ticks_add, sleep_ms
from fota.device.slots import open_backend

REBOOT_EXIT = 3   # the unix-port supervisor restarts the agent on this exit code
EPOCH_2000 = 946684800  # Unix time of 2000-01-01: some MicroPython ports count from there

class Clock:
    """Milliseconds since the start, for the core's deadlines, from ticks_ms.

    ticks_ms wraps (at 2**30 on MicroPython ports: ~12.4 days) and ticks_diff answers only within
    half of that (-2**29..2**29-1 ms): ticks_diff(ticks_ms(), start) went negative after ~6.2 days
    up, and every deadline with it. This clock adds up the differences between successive
    readings (the runner reads it every loop turn, never 6 days apart); past 2**30 ms it is a
    bignum on a 32-bit port, which the core compares and subtracts like any int.
    ticks, diff: the tick source (tests: one that wraps on CPython too)."""

    def __init__(self, ticks=None, diff=None):
        self.ticks = ticks or ticks_ms
        self.diff = diff or ticks_diff
        self.last = self.ticks()
        self.ms = 0

    def now(self):
        t = self.ticks()
        self.ms += self.diff(t, self.last)
        self.last = t
        return self.ms

    def at(self, ticks):
        """The clock's value at an earlier ticks reading (less than 2**29 ms ago)."""
        return self.now() - self.diff(self.last, ticks)


def random_bytes():
    """4 random bytes for the boot epoch: os.urandom (the unix port, most boards), else the
    random module or the clocks (a fallback: an epoch need only differ from the last one)."""
    try:
        import os
        return os.urandom(4)
    except (ImportError, AttributeError, OSError, NotImplementedError):
        pass
    try:
        import random
        n = random.getrandbits(32)
    except (ImportError, AttributeError):
        n = 0
    n ^= ticks_ms() * 7919 ^ int(time.time())
    return bytes([(n >> s) & 255 for s in (24, 16, 8, 0)])


def log(*args):
    print("[fota]", *args)


class Device:
    def __init__(self, root, app_loader=None):
        root = fsutil.abspath(root)  # the agent's files stay put if the app changes directory
        self.root = root
        self.config = fsutil.read_json(root + "/config.json")
        if not self.config:
            raise OSError(2, "no config.json in " + root)
        self.backend = open_backend(self.config.get("backend", "files"), root, self.config)
        # The stored state (files in root) and the local actions (log: looked up now, so that a
        # caller who replaced this module's log before building the device silences it too).
        self.executor = Executor(self.backend, fsutil, root + "/", log)
        self.app_loader = app_loader or load_app
        self.core = None
        self.client = None
        self.inbox = []
        self._delivering = None   # the MQTT client whose messages arrive now
        # True while poll() reads one message that dispatch() takes at once: a chunk may then stay
        # a view of the client's reused payload buffer (no copy); any other time it is copied.
        self._borrow = False
        # The last step read a message: more may be waiting in the socket (a step reads one).
        self.more = False
        # The MQTT client's payload buffer (chunks are read into it), taken now, before the heap is
        # fragmented, and handed from one connection to the next; as large as the chunks the
        # device asks for (inventory `chunk`), which the free heap decides unless configured.
        self.chunk = self.config.get("chunk") or chunk_for_heap(_mem_free())
        self.payload_buffer = bytearray(self.chunk + P.CHUNK_HEADER_SIZE)
        self._cmd_topic = P.topic(self.config["id"], P.CMD)
        self._data_topic = P.topic(self.config["id"], P.DATA)
        self.pending = []     # actions not yet executed (a publish failed: retried after reconnect)
        self.clock = Clock()
        self.power_at = None  # when power was last read (ms)
        self.app = None
        self._connect_at = self.clock.last  # when the next connection attempt is due (ticks)
        self._failures = 0          # failed connection attempts in a row
        # Messages handed to the core per poll() step: one chunk's hash and write at a time, so
        # that a step's length does not grow with the window (a board's app runs between steps).
        self.step_messages = 1
        # An app with no directory of its own (a firmware image's frozen `app` module) is loaded
        # too: app_loader(None). The board runner's loader finds it; the unix runner has none.
        self.frozen_app = False
        # Install (unpack a bundle, read back and check an image) in bounded steps, one per
        # poll(), instead of in one go; `installing` is the install under way (a generator).
        self.stepped_install = False
        self.installing = None
        # Longest blocking wait of one socket operation (connect, TLS handshake, a PUBACK), s.
        self.net_timeout_s = 10
        # Transport http: the download's fetch (fota.device.http.Fetch, imported by the first
        # job that uses it), or None.
        self.fetch = None

    def _path(self, name):
        return self.root + "/" + name

    def now(self):
        return self.clock.now()

    # ---- boot --------------------------------------------------------------------------------
    def boot(self):
        """Select the slot, start its app, build the core. Returns the core."""
        cfg = self.config
        ex = self.executor
        on_trial = ex.select(cfg.get("version"), cfg.get("max_trial_boots", 3))
        slot = ex.slot
        version = ex.record["versions"].get(slot)
        app_dir = self.backend.app_dir(slot)
        self.app = None
        app_error = None
        self.before_app(on_trial)
        if app_dir or self.frozen_app:
            try:
                self.app = self.app_loader(app_dir)
                version = getattr(self.app, "VERSION", version)
            except Exception as e:  # the app is not ours to trust: any error fails the boot
                reason = "app failed to start: %s: %s" % (type(e).__name__, e)
                log(reason)
                if on_trial:
                    ex.trial_failed(reason)
                    raise Reboot()
                # Not on trial: keep the agent running so the device can still be updated,
                # and say so in its health reports.
                app_error = reason
        agent = ex.agent_state(random_bytes)
        free_heap = _mem_free()
        identity = {
            "id": cfg["id"], "hardware": cfg["hardware"], "root": unhexlify(cfg["root"]),
            "trust": ex.trust(cfg["trust"]),
            "capacity": self.backend.capacity, "kinds": self.backend.KINDS, "version": version,
            "counter": ex.record.get("counter", 0), "time": cfg.get("time", 0), "app_error": app_error,
            # the running image (recorded when it was installed): the base of delta updates
            "image": ex.running_image(),
            # configured (0: no deltas), else from the heap
            "delta_wbits": cfg["delta_wbits"] if "delta_wbits" in cfg else wbits_for_heap(free_heap),
            "delta_formats": cfg.get("delta_formats", P.DELTA_FORMATS),
            "transports": cfg.get("transports", P.TRANSPORTS),
            "free": self._free_space(),
            "enc_key": unhexlify(cfg["enc_key"]) if cfg.get("enc_key") and getattr(self.backend, "DECRYPTS", False)
            else None,
        }
        # A failed first reading counts as an empty battery: no update with a minimum starts.
        identity["battery"], identity["external"] = self._power() or (0, False)
        settings = C.Settings(
            chunk_timeout=cfg.get("chunk_timeout_ms", 3000),
            stall_timeout=cfg.get("stall_timeout_ms", 60000),
            trial_timeout=cfg.get("trial_timeout_ms", 60000),
            max_inflight=cfg.get("max_inflight") or inflight_for_heap(free_heap),
            health_interval=cfg.get("health_interval_ms", 0),
            progress_interval=cfg.get("progress_interval_ms", 1000),
            chunk=self.chunk,
        )
        self.core = C.UpdateCore(identity, agent, settings)
        self.core.inventory_extra = {"active": slot, "slots": ex.record["versions"],
                                     "backend": cfg.get("backend", "files"), "port": sys.platform}
        self.execute(ex.start(self.core, on_trial))
        return self.core

    # ---- actions ----------------------------------------------------------------------------
    def execute(self, actions):
        """Run actions in order; a publish while offline (or one that fails) keeps itself and
        the rest queued until the next connection."""
        self.pending.extend(actions)
        while self.pending:
            if self.installing is not None:
                return  # an install in steps holds the queue: poll() advances it
            action = self.pending[0]
            kind = action[0]
            if kind == C.A_INSTALL and self.stepped_install:
                self.installing = self.executor.install_steps(action)
                return
            if kind == C.A_FETCH:
                self._fetch_start(action)  # no I/O here: poll() steps the fetch
            elif kind == C.A_PUBLISH:
                if self.client is None:
                    return  # offline: kept until the next connection
                _, suffix, payload, qos, retain = action
                try:
                    self.client.publish(P.topic(self.config["id"], suffix), payload, retain, qos)
                except OSError as e:
                    log("publish failed:", e)
                    self._drop_connection()
                    return
            else:
                if kind == C.A_REBOOT:
                    # What is still queued behind the reboot dies with it (a health report made by
                    # a reconnect during the install): the next boot reports its health afresh.
                    _log_dropped_health(self.pending[1:])
                more = self.executor.run(action)
                if more:  # the core's answer to an install: runs next
                    self.pending[1:1] = more
            self.pending.pop(0)

    # ---- MQTT ----------------------------------------------------------------------------------
    def deliver(self, topic, payload, pid, via):
        """A message from the connection `via` (pid: a QoS 1 message's packet id, else 0), queued
        for dispatch(). Not handled here: the MQTT callback can fire inside publish() while it
        waits for a PUBACK, and the core must not be re-entered. A QoS 1 command is acknowledged
        on `via` only after the core handled it (see dispatch)."""
        self.inbox.append((topic, payload, pid, via))

    def _on_message(self, topic, payload, pid):
        # The client delivering it: a session's queued commands arrive while _connect() still
        # subscribes, before self.client is set, and must be acknowledged on that connection.
        # A large payload is a view of the client's reused buffer, valid until it reads again:
        # kept as is only for the chunk poll() hands to the core before that; anything that
        # waits in the inbox (arrived during a publish's wait for its PUBACK, or behind other
        # messages) and every command (parsed as bytes) is copied.
        if type(payload) is memoryview and not (self._borrow and not self.inbox and topic == self._data_topic):
            try:
                payload = bytes(payload)
            except MemoryError:
                if topic != self._data_topic:
                    raise
                # A chunk the heap cannot queue (it came while a publish waited for its PUBACK)
                # is dropped: data is QoS 0 and the core asks for it again after chunk_timeout.
                log("chunk dropped: no heap to queue it")
                return
        self.deliver(topic, payload, pid, self._delivering)

    def _connect(self):
        cfg = self.config
        b = cfg["broker"]
        ident = cfg["id"]
        ssl_context = _TLS(b) if b.get("tls") else None
        client = MQTTClient(ident, b.get("host", "127.0.0.1"), b.get("port", 1883), user=b.get("user", ident),
                            password=b.get("password"), keepalive=b.get("keepalive", 30),
                            clean_session=False, ssl_context=ssl_context, manual_ack=True,
                            timeout=self.net_timeout_s,
                            max_payload=max(P.MAX_COMMAND_BYTES, P.MAX_CHUNK_SIZE + P.CHUNK_HEADER_SIZE),
                            reuse_payload=True, payload_buffer=self.payload_buffer)
        client.set_will(P.topic(ident, P.ONLINE), "0", retain=True, qos=1)
        client.set_callback(self._on_message)
        self._delivering = client
        try:
            client.connect()  # one attempt: the back-off between attempts is _connect_failed's
            client.subscribe(P.topic(ident, P.CMD), 1)
            client.subscribe(P.topic(ident, P.DATA), 0)
        except BaseException:
            client.close()
            raise
        self.client = client
        log("connected as", ident)

    def go_offline(self):
        """A clean disconnect (before a reboot, or a board's deep sleep). A DISCONNECT suppresses the
        will, so the device publishes its retained `online 0` itself first: without it the control
        center would go on taking it for online (docs/protocol.md §1)."""
        client, self.client = self.client, None
        if client is None:
            return
        try:
            client.publish(P.topic(self.config["id"], P.ONLINE), "0", True, 1)
            client.disconnect()
        except (OSError, MQTTError) as e:  # the broker never got the DISCONNECT: the will says 0
            log("clean disconnect failed:", e)
            client.close()

    def _drop_connection(self):
        self.more = False
        if self.client is not None:
            self.payload_buffer = self.client.payload_buffer  # grown for larger chunks: kept
            try:
                self.client.close()
            except OSError:
                pass
        self.client = None
        # Chunks still queued from the dead connection are dropped: the core asks for its window
        # again after the reconnect, and keeping both copies could double the chunk memory of a
        # small heap. Unacknowledged commands stay: the broker would redeliver them anyway.
        data_topic = self._data_topic
        self.inbox = [m for m in self.inbox if m[0] != data_topic]
        self.core.disconnected(self.now())

    def dispatch(self, limit=0):
        """Hand the queued messages to the core, in order, and run what it answers: all of them,
        or at most `limit` (the rest wait for the next step)."""
        cmd_topic = self._cmd_topic
        data_topic = self._data_topic
        done = 0
        while self.inbox and not (limit and done >= limit):
            done += 1
            topic, payload, pid, client = self.inbox.pop(0)
            if topic == data_topic:
                if self.pending and type(payload) is memoryview:
                    payload = bytes(payload)  # its write would wait behind them: keep a copy
                self.execute(self.core.chunk(payload))
                payload = None
            elif topic == cmd_topic:
                # Acknowledged once the core's persistent actions ran (they come before its
                # first publish: an accepted job's id is stored first), so a reboot before that
                # leaves it unacknowledged: the broker redelivers it to the next boot, whose core
                # refuses it as a duplicate, and no command is lost between a PUBACK and a reboot.
                # Not after the statuses: on a link that breaks every few KiB, waiting for their
                # PUBACKs first left the command unacknowledged, redelivered on every connection
                # (2 KB of each connection's budget) and refused again, for ever.
                self.core.free = self._free_space()
                actions = self.core.command(payload, self._clock())
                payload = None  # free before its actions allocate (the journal, a delta decoder)
                first_publish = 0
                while first_publish < len(actions) and actions[first_publish][0] != C.A_PUBLISH:
                    first_publish += 1
                self.execute(actions[:first_publish])
                self._ack(pid, client)
                self.execute(actions[first_publish:])
                continue
            self._ack(pid, client)

    def _free_space(self):
        # What the inactive slot may use on the filesystem (files backend), else None.
        free_space = getattr(self.backend, "free_space", None)
        if free_space is None or self.executor.slot is None:
            return None
        return free_space(bootrec.other(self.executor.slot))

    def _clock(self):
        # The real-time clock for command expiry (Unix seconds), unless config "clock" is false.
        # One that is not set reads as 1970/2000, below the signed time: the core ignores it.
        if self.config.get("clock", True) is False:
            return None
        try:
            t = int(time.time())
        except (AttributeError, OSError):
            return None
        return t + EPOCH_2000 if time.gmtime(0)[0] == 2000 else t

    def _ack(self, pid, client):
        if pid and client is not None and client is self.client:
            try:
                client.ack(pid)
            except OSError as e:  # unacknowledged: redelivered after the reconnect
                log("ack failed:", e)
                self._drop_connection()

    def _power(self):
        # (battery, external) from the power hook, or None if the reading failed. The hook's
        # module is imported only by a device that has a power source: heap is tight on boards.
        cfg = self.config
        if not (cfg.get("power_hook") or cfg.get("power") is not None or fsutil.exists(self._path("power.json"))):
            return None, False
        from fota.device import power
        return power.read(self.root, cfg)

    def _read_power(self):
        # Every power_poll_ms: the core re-checks a postponed update and reports changes.
        now = self.now()
        if self.power_at is not None and now - self.power_at < self.config.get("power_poll_ms", 5000):
            return
        self.power_at = now
        reading = self._power()
        if reading is not None:  # failed: keep the last reading
            self.execute(self.core.power(reading[0], reading[1]))

    # ---- the loop, in bounded steps ------------------------------------------------------------
    def poll(self, timeout_ms=50):
        """One bounded step of the agent: continue a connection attempt that is due (one attempt,
        never a back-off sleep: the back-off is a time of the next attempt), read what arrived
        (waiting at most timeout_ms), hand at most `step_messages` messages to the core, run the
        power check and the core's timers, tick the app. The caller loops: run_forever, an app's
        own loop, or an asyncio task (fota.device.aio). Reboot propagates out of it."""
        self.feed()
        if self.installing is not None:
            self._install_step()
            return
        if self.client is None:
            self._read_power()  # a postponed install may go on offline
            self.execute(self.core.tick(self.now()))
            if not self._step_connect(timeout_ms):
                self.tick_app()
                return
        fetching = self._fetching()
        if not self.inbox:
            # One message at a time: what else arrived stays in the socket (the TCP window and
            # the broker's queue hold it, not the heap) until the core has taken this one.
            # Messages already waiting in the inbox are dispatched first, without reading.
            # While an http fetch runs, its socket is the one waited on.
            self._borrow = True
            try:
                self.more = self.client.check_msg(0 if fetching else timeout_ms, 1) > 0
            except (OSError, MQTTError) as e:
                log("connection lost:", e)
                self._drop_connection()
                self.tick_app()
                return
            finally:
                self._borrow = False
        self.dispatch(self.step_messages)
        if fetching and self._fetching():
            self._fetch_step(timeout_ms)
        self._read_power()
        self.execute(self.core.tick(self.now()))
        self.tick_app()

    # ---- transport http ------------------------------------------------------------------------
    def _fetch_start(self, action):
        _, http, offset, size, chunk = action
        if self.fetch is None:
            from fota.device.http import Fetch  # only devices that get an http job pay for it
            self.fetch = Fetch(self._http_tls, self.net_timeout_s, log)
        self.fetch.begin(self.core.job.id, http, offset, size, chunk)  # a refusal: at the next step

    def _fetching(self):
        return self.fetch is not None and self.fetch.wanted(self.core)

    def _fetch_step(self, timeout_ms):
        from fota.device.http import HttpError
        f = self.fetch
        try:
            if f.error is not None:
                raise f.error
            data = f.step(timeout_ms)
        except HttpError as e:
            f.give_up()
            log("http:", e.reason)
            self.execute(self.core.fetch_failed(e.code, e.reason))
            return
        except (OSError, ValueError) as e:
            # Maybe not for good: the fetch goes on from its next chunk after a back-off (the
            # core's stall deadline ends the job if nothing gets through).
            f.failed()
            log("http fetch failed:", e)
            return
        if data is not None:
            if self.pending:
                data = bytes(data)  # its write would wait behind them: keep a copy
            self.execute(self.core.fetched(data))

    def _http_tls(self, host):
        # https payloads: the server's certificate must chain to the CA the device was
        # provisioned with (config http_cadata, else the broker's cadata) and name the URL's host.
        cfg = self.config
        return _TLS({"cadata": cfg.get("http_cadata") or cfg["broker"].get("cadata"), "host": host})

    def _install_step(self):
        # One bounded piece of the install; nothing else of the agent's moves meanwhile but the
        # connection's keepalive (what arrives waits in the inbox) and the app.
        try:
            next(self.installing)
        except StopIteration:
            self.installing = None
            self.pending.pop(0)  # the A_INSTALL
            self.pending[0:0] = self.executor.installed or []
            self.execute([])
        else:
            if self.client is not None:
                try:
                    self.client.check_msg(0)
                except (OSError, MQTTError) as e:
                    log("connection lost:", e)
                    self._drop_connection()
        self.tick_app()

    def feed(self):
        """Called at the start of every step (a board feeds its watchdog here)."""

    def before_app(self, on_trial):
        """Called at boot once the slot is chosen, before its app starts (a board arms its
        watchdog for a trial here)."""

    def link_up(self):
        """True when the network under the broker connection is up (a board: its Wi-Fi); called
        before each connection attempt and may itself take a bounded step to bring it up."""
        return True

    def tick_app(self):
        if self.app is not None and hasattr(self.app, "tick"):
            self.app.tick()

    def _step_connect(self, timeout_ms):
        """A connection attempt if one is due; True once connected. Waits (at most timeout_ms)
        only when the next attempt is not due yet."""
        wait = ticks_diff(self._connect_at, ticks_ms())
        if wait > 0:
            if timeout_ms > 0:
                sleep_ms(min(wait, timeout_ms))
            return False
        if not self.link_up():
            return False
        try:
            self._connect()
        except (OSError, MQTTError) as e:
            log("connect failed:", e)
            self._connect_failed()
            return False
        self._failures = 0
        # What was pending stays first: it was decided before this connection. But what
        # a new connection sends again anyway is dropped (_superseded); kept, a link that
        # breaks every connection grew the queue by ~0.5 KB per connection until the heap
        # ran out.
        _log_dropped_health(self.pending)
        self.pending = [a for a in self.pending if not _superseded(a)]
        # The connection's time counts from the start of its handshake: on a link that
        # breaks every connection right after the chunk request, the time after the
        # subscribe alone is a fraction of a millisecond and the stall deadline would
        # take tens of thousands of reconnects to reach.
        started = self.clock.at(getattr(self.client, "connect_started", self.clock.ticks()))
        self.execute(self.core.connected_(min(self.now(), max(started, self.core.now))))
        return self.client is not None  # a publish failed: the connection is already gone

    def _connect_failed(self):
        # The next attempt after the n-th failure in a row: exponential back-off with jitter
        # (fota.device.mqtt.backoff_ms). After `attempts` failures (config broker.attempts) the
        # count starts over, with an attempt at once.
        b = self.config["broker"]
        self._failures += 1
        attempts = b.get("attempts", 0)
        if attempts and self._failures >= attempts:
            self._failures = 0
            delay = 0
        else:
            delay = backoff_ms(self._failures, b.get("backoff_ms", 250))
        self._connect_at = ticks_add(ticks_ms(), delay)

    def run_forever(self, poll_ms=50):
        self.boot()
        while True:
            self.poll(poll_ms)


# Log prefix of a health report dropped unsent (superseded by the next connection's or boot's):
# its JSON follows. Its seq then never reaches the center: the log tells that gap from a lost
# status (fota.testkit.faults).
DROPPED_HEALTH = "superseded health report dropped:"


def _log_dropped_health(actions):
    for action in actions:
        if _superseded(action):
            _, suffix, payload, _, _ = action
            if suffix == P.STATUS:
                log(DROPPED_HEALTH, payload)


def _superseded(action):
    """A publish queued on a dead connection that every new connection sends afresh: the online
    flag and the inventory (retained: only the latest counts), chunk requests (asked again from
    the current position) and health reports."""
    if action[0] != C.A_PUBLISH:
        return False
    _, suffix, payload, _, _ = action
    if suffix in (P.ONLINE, P.INVENTORY, P.REQ):
        return True
    if suffix == P.STATUS and '"health"' in payload:
        try:
            return json.loads(payload).get("state") == P.HEALTH
        except ValueError:
            return False
    return False


class _TLS:
    # The MQTT client's ssl_context: the broker's certificate must chain to the pinned CA
    # (broker.cadata, DER as hex) and name broker.server_hostname (default: broker.host).
    def __init__(self, b):
        import ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.verify_mode = ssl.CERT_REQUIRED  # MicroPython's default for a client is CERT_NONE
        if b.get("cadata"):
            ctx.load_verify_locations(cadata=unhexlify(b["cadata"]))
        elif hasattr(ctx, "load_default_certs"):  # CPython: the system's CAs
            ctx.load_default_certs()
        self.ctx = ctx
        self.hostname = b.get("server_hostname") or b.get("host", "127.0.0.1")

    def wrap_socket(self, sock, server_hostname=None):
        try:
            return self.ctx.wrap_socket(sock, server_hostname=self.hostname)
        except (OSError, ValueError) as e:
            # MicroPython raises ValueError for a certificate that fails verification: as an
            # OSError it is retried with back-off like any failed connection.
            reason = str(e).strip() or repr(e)
            log("TLS handshake with", self.hostname, "failed:", reason)
            if isinstance(e, OSError):
                raise
            raise OSError("TLS: " + reason)


def _mem_free():
    # Free heap now (MicroPython), or None (CPython: no such limit). Collects only on MicroPython:
    # a full collection of a big CPython process (the power-cut harness boots thousands of times
    # in the test run's process) costs up to a second each.
    import gc
    if not hasattr(gc, "mem_free"):
        return None
    gc.collect()
    return gc.mem_free()


def inflight_for_heap(free):
    """The default max_inflight (bytes of requested chunks in flight) for a device with `free`
    bytes of heap at boot (None: unknown, the protocol's default). Chunks are read one at a time
    and written at once, and a progress report waits until none is in flight; only those that
    arrive while another publish waits for its PUBACK (a health report, an inventory) are queued
    in the heap, and one the heap cannot take is dropped and asked for again. Half the free heap,
    8..16 KiB: below 8 KiB (4 chunks of 2 KiB) a request per chunk would cost ~4 % of the image
    on the wire (docs/heap.md)."""
    if free is None:
        return P.DEFAULT_MAX_INFLIGHT
    return max(8192, min(P.DEFAULT_MAX_INFLIGHT, free // 2 // 1024 * 1024))


def chunk_for_heap(free):
    """The chunk size a device with `free` bytes of heap (before its payload buffer is taken;
    None: unknown, CPython) asks for: 8192 from 96 KiB free, 4096 from 17 KiB (a 31 KiB heap on
    32-frozen; 30 KiB and less keep 2 KiB chunks and so their heap margin), else the protocol's
    default 2048. Each chunk costs ~36 bytes of headers and a share of a request on the wire
    (docs/heap.md); the buffer that holds one costs its size of heap, and a slot backend may
    take a few chunk-sized temporaries while it writes one (the sim flash backend does)."""
    if free is None or free >= 98304:
        return P.MAX_CHUNK_SIZE
    return 4096 if free >= 17408 else P.DEFAULT_CHUNK_SIZE


def wbits_for_heap(free):
    """The default delta window (the device's inventory `delta_wbits`: the patch's window is at
    most 2**wbits bytes) for `free` bytes of heap at boot (None: unknown, the protocol's
    default): the largest in 2**9..2**DELTA_WBITS that is at most 1/16 of it. The window is the
    decoder's one large block; in a small, fragmented heap a 4 KiB one may find no room (a
    36 KiB heap has ~19 KiB free at boot: 2**10), and format 2's patches at 2**10 are within
    0.5 % of those at 2**12 (docs/delta.md)."""
    if free is None:
        return P.DELTA_WBITS
    wbits = P.DELTA_WBITS
    while wbits > 9 and (1 << wbits) > free // 16:
        wbits -= 1
    return wbits


def load_app(app_dir):
    """Import the slot's app module from app_dir and start it."""
    if not fsutil.exists(app_dir + "/app.py") and not fsutil.exists(app_dir + "/app.mpy"):
        raise ImportError("no app in " + app_dir)
    sys.path.insert(0, app_dir)
    try:
        import app
    finally:
        sys.path.pop(0)
    if hasattr(app, "start"):
        app.start()
    return app


def shut_down(device):
    """Before a reboot: a clean disconnect (the retained `online 0` first), the wire stats if
    asked for, the backend's files closed."""
    log("rebooting")
    client = device.client
    if client is not None:
        device.go_offline()
        if device.config.get("wire_stats"):
            # Bytes this connection moved, for overhead measurements (bench/e2e). Off unless
            # the config asks: on a board it is a flash write per reboot.
            root = device.root
            stats = fsutil.read_json(root + "/wire.json") or []
            stats.append({"tx": client.bytes_sent, "rx": client.bytes_received})
            fsutil.write_json(root + "/wire.json", stats[-8:])
    if device.backend and hasattr(device.backend, "close"):
        device.backend.close()


def main(root):
    device = Device(root)
    try:
        device.run_forever()
    except Reboot:
        shut_down(device)
        if sys.platform in ("linux", "darwin"):
            sys.exit(REBOOT_EXIT)  # the unix port: the supervisor starts us again
        import machine  # a board: a hard reset boots the selected slot
        machine.reset()
    except Exception as e:
        # The agent failed: counted against the job in progress (executor.crashed), so that a
        # failure at the same point at every boot ends the job (E_CRASH) instead of a restart
        # loop. The supervisor starts the agent again.
        device.executor.crashed(e)
        raise
