"""In-memory session store: the reference implementation of the repository contract."""

from __future__ import annotations

import heapq
import itertools
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

from .._exceptions import (
    SessionClosed,
    SessionConflict,
    SessionNotFound,
    StorageError,
    too_many_messages,
)
from .._migrations import CURRENT_VERSION
from .._models import (
    ExpiryPolicy,
    Message,
    Session,
    SessionStatus,
    last_window,
    replace_trusted,
)
from ..abc import (
    Page,
    SessionQuery,
    SessionRepository,
    _TransitionLock,
    decode_cursor,
    encode_cursor,
)

__all__ = ["MemoryRepository"]


class _Lock(_TransitionLock):
    """The store's lock, for tasks of any event loop: ``async with lock:``.

    An :class:`anyio.Lock` belongs to the backend that first uses it, so a store used
    under asyncio and then under trio (or the reverse) would fail. This one is taken with
    no checkpoint when free (like ``fast_acquire``); waiters queue in order and are
    woken through their own loop.
    """

    __slots__ = ("_store",)

    def __init__(self, store: MemoryRepository) -> None:
        super().__init__()
        self._store = store

    async def __aenter__(self) -> None:
        if self._store._open_count == 0:  # as the durable stores, so tests tell the same
            raise StorageError(
                f"{self._store!r} is not open. Use `async with MemoryRepository() as repo:` "
                "or pass it to a SessionManager, which opens it (what it holds stays "
                "while it is closed: open it again to read it)."
            )
        await self.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()


class MemoryRepository(SessionRepository):
    """Sessions in a dict, guarded by a lock.

    Snapshots are stored as they are (they are immutable and share message storage),
    so reads copy nothing and appends are O(1). A heap of deadlines makes
    :meth:`expired` cost O(expired · log n); listings by owner use an owner index.
    What it returns has the durable stores' shape, so code tested on it behaves alike
    in production: :meth:`list` items hold no messages (an empty window with an exact
    ``messages.total``) and :meth:`append` returns a window of the appended messages.
    Nothing survives the process: use :class:`SQLiteRepository` for durability.

    Like every store, it is opened (``async with``, or by the manager) before use, and
    refuses calls with :class:`StorageError` while it is not open; what it holds stays
    while it is closed, and it opens again.

    No operation awaits while holding the lock, and the lock is taken without an
    event-loop checkpoint when it is free, so uncontended operations never yield. The
    lock belongs to no event loop: one store may serve asyncio, then trio (or the reverse).
    """

    def __init__(self) -> None:
        self._lock = _Lock(self)
        self._sessions: dict[uuid.UUID, Session] = {}
        self._by_owner: dict[str | None, set[uuid.UUID]] = {}
        self._counts: Counter[SessionStatus] = Counter()
        self._deadlines: list[tuple[datetime, int, uuid.UUID]] = []
        self._seq = itertools.count()

    def __repr__(self) -> str:
        return f"MemoryRepository({len(self._sessions)} sessions)"

    def __len__(self) -> int:
        return len(self._sessions)

    # -- index maintenance (call with the lock held) --------------------------------------

    def _index(self, session: Session) -> None:
        if session.expires_at is not None:
            heapq.heappush(self._deadlines, (session.expires_at, next(self._seq), session.id))
            if len(self._deadlines) > 2 * len(self._sessions) + 64:
                self._rebuild_deadlines()

    def _rebuild_deadlines(self) -> None:
        self._deadlines = [
            (s.expires_at, next(self._seq), s.id)
            for s in self._sessions.values()
            if s.expires_at is not None
        ]
        heapq.heapify(self._deadlines)

    def _put(self, session: Session, old: Session | None) -> None:
        self._sessions[session.id] = session
        if old is None or old.owner != session.owner:
            if old is not None:
                self._unown(old)
            self._by_owner.setdefault(session.owner, set()).add(session.id)
        if old is None or old.status is not session.status:
            if old is not None:
                self._counts[old.status] -= 1
            self._counts[session.status] += 1
        # The deadline heap is lazy: an entry may be earlier than the session's current
        # deadline (re-filed when popped), never later. So only a deadline that moves
        # earlier (or appears) needs a push; touches, which move it later, need none.
        new_deadline = session.expires_at
        if new_deadline is not None and (
            old is None or old.expires_at is None or new_deadline < old.expires_at
        ):
            self._index(session)

    def _unown(self, session: Session) -> None:
        owned = self._by_owner.get(session.owner)
        if owned is not None:
            owned.discard(session.id)
            if not owned:
                del self._by_owner[session.owner]

    def _drop(self, session: Session) -> None:
        del self._sessions[session.id]
        self._unown(session)
        self._counts[session.status] -= 1

    # -- the contract -----------------------------------------------------------------

    async def get(
        self, session_id: uuid.UUID, *, last_messages: int | None = None
    ) -> Session | None:
        session_id = self._check_id(session_id)
        last_messages = self._check_last_messages(last_messages)
        async with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            return None
        return last_window(session, last_messages)

    async def add(self, session: Session) -> None:
        self._check_whole(session)
        async with self._lock:
            if session.id in self._sessions:
                raise SessionConflict(session.id, expected_revision=None)
            self._put(session, None)

    async def save(
        self,
        session: Session,
        *,
        expected_revision: int,
        new_messages: Sequence[Message] | None = None,
    ) -> None:
        self._check_revision_step(session, expected_revision)
        self._check_window_save(session, new_messages)
        async with self._lock:
            old = self._sessions.get(session.id)
            if old is None:
                raise SessionNotFound(session.id)
            if old.revision != expected_revision:
                raise SessionConflict(
                    session.id, expected_revision=expected_revision, actual_revision=old.revision
                )
            if self._save_finds_expired(session, old.expires_at, old.status):
                raise SessionNotFound(session.id)  # expired by the save's time: stays so
            if not session.messages.is_complete:
                # A window (a read with last_messages): the stored history, grown by
                # new_messages, is the history, if they bring it to the window's total.
                added = () if new_messages is None else new_messages  # (None: refused above)
                stored = old.messages.total
                if stored + len(added) != session.messages.total:
                    raise self._not_extending(session, stored, len(added))
                session = replace_trusted(session, messages=old.messages.extend(added))
            self._put(session, old)

    async def append(
        self,
        session_id: uuid.UUID,
        messages: Sequence[Message],
        *,
        at: datetime,
        policy: ExpiryPolicy,
        max_messages: int | None = None,
    ) -> Session:
        session_id = self._check_id(session_id)
        at = self._check_time(at, "at")
        messages = self._check_messages(messages)
        policy = self._check_policy(policy)
        max_messages = self._check_max_messages(max_messages)
        async with self._lock:
            old = self._sessions.get(session_id)
            if old is None or old.is_expired(at):
                raise SessionNotFound(session_id)
            if old.status.is_terminal:
                raise SessionClosed(session_id, old.status)
            deadline, overdue = policy.activity_deadline(
                old.status, old.created_at, old.last_active, at
            )
            if overdue is not None:
                self._put(replace_trusted(old, expires_at=overdue), old)
                raise SessionNotFound(session_id)
            total = old.messages.total + len(messages)
            if max_messages is not None and total > max_messages:
                raise too_many_messages(max_messages, total)
            revision = self._next_revision(session_id, old.revision)
            new = replace_trusted(
                old,
                messages=old.messages.extend(messages),
                last_active=max(old.last_active, at),
                expires_at=deadline,
                revision=revision,
            )
            self._put(new, old)
        # as the durable stores answer: a window of the appended messages (no copy)
        return replace_trusted(new, messages=new.messages.tail(len(messages)))

    async def touch(
        self,
        session_id: uuid.UUID,
        *,
        at: datetime,
        policy: ExpiryPolicy,
        last_messages: int | None = None,
    ) -> Session | None:
        session_id = self._check_id(session_id)
        at = self._check_time(at, "at")
        policy = self._check_policy(policy)
        last_messages = self._check_last_messages(last_messages)
        async with self._lock:
            old = self._sessions.get(session_id)
            if old is None:
                return None
            session = old
            if not old.status.is_terminal and not old.is_expired(at):
                moves = policy.should_touch(old.last_active, at)
                deadline, overdue = policy.activity_deadline(
                    old.status, old.created_at, old.last_active, at, moves=moves
                )
                if overdue is not None:
                    session = replace_trusted(old, expires_at=overdue)
                elif moves:
                    session = replace_trusted(old, last_active=at, expires_at=deadline)
            if session is not old:
                # owner and status are unchanged; the deadline index needs an entry only
                # if the deadline moved earlier (another manager's shorter policy)
                self._sessions[session_id] = session
                if session.expires_at is not None and (
                    old.expires_at is None or session.expires_at < old.expires_at
                ):
                    self._index(session)
        return last_window(session, last_messages)

    async def delete(self, session_id: uuid.UUID) -> bool:
        session_id = self._check_id(session_id)
        async with self._lock:
            old = self._sessions.get(session_id)
            if old is None:
                return False
            self._drop(old)
            return True

    async def remove_expired(self, session_id: uuid.UUID, *, now: datetime) -> Session | None:
        session_id = self._check_id(session_id)
        now = self._check_time(now, "now")
        async with self._lock:
            old = self._sessions.get(session_id)
            if old is None or not old.is_expired(now):
                return None
            self._drop(old)
            return old

    async def expired(self, now: datetime, *, limit: int = 1000) -> Sequence[uuid.UUID]:
        now = self._check_time(now, "now")
        limit = self._check_limit(limit)
        found: list[tuple[datetime, int, uuid.UUID]] = []
        seen: set[uuid.UUID] = set()
        async with self._lock:
            heap = self._deadlines
            while heap and len(found) < limit and heap[0][0] <= now:
                entry = heapq.heappop(heap)
                deadline, _, sid = entry
                session = self._sessions.get(sid)
                if session is None or session.expires_at is None or sid in seen:
                    continue  # deleted, no deadline any more, or a duplicate entry
                if session.expires_at == deadline:
                    found.append(entry)
                    seen.add(sid)
                elif session.expires_at > deadline:  # moved later: re-file it
                    heapq.heappush(heap, (session.expires_at, next(self._seq), sid))
            for entry in found:  # still indexed until remove_expired() takes them
                heapq.heappush(heap, entry)
        return [entry[2] for entry in found]

    async def list(self, query: SessionQuery) -> Page:
        after = decode_cursor(query)
        async with self._lock:
            if query.owner is not None:
                ids = self._by_owner.get(query.owner, ())
                candidates = [self._sessions[i] for i in ids]
            else:
                candidates = list(self._sessions.values())
        if after is not None:
            stamp, sid = after
            candidates = [
                s
                for s in candidates
                if s.last_active < stamp or (s.last_active == stamp and s.id.int < sid.int)
            ]
        matching = (s for s in candidates if query.matches(s))
        top = heapq.nlargest(query.limit + 1, matching, key=lambda s: (s.last_active, s.id.int))
        # as the durable stores list them: no messages, an exact total (no copy)
        items = tuple([last_window(s, 0) for s in top[: query.limit]])
        next_cursor = None
        if len(top) > query.limit:
            last = items[-1]
            next_cursor = encode_cursor(last.last_active, last.id, query)
        return Page(items, next_cursor)

    async def count_by_status(self, owner: str | None = None) -> Mapping[SessionStatus, int]:
        owner = self._check_owner(owner)
        async with self._lock:
            if owner is None:
                return {status: n for status, n in self._counts.items() if n}
            counts: Counter[SessionStatus] = Counter(
                self._sessions[i].status for i in self._by_owner.get(owner, ())
            )
            return dict(counts)

    async def document_versions(self, session_ids: Iterable[uuid.UUID]) -> Mapping[uuid.UUID, int]:
        """Every stored id at :data:`~asyncsession.CURRENT_VERSION`.

        This store holds :class:`Session` objects, never documents, so nothing in it is
        ever at an older schema version.
        """
        wanted = self._check_ids(session_ids)
        async with self._lock:
            return {sid: CURRENT_VERSION for sid in wanted if sid in self._sessions}
