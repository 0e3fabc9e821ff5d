"""server/storage/ on SQLite and on PostgreSQL (a database of the test's own)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from server.storage import SCHEMA_VERSION, Invite, Session, Storage, StorageError, schema_version


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request, tmp_path):
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    store = Storage(url, str(tmp_path), threads=2)
    yield store
    store.close()


def test_schema_is_created_once_and_then_left_alone(storage):
    assert storage.upgrade() == 0
    assert storage.upgrade() == SCHEMA_VERSION
    with storage.engine.connect() as conn:
        assert conn.execute(sa.select(schema_version.c.version)).scalars().all() == [SCHEMA_VERSION]


def test_a_newer_schema_is_refused(storage):
    storage.upgrade()
    with storage.engine.begin() as conn:
        conn.execute(schema_version.update().values(version=SCHEMA_VERSION + 1))
    with pytest.raises(StorageError, match="newer than this mxisd understands"):
        storage.upgrade()


def test_tokens_are_stored_hashed(storage):
    storage.upgrade()
    storage.add_account("secret-token-value", "@a:example.org")
    assert storage.account_user("secret-token-value") == "@a:example.org"
    with storage.engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT token_hash FROM accounts")).scalar()
    assert "secret-token-value" not in stored
    assert storage.remove_account("secret-token-value") and storage.account_user("secret-token-value") is None


def test_bind_replaces_and_unbind_checks_the_owner(storage):
    storage.upgrade()
    assert storage.bind("email", "a@example.net", "@one:example.org", 1) == (None, 1)
    replaced, generation = storage.bind("email", "a@example.net", "@two:example.org", 2)
    assert replaced.mxid == "@one:example.org" and generation == 2
    assert storage.unbind("email", "a@example.net", "@one:example.org") is None
    assert [(b.address, b.mxid) for b in storage.all_bindings()] == [("a@example.net", "@two:example.org")]
    assert storage.unbind("email", "a@example.net", "@two:example.org") == 3
    assert storage.all_bindings() == [] and storage.counter("bindings") == 3


def test_a_second_session_for_the_same_3pid_and_secret_returns_the_first(storage):
    storage.upgrade()
    first = Session("sid1", "email", "a@example.net", "secret", "tok", -1, None, 0, 1, 1, None)
    assert storage.create_session(first) == first
    assert storage.create_session(Session(**{**first.__dict__, "sid": "sid2", "token": "other"})) == first
    assert storage.session("sid1", "wrong") is None
    assert storage.claim_token_attempt("sid1", most=2) == 1
    assert storage.claim_token_attempt("sid1", most=2) == 2
    assert storage.claim_token_attempt("sid1", most=2) is None  # the limit reached: nothing counted
    storage.return_token_attempt("sid1")
    assert storage.claim_token_attempt("sid1", most=2) == 2


def test_accepted_terms_accumulate(storage):
    storage.upgrade()
    storage.accept_terms("@a:example.org", ["u1"])
    storage.accept_terms("@a:example.org", ["u2", "u1"])
    assert storage.accepted_urls("@a:example.org") == {"u1", "u2"}


def test_an_unreachable_database_is_one_clear_error(tmp_path):
    store = Storage("postgresql://nobody@127.0.0.1:1/none", str(tmp_path))
    with pytest.raises(StorageError, match=r"cannot open the database postgresql\+psycopg://nobody@127.0.0.1:1/none"):
        store.upgrade()
    store.close()


def test_old_sessions_are_forgotten(storage):
    storage.upgrade()
    for sid, modified in (("old", 100), ("new", 200)):
        storage.create_session(Session(sid, "email", f"{sid}@example.net", "s", "t", 1, None, 0, 1, modified, None))
    assert storage.delete_sessions_before(150) == 1
    assert storage.session("old", "s") is None and storage.session("new", "s") is not None


def test_a_version_1_database_is_upgraded_keeping_its_invites(storage):
    storage.upgrade()
    with storage.engine.begin() as conn:  # back to what version 1 created
        conn.execute(sa.text("DROP TABLE onbind_deliveries"))
        conn.execute(sa.text("DROP TABLE counters"))
        conn.execute(sa.text("ALTER TABLE invites DROP COLUMN settled_at"))
        conn.execute(sa.text("ALTER TABLE invites DROP COLUMN known_mxid"))
        on_table = " ON invites" if storage.engine.dialect.name == "mysql" else ""
        conn.execute(sa.text(f"DROP INDEX invites_link_code{on_table}"))
        conn.execute(sa.text("ALTER TABLE invites DROP COLUMN link_code"))
        conn.execute(sa.text("INSERT INTO invites (token, medium, address, room_id, sender, ephemeral_public_key, "
                             "properties, created_at) VALUES ('t1', 'email', 'a@example.net', '!r:example.org', "
                             "'@s:example.org', 'key', '{}', 1)"))
        conn.execute(schema_version.update().values(version=1))
    assert storage.upgrade() == 1
    [invite] = storage.unsettled_invites("email", "a@example.net")
    assert (invite.token, invite.settled_at, invite.known_mxid, invite.link_code) == ("t1", None, None, None)
    assert storage.queue_deliveries([("email", "a@example.net"), ("email", "b@example.net")], "@a:example.org",
                                    5) == [("email", "a@example.net")]
    [delivery] = storage.claim_due_deliveries(5, 100)
    assert delivery.mxid == "@a:example.org" and storage.claim_due_deliveries(5, 100) == []


def test_a_delivery_can_be_queued_for_later(storage):
    storage.upgrade()
    storage.add_invite(Invite("t1", "email", "a@example.net", "!r:example.org", "@s:example.org", "key", {}, 1, None,
                              known_mxid="@a:example.org"))
    assert storage.queue_deliveries([("email", "a@example.net")], "@a:example.org", 10, 5) == [
        ("email", "a@example.net")]
    assert storage.next_delivery_at() == 15 and storage.claim_due_deliveries(14, 100) == []
    [delivery] = storage.claim_due_deliveries(15, 100)
    [invite] = storage.unsettled_invites("email", "a@example.net")
    assert delivery.mxid == invite.known_mxid == "@a:example.org"
