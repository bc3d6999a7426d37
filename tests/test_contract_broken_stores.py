"""The contract catches what a store author's review found it let through.

Each store below is the memory store with one defect a custom store could have (the
reviewer's variants of ``examples/custom_store``, helper-128's brief); each passed the
whole contract, and each breaks a :class:`SessionManager` on it: an active chat expires,
``list()`` comes in the wrong order, a cancelled read or create leaves a half-written
session, the manager closes the store its application holds open, a second manager
cannot open it, a listing loops for ever. Now the contract test named with it fails,
with a message that says what to fix.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime

import anyio
import anyio.lowlevel
import pytest

from asyncsession import (
    ExpiryPolicy,
    MemoryRepository,
    Message,
    Page,
    Session,
    SessionConflict,
    SessionNotFound,
    SessionQuery,
    SessionRepository,
    SessionStatus,
)
from asyncsession._models import last_window, replace_trusted
from asyncsession.abc import decode_cursor, encode_cursor
from asyncsession.testing import RepositoryContract


class _AppendKeepsAnOldField(MemoryRepository):
    """append() returns the new snapshot but stores the session's old value of
    ``kept`` (an UPDATE that forgot the column)."""

    kept: str

    async def append(
        self,
        session_id: uuid.UUID,
        messages: Sequence[Message],
        *,
        at: datetime,
        policy: ExpiryPolicy,
        max_messages: int | None = None,
    ) -> Session:
        before = await self.get(session_id)
        new = await super().append(
            session_id, messages, at=at, policy=policy, max_messages=max_messages
        )
        if before is not None:
            async with self._lock:
                current = self._sessions[new.id]
                old = {self.kept: getattr(before, self.kept)}
                self._put(replace_trusted(current, **old), current)
        return new


class AppendKeepsTheOldDeadline(_AppendKeepsAnOldField):
    """...its old ``expires_at``: a chat active every 30 s under a 60 s idle_timeout
    expires 60 s after it started."""

    kept = "expires_at"


class AppendKeepsTheOldActivity(_AppendKeepsAnOldField):
    """...its old ``last_active``."""

    kept = "last_active"


class ListingIndexMissesActivity(MemoryRepository):
    """Lists by a ``last_active`` index that add() and save() keep but append() and
    touch() never move: the session just written to is not listed first."""

    def __init__(self) -> None:
        super().__init__()
        self._order: dict[uuid.UUID, datetime] = {}

    def _put(self, session: Session, old: Session | None) -> None:
        super()._put(session, old)
        self._order.setdefault(session.id, session.last_active)

    async def save(
        self,
        session: Session,
        *,
        expected_revision: int,
        new_messages: Sequence[Message] | None = None,
    ) -> None:
        await super().save(session, expected_revision=expected_revision, new_messages=new_messages)
        self._order[session.id] = session.last_active

    async def list(self, query: SessionQuery) -> Page:
        after = decode_cursor(query)
        async with self._lock:
            candidates = [s for s in self._sessions.values() if query.matches(s)]

        def key(session: Session) -> tuple[datetime, int]:
            return (self._order[session.id], session.id.int)

        candidates.sort(key=key, reverse=True)
        if after is not None:
            candidates = [s for s in candidates if key(s) < (after[0], after[1].int)]
        items = tuple(last_window(s, 0) for s in candidates[: query.limit])
        cursor = None
        if len(candidates) > query.limit:
            cursor = encode_cursor(self._order[items[-1].id], items[-1].id, query)
        return Page(items, cursor)


class TwoStepTouch(MemoryRepository):
    """touch() writes ``last_active``, then (a second round trip) ``expires_at``: a read
    its client gave up on leaves a session active now whose deadline is the old one."""

    async def touch(
        self,
        session_id: uuid.UUID,
        *,
        at: datetime,
        policy: ExpiryPolicy,
        last_messages: int | None = None,
    ) -> Session | None:
        before = await self.get(session_id)
        new = await super().touch(session_id, at=at, policy=policy)
        if before is None or new is None or new.last_active == before.last_active:
            return new if new is None else last_window(new, last_messages)
        async with self._lock:
            self._sessions[session_id] = replace_trusted(new, expires_at=before.expires_at)
        await anyio.lowlevel.checkpoint()
        async with self._lock:
            self._sessions[session_id] = new
        return last_window(new, last_messages)


class _SeparateDeadlineIndex(MemoryRepository):
    """A deadline index written apart from the documents: ids in ``_unfiled`` have a
    document but no index entry, so :meth:`expired` leaves them out."""

    def __init__(self) -> None:
        super().__init__()
        self._unfiled: set[uuid.UUID] = set()

    async def expired(self, now: datetime, *, limit: int = 1000) -> Sequence[uuid.UUID]:
        return [i for i in await super().expired(now, limit=limit) if i not in self._unfiled]


class TwoStepAdd(_SeparateDeadlineIndex):
    """add() stores the document, then (a second round trip) its deadline: a create
    cancelled in between leaves a session that cleanup never finds."""

    async def add(self, session: Session) -> None:
        await super().add(session)
        self._unfiled.add(session.id)
        await anyio.lowlevel.checkpoint()
        self._unfiled.discard(session.id)


class TwoStepDelete(_SeparateDeadlineIndex):
    """delete() drops the index entry, then (a second round trip) the document."""

    async def delete(self, session_id: uuid.UUID) -> bool:
        self._unfiled.add(session_id)
        await anyio.lowlevel.checkpoint()
        deleted = await super().delete(session_id)
        self._unfiled.discard(session_id)
        return deleted


class TwoStepRemoval(_SeparateDeadlineIndex):
    """remove_expired() drops the index entry, then (a second round trip) the document:
    a cleanup cancelled in between leaves an expired session no cleanup finds again."""

    async def remove_expired(self, session_id: uuid.UUID, *, now: datetime) -> Session | None:
        self._unfiled.add(session_id)
        await anyio.lowlevel.checkpoint()
        removed = await super().remove_expired(session_id, now=now)
        self._unfiled.discard(session_id)
        return removed


class OpensAndClosesItself(MemoryRepository):
    """Overrides open() and aclose() (not _open and _close): every close releases the
    connection, also a nested one, so a manager closes the store its application holds
    open."""

    connection: object | None = None

    async def open(self) -> None:
        await anyio.lowlevel.checkpoint()
        self.connection = object()
        self._open_count = 1  # open, not counted (the memory store checks it)

    async def aclose(self) -> None:
        await anyio.lowlevel.checkpoint()
        self.connection = None
        self._open_count = 0

    def _connected(self) -> None:
        if self.connection is None:
            raise RuntimeError("store is not open")

    async def get(
        self, session_id: uuid.UUID, *, last_messages: int | None = None
    ) -> Session | None:
        self._connected()
        return await super().get(session_id, last_messages=last_messages)

    async def add(self, session: Session) -> None:
        self._connected()
        await super().add(session)


class ConnectsInInit(MemoryRepository):
    """Connects in __init__ and releases the connection in _close: once closed, it never
    works again (a second ``async with SessionManager(store)`` fails)."""

    def __init__(self) -> None:
        super().__init__()
        self.connection: object | None = object()

    async def _close(self) -> None:
        self.connection = None

    def _connected(self) -> None:
        if self.connection is None:
            raise RuntimeError("store is closed")

    async def get(
        self, session_id: uuid.UUID, *, last_messages: int | None = None
    ) -> Session | None:
        self._connected()
        return await super().get(session_id, last_messages=last_messages)

    async def add(self, session: Session) -> None:
        self._connected()
        await super().add(session)


def _listing(
    resume: Callable[[Session, datetime, uuid.UUID], bool],
    key: Callable[[Session], tuple[float, int]] | None = None,
) -> Callable[[MemoryRepository, SessionQuery], Awaitable[Page]]:
    """A list() that sorts by ``key`` (newest first, ties by id descending when None)
    and resumes after a cursor with the sessions for which ``resume`` holds."""

    async def list_(self: MemoryRepository, query: SessionQuery) -> Page:
        after = decode_cursor(query)
        async with self._lock:
            candidates = [s for s in self._sessions.values() if query.matches(s)]
        if key is None:
            candidates.sort(key=lambda s: (s.last_active, s.id.int), reverse=True)
        else:
            candidates.sort(key=key)
        if after is not None:
            candidates = [s for s in candidates if resume(s, *after)]
        items = tuple(last_window(s, 0) for s in candidates[: query.limit])
        cursor = None
        if len(candidates) > query.limit:
            cursor = encode_cursor(items[-1].last_active, items[-1].id, query)
        return Page(items, cursor)

    return list_


class CursorRepeatsTies(MemoryRepository):
    """Resumes a listing at the cursor's ``last_active`` (``<=``, not after it): every
    page repeats the sessions of the last instant, and a listing of ties never ends."""

    list = _listing(lambda s, stamp, sid: s.last_active <= stamp)  # type: ignore[assignment]


class TiesByIdAscending(MemoryRepository):
    """Pages consistently, but lists ties by id ascending."""

    list = _listing(  # type: ignore[assignment]
        lambda s, stamp, sid: (
            (-s.last_active.timestamp(), s.id.int) > (-stamp.timestamp(), sid.int)
        ),
        key=lambda s: (-s.last_active.timestamp(), s.id.int),
    )


class CheckThenSave(MemoryRepository):
    """save() compares the revision, then (a second round trip) writes: concurrent saves
    based on one revision all win."""

    async def save(
        self,
        session: Session,
        *,
        expected_revision: int,
        new_messages: Sequence[Message] | None = None,
    ) -> None:
        stored = await self.get(session.id)
        if stored is None:
            raise SessionNotFound(session.id)
        if stored.revision != expected_revision:
            raise SessionConflict(
                session.id, expected_revision=expected_revision, actual_revision=stored.revision
            )
        await anyio.lowlevel.checkpoint()
        async with self._lock:
            self._put(session, self._sessions[session.id])


class CountsWithZeros(MemoryRepository):
    """count_by_status() answers every status, 0 for those with no sessions."""

    async def count_by_status(self, owner: str | None = None) -> Mapping[SessionStatus, int]:
        counts = await super().count_by_status(owner)
        return {status: counts.get(status, 0) for status in SessionStatus}


Contract = Callable[[RepositoryContract, SessionRepository, str], Awaitable[None]]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("store", "contract_test", "says"),
    [
        (
            AppendKeepsTheOldDeadline,
            RepositoryContract.test_append_bumps_revision_and_activity,
            "stored",
        ),
        (
            AppendKeepsTheOldActivity,
            RepositoryContract.test_append_bumps_revision_and_activity,
            "stored",
        ),
        (
            AppendKeepsTheOldActivity,
            RepositoryContract.test_listings_follow_appends_and_touches,
            "after an append",
        ),
        (
            ListingIndexMissesActivity,
            RepositoryContract.test_listings_follow_appends_and_touches,
            "after an append",
        ),
        (
            TwoStepTouch,
            RepositoryContract.test_touches_cancelled_at_each_await_leave_whole_states,
            "half of it",
        ),
        (
            TwoStepAdd,
            RepositoryContract.test_adds_cancelled_at_each_await_leave_whole_states,
            "half-written",
        ),
        (
            TwoStepDelete,
            RepositoryContract.test_deletes_cancelled_at_each_await_leave_whole_states,
            "half-written",
        ),
        (
            TwoStepRemoval,
            RepositoryContract.test_removals_cancelled_at_each_await_leave_whole_states,
            "half-written",
        ),
        (
            OpensAndClosesItself,
            RepositoryContract.test_nested_opens_are_counted,
            "Override _open",
        ),
        (
            ConnectsInInit,
            RepositoryContract.test_a_closed_store_opens_again,
            r"in _open\(\)",
        ),
        (
            CursorRepeatsTies,
            RepositoryContract.test_list_pages_through_equal_activity,
            "repeats",
        ),
        (
            CursorRepeatsTies,
            RepositoryContract.test_list_pages_stay_correct_during_creates,
            "repeats",
        ),
        (
            TiesByIdAscending,
            RepositoryContract.test_list_pages_through_equal_activity,
            "by id descending",
        ),
        (CountsWithZeros, RepositoryContract.test_count_by_status, "leave out statuses"),
        (
            CheckThenSave,
            RepositoryContract.test_concurrent_compare_and_set_has_one_winner,
            "8 of 8 concurrent saves.*exactly one",
        ),
    ],
    ids=lambda value: getattr(value, "__name__", None) or "",
)
async def test_the_contract_fails_a_broken_store(
    store: type[MemoryRepository], contract_test: Contract, says: str, anyio_backend: str
) -> None:
    with anyio.fail_after(60):  # a failure, not a hang
        async with store() as repo:
            with pytest.raises(AssertionError, match=says):
                await contract_test(RepositoryContract(), repo, anyio_backend)
