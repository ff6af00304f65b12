"""Database fixtures: every storage test runs on SQLite and on PostgreSQL.

``db_url`` is parametrized ["sqlite", "postgres"]:
  * sqlite   -> a fresh file in tmp_path;
  * postgres -> a fresh database ``fota_test_<hex>`` on 127.0.0.1:5432 (trust auth),
    dropped (WITH (FORCE)) afterwards. Marked ``postgres``.
If PostgreSQL is unreachable the postgres case FAILS, unless FOTA_SKIP_POSTGRES=1
(then it is skipped). FOTA_POSTGRES_ADMIN_URL overrides the admin connection.

``sqlite_url`` is the SQLite case alone, for tests that need only one backend.
"""
from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

__all__ = ["db_url", "postgres_database", "sqlite_url", "PG_ADMIN_URL"]

PG_ADMIN_URL = os.environ.get("FOTA_POSTGRES_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _skip_postgres() -> bool:
    return os.environ.get("FOTA_SKIP_POSTGRES") == "1"


def _admin_connection() -> psycopg.Connection:
    try:
        return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        message = f"PostgreSQL unreachable at {PG_ADMIN_URL}: {exc}".strip()
        if _skip_postgres():
            pytest.skip(f"{message} (FOTA_SKIP_POSTGRES=1)")
        pytest.fail(f"{message}\n(set FOTA_SKIP_POSTGRES=1 to skip the PostgreSQL cases)", pytrace=False)


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database; yields its postgresql+psycopg:// URL, drops it after."""
    name = f"fota_test_{secrets.token_hex(6)}"
    with _admin_connection() as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        with _admin_connection() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
                ids=["sqlite", "postgres"])
def db_url(request, tmp_path) -> Iterator[str]:
    """URL of a fresh, empty database: SQLite file or PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fota.db'}"
        return
    with postgres_database() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """URL of a fresh, empty SQLite file database."""
    return f"sqlite:///{tmp_path / 'fota.db'}"
