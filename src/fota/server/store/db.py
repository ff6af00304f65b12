"""Engine, sessions and migrations of the control center's database.

SQLite (file, the default) or PostgreSQL (``postgresql+psycopg://``), by URL.
The schema is owned by Alembic: ``migrate(url)`` runs ``alembic upgrade head``
with the migrations shipped inside this package (no alembic.ini needed).
"""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from fota.tools.private import FILE_MODE, private_dir, tighten

__all__ = ["MIGRATIONS_DIR", "Store", "alembic_config", "default_url", "make_engine", "migrate", "normalize_url"]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 5000


def default_url(data_dir: Path) -> str:
    """The default database: SQLite file ``data_dir/fota.db``."""
    return f"sqlite:///{Path(data_dir).resolve() / 'fota.db'}"


def normalize_url(url: str | URL) -> str:
    """``postgres://`` and ``postgresql://`` -> ``postgresql+psycopg://`` (psycopg 3); others unchanged."""
    if isinstance(url, URL):
        url = url.render_as_string(hide_password=False)
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def _is_sqlite_memory(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _sqlite_on_connect(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def _private_sqlite_file(path: Path) -> None:
    """The database file readable by its owner only (0600; it holds wrapped keys, password
    hashes, the fleet): created so before SQLite opens it, tightened if it exists. SQLite gives
    its -wal, -shm and -journal files the database file's mode; those of an older, wider file
    are tightened too.

    An existing file is never opened here: closing any descriptor of the database file drops
    every POSIX lock this process holds on it, the shared lock of an open WAL connection
    included (sqlite.org/howtocorrupt.html §2.2). Another process closing its last connection
    then took itself for the last one and deleted the -wal and -shm files; this process kept
    reading the old ones and never saw another process's writes again (a second Store in
    `fota serve`, Home.kek(), made its control center ignore devices `fota simulate` provisioned)."""
    if not path.parent.exists():
        private_dir(path.parent)
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE))
    except FileExistsError:
        pass
    for file in [path] + [path.with_name(path.name + suffix) for suffix in SQLITE_SIDE_FILES]:
        tighten(file)


def make_engine(url: str | URL, **kwargs) -> Engine:
    """An engine for ``url``; for SQLite: WAL, busy_timeout 5 s, foreign keys on."""
    sa_url = make_url(normalize_url(url))
    options: dict = {"pool_pre_ping": True}
    if sa_url.get_backend_name() == "sqlite":
        connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
        if _is_sqlite_memory(sa_url):
            # one shared connection, otherwise every connection is a new empty database
            options["poolclass"] = StaticPool
        else:
            _private_sqlite_file(Path(sa_url.database).expanduser())
        options["connect_args"] = connect_args
    options.update(kwargs)
    engine = create_engine(sa_url, **options)
    if sa_url.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect)
    return engine


def alembic_config(url: str | URL) -> Config:
    """An Alembic Config for the packaged migrations (no ini file)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation: '%' (URL-encoded passwords) must be doubled
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


# PostgreSQL advisory lock key held while migrating (any constant; "fota" in ASCII)
MIGRATION_LOCK_KEY = 0x666F7461


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """One process migrates a SQLite file at a time: an flock on its directory (not on the file:
    closing a descriptor of the database file would drop SQLite's own locks, _private_sqlite_file).
    Commands started together on a new home (fota serve and fota simulate) both created the tables
    and one failed with "table ... already exists"."""
    url = engine.url
    if url.get_backend_name() != "sqlite" or _is_sqlite_memory(url):
        yield
        return
    fd = os.open(Path(url.database).expanduser().resolve().parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when closed (or the process dies)
        yield
    finally:
        os.close(fd)


def _upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate, one process at a time: the others wait and find the database current."""
    cfg = alembic_config(engine.url)
    with _migration_lock(engine), engine.begin() as connection:
        if engine.dialect.name == "postgresql":  # released with the migration's transaction
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


def migrate(url: str | URL, revision: str = "head") -> None:
    """``alembic upgrade head`` on the database at ``url`` (a no-op when already current)."""
    engine = make_engine(url)
    try:
        _upgrade(engine, revision)
    finally:
        engine.dispose()


class Store:
    """The database: ``Store(url)`` migrates it to head, then hands out sessions.

    >>> store = Store("sqlite:///data/fota.db")
    >>> with store.session() as s:      # commits on success, rolls back on exception
    ...     s.add(Device(id="dev-1"))
    >>> store.dispose()
    """

    def __init__(self, url: str | URL, migrate: bool = True, **engine_kwargs):
        self.url = normalize_url(url)
        self.engine: Engine = make_engine(self.url, **engine_kwargs)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if migrate:
            try:
                _upgrade(self.engine)
            except BaseException:
                self.engine.dispose()
                raise

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A Session in a transaction: committed when the block ends, rolled back on exception."""
        with self._sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def dispose(self) -> None:
        """Close all pooled connections."""
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.dispose()

    def __repr__(self) -> str:
        return f"Store({make_url(self.url).render_as_string(hide_password=True)!r})"
