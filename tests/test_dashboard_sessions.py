"""Dashboard sign-in sessions live in the database (SQLite and PostgreSQL): two API processes on
one database (two apps, each with its own Store) share them, a restart (a new app) keeps them;
sign-out, a revoked token and idle time end them on every process; the database holds no
secret; idle sessions are pruned and a token's sessions are capped."""
from __future__ import annotations

import hashlib
import re
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect, select, text, update

from fota.server.api import create_app
from fota.server.auth import create_token, revoke_token
from fota.server.dashboard import sessions
from fota.server.dashboard.sessions import COOKIE, IDLE_SECONDS, USED_RESOLUTION
from fota.server.store import Store, utcnow
from fota.server.store.models import DashboardSession
from fota.tools.signing import generate_private_key

KEY = generate_private_key()


class Processes:
    """`fota api` processes on one database: each app has its own Store (its own connections)."""

    def __init__(self, url, tmp_path):
        self.url = url
        self.blobs = tmp_path / "blobs"
        self.stores: list[Store] = []
        self.db = self.store()  # what a test reads and changes directly
        _, self.admin = create_token(self.db, "ops-admin", "admin")
        _, self.reader = create_token(self.db, "viewer", "read")

    def store(self) -> Store:
        self.stores.append(Store(self.url))
        return self.stores[-1]

    def client(self, base_url: str = "http://testserver") -> TestClient:
        """A client of a new API process (a new app on a new Store)."""
        return TestClient(create_app(self.store(), self.blobs, lambda: KEY), raise_server_exceptions=False,
                          follow_redirects=False, base_url=base_url)

    def close(self):
        for store in self.stores:
            store.dispose()


@pytest.fixture
def procs(db_url, tmp_path):
    p = Processes(db_url, tmp_path)
    yield p
    p.close()


def sign_in(client: TestClient, secret: str) -> str:
    """Signs in; returns the session cookie's value."""
    page = client.get("/ui/login")
    nonce = re.search(r'name="login_nonce" value="([^"]+)"', page.text).group(1)
    r = client.post("/ui/login", data={"token": secret, "login_nonce": nonce})
    assert r.status_code == 303, r.text
    return client.cookies[COOKIE]


def with_cookie(client: TestClient, sid: str) -> TestClient:
    """The same browser on another process (behind a load balancer): it sends the same cookie."""
    client.cookies.set(COOKIE, sid)
    return client


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def signed_in_page(client: TestClient, who: str) -> str:
    page = client.get("/ui/")
    assert page.status_code == 200 and who in page.text
    return page.text


def signed_out(client: TestClient) -> bool:
    r = client.get("/ui/")
    return r.status_code == 303 and r.headers["location"] == "/ui/login" \
        and client.get("/ui/events?view=fleet").status_code == 401


def rows(procs) -> list[DashboardSession]:
    with procs.db.session() as s:
        return list(s.scalars(select(DashboardSession)))


def set_used_at(procs, sid: str, ago: timedelta) -> None:
    with procs.db.session() as s:
        s.execute(update(DashboardSession).where(DashboardSession.id_hash == hashlib.sha256(sid.encode()).hexdigest())
                  .values(used_at=utcnow() - ago))


def test_a_session_opened_on_one_process_works_on_another_and_after_a_restart(procs):
    first = procs.client("https://testserver")
    sid = sign_in(first, procs.admin)
    csrf = csrf_of(signed_in_page(first, "ops-admin (admin)"))
    second = with_cookie(procs.client("https://testserver"), sid)
    page = signed_in_page(second, "ops-admin (admin)")
    assert csrf_of(page) == csrf  # one session, one CSRF token, whichever process answers
    # its state changes pass the CSRF check on the other process (409: no such deployment; not 403)
    assert second.post("/ui/deployments/7/cancel", data={"csrf": csrf}).status_code == 409
    for store in procs.stores[:-1]:
        store.dispose()  # every process stops; a new one starts on the same database
    restarted = with_cookie(procs.client("https://testserver"), sid)
    assert csrf_of(signed_in_page(restarted, "ops-admin (admin)")) == csrf


def test_the_cookie_keeps_its_attributes(procs):
    client = procs.client("https://testserver")
    page = client.get("/ui/login")
    nonce = re.search(r'name="login_nonce" value="([^"]+)"', page.text).group(1)
    r = client.post("/ui/login", data={"token": procs.reader, "login_nonce": nonce})
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith(COOKIE + "="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie and "Secure" in cookie


def test_signing_out_on_one_process_ends_the_session_on_the_other(procs):
    first = procs.client()
    sid = sign_in(first, procs.admin)
    second = with_cookie(procs.client(), sid)
    csrf = csrf_of(signed_in_page(second, "ops-admin (admin)"))
    r = second.post("/ui/logout", data={"csrf": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    assert signed_out(first)
    assert signed_out(with_cookie(procs.client(), sid))
    assert rows(procs) == []


def test_revoking_the_token_ends_its_sessions_on_every_process(procs):
    first = procs.client()
    sid = sign_in(first, procs.reader)
    second = with_cookie(procs.client(), sid)
    signed_in_page(second, "viewer (read)")
    admin = procs.client()
    sign_in(admin, procs.admin)
    revoke_token(procs.db, "viewer")
    assert signed_out(first) and signed_out(second)
    signed_in_page(admin, "ops-admin (admin)")  # another token's session goes on
    assert len(rows(procs)) == 1


def test_an_expired_token_ends_its_sessions(procs):
    _, secret = create_token(procs.db, "brief", "read", ttl_seconds=3600)
    first = procs.client()
    sid = sign_in(first, secret)
    signed_in_page(with_cookie(procs.client(), sid), "brief (read)")
    with procs.db.session() as s:
        s.execute(text("UPDATE api_tokens SET expires_at = :at WHERE name = 'brief'"),
                  {"at": utcnow() - timedelta(seconds=1)})
    assert signed_out(first)


def test_an_idle_session_ends_on_every_process(procs):
    first = procs.client()
    sid = sign_in(first, procs.admin)
    second = with_cookie(procs.client(), sid)
    set_used_at(procs, sid, timedelta(seconds=IDLE_SECONDS) - USED_RESOLUTION)
    signed_in_page(second, "ops-admin (admin)")  # used in time: it goes on, its last use written
    (row,) = rows(procs)
    assert utcnow() - row.used_at < USED_RESOLUTION
    set_used_at(procs, sid, timedelta(seconds=IDLE_SECONDS) + USED_RESOLUTION)
    assert signed_out(first) and signed_out(second)
    assert rows(procs) == []


def test_a_page_view_does_not_write_the_last_use_every_time(procs):
    client = procs.client()
    sid = sign_in(client, procs.reader)
    set_used_at(procs, sid, USED_RESOLUTION / 2)
    (before,) = rows(procs)
    signed_in_page(client, "viewer (read)")
    (after,) = rows(procs)
    assert after.used_at == before.used_at


def test_a_stale_csrf_token_is_refused_with_403_on_every_process(procs):
    first = procs.client()
    old_sid = sign_in(first, procs.admin)
    stale = csrf_of(signed_in_page(first, "ops-admin (admin)"))
    new_sid = sign_in(first, procs.admin)  # signing in again: a new session, a new CSRF token
    assert new_sid != old_sid
    second = with_cookie(procs.client(), new_sid)
    fresh = csrf_of(signed_in_page(second, "ops-admin (admin)"))
    assert fresh != stale
    for client in (first, second):
        r = client.post("/ui/deployments/1/cancel", data={"csrf": stale})
        assert r.status_code == 403 and "stale or missing CSRF token" in r.text
        assert client.post("/ui/logout", data={"csrf": stale}).status_code == 403
    assert signed_out(with_cookie(procs.client(), old_sid))  # the earlier session ended at the new sign-in
    signed_in_page(second, "ops-admin (admin)")


def test_the_database_holds_neither_the_session_id_nor_the_token_secret(procs):
    client = procs.client()
    sid = sign_in(client, procs.admin)
    signed_in_page(with_cookie(procs.client(), sid), "ops-admin (admin)")
    (row,) = rows(procs)
    assert row.id_hash == hashlib.sha256(sid.encode()).hexdigest()
    with procs.db.engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            for values in conn.execute(text(f"SELECT * FROM {table}")):
                dump = " ".join(str(v) for v in values)
                assert sid not in dump and procs.admin not in dump, table
                assert procs.admin.removeprefix("fota_") not in dump, table


def test_idle_sessions_are_pruned_and_a_token_keeps_a_bounded_number(procs, monkeypatch):
    monkeypatch.setattr(sessions, "MAX_PER_TOKEN", 3)
    old = procs.client()
    sign_in(old, procs.reader)
    set_used_at(procs, old.cookies[COOKIE], timedelta(seconds=IDLE_SECONDS) + USED_RESOLUTION)
    admins = [procs.client() for _ in range(3)]
    for i, client in enumerate(admins):
        sid = sign_in(client, procs.admin)
        set_used_at(procs, sid, timedelta(minutes=10 - i))  # admins[0] the least recently used
    # the idle session was pruned at a sign-in, not only when it came back
    assert len(rows(procs)) == 3 and len({r.token_id for r in rows(procs)}) == 1
    fourth = procs.client()
    sign_in(fourth, procs.admin)
    assert len(rows(procs)) == 3
    assert signed_out(admins[0])
    for client in admins[1:] + [fourth]:
        signed_in_page(client, "ops-admin (admin)")
