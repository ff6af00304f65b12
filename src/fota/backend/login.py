"""Where the CLI finds its control center: the environment (FOTA_URL, FOTA_TOKEN, FOTA_CA) or the
login file `fota login` writes (0600: it holds a token), else the local home.

Precedence: FOTA_URL in the environment (remote); else an explicit --home or FOTA_HOME (local);
else the login file (remote); else the local home (./.fota).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fota.cli_common import fail

URL_ENV, TOKEN_ENV, CA_ENV = "FOTA_URL", "FOTA_TOKEN", "FOTA_CA"
API_PREFIX = "/api/v1"  # fota.server.api.API_PREFIX (not imported: that loads FastAPI)


@dataclass(frozen=True)
class Remote:
    url: str  # scheme://host[:port], no trailing slash, no API prefix
    token: str
    ca: Optional[str] = None  # PEM file of a private CA the server's certificate chains to
    source: str = "environment"


def login_file() -> Path:
    """$XDG_CONFIG_HOME/fota/login.json (default ~/.config/fota/login.json)."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "fota" / "login.json"


def normalize_url(url: str) -> str:
    """scheme://host[:port] from what an operator types (a trailing / or /api/v1 is dropped)."""
    url = url.strip().rstrip("/")
    if url.endswith(API_PREFIX):
        url = url[:-len(API_PREFIX)]
    if not url.startswith(("http://", "https://")):
        fail(f"the control center's URL must start with https:// (or http:// on a trusted network): {url!r}")
    return url


def remote_settings(home_given: bool) -> Optional[Remote]:
    """The remote control center to use, or None for local mode."""
    env = os.environ
    if env.get(URL_ENV):
        if not env.get(TOKEN_ENV):
            fail(f"{URL_ENV} is set but {TOKEN_ENV} is not: give the API token too (or 'fota login')")
        return Remote(normalize_url(env[URL_ENV]), env[TOKEN_ENV].strip(), env.get(CA_ENV) or None)
    if home_given:
        return None
    path = login_file()
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        remote = Remote(saved["url"], saved["token"], saved.get("ca"), source=str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"cannot read the login file {path}: {e} ('fota logout', then 'fota login URL')")
    # a CA given in the environment overrides the saved one
    return Remote(remote.url, remote.token, env.get(CA_ENV) or remote.ca, source=remote.source)


def save_login(remote: Remote) -> Path:
    from fota.tools.private import private_dir, write_private
    path = login_file()
    private_dir(path.parent)
    write_private(path, json.dumps({"url": remote.url, "token": remote.token, "ca": remote.ca}))
    return path


def forget_login() -> Optional[Path]:
    path = login_file()
    if not path.exists():
        return None
    path.unlink()
    return path
