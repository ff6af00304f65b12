"""Schemathesis against the HTTP API's own OpenAPI schema, every check (bench/api_fuzz.py runs it
long on SQLite and PostgreSQL; tests/test_api_schema.py runs it sampled).

served_api: a fresh database with a little of everything (devices, a release, a deployment, a
draft campaign, an admin and a read token) and the API app (fota.server.api.create_app) on a
real uvicorn server on a free port. fuzz: ``schemathesis run`` on its /openapi.json with every
check (schemathesis 4 enables all 14 unless configured off; ``--checks all`` on the command line
would also override the one exception below), an admin token, and ``examples`` test cases per
operation in each phase (examples, coverage, fuzzing, stateful). The whole schema is tested:
endpoints added later are covered without a change here.

One rule is the project's, not schemathesis's default (SCHEMATHESIS_CONFIG): a schema-valid
request may be answered 400 besides the defaults (2xx, 401, 403, 404, 409, ...). The schema
states every rule of form (patterns, lengths, ranges); a 400 is a refusal that depends on the
stored data (no such release or device, hardware the release is not built for, a bad
campaign spec), which a schema cannot state. A schema-valid request answered 422 fails. And
``negative_data_rejection`` is off for the multipart upload (``POST /api/v1/releases``) alone:
see the comment in SCHEMATHESIS_CONFIG.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SCHEMATHESIS_CONFIG = """\
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "429", "5xx"]

# Multipart text parts carry no JSON type: a boolean that negative testing puts into `version`
# arrives as the text "false", a valid version, and schemathesis 4.32 cannot re-read a body that
# has a file part to see that. So this one check is off for the upload; its 422s for malformed
# fields are asserted in tests/test_api_schema.py (every other check still runs on it).
[[operations]]
include-path = "/api/v1/releases"
include-method = "POST"
checks.negative_data_rejection.enabled = false

# The seeded rows (served_api), mixed into generated values by parameter name, so that
# requests reach past "no such release / device / campaign" (any endpoint using these names)
[dictionaries.releases]
values = ["1.0.0", "1"]
[dictionaries.release_ids]
values = [1]
[dictionaries.devices]
values = ["dev-1", "dev-2"]
[dictionaries.names]
values = ["lab", "floor-2", "esp32", "unix"]
[dictionaries.campaigns]
values = ["spring", "1"]
[dictionaries.ids]
values = [1]

[parameters]
"path.version" = { dictionary = "releases", probability = 0.5 }
"path.device_id" = { dictionary = "devices", probability = 0.5 }
"path.ref" = { dictionary = "campaigns", probability = 0.5 }
"path.deployment_id" = { dictionary = "ids", probability = 0.5 }
"query.tag" = { dictionary = "names", probability = 0.5 }
"query.hardware" = { dictionary = "names", probability = 0.5 }
"body.release" = { dictionary = "releases", probability = 0.5 }
"body.devices[*]" = { dictionary = "devices", probability = 0.7 }
"body.hardware[*]" = { dictionary = "names", probability = 0.5 }
"""
ADMIN_TOKEN = "fuzz-admin"


@contextmanager
def served_api(url: str, workdir: Path) -> Iterator[tuple[str, str]]:
    """The API on a fresh store at ``url``, seeded, on a uvicorn server: (base url, admin secret)."""
    import uvicorn

    from fota.server.api import create_app
    from fota.server.auth import create_token
    from fota.server.broker import free_port
    from fota.server.campaigns import create_campaign
    from fota.server.deployments import create_deployment
    from fota.server.fleet import provision_device
    from fota.server.releases import create_release
    from fota.server.store import Store
    from fota.tools.bundle import pack_files
    from fota.tools.signing import generate_private_key

    key = generate_private_key()
    store = Store(url)
    blobs = workdir / "blobs"
    _, admin = create_token(store, ADMIN_TOKEN, "admin")
    create_token(store, "fuzz-read", "read")
    provision_device(store, "dev-1", "esp32", tags=["lab"])
    provision_device(store, "dev-2", "unix", tags=["lab", "floor-2"])
    release = create_release(store, blobs, key, pack_files({"app.py": b"VERSION = '1.0.0'\n"}), "1.0.0",
                             ["esp32", "unix"])
    create_deployment(store, release, device_ids=["dev-1"])
    create_campaign(store, "spring", release)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(store, blobs, lambda: key), host="127.0.0.1", port=port,
                                           log_level="critical", lifespan="off"))
    thread = threading.Thread(target=server.run, name="api-fuzz-uvicorn", daemon=True)
    # not a warning per refused token or malformed multipart header: schemathesis sends hundreds
    quiet = {name: logging.getLogger(name).level for name in ("fota.server.api", "python_multipart.multipart")}
    for name in quiet:
        logging.getLogger(name).setLevel(logging.ERROR)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the API server did not start on port {port}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", admin
    finally:
        server.should_exit = True
        thread.join(10)
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)
        store.dispose()


def fuzz(url: str, workdir: Path, examples: int, seed: int | None = None, log: Path | None = None) -> dict:
    """One schemathesis run with every check against the API on ``url``; a summary of its JSON report."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    report = workdir / "report.json"
    started = time.monotonic()
    with served_api(url, workdir) as (base, admin):
        cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color", "run",
               f"{base}/openapi.json", "--max-examples", str(examples), "--workers", "1",
               "--header", f"Authorization: Bearer {admin}", "--report", "json",
               "--report-json-path", str(report), "--report-dir", str(workdir)]
        if seed is not None:
            cmd += ["--seed", str(seed)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir,
                              env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false"})
    seconds = time.monotonic() - started
    output = proc.stdout + proc.stderr
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(output)
    result = {"examples": examples, "seconds": round(seconds, 1), "exit_code": proc.returncode,
              "output_tail": output[-6000:]}
    if not report.exists():
        return {**result, "ok": False, "error": "schemathesis wrote no report"}
    data = json.loads(report.read_text())
    failures = [{"code": f["code"], "title": f["title"], "count": f["count"], "operations": f["operations"]}
                for f in data["failures"]]
    cases = data["test_cases"]
    result.update(
        seed=data["seed"], operations=data["operations"]["tested"], generated=cases["generated"],
        failing_cases=cases["with_failures"], errored_cases=cases["errored"],
        server_errors=sum(f["count"] for f in failures if f["code"] == "ST101"),
        failures=failures, errors=data["errors"], phases={k: v["status"] for k, v in data["phases"].items()},
        warnings={k: v for k, v in data["warnings"].items() if v}, valid_rates=data["valid_rates"],
        ok=proc.returncode == 0 and not failures and not data["errors"] and data["complete"])
    return result
