"""Models, JSON freezing, serialization and migration (no event loop needed)."""

from __future__ import annotations

import copy
import importlib
import pickle
import traceback
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import json_values, sessions

import asyncsession as s
from asyncsession._migrations import LEGACY_NAMESPACE
from asyncsession.testing import ManualClock

NOW = datetime(2026, 5, 1, tzinfo=timezone.utc)


def make(**kw: object) -> s.Session:
    return s.Session(uuid.uuid4(), NOW, NOW, **kw)  # type: ignore[arg-type]


PUBLIC_API = {
    "asyncsession": [
        "CURRENT_VERSION",
        "Clock",
        "CorruptSessionError",
        "Duration",
        "EventKind",
        "ExpiryPolicy",
        "FileRepository",
        "FrozenDict",
        "InvalidConfiguration",
        "InvalidCursor",
        "InvalidJSONValue",
        "InvalidOwner",
        "InvalidRole",
        "InvalidSessionId",
        "InvalidSessionName",
        "InvalidUpdate",
        "LimitExceeded",
        "ManagerNotRunning",
        "MemoryRepository",
        "Message",
        "MessageLog",
        "Page",
        "ROLES",
        "RedisRepository",
        "SQLiteRepository",
        "SchemaVersionError",
        "SerializationError",
        "Session",
        "SessionClosed",
        "SessionConflict",
        "SessionError",
        "SessionEvent",
        "SessionId",
        "SessionIdLogFilter",
        "SessionIterator",
        "SessionLocked",
        "SessionManager",
        "SessionNotFound",
        "SessionQuery",
        "SessionRepository",
        "SessionStats",
        "SessionStatus",
        "StorageError",
        "Subscription",
        "SystemClock",
        "UpdateFn",
        "ValidationError",
        "WrongTask",
        "WrongThread",
        "current_session_id",
        "dumps",
        "loads",
        "repository_from_url",
        "thaw",
    ],
    "asyncsession.abc": [
        "EventTransport",
        "Page",
        "RemoteEvent",
        "SessionQuery",
        "SessionRepository",
        "decode_cursor",
        "encode_cursor",
        "log_skipped",
    ],
    "asyncsession.asgi": ["SessionDict", "SessionMiddleware", "get_session"],
    "asyncsession.pytest_plugin": [
        "session_clock",
        "session_manager",
        "session_manager_options",
        "session_repository",
    ],
    "asyncsession.reporting": [
        "HealthBucket",
        "JsonLinesReporter",
        "LoggingReporter",
        "Reporter",
        "SessionReport",
        "aggregate",
        "read_reports",
    ],
    "asyncsession.testing": ["ManualClock", "RepositoryContract"],
    "asyncsession.stores.files": ["FileRepository", "LockTimeout"],
    "asyncsession.stores.memory": ["MemoryRepository"],
    "asyncsession.stores.redis": ["RedisEvent", "RedisRepository"],
    "asyncsession.stores.sqlite": [
        "CHUNK_MESSAGES",
        "SCHEMA_VERSION",
        "SQLiteRepository",
        "SQLiteStatistics",
        "WAL_AUTOCHECKPOINT",
    ],
}


def test_public_api_is_pinned() -> None:
    """The package exports exactly its public names, in sorted order; every public
    module's ``__all__`` is pinned and names only what the module defines."""
    public = sorted(
        n for n, v in vars(s).items() if not n.startswith("_") and not isinstance(v, ModuleType)
    )
    assert public == sorted(s.__all__)
    assert s.__all__ == sorted(s.__all__)
    for name, expected in PUBLIC_API.items():
        module = importlib.import_module(name)
        assert sorted(module.__all__) == expected, name
        assert set(module.__all__) <= set(vars(module)), name


def test_error_tree_and_recoverable_flags() -> None:
    sid = uuid.uuid4()
    for exc in (
        s.SessionNotFound(sid),
        s.SessionClosed(sid, s.SessionStatus.EXITED),
        s.SessionConflict(sid, expected_revision=1, actual_revision=2),
        s.InvalidSessionName("a b"),
        s.InvalidJSONValue("state", "bad"),
        s.SchemaVersionError(9, 1),
        s.CorruptSessionError("truncated"),
        s.StorageError("disk full", recoverable=True),
    ):
        assert isinstance(exc, s.SessionError)
        assert exc.message and str(exc) == exc.message
    assert s.SessionConflict(sid).recoverable
    assert not s.SessionNotFound(sid).recoverable
    assert s.StorageError("x", recoverable=True).recoverable
    assert not s.StorageError("x").recoverable
    assert isinstance(s.InvalidSessionName("x y"), ValueError)
    assert isinstance(s.SchemaVersionError(2, 1), s.SerializationError)
    assert "Upgrade asyncsession" in str(s.SchemaVersionError(2, 1))
    from asyncsession.stores.files import LockTimeout

    locked = LockTimeout(sid, "/x/locks/a.lock", 10)
    assert isinstance(locked, s.SessionLocked) and isinstance(locked, s.StorageError)
    assert locked.recoverable and locked.session_id == sid
    assert s.SessionLocked("busy", session_id=sid).recoverable


def test_errors_are_named_as_users_import_them() -> None:
    # A traceback's last line names the exception; asyncsession._exceptions.X invited
    # imports from a private module.
    errors = [getattr(s, n) for n in s.__all__ if isinstance(getattr(s, n), type)]
    errors = [e for e in errors if issubclass(e, BaseException)]
    assert len(errors) == 22 and s.SessionError in errors
    for error in errors:
        assert error.__module__ == "asyncsession", error
    sid = uuid.uuid4()
    (line,) = traceback.format_exception_only(s.SessionNotFound(sid))
    assert line.startswith(f"asyncsession.SessionNotFound: Session {sid} was not found")
    conflict = pickle.loads(
        pickle.dumps(s.SessionConflict(sid, expected_revision=1, actual_revision=2))
    )
    assert type(conflict) is s.SessionConflict and str(conflict).startswith(f"Session {sid}")


# -- immutability and structure sharing -------------------------------------------------


def _set_existing(d: dict[str, Any]) -> None:
    d["a"] = 1


def _set_new(d: dict[str, Any]) -> None:
    d["new"] = 1


def _delete(d: dict[str, Any]) -> None:
    del d["a"]


def _merge_in_place(d: dict[str, Any]) -> None:
    d |= {"new": 1}


# Every way to change a dict, each called as a plain dict accepts it (checked below), so
# that the TypeError can only come from the state being read-only.
DICT_MUTATIONS: list[Callable[[dict[str, Any]], object]] = [
    _set_existing,
    _set_new,
    _delete,
    _merge_in_place,
    lambda d: d.clear(),
    lambda d: d.pop("a"),
    lambda d: d.pop("missing", None),
    lambda d: d.popitem(),
    lambda d: d.setdefault("a", 1),
    lambda d: d.setdefault("new", 1),
    lambda d: d.update(a=1),
    lambda d: d.update({"new": 1}),
    lambda d: d.__init__({"new": 1}),  # type: ignore[misc]
]


def test_state_is_deeply_read_only_and_copied_on_the_way_in() -> None:
    source = {"a": [1, {"a": 2}]}
    session = make(state=source)
    source["a"].append(3)  # type: ignore[attr-defined]
    expected = {"a": (1, {"a": 2})}
    assert session.state == expected
    nested = session.state["a"][1]
    assert isinstance(nested, s.FrozenDict)
    for mutate in DICT_MUTATIONS:
        for frozen in (session.state, nested):
            plain = dict(frozen)
            mutate(plain)  # a valid call: a plain dict takes it
            with pytest.raises(TypeError, match="Session state and message data are read-only"):
                mutate(frozen)
        assert session.state == expected
        assert session.state["a"][1] is nested and nested == {"a": 2}
    assert isinstance(session.state["a"], tuple)  # lists are frozen to tuples
    with pytest.raises(TypeError):
        session.state["a"][0] = 2
    assert copy.deepcopy(session.state) is session.state
    assert s.FrozenDict({"x": 1}) == {"x": 1}
    assert hash(s.FrozenDict({"x": 1})) == hash(s.FrozenDict({"x": 1}))


def test_message_log_appends_share_storage_and_never_change_old_views() -> None:
    base = make()
    one = base.with_message("user", "one", timestamp=NOW)
    two = one.with_message("assistant", "two", timestamp=NOW)
    fork = one.with_message("user", "fork", timestamp=NOW)  # appending to an older view
    assert [m.content for m in one.messages] == ["one"]
    assert [m.content for m in two.messages] == ["one", "two"]
    assert [m.content for m in fork.messages] == ["one", "fork"]
    assert two.messages._items is one.messages._items  # shared, not copied
    assert two.messages.added_since(one.messages) == (two.messages[1],)
    assert fork.messages.added_since(two.messages) is None
    tail = two.messages.tail(1)
    assert list(tail) == [two.messages[1]] and tail.offset == 1 and tail.total == 2
    assert not tail.is_complete
    assert list(reversed(two.messages)) == [two.messages[1], two.messages[0]]
    assert two.messages[-1].content == "two" and two.messages[0:1] == (two.messages[0],)
    with pytest.raises(IndexError):
        two.messages[2]


class _RacingList(list):  # type: ignore[type-arg]
    """Storage whose next append lets another thread's append land first."""

    def __init__(self, items: list[s.Message], intruder: s.Message) -> None:
        super().__init__(items)
        self.intruder: s.Message | None = intruder

    def append(self, item: object) -> None:
        if self.intruder is not None:
            intruder, self.intruder = self.intruder, None
            super().append(intruder)
        super().append(item)


def test_an_index_past_a_window_says_it_is_a_window() -> None:
    # helper-208: a list item's messages (a window of none) raised a bare "message index
    # out of range" for messages[-1], which the session does have.
    message = s.Message("user", "x", datetime(2026, 1, 1, tzinfo=timezone.utc), None)
    window = s.MessageLog([message], offset=3)
    for index in (-2, 1):
        with pytest.raises(IndexError, match="a window of 1 of the session's 4 messages"):
            window[index]
    assert window[-1] == window[0] == message
    with pytest.raises(IndexError, match=r"^message index out of range$"):
        s.MessageLog([message])[1]  # the whole history: nothing more to say


def test_message_log_append_forks_when_another_append_won_the_position() -> None:
    first = s.Message("user", "one", NOW)
    theirs = s.Message("assistant", "theirs", NOW)
    ours = s.Message("assistant", "ours", NOW)
    storage = _RacingList([first], intruder=theirs)
    log = s.MessageLog._view(storage, 0, 1, 0)
    appended = log.append(ours)  # passes the length check, then loses position 1
    assert list(appended) == [first, ours]
    assert appended._items is not storage  # forked instead of sharing the wrong slot
    assert list(log) == [first]


def test_session_helpers() -> None:
    session = make(state={"a": 1, "b": 2})
    assert session.with_state(c=3).state == {"a": 1, "b": 2, "c": 3}
    assert session.with_state({"a": 9}).state["a"] == 9
    assert session.without_state("a", "zz").state == {"b": 2}
    assert session.with_name("new-name").name == "new-name"
    with pytest.raises(s.InvalidSessionName):
        session.with_name("no spaces")
    assert not session.is_closed and session.duration == timedelta(0)
    with pytest.raises(s.InvalidRole):
        session.with_message("robot", "beep")
    with pytest.raises(s.InvalidConfiguration):
        s.Message("user", "naive", datetime(2026, 1, 1))
    eastern = datetime(2026, 1, 1, 5, tzinfo=timezone(timedelta(hours=5)))
    assert s.Message("user", "x", eastern).timestamp == datetime(2026, 1, 1, tzinfo=timezone.utc)


def test_expiry_policy() -> None:
    policy = s.ExpiryPolicy(
        idle_timeout=timedelta(minutes=30),
        max_age=timedelta(hours=1),
        retention=timedelta(days=1),
    )
    active = s.SessionStatus.ACTIVE
    assert policy.deadline(active, NOW, NOW, None) == NOW + timedelta(minutes=30)
    late = NOW + timedelta(minutes=50)
    assert policy.deadline(active, NOW, late, None) == NOW + timedelta(hours=1)
    assert policy.deadline(s.SessionStatus.ARCHIVED, NOW, late, None) == NOW + timedelta(hours=1)
    assert policy.deadline(s.SessionStatus.EXITED, NOW, NOW, late) == late + timedelta(days=1)
    assert s.ExpiryPolicy().deadline(active, NOW, NOW, None) is None


def test_activity_deadline() -> None:
    """What a store computes on each write and touch: the new deadline counts from the
    activity, unless the deadline from the stored last_active has passed (a shortened
    idle_timeout), which is then returned as the one passed too."""
    policy = s.ExpiryPolicy(idle_timeout=timedelta(minutes=30), max_age=timedelta(hours=2))
    active = s.SessionStatus.ACTIVE
    at = NOW + timedelta(minutes=20)
    assert policy.activity_deadline(active, NOW, NOW, at) == (at + timedelta(minutes=30), None)
    assert policy.activity_deadline(active, NOW, NOW, at, moves=False) == (
        NOW + timedelta(minutes=30),
        None,
    )
    late = NOW + timedelta(minutes=30)  # the deadline from the stored last_active: passed
    assert policy.activity_deadline(active, NOW, NOW, late) == (late, late)
    archived = s.SessionStatus.ARCHIVED  # no idle limit: max_age only
    assert policy.activity_deadline(archived, NOW, NOW, late) == (
        NOW + timedelta(hours=2),
        None,
    )
    assert s.ExpiryPolicy().activity_deadline(active, NOW, NOW, late) == (None, None)


def test_manual_clock() -> None:
    clock = ManualClock(NOW)
    assert clock.now() == NOW
    clock.advance(timedelta(seconds=5))
    clock.advance(2.5)
    assert clock.now() == NOW + timedelta(seconds=7.5)
    with pytest.raises(s.InvalidConfiguration):
        clock.advance(-1)
    clock.jump_to(NOW + timedelta(hours=1))
    assert clock.now() == NOW + timedelta(hours=1)
    with pytest.raises(s.InvalidConfiguration):
        ManualClock(datetime(2026, 1, 1))


# -- serialization ------------------------------------------------------------------


@given(sessions())
def test_round_trip(session: s.Session) -> None:
    data = s.dumps(session)
    assert isinstance(data, bytes)
    assert s.loads(data) == session
    assert orjson.loads(data)["version"] == s.CURRENT_VERSION


@given(sessions())
def test_fast_document_encoding_matches_the_converter(session: s.Session) -> None:
    from asyncsession._serialization import dump_document, session_to_document

    doc = session_to_document(session, messages=False)
    assert dump_document(session) == orjson.dumps(doc)
    for hot in ("last_active", "expires_at", "revision"):
        del doc[hot]
    assert dump_document(session, hot=False) == orjson.dumps(doc)


@given(json_values)
def test_any_json_value_is_accepted_frozen_and_round_trips(value: object) -> None:
    session = make(state={"v": value})
    assert s.loads(s.dumps(session)).state == session.state


def test_every_error_survives_pickling() -> None:
    sid = uuid.uuid4()
    errors: list[s.SessionError] = [
        s.SessionError("plain", recoverable=True),
        s.SessionNotFound(sid),
        s.SessionClosed(sid, s.SessionStatus.EXITED),
        s.SessionConflict(sid, attempts=3),
        s.ManagerNotRunning(),
        s.ManagerNotRunning(waited_for_lock=True),
        s.WrongTask("This SessionManager"),
        s.WrongTask("bind() of session x", detail="left by another task"),
        s.WrongThread("This SessionManager"),
        s.InvalidSessionName("bad name"),
        s.InvalidOwner(""),
        s.InvalidJSONValue("state.x", "not JSON"),
        s.InvalidRole("robot", s.ROLES),
        s.LimitExceeded("Messages", 10, 11),
        s.InvalidCursor("zz"),
        s.InvalidConfiguration("bad option"),
        s.SchemaVersionError(99, 2),
        s.CorruptSessionError("truncated", session_id=sid),
        s.StorageError("disk full", recoverable=True),
    ]
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error)
        assert copy.message == error.message and copy.args == error.args
        assert copy.__dict__ == error.__dict__ and copy.recoverable == error.recoverable


def test_document_is_plain_json_and_never_pickle() -> None:
    session = make(owner="alice", name="n", state={"k": [1]}).with_message(
        "user", "hi", timestamp=NOW
    )
    doc = orjson.loads(s.dumps(session))
    assert doc["id"] == str(session.id) and doc["status"] == "active"
    assert doc["created_at"] == "2026-05-01T00:00:00+00:00"
    assert doc["messages"] == [
        {"role": "user", "content": "hi", "timestamp": "2026-05-01T00:00:00+00:00", "data": None}
    ]
    with pytest.raises(s.CorruptSessionError):
        s.loads(pickle.dumps(session.state))


def test_version_zero_document_migrates() -> None:
    legacy = b"""{
        "version": 0,
        "id": "test",
        "status": "active",
        "created": "2025-01-01T00:00:00Z",
        "last_active": "2025-01-02T00:00:00Z",
        "first_message": "Test",
        "name": null,
        "file_count": 2,
        "message_count": 1
    }"""
    session = s.loads(legacy)
    assert session.id == uuid.uuid5(LEGACY_NAMESPACE, "test")
    assert session.created_at == datetime(2025, 1, 1, tzinfo=timezone.utc)
    assert session.last_active == datetime(2025, 1, 2, tzinfo=timezone.utc)
    assert [(m.role, m.content) for m in session.messages] == [("user", "Test")]
    assert session.state == {"legacy": {"id": "test", "message_count": 1, "file_count": 2}}
    assert session.status is s.SessionStatus.ACTIVE and session.revision == 0
    assert s.loads(s.dumps(session)) == session  # re-saved at the current version
    archived = orjson.loads(legacy)
    archived.update(status="archived", name="my-feature", custom_fields={"team": "x"})
    migrated = s.loads(orjson.dumps(archived))
    assert migrated.status is s.SessionStatus.ARCHIVED and migrated.name == "my-feature"
    assert migrated.state["team"] == "x"


def test_newer_version_is_refused() -> None:
    doc = orjson.loads(s.dumps(make()))
    doc["version"] = s.CURRENT_VERSION + 1
    with pytest.raises(s.SchemaVersionError) as info:
        s.loads(orjson.dumps(doc))
    assert info.value.version == s.CURRENT_VERSION + 1
    assert info.value.session_id is None
    # a store reading a known session names it, so the operator can find the document
    from asyncsession._serialization import session_from_document

    sid = uuid.uuid4()
    with pytest.raises(s.SchemaVersionError) as info:
        session_from_document(doc, session_id=sid)
    assert info.value.session_id == sid and str(sid) in str(info.value)
    assert pickle.loads(pickle.dumps(info.value)).session_id == sid


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\xff",
        b"null",
        b"[1, 2]",
        b'"text"',
        b"{}",
        b'{"version": "1"}',
        b'{"version": 1, "id": "x"}',
        b'{"version": -1}',
    ],
)
def test_garbage_is_corrupt(data: bytes) -> None:
    with pytest.raises(s.CorruptSessionError):
        s.loads(data)


@given(sessions(), st.data())
def test_truncated_or_flipped_documents_are_corrupt_or_equal(
    session: s.Session, data: st.DataObject
) -> None:
    raw = s.dumps(session)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(s.CorruptSessionError):
        s.loads(raw[:cut])
    index = data.draw(st.integers(0, len(raw) - 1))
    flipped = bytearray(raw)
    flipped[index] ^= data.draw(st.integers(1, 255))
    try:
        loaded = s.loads(bytes(flipped))
    except s.SerializationError:
        return
    assert isinstance(loaded, s.Session)  # a flip may still be valid data; never a crash


def test_bad_field_values_are_corrupt() -> None:
    doc = orjson.loads(s.dumps(make()))
    for field, value in [
        ("name", "bad name"),
        ("status", "zombie"),
        ("revision", -1),
        ("created_at", "yesterday"),
        ("state", [1]),
        ("messages", {}),
    ]:
        broken = dict(doc, **{field: value})
        with pytest.raises(s.CorruptSessionError):
            s.loads(orjson.dumps(broken))


def test_evolve_revalidates() -> None:
    session = make()
    with pytest.raises(s.InvalidJSONValue):
        attrs.evolve(session, state={"x": {1, 2}})


def test_repository_from_url(tmp_path: Path) -> None:
    relative = s.repository_from_url("sqlite:///rel.db")
    assert isinstance(relative, s.SQLiteRepository) and str(relative.path).endswith("rel.db")
    absolute = s.repository_from_url(f"sqlite:///{tmp_path / 'x.db'}")
    assert isinstance(absolute, s.SQLiteRepository)
    assert str(absolute.path) == str(tmp_path / "x.db")
    assert isinstance(s.repository_from_url(f"file://{tmp_path}"), s.FileRepository)
    assert isinstance(s.repository_from_url("memory://"), s.MemoryRepository)
    redis = s.repository_from_url("redis://127.0.0.1:1/0?prefix=app:")
    assert isinstance(redis, s.RedisRepository) and redis.prefix == "app:"
    for bad in (
        "",
        "chat.db",
        "sqlite://",
        "sqlite://rel.db",
        "file://dir",
        "memory://x",
        "ftp://host/x",
        "file:///",
    ):
        with pytest.raises(s.InvalidConfiguration, match="store URL"):
            s.repository_from_url(bad)
