"""Error messages name where a rejected value is and its type, never the value itself.

Apps log these errors (the ASGI middleware logs a failed save at ERROR, with the
traceback), so a rejected state value, message content or owner copied into a message
ends up in logs and error trackers (privacy review: an e-mail address and a birth date in
a dataclass's repr, card numbers in a set, bytes or a big int, owners' e-mail addresses).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pickle
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

import asyncsession as s
from asyncsession.stores.sqlite import SQLiteRepository

SECRET = "4111-1111-1111-1111"
EMAIL = "alice@example.com"
BIG = 41111111111111111111111111  # 26 digits: over 64 bits
NOW = datetime(2024, 1, 2, tzinfo=timezone.utc)


@dataclasses.dataclass
class User:
    email: str
    dob: str


def assert_private(error: BaseException, *secrets: str) -> str:
    """``str(error)`` (and its pickled copy's) holds none of ``secrets``; returns it."""
    text = str(error)
    for secret in secrets:
        assert secret not in text, text
        assert secret not in str(pickle.loads(pickle.dumps(error))), text
    return text


@pytest.fixture
async def sessions(anyio_backend: str) -> AsyncIterator[s.SessionManager]:
    async with s.SessionManager(s.MemoryRepository(), cleanup_interval=None) as manager:
        yield manager


# -- state and message data: path and type, not the value ---------------------------------

STATE_CASES: list[tuple[str, dict[str, Any], tuple[str, ...], tuple[str, ...]]] = [
    # label, set_state keywords, what must not show, what must show
    (
        "object with a secret in its repr",
        {"prefs": {"user": User(EMAIL, "1980-01-02")}},
        (EMAIL, "1980-01-02"),
        ("state['prefs']['user']", "User", "dataclasses.asdict"),
    ),
    ("set", {"card": {SECRET}}, (SECRET,), ("state['card']", "a set of 1 item", "list")),
    ("frozenset", {"card": frozenset({SECRET})}, (SECRET,), ("frozenset", "list")),
    ("bytes", {"card": SECRET.encode()}, (SECRET,), ("state['card']", "19 bytes", "decode")),
    ("bytearray", {"card": bytearray(SECRET.encode())}, (SECRET,), ("bytearray",)),
    ("int over 64 bits", {"card": BIG}, (str(BIG),), ("state['card']", "26 digits", "str(")),
    ("negative int over 64 bits", {"n": -BIG}, (str(BIG),), ("26 digits", "64 bits")),
    (
        "int key",
        {"cards": {4111111111111111: "x"}},
        ("4111111111111111",),
        ("state['cards']", "key of type int", "str(key)"),
    ),
    (
        "date",
        {"dob": datetime(1980, 1, 2, tzinfo=timezone.utc).date()},
        ("1980",),
        ("state['dob']", "date", "isoformat()"),
    ),
    ("lone surrogate", {"card": f"{SECRET} \ud800"}, (SECRET,), ("state['card']", "surrogate")),
    ("in a list", {"cards": ["ok", {SECRET}]}, (SECRET,), ("state['cards'][1]", "set")),
]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("label", "state", "hidden", "shown"), STATE_CASES, ids=[c[0] for c in STATE_CASES]
)
async def test_a_refused_state_value_is_not_in_the_message(
    sessions: s.SessionManager,
    label: str,
    state: dict[str, Any],
    hidden: tuple[str, ...],
    shown: tuple[str, ...],
) -> None:
    session = await sessions.create()
    with pytest.raises(s.InvalidJSONValue) as info:
        await sessions.set_state(session.id, **state)
    text = assert_private(info.value, *hidden)
    for part in shown:
        assert part in text, text
    assert "must be JSON values" in text
    with pytest.raises(s.InvalidJSONValue) as info:
        await sessions.create(state=state)
    assert_private(info.value, *hidden)
    assert (await sessions.get(session.id, touch=False)).state == {}


@pytest.mark.anyio
async def test_refused_message_data_and_content_are_not_in_the_message(
    sessions: s.SessionManager,
) -> None:
    session = await sessions.create()
    with pytest.raises(s.InvalidJSONValue) as info:
        await sessions.add_message(session.id, "user", "x", data={"ssn": {SECRET}})
    assert "data['ssn']: a set" in assert_private(info.value, SECRET)
    with pytest.raises(s.InvalidJSONValue) as info:
        await sessions.add_message(session.id, "user", f"{SECRET}\ud800")
    assert str(info.value).startswith("content: ")
    assert_private(info.value, SECRET)
    # role and content swapped: the content is not echoed as a role
    with pytest.raises(s.InvalidRole) as role_info:
        await sessions.add_message(session.id, f"my card is {SECRET}", "user")
    assert "use one of" in assert_private(role_info.value, SECRET)
    with pytest.raises(s.InvalidRole) as role_info:
        await sessions.add_message(session.id, "wizard", "x")
    assert "a str of 6 characters is not a known role" in assert_private(role_info.value, "wizard")
    for messages in (f"my card is {SECRET}", SECRET.encode(), [("user", SECRET, None, 1)]):
        with pytest.raises(s.InvalidUpdate) as update_info:
            await sessions.add_messages(session.id, messages)  # type: ignore[arg-type]
        assert_private(update_info.value, SECRET)
    assert (await sessions.get(session.id, touch=False)).messages.total == 0


# -- owners, names, searches ------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("owner", "shown"),
    [
        (f"{EMAIL}\n", ("18 characters", "not printable", "index 17", "U+000A")),
        (EMAIL * 20, ("340 characters", "256")),
        (EMAIL.encode(), ("bytes", "str")),
        ("", ("empty",)),
    ],
    ids=["control character", "too long", "bytes", "empty"],
)
async def test_an_invalid_owner_is_not_in_the_message(
    sessions: s.SessionManager, owner: Any, shown: tuple[str, ...]
) -> None:
    with pytest.raises(s.InvalidOwner) as info:
        await sessions.create(owner=owner)
    text = assert_private(info.value, EMAIL) if owner else str(info.value)
    for part in (*shown, "at most 256 printable characters"):
        assert part in text, text
    assert info.value.owner == owner  # the program can still look at it
    with pytest.raises(s.InvalidOwner) as info:
        s.Session(uuid.uuid4(), NOW, NOW, owner=owner)
    assert_private(info.value, EMAIL)


@pytest.mark.anyio
async def test_an_invalid_name_or_search_is_not_in_the_message(
    sessions: s.SessionManager,
) -> None:
    with pytest.raises(s.InvalidSessionName) as info:
        await sessions.create(name=EMAIL)
    text = assert_private(info.value, EMAIL)
    assert "17 characters" in text and "'@'" in text and "index 5" in text
    assert "letters, digits, '-' and '_'" in text
    with pytest.raises(s.InvalidConfiguration) as config_info:
        await sessions.list(search=EMAIL.encode())  # type: ignore[arg-type]
    assert "got bytes" in assert_private(config_info.value, EMAIL)


def test_non_messages_are_named_by_type_only() -> None:
    item = ("user", f"my card is {SECRET}")
    with pytest.raises(s.InvalidConfiguration) as info:
        s.Session(uuid.uuid4(), NOW, NOW, messages=[item])  # type: ignore[list-item]
    assert "tuple" in assert_private(info.value, SECRET)
    with pytest.raises(TypeError) as type_info:
        s.MessageLog([item])  # type: ignore[list-item]
    assert "tuple" in assert_private(type_info.value, SECRET)
    with pytest.raises(TypeError) as type_info:
        s.MessageLog().append(item)  # type: ignore[arg-type]
    assert_private(type_info.value, SECRET)


# -- stored documents: a damaged field is named, its value is not -----------------------------


def _document(**changes: Any) -> bytes:
    session = s.Session(uuid.uuid4(), NOW, NOW).with_message("user", "hi")
    doc = orjson.loads(s.dumps(session))
    doc.update(changes)
    return orjson.dumps(doc)


def _message(**changes: Any) -> dict[str, Any]:
    return {"role": "user", "content": "hi", "timestamp": NOW.isoformat(), **changes}


DAMAGED: list[tuple[str, Callable[[], bytes]]] = [
    ("owner not printable", lambda: _document(owner=f"{EMAIL}\n")),
    ("owner not a str", lambda: _document(owner=[EMAIL])),
    ("name not a name", lambda: _document(name=EMAIL)),
    ("content not a str", lambda: _document(messages=[_message(content=[EMAIL])])),
    ("content as the role", lambda: _document(messages=[_message(role=f"my {EMAIL}")])),
    ("data not JSON", lambda: _document(messages=[_message(data={"n": float("nan")}), EMAIL])),
    ("message not an object", lambda: _document(messages=[EMAIL])),
]


@pytest.mark.parametrize("make", [d[1] for d in DAMAGED], ids=[d[0] for d in DAMAGED])
def test_a_damaged_document_does_not_show_its_values(make: Callable[[], bytes]) -> None:
    with pytest.raises(s.CorruptSessionError) as info:
        s.loads(make())
    assert_private(info.value, EMAIL)


DAMAGED_FIELDS: list[tuple[str, Callable[[], bytes], tuple[str, ...]]] = [
    # label, the damaged document, what its message must say
    (
        "created_at not a time",
        lambda: _document(created_at=f"{EMAIL} diagnosis"),
        ("created_at", "a str of 27 characters is not an ISO 8601 time"),
    ),
    (
        "closed_at not a time",
        lambda: _document(closed_at=EMAIL),
        ("closed_at", "a str of 17 characters is not an ISO 8601 time"),
    ),
    (
        "message timestamp not a time",
        lambda: _document(messages=[_message(timestamp=EMAIL)]),
        ("timestamp", "a str of 17 characters is not an ISO 8601 time"),
    ),
    (
        "status not a status",
        lambda: _document(status=EMAIL),
        ("status", "a str of 17 characters is not a known status", "active"),
    ),
    ("version a str", lambda: _document(version=EMAIL), ("'version'", "a str of 17 characters")),
    ("version negative", lambda: _document(version=-4111), ("'version'", "int >= 0")),
    ("id not a UUID", lambda: _document(id=EMAIL), ("A stored session is corrupt", "id")),
    ("role not a role", lambda: _document(messages=[_message(role="thanks")]), ("known role",)),
]


@pytest.mark.parametrize(
    ("make", "shown"),
    [d[1:] for d in DAMAGED_FIELDS],
    ids=[d[0] for d in DAMAGED_FIELDS],
)
def test_a_damaged_field_is_named_and_described_not_quoted(
    make: Callable[[], bytes], shown: tuple[str, ...]
) -> None:
    """Stores log unreadable documents at WARNING: the datetime and enum errors quoted
    the stored text ("Invalid isoformat string: 'alice@...'", "'...' is not a valid
    SessionStatus"), as did a bad version and an id that is no UUID."""
    with pytest.raises(s.CorruptSessionError) as info:
        s.loads(make())
    text = assert_private(info.value, EMAIL, "4111", "thanks")
    for part in shown:
        assert part in text, text
    assert info.value.session_id is None or isinstance(info.value.session_id, uuid.UUID)


def test_a_damaged_document_names_an_id_only_when_it_is_a_uuid() -> None:
    sid = uuid.uuid4()
    with pytest.raises(s.CorruptSessionError) as info:
        s.loads(_document(id=str(sid), status=EMAIL))
    assert str(info.value).startswith(f"Session {sid} is corrupt")
    assert info.value.session_id == sid
    assert_private(info.value, EMAIL)


@pytest.mark.anyio
async def test_a_damaged_sqlite_row_is_not_quoted_in_errors_or_logs(
    anyio_backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The SQLite store's status column and a message row's timestamp, damaged: the
    listing logs the unreadable session at WARNING, the read raises; neither quotes."""
    path = tmp_path / "s.db"
    async with SQLiteRepository(path) as repo, s.SessionManager(repo) as sessions:
        session = await sessions.create()
        await sessions.add_message(session.id, "user", "hi")
    with contextlib.closing(sqlite3.connect(path)) as db:
        (body,) = db.execute("SELECT body FROM messages").fetchone()
        message = orjson.loads(body)
        message["timestamp"] = f"{EMAIL} diagnosis"
        db.execute("UPDATE messages SET body = ?", (orjson.dumps(message).decode(),))
        db.commit()
    caplog.set_level(logging.WARNING, logger="asyncsession")
    async with SQLiteRepository(path) as repo, s.SessionManager(repo) as sessions:
        read = await sessions.get(session.id)
        with pytest.raises(s.CorruptSessionError) as info:
            read.messages[0]  # decoded when first read
        assert "is not an ISO 8601 time" in assert_private(info.value, EMAIL)
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("UPDATE sessions SET status = ?", (EMAIL,))
        db.commit()
    async with SQLiteRepository(path) as repo, s.SessionManager(repo) as sessions:
        with pytest.raises(s.CorruptSessionError) as info:
            await sessions.get(session.id)
        assert "not a known status" in assert_private(info.value, EMAIL)
    with contextlib.closing(sqlite3.connect(path)) as db:
        (doc,) = db.execute("SELECT doc FROM sessions").fetchone()
        damaged = {**orjson.loads(doc), "closed_at": f"{EMAIL} diagnosis"}
        db.execute("UPDATE sessions SET status = 'active', doc = ?", (orjson.dumps(damaged),))
        db.commit()
    async with SQLiteRepository(path) as repo, s.SessionManager(repo) as sessions:
        assert (await sessions.list()).items == ()  # skipped, and logged at WARNING
    assert "unreadable session" in caplog.text and "closed_at" in caplog.text, caplog.text
    assert EMAIL not in caplog.text, caplog.text


# -- update functions, roles, ids and cursors -------------------------------------------------


@pytest.mark.anyio
async def test_a_mapping_passed_as_the_update_function_is_not_in_the_message(
    sessions: s.SessionManager,
) -> None:
    session = await sessions.create()
    with pytest.raises(s.InvalidUpdate) as info:
        await sessions.update(session.id, {"email": EMAIL, "card": SECRET})  # type: ignore[arg-type]
    text = assert_private(info.value, EMAIL, SECRET)
    assert "a dict of 2 items" in text, text
    assert "lambda s: s.with_state(" in text and "set_state(" in text, text


ROLE_CASES: list[tuple[object, tuple[str, ...], tuple[str, ...]]] = [
    # role, what must not show, what must show
    ("thanks", ("thanks",), ("a str of 6 characters is not a known role", "swapped")),
    (SECRET, (SECRET, "4111"), ("a str of 19 characters",)),
    ("4111111111111111", ("4111",), ("16 characters",)),
    ("", (), ("empty",)),
    ("user ", (), ("'user '", "differs from 'user' in case or surrounding spaces")),
    ("\nuser", (), ("'\\nuser'", "differs from 'user'")),
    ("User", (), ("'User'", "differs from 'user'")),
    (" Assistant\t", (), ("differs from 'assistant'",)),
    (f" {EMAIL} ", (EMAIL,), ("leading or trailing whitespace",)),
    ([EMAIL], (EMAIL,), ("a list of 1 item is not a str",)),
    # another framework's name for a role
    ("model", (), ("'model' (Gemini's and google-adk's name for 'assistant')",)),
    (" Human", (), ("' Human' (LangChain's name for 'user')",)),
    ("function", (), ("'function' (OpenAI's former name for 'tool')",)),
    ("models", ("models",), ("a str of 6 characters is not a known role",)),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("role", "hidden", "shown"), ROLE_CASES, ids=range(len(ROLE_CASES)))
async def test_a_role_is_shown_only_when_it_is_a_known_role_misspelt(
    sessions: s.SessionManager, role: Any, hidden: tuple[str, ...], shown: tuple[str, ...]
) -> None:
    """Any short text was shown as a role ('thanks', a card number: content and role
    swapped), and 'user ' lost the hint that it is 'user' with a space."""
    session = await sessions.create()
    for call in (
        lambda: sessions.add_message(session.id, role, "hi"),
        lambda: sessions.add_messages(session.id, [(role, "hi")]),
    ):
        with pytest.raises(s.InvalidRole) as info:
            await call()
        text = assert_private(info.value, *hidden)
        for part in (*shown, "use one of user, assistant, system, developer, tool"):
            assert part in text, text
        assert info.value.role == role


class _LazySet(set[str]):
    """A lazily loaded collection (an ORM's): its len() fails until it is loaded."""

    def __len__(self) -> int:
        raise RuntimeError("not loaded")


class _Rows(list[str]):
    def __len__(self) -> int:
        raise RuntimeError("cursor closed")


class _HugeDict(dict[str, str]):
    def __len__(self) -> int:
        return 2**70  # len() raises OverflowError


@pytest.mark.anyio
async def test_a_value_whose_len_fails_is_still_a_validation_error(
    sessions: s.SessionManager,
) -> None:
    """kind_of() called len(): a set subclass whose __len__ raises turned InvalidJSONValue
    and InvalidOwner into RuntimeError or OverflowError."""
    session = await sessions.create()
    with pytest.raises(s.InvalidJSONValue) as info:
        await sessions.add_message(session.id, "user", "hi", data={"tags": _LazySet({SECRET})})
    text = assert_private(info.value, SECRET)
    assert "data['tags']: a " in text and "_LazySet of 1 item" in text, text
    assert "sorted(value)" in text
    with pytest.raises(s.InvalidJSONValue) as info:
        await sessions.set_state(session.id, tags=_LazySet({SECRET}))
    assert_private(info.value, SECRET)
    for owner in (_Rows([EMAIL]), _HugeDict({EMAIL: EMAIL})):
        with pytest.raises(s.InvalidOwner) as owner_info:
            await sessions.create(owner=owner)
        assert "is not a str" in assert_private(owner_info.value, EMAIL)


class _NumpyBool:
    """Stands for numpy 2's ``numpy.bool`` scalar, whose type is named "bool"."""

    def __init__(self, value: bool) -> None:
        self.value = value

    def item(self) -> bool:
        return self.value


_NumpyBool.__module__ = "numpy"
_NumpyBool.__name__ = _NumpyBool.__qualname__ = "bool"


@pytest.mark.anyio
async def test_a_non_builtin_type_is_named_with_its_module(sessions: s.SessionManager) -> None:
    """ "a bool object is not a JSON value" for numpy.bool misled: bool is JSON."""
    session = await sessions.create()
    with pytest.raises(s.InvalidJSONValue) as info:
        await sessions.set_state(session.id, flag=_NumpyBool(True))
    text = str(info.value)
    assert "state['flag']: a numpy.bool object is not a JSON value" in text, text
    assert "value.item()" in text, text
    with pytest.raises(s.InvalidJSONValue) as info:
        await sessions.set_state(session.id, user=User(EMAIL, "1980-01-02"))
    assert f"a {__name__}.User object" in assert_private(info.value, EMAIL), str(info.value)
    with pytest.raises(s.InvalidJSONValue) as info:
        await sessions.set_state(session.id, card={SECRET})
    assert "a set of 1 item" in str(info.value)  # builtins stay short


@pytest.mark.anyio
async def test_text_passed_as_an_id_or_a_cursor_is_not_in_the_message(
    sessions: s.SessionManager,
) -> None:
    """sessions.get("alice@example.com") said "Session 'alice@example.com' was not
    found"; a store's InvalidSessionId and InvalidCursor quoted their argument too."""
    with pytest.raises(s.SessionNotFound) as info:
        await sessions.get(EMAIL)
    text = assert_private(info.value, EMAIL)
    assert "a str of 17 characters" in text and "UUID" in text, text
    assert info.value.session_id == EMAIL
    repository = s.MemoryRepository()
    with pytest.raises(s.InvalidSessionId) as id_info:
        await repository.get(EMAIL)  # type: ignore[arg-type]
    text = assert_private(id_info.value, EMAIL)
    assert "a str of 17 characters" in text and "uuid.UUID(text)" in text, text
    sid = str(uuid.uuid4())
    with pytest.raises(s.InvalidSessionId) as id_info:
        await repository.get(sid)  # type: ignore[arg-type]
    assert repr(sid) in str(id_info.value)  # a UUID's text says nothing of anyone
    with pytest.raises(s.InvalidCursor) as cursor_info:
        await sessions.list(cursor=EMAIL)
    text = assert_private(cursor_info.value, EMAIL)
    assert "a str of 17 characters" in text and "next_cursor" in text, text


def test_text_passed_as_a_snapshot_or_report_id_is_not_in_the_message() -> None:
    """Session(id=...) and SessionReport(session_id=...) quoted a non-UUID argument."""
    from asyncsession.reporting import SessionReport

    with pytest.raises(s.InvalidConfiguration) as info:
        s.Session(EMAIL, NOW, NOW)  # type: ignore[arg-type]
    text = assert_private(info.value, EMAIL)
    assert "Session.id" in text and "a str of 17 characters" in text, text
    with pytest.raises(s.InvalidConfiguration) as info:
        SessionReport(EMAIL, None, s.SessionStatus.EXITED, NOW, NOW, 0)  # type: ignore[arg-type]
    text = assert_private(info.value, EMAIL)
    assert "a str of 17 characters" in text and "uuid.UUID(text)" in text, text
