"""Error messages name where a rejected value is and its type, never the value itself.

Apps log these errors (the ASGI middleware logs a failed save at ERROR, with the
traceback), so a rejected state value, message content or owner copied into a message
ends up in logs and error trackers (privacy review: an e-mail address and a birth date in
a dataclass's repr, card numbers in a set, bytes or a big int, owners' e-mail addresses).
"""

from __future__ import annotations

import dataclasses
import pickle
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest

import asyncsession as s

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
    assert "'wizard'" in str(role_info.value)  # a short role name is still shown
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
