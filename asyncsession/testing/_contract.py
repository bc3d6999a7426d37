"""The repository contract: one suite every store must pass.

Subclass :class:`RepositoryContract` in a pytest module and provide a ``repository``
fixture that yields an open, empty store; anyio's pytest plugin runs each test on the
backends your ``anyio_backend`` fixture selects::

    class TestMyStore(RepositoryContract):
        @pytest.fixture
        async def repository(self, anyio_backend):
            async with MyStore() as store:
                yield store

This module does not import pytest.
"""

from __future__ import annotations

import unittest
import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import attrs
import orjson

from .._exceptions import (
    CorruptSessionError,
    InvalidConfiguration,
    InvalidCursor,
    InvalidOwner,
    InvalidSessionId,
    InvalidUpdate,
    LimitExceeded,
    SchemaVersionError,
    SessionClosed,
    SessionConflict,
    SessionNotFound,
)
from .._manager import SessionManager
from .._migrations import CURRENT_VERSION
from .._models import ExpiryPolicy, Message, Session, SessionStatus, replace_trusted
from .._serialization import loads
from ..abc import SessionQuery, SessionRepository
from ._clock import ManualClock

__all__ = ["RepositoryContract"]

E = TypeVar("E", bound=BaseException)

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
POLICY = ExpiryPolicy(
    idle_timeout=timedelta(seconds=60), max_age=None, retention=timedelta(seconds=10)
)


def at(seconds: float) -> datetime:
    """The contract's time axis: ``T0 + seconds``."""
    return T0 + timedelta(seconds=seconds)


def make_session(
    *,
    owner: str | None = "alice",
    name: str | None = "my-feature",
    created: float = 0,
    state: dict[str, Any] | None = None,
    messages: tuple[str, ...] = (),
    status: SessionStatus = SessionStatus.ACTIVE,
) -> Session:
    """A new session under :data:`POLICY`, created at ``at(created)``."""
    when = at(created)
    closed_at = when if status.is_terminal else None
    return Session(
        uuid.uuid4(),
        when,
        when,
        owner=owner,
        name=name,
        status=status,
        closed_at=closed_at,
        expires_at=POLICY.deadline(status, when, when, closed_at),
        state=state if state is not None else {"k": 1, "nested": {"list": [1, 2, {"x": None}]}},
        messages=[Message("user", text, when) for text in messages],
    )


def msg(text: str, seconds: float = 0, role: str = "user") -> Message:
    """A message at ``at(seconds)``."""
    return Message(role, text, at(seconds), None)


async def raises(error: type[E], awaitable: Awaitable[object], what: str) -> E:
    """Await ``awaitable`` and return the ``error`` it must raise (pytest-free)."""
    try:
        await awaitable
    except error as exc:
        return exc
    raise AssertionError(f"{what} must raise {error.__name__}")


async def known_versions(
    repository: SessionRepository, session_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, int]:
    """``document_versions(session_ids)`` of a store that must be able to tell them."""
    versions = await repository.document_versions(session_ids)
    if versions is None:
        raise AssertionError(
            f"{type(repository).__name__}.document_versions() answered None (unknown), but "
            "it told versions before or holds documents the contract replaced"
        )
    return dict(versions)


class ShoutingUUID(uuid.UUID):
    """A :class:`uuid.UUID` subclass whose text is not a UUID's (a store that writes
    ``str(id)`` into a key, a file name or SQL must use the plain UUID instead)."""

    def __str__(self) -> str:
        return "../NOT-A-UUID"


def not_ids(session: Session) -> list[Any]:
    """Values a caller might pass for ``session``'s id that are not UUIDs."""
    sid = session.id
    return [str(sid), sid.hex, sid.int, sid.bytes, None, [sid]]


def changed(session: Session, **changes: Any) -> Session:
    """``session`` with ``changes`` and the next revision."""
    return attrs.evolve(session, revision=session.revision + 1, **changes)


def version_0_document(session: Session, first_message: str | None = None) -> bytes:
    """A schema-version-0 document of ``session`` (seed 002's format), as stored bytes."""
    doc: dict[str, Any] = {
        "version": 0,
        "id": str(session.id),
        "created": session.created_at.isoformat(),
        "last_active": session.last_active.isoformat(),
        "owner": session.owner,
        "name": session.name,
        "status": session.status.value,
        "custom_fields": dict(session.state),
        "message_count": session.messages.total,
        "file_count": 0,
    }
    if first_message is not None:  # version 0 kept it in the document
        doc["first_message"] = first_message
    return orjson.dumps(doc)


#: How often cancellation tests try each number of checkpoints.
TRIES = 8
#: They stop once an operation finished before its cancellation this many times in a
#: row (it has no later await point left to cancel) ...
FINISHED_RUNS = 2 * TRIES
#: ... or after this many attempts (a store waiting on a thread or a socket can take
#: many scheduling rounds; every attempt still checks the state it left).
MAX_ATTEMPTS = 100 * TRIES


async def cancelled_after(steps: int, operation: Callable[[], Awaitable[object]]) -> bool:
    """Run ``operation()`` in a task and cancel it once the calling task has passed
    ``steps`` checkpoints (0: before it starts). Each checkpoint lets the operation run
    to its next await, so growing ``steps`` cancels it at each of its await points in
    turn, counted in scheduling rounds, not in time. Returns True if the operation
    finished before the cancellation.
    """
    finished = False

    async def run() -> None:
        nonlocal finished
        await operation()
        finished = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        for _ in range(steps):
            if finished:
                break
            await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    return finished


async def cancel_at_each_await(
    operation: Callable[[int], Callable[[], Awaitable[object]]],
    check: Callable[[int, bool], Awaitable[None]],
) -> None:
    """For attempt ``i`` = 0, 1, 2, ...: run ``operation(i)()`` cancelled after
    ``i // TRIES`` checkpoints (see :func:`cancelled_after`), then
    ``await check(i, finished)``. Each number of checkpoints is tried :data:`TRIES`
    times, since trio runs the tasks woken together in a random order."""
    finished_runs = 0
    for attempt in range(MAX_ATTEMPTS):
        finished = await cancelled_after(attempt // TRIES, operation(attempt))
        await check(attempt, finished)
        finished_runs = finished_runs + 1 if finished else 0
        if finished_runs == FINISHED_RUNS:
            return
    # Out of attempts (a store that takes very many scheduling rounds): the operation
    # must still complete and leave its new state when nothing cancels it.
    await operation(MAX_ATTEMPTS)()
    await check(MAX_ATTEMPTS, True)


#: How the contract names the listing order in its failures.
LISTING_ORDER = (
    "newest last_active first; sessions with equal last_active by id descending "
    "(larger uuid.UUID.int first)"
)


async def page_through(
    repository: SessionRepository,
    query: SessionQuery,
    expected: int,
    between: Callable[[], Awaitable[object]] | None = None,
) -> list[uuid.UUID]:
    """The ids ``list()`` gives on every page of ``query``, first page to last, awaiting
    ``between()`` after each page. ``expected`` is how many sessions the listing should
    hold: a page that repeats a session already listed, or a listing still going after
    ``expected + 2`` pages, fails at once (a cursor that does not move past its page
    would otherwise page for ever)."""
    seen: list[uuid.UUID] = []
    listed: set[uuid.UUID] = set()
    for number in range(1, expected + 3):
        page = await repository.list(query)
        ids = [s.id for s in page.items]
        repeated = [i for n, i in enumerate(ids) if i in listed or i in ids[:n]]
        if repeated:
            raise AssertionError(
                f"page {number} of a listing by {query.limit} (owner={query.owner!r}) "
                f"repeats {len(repeated)} session(s) already listed: {repeated}; a page "
                "resumes strictly after the (last_active, id) of the previous page's "
                f"last item, in the listing's order ({LISTING_ORDER}). Pages so far: "
                f"{seen}, then {ids}"
            )
        seen.extend(ids)
        listed.update(ids)
        if between is not None:
            await between()
        if page.next_cursor is None:
            return seen
        query = attrs.evolve(query, cursor=page.next_cursor)
    raise AssertionError(
        f"a listing by {query.limit} (owner={query.owner!r}) of {expected} sessions "
        f"still had a next_cursor after {expected + 2} pages; listed: {seen}"
    )


async def status_counts(
    repository: SessionRepository, owner: str | None = None
) -> dict[SessionStatus, int]:
    """``count_by_status(owner)`` as a dict, refusing zero counts."""
    counts = dict(await repository.count_by_status(owner))
    zeros = sorted(status.value for status, n in counts.items() if n == 0)
    if zeros:
        raise AssertionError(
            f"count_by_status({owner!r}) answered 0 for {zeros}: leave out statuses with "
            "no sessions, as the built-in stores do (SessionManager.stats().by_status "
            f"shows the mapping as it is); got {counts}"
        )
    return counts


async def stored_whole(
    repository: SessionRepository, session: Session, *, now: datetime, what: str
) -> bool:
    """Whether ``session``, the only session ``repository`` may hold, is stored, as every
    view of the store must agree: :meth:`get` (returning it as it was added), the
    deadline index (``expired(now)``, ``now`` at or after its deadline), a listing and
    the counts. A store that writes a session's pieces apart (document, indexes) and
    was interrupted between them fails, naming ``what``."""
    loaded = await repository.get(session.id)
    views = {
        "get()": loaded is not None,
        "expired()": session.id in await repository.expired(now),
        "list()": session.id in [s.id for s in (await repository.list(SessionQuery())).items],
    }
    counts = await status_counts(repository)
    if counts in ({}, {session.status: 1}):
        views["count_by_status()"] = bool(counts)
    else:
        raise AssertionError(f"{what}: count_by_status() is {counts} with one session or none")
    if len(set(views.values())) != 1:
        raise AssertionError(
            f"{what} left the session half-written: {views} (stored by some views of the "
            "store, not by others); write a session's document and its indexes in one "
            "atomic step (one transaction, one script), or in an order that an "
            "interruption at any await cannot leave half done"
        )
    assert loaded is None or loaded == session, (
        f"{what} changed the stored session: {loaded!r:.300}"
    )
    return loaded is not None


async def indexes_agree(repository: SessionRepository, loaded: Session, what: str) -> None:
    """The deadline index (``expired()``) and a listing agree with ``loaded``, the session
    just read: its ``expires_at`` and its ``last_active``. A store that writes a session's
    document and its indexes apart, interrupted between them, fails, naming ``what``."""
    deadline = loaded.expires_at
    apart = (
        f"{what} left the deadline index apart from the stored expires_at {deadline}: "
        "write a session's document and its indexes in one atomic step"
    )
    if deadline is not None:
        early = deadline - timedelta(microseconds=1)
        assert loaded.id not in await repository.expired(early), apart
        assert loaded.id in await repository.expired(deadline), apart
    else:
        assert loaded.id not in await repository.expired(at(10**8)), apart
    items = [s for s in (await repository.list(SessionQuery())).items if s.id == loaded.id]
    assert [s.last_active for s in items] == [loaded.last_active], (
        f"{what}: listed with last_active {[s.last_active for s in items]}, stored "
        f"{loaded.last_active}; write the listing index with the document"
    )


class RepositoryContract:
    """Contract tests for a :class:`SessionRepository` (needs a ``repository`` fixture).

    Stores that keep documents may also override :meth:`replace_document`, so the tests
    of old and unreadable documents run against them too (they are skipped otherwise).
    """

    #: Whether :meth:`~asyncsession.abc.SessionRepository.expired` still lists an
    #: expired session whose document came from a newer release (so cleanup retries
    #: it). A store whose deadline index is read from the documents alone cannot know
    #: that deadline: it sets this False and must say elsewhere where such documents go.
    lists_newer_documents_as_expired: bool = True

    async def replace_document(
        self, repository: SessionRepository, session_id: uuid.UUID, document: bytes
    ) -> None:
        """Overwrite the stored document of the stored session ``session_id`` with
        ``document``, behind the store's back (as an older release or a damaged disk
        would), keeping whatever else the store keeps for the session. A store that
        answers reads from snapshots it remembers must forget that session's (as a
        restart would): the write changes neither its revision nor its times.

        The default raises :class:`unittest.SkipTest`, which pytest reports as a skip:
        a store of :class:`Session` objects (such as the memory store) holds no document
        to replace.
        """
        raise unittest.SkipTest(
            f"{type(self).__name__} does not override replace_document(), so the "
            "contract cannot store old or damaged documents in it"
        )

    # -- basic storage --------------------------------------------------------------

    async def test_get_missing_returns_none(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        assert await repository.get(uuid.uuid4()) is None
        assert await repository.touch(uuid.uuid4(), at=at(0), policy=POLICY) is None

    async def test_add_then_get_round_trips(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        session = make_session(messages=("hello", "world"))
        await repository.add(session)
        loaded = await repository.get(session.id)
        assert loaded == session
        assert loaded is not None and loaded.state["nested"]["list"][2] == {"x": None}
        assert [m.content for m in loaded.messages] == ["hello", "world"]

    async def test_add_existing_id_conflicts(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        session = make_session()
        await repository.add(session)
        await raises(
            SessionConflict,
            repository.add(attrs.evolve(session, name="other")),
            "add() of an existing id",
        )
        assert await repository.get(session.id) == session

    async def test_save_replaces_with_next_revision(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        session = make_session()
        await repository.add(session)
        new = changed(session, state={"k": 2}, last_active=at(5), expires_at=at(65))
        await repository.save(new, expected_revision=0)
        loaded = await repository.get(session.id)
        assert loaded == new and loaded is not None and loaded.revision == 1

    async def test_stale_save_conflicts_and_stores_nothing(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        session = make_session()
        await repository.add(session)
        first = changed(session, state={"k": 2})
        await repository.save(first, expected_revision=0)
        stale = repository.save(changed(session, state={"k": 3}), expected_revision=0)
        assert (await raises(SessionConflict, stale, "a stale save")).recoverable
        assert await repository.get(session.id) == first
        # A save based on a revision the store has not reached yet conflicts too (a
        # store that only refused older bases passed the lines above).
        ahead = attrs.evolve(first, state={"k": 4}, revision=3)
        await raises(SessionConflict, repository.save(ahead, expected_revision=2), "ahead")
        assert await repository.get(session.id) == first

    async def test_revisions_stay_exact_up_to_2_to_the_63(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        """Revisions go up to ``2**63 - 1`` and every write bumps them by exactly one,
        also past ``2**53``, where doubles (e.g. Lua numbers) stop counting by one: a
        store computing them so keeps the revision on an append, and a stale save then
        overwrites the appended messages."""
        starts = (2**53 - 1, 2**53, 2**53 + 1, 2**63 - 3)
        for start in starts:
            session = attrs.evolve(make_session(messages=("a",)), revision=start)
            await repository.add(session)
            assert await repository.get(session.id) == session
            base = await repository.get_for_update(session.id)
            assert base is not None and base.revision == start
            appended = await repository.append(session.id, [msg("b", 1)], at=at(1), policy=POLICY)
            assert appended.revision == start + 1, (start, appended.revision)
            stale = repository.save(changed(base, state={"k": 2}), expected_revision=start)
            await raises(
                SessionConflict, stale, f"a save based on revision {start} after an append"
            )
            touched = await repository.touch(session.id, at=at(2), policy=POLICY)
            assert touched is not None and touched.revision == start + 1
            current = await repository.get_for_update(session.id)
            assert current is not None and current.revision == start + 1
            assert [m.content for m in current.messages] == ["a", "b"]
            saved = changed(current, state={"k": 3})
            await repository.save(saved, expected_revision=start + 1)
            loaded = await repository.get(session.id)
            assert loaded == saved and loaded.revision == start + 2
            assert [m.content for m in loaded.messages] == ["a", "b"]
        listed = (await repository.list(SessionQuery())).items
        assert sorted(s.revision for s in listed) == [start + 2 for start in starts]

    async def test_writes_past_the_last_revision_are_refused(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        """At revision ``2**63 - 1`` a session takes no more writes: appends and saves
        (the next revision, ``2**63``, as the manager computes it) raise
        :class:`LimitExceeded` and store nothing. (SQLite's ``revision + 1`` stored a
        REAL that left the session unreadable for good, other stores kept ``2**63`` or
        failed with a raw server error.) It can still be read, touched and deleted."""
        top = 2**63 - 1
        session = attrs.evolve(make_session(messages=("a",)), revision=top)
        await repository.add(session)
        base = await repository.get_for_update(session.id)
        assert base == session and base is not None
        new = msg("b", 1)
        with_new = base.messages.append(new)
        attempts: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            (
                "an append",
                lambda: repository.append(session.id, [new], at=at(1), policy=POLICY),
            ),
            (
                "an append under a message limit",
                lambda: repository.append(
                    session.id, [new], at=at(1), policy=POLICY, max_messages=10
                ),
            ),
            ("an empty append", lambda: repository.append(session.id, [], at=at(1), policy=POLICY)),
            (
                "a save of the state",
                lambda: repository.save(
                    replace_trusted(base, state={"k": 2}, last_active=at(1), revision=top + 1),
                    expected_revision=top,
                    new_messages=(),
                ),
            ),
            (
                "a save appending a message",
                lambda: repository.save(
                    replace_trusted(base, messages=with_new, last_active=at(1), revision=top + 1),
                    expected_revision=top,
                    new_messages=[new],
                ),
            ),
            (
                "a save rewriting the history",
                lambda: repository.save(
                    replace_trusted(base, messages=with_new, revision=top + 1),
                    expected_revision=top,
                ),
            ),
            (
                "a save closing it",
                lambda: repository.save(
                    replace_trusted(
                        base, status=SessionStatus.EXITED, closed_at=at(1), revision=top + 1
                    ),
                    expected_revision=top,
                    new_messages=(),
                ),
            ),
        ]
        for what, attempt in attempts:
            error = await raises(LimitExceeded, attempt(), f"{what} at revision 2**63 - 1")
            assert (error.limit, error.actual, error.recoverable) == (top, top + 1, False), what
            assert await repository.get(session.id) == session, f"{what} stored something"
            assert await repository.get_for_update(session.id) == session, what
        listed = (await repository.list(SessionQuery())).items
        assert [(s.id, s.revision, s.last_active) for s in listed] == [
            (session.id, top, session.last_active)
        ]
        touched = await repository.touch(session.id, at=at(2), policy=POLICY)
        assert touched is not None and touched.revision == top
        assert touched.last_active == at(2)
        assert [m.content for m in touched.messages] == ["a"]
        assert await repository.get(session.id) == touched
        assert await repository.delete(session.id)
        assert await repository.get(session.id) is None

    async def test_manager_writes_past_the_last_revision_are_refused(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        """Through a :class:`SessionManager`, every change of a session at revision
        ``2**63 - 1`` raises :class:`LimitExceeded` and leaves it as it was; a rotation
        leaves no second session behind."""
        top = 2**63 - 1
        session = attrs.evolve(make_session(messages=("a",)), revision=top)
        await repository.add(session)
        changes: list[tuple[str, Callable[[SessionManager], Awaitable[object]]]] = [
            ("update", lambda m: m.update(session.id, lambda s: s.with_state(k=2))),
            ("set_state", lambda m: m.set_state(session.id, k=2)),
            ("add_message", lambda m: m.add_message(session.id, "user", "b")),
            ("add_messages", lambda m: m.add_messages(session.id, [("user", "b")])),
            ("record_error", lambda m: m.record_error(session.id)),
            ("archive", lambda m: m.archive(session.id)),
            ("close", lambda m: m.close(session.id)),
            ("rotate", lambda m: m.rotate(session.id)),
        ]
        clock = ManualClock(at(1))
        async with SessionManager(
            repository, clock=clock, idle_timeout=POLICY.idle_timeout, cleanup_interval=None
        ) as sessions:
            for what, change in changes:
                error = await raises(
                    LimitExceeded, change(sessions), f"{what}() at revision 2**63 - 1"
                )
                assert (error.limit, error.actual) == (top, top + 1), what
                assert await repository.get(session.id) == session, f"{what}() stored something"
                listed = (await repository.list(SessionQuery())).items
                assert [s.id for s in listed] == [session.id], f"{what}() left {listed}"
            read = await sessions.get(session.id)
            assert read.revision == top and [m.content for m in read.messages] == ["a"]
            assert await sessions.delete(session.id)

    async def test_get_for_update_follows_this_stores_writes(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        session = make_session(messages=("one",))
        assert await repository.get_for_update(session.id) is None
        await repository.add(session)
        base = await repository.get_for_update(session.id)
        assert base == session and base is not None and base.messages.is_complete
        first = changed(base, messages=base.messages.append(msg("two")), state={"k": 2})
        await repository.save(first, expected_revision=0, new_messages=[msg("two")])
        assert await repository.get_for_update(session.id) == first
        await repository.append(session.id, [msg("three", 1)], at=at(1), policy=POLICY)
        latest = await repository.get_for_update(session.id)
        assert latest == await repository.get(session.id)
        assert latest is not None and latest.revision == 2
        assert [m.content for m in latest.messages] == ["one", "two", "three"]
        stale = repository.save(changed(first, state={"k": 3}), expected_revision=1)
        await raises(SessionConflict, stale, "a save based on an older snapshot")
        assert await repository.get_for_update(session.id) == latest
        await repository.delete(session.id)
        assert await repository.get_for_update(session.id) is None

    async def test_save_needs_exactly_the_next_revision(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        """``save()`` of a session whose revision is not ``expected_revision + 1`` (the
        snapshot as read, say) is bad input: :class:`InvalidUpdate` (a ValueError), and
        nothing is written, whether the session exists or not."""
        session = make_session(messages=("a",))
        await repository.add(session)
        missing = make_session()
        new = msg("b", 1)
        attempts: list[tuple[str, Session, Any, list[Message] | None]] = [
            ("the revision read", session, 0, None),
            ("the revision read, with new_messages", session, 0, []),
            ("two revisions on", attrs.evolve(session, revision=2), 0, None),
            (
                "a message, the revision read",
                attrs.evolve(session, messages=session.messages.append(new)),
                0,
                [new],
            ),
            ("one below the expected", session, 1, None),
            ("an unknown session, the revision read", missing, 0, None),
            ("an expected_revision that is not an int", changed(session), "0", None),
        ]
        for what, snapshot, expected, added in attempts:
            error = await raises(
                InvalidUpdate,
                repository.save(snapshot, expected_revision=expected, new_messages=added),
                f"save() of {what}",
            )
            assert isinstance(error, ValueError) and not error.recoverable, what
            assert "expected_revision" in str(error), (what, str(error))
            assert await repository.get(session.id) == session, f"save() of {what} wrote"
            assert await repository.get_for_update(session.id) == session, what
            assert await repository.get(missing.id) is None, f"save() of {what} wrote"
        await repository.save(changed(session, state={"k": 2}), expected_revision=0)

    async def test_ids_are_uuids(self, repository: SessionRepository, anyio_backend: Any) -> None:
        """Every operation that takes an id refuses one that is not a :class:`uuid.UUID`
        (its text, its int, ...) with :class:`InvalidSessionId` (a ValidationError and a
        TypeError), reading and writing nothing; answering None would hide the mistake
        (the session is there). A :class:`uuid.UUID` subclass is the same id."""
        session = make_session(messages=("a",))
        await repository.add(session)
        late = at(1000)  # past its deadline, so a remove_expired() would remove it
        operations: list[tuple[str, Callable[[Any], Awaitable[object]]]] = [
            ("get", lambda bad: repository.get(bad)),
            ("get(last_messages=1)", lambda bad: repository.get(bad, last_messages=1)),
            ("get_for_update", lambda bad: repository.get_for_update(bad)),
            (
                "append",
                lambda bad: repository.append(bad, [msg("b", 1)], at=at(1), policy=POLICY),
            ),
            ("touch", lambda bad: repository.touch(bad, at=at(1), policy=POLICY)),
            ("delete", lambda bad: repository.delete(bad)),
            ("remove_expired", lambda bad: repository.remove_expired(bad, now=late)),
            ("document_versions", lambda bad: repository.document_versions([session.id, bad])),
        ]
        for bad in not_ids(session):
            for what, operation in operations:
                error = await raises(
                    InvalidSessionId, operation(bad), f"{what}() of the id {bad!r}"
                )
                assert isinstance(error, TypeError) and isinstance(error, ValueError), what
                assert error.session_id == bad and "uuid.UUID(" in str(error), what
                assert await repository.get(session.id) == session, f"{what}({bad!r}) wrote"
        assert list(await repository.expired(late)) == [session.id]

        # a subclass of uuid.UUID names the same session (and never its str())
        same = ShoutingUUID(int=session.id.int)
        assert await repository.get(same) == session
        assert await repository.get_for_update(same) == session
        appended = await repository.append(same, [msg("b", 1)], at=at(1), policy=POLICY)
        assert appended.id == session.id and appended.revision == 1
        touched = await repository.touch(same, at=at(2), policy=POLICY)
        assert touched is not None and touched.last_active == at(2)
        versions = await repository.document_versions([same])
        assert versions is None or dict(versions) == {session.id: CURRENT_VERSION}
        assert await repository.get(session.id) == await repository.get(same) == touched
        removed = await repository.remove_expired(same, now=late)
        assert removed is not None and removed.id == session.id
        assert await repository.get(session.id) is None
        other = make_session()
        await repository.add(other)
        assert await repository.delete(ShoutingUUID(int=other.id.int))
        assert await repository.get(other.id) is None
        assert await repository.get(ShoutingUUID(int=uuid.uuid4().int)) is None

    async def test_save_missing_raises_not_found(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        session = make_session()
        await raises(
            SessionNotFound,
            repository.save(changed(session), expected_revision=0),
            "save() of an unknown id",
        )
        assert await repository.get(session.id) is None

    async def test_snapshots_never_change(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        session = make_session(messages=("one",))
        await repository.add(session)
        snapshot = await repository.get(session.id)
        assert snapshot is not None
        await repository.save(
            changed(snapshot, messages=snapshot.messages.append(msg("two")), state={"k": 9}),
            expected_revision=0,
            new_messages=[msg("two")],
        )
        await repository.append(session.id, [msg("three", 1)], at=at(1), policy=POLICY)
        assert [m.content for m in snapshot.messages] == ["one"]
        assert snapshot.state["k"] == 1 and snapshot.revision == 0
        latest = await repository.get(session.id)
        assert latest is not None
        assert [m.content for m in latest.messages] == ["one", "two", "three"]

    async def test_save_can_rewrite_history(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        session = make_session(messages=("a", "b", "c"))
        await repository.add(session)
        new = changed(session, messages=[msg("z")])
        await repository.save(new, expected_revision=0)
        loaded = await repository.get(session.id)
        assert loaded is not None and [m.content for m in loaded.messages] == ["z"]
        assert loaded.messages.total == 1

    # Windows (reads with last_messages) given back to a store: it refuses what it cannot
    # store whole, as SQLiteRepository does.

    async def test_add_of_a_window_is_refused(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        session = make_session(messages=("a", "b", "c", "d"))
        await repository.add(session)
        for n in (1, 0):
            window = await repository.get(session.id, last_messages=n)
            assert window is not None and not window.messages.is_complete
            copy = attrs.evolve(window, id=uuid.uuid4())
            await raises(InvalidUpdate, repository.add(copy), "add() of a window of messages")
            assert await repository.get(copy.id) is None
        assert list(await repository.expired(at(1000))) == [session.id]
        assert await status_counts(repository) == {SessionStatus.ACTIVE: 1}
        ids = [s.id for s in (await repository.list(SessionQuery())).items]
        assert ids == [session.id]

    async def test_save_of_a_window_extends_or_is_refused(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        session = make_session(messages=("a", "b", "c", "d"))
        await repository.add(session)
        window = await repository.get(session.id, last_messages=1)
        assert window is not None and not window.messages.is_complete
        # A window alone cannot say what the history is.
        await raises(
            InvalidUpdate,
            repository.save(changed(window, state={"k": 2}), expected_revision=0),
            "save() of a window without new_messages",
        )
        assert await repository.get(session.id) == session
        # bad input, refused before the store reads anything (so also for an unknown id)
        unknown = changed(attrs.evolve(window, id=uuid.uuid4()), state={"k": 2})
        await raises(
            InvalidUpdate,
            repository.save(unknown, expected_revision=0),
            "save() of a window without new_messages, of an unknown id",
        )
        assert await repository.get(unknown.id) is None
        # new_messages that do not extend the stored history to the window's total
        e = msg("e", 1)
        grown = changed(window, messages=window.messages.append(e), state={"k": 3})
        await raises(
            InvalidUpdate,
            repository.save(grown, expected_revision=0, new_messages=[msg("x", 1), e]),
            "save() of a window whose new_messages do not extend the stored history",
        )
        assert await repository.get(session.id) == session
        # new_messages that do: the stored history grows by them, nothing is lost
        await repository.save(grown, expected_revision=0, new_messages=[e])
        loaded = await repository.get(session.id)
        assert loaded is not None and loaded.messages.is_complete
        assert [m.content for m in loaded.messages] == ["a", "b", "c", "d", "e"]
        assert loaded.revision == 1 and loaded.state == {"k": 3}
        assert await repository.get(session.id, last_messages=2) == grown

    async def test_save_of_the_whole_history_stores_it_whatever_new_messages_say(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        session = make_session(messages=("a", "b"))
        await repository.add(session)
        # new_messages is a hint that the history only grew; a whole history wins over it
        rewritten = changed(session, messages=[msg("z", 1)])
        await repository.save(rewritten, expected_revision=0, new_messages=[msg("z", 1)])
        assert await repository.get(session.id) == rewritten
        grown = changed(rewritten, messages=rewritten.messages.append(msg("y", 2)))
        await repository.save(grown, expected_revision=1, new_messages=[msg("x"), msg("y", 2)])
        assert await repository.get(session.id) == grown
        # (a listing reads what is stored, not a snapshot the store may remember)
        listed = (await repository.list(SessionQuery())).items
        assert [s.messages.total for s in listed] == [2]
        assert await repository.get_for_update(session.id) == grown
        await repository.append(session.id, [msg("w", 3)], at=at(3), policy=POLICY)
        loaded = await repository.get(session.id)
        assert loaded is not None
        assert [m.content for m in loaded.messages] == ["z", "y", "w"]

    # -- append and windows ---------------------------------------------------------

    async def test_append_bumps_revision_and_activity(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        session = make_session(messages=("first",))
        await repository.add(session)
        result = await repository.append(
            session.id,
            [msg("second", 10), msg("third", 10, "assistant")],
            at=at(10),
            policy=POLICY,
        )
        assert result.revision == 1
        assert result.last_active == at(10) and result.expires_at == at(70)
        assert result.messages.total == 3
        assert [m.content for m in result.messages][-2:] == ["second", "third"]
        loaded = await repository.get(session.id)
        assert loaded is not None and loaded.revision == 1
        assert [m.content for m in loaded.messages] == ["first", "second", "third"]
        assert loaded.messages[2].role == "assistant"
        # What the append returned is what it stored, deadline index included: an
        # append that kept the old last_active or expires_at lets an active chat expire.
        stored = (loaded.last_active, loaded.expires_at)
        assert stored == (at(10), at(70)), (
            f"append() returned last_active {at(10)} and expires_at {at(70)} but stored "
            f"{stored}: store both with the messages and the revision"
        )
        assert list(await repository.expired(at(69))) == [], (
            "after an append moved the deadline to at(70), expired(at(69)) still lists "
            "the session: the deadline index keeps the deadline from before the append"
        )
        assert list(await repository.expired(at(70))) == [session.id]

    async def test_append_results_and_list_items_hold_the_end_of_the_history(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        """An append's result and a listing's items may hold a window of the messages
        (the built-in stores return the appended messages, and no messages): whatever
        they hold is the end of the history with ``offset`` earlier messages left out,
        ``total`` is exact, and an append's holds at least the appended messages."""
        session = make_session(messages=("a", "b"))
        await repository.add(session)
        history = ["a", "b"]

        def check(log: Any, what: str) -> None:
            contents = [m.content for m in log]
            assert log.total == len(history), (what, log.total, len(history))
            assert log.offset + len(log) == log.total, (what, log.offset, len(log))
            assert log.is_complete == (log.offset == 0), what
            assert contents == history[log.offset :], (what, contents, history)

        for batch in (["c"], ["d", "e"], []):
            result = await repository.append(
                session.id, [msg(text, 1) for text in batch], at=at(1), policy=POLICY
            )
            history += batch
            check(result.messages, f"append of {batch}")
            assert len(result.messages) >= len(batch)
        for item in (await repository.list(SessionQuery())).items:
            check(item.messages, "a listed session")

    async def test_append_refusals_store_nothing(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        closed = make_session(status=SessionStatus.EXITED)
        live = make_session(messages=("a", "b"))
        await repository.add(closed)
        await repository.add(live)
        refusals: list[tuple[uuid.UUID, datetime, int | None, type[Exception]]] = [
            (uuid.uuid4(), at(1), None, SessionNotFound),
            (closed.id, at(1), None, SessionClosed),
            (live.id, at(61), None, SessionNotFound),  # idle deadline passed
            (live.id, at(1), 3, LimitExceeded),
        ]
        for sid, when, cap, error in refusals:
            await raises(
                error,
                repository.append(
                    sid, [msg("x"), msg("y")], at=when, policy=POLICY, max_messages=cap
                ),
                "this append",
            )
        assert await repository.get(live.id) == live
        assert await repository.get(closed.id) == closed
        ok = await repository.append(live.id, [msg("c")], at=at(1), policy=POLICY, max_messages=3)
        assert ok.messages.total == 3

    async def test_append_takes_message_objects(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        """An append of anything but a sequence of :class:`Message` objects (text, a
        dict, None, a list holding a str or a dict) raises :class:`InvalidUpdate`, a
        ValidationError, and stores nothing (see ``SessionRepository._check_messages``)."""
        session = make_session(messages=("a",))
        await repository.add(session)
        bad_batches: list[object] = [
            "hi",
            b"hi",
            None,
            {"role": "user", "content": "hi"},
            ["hi"],
            [msg("b"), {"role": "user", "content": "hi"}],
            [msg("b"), None],
        ]
        for bad in bad_batches:
            what = f"append() of {type(bad).__name__} {bad!r:.40}"
            error = await raises(
                InvalidUpdate,
                repository.append(session.id, bad, at=at(1), policy=POLICY),  # type: ignore[arg-type]
                what,
            )
            assert isinstance(error, ValueError) and not error.recoverable, what
            assert "Message" in str(error), (what, str(error))
            assert await repository.get(session.id) == session, f"{what} wrote"

    async def test_times_are_aware_datetimes_and_limits_positive(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        """``at`` (append, touch) and ``now`` (remove_expired, expired) must be
        timezone-aware datetimes, and expired()'s ``limit`` an int of at least 1:
        anything else raises :class:`InvalidConfiguration` (a ValidationError), reading
        and writing nothing (see ``SessionRepository._check_time`` and ``_check_limit``).
        An aware time in another zone is the same instant."""
        session = make_session(messages=("a",))
        await repository.add(session)
        naive = at(1000).replace(tzinfo=None)
        for bad in (naive, "2026-01-01T00:00:00Z", at(1000).timestamp(), None):
            operations: list[tuple[str, Callable[[Any], Awaitable[object]]]] = [
                (
                    "append",
                    lambda t: repository.append(session.id, [msg("b")], at=t, policy=POLICY),
                ),
                ("touch", lambda t: repository.touch(session.id, at=t, policy=POLICY)),
                ("remove_expired", lambda t: repository.remove_expired(session.id, now=t)),
                ("expired", lambda t: repository.expired(t)),
            ]
            for what, operation in operations:
                error = await raises(
                    InvalidConfiguration, operation(bad), f"{what}() at {type(bad).__name__}"
                )
                assert isinstance(error, ValueError) and "timezone-aware" in str(error), what
        limits: list[Any] = [0, -1, "5", 2.0, None, True]
        for limit in limits:
            await raises(
                InvalidConfiguration, repository.expired(at(1000), limit=limit), f"limit={limit!r}"
            )
        assert await repository.get(session.id) == session
        eastern = at(1000).astimezone(timezone(timedelta(hours=-5)))
        assert list(await repository.expired(eastern, limit=1)) == [session.id]
        removed = await repository.remove_expired(session.id, now=eastern)
        assert removed is not None and removed.id == session.id
        assert await repository.get(session.id) is None

    async def test_counts_policies_and_visible_at_are_checked(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        """``last_messages`` (get, touch) and ``max_messages`` (append) are None or an
        int, never a bool, a float or text, and ``policy`` (append, touch) is an
        :class:`ExpiryPolicy`: anything else raises :class:`InvalidConfiguration` (a
        ValidationError), before the store reads anything (so also for an unknown id),
        writing nothing (see ``SessionRepository._check_last_messages``,
        ``_check_max_messages`` and ``_check_policy``). ``SessionQuery(visible_at=...)``
        takes timezone-aware datetimes only, and an aware time in another zone is the
        same instant to every store. A store that passed such values on got them
        stored (``max_messages="3"``), answered with one message (``last_messages=True``)
        or failed with its own error."""
        session = make_session(messages=("a", "b", "c"))
        missing = uuid.uuid4()
        await repository.add(session)
        bad_counts: list[Any] = [True, False, 1.5, 2.0, "2", b"2", [2]]
        bad_policies: list[Any] = [None, {"idle_timeout": 60}, timedelta(seconds=60), 60]
        operations: list[tuple[str, str, Callable[[uuid.UUID, Any], Awaitable[object]]]] = [
            ("last_messages", "get", lambda sid, n: repository.get(sid, last_messages=n)),
            (
                "last_messages",
                "touch",
                lambda sid, n: repository.touch(sid, at=at(30), policy=POLICY, last_messages=n),
            ),
            (
                "max_messages",
                "append",
                lambda sid, n: repository.append(
                    sid, [msg("d", 1)], at=at(1), policy=POLICY, max_messages=n
                ),
            ),
        ]
        for name, what, operation in operations:
            for bad in bad_counts:
                for sid, whose in ((session.id, "a stored"), (missing, "an unknown")):
                    call = f"{what}({name}={bad!r}) of {whose} id"
                    error = await raises(InvalidConfiguration, operation(sid, bad), call)
                    assert isinstance(error, ValueError) and name in str(error), (call, str(error))
                    assert await repository.get(session.id) == session, f"{call} wrote"
        policy_operations: list[tuple[str, Callable[[uuid.UUID, Any], Awaitable[object]]]] = [
            ("append", lambda sid, p: repository.append(sid, [msg("d", 1)], at=at(1), policy=p)),
            ("touch", lambda sid, p: repository.touch(sid, at=at(30), policy=p)),
        ]
        for what, operation in policy_operations:
            for bad in bad_policies:
                for sid, whose in ((session.id, "a stored"), (missing, "an unknown")):
                    call = f"{what}(policy={bad!r}) of {whose} id"
                    error = await raises(InvalidConfiguration, operation(sid, bad), call)
                    assert "ExpiryPolicy" in str(error), (call, str(error))
                    assert await repository.get(session.id) == session, f"{call} wrote"
        assert await repository.get(missing) is None

        # every int is a count: 0 or less loads none, a huge one all of them
        for n, contents in [(0, []), (-1, []), (2, ["b", "c"]), (2**70, ["a", "b", "c"])]:
            window = await repository.get(session.id, last_messages=n)
            assert window is not None and window.messages.total == 3, n
            assert [m.content for m in window.messages] == contents, n
        grown = await repository.append(
            session.id, [msg("d", 1)], at=at(1), policy=POLICY, max_messages=2**70
        )
        assert grown.messages.total == 4 and grown.revision == 1

        bad_times: list[Any] = [
            at(1).replace(tzinfo=None),
            "2026-01-01T12:00:00Z",
            at(1).timestamp(),
            at(1).date(),
        ]
        for bad in bad_times:
            try:
                SessionQuery(visible_at=bad)
            except InvalidConfiguration as error:
                assert "timezone-aware" in str(error), (bad, str(error))
            else:
                raise AssertionError(f"SessionQuery(visible_at={bad!r}) must raise")
        eastern = timezone(timedelta(hours=-5))
        for seconds, listed in [(30, [session.id]), (62, [])]:
            query = SessionQuery(visible_at=at(seconds).astimezone(eastern))
            ids = [s.id for s in (await repository.list(query)).items]
            assert ids == listed, (seconds, ids)
        for not_a_query in (None, {"owner": "alice"}, "alice"):
            try:
                await repository.list(not_a_query)  # type: ignore[arg-type]
            except InvalidConfiguration as error:  # decode_cursor() checks it for you
                assert "SessionQuery" in str(error), str(error)
            else:
                raise AssertionError(f"list({not_a_query!r}) must raise InvalidConfiguration")

    async def test_last_messages_window(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        session = make_session(messages=tuple(f"m{i}" for i in range(30)))
        await repository.add(session)
        window = await repository.get(session.id, last_messages=5)
        assert window is not None
        assert [m.content for m in window.messages] == [f"m{i}" for i in range(25, 30)]
        assert window.messages.offset == 25 and window.messages.total == 30
        none = await repository.get(session.id, last_messages=0)
        assert none is not None and len(none.messages) == 0 and none.messages.total == 30
        touched = await repository.touch(session.id, at=at(1), policy=POLICY, last_messages=2)
        assert touched is not None and [m.content for m in touched.messages] == ["m28", "m29"]

    # -- activity, deletion, expiry ---------------------------------------------------

    async def test_touch_moves_activity_not_revision(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        session = make_session()
        await repository.add(session)
        touched = await repository.touch(session.id, at=at(30), policy=POLICY)
        assert touched is not None
        assert touched.last_active == at(30) and touched.expires_at == at(90)
        assert touched.revision == 0
        assert await repository.get(session.id) == touched
        assert list(await repository.expired(at(89))) == []
        assert list(await repository.expired(at(90))) == [session.id]

    async def test_late_appends_and_touches_never_move_activity_back(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        """An append or touch whose ``at`` is earlier than the stored ``last_active`` (a
        writer whose clock lags, a request that read the time before another wrote)
        keeps ``last_active`` and the idle deadline where they are: activity never moves
        back. (Setting ``last_active = at`` passed every other contract test.)"""
        session = make_session(messages=("a",))
        await repository.add(session)
        moved = await repository.touch(session.id, at=at(30), policy=POLICY)
        assert moved is not None and moved.last_active == at(30)
        appended = await repository.append(session.id, [msg("b", 10)], at=at(10), policy=POLICY)
        assert appended.last_active == at(30) and appended.expires_at == at(90)
        assert appended.revision == 1 and appended.messages.total == 2
        touched = await repository.touch(session.id, at=at(20), policy=POLICY)
        assert touched is not None
        assert touched.last_active == at(30) and touched.expires_at == at(90)
        stored = await repository.get(session.id)
        assert stored is not None
        assert stored.last_active == at(30) and stored.expires_at == at(90)
        assert list(await repository.expired(at(89))) == []

    async def test_touch_never_revives(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        idle = make_session()
        closed = make_session(status=SessionStatus.CRASHED)
        await repository.add(idle)
        await repository.add(closed)
        late = await repository.touch(idle.id, at=at(61), policy=POLICY)
        assert late == idle
        assert await repository.touch(closed.id, at=at(1), policy=POLICY) == closed
        assert await repository.get(closed.id) == closed

    async def test_activity_after_the_stored_deadline_never_revives(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        """A session whose stored ``expires_at`` has passed stays expired, even under a
        policy that would give it a later deadline (a manager started again with a
        longer ``idle_timeout``): ``touch()`` returns it unchanged and ``append()``
        raises :class:`SessionNotFound`, storing nothing."""
        session = make_session(messages=("a",))  # expires at(60) under POLICY
        await repository.add(session)
        longer = ExpiryPolicy(idle_timeout=timedelta(seconds=120), max_age=None)
        touched = await repository.touch(session.id, at=at(70), policy=longer)
        assert touched == session, (
            "touch() after the stored expires_at revived the session under a longer "
            f"policy: {touched!r:.300}; a session with expires_at <= at is returned unchanged"
        )
        await raises(
            SessionNotFound,
            repository.append(session.id, [msg("late", 70)], at=at(70), policy=longer),
            "append() after the stored expires_at, under a longer policy,",
        )
        assert await repository.get(session.id) == session
        assert session.id in await repository.expired(at(70))

    async def test_delete(self, repository: SessionRepository, anyio_backend: Any) -> None:
        session = make_session(messages=("x",))
        await repository.add(session)
        assert await repository.delete(session.id) is True
        assert await repository.get(session.id) is None
        assert await repository.delete(session.id) is False
        assert list(await repository.expired(at(1000))) == []

    async def test_deadline_index(self, repository: SessionRepository, anyio_backend: Any) -> None:
        sessions = [make_session(created=float(i)) for i in range(5)]
        for session in reversed(sessions):
            await repository.add(session)
        forever = attrs.evolve(make_session(), expires_at=None)
        await repository.add(forever)
        order = (
            "expired(now) lists the ids whose expires_at <= now, earliest deadline first, "
            "at most limit of them"
        )
        assert list(await repository.expired(at(59))) == [], order
        assert list(await repository.expired(at(62))) == [s.id for s in sessions[:3]], order
        due = [s.id for s in sessions[:2]]
        assert list(await repository.expired(at(1000), limit=2)) == due, order
        # the index follows saves (made before the deadline: see
        # test_a_save_finds_a_session_expired_at_its_time)
        moved = changed(sessions[0], last_active=at(50), expires_at=at(110))
        await repository.save(moved, expected_revision=0)
        assert list(await repository.expired(at(62))) == [s.id for s in sessions[1:3]]

    async def test_saves_move_deadlines_either_way(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        session = make_session()  # idle deadline at(60)
        other = make_session(created=1)  # at(61)
        await repository.add(session)
        await repository.add(other)
        # closing files the (earlier) retention deadline
        closed = changed(session, status=SessionStatus.EXITED, closed_at=at(1), expires_at=at(11))
        await repository.save(closed, expected_revision=0)
        assert list(await repository.expired(at(10))) == []
        assert list(await repository.expired(at(20))) == [session.id]
        assert list(await repository.expired(at(61))) == [session.id, other.id]
        later = changed(closed, expires_at=at(100))
        await repository.save(later, expected_revision=1)
        assert list(await repository.expired(at(99))) == [other.id]
        forever = changed(later, expires_at=None)
        await repository.save(forever, expected_revision=2)
        assert list(await repository.expired(at(1000))) == [other.id]
        back = changed(forever, expires_at=at(30))
        await repository.save(back, expected_revision=3)
        assert list(await repository.expired(at(40))) == [session.id]
        assert await repository.remove_expired(session.id, now=at(40)) == back
        assert list(await repository.expired(at(1000))) == [other.id]

    async def test_remove_expired_exactly_once(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        session = make_session(messages=("bye",))
        await repository.add(session)
        assert await repository.remove_expired(session.id, now=at(59)) is None
        assert await repository.get(session.id) == session

        async def remove() -> None:
            results.append(await repository.remove_expired(session.id, now=at(60)))

        results: list[Session | None] = []
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(remove)
        removed = [r for r in results if r is not None]
        assert len(removed) == 1 and removed[0].id == session.id
        assert await repository.get(session.id) is None
        assert list(await repository.expired(at(1000))) == []

    async def test_remove_expired_keeps_unreadable_documents(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        bad = make_session(messages=("kept",))
        newer = make_session(messages=("kept",))
        for session in (bad, newer):
            await repository.add(session)
        await self.replace_document(repository, bad.id, b'{"version": 1, "id')
        future = {**orjson.loads(version_0_document(newer)), "version": CURRENT_VERSION + 1}
        await self.replace_document(repository, newer.id, orjson.dumps(future))
        assert await repository.remove_expired(bad.id, now=at(59)) is None  # not due: not read
        for session, error_type in ((bad, CorruptSessionError), (newer, SchemaVersionError)):
            what = f"remove_expired() of {session.id}'s unreadable document"
            try:
                removed = await repository.remove_expired(session.id, now=at(60))
            except error_type as exc:
                # Not removed: it stays as it was, for a repair or an explicit delete(),
                # and listed, so that cleanup tries it again at its next pass.
                assert exc.session_id == session.id, what
                if session is bad or self.lists_newer_documents_as_expired:
                    assert session.id in await repository.expired(at(60)), f"{what}: unlisted"
                await raises(error_type, repository.get(session.id), f"get() after {what}")
                await raises(error_type, repository.remove_expired(session.id, now=at(60)), what)
            else:
                # Or set aside (quarantined) by a store that does so: gone from the store,
                # never handed out as removed.
                assert removed is None, f"{what} returned a session"
                assert session.id not in await repository.expired(at(60)), what
                continue
            if session is bad:  # repaired: removed with its history
                repair = version_0_document(bad)
                await self.replace_document(repository, bad.id, repair)
                repaired = await repository.remove_expired(bad.id, now=at(60))
                assert repaired is not None and repaired.id == bad.id
                # the history kept beside the document, or (a store that keeps it in
                # the document) what the repairing document holds: none
                held = loads(repair).messages.total
                assert repaired.messages.total in (1, held), (
                    f"the repaired session was removed with {repaired.messages.total} "
                    f"messages, neither its history (1) nor its document's ({held})"
                )
            else:
                assert await repository.delete(newer.id) is True
            assert session.id not in await repository.expired(at(60))
        assert list(await repository.expired(at(1000))) == []

    # -- listing --------------------------------------------------------------------

    async def test_list_filters(self, repository: SessionRepository, anyio_backend: Any) -> None:
        a = make_session(owner="alice", name="Feature-X", created=1)
        b = make_session(owner="alice", name=None, created=2, messages=("Fix the FEATURE",))
        c = make_session(owner="bob", name="other", created=3)
        d = attrs.evolve(
            make_session(owner="alice", name="zzz", created=4),
            status=SessionStatus.ARCHIVED,
            expires_at=None,
        )
        for s in (a, b, c, d):
            await repository.add(s)

        async def ids(**kw: Any) -> list[uuid.UUID]:
            return [s.id for s in (await repository.list(SessionQuery(**kw))).items]

        assert await ids() == [d.id, c.id, b.id, a.id]
        assert await ids(owner="alice") == [d.id, b.id, a.id]
        assert await ids(owner="nobody") == []
        assert await ids(status=SessionStatus.ARCHIVED) == [d.id]
        assert await ids(owner="alice", status=[SessionStatus.ACTIVE]) == [b.id, a.id]
        assert await ids(status=[]) == []  # no status asked for: nothing matches
        assert await ids(owner="alice", status=[]) == []
        assert await ids(search="feature") == [b.id, a.id]
        assert await ids(search="FIX") == [b.id]
        assert await ids(visible_at=at(62)) == [d.id, c.id]
        page = await repository.list(SessionQuery(owner="alice", limit=1))
        assert page.items[0].messages.total == 0

    async def test_list_and_count_by_every_set_of_statuses(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        """A status filter keeps exactly the sessions of the statuses asked for, however
        many (any subset of the statuses, each alone or with others, with or without an
        owner), and count_by_status() counts each status, for an owner or all. (A filter
        that kept only its first status, or let one closed status through, passed every
        other test: review of the state machine.)"""
        made: list[Session] = []
        for i, status in enumerate(SessionStatus):
            for j, who in enumerate(("alice", "bob")):
                made.append(make_session(owner=who, created=2 * i + j, status=status))
        for session in made:
            await repository.add(session)
        newest_first = sorted(made, key=lambda s: s.created_at, reverse=True)
        statuses = list(SessionStatus)
        for mask in range(1, 2 ** len(statuses)):
            wanted = {status for bit, status in enumerate(statuses) if mask >> bit & 1}
            owner: str | None
            for owner in (None, "alice"):
                query = SessionQuery(owner=owner, status=wanted)
                got = [s.id for s in (await repository.list(query)).items]
                expected = [
                    s.id for s in newest_first if s.status in wanted and owner in (None, s.owner)
                ]
                assert got == expected, (sorted(wanted), owner)
        for owner in (None, "alice", "bob", "nobody"):
            counts = dict(await repository.count_by_status(owner))
            expected_counts = {
                status: n
                for status in SessionStatus
                if (n := sum(s.status is status and owner in (None, s.owner) for s in made))
            }
            assert counts == expected_counts, owner

    async def test_list_pages_stay_correct_during_creates(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        originals = [make_session(created=float(i) / 10) for i in range(25)]
        for s in originals:
            await repository.add(s)
        newer = 0

        async def create() -> None:
            nonlocal newer
            await repository.add(make_session(created=100.0 + newer))  # created mid-listing
            newer += 1

        expected = [s.id for s in reversed(originals)]
        seen = await page_through(repository, SessionQuery(limit=7), len(expected), create)
        assert seen == expected, f"pages of 7 skip or reorder sessions ({LISTING_ORDER})"

    async def test_list_pages_through_equal_activity(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        # Sessions active at the same instant are the rule under a ManualClock.
        tied = [make_session(created=5, owner="alice") for _ in range(5)]
        older = make_session(created=1, owner="alice")
        newer = make_session(created=9, owner="alice")
        for s in (*tied, older, newer):
            await repository.add(s)
        ties = sorted((s.id for s in tied), key=lambda i: i.int, reverse=True)
        expected = [newer.id, *ties, older.id]  # newest first, ties by id descending
        for owner in (None, "alice"):
            for limit in (1, 2, 3, 7):
                query = SessionQuery(owner=owner, limit=limit)
                seen = await page_through(repository, query, len(expected))
                what = f"pages of {limit} (owner={owner!r})"
                assert set(seen) == set(expected), f"{what} skip sessions: {seen}"
                assert seen == expected, (
                    f"{what} list sessions in another order; the order is {LISTING_ORDER}: "
                    f"expected {expected}, got {seen}"
                )

    async def test_listings_follow_appends_and_touches(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        """An append and a touch move a session's ``last_active``, so its place in a
        listing, and its ``expires_at``, so what ``visible_at`` hides: a store that
        lists by a ``last_active`` column or index must move it on every write and
        touch, not only on add and save."""
        a, b, c = (make_session(created=float(i), messages=("x",)) for i in range(3))
        for session in (a, b, c):
            await repository.add(session)

        async def listed(what: str, expected: list[tuple[Session, float]]) -> None:
            want = [(s.id, at(t)) for s, t in expected]
            for owner in (None, "alice"):
                query = SessionQuery(owner=owner)
                got = [(s.id, s.last_active) for s in (await repository.list(query)).items]
                assert got == want, (
                    f"list(owner={owner!r}) {what}: expected (id, last_active) {want}, got "
                    f"{got}; the order is {LISTING_ORDER}, by the stored last_active"
                )
                for limit in (1, 2):
                    paged = await page_through(repository, attrs.evolve(query, limit=limit), 3)
                    assert paged == [i for i, _ in want], f"pages of {limit} {what}: {paged}"

        await listed("after the adds", [(c, 2), (b, 1), (a, 0)])
        await repository.append(a.id, [msg("y", 5)], at=at(5), policy=POLICY)
        await listed("after an append to the oldest at(5)", [(a, 5), (c, 2), (b, 1)])
        touched = await repository.touch(b.id, at=at(6), policy=POLICY)
        assert touched is not None and touched.last_active == at(6)
        await listed("after a touch of the oldest at(6)", [(b, 6), (a, 5), (c, 2)])
        # deadlines: c's at(62) has passed at(63), a's (at(65)) and b's (at(66)) have not
        visible = await repository.list(SessionQuery(visible_at=at(63)))
        assert [s.id for s in visible.items] == [b.id, a.id], (
            "list(visible_at=at(63)) must follow the deadlines the append and the touch "
            f"moved: {[(s.id, s.expires_at) for s in visible.items]}"
        )

    async def test_owner_filter_follows_saves(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        moved = make_session(owner="alice")
        stays = make_session(owner="alice", created=1)
        await repository.add(moved)
        await repository.add(stays)

        async def ids(owner: str) -> list[uuid.UUID]:
            return [s.id for s in (await repository.list(SessionQuery(owner=owner))).items]

        to_bob = changed(moved, owner="bob")
        await repository.save(to_bob, expected_revision=0)
        assert await ids("bob") == [moved.id]
        assert await ids("alice") == [stays.id]
        assert await status_counts(repository, "bob") == {SessionStatus.ACTIVE: 1}
        assert await status_counts(repository, "alice") == {SessionStatus.ACTIVE: 1}
        to_nobody = changed(to_bob, owner=None)
        await repository.save(to_nobody, expected_revision=1)
        assert await ids("bob") == []
        assert await status_counts(repository, "bob") == {}
        all_ids = [s.id for s in (await repository.list(SessionQuery())).items]
        assert all_ids == [stays.id, moved.id]
        await repository.save(changed(to_nobody, owner="alice"), expected_revision=2)
        assert await ids("alice") == [stays.id, moved.id]
        assert await status_counts(repository, "alice") == {SessionStatus.ACTIVE: 2}

    async def test_list_rejects_foreign_cursors(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        for i in range(3):
            await repository.add(make_session(created=float(i)))
        page = await repository.list(SessionQuery(limit=1))
        assert page.next_cursor is not None
        for bad in ("garbage", "", page.next_cursor + "x"):
            await raises(
                InvalidCursor, repository.list(SessionQuery(cursor=bad)), f"cursor {bad!r}"
            )
        await raises(
            InvalidCursor,
            repository.list(SessionQuery(owner="bob", cursor=page.next_cursor)),
            "a cursor of another query",
        )

    async def test_count_by_status(self, repository: SessionRepository, anyio_backend: Any) -> None:
        for status, n in ((SessionStatus.ACTIVE, 3), (SessionStatus.CRASHED, 2)):
            for _ in range(n):
                await repository.add(make_session(status=status, owner="o"))
        await repository.add(make_session(owner="p"))
        counts = await status_counts(repository)
        assert counts == {SessionStatus.ACTIVE: 4, SessionStatus.CRASHED: 2}
        assert await status_counts(repository, "p") == {SessionStatus.ACTIVE: 1}
        assert await status_counts(repository, "nobody") == {}
        # An owner that no session can have (not a non-empty printable str of at most
        # 256 characters) is a mistake: InvalidOwner, as SessionQuery(owner=...) raises,
        # not {} on one store and the owner's text's count on another.
        bad: Any
        for bad in (uuid.UUID(int=1), 42, "", "x" * 257):
            await raises(InvalidOwner, repository.count_by_status(bad), f"count_by_status({bad!r})")

    async def test_counts_follow_changes_and_removals(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        a = make_session(owner="o")
        b = make_session(owner="o")
        c = make_session(owner="p")
        for s in (a, b, c):
            await repository.add(s)

        async def counts(owner: str | None = None) -> dict[SessionStatus, int]:
            return await status_counts(repository, owner)

        archived = changed(a, status=SessionStatus.ARCHIVED, expires_at=None)
        await repository.save(archived, expected_revision=0)
        assert await counts() == {SessionStatus.ACTIVE: 2, SessionStatus.ARCHIVED: 1}
        assert await counts("o") == {SessionStatus.ACTIVE: 1, SessionStatus.ARCHIVED: 1}
        assert await repository.delete(b.id)
        assert await counts() == {SessionStatus.ACTIVE: 1, SessionStatus.ARCHIVED: 1}
        assert await counts("o") == {SessionStatus.ARCHIVED: 1}
        assert await repository.remove_expired(c.id, now=at(60)) is not None
        assert await counts() == {SessionStatus.ARCHIVED: 1}
        assert await counts("p") == {}
        exited = changed(archived, status=SessionStatus.EXITED, closed_at=at(1), expires_at=at(11))
        await repository.save(exited, expected_revision=1)
        assert await counts() == {SessionStatus.EXITED: 1}
        assert await repository.remove_expired(a.id, now=at(11)) is not None
        assert await counts() == {}
        assert await counts("o") == {}

    # -- concurrency ----------------------------------------------------------------

    async def test_concurrent_appends_lose_nothing(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        session = make_session()
        await repository.add(session)

        async def writer(n: int) -> None:
            for i in range(10):
                await repository.append(session.id, [msg(f"{n}-{i}", 1)], at=at(1), policy=POLICY)

        async with anyio.create_task_group() as tg:
            for n in range(10):
                tg.start_soon(writer, n)
        loaded = await repository.get(session.id)
        assert loaded is not None
        assert loaded.revision == 100 and loaded.messages.total == 100
        assert len({m.content for m in loaded.messages}) == 100

    async def test_concurrent_compare_and_set_has_one_winner(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        session = make_session()
        await repository.add(session)
        wins: list[int] = []

        async def writer(n: int) -> None:
            try:
                await repository.save(changed(session, state={"winner": n}), expected_revision=0)
            except SessionConflict:
                return
            wins.append(n)

        async with anyio.create_task_group() as tg:
            for n in range(8):
                tg.start_soon(writer, n)
        loaded = await repository.get(session.id)
        assert len(wins) == 1, (
            f"{len(wins)} of 8 concurrent saves with expected_revision=0 succeeded: "
            "compare-and-set must let exactly one win (check the revision and write in "
            "one step, with no await between them)"
        )
        assert loaded is not None and loaded.state == {"winner": wins[0]} and loaded.revision == 1

    async def test_cancelled_operations_leave_whole_states(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        session = make_session()
        await repository.add(session)
        for i in range(20):
            with anyio.CancelScope() as scope:
                scope.cancel()
                await repository.append(session.id, [msg(f"c{i}", 1)], at=at(1), policy=POLICY)
        loaded = await repository.get(session.id)
        assert loaded is not None
        assert loaded.revision == loaded.messages.total
        contents = [m.content for m in loaded.messages]
        present = set(contents)
        assert contents == [f"c{i}" for i in range(20) if f"c{i}" in present]
        after = await repository.append(session.id, [msg("next", 2)], at=at(2), policy=POLICY)
        assert after.revision == loaded.revision + 1

    async def test_appends_cancelled_at_each_await_leave_whole_states(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        session = make_session(messages=())
        await repository.add(session)

        def operation(i: int) -> Callable[[], Awaitable[object]]:
            pair = [msg(f"c{i}", 1), msg(f"d{i}", 1)]
            return lambda: repository.append(session.id, pair, at=at(1), policy=POLICY)

        async def check(i: int, finished: bool) -> None:
            loaded = await repository.get(session.id)
            assert loaded is not None
            contents = [m.content for m in loaded.messages]
            assert loaded.revision * 2 == loaded.messages.total, (
                f"an append cancelled after {i} checkpoints left revision "
                f"{loaded.revision} with {loaded.messages.total} messages: a mix"
            )
            present = set(contents)
            whole = [t for j in range(i + 1) if f"c{j}" in present for t in (f"c{j}", f"d{j}")]
            assert contents == whole, f"an append cancelled after {i} checkpoints: {contents}"
            assert f"c{i}" in present or not finished, "a finished append was lost"
            await indexes_agree(repository, loaded, f"an append cancelled after {i} checkpoints")

        await cancel_at_each_await(operation, check)
        loaded = await repository.get(session.id)
        assert loaded is not None
        after = await repository.append(session.id, [msg("next", 2)], at=at(2), policy=POLICY)
        assert after.revision == loaded.revision + 1

    async def test_saves_cancelled_at_each_await_leave_whole_states(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        # Each save moves last_active and the deadline (the index must follow); neither
        # deadline is ever reached, however many saves are cut off before they write.
        session = attrs.evolve(make_session(messages=("start",)), expires_at=at(10**6))
        await repository.add(session)
        current = session
        pending = session

        def operation(i: int) -> Callable[[], Awaitable[object]]:
            nonlocal pending
            new = msg(f"s{i}", 1 + i)
            base = current
            pending = changed(
                base,
                messages=base.messages.append(new),
                state={"k": i},
                last_active=at(1 + i),
                expires_at=at(10**6 + i),
            )
            save = pending
            return lambda: repository.save(
                save, expected_revision=base.revision, new_messages=[new]
            )

        async def check(i: int, finished: bool) -> None:
            nonlocal current
            loaded = await repository.get(session.id)
            assert loaded is not None
            assert loaded == pending or (loaded == current and not finished), (
                f"a save cancelled after {i} checkpoints left neither the old nor the new "
                f"state: {loaded!r:.300}"
            )
            await indexes_agree(repository, loaded, f"a save cancelled after {i} checkpoints")
            current = loaded

        await cancel_at_each_await(operation, check)
        last = changed(current, state={"k": "last"})
        await repository.save(last, expected_revision=current.revision)
        assert await repository.get(session.id) == last

    async def test_touches_cancelled_at_each_await_leave_whole_states(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        """A touch (every read through a manager) moves ``last_active`` and
        ``expires_at`` together or not at all, deadline index included: a read its
        client gave up on must not leave a session active now whose deadline is the old
        one (it expires while in use) or the reverse."""
        idle = timedelta(days=30)
        policy = ExpiryPolicy(idle_timeout=idle)
        session = attrs.evolve(make_session(messages=("a",)), expires_at=at(0) + idle)
        await repository.add(session)
        current = session

        def operation(i: int) -> Callable[[], Awaitable[object]]:
            return lambda: repository.touch(session.id, at=at(1 + i), policy=policy)

        async def check(i: int, finished: bool) -> None:
            nonlocal current
            what = f"a touch at({1 + i}) cancelled after {i // TRIES} checkpoints"
            loaded = await repository.get(session.id)
            assert loaded is not None, f"{what} lost the session"
            active, deadline = loaded.last_active, loaded.expires_at
            assert deadline == active + idle, (
                f"{what} left last_active {active} with expires_at {deadline}, half of it; "
                "write both in one atomic step"
            )
            assert active in (current.last_active, at(1 + i)), f"{what} left {active}"
            assert active == at(1 + i) or not finished, f"{what}: a finished touch was lost"
            assert loaded == attrs.evolve(session, last_active=active, expires_at=deadline)
            assert session.id not in await repository.expired(deadline - timedelta(seconds=1))
            assert list(await repository.expired(deadline)) == [session.id], (
                f"{what} left the deadline index apart from the stored expires_at {deadline}"
            )
            (item,) = (await repository.list(SessionQuery())).items
            assert item.last_active == active, f"{what}: listed at {item.last_active}"
            current = loaded

        await cancel_at_each_await(operation, check)

    async def test_adds_cancelled_at_each_await_leave_whole_states(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        """An add (a create) cancelled at any await stores the whole session, every
        index included, or nothing: a half-written one would never be cleaned up, or
        be cleaned up unseen."""
        sessions: dict[int, Session] = {}

        def operation(i: int) -> Callable[[], Awaitable[object]]:
            session = sessions[i] = make_session(messages=("a",))
            return lambda: repository.add(session)

        async def check(i: int, finished: bool) -> None:
            what = f"an add cancelled after {i // TRIES} checkpoints"
            session = sessions.pop(i)
            stored = await stored_whole(repository, session, now=at(60), what=what)
            assert stored or not finished, f"{what}: a finished add was lost"
            if stored:
                assert await repository.delete(session.id)

        await cancel_at_each_await(operation, check)

    async def test_deletes_cancelled_at_each_await_leave_whole_states(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        """A delete cancelled at any await removes the whole session, every index
        included, or nothing."""
        await self._removals_cancelled_at_each_await(
            repository, "a delete", lambda session: repository.delete(session.id)
        )

    async def test_removals_cancelled_at_each_await_leave_whole_states(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        """A ``remove_expired`` (a cleanup pass) cancelled at any await removes the whole
        session, every index included, or nothing: an expired session left out of the
        deadline index is never cleaned up."""
        await self._removals_cancelled_at_each_await(
            repository,
            "a remove_expired",
            lambda session: repository.remove_expired(session.id, now=at(60)),
        )

    @staticmethod
    async def _removals_cancelled_at_each_await(
        repository: SessionRepository,
        name: str,
        remove: Callable[[Session], Awaitable[object]],
    ) -> None:
        current = make_session(messages=("a",))  # expired at(60)
        await repository.add(current)

        def operation(i: int) -> Callable[[], Awaitable[object]]:
            session = current
            return lambda: remove(session)

        async def check(i: int, finished: bool) -> None:
            nonlocal current
            what = f"{name} cancelled after {i // TRIES} checkpoints"
            stored = await stored_whole(repository, current, now=at(60), what=what)
            assert not (stored and finished), f"{what}: a finished removal left the session"
            if stored:
                assert await repository.delete(current.id)
            current = make_session(messages=("a",))
            await repository.add(current)

        await cancel_at_each_await(operation, check)

    async def test_touch_under_a_shorter_policy_is_indexed(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        session = make_session()  # idle deadline at(60) under POLICY
        await repository.add(session)
        short = ExpiryPolicy(idle_timeout=timedelta(seconds=5))
        touched = await repository.touch(session.id, at=at(1), policy=short)
        assert touched is not None and touched.expires_at == at(6)
        assert list(await repository.expired(at(7))) == [session.id]
        assert (await repository.remove_expired(session.id, now=at(7))) is not None

    async def test_appends_and_touches_past_a_new_deadline_record_it(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        """A policy whose deadline for the session is at or before ``at`` (a ``max_age``
        added or shortened since it was written): the append raises SessionNotFound and
        the touch returns it expired; either records that deadline and nothing else."""
        forever = ExpiryPolicy(idle_timeout=None, max_age=None)
        short = ExpiryPolicy(
            idle_timeout=timedelta(seconds=60),
            max_age=timedelta(seconds=10),
            touch_interval=timedelta(seconds=1000),  # the deadline is checked all the same
        )
        appended, touched, exact = (
            attrs.evolve(make_session(messages=("a",)), expires_at=None) for _ in range(3)
        )
        for session in (appended, touched, exact):
            await repository.add(session)
        kept = await repository.touch(appended.id, at=at(5), policy=forever)
        assert kept is not None and kept.expires_at is None
        await raises(
            SessionNotFound,
            repository.append(appended.id, [msg("late", 20)], at=at(20), policy=short),
            "an append past the policy's deadline",
        )
        stored = await repository.get(appended.id)
        assert stored == attrs.evolve(kept, expires_at=at(10))
        reply = await repository.touch(touched.id, at=at(20), policy=short, last_messages=0)
        assert reply is not None and reply.is_expired(at(20))
        assert reply.expires_at == at(10) and reply.last_active == at(0)
        assert await repository.get(touched.id) == attrs.evolve(touched, expires_at=at(10))
        await raises(  # a deadline equal to the time has passed
            SessionNotFound,
            repository.append(exact.id, [msg("late", 10)], at=at(10), policy=short),
            "an append at the policy's deadline",
        )
        assert await repository.get(exact.id) == attrs.evolve(exact, expires_at=at(10))
        ids = {appended.id, touched.id, exact.id}
        assert set(await repository.expired(at(20))) == ids
        assert (await repository.list(SessionQuery(visible_at=at(20)))).items == ()
        for sid in ids:
            assert await repository.remove_expired(sid, now=at(20)) is not None

    async def test_appends_and_touches_past_a_shorter_idle_timeout_record_it(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        """The policy's deadline is computed from the *stored* ``last_active``: a session
        idle for longer than an ``idle_timeout`` shortened (or added) since it was
        written has expired for a write or touch, however recent ``at`` (a deadline
        computed from ``at`` would never be past). The append raises SessionNotFound and
        the touch returns it expired; either records that deadline and nothing else.
        A session idle for less gets its new deadline from ``at`` as always, also after
        a touch that ``touch_interval`` coalesced; an archived one does not idle out."""
        short = ExpiryPolicy(
            idle_timeout=timedelta(seconds=10), touch_interval=timedelta(seconds=5)
        )
        appended, touched, exact, recent = (make_session(messages=("a",)) for _ in range(4))
        parked = make_session(status=SessionStatus.ARCHIVED)
        for session in (appended, touched, exact, recent, parked):
            await repository.add(session)  # each idle deadline at(60) under POLICY
        await raises(
            SessionNotFound,
            repository.append(appended.id, [msg("late", 30)], at=at(30), policy=short),
            "an append after longer idleness than a shorter idle_timeout",
        )
        assert await repository.get(appended.id) == attrs.evolve(appended, expires_at=at(10))
        reply = await repository.touch(touched.id, at=at(30), policy=short, last_messages=0)
        assert reply is not None and reply.is_expired(at(30))
        assert reply.expires_at == at(10) and reply.last_active == at(0)
        assert await repository.get(touched.id) == attrs.evolve(touched, expires_at=at(10))
        await raises(  # idle exactly as long as the timeout: expired
            SessionNotFound,
            repository.append(exact.id, [msg("late", 10)], at=at(10), policy=short),
            "an append exactly idle_timeout after the last activity",
        )
        assert await repository.get(exact.id) == attrs.evolve(exact, expires_at=at(10))
        moved = await repository.touch(recent.id, at=at(9), policy=short)
        assert moved is not None and (moved.last_active, moved.expires_at) == (at(9), at(19))
        coalesced = await repository.touch(recent.id, at=at(13), policy=short)
        assert coalesced == moved  # moved by less than touch_interval: nothing written
        added = await repository.append(recent.id, [msg("b", 18)], at=at(18), policy=short)
        assert (added.last_active, added.expires_at, added.revision) == (at(18), at(28), 1)
        kept = await repository.touch(parked.id, at=at(30), policy=short)
        assert kept is not None and kept.expires_at is None and kept.last_active == at(30)
        ids = {appended.id, touched.id, exact.id}
        assert set(await repository.expired(at(20))) == ids
        listed = await repository.list(SessionQuery(visible_at=at(20)))
        assert {x.id for x in listed.items} == {recent.id, parked.id}
        for sid in ids:
            assert await repository.remove_expired(sid, now=at(20)) is not None

    async def test_a_save_finds_a_session_expired_at_its_time(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        """A save is a write at the saved session's ``last_active``: a stored session
        whose ``expires_at`` is at or before it has expired, so the save raises
        SessionNotFound and writes nothing, as an append would. That holds for a deadline
        a touch under a shorter policy recorded (which leaves the revision, so the
        compare-and-set alone let such a save bring the session back) as for one stored
        with the session. A save that keeps the stored ``expires_at`` and status (a
        rewrite of the document) brings nothing back and is allowed."""
        short = ExpiryPolicy(idle_timeout=timedelta(seconds=60), max_age=timedelta(seconds=10))
        recorded, closing, stored, early, rewritten = (
            attrs.evolve(make_session(messages=("a",)), expires_at=None) for _ in range(5)
        )
        stored = attrs.evolve(stored, expires_at=at(30))
        early = attrs.evolve(early, expires_at=at(30))
        rewritten = attrs.evolve(rewritten, expires_at=at(30))
        for session in (recorded, closing, stored, early, rewritten):
            await repository.add(session)
        for session in (recorded, closing):  # the deadline at(10) recorded at(20)
            reply = await repository.touch(session.id, at=at(20), policy=short)
            assert reply is not None and reply.expires_at == at(10)
        forever = changed(recorded, last_active=at(21), state={"k": 2}, expires_at=None)
        await raises(
            SessionNotFound,
            repository.save(forever, expected_revision=0, new_messages=()),
            "a save over a deadline a touch recorded",
        )
        closed = changed(
            closing,
            last_active=at(21),
            status=SessionStatus.EXITED,
            closed_at=at(21),
            expires_at=at(31),
        )
        await raises(
            SessionNotFound,
            repository.save(closed, expected_revision=0),
            "a save closing a session whose recorded deadline passed",
        )
        later = changed(stored, last_active=at(30), expires_at=at(90))  # exactly at it
        await raises(
            SessionNotFound,
            repository.save(later, expected_revision=0, new_messages=()),
            "a save at the stored deadline",
        )
        for session in (recorded, closing):
            assert await repository.get(session.id) == attrs.evolve(session, expires_at=at(10))
        assert await repository.get(stored.id) == stored
        # Before the stored deadline, a save moves it as always.
        moved = changed(early, last_active=at(29), expires_at=at(89))
        await repository.save(moved, expected_revision=0, new_messages=())
        assert await repository.get(early.id) == moved
        # A rewrite that keeps the passed deadline and the status brings nothing back.
        kept = changed(rewritten, last_active=at(40), state={"k": 3})
        await repository.save(kept, expected_revision=0)
        assert await repository.get(rewritten.id) == kept
        expired = {recorded.id, closing.id, stored.id, rewritten.id}
        assert set(await repository.expired(at(40))) == expired
        assert [x.id for x in (await repository.list(SessionQuery(visible_at=at(40)))).items] == [
            early.id
        ]

    async def test_touch_interval_coalesces_activity(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        session = make_session()
        await repository.add(session)
        coarse = attrs.evolve(POLICY, touch_interval=timedelta(seconds=1))
        early = await repository.touch(session.id, at=at(0.5), policy=coarse)
        assert early == session  # moved by less than the interval: nothing written
        assert await repository.get(session.id) == session
        moved = await repository.touch(session.id, at=at(1), policy=coarse)
        assert moved is not None and moved.last_active == at(1)
        assert moved.expires_at == at(61) and moved.revision == 0

    # -- opening and closing ----------------------------------------------------------
    # The base class counts opens: the first open() calls _open(), the last aclose()
    # calls _close(). A store acquires its resources in _open() and releases them in
    # _close(), and overrides neither open() nor aclose().

    async def test_nested_opens_are_counted(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        """The fixture's open holds the store open through a nested ``async with
        store`` and through a manager's (which opens and closes the store it is given):
        an application that keeps its store open can still use it after either ends."""
        session = make_session(messages=("a",))
        await repository.add(session)

        async def still_open(after: str) -> None:
            try:
                loaded = await repository.get(session.id)
            except Exception as exc:
                raise AssertionError(
                    f"after {after} ended, get() raised {exc!r}, yet the store was opened "
                    "before it and not closed: nested opens are counted and only the last "
                    "close releases resources. Override _open() and _close(), which the "
                    "base class calls at the first open and the last close, not open() "
                    "and aclose()"
                ) from exc
            assert loaded is not None and loaded.id == session.id, f"after {after}: {loaded}"

        async with repository as opened:
            assert opened is repository
            assert await repository.get(session.id) == session
        await still_open("a nested `async with store:`")
        async with SessionManager(
            repository,
            clock=ManualClock(at(1)),
            idle_timeout=POLICY.idle_timeout,
            cleanup_interval=None,
        ) as sessions:
            assert (await sessions.get(session.id)).id == session.id
        await still_open("`async with SessionManager(store):`")

    async def test_a_closed_store_opens_again(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        """After its last close a store opens again (a second ``async with
        SessionManager(store)``, say), and a close with nothing open does nothing. (What
        it stored before may be gone by then, as in a store kept in memory.)"""
        await repository.aclose()  # the fixture's open: the last close
        try:
            await repository.aclose()  # nothing open: does nothing
            for round_ in ("first", "second"):
                what = f"the {round_} open after the store's last close"
                session = make_session(messages=("a",))
                try:
                    async with repository:
                        await repository.add(session)
                        loaded = await repository.get(session.id)
                        async with SessionManager(
                            repository,
                            clock=ManualClock(at(1)),
                            idle_timeout=POLICY.idle_timeout,
                            cleanup_interval=None,
                        ) as sessions:
                            created = await sessions.create(owner="alice")
                            assert (await sessions.get(created.id)).id == created.id
                except AssertionError:
                    raise
                except Exception as exc:
                    raise AssertionError(
                        f"{what} failed with {exc!r}: acquire connections, threads and "
                        "files in _open() (called at each first open), not in __init__, "
                        "and release them in _close()"
                    ) from exc
                assert loaded == session, f"{what}: {loaded!r:.300}"
                await repository.aclose()  # closed already: does nothing
        finally:
            await repository.open()  # for the fixture, which closes it

    # -- stored document versions -----------------------------------------------------

    async def test_document_versions_of_current_documents(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        a = make_session(messages=("hello",))
        b = make_session(owner=None, name=None)
        c = make_session(status=SessionStatus.EXITED)
        for session in (a, b, c):
            await repository.add(session)
        await repository.save(changed(b, state={"k": 2}), expected_revision=0)
        await repository.append(a.id, [msg("more", 1)], at=at(1), policy=POLICY)
        await repository.touch(c.id, at=at(2), policy=POLICY)
        missing = uuid.uuid4()
        if await repository.document_versions([a.id]) is None:
            return  # the default: this store cannot tell (every caller must cope with it)
        versions = await known_versions(repository, [a.id, missing, b.id, a.id, c.id])
        assert versions == dict.fromkeys([a.id, b.id, c.id], CURRENT_VERSION)
        assert await known_versions(repository, []) == {}
        assert await known_versions(repository, iter([missing])) == {}
        await repository.delete(c.id)
        assert await known_versions(repository, [c.id, a.id]) == {a.id: CURRENT_VERSION}
        # expiry is not applied: an expired session awaiting cleanup still has a document
        assert list(await repository.expired(at(1000))) == [b.id, a.id]
        assert await known_versions(repository, [b.id]) == {b.id: CURRENT_VERSION}

    async def test_document_versions_report_old_documents(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        old = make_session(state={"k": 1})
        newer = make_session()
        current = make_session(messages=("hi",))
        for session in (old, newer, current):
            await repository.add(session)
        # Another owner in the old document: a read that did not load it would show.
        await self.replace_document(
            repository, old.id, version_0_document(attrs.evolve(old, owner="legacy"))
        )
        future = {**orjson.loads(version_0_document(newer)), "version": CURRENT_VERSION + 1}
        await self.replace_document(repository, newer.id, orjson.dumps(future))
        ids = [old.id, newer.id, current.id]
        assert await known_versions(repository, ids) == {
            old.id: 0,
            newer.id: CURRENT_VERSION + 1,
            current.id: CURRENT_VERSION,
        }

        # The old document is migrated when loaded; a save stores it at the current version.
        loaded = await repository.get(old.id)
        assert loaded is not None and loaded.id == old.id and loaded.owner == "legacy"
        assert loaded.state["k"] == 1  # custom_fields became the state
        await repository.save(changed(loaded), expected_revision=loaded.revision)
        assert await known_versions(repository, ids) == {
            old.id: CURRENT_VERSION,
            newer.id: CURRENT_VERSION + 1,
            current.id: CURRENT_VERSION,
        }

    async def test_an_old_documents_own_message_is_kept(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        """Version 0 kept the first message in the document. A store that keeps
        messages apart from it (SQLite, Redis) has no stored message for it: it comes
        before the stored ones, in reads and appends, until a save stores it."""
        session = make_session()
        await repository.add(session)
        await self.replace_document(repository, session.id, version_0_document(session, "one"))
        loaded = await repository.get(session.id)
        assert loaded is not None and [m.content for m in loaded.messages] == ["one"]
        assert loaded.messages[0] == Message("user", "one", session.created_at, None)
        appended = await repository.append(session.id, [msg("two", 1)], at=at(1), policy=POLICY)
        assert appended.messages.total == 2 and appended.messages[-1].content == "two"
        loaded = await repository.get(session.id)
        assert loaded is not None and [m.content for m in loaded.messages] == ["one", "two"]
        # (a store may give such a message in a window the stored ones do not fill)
        window = await repository.get(session.id, last_messages=1)
        assert window is not None and window.messages.total == 2
        assert list(window.messages) == list(loaded.messages)[window.messages.offset :]
        await repository.save(changed(loaded), expected_revision=loaded.revision)
        assert await known_versions(repository, [session.id]) == {session.id: CURRENT_VERSION}
        saved = await repository.get(session.id)
        assert saved is not None and list(saved.messages) == list(loaded.messages)

    async def test_document_versions_refuse_unreadable_documents(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        bad = make_session()
        good = make_session()
        await repository.add(bad)
        await repository.add(good)
        damaged = [b'{"version": 1, "id', b"[1, 2]", b'{"version": "1"}', b'{"version": -1}']
        for document in damaged:
            await self.replace_document(repository, bad.id, document)
            error = await raises(
                CorruptSessionError,
                repository.document_versions([good.id, bad.id]),
                f"document_versions() of the stored bytes {document!r}",
            )
            assert error.session_id == bad.id
        assert await known_versions(repository, [good.id]) == {good.id: CURRENT_VERSION}

    async def test_list_skips_unreadable_documents(
        self, repository: SessionRepository, anyio_backend: Any
    ) -> None:
        sessions = [make_session(created=i) for i in range(4)]
        for session in sessions:
            await repository.add(session)
        bad, newer = sessions[1], sessions[2]
        await self.replace_document(repository, bad.id, b'{"version": 1, "id')
        future = {**orjson.loads(version_0_document(newer)), "version": CURRENT_VERSION + 1}
        await self.replace_document(repository, newer.id, orjson.dumps(future))
        readable = [sessions[3].id, sessions[0].id]  # newest first
        assert [s.id for s in (await repository.list(SessionQuery(limit=10))).items] == readable
        first = await repository.list(SessionQuery(limit=1))  # pages past the skipped ones
        assert [s.id for s in first.items] == readable[:1] and first.next_cursor is not None
        rest = await repository.list(SessionQuery(limit=10, cursor=first.next_cursor))
        assert [s.id for s in rest.items] == readable[1:]
