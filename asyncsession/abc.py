"""The storage contract every session store implements, and its query/page types.

A repository stores snapshots; it knows storage, not policy. The manager passes it the
policy values it needs (the time, an :class:`~asyncsession.ExpiryPolicy`, a message cap),
and the repository applies them atomically. Every operation is one round trip to the
backing store, so SQLite, a directory of files and Redis can all implement it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import threading
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol, TypeVar

import anyio
import anyio.lowlevel
import attrs
import orjson

from ._clock import utc
from ._exceptions import (
    MAX_REVISION,
    InvalidConfiguration,
    InvalidCursor,
    InvalidSessionId,
    InvalidUpdate,
    kind_of,
    revision_exhausted,
    shown,
    type_name,
)
from ._json import plain_optional_text
from ._loops import set_soon
from ._models import ExpiryPolicy, Message, Session, SessionStatus, parse_choices, validate_owner

__all__ = [
    "EventTransport",
    "Page",
    "RemoteEvent",
    "SessionQuery",
    "SessionRepository",
    "decode_cursor",
    "encode_cursor",
    "log_skipped",
]


def _statuses(
    value: SessionStatus | str | Iterable[SessionStatus | str] | None,
) -> frozenset[SessionStatus] | None:
    return parse_choices(SessionStatus, value, "session status", "status")


def _owner(instance: object, attribute: object, value: Any) -> None:
    # As create() checks it: an owner of another type (a UUID, an int) would match
    # nothing on one store and its text on another.
    validate_owner(value)


def _search(instance: object, attribute: object, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise InvalidConfiguration(f"search must be a str or None; got {type_name(type(value))}.")


#: A store type: ``async with SQLiteRepository(path) as repo`` gives ``repo`` its own
#: type (its own methods, such as ``checkpoint()``, type-check).
_Store = TypeVar("_Store", bound="SessionRepository")


def _limit(instance: object, attribute: object, value: int) -> None:
    if type(value) is not int or not 1 <= value <= 10_000:
        raise InvalidConfiguration(f"limit must be an int from 1 to 10000, got {value!r}.")


def _visible_at(value: datetime | None) -> datetime | None:
    # In UTC, as every store compares it: a naive time or text would be compared with
    # aware deadlines (a TypeError on one store, a match on another).
    return None if value is None else utc(value, "SessionQuery.visible_at")


@attrs.frozen(slots=True)
class SessionQuery:
    """What :meth:`SessionRepository.list` takes: filters, and which page of at most
    ``limit`` sessions (default 50, at most 10000) to return.

    Sessions come newest ``last_active`` first; sessions with equal ``last_active`` by
    id descending (larger ``id.int`` first, which is also the descending order of the
    ids' text), so that a cursor, the ``(last_active, id)`` of a page's last item, says
    where the next page starts. ``search`` matches the name or the first message,
    case-insensitively. ``visible_at`` hides sessions whose ``expires_at`` has passed at
    that time (a timezone-aware datetime, kept in UTC; :class:`InvalidConfiguration`
    otherwise). ``cursor`` is None for the first page, then the previous :class:`Page`'s
    ``next_cursor``; it only fits a query with the same filters (see :meth:`fingerprint`).
    """

    # A str enum member stands for its value, as stored (see plain_str).
    owner: str | None = attrs.field(default=None, converter=plain_optional_text, validator=_owner)
    status: frozenset[SessionStatus] | None = attrs.field(default=None, converter=_statuses)
    search: str | None = attrs.field(default=None, converter=plain_optional_text, validator=_search)
    limit: int = attrs.field(default=50, validator=_limit)
    cursor: str | None = None
    visible_at: datetime | None = attrs.field(default=None, converter=_visible_at)

    def fingerprint(self) -> str:
        """A short digest of the filters, so a cursor cannot move to another query."""
        status = sorted(s.value for s in self.status) if self.status else None
        raw = orjson.dumps([self.owner, status, self.search])
        return hashlib.blake2s(raw, digest_size=6).hexdigest()

    def matches(self, session: Session) -> bool:
        """True when ``session`` passes the filters (not the cursor)."""
        messages = session.messages
        first = messages[0].content if len(messages) and messages.offset == 0 else None
        return self.matches_fields(session, first)

    def matches_fields(self, session: Session, first_message: str | None) -> bool:
        """:meth:`matches` for a store that keeps the first message's text apart."""
        if self.owner is not None and session.owner != self.owner:
            return False
        if self.status is not None and session.status not in self.status:
            return False
        if self.visible_at is not None and session.is_expired(self.visible_at):
            return False
        if self.search:
            needle = self.search.casefold()
            if session.name is not None and needle in session.name.casefold():
                return True
            return first_message is not None and needle in first_message.casefold()
        return True


@attrs.frozen(slots=True)
class Page:
    """One page of a listing; pass ``next_cursor`` back for the next one (None: done)."""

    items: tuple[Session, ...]
    next_cursor: str | None = None

    def __iter__(self) -> Iterator[Session]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def _check_file_mode(file_mode: object) -> None:
    """Refuse a store's ``file_mode`` unless it is permission bits letting the owner
    read and write what the store creates."""
    if type(file_mode) is not int or not 0 <= file_mode <= 0o777 or file_mode & 0o600 != 0o600:
        raise InvalidConfiguration(
            "file_mode must be permission bits from 0o600 to 0o777 that let the owner "
            f"read and write (e.g. 0o600 or 0o640), got {file_mode!r}."
        )


#: The ids of the sessions listings skip as unreadable, collected while
#: :func:`_collecting_skipped` runs in this context (None: nobody collects them).
_skipped: ContextVar[list[uuid.UUID] | None] = ContextVar("asyncsession_skipped", default=None)


def log_skipped(logger: logging.Logger, session_id: uuid.UUID, exc: BaseException) -> None:
    """Log that a listing skips session ``session_id``, which it cannot read (``exc``):
    a store's ``list()`` calls it for each such session, so that ``asyncsession export``
    and ``delete --owner`` can count the session as unreadable rather than missing."""
    logger.warning("listing skips unreadable session %s: %s", session_id, exc)
    collected = _skipped.get()
    if collected is not None:
        collected.append(session_id)


@contextlib.contextmanager
def _collecting_skipped() -> Iterator[list[uuid.UUID]]:
    """Collect the ids :func:`log_skipped` is given while in it (in this context, and
    the tasks it starts), whatever logging is configured to keep."""
    collected: list[uuid.UUID] = []
    token = _skipped.set(collected)
    try:
        yield collected
    finally:
        _skipped.reset(token)


def encode_cursor(last_active: datetime, session_id: uuid.UUID, query: SessionQuery) -> str:
    """Make an opaque cursor that resumes a listing after ``(last_active, session_id)``,
    the last item of a page (a store's ``list()`` returns it as ``next_cursor``).

    ``query`` is the query the page answered: the cursor carries its
    :meth:`~SessionQuery.fingerprint` (owner, status and search, not limit or cursor),
    so :func:`decode_cursor` refuses it for a query with other filters.
    """
    raw = orjson.dumps([last_active.isoformat(), str(session_id), query.fingerprint()])
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(query: SessionQuery) -> tuple[datetime, uuid.UUID] | None:
    """Return the position ``query.cursor`` resumes after, or None for the first page.

    Raises :class:`InvalidCursor` for a cursor that is malformed or was made for a
    query with other filters (another owner, status or search: its fingerprint differs),
    and :class:`InvalidConfiguration` for a ``query`` that is not a
    :class:`SessionQuery` (every store's :meth:`SessionRepository.list` calls this first).
    """
    if not isinstance(query, SessionQuery):
        raise InvalidConfiguration(
            f"list() takes a SessionQuery, e.g. SessionQuery(owner='alice', limit=20), or "
            f"SessionQuery() for every session; got {kind_of(query)}."
        )
    cursor = query.cursor
    if cursor is None:
        return None
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        stamp, sid, fingerprint = orjson.loads(base64.urlsafe_b64decode(padded))
        position = (datetime.fromisoformat(stamp), uuid.UUID(sid))
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise InvalidCursor(cursor) from None
    if fingerprint != query.fingerprint() or position[0].tzinfo is None:
        raise InvalidCursor(cursor)
    return position


class _Waiter:
    """A task waiting for a :class:`_TransitionLock`, and how to wake it."""

    __slots__ = ("event", "granted", "token")

    def __init__(self) -> None:
        self.token = anyio.lowlevel.current_token()
        self.event = anyio.Event()
        self.granted = False


#: Guards the lazy creation of each store's transition lock.
_CREATING = threading.Lock()


class _TransitionLock:
    """Serializes the opening and closing of one store, for tasks of any event loop.

    A store (SQLite's, say) may be opened in one event loop and closed in another, or
    used by several loops at once, so an anyio lock, which belongs to one loop, will not
    do. Waiters queue in order and are woken through their own loop's thread-safe
    scheduler. The lock is only held during one :meth:`SessionRepository.open` or
    :meth:`SessionRepository.aclose`, never between them.
    """

    __slots__ = ("_locked", "_mutex", "_waiters")

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._locked = False
        self._waiters: deque[_Waiter] = deque()

    async def acquire(self) -> None:
        with self._mutex:
            if not self._locked:
                self._locked = True
                return
            waiter = _Waiter()
            self._waiters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            with self._mutex:
                if waiter.granted:  # handed over as the wait ended: pass it on
                    self._hand_over()
                else:
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        with self._mutex:
            self._hand_over()

    def _hand_over(self) -> None:
        """Give the lock to the longest waiter whose loop still runs (mutex held)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.granted = True
            if set_soon(waiter.token, waiter.event):
                return
            # its event loop is gone, and the task with it: the next waiter
        self._locked = False


class SessionRepository(ABC):
    """Abstract session store.

    Semantics every implementation keeps (checked by
    :class:`asyncsession.testing.RepositoryContract`):

    * Returned sessions are immutable snapshots; later writes never change them.
    * ``save`` is compare-and-set on ``revision``; ``append`` bumps ``revision`` by one.
    * ``touch`` moves ``last_active``/``expires_at`` without bumping ``revision`` and never
      revives an expired or closed session.
    * ``expired`` reads a deadline index: its cost follows the number of expired sessions.
    * Each write (``add``, ``save``, ``append``, ``touch``, ``delete``,
      ``remove_expired``) is all or nothing, also when it is cancelled at any of its
      awaits: the document and every index kept beside it (deadlines, listing order,
      owners, counts) change together, and what ``append`` and ``touch`` return is
      what they stored.
    * A store is opened by ``async with store`` (or by the manager that uses it); nested
      opens are counted and only the last close releases resources. After the last
      close it opens again (a second manager over it, say); a close with nothing open
      does nothing. A store acquires its connections, threads or files in
      :meth:`_open` (called at the first open, and again at the first open after the
      last close), not in ``__init__``, and releases them in :meth:`_close` (called at
      the last close); it overrides neither :meth:`open` nor :meth:`aclose`, which do
      the counting. (A store overriding them is closed by the first close: a manager's
      exit closes the store its application still holds open.)
    * Ids are :class:`uuid.UUID`: every operation taking one raises
      :class:`InvalidSessionId` for anything else (see :meth:`_check_id`), before it
      reads or writes anything. :meth:`append` raises :class:`InvalidUpdate` for
      messages that are not :class:`Message` objects (see :meth:`_check_messages`);
      ``at`` and ``now`` that are not timezone-aware datetimes, and an
      :meth:`expired` ``limit`` below 1, raise :class:`InvalidConfiguration` (see
      :meth:`_check_time` and :meth:`_check_limit`), as do a ``policy`` that is not an
      :class:`~asyncsession.ExpiryPolicy` and a ``last_messages`` or ``max_messages``
      that is neither None nor an int (see :meth:`_check_policy`,
      :meth:`_check_last_messages` and :meth:`_check_max_messages`).
      (The methods below do not each repeat this.)
    """

    _open_count: int = 0
    _transitions: _TransitionLock | None = None

    async def __aenter__(self: _Store) -> _Store:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Open the store (counted: only the first open calls :meth:`_open`; see
        :meth:`aclose`). Stores override :meth:`_open`, not this.

        Opens and closes of one store run one at a time, whichever tasks and event
        loops call them: two tasks opening it at once acquire its resources once, and
        an open while the last close is under way waits for it, then opens again.
        """
        transitions = self._transition_lock()
        await transitions.acquire()
        try:
            if self._open_count == 0:
                await self._open()
            self._open_count += 1
        finally:
            transitions.release()

    async def aclose(self) -> None:
        """Close the store once every :meth:`open` has been matched: only the last close
        calls :meth:`_close`, and a close with nothing open does nothing. Stores override
        :meth:`_close`, not this.

        Waits (even when cancelled) for an open or close under way in another task.
        """
        transitions = self._transition_lock()
        with anyio.CancelScope(shield=True):
            await transitions.acquire()
        try:
            if self._open_count == 0:
                return
            self._open_count -= 1
            if self._open_count == 0:
                await self._close()
        finally:
            transitions.release()

    def _transition_lock(self) -> _TransitionLock:
        transitions = self._transitions
        if transitions is None:
            with _CREATING:
                transitions = self._transitions
                if transitions is None:
                    transitions = self._transitions = _TransitionLock()
        return transitions

    @staticmethod
    def _check_id(session_id: object) -> uuid.UUID:
        """The precondition of every operation that takes an id: return it as a plain
        :class:`uuid.UUID` (a subclass's too, so its ``str()`` is the UUID's), or raise
        :class:`InvalidSessionId` for anything else (its text, its int, None). Stores
        call it before they read or write anything; custom stores should too."""
        if type(session_id) is uuid.UUID:
            return session_id
        if isinstance(session_id, uuid.UUID):
            return uuid.UUID(int=session_id.int)
        raise InvalidSessionId(session_id)

    @staticmethod
    def _check_owner(owner: object) -> str | None:
        """The precondition of :meth:`count_by_status`: return ``owner`` (None, or a str
        enum member's value), or raise :class:`InvalidOwner` for what no session can
        have as its owner (not a non-empty printable str of at most 256 characters)."""
        return validate_owner(owner)  # type: ignore[arg-type]  # checked at run time

    @staticmethod
    def _check_ids(session_ids: Iterable[object]) -> list[uuid.UUID]:
        """:meth:`_check_id` of each id, in order, each id once (for
        :meth:`document_versions`)."""
        return list(dict.fromkeys(map(SessionRepository._check_id, session_ids)))

    @staticmethod
    def _check_time(value: object, name: str) -> datetime:
        """The precondition on the time :meth:`append`, :meth:`touch` (``at``),
        :meth:`remove_expired` and :meth:`expired` (``now``) take: ``value`` in UTC, or
        :class:`InvalidConfiguration` for a naive datetime or anything but a datetime.
        Stores call it before they read or write anything; custom stores should too."""
        return utc(value, name)  # type: ignore[arg-type]  # it checks the type

    @staticmethod
    def _check_limit(limit: object) -> int:
        """The precondition of :meth:`expired`: ``limit`` is an int of at least 1
        (:class:`InvalidConfiguration` otherwise)."""
        if type(limit) is not int or limit < 1:
            raise InvalidConfiguration(
                f"expired() takes limit=, an int of at least 1; got {shown(limit)}."
            )
        return limit

    @staticmethod
    def _check_policy(policy: object) -> ExpiryPolicy:
        """The precondition of :meth:`append` and :meth:`touch`: ``policy`` is an
        :class:`~asyncsession.ExpiryPolicy` (:class:`InvalidConfiguration` otherwise,
        None included). Stores call it before they read or write anything; custom
        stores should too."""
        if not isinstance(policy, ExpiryPolicy):
            raise InvalidConfiguration(
                "append() and touch() take policy=, an asyncsession.ExpiryPolicy (e.g. "
                f"ExpiryPolicy(idle_timeout=timedelta(minutes=30))); got {kind_of(policy)}."
            )
        return policy

    @staticmethod
    def _check_max_messages(max_messages: object) -> int | None:
        """The precondition of :meth:`append`: ``max_messages`` is None (no cap) or an
        int, not a bool (:class:`InvalidConfiguration` otherwise: text, a float, True).
        Stores call it before they read or write anything; custom stores should too."""
        if max_messages is not None and type(max_messages) is not int:
            raise InvalidConfiguration(
                "append() takes max_messages=, an int (the most messages the session may "
                f"hold) or None for no cap; got {shown(max_messages)}."
            )
        return max_messages

    @staticmethod
    def _check_last_messages(last_messages: object) -> int | None:
        """The precondition of :meth:`get` and :meth:`touch`: ``last_messages`` is None
        (the whole history) or an int, not a bool (:class:`InvalidConfiguration`
        otherwise: text, a float, True); an int of 0 or less loads no messages. Stores
        call it before they read or write anything; custom stores should too."""
        if last_messages is not None and type(last_messages) is not int:
            raise InvalidConfiguration(
                "get() and touch() take last_messages=, an int (how many of the last "
                "messages to load; 0 for none) or None for the whole history; got "
                f"{shown(last_messages)}."
            )
        return last_messages

    @staticmethod
    def _check_messages(messages: object) -> tuple[Message, ...]:
        """The precondition of :meth:`append`: ``messages`` as a tuple, or
        :class:`InvalidUpdate` if it is not a sequence of :class:`Message` objects (text,
        a dict, None, ...). Stores call it before they read or write anything; custom
        stores should too."""
        if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Iterable):
            raise InvalidUpdate(
                "append() takes a sequence of asyncsession.Message objects; got "
                f"{kind_of(messages)}. (SessionManager.add_messages() takes (role, "
                "content) items and makes the messages.)"
            )
        batch = tuple(messages)
        for index, item in enumerate(batch):
            if not isinstance(item, Message):
                raise InvalidUpdate(
                    "append() takes a sequence of asyncsession.Message objects; item "
                    f"{index} is {kind_of(item)}. (SessionManager.add_messages() takes "
                    "(role, content) items and makes the messages.)"
                )
        return batch

    @staticmethod
    def _check_revision_step(session: Session, expected_revision: int) -> None:
        """The precondition of :meth:`save`: one revision past the expected one
        (:class:`InvalidUpdate` otherwise), and not past the last revision a session can
        have (:class:`LimitExceeded`)."""
        if type(expected_revision) is not int:
            raise InvalidUpdate(
                f"save() of session {session.id}: expected_revision must be an int (the "
                f"revision of the snapshot the change is based on), got {expected_revision!r:.60}."
            )
        if session.revision != expected_revision + 1:
            raise InvalidUpdate(
                f"save() of session {session.id} needs session.revision == "
                f"expected_revision + 1, got revision {session.revision} and "
                f"expected_revision {expected_revision}; nothing was written. Save "
                "attrs.evolve(snapshot, revision=snapshot.revision + 1, ...) with "
                "expected_revision=snapshot.revision, or use SessionManager.update(), "
                "which does this (and retries on a conflict)."
            )
        if session.revision > MAX_REVISION:
            raise revision_exhausted(session.id)

    @staticmethod
    def _next_revision(session_id: uuid.UUID, revision: int) -> int:
        """The revision after ``revision`` (an append's); :class:`LimitExceeded`, with
        nothing written, past the last revision a session can have (2**63 - 1)."""
        if revision >= MAX_REVISION:
            raise revision_exhausted(session_id)
        return revision + 1

    @staticmethod
    def _check_whole(session: Session) -> None:
        """The precondition of :meth:`add`: the whole history, not a window of it (a read
        with ``last_messages``)."""
        if not session.messages.is_complete:
            raise InvalidUpdate(
                f"add() of session {session.id} got a window of its messages; store the "
                "whole history."
            )

    @staticmethod
    def _check_window_save(session: Session, new_messages: object | None) -> None:
        """A :meth:`save` of a window needs ``new_messages`` to extend the stored history."""
        if new_messages is None and not session.messages.is_complete:
            raise InvalidUpdate(
                f"save() of session {session.id} got a window of its messages and no "
                "new_messages; pass the whole history."
            )

    @staticmethod
    def _save_finds_expired(
        session: Session, stored_expires_at: datetime | None, stored_status: SessionStatus
    ) -> bool:
        """Whether a :meth:`save` of ``session`` finds the stored session (with this
        ``expires_at`` and status) expired: its deadline is at or before the save's time,
        ``session.last_active``, and the save would change that deadline or the status."""
        return (
            stored_expires_at is not None
            and stored_expires_at <= session.last_active
            and (session.expires_at != stored_expires_at or session.status is not stored_status)
        )

    @staticmethod
    def _not_extending(session: Session, stored: int, added: int) -> InvalidUpdate:
        """The refusal of a save whose ``new_messages`` (``added`` of them) do not bring
        the ``stored`` history to the window's total."""
        return InvalidUpdate(
            f"save() of session {session.id}: new_messages do not extend the stored "
            f"history ({stored} stored + {added} new != {session.messages.total}); pass "
            "the whole history instead."
        )

    async def _open(self) -> None:  # noqa: B027 - optional hook
        """Acquire resources (connections, threads, files). Override in stores that need
        it. Called at the first :meth:`open`, and again at the first open after the last
        close: a store opens again after :meth:`_close`."""

    async def _close(self) -> None:  # noqa: B027 - optional hook
        """Release what :meth:`_open` acquired. Called at the last :meth:`aclose`."""

    @abstractmethod
    async def get(
        self, session_id: uuid.UUID, *, last_messages: int | None = None
    ) -> Session | None:
        """Return the stored session, or None.

        With ``last_messages=n`` only the last ``n`` messages are loaded (the returned
        ``messages`` is a window; ``messages.total`` stays exact); none for ``n`` of 0 or
        less, all of them for ``n`` of the total or more.
        """

    async def get_for_update(self, session_id: uuid.UUID) -> Session | None:
        """The whole session to base a compare-and-set :meth:`save` on, or None.

        Unlike :meth:`get` this may return a snapshot the store already holds (the one
        it last saved, appended or read in this process) without a round trip. Such a
        snapshot can be stale, which is safe: :meth:`save` rejects a stale revision with
        :class:`SessionConflict`; after that the store holds the current session (if the
        refusal brought it) or reads again, as it does after a failed or interrupted save.
        ``last_active``/``expires_at`` may lag behind :meth:`touch` calls of other
        processes, so a caller that would refuse the snapshot (expired, closed) confirms
        with :meth:`get` first. None is never a held answer: return it only when a read
        found no session. The default just calls :meth:`get`; stores whose reads cost a
        round trip override it. Such a store raises :class:`SessionConflict` with
        ``stale_snapshot=True`` when it refuses an update based on a snapshot it handed
        out without a read and that nothing in this process changed since (another
        process did): the manager does not count the first such refusal of an update
        against ``max_retries``.
        """
        return await self.get(session_id)

    @abstractmethod
    async def add(self, session: Session) -> None:
        """Store a new session; raise :class:`SessionConflict` if the id exists."""

    @abstractmethod
    async def save(
        self,
        session: Session,
        *,
        expected_revision: int,
        new_messages: Sequence[Message] | None = None,
    ) -> None:
        """Replace a session if its stored revision is ``expected_revision``.

        ``session.revision`` must be ``expected_revision + 1`` (:class:`InvalidUpdate`
        otherwise, see :meth:`_check_revision_step`) and ``session.messages`` the whole
        history, or a window whose ``new_messages`` bring the stored history to its
        total. ``new_messages``, when given, promises that the stored history plus these
        messages equals ``session.messages``, so a store may just append them
        (O(appended)); when None the store rewrites the history. Raises
        :class:`SessionNotFound` or :class:`SessionConflict`; nothing is written then.

        A save is a write at ``session.last_active`` (the manager sets it to the time of
        the write). A stored session whose ``expires_at`` is at or before that has
        expired, even if its revision is ``expected_revision`` (a touch that recorded a
        past deadline, or moved it earlier, leaves the revision): the save raises
        :class:`SessionNotFound` and writes nothing, as :meth:`append` would, rather than
        bring the session back. A save that keeps the stored ``expires_at`` and status
        (a rewrite of the document) brings nothing back and is allowed. See
        :meth:`_save_finds_expired`.
        """

    @abstractmethod
    async def append(
        self,
        session_id: uuid.UUID,
        messages: Sequence[Message],
        *,
        at: datetime,
        policy: ExpiryPolicy,
        max_messages: int | None = None,
    ) -> Session:
        """Atomically append messages, bump revision, set ``last_active`` to ``at``.

        ``expires_at`` is recomputed with ``policy``. Raises :class:`SessionNotFound`
        (missing, or expired at ``at``), :class:`SessionClosed` (terminal status) or
        :class:`LimitExceeded` (the total would exceed ``max_messages``); nothing is
        written then. An open session whose deadline under ``policy``, computed from
        its stored ``last_active`` and ``created_at``, is at or before ``at`` (an
        ``idle_timeout`` or ``max_age`` added or shortened since it was written) has
        expired: its ``expires_at`` becomes that deadline, nothing else changes (not
        the revision either), and :class:`SessionNotFound` is raised. Otherwise the new
        deadline is computed from ``max(last_active, at)``. (Under the policy the
        session was written with, that deadline from the stored ``last_active`` is
        the stored ``expires_at``: nothing expires earlier than it said.) The returned
        snapshot's ``messages`` holds at least the appended messages (a window is
        allowed; ``total`` is exact).
        """

    @abstractmethod
    async def touch(
        self,
        session_id: uuid.UUID,
        *,
        at: datetime,
        policy: ExpiryPolicy,
        last_messages: int | None = None,
    ) -> Session | None:
        """Record activity at ``at`` and return the session (None if missing).

        Open, unexpired sessions get ``last_active = max(last_active, at)`` and a new
        ``expires_at`` from ``policy``; ``revision`` does not change. Expired or closed
        sessions are returned unchanged: a closed session keeps the deadline recorded
        when it closed (``closed_at + retention`` under the closing policy), whatever
        this ``policy``'s ``retention``. An open session whose deadline under
        ``policy``, computed from its stored ``last_active`` and ``created_at``, is at or
        before ``at`` (an ``idle_timeout`` or ``max_age`` added or shortened since it
        was written) has expired: only its ``expires_at`` becomes that deadline,
        whatever ``touch_interval`` says, and it is returned so (expired at ``at``), as
        :meth:`append` does.
        """

    @abstractmethod
    async def delete(self, session_id: uuid.UUID) -> bool:
        """Delete a session; return whether it existed."""

    @abstractmethod
    async def remove_expired(self, session_id: uuid.UUID, *, now: datetime) -> Session | None:
        """Delete the session only if ``expires_at <= now``; return what was removed.

        Atomic, so when several managers clean up one store, exactly one of them gets
        the session back. The returned snapshot may hold a window of its messages.
        An expired session whose document cannot be read, as far as this store knows,
        is not deleted (a snapshot the store holds of that very version counts as
        read): this raises :class:`CorruptSessionError` (:class:`SchemaVersionError`
        for a newer version) naming it, and it stays stored as it was, for a repair or
        :meth:`delete` (the Redis store removes its keys' expiry until a write sets it
        again: one whose deadline plus ``key_expiry_grace`` has passed removes it at
        once). (A store that sets unreadable documents aside instead, as the file
        store's quarantine does, returns None: the session has left the store.) A store
        may also return None for a session that kept changing while it tried to remove
        it: it is still listed by :meth:`expired`, for the next cleanup pass.
        """

    @abstractmethod
    async def expired(self, now: datetime, *, limit: int = 1000) -> Sequence[uuid.UUID]:
        """Ids whose ``expires_at <= now``, earliest first, from a deadline index.

        Among deadlines the index cannot tell apart (equal ones; in the Redis store also
        ones that round to one value) the order is the store's own. The Redis store's
        index keeps each deadline as a double of microseconds since the epoch: exact
        until 2**53 µs (June 2255), then rounded to the nearest multiple of 2 µs, growing
        to 32 µs near ``datetime.max``; deadlines that round to one value come in id
        order, so there a deadline up to 32 µs later may come first.
        """

    @abstractmethod
    async def list(self, query: SessionQuery) -> Page:
        """Return one page of sessions matching ``query``, in the order
        :class:`SessionQuery` describes (newest ``last_active`` first, ties by id
        descending), by the sessions' stored ``last_active``: appends and touches move
        sessions up, as saves do. (The Redis store's index rounds times as for
        :meth:`expired`: before 1685 or after June 2255, activity times that round to one
        value are listed by id.)

        Items may hold a window of their messages (``messages.total`` is exact).
        """

    @abstractmethod
    async def count_by_status(self, owner: str | None = None) -> Mapping[SessionStatus, int]:
        """Stored sessions per status (including expired ones awaiting cleanup).

        Statuses with no sessions are left out (no zero counts): ``{}`` for none.
        """

    async def document_versions(
        self, session_ids: Iterable[uuid.UUID]
    ) -> Mapping[uuid.UUID, int] | None:
        """The schema version of each stored document, as it sits in the store.

        Returns ``{id: version}`` for the ids that are stored (missing ids are left out;
        repeated ids are answered once). A version below
        :data:`~asyncsession.CURRENT_VERSION` marks a document that is migrated each time
        it is loaded until a save rewrites it; one above it was written by a newer
        release. Expiry is not applied: an expired session awaiting cleanup is still
        reported. Stores answer a batch in one operation (one round trip or one worker
        hop), so callers pass many ids at once.

        A stored document whose version cannot be read (not JSON, no non-negative int
        ``version``) raises :class:`CorruptSessionError` naming that session, as
        :meth:`get` does for it.

        The default returns None, meaning "unknown", without reading anything: loading a
        session migrates it, so the public operations cannot show the version a document
        was stored at. Callers must then treat every document as possibly outdated
        (``asyncsession migrate`` rewrites them all). Stores that keep documents override
        this; a store that never holds an old document answers
        :data:`~asyncsession.CURRENT_VERSION` for each stored id.

        An id that is not a :class:`uuid.UUID` raises :class:`InvalidSessionId` (the
        default checks them too).
        """
        self._check_ids(session_ids)
        return None


class RemoteEvent(Protocol):
    """A lifecycle event announced by another manager (ids and metadata only)."""

    @property
    def kind(self) -> str: ...
    @property
    def session_id(self) -> uuid.UUID: ...
    @property
    def at(self) -> datetime: ...
    @property
    def revision(self) -> int | None: ...
    @property
    def origin(self) -> str: ...


class EventTransport(ABC):
    """Optional store capability: lifecycle events shared between processes.

    A manager created with ``share_events=True`` over a store that implements this
    publishes its events through it and delivers other managers' events to its own
    subscribers (with ``session=None`` and ``origin`` set).
    """

    @abstractmethod
    async def publish_event(
        self,
        kind: str,
        session_id: uuid.UUID,
        *,
        at: datetime,
        revision: int | None = None,
        origin: str = "",
    ) -> int:
        """Announce an event to other processes; return how many received it."""

    async def publish_events(self, events: Sequence[RemoteEvent]) -> int:
        """Announce several events, in order; return how many receptions there were in
        all (the sum of what :meth:`publish_event` returns for each).

        A sharing manager hands over everything it has queued at once (up to 500 events).
        The default calls :meth:`publish_event` for each in turn, so a transport that
        has only that keeps working; override it to send a batch in one round trip
        (:class:`~asyncsession.stores.redis.RedisRepository` does). If it raises, the
        manager counts the whole batch as not shared, although events before the
        failure may have gone out.
        """
        heard = 0
        for event in events:
            heard += await self.publish_event(
                event.kind,
                event.session_id,
                at=event.at,
                revision=event.revision,
                origin=event.origin,
            )
        return heard

    @abstractmethod
    def subscribe_events(self) -> AbstractAsyncContextManager[AsyncIterator[RemoteEvent]]:
        """``async with store.subscribe_events() as events: async for e in events: ...``"""
