from __future__ import annotations

import heapq
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime

import anyio
import anyio.lowlevel
import attrs
import pytest

from asyncsession import (
    CURRENT_VERSION,
    ExpiryPolicy,
    MemoryRepository,
    Message,
    MessageLog,
    Page,
    Session,
    SessionManager,
    SessionNotFound,
    SessionQuery,
    SessionStatus,
)
from asyncsession._models import replace_trusted
from asyncsession.abc import decode_cursor, encode_cursor
from asyncsession.testing import RepositoryContract
from asyncsession.testing._contract import make_session


class TestMemoryRepository(RepositoryContract):
    @pytest.fixture
    async def repository(self, anyio_backend: str) -> AsyncIterator[MemoryRepository]:
        async with MemoryRepository() as repo:
            yield repo


@pytest.mark.anyio
async def test_memory_store_knows_every_document_is_current(anyio_backend: str) -> None:
    """It holds Session objects, never old documents (the contract also accepts None)."""
    async with MemoryRepository() as repo:
        session = make_session()
        await repo.add(session)
        versions = await repo.document_versions([session.id, uuid.uuid4()])
        assert versions == {session.id: CURRENT_VERSION}


# -- the contract catches broken stores (review finding 3 of helper-27) -------------------
# Each store below is the memory store with one defect a real store could have; each
# passed the whole contract once. Now the contract test named with it must fail.


class NoTieBreakCursor(MemoryRepository):
    """Resumes a listing after ``last_active`` only, skipping sessions that share it."""

    async def list(self, query: SessionQuery) -> Page:
        after = decode_cursor(query)
        async with self._lock:
            candidates = list(self._sessions.values())
        if after is not None:
            candidates = [s for s in candidates if s.last_active < after[0]]
        matching = [s for s in candidates if query.matches(s)]
        top = heapq.nlargest(query.limit + 1, matching, key=lambda s: (s.last_active, s.id.int))
        items = tuple(top[: query.limit])
        cursor = None
        if len(top) > query.limit:
            cursor = encode_cursor(items[-1].last_active, items[-1].id, query)
        return Page(items, cursor)


class SaveNeverReindexes(MemoryRepository):
    """Files a deadline when a session is added, never when a save moves it earlier."""

    def _put(self, session: Session, old: Session | None) -> None:
        if old is not None:
            session = replace_trusted(session, expires_at=old.expires_at)
            super()._put(session, old)
            self._sessions[session.id] = session
        else:
            super()._put(session, old)


class CountsNeverDecrease(MemoryRepository):
    """count_by_status() forgets deletes, removals and status changes."""

    def _put(self, session: Session, old: Session | None) -> None:
        super()._put(session, old)
        if old is not None and old.status is not session.status:
            self._counts[old.status] += 1

    def _drop(self, session: Session) -> None:
        super()._drop(session)
        self._counts[session.status] += 1


class OwnerIndexIgnoresSaves(MemoryRepository):
    """list(owner=...) lists a session under the owner it was added with."""

    def _put(self, session: Session, old: Session | None) -> None:
        if old is not None and old.owner != session.owner:
            super()._put(attrs.evolve(session, owner=old.owner), old)
            self._sessions[session.id] = session
        else:
            super()._put(session, old)


class TornAppend(MemoryRepository):
    """append() stores the messages, awaits (a second round trip), then the revision."""

    async def append(
        self,
        session_id: uuid.UUID,
        messages: Sequence[Message],
        *,
        at: datetime,
        policy: ExpiryPolicy,
        max_messages: int | None = None,
    ) -> Session:
        await anyio.lowlevel.checkpoint()
        async with self._lock:
            old = self._sessions.get(session_id)
            if old is None:
                raise SessionNotFound(session_id)
            half = replace_trusted(old, messages=old.messages.extend(messages))
            self._sessions[session_id] = half
        await anyio.lowlevel.checkpoint()
        async with self._lock:
            current = self._sessions[session_id]
            new = replace_trusted(current, revision=current.revision + 1, last_active=at)
            self._put(new, current)
            return new


class DoubleRevisions(MemoryRepository):
    """append() computes the next revision in doubles, as a Lua script would: past 2**53
    it stops counting by one (helper-40's finding on the Redis store)."""

    async def append(
        self,
        session_id: uuid.UUID,
        messages: Sequence[Message],
        *,
        at: datetime,
        policy: ExpiryPolicy,
        max_messages: int | None = None,
    ) -> Session:
        async with self._lock:
            before = self._sessions.get(session_id)
        new = await super().append(
            session_id, messages, at=at, policy=policy, max_messages=max_messages
        )
        if before is None:
            return new
        async with self._lock:
            current = self._sessions[session_id]
            lossy = replace_trusted(current, revision=int(float(before.revision) + 1))
            self._put(lossy, current)
            return lossy


class AppendAnswersANewLog(MemoryRepository):
    """append() answers with a log of just the appended messages that claims to be the
    whole history (no offset, so its total is wrong)."""

    async def append(
        self,
        session_id: uuid.UUID,
        messages: Sequence[Message],
        *,
        at: datetime,
        policy: ExpiryPolicy,
        max_messages: int | None = None,
    ) -> Session:
        new = await super().append(
            session_id, messages, at=at, policy=policy, max_messages=max_messages
        )
        return replace_trusted(new, messages=MessageLog(messages))


@attrs.frozen(slots=True)
class _DeadlineFromTheActivityTime(ExpiryPolicy):
    """The policy with every deadline computed from ``max(last_active, at)``."""

    at: datetime | None = None

    def deadline(
        self,
        status: SessionStatus,
        created_at: datetime,
        last_active: datetime,
        closed_at: datetime | None,
    ) -> datetime | None:
        latest = last_active if self.at is None or self.at <= last_active else self.at
        return super().deadline(status, created_at, latest, closed_at)


class IdleFromTheActivityTime(MemoryRepository):
    """append() and touch() judge a session by the deadline the policy gives it from
    the activity's time, ``max(last_active, at)``, not from the stored ``last_active``
    (as every store did before the upgrade review): an idle_timeout shortened since the
    session was written never finds it expired, however long it was idle."""

    @staticmethod
    def _from(policy: ExpiryPolicy, at: datetime) -> ExpiryPolicy:
        return _DeadlineFromTheActivityTime(
            policy.idle_timeout, policy.max_age, policy.retention, policy.touch_interval, at
        )

    async def append(
        self,
        session_id: uuid.UUID,
        messages: Sequence[Message],
        *,
        at: datetime,
        policy: ExpiryPolicy,
        max_messages: int | None = None,
    ) -> Session:
        return await super().append(
            session_id, messages, at=at, policy=self._from(policy, at), max_messages=max_messages
        )

    async def touch(
        self,
        session_id: uuid.UUID,
        *,
        at: datetime,
        policy: ExpiryPolicy,
        last_messages: int | None = None,
    ) -> Session | None:
        return await super().touch(
            session_id, at=at, policy=self._from(policy, at), last_messages=last_messages
        )


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("store", "contract_test"),
    [
        (NoTieBreakCursor, RepositoryContract.test_list_pages_through_equal_activity),
        (SaveNeverReindexes, RepositoryContract.test_saves_move_deadlines_either_way),
        (CountsNeverDecrease, RepositoryContract.test_counts_follow_changes_and_removals),
        (OwnerIndexIgnoresSaves, RepositoryContract.test_owner_filter_follows_saves),
        (TornAppend, RepositoryContract.test_appends_cancelled_at_each_await_leave_whole_states),
        (DoubleRevisions, RepositoryContract.test_revisions_stay_exact_up_to_2_to_the_63),
        (
            AppendAnswersANewLog,
            RepositoryContract.test_append_results_and_list_items_hold_the_end_of_the_history,
        ),
        (
            IdleFromTheActivityTime,
            RepositoryContract.test_appends_and_touches_past_a_shorter_idle_timeout_record_it,
        ),
    ],
    ids=lambda value: getattr(value, "__name__", ""),
)
async def test_the_contract_fails_a_broken_store(
    store: type[MemoryRepository],
    contract_test: Callable[[RepositoryContract, MemoryRepository, str], Awaitable[None]],
    anyio_backend: str,
) -> None:
    async with store() as repo:
        with pytest.raises(AssertionError):
            await contract_test(RepositoryContract(), repo, anyio_backend)


# -- one store, both event loops (review finding 4 of helper-41) --------------------------


@pytest.mark.parametrize("order", [("asyncio", "trio"), ("trio", "asyncio")])
def test_one_store_serves_asyncio_then_trio(order: tuple[str, str]) -> None:
    """Its lock belonged to the first backend that used it: the other one then failed
    with RuntimeError ("no running event loop")."""
    repo = MemoryRepository()
    sessions = SessionManager(repo, cleanup_interval=None)
    ids: list[uuid.UUID] = []

    async def use() -> None:
        async with sessions:
            for known in ids:
                await sessions.update(known, lambda s: s.with_state(seen=True))
            created = await sessions.create()
            await sessions.add_message(created.id, "user", "hi")
            ids.append(created.id)

    for backend in order * 2:
        anyio.run(use, backend=backend)
    assert len(repo) == 4


class AwaitsUnderItsLock(MemoryRepository):
    """add() holds the store's lock across an await, so other operations queue for it."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = anyio.Event()
        self.release = anyio.Event()

    async def add(self, session: Session) -> None:
        async with self._lock:
            self.holding.set()
            await self.release.wait()
        await super().add(session)


@pytest.mark.anyio
async def test_operations_queue_for_a_held_lock_in_order_and_may_be_cancelled(
    anyio_backend: str,
) -> None:
    async with AwaitsUnderItsLock() as repo:
        done: list[str] = []
        session = make_session()

        async def count(name: str) -> None:
            await repo.count_by_status()
            done.append(name)

        async with anyio.create_task_group() as tg:
            tg.start_soon(repo.add, session)
            await repo.holding.wait()
            with anyio.CancelScope() as gone:
                async with anyio.create_task_group() as waiting:
                    waiting.start_soon(count, "cancelled")
                    await anyio.wait_all_tasks_blocked()
                    gone.cancel()  # a waiter leaves the queue
            for name in ("first", "second", "third"):
                tg.start_soon(count, name)
                await anyio.wait_all_tasks_blocked()
            assert done == []
            repo.release.set()
        assert done == ["first", "second", "third"]
        assert await repo.get(session.id) == session
