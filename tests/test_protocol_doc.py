"""docs/protocol.md §10 and §11 against the code: the limits table names the constants of
fota.device.protocol, both sides enforce exactly those limits, the provisioning table lists every
field a device directory's config.json gets, and boot/seq start where §10 says."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fota.device import core as C
from fota.device import protocol as P
from fota.device.runner import Device
from fota.server.center import parse_request, parse_status
from fota.tools.devicedir import create_device_dir
from test_core import SIGNING_KEY, TRUST, Harness, cmd, make_update

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs/protocol.md").read_text()
DEVICE_SOURCES = "\n".join(p.read_text() for p in (ROOT / "src/fota/device").rglob("*.py"))


def _block(name):
    return DOC.split(f"<!-- {name}:begin -->")[1].split(f"<!-- {name}:end -->")[0]


def test_limits_table_names_the_protocol_constants():
    rows = re.findall(r"^\| [^|]+ \| `(\d+)` \| `([A-Z_]+)` \|$", _block("limits"), re.M)
    documented = {name: int(value) for value, name in rows}
    assert {"MIN_CHUNK_SIZE", "MAX_CHUNK_SIZE", "MAX_WINDOW", "MAX_ID", "MAX_COMMAND_BYTES"} <= set(documented)
    assert documented == {name: getattr(P, name) for name in documented}
    assert (P.MIN_CHUNK_SIZE, P.MAX_CHUNK_SIZE, P.MAX_WINDOW, P.MAX_ID) == (64, 8192, 32, 2**31 - 1)


def _req(**changes):
    req = {"job": 7, "first": 0, "count": 1, "chunk": 2048}
    req.update(changes)
    return json.dumps({k: v for k, v in req.items() if v is not ...}).encode()


@pytest.mark.parametrize("field, low, high", [
    ("job", 1, P.MAX_ID), ("first", 0, P.MAX_ID), ("count", 1, P.MAX_WINDOW),
    ("chunk", P.MIN_CHUNK_SIZE, P.MAX_CHUNK_SIZE)])
def test_chunk_requests_within_the_documented_limits_only(field, low, high):
    assert getattr(parse_request(_req(**{field: low})), field) == low
    assert getattr(parse_request(_req(**{field: high})), field) == high
    for bad in (low - 1, high + 1, True, "1", 1.0, None, ...):
        with pytest.raises(ValueError):
            parse_request(_req(**{field: bad}))


@pytest.mark.parametrize("field, low, high", [
    ("job", 1, P.MAX_ID), ("first", 0, P.MAX_ID), ("count", 1, P.MAX_WINDOW),
    ("chunk", P.MIN_CHUNK_SIZE, P.MAX_CHUNK_SIZE)])
def test_text_chunk_requests_within_the_same_limits_only(field, low, high):
    def text(**changes):
        req = {"job": 7, "first": 0, "count": 1, "chunk": 2048, **changes}
        return " ".join(str(req[k]) for k in ("job", "first", "count", "chunk")).encode()
    assert getattr(parse_request(text(**{field: low})), field) == low
    assert getattr(parse_request(text(**{field: high})), field) == high
    for bad in (low - 1, high + 1):
        with pytest.raises(ValueError):
            parse_request(text(**{field: bad}))
    for bad in (b"7 0 1", b"7 0 1 2048 5", b"7  0 1 2048", b" 7 0 1 2048", b"7 0 1 2048\n", b"7 0 +1 2048",
                b"7 0 01 2048", b"7,0,1,2048", b"7 0 1 2048.0"):
        with pytest.raises(ValueError):
            parse_request(bad)


def _status(**changes):
    msg = {"job": 7, "state": "downloading", "boot": 1, "seq": 1}
    msg.update(changes)
    return json.dumps({k: v for k, v in msg.items() if v is not ...}).encode()


@pytest.mark.parametrize("field", ["boot", "seq"])
def test_status_boot_and_seq_are_required_within_the_documented_range(field):
    for good in (0, 1, P.MAX_ID):
        assert parse_status(_status(**{field: good}))[field] == good
    for bad in (-1, P.MAX_ID + 1, True, "1", 1.5, None, ...):
        with pytest.raises(ValueError):
            parse_status(_status(**{field: bad}))


def test_status_state_required_and_optional_fields_typed():
    for state in list(P.STATES) + [P.REJECTED, P.KEYS_UPDATED, P.HEALTH]:
        assert parse_status(_status(state=state))["state"] == state
    for bad in ("bogus", None, ...):
        with pytest.raises(ValueError):
            parse_status(_status(state=bad))
    optional = {"job": 3, "code": "E_TIMEOUT", "reason": "r", "version": "1.0", "progress": 0.5,
                "bytes": 1, "total": 2}
    assert parse_status(_status(**optional))["total"] == 2
    for name in optional:  # absent or null is fine
        parse_status(_status(**{name: ...}))
        parse_status(_status(**{name: None}))
    for name, bad in (("job", P.MAX_ID + 1), ("job", -1), ("job", "3"), ("code", 1), ("reason", []),
                      ("version", 1), ("progress", "0.5"), ("bytes", 1.5), ("total", True)):
        with pytest.raises(ValueError):
            parse_status(_status(**{name: bad}))


@pytest.mark.parametrize("changes, refused", [
    ({"chunk": P.MIN_CHUNK_SIZE - 1}, True), ({"chunk": P.MIN_CHUNK_SIZE}, False),
    ({"chunk": P.MAX_CHUNK_SIZE}, False), ({"chunk": P.MAX_CHUNK_SIZE + 1}, True),
    ({"window": P.MAX_WINDOW}, False), ({"window": P.MAX_WINDOW + 1}, True)])
def test_device_takes_update_chunk_and_window_within_the_same_limits(changes, refused):
    h = Harness(SIGNING_KEY)
    body = make_update(SIGNING_KEY, b"x" * 100, job=3)
    body.update(changes)
    h.run(h.core.command(cmd(body)))
    last = h.statuses()[-1]
    assert (last["state"], last.get("code")) == (("rejected", P.E_BAD_COMMAND) if refused else ("downloading", None))


def _device_dir(tmp_path, **settings):
    from fota.tools.signing import public_key_bytes
    from test_core import ROOT_KEY
    return create_device_dir(tmp_path / "dev", device_id="doc-1", hardware="unix", root_key=public_key_bytes(ROOT_KEY),
                             trust=TRUST, host="127.0.0.1", port=1, password="pw",
                             app_files={"app.py": b"VERSION = '1.0.0'\n"}, version="1.0.0", **settings)


def test_provisioning_table_lists_every_config_field(tmp_path):
    rows = re.findall(r"^\| ((?:`\w+`(?:, )?)+) \|", _block("config"), re.M)
    documented = {name for row in rows for name in re.findall(r"`(\w+)`", row)}
    root = _device_dir(tmp_path, cadata=b"\x30\x00", server_hostname="broker.example", enc_key="00" * 32)
    config = json.loads((root / "config.json").read_text())
    assert set(config) <= documented, set(config) - documented
    broker_row = next(line for line in _block("config").splitlines() if line.startswith("| `broker` |"))
    assert all(f"`{key}`" in broker_row for key in config["broker"]), config["broker"]
    for key in list(documented) + ["attempts", "backoff_ms", "cadata", "server_hostname"]:
        # every documented field is one the device reads
        assert f'"{key}"' in DEVICE_SOURCES, key


def test_boot_counts_from_1_and_seq_starts_at_1_each_boot(tmp_path):
    """§10: `boot` is 1 at the first start and +1 at every start; `seq` starts again at 1."""
    root = str(_device_dir(tmp_path))
    for boot in (1, 2):
        device = Device(root, app_loader=lambda app_dir: None)
        device.boot()
        assert json.loads(Path(root, "agent.json").read_text())["boot"] == boot
        published = [json.loads(a[2]) for a in device.core.connected_(0)
                     if a[0] == C.A_PUBLISH and a[1] == P.STATUS]
        assert [(s["boot"], s["seq"]) for s in published] == [(boot, 1)]
