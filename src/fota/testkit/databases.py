"""Throwaway databases for the tests and the benches: a SQLite file, or a fresh PostgreSQL
database on the server FOTA_POSTGRES_ADMIN_URL names (default: trust auth on 127.0.0.1:5432),
dropped (WITH (FORCE)) afterwards."""
from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

PG_ADMIN_URL = os.environ.get("FOTA_POSTGRES_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def create_postgres_database(prefix: str = "fota_test") -> tuple[str, Callable[[], None]]:
    """A fresh, empty PostgreSQL database `<prefix>_<hex>`: (its postgresql+psycopg:// URL, what
    drops it). psycopg.OperationalError when the server is unreachable."""
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{secrets.token_hex(6)}"

    def admin():
        return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)

    with admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop() -> None:
        with admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    url = make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=name)
    return url.render_as_string(hide_password=False), drop


def fresh_database(kind: str, sqlite_file: Path, prefix: str = "fota_bench") -> tuple[str, Callable[[], None]]:
    """(URL, what drops it) of a fresh database: "sqlite" (`sqlite_file`, left to its directory)
    or "postgres"."""
    if kind == "sqlite":
        return f"sqlite:///{sqlite_file}", lambda: None
    if kind != "postgres":
        raise ValueError(f"unknown database kind {kind!r} (sqlite or postgres)")
    return create_postgres_database(prefix)
