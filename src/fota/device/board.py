# The board runner: the agent on an ESP32, a Pico W, an ESP8266 (MicroPython only). One more
# runner of the same core and executor as the unix-port runner (fota.device.runner), which it
# extends with what only a board has:
#
#   Wi-Fi      network.WLAN(STA_IF) from config "wifi" {"ssid", "password"} (absent: no Wi-Fi
#              step, as on a wired board or the unix port). Brought up and watched inside the
#              agent's steps: a join in progress is polled (isconnected()/status()), never
#              waited for; a failed join, or a link lost while connected (the broker connection is
#              then closed at once), is retried after an exponential back-off with jitter
#              (wifi "backoff_ms", default 1000, up to 60 s; "timeout_ms": a join's deadline,
#              default 15000).
#   reset      a reboot is machine.reset(), a hard reset (on an ESP32 a soft reset does not load
#              the new firmware), after a clean disconnect (go_offline).
#   watchdog   on a trial boot a machine.WDT(timeout=config "trial_wdt_ms") is armed before the
#              app starts and fed at every step of the agent; the broker (whose connection
#              confirms the trial) is not reached before the app ran "trial_settle_ms" with the
#              watchdog fed: an app that hangs (a tick that
#              never returns, an asyncio task that never yields) stops the feeding and resets the
#              board, and that boot counts as a failed trial attempt (the executor counted it
#              before the app ran; after max_trial_boots the boot selector reverts, and on an
#              ESP32 the bootloader has already rolled back an image never marked valid). A
#              watchdog cannot be stopped on ESP32 or RP2040: once the trial is confirmed the
#              agent goes on feeding it for the rest of that boot (the next boot, not a trial,
#              arms none), so the app must keep letting the agent run, as it had to during the
#              trial. The socket timeout (each blocking network wait) is kept below the watchdog.
#   the app    three styles (docs/boards.md, "How the app and the agent share the board"):
#              `tick()` called by the agent's loop; `def main(agent)`: the app's own loop, which
#              calls agent.poll(ms); `async def main(agent)`: the app's asyncio loop, with the
#              agent as a task of it (fota.device.aio).
#
# main.py on a provisioned board:  from fota.device.board import main; main("device")  (cwd "/")
import sys
import time

from fota.device import runner
from fota.device.runner import Device, Reboot, log, ticks_ms, ticks_diff, ticks_add, load_app
from fota.device.mqtt import backoff_ms

RP2_WDT_MAX_MS = 8388          # the RP2040's longest watchdog timeout
DEFAULT_TRIAL_WDT_MS = 30000   # above the longest step (a connect with its TLS handshake)
DEFAULT_STEP_MS = 50           # how long a step of the agent's own loop waits for messages
DEFAULT_TRIAL_SETTLE_MS = 2000 # on trial: the app runs this long before the broker is reached
WIFI_BACKOFF_MS = 1000
WIFI_BACKOFF_MAX_MS = 60000
WIFI_JOIN_MS = 15000
# The status() names that say a join failed (the set differs between ports; each is looked up).
WIFI_FAILED = ("STAT_WRONG_PASSWORD", "STAT_NO_AP_FOUND", "STAT_CONNECT_FAIL", "STAT_ASSOC_FAIL",
               "STAT_HANDSHAKE_TIMEOUT", "STAT_BEACON_TIMEOUT")


def _sleep_ms(ms):
    if ms > 0:
        time.sleep_ms(ms)


class BoardDevice(Device):
    def __init__(self, root, app_loader=None):
        Device.__init__(self, root, app_loader or load_board_app)
        self.frozen_app = True     # a firmware image's frozen `app` module (esp32 backend)
        self.stepped_install = True  # the app runs between the install's steps
        self.wdt = None
        self._trial_since = None   # on trial: when the app started (the health check waits)
        self.wifi = self.config.get("wifi") or None
        self.wlan = None
        self._joining = False      # a join in progress since _join_started
        self._join_started = 0
        self._wifi_at = ticks_ms() # when the next join may start
        self._wifi_failures = 0
        self.wifi_joins = 0        # join attempts this boot
        self._rebooting = False    # a Reboot left poll(): a later step resets the board itself

    # ---- watchdog ------------------------------------------------------------------------
    def wdt_timeout_ms(self):
        ms = self.config.get("trial_wdt_ms", DEFAULT_TRIAL_WDT_MS)
        if sys.platform == "rp2":
            ms = min(ms, RP2_WDT_MAX_MS)
        return ms

    def before_app(self, on_trial):
        if not on_trial:
            return
        import machine
        ms = self.wdt_timeout_ms()
        # The ESP8266's watchdog has a fixed timeout of the system's: it takes none.
        self.wdt = machine.WDT() if sys.platform == "esp8266" else machine.WDT(timeout=ms)
        # Every blocking network wait must end well before the watchdog would.
        self.net_timeout_s = max(1, min(self.net_timeout_s, ms // 3000))
        self._trial_since = ticks_ms()
        log("trial boot: watchdog armed,", ms, "ms")

    def feed(self):
        if self.wdt is not None:
            self.wdt.feed()

    # ---- Wi-Fi ---------------------------------------------------------------------------
    def link_up(self):
        if not self.wifi:
            return True
        wlan = self.wlan
        if wlan is None:
            import network
            wlan = self.wlan = network.WLAN(network.STA_IF)
            wlan.active(True)
            if wlan.isconnected():  # kept up from before a soft reset: nothing to do
                return True
        if self._joining:
            if wlan.isconnected():
                self._joining = False
                self._wifi_failures = 0
                log("Wi-Fi up:", _ip(wlan))
                return True
            status = wlan.status()
            timeout = self.wifi.get("timeout_ms", WIFI_JOIN_MS)
            if _join_failed(status) or ticks_diff(ticks_ms(), self._join_started) > timeout:
                self._join_failed("status %s" % status)
            return False
        if wlan.isconnected():
            return True
        if ticks_diff(self._wifi_at, ticks_ms()) > 0:
            return False  # backing off
        self._join()
        return False

    def _join(self):
        wlan = self.wlan
        try:
            wlan.disconnect()  # a driver still retrying the last join would refuse a new one
        except OSError:
            pass
        try:
            wlan.connect(self.wifi["ssid"], self.wifi.get("password"))
        except OSError as e:
            self._join_failed(e)
            return
        self.wifi_joins += 1
        self._joining = True
        self._join_started = ticks_ms()
        log("Wi-Fi: joining", self.wifi["ssid"])

    def _join_failed(self, why):
        self._joining = False
        self._wifi_failures += 1
        delay = backoff_ms(self._wifi_failures, self.wifi.get("backoff_ms", WIFI_BACKOFF_MS), WIFI_BACKOFF_MAX_MS)
        self._wifi_at = ticks_add(ticks_ms(), delay)
        log("Wi-Fi join failed (%s): next attempt in %d ms" % (why, delay))

    def _step_connect(self, timeout_ms):
        # On trial the broker connection, which confirms the new app (the core's health check),
        # waits until the app has run for trial_settle_ms with the watchdog fed: an app that
        # hangs at once must not be confirmed before the watchdog catches it.
        if self._trial_since is not None:
            settle = self.config.get("trial_settle_ms", DEFAULT_TRIAL_SETTLE_MS)
            if ticks_diff(ticks_ms(), self._trial_since) < settle:
                _sleep_ms(timeout_ms)
                return False
            self._trial_since = None
        # The broker connection waits for the link; while it is down, the step waits (bounded),
        # so that an agent loop that only calls poll() is not a busy loop.
        if self.wifi and not self.link_up():
            _sleep_ms(timeout_ms)
            return False
        return Device._step_connect(self, timeout_ms)

    def poll(self, timeout_ms=DEFAULT_STEP_MS):
        if self._rebooting:
            # The app's loop caught the Reboot and stepped again: the agent resets by itself.
            log("the app's loop swallowed the reboot")
            reset(self)
        if self.client is not None and self.wifi and self.wlan is not None and not self.wlan.isconnected():
            # The link is gone: so is the broker connection, whatever its socket says yet.
            log("Wi-Fi lost")
            self._drop_connection()
            self._connect_at = ticks_ms()
        try:
            Device.poll(self, timeout_ms)
        except Reboot:
            self._rebooting = True
            raise

    def busy(self):
        """True when the next step has work waiting (the asyncio runner does not sleep then): a
        message in the inbox, or the last step read one and more may wait in the socket, or an
        http download is running (its step waits on its own socket)."""
        return bool(self.inbox) or self.more or (self.fetch is not None and self._fetching())


def _join_failed(status):
    import network
    for name in WIFI_FAILED:
        value = getattr(network, name, None)
        if value is not None and status == value:
            return True
    return False


def _ip(wlan):
    try:
        return wlan.ifconfig()[0]
    except (OSError, AttributeError):
        return "?"


def load_board_app(app_dir):
    """The slot's app: from its directory (files backend), or the firmware's frozen `app` module
    (esp32 backend: app_dir None); None if the firmware has no app."""
    if app_dir:
        return load_app(app_dir)
    try:
        import app
    except ImportError as e:
        if "'app'" in str(e) or str(e) == "app":  # no such module, not an import inside it
            return None
        raise
    if hasattr(app, "start"):
        app.start()
    return app


def run_app(device, step_ms=DEFAULT_STEP_MS):
    """After boot: whoever owns the loop runs it. Returns only by an exception (Reboot)."""
    app = device.app
    app_main = getattr(app, "main", None) if app is not None else None
    if app_main is not None:
        result = app_main(device)  # the app's own loop: returns only if the app ends it
        if result is not None and hasattr(result, "send"):  # async def main: a coroutine
            from fota.device import aio
            import asyncio
            asyncio.run(aio.run_with(device, result))
        log("the app's main returned: the agent's loop carries on")
        device.app = None  # its tick() is not called after its own loop ended
    while True:
        device.poll(step_ms)


def reset(device):
    """The reboot: a clean disconnect, then a hard reset. Never returns."""
    import machine
    runner.shut_down(device)
    machine.reset()


def main(root, step_ms=DEFAULT_STEP_MS):
    """The board's main.py calls this with the device directory."""
    import machine
    device = None
    try:
        log("reset cause", machine.reset_cause())
    except AttributeError:
        pass
    try:
        device = BoardDevice(root)
        device.boot()
        run_app(device, step_ms)
    except Reboot:
        runner.shut_down(device)
    except Exception as e:  # the agent itself failed: a reset, not a board stuck at the REPL
        try:
            log("agent crashed:", type(e).__name__, e)
            sys.print_exception(e)
            if device is not None:
                device.executor.crashed(e)  # counted against the job in progress (E_CRASH)
            if device is not None and device.client is not None:
                device.go_offline()
        except Exception:  # a MemoryError again (a full heap): the reset matters, not the goodbye
            pass
        _sleep_ms(1000)  # not a hot loop of crashing boots
    machine.reset()
