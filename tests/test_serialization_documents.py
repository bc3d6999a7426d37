"""Stored documents: migrations, exact types, required keys, encoder errors.

Review findings 6, 7 (encoders), 8, 11 and 12 of helper-26: a failing migration is a
CorruptSessionError naming the session, fields are not coerced, a missing key is not
filled with a default, and the version-0 migration keeps a user's own
``custom_fields["legacy"]``.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

import asyncsession as s
from asyncsession import _migrations
from asyncsession._models import replace_trusted
from asyncsession._serialization import dump_document, dump_message, session_from_document
from asyncsession.testing import ManualClock
from asyncsession.testing._contract import make_session


def document(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(s.dumps(make_session(messages=("hi",))))
    doc.update(changes)
    return doc


def v0(sid: str = "old-id", **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": 0,
        "id": sid,
        "status": "active",
        "created": "2025-01-01T00:00:00Z",
        "last_active": "2025-01-02T00:00:00Z",
        "first_message": "Test",
        "name": None,
        "file_count": 2,
        "message_count": 1,
    }
    doc.update(changes)
    return doc


def test_encoders_wrap_orjson_errors() -> None:
    # replace_trusted skips validation (stores and the manager only): if a value that
    # cannot be encoded ever gets in, the encoders still raise a SerializationError
    session = replace_trusted(make_session(), state=s.FrozenDict({"y": {1, 2}}))
    for hot in (True, False):
        with pytest.raises(s.SerializationError, match=str(session.id)):
            dump_document(session, hot=hot)
    message = s.Message("user", "x", session.created_at)
    object.__setattr__(message, "data", {1, 2})
    with pytest.raises(s.SerializationError):
        dump_message(message)


# -- migrations (findings 6, 11, 12) --------------------------------------------------


@pytest.mark.parametrize("custom", ["ab", 5, [["a", 1]], True])
def test_version_zero_custom_fields_must_be_an_object(custom: object) -> None:
    raw = orjson.dumps(v0(custom_fields=custom))
    with pytest.raises(s.CorruptSessionError, match="custom_fields"):
        s.loads(raw)
    sid = uuid.uuid4()
    with pytest.raises(s.CorruptSessionError) as info:
        session_from_document(orjson.loads(raw), session_id=sid)
    assert info.value.session_id == sid and str(sid) in str(info.value)


def test_version_zero_may_spell_created_as_created_at() -> None:
    """helper-186: refusing version-1 fields in version-0 documents must not refuse
    this spelling, which the migration has always read."""
    doc = v0()
    doc["created_at"] = doc.pop("created")
    assert s.loads(orjson.dumps(doc)).created_at == datetime(2025, 1, 1, tzinfo=timezone.utc)


def test_version_zero_without_custom_fields_or_with_null() -> None:
    for doc in (v0(), v0(custom_fields=None), v0(custom_fields={})):
        assert s.loads(orjson.dumps(doc)).state == {
            "legacy": {"id": "old-id", "message_count": 1, "file_count": 2}
        }


@pytest.fixture
def failing_migration() -> Iterator[None]:
    def broken(doc: dict[str, Any]) -> dict[str, Any]:
        return {"version": 1, "id": doc["no such key"]}

    original = _migrations.MIGRATIONS[0]
    _migrations.MIGRATIONS[0] = broken
    try:
        yield
    finally:
        _migrations.MIGRATIONS[0] = original


@pytest.mark.usefixtures("failing_migration")
def test_any_error_of_a_migration_is_corrupt_and_names_the_session() -> None:
    sid = uuid.uuid4()
    with pytest.raises(s.CorruptSessionError) as info:
        session_from_document(v0(), session_id=sid)
    assert info.value.session_id == sid and "KeyError" in str(info.value)
    with pytest.raises(s.CorruptSessionError):
        s.loads(orjson.dumps(v0()))


def test_migration_errors_name_the_session_the_caller_knows() -> None:
    sid = uuid.uuid4()
    for doc in (v0(sid=""), document(version="1"), document(version=-1)):
        with pytest.raises(s.CorruptSessionError) as info:
            session_from_document(doc, session_id=sid)
        assert info.value.session_id == sid and str(sid) in str(info.value)
    with pytest.raises(s.SchemaVersionError):  # passes through unchanged
        session_from_document(document(version=s.CURRENT_VERSION + 1), session_id=sid)


def test_version_zero_keeps_a_users_own_legacy_field() -> None:
    counters = {"id": "old-id", "message_count": 1, "file_count": 2}
    one = s.loads(orjson.dumps(v0(custom_fields={"legacy": "user value", "other": 1})))
    assert one.state == {"legacy": "user value", "other": 1, "_legacy": counters}
    two = s.loads(orjson.dumps(v0(custom_fields={"legacy": 1, "_legacy": 2})))
    assert two.state == {"legacy": 1, "_legacy": 2, "__legacy": counters}


@pytest.mark.parametrize("status", list(s.SessionStatus), ids=str)
def test_version_zero_terminal_sessions_closed_at_their_last_activity(
    status: s.SessionStatus,
) -> None:
    """Upgrade review (B): a version-0 document has no close time, and the migration left
    ``closed_at`` None for a terminal session, whose retention deadline then never came.
    Its last activity is when it closed (``created`` if it has none); open sessions stay
    open. ``expires_at`` stays None: the migration knows no policy."""
    session = s.loads(orjson.dumps(v0(status=status.value)))
    assert session.status is status and session.expires_at is None
    assert session.closed_at == (session.last_active if status.is_terminal else None)
    assert session.last_active == datetime(2025, 1, 2, tzinfo=timezone.utc)
    undated = v0(status=status.value)
    del undated["last_active"]
    session = s.loads(orjson.dumps(undated))
    assert session.closed_at == (session.created_at if status.is_terminal else None)


@pytest.mark.parametrize("field", ["messages", "state", "closed_at", "errors"])
def test_a_document_marked_version_zero_with_version_one_fields_is_corrupt(field: str) -> None:
    """helper-182: a current document whose version field reads 0 (one flipped bit) was
    "migrated": its messages and state were dropped without a word. Version 0 never had
    these fields, so such a document is damaged."""
    relabelled = document(version=0)
    with pytest.raises(s.CorruptSessionError, match="fields of version 1"):
        s.loads(orjson.dumps(relabelled))
    with pytest.raises(s.CorruptSessionError, match=field):
        s.loads(orjson.dumps(v0(**{field: document()[field]})))


def test_a_version_zero_name_this_version_refuses_moves_to_legacy() -> None:
    """helper-182: version 0 took any letter or digit in a name ("café-notes"); such a
    document was refused as corrupt (and a file store quarantined it). The session now
    has no name, and the old one is kept with the other version-0 fields."""
    session = s.loads(orjson.dumps(v0(name="café-notes")))
    assert session.name is None
    assert session.state["legacy"] == {
        "id": "old-id",
        "message_count": 1,
        "file_count": 2,
        "name": "café-notes",
    }
    assert s.loads(orjson.dumps(v0(name="notes-1"))).name == "notes-1"
    assert "name" not in s.loads(orjson.dumps(v0(name="notes-1"))).state["legacy"]


@pytest.mark.parametrize("owner", ["", "a" * 257, "tab\there", "line\nbreak"])
def test_a_version_zero_owner_this_version_refuses_moves_to_legacy(owner: str) -> None:
    """helper-204: version 0 checked no owner; a document with one this version refuses
    was corrupt (a file store quarantined it), though an equally refused name moved to
    the legacy fields. The owner now does the same."""
    session = s.loads(orjson.dumps(v0(owner=owner)))
    assert session.owner is None and session.state["legacy"]["owner"] == owner
    kept = s.loads(orjson.dumps(v0(owner="alice@example.com")))
    assert kept.owner == "alice@example.com" and "owner" not in kept.state["legacy"]
    with pytest.raises(s.CorruptSessionError):  # not text: ill-typed, as before
        s.loads(orjson.dumps(v0(owner=42)))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-01-01T10:00:00.123456789Z", 123456),  # chrono's RFC 3339 (seed 002)
        ("2025-01-01T10:00:00.1234567+00:00", 123456),
        ("2025-01-01T10:00:00.5Z", 500000),
        ("2025-01-01T10:00:00.12Z", 120000),
        ("2025-01-01T10:00:00Z", 0),
    ],
)
def test_times_with_any_number_of_fraction_digits_load(text: str, expected: int) -> None:
    """helper-182: on Python 3.10, fromisoformat takes 3 or 6 fraction digits only, so a
    version-0 document with nanoseconds was refused as corrupt. Every version now reads
    them as 3.11 does: truncated to microseconds."""
    session = s.loads(orjson.dumps(v0(created=text, last_active=text)))
    assert session.created_at == datetime(2025, 1, 1, 10, 0, 0, expected, tzinfo=timezone.utc)


@pytest.mark.anyio
async def test_a_version_zero_terminal_session_is_kept_until_deleted(
    anyio_backend: str, tmp_path: Path
) -> None:
    """A version-0 document of a closed session, read from a store as an older tool left
    it: closed at its last activity and without a deadline, so cleanup never removes it
    (the migration knows no retention); reads return it and ``delete()`` removes it."""
    directory = tmp_path / "files"
    (directory / "sessions").mkdir(parents=True)
    sid = uuid.uuid4()
    doc = v0(sid=str(sid), status="exited")
    (directory / "sessions" / f"{sid}.json").write_bytes(orjson.dumps(doc))
    clock = ManualClock(datetime(2030, 1, 1, tzinfo=timezone.utc))
    async with s.SessionManager(
        s.FileRepository(directory), retention=60, cleanup_interval=None, clock=clock
    ) as manager:
        session = await manager.get(sid)
        assert session.status is s.SessionStatus.EXITED and session.expires_at is None
        assert session.closed_at == session.last_active == datetime(2025, 1, 2, tzinfo=timezone.utc)
        assert session.duration == timedelta(days=1)
        assert await manager.purge_expired() == 0
        with pytest.raises(s.SessionClosed):
            await manager.add_message(sid, "user", "x")
        assert await manager.delete(sid) is True
        assert not await manager.exists(sid)


# -- no coercion, no silent defaults (finding 8) --------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("revision", 1.7),
        ("revision", True),
        ("revision", "3"),
        ("errors", "3"),
        ("errors", 2.0),
        ("owner", 123),
        ("owner", ["x"]),
        ("name", 42),
        ("name", False),
        ("id", 5),
        ("id", ["x"]),
        ("status", 1),
    ],
)
def test_ill_typed_fields_are_corrupt_not_coerced(field: str, value: object) -> None:
    with pytest.raises(s.CorruptSessionError):
        s.loads(orjson.dumps(document(**{field: value})))


@pytest.mark.parametrize(
    "key",
    [
        "id",
        "created_at",
        "last_active",
        "owner",
        "name",
        "status",
        "closed_at",
        "expires_at",
        "messages",
        "state",
        "errors",
        "revision",
    ],
)
def test_a_current_document_without_a_key_is_corrupt(key: str) -> None:
    doc = document()
    del doc[key]
    with pytest.raises(s.CorruptSessionError, match=repr(key)):
        s.loads(orjson.dumps(doc))
    if key != "messages":  # stores that keep the messages apart supply them
        sid = uuid.UUID(document()["id"]) if key != "id" else uuid.uuid4()
        with pytest.raises(s.CorruptSessionError) as info:
            session_from_document(doc, messages=s.MessageLog(), session_id=sid)
        assert info.value.session_id == sid


def test_well_typed_documents_still_load() -> None:
    session = make_session(messages=("hi",)).with_state(a=[1, {"b": None}])
    session = replace_trusted(session, owner="alice", name="n-1", revision=3, errors=2)
    assert s.loads(s.dumps(session)) == session
    doc = orjson.loads(s.dumps(session))
    del doc["messages"]
    assert session_from_document(doc, messages=session.messages) == session


@pytest.mark.anyio
async def test_sqlite_skips_a_row_whose_migration_fails(anyio_backend: str, tmp_path: Path) -> None:
    path = os.fspath(tmp_path / "x.db")
    async with s.SessionManager(s.SQLiteRepository(path), cleanup_interval=None) as manager:
        bad = await manager.create()
        good = await manager.create()
    with sqlite3.connect(path) as conn:
        raw = orjson.dumps(v0(sid=str(bad.id), custom_fields="ab"))
        conn.execute("UPDATE sessions SET doc = ? WHERE id = ?", (raw, str(bad.id)))
    conn.close()
    async with s.SessionManager(s.SQLiteRepository(path), cleanup_interval=None) as manager:
        with pytest.raises(s.CorruptSessionError) as info:
            await manager.get(bad.id)
        assert info.value.session_id == bad.id
        assert [x.id for x in (await manager.list()).items] == [good.id]
