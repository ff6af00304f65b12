# An emulation of MicroPython's `network` module, its WLAN class in station mode: what a board
# runner uses to bring Wi-Fi up and to notice it going down. For tests without hardware, under
# the real `micropython` (unix port) when fota.testkit.boards (or tests/boards, which re-exports
# it) is on MICROPYPATH. Never part of the agent.
#
# Written from the documentation, not from code:
# - MicroPython, class WLAN:
#   https://docs.micropython.org/en/latest/library/network.WLAN.html
#   WLAN(interface_id) with network.STA_IF / network.AP_IF; active([is_active]) ("most other
#   methods require active interface"); connect(ssid=None, key=None, *, bssid=None);
#   disconnect(); scan() -> (ssid, bssid, channel, RSSI, security, hidden) tuples; status([param])
#   -> STAT_IDLE, STAT_CONNECTING, STAT_WRONG_PASSWORD, STAT_NO_AP_FOUND, STAT_CONNECT_FAIL,
#   STAT_GOT_IP, or with param "rssi" the signal strength; isconnected() -> True in STA mode when
#   connected to an access point "and has a valid IP address"; ipconfig/ifconfig; config().
# - MicroPython, network module: https://docs.micropython.org/en/latest/library/network.html
#   (connect() returns at once; the link comes up later: "the connection is established in the
#   background", which is why code polls isconnected()/status()).
# The numeric values of STAT_* differ between ports (ESP32 uses 1000/1001/1010 and 2xx reasons,
# the Pico W's cyw43 driver small and negative numbers); the values below are this emulation's
# own: code must compare with the names, never with numbers.
#
# Conventions shared with the harnesses that run an emulated board:
#
#   the access point  a JSON control file the test writes (replace it atomically):
#                       {"up": true|false, "ssid": "...", "password": "...", "connect_ms": 50}
#                     "up" false (or the file missing): no access point in range. "ssid" /
#                     "password" absent: any credentials are accepted. "connect_ms": how long
#                     association + DHCP take after connect() (default 50).
#                     Path: env FOTA_EMU_WLAN, else the "wifi" key of the board settings (env
#                     FOTA_EMULATED_BOARD, a JSON file), else no file: an access point that is
#                     always up and accepts any credentials.
#   link loss         the file turning "up": false while connected: isconnected() becomes False
#                     and status() STAT_NO_AP_FOUND at the next call. "drops" (optional): how
#                     many times the access point went away so far; a connection made at a lower
#                     count is lost too, even if no call saw the file say "up": false (an outage
#                     shorter than the caller's blocking socket wait: the driver's disconnect
#                     event is not sampled, it is latched). The emulated driver does not
#                     re-associate by itself when the access point comes back (the ESP32 driver
#                     does, the Pico W's does not: the stricter case): the runner must call
#                     connect() again. Sockets are NOT touched: on a board a dead link leaves TCP
#                     connections to time out; a test that wants them cut cuts them itself (a fault
#                     proxy), or relies on the runner closing them when isconnected() turns False.
#   attempt log       every connect() appends one line "<unix ms> <ssid>" to the control file's
#                     path + ".log" (when there is a control file): tests count attempts over time.
#
# MicroPython and CPython.
import os
import time
import json

STA_IF = 0
AP_IF = 1

STAT_IDLE = 0
STAT_CONNECTING = 1
STAT_WRONG_PASSWORD = -3
STAT_NO_AP_FOUND = -2
STAT_CONNECT_FAIL = -1
STAT_GOT_IP = 3

DEFAULT_CONNECT_MS = 50

try:
    _ticks_ms = time.ticks_ms
    _ticks_diff = time.ticks_diff
except AttributeError:  # CPython
    def _ticks_ms():
        return int(time.monotonic() * 1000)

    def _ticks_diff(a, b):
        return a - b


def _unix_ms():
    if hasattr(time, "time_ns"):
        return time.time_ns() // 1000000
    return int(time.time() * 1000)


def _control_path():
    path = os.getenv("FOTA_EMU_WLAN")
    if path:
        return path
    board = os.getenv("FOTA_EMULATED_BOARD")
    if board:
        try:
            with open(board) as f:
                return json.load(f).get("wifi")
        except (OSError, ValueError):
            return None
    return None


def _access_point():
    """The access point as the control file describes it now, or None when none is in range."""
    path = _control_path()
    if path is None:
        return {"up": True}
    try:
        with open(path) as f:
            ap = json.load(f)
    except (OSError, ValueError):
        return None
    return ap if ap.get("up") else None


_interfaces = {}


class _WLAN:
    def __init__(self, interface_id):
        self.interface_id = interface_id
        self._active = False
        self._state = "idle"     # idle, connecting, connected, failed, lost
        self._status = STAT_IDLE
        self._target = None      # (ssid, password) of the last connect()
        self._since = 0          # ticks of the last connect()
        self._drops = 0          # the access point's "drops" when the connection was made
        self._config = {"mac": b"\x24\x0a\xc4\x00\xf0\x7a", "hostname": "mpy-emulated"}

    def active(self, is_active=None):
        if is_active is None:
            return self._active
        self._active = bool(is_active)
        if not self._active:
            self._state = "idle"
            self._status = STAT_IDLE
        return None

    def connect(self, ssid=None, key=None, *, bssid=None, password=None):
        if self.interface_id != STA_IF:
            raise OSError("only the STA interface connects")
        if not self._active:
            raise OSError("Wifi Not Started")  # the interface must be active first
        if key is None:
            key = password
        self._target = (ssid, key)
        self._since = _ticks_ms()
        self._state = "connecting"
        self._status = STAT_CONNECTING
        path = _control_path()
        if path is not None:
            with open(path + ".log", "a") as f:
                f.write("%d %s\n" % (_unix_ms(), ssid))

    def disconnect(self):
        self._state = "idle"
        self._status = STAT_IDLE

    def _update(self):
        if self._state == "connecting":
            ap = _access_point()
            if _ticks_diff(_ticks_ms(), self._since) < (ap or {}).get("connect_ms", DEFAULT_CONNECT_MS):
                return
            ssid, key = self._target
            if ap is None or ("ssid" in ap and ap["ssid"] != ssid):
                self._state, self._status = "failed", STAT_NO_AP_FOUND
            elif "password" in ap and ap["password"] != key:
                self._state, self._status = "failed", STAT_WRONG_PASSWORD
            else:
                self._state, self._status = "connected", STAT_GOT_IP
                self._drops = ap.get("drops", 0)
        elif self._state == "connected":
            ap = _access_point()
            if (ap is None or ("ssid" in ap and ap["ssid"] != self._target[0])
                    or ap.get("drops", 0) != self._drops):
                self._state, self._status = "lost", STAT_NO_AP_FOUND

    def status(self, param=None):
        self._update()
        if param is None:
            return self._status
        if param == "rssi":
            if self._state != "connected":
                raise OSError("not connected")
            return -58
        raise ValueError("unknown status param")

    def isconnected(self):
        self._update()
        return self._active and self._state == "connected"

    def scan(self):
        ap = _access_point()
        if ap is None:
            return []
        return [(ap.get("ssid", "emulated").encode(), b"\x02\x00\x00\x00\x00\x01", 6, -58, 3, False)]

    def ifconfig(self, config=None):
        if config is not None:
            return None
        if self.isconnected():
            return ("192.168.4.2", "255.255.255.0", "192.168.4.1", "192.168.4.1")
        return ("0.0.0.0", "0.0.0.0", "0.0.0.0", "0.0.0.0")

    def config(self, *args, **kwargs):
        if args:
            return self._config[args[0]]
        self._config.update(kwargs)
        return None


def WLAN(interface_id=STA_IF):
    """The interface object (one per interface, as on a board: WLAN(STA_IF) twice is the same
    interface)."""
    wlan = _interfaces.get(interface_id)
    if wlan is None:
        wlan = _interfaces[interface_id] = _WLAN(interface_id)
    return wlan


def hostname(name=None):
    if name is None:
        return WLAN(STA_IF).config("hostname")
    WLAN(STA_IF).config(hostname=name)
    return None
