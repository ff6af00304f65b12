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
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

from fota.server.store import Store
from fota.testkit.databases import PG_ADMIN_URL, create_postgres_database

__all__ = ["db_url", "on_one_database", "postgres_database", "sqlite_url", "store", "PG_ADMIN_URL"]


def _skip_postgres() -> bool:
    return os.environ.get("FOTA_SKIP_POSTGRES") == "1"


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (fota.testkit.databases); yields its postgresql+psycopg://
    URL, drops it after."""
    try:
        url, drop = create_postgres_database("fota_test")
    except psycopg.OperationalError as exc:
        message = f"PostgreSQL unreachable at {PG_ADMIN_URL}: {exc}".strip()
        if _skip_postgres():
            pytest.skip(f"{message} (FOTA_SKIP_POSTGRES=1)")
        pytest.fail(f"{message}\n(set FOTA_SKIP_POSTGRES=1 to skip the PostgreSQL cases)", pytrace=False)
    try:
        yield url
    finally:
        drop()


DATABASES = {"sqlite": pytest.param("sqlite", id="sqlite"),
             "postgres": pytest.param("postgres", marks=pytest.mark.postgres, id="postgres")}


def on_one_database(first: str):
    """For an end-to-end test whose subject is not the database (the storage layer's tests run
    on both): db_url is `first` alone in the default run, both databases under FOTA_FULL=1
    (docs/testing.md, "What the default run samples")."""
    from conftest import sampled
    order = [first] + [name for name in DATABASES if name != first]
    return pytest.mark.parametrize("db_url", sampled([DATABASES[name] for name in order]), indirect=True)


@pytest.fixture(params=list(DATABASES.values()))
def db_url(request, tmp_path) -> Iterator[str]:
    """URL of a fresh, empty database: SQLite file or PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fota.db'}"
        return
    with postgres_database() as url:
        yield url


@pytest.fixture
def store(db_url) -> Iterator[Store]:
    """A Store on a fresh, empty database of each kind (db_url), disposed after the test."""
    s = Store(db_url)
    yield s
    s.dispose()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """URL of a fresh, empty SQLite file database."""
    return f"sqlite:///{tmp_path / 'fota.db'}"
