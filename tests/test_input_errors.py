"""Bad arguments to the models and the manager raise typed errors; deadlines past the
last datetime are "never" (review findings of helper-26)."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any

import attrs
import pytest

import asyncsession as s
from asyncsession._clock import utc
from asyncsession.asgi import SessionDict
from asyncsession.testing import ManualClock

NOW = datetime(2024, 1, 2, tzinfo=timezone.utc)
MINUS_5 = timezone(timedelta(hours=-5))
PLUS_5 = timezone(timedelta(hours=5))
#: Late enough that a deadline 100 days on is past datetime.max, early enough for one now.
LATE = datetime(9999, 9, 1, tzinfo=timezone.utc)


def base() -> s.Session:
    return s.Session(uuid.uuid4(), NOW, NOW)


class _BadOffset(tzinfo):
    def utcoffset(self, dt: datetime | None) -> timedelta:
        return timedelta(hours=48)  # outside (-24 h, 24 h): datetime raises ValueError

    def dst(self, dt: datetime | None) -> timedelta | None:
        return None

    def tzname(self, dt: datetime | None) -> str:
        return "bad"


# -- the models -------------------------------------------------------------------------

BAD_MODEL_CALLS: list[tuple[str, Callable[[], object], type[s.ValidationError], str]] = [
    ("list role", lambda: s.Message(["user"], "x", NOW), s.InvalidRole, "use one of"),  # type: ignore[arg-type]
    ("dict role", lambda: s.Message({}, "x", NOW), s.InvalidRole, "use one of"),  # type: ignore[arg-type]
    ("int role", lambda: s.Message(1, "x", NOW), s.InvalidRole, "use one of"),  # type: ignore[arg-type]
    (
        "with_message list role",
        lambda: base().with_message(["user"], "x"),  # type: ignore[arg-type]
        s.InvalidRole,
        "use one of",
    ),
    (
        "str timestamp",
        lambda: s.Message("user", "x", "2024-01-01"),  # type: ignore[arg-type]
        s.InvalidConfiguration,
        "Message.timestamp must be a timezone-aware datetime",
    ),
    (
        "timestamp past 9999 in UTC",
        lambda: base().with_message(
            "user", "x", timestamp=datetime(9999, 12, 31, 23, tzinfo=MINUS_5)
        ),
        s.InvalidConfiguration,
        "9999-12-31T23:59:59.999999+00:00",
    ),
    (
        "timestamp before year 1 in UTC",
        lambda: s.Message("user", "x", datetime(1, 1, 1, 2, tzinfo=PLUS_5)),
        s.InvalidConfiguration,
        "0001-01-01T00:00:00+00:00",
    ),
    (
        "created_at past 9999 in UTC",
        lambda: s.Session(uuid.uuid4(), datetime(9999, 12, 31, 23, tzinfo=MINUS_5), NOW),
        s.InvalidConfiguration,
        "Session.created_at",
    ),
    (
        "closed_at not a datetime",
        lambda: attrs.evolve(base(), closed_at=1.5),  # type: ignore[arg-type]
        s.InvalidConfiguration,
        "Session.closed_at must be a timezone-aware datetime",
    ),
    (
        "tzinfo without a valid offset",
        lambda: s.Message("user", "x", datetime(2024, 1, 1, tzinfo=_BadOffset())),
        s.InvalidConfiguration,
        "tzinfo=timezone.utc",
    ),
    (
        "errors=-1",
        lambda: s.Session(uuid.uuid4(), NOW, NOW, errors=-1),
        s.InvalidConfiguration,
        "errors=session.errors + 1",
    ),
    (
        "evolve errors=-1",
        lambda: attrs.evolve(base(), errors=-1),
        s.InvalidConfiguration,
        "Session.errors must be an int from 0 to 2**64 - 1",
    ),
    (
        "errors=1.5",
        lambda: attrs.evolve(base(), errors=1.5),  # type: ignore[arg-type]
        s.InvalidConfiguration,
        "Session.errors must be an int from 0 to 2**64 - 1",
    ),
    (
        "errors=2**64",
        lambda: attrs.evolve(base(), errors=2**64),  # (2**64 - 1 is a JSON document's limit)
        s.InvalidConfiguration,
        "Session.errors must be an int from 0 to 2**64 - 1",
    ),
    (
        "revision=2**63",
        lambda: s.Session(uuid.uuid4(), NOW, NOW, revision=2**63),
        s.InvalidConfiguration,
        "managed by asyncsession",
    ),
    (
        "revision=-1",
        lambda: s.Session(uuid.uuid4(), NOW, NOW, revision=-1),
        s.InvalidConfiguration,
        "managed by asyncsession",
    ),
    (
        "status bogus",
        lambda: s.Session(uuid.uuid4(), NOW, NOW, status="bogus"),
        s.InvalidConfiguration,
        "use one of active, archived",
    ),
    (
        "status unhashable",
        lambda: attrs.evolve(base(), status=["active"]),
        s.InvalidConfiguration,
        "use one of active, archived",
    ),
    (
        "id not a uuid",
        lambda: s.Session("not-a-uuid", NOW, NOW),
        s.InvalidConfiguration,
        "Session.id must be a UUID",
    ),
    (
        "id an int",
        lambda: s.Session(5, NOW, NOW),  # type: ignore[arg-type]
        s.InvalidConfiguration,
        "Session.id must be a UUID",
    ),
    (
        "messages of ints",
        lambda: attrs.evolve(base(), messages=[1]),  # type: ignore[list-item]
        s.InvalidConfiguration,
        "with_message()",
    ),
    (
        "messages not iterable",
        lambda: attrs.evolve(base(), messages=5),  # type: ignore[arg-type]
        s.InvalidConfiguration,
        "with_message()",
    ),
    (
        "with_state(str)",
        lambda: base().with_state("ab"),  # type: ignore[arg-type]
        s.InvalidJSONValue,
        "with_state(cart=1)",
    ),
    (
        "with_state(list of pairs)",
        lambda: base().with_state([("a", 1)]),  # type: ignore[arg-type]
        s.InvalidJSONValue,
        "takes a mapping",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "hint"),
    [case[1:] for case in BAD_MODEL_CALLS],
    ids=[case[0] for case in BAD_MODEL_CALLS],
)
def test_bad_model_arguments_raise_typed_errors(
    call: Callable[[], object], error: type[s.ValidationError], hint: str
) -> None:
    with pytest.raises(error) as info:
        call()
    assert hint in str(info.value)


def test_good_model_arguments_still_work() -> None:
    sid = uuid.uuid4()
    session = s.Session(str(sid), NOW.astimezone(PLUS_5), NOW, status="archived")
    assert session.id == sid and session.created_at == NOW
    assert session.created_at.tzinfo is timezone.utc
    assert session.status is s.SessionStatus.ARCHIVED
    assert session.with_state(None, a=1).state == {"a": 1}
    assert session.with_state({}, a=1).state == {"a": 1}
    last = datetime(9999, 12, 31, 23, tzinfo=timezone.utc)  # in range: accepted
    assert session.with_message("user", "x", timestamp=last).messages[0].timestamp == last
    assert attrs.evolve(session, messages=(s.Message("user", "x", NOW),)).messages.total == 1


def test_utc_rejects_what_is_not_a_datetime() -> None:
    for value in ("2024-01-01", 1700000000, None, NOW.date()):
        with pytest.raises(s.InvalidConfiguration, match="must be a timezone-aware datetime"):
            utc(value, "when")  # type: ignore[arg-type]
    assert utc(NOW.astimezone(MINUS_5)) == NOW


# -- deadlines at the end of datetime's range ---------------------------------------------

DAY = timedelta(days=1)


def test_a_deadline_past_the_last_datetime_is_never() -> None:
    active, archived = s.SessionStatus.ACTIVE, s.SessionStatus.ARCHIVED
    end = datetime.max.replace(tzinfo=timezone.utc)
    long = timedelta(days=36500)
    assert s.ExpiryPolicy(max_age=long).deadline(active, end, end, None) is None
    assert s.ExpiryPolicy(idle_timeout=long).deadline(active, end, end, None) is None
    assert s.ExpiryPolicy(retention=DAY).deadline(s.SessionStatus.EXITED, NOW, NOW, end) is None
    both = s.ExpiryPolicy(idle_timeout=100 * DAY, max_age=200 * DAY)
    # the idle deadline is past the end, the age deadline is not: the age one holds
    assert both.deadline(active, LATE - 100 * DAY, LATE, None) == LATE + 100 * DAY
    # the age deadline is past the end: the idle one holds, archived has none
    assert both.deadline(active, LATE, LATE - 50 * DAY, None) == LATE + 50 * DAY
    assert both.deadline(archived, LATE, LATE, None) is None
    # in range: unchanged
    assert both.deadline(active, NOW, NOW, None) == NOW + 100 * DAY


@pytest.mark.parametrize(
    "changes",
    [
        {"idle_timeout": "60"},
        {"max_age": timedelta(0)},
        {"retention": -DAY},
        {"max_age": timedelta(days=36501)},
        {"touch_interval": None},
        {"touch_interval": -DAY},
    ],
    ids=repr,
)
def test_bad_expiry_policy_arguments_raise_typed_errors(changes: dict[str, Any]) -> None:
    with pytest.raises(s.InvalidConfiguration, match=f"ExpiryPolicy.{next(iter(changes))}"):
        s.ExpiryPolicy(**changes)


# -- through the manager, on every store, asyncio and trio --------------------------------


@pytest.fixture
def repository(any_repository: s.SessionRepository) -> s.SessionRepository:
    return any_repository


BAD_UPDATES: list[tuple[str, Callable[[s.Session], s.Session], type[s.ValidationError]]] = [
    ("errors=-1", lambda x: attrs.evolve(x, errors=-1), s.InvalidConfiguration),
    ("status bogus", lambda x: attrs.evolve(x, status="bogus"), s.InvalidConfiguration),
    ("with_state(str)", lambda x: x.with_state("ab"), s.InvalidJSONValue),  # type: ignore[arg-type]
    ("list role", lambda x: x.with_message(["user"], "x"), s.InvalidRole),  # type: ignore[arg-type]
    (
        "closed_at not a datetime",
        lambda x: attrs.evolve(x, status=s.SessionStatus.EXITED, closed_at="soon"),  # type: ignore[arg-type]
        s.InvalidConfiguration,
    ),
]


@pytest.mark.anyio
async def test_bad_input_through_the_manager_is_typed_and_stores_nothing(
    repository: s.SessionRepository,
) -> None:
    async with s.SessionManager(repository, cleanup_interval=None, clock=ManualClock()) as m:
        session = await m.create(state={"v": 1})
        with pytest.raises(s.InvalidRole):
            await m.add_message(session.id, ["user"], "x")  # type: ignore[arg-type]
        with pytest.raises(s.InvalidRole):
            await m.add_messages(session.id, [("user", "ok"), ({"r": 1}, "x")])  # type: ignore[list-item]
        for _label, fn, error in BAD_UPDATES:
            with pytest.raises(error):
                await m.update(session.id, fn)
        with pytest.raises(s.InvalidConfiguration):
            await m.close(session.id, status="bogus")  # type: ignore[arg-type]
        after = await m.get(session.id, touch=False)
        assert after.revision == 0 and after.messages.total == 0
        assert after.state == {"v": 1} and after.errors == 0
        assert after.status is s.SessionStatus.ACTIVE


class Role(str, enum.Enum):
    USER = "user"
    TOOL = "tool"


class Kind(str, enum.Enum):
    SEARCH = "search"


@pytest.mark.anyio
async def test_str_enum_members_are_stored_as_their_values(
    repository: s.SessionRepository,
) -> None:
    """A ``class Kind(str, Enum)`` member in state or message data was stored as
    ``'Kind.SEARCH'`` (``str()`` of the member, its name), a member as a key was
    refused, and a str enum role raised InvalidRole. Each now stands for its value,
    as orjson writes it."""
    async with s.SessionManager(repository, cleanup_interval=None, clock=ManualClock()) as m:
        session = await m.create(state={"kind": Kind.SEARCH, Kind.SEARCH: [Kind.SEARCH]})
        await m.add_message(session.id, Role.USER, "find it", data={"kind": Kind.SEARCH})
        await m.add_messages(session.id, [(Role.TOOL, "found", {Kind.SEARCH: 1})])
        got = await m.get(session.id, touch=False)
    assert got.state == {"kind": "search", "search": ("search",)}
    assert [type(key) for key in got.state] == [str, str]
    assert type(got.state["kind"]) is str
    assert [(x.role, x.data) for x in got.messages] == [
        ("user", {"kind": "search"}),
        ("tool", {"search": 1}),
    ]
    assert all(type(x.role) is str for x in got.messages)
    assert b'"Kind.' not in s.dumps(got)


class Who(str, enum.Enum):
    ALICE = "alice"
    CART = "Cart-1"
    HELLO = "Hello there"


@pytest.mark.anyio
async def test_str_enum_members_stand_for_their_values_as_content_owner_name_and_filters(
    repository: s.SessionRepository,
) -> None:
    """A str enum member as message content raised ValidationError, as owner or name
    InvalidOwner / InvalidSessionName, and as list()'s owner it matched nothing on
    Redis (its key used the member's name, 'o:Who.ALICE'). Each now stands for its
    value, stored as a plain str, on every store (review finding)."""
    async with s.SessionManager(repository, cleanup_interval=None, clock=ManualClock()) as m:
        session = await m.create(owner=Who.ALICE, name=Who.CART)
        assert (session.owner, session.name) == ("alice", "Cart-1")
        assert type(session.owner) is str and type(session.name) is str
        added = await m.add_message(session.id, Role.USER, Who.HELLO)
        assert type(added.messages[-1].content) is str
        await m.add_messages(session.id, [(Role.TOOL, Kind.SEARCH)])
        renamed = await m.update(session.id, lambda x: x.with_name(Kind.SEARCH))
        assert type(renamed.name) is str
        await m.update(session.id, lambda x: attrs.evolve(x, owner=Who.ALICE, name=Who.CART))
        other = await m.create(owner="bob")
        await m.add_message(other.id, "user", "nothing to see")
        got = await m.get(session.id, touch=False)
        assert (got.owner, got.name) == ("alice", "Cart-1")
        assert type(got.owner) is str and type(got.name) is str
        assert [x.content for x in got.messages] == ["Hello there", "search"]
        assert all(type(x.content) is str for x in got.messages)
        for page in (
            await m.list(owner=Who.ALICE),
            await m.list(search=Who.HELLO),
            await m.list(search=Who.CART),
            await m.list(owner=Who.ALICE, search=Who.HELLO),
        ):
            assert [x.id for x in page.items] == [session.id]
        query = s.SessionQuery(owner=Who.ALICE, search=Who.CART)
        assert (type(query.owner), type(query.search)) == (str, str)
        assert query.fingerprint() == s.SessionQuery(owner="alice", search="Cart-1").fingerprint()
        assert [x.id for x in (await repository.list(query)).items] == [session.id]
    assert b"Who." not in s.dumps(got) and b"Kind." not in s.dumps(got)


@pytest.mark.anyio
async def test_sessions_near_the_end_of_time_never_expire_and_stay_readable(
    repository: s.SessionRepository,
) -> None:
    clock = ManualClock(LATE)
    async with s.SessionManager(
        repository, idle_timeout=100 * DAY, retention=100 * DAY, cleanup_interval=None, clock=clock
    ) as m:
        touched, updated, closed = [await m.create() for _ in range(3)]
        assert touched.expires_at == LATE + 100 * DAY  # still in range
        clock.advance(30 * DAY)  # now + 100 days is past datetime.max
        assert (await m.get(touched.id)).expires_at is None
        assert (await m.update(updated.id, lambda x: x.with_state(a=1))).expires_at is None
        assert (await m.close(closed.id)).expires_at is None
        assert (await m.create()).expires_at is None
        assert await m.purge_expired() == 0
        for session in (touched, updated, closed):
            assert (await m.get(session.id, touch=False)).expires_at is None


@pytest.mark.anyio
async def test_appending_near_the_end_of_time_never_expires(
    repository: s.SessionRepository,
) -> None:
    clock = ManualClock(LATE)
    async with s.SessionManager(
        repository, idle_timeout=100 * DAY, cleanup_interval=None, clock=clock
    ) as m:
        session = await m.create()
        clock.advance(30 * DAY)
        assert (await m.add_message(session.id, "user", "late")).expires_at is None
        stored = await m.get(session.id, touch=False)
        assert stored.expires_at is None and stored.messages.total == 1


@pytest.mark.anyio
async def test_a_deadline_one_microsecond_past_the_end_of_time_is_none(
    repository: s.SessionRepository,
) -> None:
    end = datetime.max.replace(tzinfo=timezone.utc)
    at = end - 100 * DAY + timedelta(microseconds=1)  # at + idle: one past datetime.max
    clock = ManualClock(at - timedelta(seconds=5))
    async with s.SessionManager(
        repository, idle_timeout=100 * DAY, cleanup_interval=None, clock=clock
    ) as m:
        session = await m.create()
        clock.jump_to(at)
        assert (await m.add_message(session.id, "user", "hi")).expires_at is None
        assert (await m.get(session.id, touch=False)).expires_at is None
        updated = await m.update(session.id, lambda x: x.with_state(a=1))
        assert updated.expires_at is None


@pytest.mark.anyio
async def test_a_client_string_that_is_no_id_is_not_quoted_in_not_found(
    anyio_backend: str,
) -> None:
    """A string a client sent as an id was repeated verbatim (newlines and all, any
    length) in SessionNotFound's message, which apps log (found by helper-51); it is
    now described by type and length only (test_error_privacy)."""
    async with s.SessionManager(s.MemoryRepository()) as sessions:
        with pytest.raises(s.SessionNotFound) as info:
            await sessions.get("not-an-id\nINFO fake: admin logged in" + "A" * 500)
    text = str(info.value)
    assert "\n" not in text and "not-an-id" not in text and "admin" not in text
    assert text.startswith("Session (id not shown: a str of 536 characters, not a UUID)")
    assert len(text) < 250
    known = uuid.uuid4()
    assert str(s.SessionNotFound(known)).startswith(f"Session {known} was not found")


@pytest.mark.anyio
async def test_owners_and_ids_of_the_wrong_type_are_typed_errors_on_every_store(
    repository: s.SessionRepository,
) -> None:
    """Found by helper-171: ``list(owner=uuid)`` found nothing on the memory and file
    stores and raised StorageError on SQLite (``owner=42`` matched "42" there only); a
    Session passed as an id was "not found" (``exists()`` said False); ``delete(text,
    missing_ok=True)`` raised for text that is no id."""
    async with s.SessionManager(repository, cleanup_interval=None) as m:
        session = await m.create(owner="42")
        for owner in (uuid.UUID(int=42), 42, ["42"], ""):
            with pytest.raises(s.InvalidOwner):
                await m.list(owner=owner)  # type: ignore[arg-type]
            with pytest.raises(s.InvalidOwner):
                s.SessionQuery(owner=owner)  # type: ignore[arg-type]
        assert [x.id for x in (await m.list(owner="42")).items] == [session.id]
        assert [x.id for x in (await repository.list(s.SessionQuery(owner="42"))).items] == [
            session.id
        ]

        given: Any = session
        calls: list[Callable[[Any], Any]] = [
            m.get,
            m.exists,
            m.delete,
            lambda x: m.add_message(x, "user", "hi"),
            lambda x: m.set_state(x, k=1),
        ]
        for call in calls:
            with pytest.raises(s.InvalidSessionId, match=r"Pass the session's id: session\.id"):
                await call(given)
        assert await m.delete("not-an-id", missing_ok=True) is False
        # None: a cookie that is not there, as exists(None) says (helper-221)
        assert await m.delete(None, missing_ok=True) is False  # type: ignore[arg-type]
        with pytest.raises(s.SessionNotFound):  # a mistake, not a client's text
            await m.delete(session.id.bytes, missing_ok=True)  # type: ignore[arg-type]
        with pytest.raises(s.SessionNotFound):
            await m.delete("not-an-id")
        after = await m.get(session.id)
        assert (after.revision, after.messages.total, dict(after.state)) == (0, 0, {})


@pytest.mark.anyio
@pytest.mark.parametrize("value", ["false", "no", 0, 1, None])
async def test_flags_take_only_true_or_false(tmp_path: Any, value: Any) -> None:
    """A setting read from the environment ("false") counted as true: get(touch="no")
    touched the session, delete(missing_ok="no") returned False for a missing one, and
    FileRepository(fsync="false") kept syncing; 0 and None passed as False."""
    flag = r"must be True or False, got .*; convert settings read from the environment"
    for make in (
        lambda: s.FileRepository(tmp_path / "files", fsync=value),
        lambda: s.FileRepository(tmp_path / "files", shared=value),
        lambda: s.SQLiteRepository(tmp_path / "s.db", upgrade=value),
        lambda: s.SessionManager(s.MemoryRepository(), share_events=value),
        lambda: s.ExpiryPolicy().activity_deadline(
            s.SessionStatus.ACTIVE, NOW, NOW, NOW, moves=value
        ),
        lambda: s.ExpiryPolicy(idle_timeout=60).activity_deadline(  # already overdue
            s.SessionStatus.ACTIVE, NOW, NOW, NOW + timedelta(hours=1), moves=value
        ),
    ):
        with pytest.raises(s.InvalidConfiguration, match=flag):
            make()
    async with s.SQLiteRepository(tmp_path / "s.db") as repository:
        with pytest.raises(s.InvalidConfiguration, match=f"vacuum {flag}"):
            await repository.checkpoint(vacuum=value)
    clock = ManualClock()
    async with s.SessionManager(s.MemoryRepository(), clock=clock) as sessions:
        session = await sessions.create()
        clock.advance(60)
        with pytest.raises(s.InvalidConfiguration, match=f"touch {flag}"):
            await sessions.get(session.id, touch=value)
        with pytest.raises(s.InvalidConfiguration, match=f"missing_ok {flag}"):
            await sessions.delete(uuid.uuid4(), missing_ok=value)
        with pytest.raises(s.InvalidConfiguration, match=f"missing_ok {flag}"):
            await sessions.delete(session.id, missing_ok=value)
        stored = await sessions.get(session.id, touch=False)
        assert stored.last_active == session.last_active  # neither touched nor deleted
        with pytest.raises(s.InvalidConfiguration, match=f"read_only {flag}"):
            SessionDict(sessions, stored, read_only=value)


@pytest.mark.anyio
async def test_a_status_in_another_case_gets_a_hint() -> None:
    """status="CRASHED" got only the list of statuses, without the hint roles get."""
    async with s.SessionManager(s.MemoryRepository()) as sessions:
        session = await sessions.create()
        with pytest.raises(s.InvalidConfiguration) as info:
            await sessions.close(session.id, status="CRASHED")
        assert "'CRASHED' (it differs from 'crashed' in case or surrounding spaces)" in str(
            info.value
        )
        with pytest.raises(s.InvalidConfiguration, match=r"^Unknown session status 'gone': use"):
            await sessions.list(status="gone")
        assert (await sessions.get(session.id, touch=False)).status is s.SessionStatus.ACTIVE
