"""SessionManager: the policy layer over a repository."""

from __future__ import annotations

import functools
import inspect
import logging
import math
import re
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
)
from contextlib import AsyncExitStack, asynccontextmanager
from contextvars import ContextVar
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeGuard, TypeVar, Union

import anyio
import anyio.lowlevel
import attrs
import orjson
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._clock import Clock, Duration, SystemClock, active_clock, to_timedelta
from ._context import _current
from ._events import EventHub, EventKind, Subscription, parse_kinds
from ._exceptions import (
    InvalidConfiguration,
    InvalidSessionId,
    InvalidUpdate,
    LimitExceeded,
    ManagerNotRunning,
    SerializationError,
    SessionClosed,
    SessionConflict,
    SessionError,
    SessionLocked,
    SessionNotFound,
    StorageError,
    WrongTask,
    WrongThread,
    check_flag,
    kind_of,
    leaf_ids,
    reraise,
    shown,
    sole_error,
    too_many_messages,
)
from ._json import freeze_state
from ._locks import ki_protected, locks_of
from ._loops import current_task, has_ended
from ._models import (
    ExpiryPolicy,
    Message,
    Session,
    SessionStatus,
    check_state_changes,
    parse_status,
    replace_trusted,
)
from ._notes import Notes, Overflow, cause_of
from .abc import EventTransport, Page, SessionQuery, SessionRepository
from .reporting import Reporter, SessionReport

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["SessionIterator", "SessionManager", "SessionStats", "UpdateFn"]

logger = logging.getLogger(__name__)

#: Bound of each reporter call at exit when ``reporter_timeout`` is None.
_EXIT_REPORT_CALL_SECONDS = 5.0

#: How long leaving the manager waits for the calls under way to finish before it closes
#: the store under them.
_CALLS_AT_EXIT_SECONDS = 5.0

#: Most events a sharing manager hands its transport at once (``publish_events``).
_SHARE_BATCH = 500

#: A recurring job (cleanup, event sharing and subscription, the ASGI middleware's loads
#: and visits) warns about a kind of failure of its store at most once in this many
#: seconds, and remembers this many kinds.
_OUTAGE_WARNING_EVERY = 60.0
_OUTAGE_KINDS = 64

_P = ParamSpec("_P")
_R = TypeVar("_R")
_Manager = TypeVar("_Manager", bound="SessionManager")  # a subclass's own type


class _Calls:
    """The public calls under way that one run of a manager (one ``async with``) let in:
    its exit waits for them. A call still under way from an earlier run is not counted
    against a later one."""

    __slots__ = ("count", "cut_off", "done")

    def __init__(self) -> None:
        self.count = 0
        self.done: anyio.Event | None = None  # set when the count reaches 0, once exit began
        self.cut_off = False  # the exit closed the store under calls still under way

    def closed_under(self) -> ManagerNotRunning | None:
        """What a call gets instead of its store's error once the exit closed the store
        under it (None before): the store's "not open" would advise opening a store the
        call's user did open."""
        if not self.cut_off:
            return None
        return ManagerNotRunning(closed_under_call=_CALLS_AT_EXIT_SECONDS)

    def ended(self) -> None:
        self.count -= 1
        if not self.count and self.done is not None:
            self.done.set()


class _Holding:
    """Holds a session's lock, which every manager of the store shares. Once the
    manager has begun to exit, a wait behind another manager's call ends
    (:class:`ManagerNotRunning`): that call may take long, and the exit waits for this
    one. A wait behind this manager's own calls goes on, as they finish."""

    __slots__ = ("_held", "_manager", "_sid")

    def __init__(self, manager: SessionManager, sid: uuid.UUID) -> None:
        self._manager = manager
        self._sid = sid
        self._held = manager._locks(sid)

    @ki_protected
    async def __aenter__(self) -> None:
        manager, sid, held = self._manager, self._sid, self._held
        waiter = held.take_or_queue()
        if waiter is not None:  # another task holds it: wait, as long as the exit allows
            waits = manager._lock_waits
            taken = False
            with anyio.CancelScope() as waiting:
                waits[waiting] = (sid, waiter.owner)
                try:
                    if not manager._running:  # a call made by a call under way at the exit
                        manager._end_lock_waits()
                    await held.wait(waiter)
                    taken = True
                finally:
                    del waits[waiting]
                    if not taken and not manager._running:
                        manager._end_lock_waits()  # a lock handed to it went on
            if not taken:  # (the wait was ended: otherwise its cancellation propagates)
                raise ManagerNotRunning(waited_for_lock=True)
        manager._lock_holders.add(sid)

    @ki_protected
    async def __aexit__(self, *exc_info: object) -> None:
        manager = self._manager
        manager._lock_holders.discard(self._sid)
        self._held.release()
        if not manager._running and manager._lock_waits:
            manager._end_lock_waits()  # the lock may have gone to another manager


# Fields an update function may not change, and why. (The save sets last_active and
# expires_at whatever fn returns: a function that builds on a snapshot read before a
# touch, of the same revision, has an older last_active and is no mistake.)
_MANAGED_FIELDS = {
    "id": "rotate() gives a session a new id",
    "created_at": "set when the session is created",
    "revision": "each write adds one",
    "closed_at": "set to the time of the save that gives it a terminal status",
}


class SessionIterator:
    """What :meth:`SessionManager.iterate` returns: an async iterator of sessions that
    reads a page at a time. A plain one (an async generator would need closing when a
    loop leaves it early, on trio); :meth:`aclose` ends it."""

    __slots__ = ("_cursor", "_done", "_items", "_manager", "_query", "_reading")

    def __init__(self, manager: SessionManager, query: SessionQuery) -> None:
        self._manager = manager
        self._query = query
        self._items: deque[Session] = deque()
        self._cursor: str | None = None
        self._done = False
        self._reading = False  # a task is reading the next page

    def __aiter__(self) -> SessionIterator:
        return self

    async def __anext__(self) -> Session:
        while not self._items:
            if self._done:
                raise StopAsyncIteration
            if self._reading:  # two tasks would read one page twice
                raise RuntimeError(
                    "Another task is reading this iterate()'s next page: give each task "
                    "an iterate() of its own."
                )
            self._reading = True
            try:
                query = self._query
                page = await self._manager.list(
                    owner=query.owner,
                    status=query.status,
                    search=query.search,
                    limit=query.limit,
                    cursor=self._cursor,
                )
            finally:
                self._reading = False
            if self._done:  # aclose() came while the page was read: the page is not used
                raise StopAsyncIteration
            self._items.extend(page.items)
            self._cursor = page.next_cursor
            self._done = page.next_cursor is None
        return self._items.popleft()

    async def aclose(self) -> None:
        """End the iteration, also one that another task is reading a page of (for
        ``contextlib.aclosing``; nothing needs closing)."""
        self._done = True
        self._items.clear()


class _Background:
    """The tasks one run of a manager started in its task group, counted by the tasks
    themselves: an exit that cannot leave the group (the task that entered it has
    ended) still waits for them, and learns what they raised."""

    __slots__ = ("count", "failures", "idle", "scope")

    def __init__(self, scope: anyio.CancelScope | None) -> None:
        self.scope = scope  # the task group's
        self.count = 0
        self.idle: anyio.Event | None = None  # set when the count reaches 0
        self.failures: list[BaseException] = []  # what the tasks raised (not cancellation)

    def counted(self, fn: Callable[_P, Awaitable[None]]) -> Callable[_P, Coroutine[Any, Any, None]]:
        """``fn``, counted while it runs (a task cancelled before it starts never runs
        and is never counted)."""

        @functools.wraps(fn)
        async def run(*args: _P.args, **kwargs: _P.kwargs) -> None:
            self.count += 1
            try:
                await fn(*args, **kwargs)
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException as exc:
                self.failures.append(exc)
                raise
            finally:
                self.count -= 1
                if not self.count and self.idle is not None:
                    self.idle.set()

        return run

    async def stop(self) -> None:
        """Cancel the tasks and wait until none of them runs."""
        if self.scope is not None:
            self.scope.cancel()
        while self.count:
            idle = self.idle = anyio.Event()
            await idle.wait()


class _Call:
    """A public call under way (in :data:`_calling` while it runs)."""

    __slots__ = ("live", "manager")

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager
        self.live = True


#: The outermost public call the current task is in. Calls made inside it (an update
#: function calling the manager, say) run even while the exit waits for it, and are not
#: counted again. Tasks started inside it inherit the value, hence ``live``: once that
#: call has ended, they are refused like any other after the exit.
_calling: ContextVar[_Call | None] = ContextVar("asyncsession_calling", default=None)


class _InUpdateFn:
    """An update function of one session running (in :data:`_in_update_fn` meanwhile)."""

    __slots__ = ("live", "manager", "outer", "sid")

    def __init__(self, manager: SessionManager, sid: uuid.UUID, outer: _InUpdateFn | None):
        self.manager = manager
        self.sid = sid
        self.outer = outer  # the update function this one runs inside, if any
        self.live = True


#: The update functions the current task runs inside (tasks started in one inherit it,
#: hence ``live``, as for :data:`_calling`).
_in_update_fn: ContextVar[_InUpdateFn | None] = ContextVar(
    "asyncsession_in_update_fn", default=None
)


_RETURN_THE_CHANGE = "return the changed snapshot from the function instead"


def _nested_in(manager: SessionManager) -> bool:
    """True inside one of ``manager``'s public calls, while it is under way."""
    outer = _calling.get()
    return outer is not None and outer.live and outer.manager is manager


def _call(
    method: Callable[Concatenate[SessionManager, _P], Awaitable[_R]],
) -> Callable[Concatenate[SessionManager, _P], Coroutine[Any, Any, _R]]:
    """A public operation: refused unless the manager runs (:class:`ManagerNotRunning`),
    and counted while under way, so that leaving the manager waits for it to finish
    before the store is closed."""

    @functools.wraps(method)
    async def call(self: SessionManager, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        nested = _nested_in(self)
        if not nested and not self._running:
            raise ManagerNotRunning()
        if threading.get_ident() != self._thread:  # also nested: a thread copies the context
            raise WrongThread("This SessionManager")
        if nested:
            return await method(self, *args, **kwargs)
        calls = self._calls
        calls.count += 1
        this = _Call(self)
        token = _calling.set(this)
        try:
            return await method(self, *args, **kwargs)
        except StorageError as exc:
            if (instead := calls.closed_under()) is not None:
                raise instead from exc
            raise
        finally:
            this.live = False
            _calling.reset(token)
            calls.ended()

    return call


#: How many expired sessions that could not be removed a manager remembers, so as to warn
#: about each once (and again only when its failure changes), not at every cleanup pass.
#: Beyond this many at once, one warning says so and the others are logged at debug level
#: until fewer than half that many are stuck.
_UNREMOVABLE_REMEMBERED = 10_000

#: An update callback: takes the current snapshot, returns the new one (sync or async).
UpdateFn = Callable[[Session], Union[Session, Awaitable[Session]]]

SessionId = Union[uuid.UUID, str]


@attrs.frozen(slots=True)
class SessionStats:
    """Counts reported by :meth:`SessionManager.stats`. ``events_unshared``: events a
    sharing manager (``share_events=True``) did not share with other processes."""

    by_status: Mapping[SessionStatus, int]
    subscribers: int
    cleanup_passes: int
    expired_total: int
    reports_dropped: int = 0
    removals_failed: int = 0
    events_unshared: int = 0

    @property
    def total(self) -> int:
        """All stored sessions."""
        return sum(self.by_status.values())


@attrs.frozen(slots=True)
class _SharedEvent:
    """One of a manager's events on its way to other processes (a ``RemoteEvent``)."""

    kind: str
    session_id: uuid.UUID
    at: datetime
    revision: int | None
    origin: str


def _positive_int_or_none(value: int | None, name: str) -> int | None:
    """A cap: an int >= 1, or None for none."""
    if value is None:
        return None
    if type(value) is not int or value < 1:
        raise InvalidConfiguration(
            f"{name} must be an int >= 1, or None for no cap; got {value!r}."
        )
    return value


def _positive_int(value: int | None, name: str, default: int) -> int:
    """A count: an int >= 1 (None, which the annotation leaves out, means ``default``)."""
    if value is None:
        return default
    if type(value) is not int or value < 1:
        raise InvalidConfiguration(
            f"{name} must be an int >= 1 (default {default}); got {value!r}."
        )
    return value


def _not_in(messages: Iterable[Message], old: Session) -> list[Message]:
    """The messages of a rewritten history that are not in ``old``'s (by value: a trim
    that rebuilt equal copies keeps them)."""
    before: dict[tuple[str, str, datetime], list[Message]] = {}
    for message in old.messages:
        before.setdefault((message.role, message.content, message.timestamp), []).append(message)
    return [
        m
        for m in messages
        if not any(m == kept for kept in before.get((m.role, m.content, m.timestamp), ()))
    ]


def _check_reporters(reporters: object) -> tuple[Reporter, ...]:
    """``reporters`` as a tuple (an iterator is read once); refuse a non-reporter.

    Any callable ``report`` is accepted, as a decorated ``async def`` or one that returns
    an awaitable may be; a call that returns no awaitable is logged as a failure.
    """
    if isinstance(reporters, (str, bytes)) or not isinstance(reporters, Iterable):
        raise InvalidConfiguration(
            f"reporters must be a list of reporters (e.g. [LoggingReporter()]); got "
            f"{reporters!r:.80}."
        )
    found = tuple(reporters)
    for reporter in found:
        if isinstance(reporter, type):  # its report() would fail at every call
            raise InvalidConfiguration(
                f"reporters must be reporter objects, not classes: pass an instance, e.g. "
                f"{reporter.__name__}() instead of {reporter.__name__}."
            )
        report = getattr(reporter, "report", None)
        if not callable(report):
            raise InvalidConfiguration(
                f"reporters must have an async report(report) method; got {reporter!r:.80}."
            )
    return found


class SessionManager:
    """Create, read, update, close, list and expire sessions stored in a repository.

    Use it as an async context manager: entering opens the repository and starts the
    cleanup loop in the manager's task group; leaving cancels the loop and closes the
    repository (if the manager opened it)::

        async with SessionManager(MemoryRepository(), idle_timeout=1800) as sessions:
            s = await sessions.create(owner="alice")

    Durations are seconds or :class:`~datetime.timedelta`; ``None`` disables a limit.
    ``retention`` is how long closed sessions stay readable. ``touch_interval``
    coalesces activity: a read moves ``last_active`` (a store write) only if that moves
    it by at least this much, so idle deadlines are exact to within it (``None``: every
    touching read writes); it is capped at half of ``idle_timeout``, so reads always keep
    a session alive. ``max_retries`` is how many times an update may be tried in all
    (once more when the first try was based on a snapshot the SQLite or Redis store
    remembered and another process had changed: see :class:`SessionConflict`).

    A session written under another policy (an ``idle_timeout`` or ``max_age`` added or
    shortened since) whose deadline under this one, computed from its stored
    ``last_active``, has passed is expired for this manager's writes and touching
    reads: they raise :class:`SessionNotFound`, store and announce nothing,
    and have the store record that deadline, so that reads, listings and cleanup see
    the session expired from then on (cleanup announces it EXPIRED). Until then, reads
    that do not touch (``get(touch=False)``, ``exists``, ``list``) go by the stored
    deadline. A closed session keeps the deadline recorded when it closed
    (``closed_at + retention`` under the closing manager's ``retention``).

    ``max_message_size`` caps each message's content (characters) plus its ``data``
    (bytes of its compact JSON).
    ``reporter_timeout`` bounds each reporter call (``None``: no bound while running,
    5 s at exit). At exit, queued reports get ``reporter_timeout`` (or 5 s) times the
    number of reporters plus one in all; reports still queued then are dropped, counted
    in ``stats().reports_dropped`` and logged once with their number. A reporter that
    raises (even a cancellation of its own) is logged and the manager carries on.
    While it runs, reports that do not fit the queue (``event_buffer``) are dropped and
    counted there too, with one warning per episode (until the reporters caught up).

    With ``share_events=True`` the manager hands its store everything it has queued for
    other processes at once (up to 500 events, in one round trip with Redis). Events
    that do not fit the queue (``event_buffer``), whose publishing failed, or that were
    still queued when the manager left are not shared: counted in
    ``stats().events_unshared``, with one warning per episode.
    """

    def __init__(
        self,
        repository: SessionRepository,
        *,
        idle_timeout: Duration = 1800,
        max_age: Duration = None,
        retention: Duration = timedelta(days=1),
        touch_interval: Duration = 1,
        cleanup_interval: Duration = 300,
        clock: Clock | None = None,
        max_retries: int = 16,
        max_messages: int | None = None,
        max_message_size: int | None = None,
        event_buffer: int = 1000,
        cleanup_batch: int = 1000,
        reporters: Iterable[Reporter] = (),
        report_attributes: Mapping[str, Any] | None = None,
        reporter_timeout: Duration = 5,
        share_events: bool = False,
    ) -> None:
        if not isinstance(repository, SessionRepository):
            raise InvalidConfiguration(
                f"repository must be a SessionRepository (e.g. MemoryRepository()), got "
                f"{repository!r}."
            )
        if clock is not None and not isinstance(clock, Clock):
            raise InvalidConfiguration(f"clock must have now() and async sleep(); got {clock!r}.")
        self._repository = repository
        # Does get_for_update() answer from snapshots the store holds? Then refusals of a
        # snapshot (expired, closed) are confirmed by a fresh read first.
        self._held_snapshots = (
            type(repository).get_for_update is not SessionRepository.get_for_update
        )
        idle = to_timedelta(idle_timeout, "idle_timeout", "Use None for no idle timeout.")
        touch = to_timedelta(
            touch_interval, "touch_interval", "Use None to record every touching read."
        ) or timedelta(0)
        if idle is not None:  # a read must always move the idle deadline
            touch = min(touch, idle / 2)
        self._policy = ExpiryPolicy(
            idle_timeout=idle,
            max_age=to_timedelta(max_age, "max_age", "Use None for no absolute limit."),
            retention=to_timedelta(
                retention,
                "retention",
                "None keeps closed sessions until they are deleted; to drop them soon "
                "after close, give a short retention (e.g. 1), or delete() them.",
            ),
            touch_interval=touch,
        )
        self._cleanup_interval = to_timedelta(
            cleanup_interval,
            "cleanup_interval",
            "Use None for no cleanup loop (then call purge_expired() yourself).",
        )
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._max_retries = _positive_int(max_retries, "max_retries", 16)
        self._max_messages = _positive_int_or_none(max_messages, "max_messages")
        self._max_message_size = _positive_int_or_none(max_message_size, "max_message_size")
        self._event_buffer = _positive_int(event_buffer, "event_buffer", 1000)
        self._cleanup_batch = _positive_int(cleanup_batch, "cleanup_batch", 1000)
        checked_reporters = _check_reporters(reporters)
        if check_flag(share_events, "share_events") and not isinstance(repository, EventTransport):
            raise InvalidConfiguration(
                f"share_events=True needs a store that can share events between processes "
                f"(e.g. RedisRepository); {type(repository).__name__} cannot."
            )
        self._reporters = checked_reporters
        self._report_attributes = freeze_state(report_attributes, "report_attributes")
        self._reporter_timeout = to_timedelta(
            reporter_timeout, "reporter_timeout", "Use None for no bound while running."
        )
        self._share_events = share_events
        self._origin = uuid.uuid4().hex
        self._reports: MemoryObjectSendStream[SessionReport] | None = None
        self._reports_done = anyio.Event()
        self._reports_dropped = 0
        self._reports_overflow = Overflow(
            logger,
            f"reporters are too slow: their queue of {self._event_buffer} reports is full, "
            "so the reports of sessions that end are dropped until they catch up; %d "
            "dropped so far (see stats().reports_dropped)",
            "reporters caught up; %d reports were dropped meanwhile",
        )
        self._reports_draining = False  # exit began: reporter_timeout=None gets a bound
        self._report_queue: MemoryObjectReceiveStream[SessionReport] | None = None
        self._report_current: SessionReport | None = None  # not yet passed to every reporter
        self._report_next = 0  # the index of the reporter it goes to next
        self._report_call: anyio.CancelScope | None = None  # the reporter call under way
        self._outbox: MemoryObjectSendStream[_SharedEvent] | None = None
        self._events_unshared = 0  # dropped (outbox full), failed, or left at exit
        self._sharing = 0  # events of the batch the transport is publishing now
        # cleanup passes waiting for room in the reporters' buffer (the exit ends them)
        self._room_waits: set[anyio.CancelScope] = set()
        # Calls waiting for a session's lock (scope: session, waiting task), and the
        # sessions whose lock this manager's calls hold: see _Holding.
        self._lock_waits: dict[anyio.CancelScope, tuple[uuid.UUID, object]] = {}
        self._lock_holders: set[uuid.UUID] = set()
        # expired sessions whose failed removals ended a pass as a store failure: later
        # passes try them after the others (see purge_expired)
        self._deferred: set[uuid.UUID] = set()
        self._outbox_overflow = Overflow(
            logger,
            f"event sharing is too slow: its queue of {self._event_buffer} events is full, "
            "so events are dropped, not shared, until it drains; %d not shared so far "
            "(see stats().events_unshared)",
            "event sharing caught up; %d events were not shared meanwhile",
        )
        self._published = anyio.Event()  # set once the outbox is closed and emptied
        self._locks = locks_of(repository)  # shared by the store's managers
        self._rotating: dict[uuid.UUID, anyio.Event] = {}  # set when the rotation ends
        self._host: object = None  # the task that entered the manager (see __aexit__)
        self._thread: int | None = None  # the thread whose event loop entered it
        self._background = _Background(None)  # the task group's tasks
        self._events = EventHub()
        self._running = False
        self._starting = False
        self._leaving: anyio.Event | None = None  # set when an exit for an ended
        # entering task (see _leave_for_ended_host) has returned; None: none under way
        self._calls = _Calls()  # public operations under way (see _call)
        self._stack: AsyncExitStack | None = None
        self._cleanup_passes = 0
        self._expired_total = 0
        self._removals_failed = 0
        # Expired sessions whose removal failed, and how: each is warned about once.
        self._unremovable = Notes(
            logger,
            remembered=_UNREMOVABLE_REMEMBERED,
            again=(
                " (passed over; cleanup tries again at each pass and warns again only if "
                "this failure changes)"
            ),
            crowded=(
                " (passed over); more than {n} expired sessions cannot be removed, so the "
                "failures of this one and of the others beyond the first {n} are logged at "
                "debug level only while that lasts (cleanup still tries each at each pass)"
            ),
        )
        self._cleanup_done: anyio.Event | None = None
        # The next pass's due time (None while a pass runs) and the clock's time when the
        # last one ended: wait_for_cleanup() with a ManualClock reads them.
        self._cleanup_due: datetime | None = None
        self._cleanup_ended_at: datetime | None = None
        self._cleanup_scope: anyio.CancelScope | None = None  # the cleanup loop's own
        self._cleanup_ended = anyio.Event()

    def __repr__(self) -> str:
        return (
            f"SessionManager({self._repository!r}, idle_timeout={self._policy.idle_timeout}, "
            f"max_age={self._policy.max_age}, running={self._running})"
        )

    # -- properties -------------------------------------------------------------------

    @property
    def repository(self) -> SessionRepository:
        """The store this manager uses."""
        return self._repository

    @property
    def clock(self) -> Clock:
        """The clock that decides activity times and expiry."""
        return self._clock

    @property
    def policy(self) -> ExpiryPolicy:
        """The expiry policy (idle timeout, max age, retention)."""
        return self._policy

    @property
    def running(self) -> bool:
        """True inside ``async with``."""
        return self._running

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self: _Manager) -> _Manager:
        if self._running or self._stack is not None or self._starting:
            raise InvalidConfiguration("This SessionManager is already running.")
        if self._leaving is not None or self._background.count:
            raise InvalidConfiguration(
                "This SessionManager is still being left: its exit waits for the calls "
                "under way, or the tasks of its last run are still stopping (after an exit "
                "that was cancelled, they may take longer). Enter it again once they have "
                "ended."
            )
        self._starting = True  # until entry ends: a second entry meanwhile is refused
        stack = AsyncExitStack()
        try:
            await stack.enter_async_context(self._repository)
            task_group = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(task_group.cancel_scope.cancel)
            background = self._background = _Background(task_group.cancel_scope)
            self._cleanup_done = anyio.Event()
            if self._reporters:
                send, receive = anyio.create_memory_object_stream[SessionReport](self._event_buffer)
                self._reports = send
                self._report_queue = receive
                self._reports_done = anyio.Event()
                self._reports_draining = False
                task_group.start_soon(
                    background.counted(self._report_loop), receive, name="asyncsession reports"
                )
            if self._share_events:
                await task_group.start(
                    background.counted(self._share_events_loop), name="asyncsession events"
                )
            if self._cleanup_interval is not None:
                first_pass = self._clock.now() + self._cleanup_interval
                self._cleanup_due, self._cleanup_ended_at = first_pass, None
                scope = self._cleanup_scope = anyio.CancelScope()
                ended = self._cleanup_ended = anyio.Event()
                task_group.start_soon(
                    background.counted(self._cleanup_loop),
                    first_pass,
                    scope,
                    ended,
                    name="asyncsession cleanup",
                )
        except BaseException as exc:
            await stack.aclose()
            single = sole_error(exc)
            if single is not exc:  # a task group's wrapping says nothing to the caller
                reraise(single)
            raise
        finally:
            self._starting = False
        self._stack = stack
        self._calls = _Calls()
        self._running = True
        self._host = current_task()  # the exit must be in this task (its task group's)
        self._thread = threading.get_ident()  # calls must come from its event loop's thread
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if self._leaving is not None:  # another task is leaving it: wait for that exit
            await self._leaving.wait()
            return None
        if self._stack is not None and self._host is not current_task():
            if not has_ended(self._host):
                raise WrongTask("This SessionManager")
            await self._leave_for_ended_host()
            return None
        try:
            await self._wind_down()
        except BaseException as error:
            # Interrupted (asyncio's own cancellation passes through shields): still
            # end the subscriptions and the event and report queues, close the store and
            # stop the manager's tasks, then raise the interruption.
            self._close_queues()
            stack, self._stack = self._stack, None
            if stack is not None:
                await stack.__aexit__(type(error), error, error.__traceback__)
            raise
        stack, self._stack = self._stack, None
        if stack is None:
            return None
        try:
            return await stack.__aexit__(exc_type, exc, tb)
        except BaseException as error:
            # The task group wraps what leaves the block (the caller's own exception, a
            # Ctrl-C) in an exception group (trio may also regroup the caller's own
            # group's members): give the caller their exception itself.
            if exc is not None and error is not exc and leaf_ids(error) <= leaf_ids(exc):
                reraise(exc)
            single = sole_error(error, keep=exc)
            if single is error:
                raise
            reraise(single)

    async def _leave_for_ended_host(self) -> None:
        """Stop as ``__aexit__`` does when the task that entered the manager has ended
        (asyncio: a pytest-asyncio fixture's setup), so nothing can leave its task group:
        wind down, cancel the group's tasks and wait for them, close the store, and
        leave the group to be collected with that task."""
        self._stack = None  # dropped: leaving its task group needs the ended task
        leaving = self._leaving = anyio.Event()  # no new entry or exit meanwhile
        background = self._background
        try:
            await self._wind_down()
        except BaseException:
            self._close_queues()  # interrupted: stop anyway, then raise the interruption
            raise
        finally:
            try:
                with anyio.CancelScope(shield=True):
                    await background.stop()
            finally:  # even if asyncio's own cancellation got through the shield
                try:
                    await self._repository.__aexit__(None, None, None)
                finally:
                    self._leaving = None
                    leaving.set()
        failures = background.failures
        if failures:  # what the task group would have raised (the tasks catch Exception)
            raise sole_error(BaseExceptionGroup("unhandled errors in a TaskGroup", failures))

    async def _wind_down(self) -> None:
        """Refuse new calls, stop cleanup, let the calls under way finish, then let
        queued events and reports out, each within a bound."""
        self._running = False
        for waiting in self._room_waits:  # a pass waiting for report room: stop waiting
            waiting.cancel()  # (its removal is announced now, while the queues are open)
        self._end_lock_waits()  # behind other managers' calls (they may take long)
        if self._cleanup_done is not None:  # wake wait_for_cleanup(): no pass will come
            self._cleanup_done.set()
        scope, self._cleanup_scope = self._cleanup_scope, None
        if scope is not None:
            # Stop the cleanup loop before the events and reports close: a removal under
            # way finishes (it is shielded) and is announced and reported like the others;
            # the pass stops before the next one.
            scope.cancel()
            with anyio.CancelScope(shield=True):
                await self._cleanup_ended.wait()
        calls = self._calls
        if calls.count:  # closing the store under them would fail them, or worse
            done = calls.done = anyio.Event()
            with anyio.move_on_after(_CALLS_AT_EXIT_SECONDS, shield=True):
                await done.wait()
            if calls.count:
                calls.cut_off = True
                logger.warning(
                    "%d call%s made while the manager ran %s still under way when it "
                    "exited (after %g s); the store is closed under %s",
                    calls.count,
                    "" if calls.count == 1 else "s",
                    "was" if calls.count == 1 else "were",
                    _CALLS_AT_EXIT_SECONDS,
                    "it" if calls.count == 1 else "them",
                )
        self._events.close()
        if self._outbox is not None:
            # Let the events still queued out, within a bound (a short script's last
            # ones would be lost otherwise: leaving the task group cancels the sender).
            outbox, self._outbox = self._outbox, None
            outbox.close()
            with anyio.move_on_after(_SHARE_AT_EXIT_SECONDS, shield=True):
                await self._published.wait()
            # queued, and the batch still going out (counted in events_unshared when
            # the publishing task ends)
            left = outbox.statistics().current_buffer_used + self._sharing
            if left:
                logger.warning(
                    "%s events were not shared at exit (publishing stopped, or took more "
                    "than %g s)",
                    left,
                    _SHARE_AT_EXIT_SECONDS,
                )
        if self._reports is not None:  # let queued reports out, within a bound
            self._reports.close()
            self._reports = None
            self._reports_draining = True
            per_call = self._report_call_seconds()
            call = self._report_call
            if call is not None and self._reporter_timeout is None:  # bound it now too
                call.deadline = min(call.deadline, anyio.current_time() + per_call)
            # time for the report in progress to pass every reporter, and one more
            with anyio.move_on_after(per_call * (len(self._reporters) + 1), shield=True):
                await self._reports_done.wait()
                # A cancellation of the block around the manager cancelled the report
                # loop with the rest of its task group: pass what it left from here.
                await self._pass_left_reports()
            # Count what is cut off now: nothing takes reports from the queue any more,
            # because leaving the task group (after this) first cancels the report loop.
            self._drop_cut_off_reports()

    def _close_queues(self) -> None:
        """End the subscriptions and close the event and report queues, without waiting
        for what they hold (an exit that was interrupted)."""
        self._events.close()
        outbox, self._outbox = self._outbox, None
        if outbox is not None:
            outbox.close()
        if self._reports is not None:
            self._reports.close()
            self._reports = None
        if self._report_queue is not None:  # also when interrupted while draining it
            self._drop_cut_off_reports()

    def _report_call_seconds(self) -> float:
        """The bound used at exit: ``reporter_timeout``, or 5 s if it is None."""
        timeout = self._reporter_timeout
        return _EXIT_REPORT_CALL_SECONDS if timeout is None else timeout.total_seconds()

    def _drop_cut_off_reports(self) -> None:
        """Count (and log once) the reports exit cut off before every reporter had them."""
        queue, self._report_queue = self._report_queue, None
        cut_off = 0 if self._report_current is None else 1
        while queue is not None:
            try:
                queue.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                queue.close()
                break
            cut_off += 1
        self._report_current = None
        if cut_off:
            self._reports_dropped += cut_off
            logger.warning(
                "the manager exited before %d queued session reports reached every reporter; "
                "they were dropped (see reporter_timeout)",
                cut_off,
            )

    def _check_running(self) -> None:
        if not self._running:
            raise ManagerNotRunning()
        if threading.get_ident() != self._thread:
            raise WrongThread("This SessionManager")

    # -- reading ----------------------------------------------------------------------

    async def get(
        self, session_id: SessionId, *, touch: bool = True, last_messages: int | None = None
    ) -> Session:
        """Return a snapshot of a live session; raise :class:`SessionNotFound`.

        By default the read counts as activity (moves ``last_active`` and the idle
        deadline); pass ``touch=False`` to just look. ``last_messages=n`` loads only the
        last ``n`` messages (``messages.total`` stays exact).
        """
        if not self._running and not _nested_in(self):  # as _call does, inline: the
            raise ManagerNotRunning()  # hottest path (a nested read is counted too)
        if threading.get_ident() != self._thread:
            raise WrongThread("This SessionManager")
        _check_last_messages(last_messages)
        check_flag(touch, "touch")
        sid = _parse_id(session_id)
        now = self._clock.now()
        calls = self._calls
        calls.count += 1
        try:
            if touch:
                session = await self._repository.touch(
                    sid, at=now, policy=self._policy, last_messages=last_messages
                )
            else:
                session = await self._repository.get(sid, last_messages=last_messages)
        except StorageError as exc:
            if (instead := calls.closed_under()) is not None:
                raise instead from exc
            raise
        finally:
            calls.ended()
        if session is None or session.is_expired(now):
            raise SessionNotFound(sid)
        return session

    async def exists(self, session_id: SessionId) -> bool:
        """True when a live (unexpired) session has this id. Does not touch it."""
        try:
            await self.get(session_id, touch=False, last_messages=0)
        except SessionNotFound:
            return False
        return True

    @_call
    async def list(
        self,
        *,
        owner: str | None = None,
        status: SessionStatus | Iterable[SessionStatus] | None = None,
        search: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page:
        """One page of live sessions, most recently active first.

        Filters by owner, status (one or several) and a case-insensitive ``search`` over
        the name and first message. Pass ``page.next_cursor`` to get the next page. Items
        carry no messages, only the exact ``messages.total`` (every built-in store): use
        ``get(id, last_messages=n)`` for a preview.
        """
        query = SessionQuery(
            owner=owner,
            status=status,
            search=search,
            limit=limit,
            cursor=cursor,
            visible_at=self._clock.now(),
        )
        return await self._repository.list(query)

    def iterate(
        self,
        *,
        owner: str | None = None,
        status: SessionStatus | Iterable[SessionStatus] | None = None,
        search: str | None = None,
        page_size: int = 100,
    ) -> SessionIterator:
        """Every live session the filters match, in :meth:`list`'s order, read a page of
        ``page_size`` at a time: ``async for session in sessions.iterate(owner=...):``.

        The filters are checked at once. As when paging by hand, a session written or
        touched while you iterate, and not yet reached, moves to the front and is left
        out; none is yielded twice. Leaving the loop early needs no clean-up
        (``aclose()`` ends it, for ``contextlib.aclosing``).
        """
        if not (self._running or _nested_in(self)):
            raise ManagerNotRunning()
        if threading.get_ident() != self._thread:
            raise WrongThread("This SessionManager")
        if type(page_size) is not int or not 1 <= page_size <= 10_000:
            raise InvalidConfiguration(
                f"page_size must be an int from 1 to 10000, got {shown(page_size)}."
            )
        query = SessionQuery(owner=owner, status=status, search=search, limit=page_size)
        return SessionIterator(self, query)

    @_call
    async def stats(self) -> SessionStats:
        """Stored sessions by status, plus manager counters."""
        counts = await self._repository.count_by_status()
        return SessionStats(
            by_status=dict(counts),
            subscribers=self._events.subscriber_count,
            cleanup_passes=self._cleanup_passes,
            expired_total=self._expired_total,
            reports_dropped=self._reports_dropped,
            removals_failed=self._removals_failed,
            events_unshared=self._events_unshared,
        )

    # -- writing ----------------------------------------------------------------------

    @_call
    async def create(
        self,
        *,
        owner: str | None = None,
        name: str | None = None,
        state: Mapping[str, Any] | None = None,
    ) -> Session:
        """Create a session with a fresh random id (UUID4 from the OS CSPRNG)."""
        now = self._clock.now()
        session = Session(
            uuid.uuid4(),
            now,
            now,
            owner=owner,
            name=name,
            state=state,
            expires_at=self._policy.deadline(SessionStatus.ACTIVE, now, now, None),
        )
        async with _whole_write():
            await self._repository.add(session)
            self._emit(EventKind.CREATED, session.id, session, now)
        return session

    @_call
    async def update(self, session_id: SessionId, fn: UpdateFn) -> Session:
        """Atomically replace a session by ``fn(snapshot)`` and return the saved result.

        ``fn`` may be sync or async. It runs again, on a fresh snapshot, if the session
        is written while it runs by anything but the updates, closes and rotations of
        this store object's managers (which wait for each other): a message appended,
        even by another task of this process, or a write by another process or store
        object. So keep side effects
        out of ``fn``. If it raises, nothing is saved and the exception propagates. If
        the session expires while ``fn`` runs, nothing is saved and
        :class:`SessionNotFound` is raised. ``fn`` may not change ``id``, ``created_at``,
        ``revision`` or ``closed_at`` (:class:`InvalidUpdate`); the save sets
        ``last_active`` and ``expires_at``, whatever ``fn`` returns. Setting a terminal
        status closes the session.
        """
        _check_callable(fn)
        sid = _parse_id(session_id)
        return await self._update(sid, fn)

    def _refuse_in_update_fn(self, sid: uuid.UUID, call: str, instead: str) -> None:
        """Raise if the caller runs inside an update function of ``sid`` (or in a task one
        started, which it may be waiting for: the session's lock would never come)."""
        mark = _in_update_fn.get()
        while mark is not None:
            # Any manager of this store: another one's write would make fn run again.
            if mark.sid == sid and mark.live and mark.manager._repository is self._repository:
                raise RuntimeError(
                    f"{call} of session {sid} from inside an update function of its own "
                    f"session (or a task it started): {instead}."
                )
            mark = mark.outer

    def _holding(self, sid: uuid.UUID) -> _Holding:
        """``async with`` holds ``sid``'s lock, which every manager of the store
        shares (see :class:`_Holding`)."""
        return _Holding(self, sid)

    def _end_lock_waits(self) -> None:
        """End the waits for a session's lock that another manager's call holds, or was
        handed (at the exit); not those behind this manager's own calls."""
        for waiting, (sid, _task) in self._lock_waits.items():
            if sid in self._lock_holders:
                continue
            owner = self._locks.owner(sid)
            if owner is None:
                continue
            if not any(o == sid and t is owner for o, t in self._lock_waits.values()):
                waiting.cancel()

    async def _update(self, sid: uuid.UUID, fn: UpdateFn) -> Session:
        self._refuse_in_update_fn(sid, "A write", _RETURN_THE_CHANGE)
        allowed = self._max_retries
        attempts = 0
        async with self._holding(sid):
            while attempts < allowed:
                attempts += 1
                old, before = await self._read_open(sid, held=True)
                await self._check_deadline(old, before)
                result = await self._apply(fn, old)
                # The change happens now, after fn: a touch while fn ran (e.g. a read of
                # this session) is not moved back by this save.
                now = self._clock.now()
                await self._check_still_live(old, now)
                new, added = self._prepare(old, result, now)
                await self._check_deadline(new, now)
                try:
                    async with _whole_write():
                        await self._repository.save(
                            new, expected_revision=old.revision, new_messages=added
                        )
                        kind = EventKind.CLOSED if new.status.is_terminal else EventKind.UPDATED
                        self._emit(kind, sid, new, now)
                        return new
                except SessionConflict as exc:
                    if attempts == 1 and exc.stale_snapshot:
                        # The store's remembered snapshot went out of date before or
                        # while fn ran (another store object or process wrote): the first
                        # try does not use up one of the caller's attempts.
                        allowed += 1
                    logger.debug("session %s changed concurrently; retrying update", sid)
        raise SessionConflict(sid, attempts=attempts)

    async def _apply(self, fn: UpdateFn, old: Session) -> object:
        """``fn(old)``, awaited if it is async, with this manager's clock active."""
        token = active_clock.set(self._clock)
        outer = _in_update_fn.get()
        while outer is not None and not outer.live:  # ended: keep chains short
            outer = outer.outer
        mark = _InUpdateFn(self, old.id, outer)
        marked = _in_update_fn.set(mark)
        try:
            result = fn(old)
            if inspect.isawaitable(result):
                result = await result
        finally:
            mark.live = False
            _in_update_fn.reset(marked)
            active_clock.reset(token)
        return result

    async def _read_open(self, sid: uuid.UUID, *, held: bool = False) -> tuple[Session, datetime]:
        """The whole session and the time, if it is live and open; else raise.

        ``held=True`` accepts a snapshot the store holds (``get_for_update``): only for a
        compare-and-set save, which refuses it if it is stale.
        """
        if held:
            old = await self._repository.get_for_update(sid)
        else:
            old = await self._repository.get(sid)
        now = self._clock.now()
        if (
            held
            and self._held_snapshots
            and old is not None  # None is what a read found, never a held answer
            and (old.is_expired(now) or old.status.is_terminal)
        ):
            # A held snapshot may lag behind other processes: refuse only what a read shows.
            old = await self._repository.get(sid)
        if old is None or old.is_expired(now):
            raise SessionNotFound(sid)
        if old.status.is_terminal:
            raise SessionClosed(sid, old.status)
        return old, now

    async def _check_still_live(self, old: Session, now: datetime) -> None:
        """Raise :class:`SessionNotFound` if ``old`` expired before ``now`` (while an
        update function ran): saving it would bring back a session every reader already
        sees as gone. A touch meanwhile may have moved its deadline: read it again.
        """
        if not old.is_expired(now):
            return
        current = await self._repository.get(old.id, last_messages=0)
        if current is None or current.is_expired(now):
            raise SessionNotFound(old.id)

    async def _check_deadline(self, session: Session, now: datetime) -> None:
        """Raise :class:`SessionNotFound` if this manager's policy gives the open
        ``session`` a deadline at or before ``now`` from its stored ``last_active``, as
        a write or touch at ``now`` finds (an ``idle_timeout`` or ``max_age`` added or
        shortened since the session was written): it has expired. The store records
        that deadline first (a touch does), so that reads, listings and cleanup see the
        session expired from then on, as if it had been written under this policy.
        """
        if not self._past_deadline(session, now):
            return
        found = await self._repository.touch(
            session.id, at=now, policy=self._policy, last_messages=0
        )
        if found is None or found.is_expired(now) or self._past_deadline(found, now):
            raise SessionNotFound(session.id)
        if found.status.is_terminal:
            raise SessionClosed(session.id, found.status)
        # A held snapshot of an earlier life of the session (deleted and added again
        # elsewhere): the stored one is live, and the save refuses the snapshot.

    async def _record_if_overdue(self, sid: uuid.UUID, now: datetime) -> bool:
        """Have the store record the deadline of a session that is open and live by its
        stored deadline but past this manager's (see :meth:`_past_deadline`), as a write
        or touch at ``now`` would: from then on it is expired for every reader. Without
        an ``idle_timeout`` or a ``max_age`` no deadline of an open session ever passes.

        Returns whether the session may have expired at ``now`` (False: the read found
        it missing or live, so there is nothing to remove as expired).
        """
        if self._policy.max_age is None and self._policy.idle_timeout is None:
            return True  # not read
        stored = await self._repository.get(sid, last_messages=0)
        if stored is None:
            return False
        if stored.is_expired(now):
            return True
        if self._past_deadline(stored, now):
            await self._repository.touch(sid, at=now, policy=self._policy, last_messages=0)
            return True
        return False

    def _past_deadline(self, session: Session, now: datetime) -> bool:
        """Whether a write or touch of the open ``session`` at ``now`` finds it expired
        under this manager's policy (see :meth:`ExpiryPolicy.activity_deadline`)."""
        if session.status.is_terminal:
            return False
        _, overdue = self._policy.activity_deadline(
            session.status,
            session.created_at,
            session.last_active,
            now,
            moves=False,
        )
        return overdue is not None

    def _prepare(
        self, old: Session, new: object, now: datetime
    ) -> tuple[Session, tuple[Message, ...] | None]:
        if not isinstance(new, Session):
            raise InvalidUpdate(
                f"The update function returned {type(new).__name__}, not a Session. Return "
                "a changed copy, e.g. `lambda s: s.with_state(count=1)`."
            )
        for field in _MANAGED_FIELDS:
            if getattr(new, field) != getattr(old, field):
                raise InvalidUpdate(
                    f"The update function changed Session.{field}, which is managed by "
                    f"asyncsession ({_MANAGED_FIELDS[field]}). Change owner, name, state, "
                    "messages or status instead."
                )
        if not new.messages.is_complete:
            raise InvalidUpdate(
                "The update function returned a window of the message history; append to "
                "the snapshot's messages instead of replacing them with a partial view."
            )
        # Checked here whatever the store (a third party's too): LimitExceeded at 2**63 - 1.
        revision = SessionRepository._next_revision(old.id, old.revision)
        added = new.messages.added_since(old.messages)
        # The caps hold for what the update adds: a session stored under higher caps (an
        # earlier deployment's) can still be closed, changed and trimmed under lower ones.
        fresh: Iterable[Message] = added if added is not None else _not_in(new.messages, old)
        if new.messages.total > old.messages.total:
            self._check_messages(fresh, new.messages.total)
        else:
            self._check_messages(fresh, 0)
        last_active = max(old.last_active, now)
        # not before the session's last activity, even when this manager's clock is
        # behind the one that wrote it (another server's): a session never ends before
        # it starts
        closed_at = last_active if new.status.is_terminal else None
        prepared = replace_trusted(  # new was validated when fn built it
            new,
            last_active=last_active,
            closed_at=closed_at,
            expires_at=self._policy.deadline(new.status, new.created_at, last_active, closed_at),
            revision=revision,
        )
        return prepared, added

    def _check_messages(self, messages: Iterable[Message], total: int) -> None:
        if self._max_messages is not None and total > self._max_messages:
            raise too_many_messages(self._max_messages, total)
        limit = self._max_message_size
        if limit is not None:
            for message in messages:
                size = len(message.content)
                if message.data is not None and size <= limit:
                    size += len(orjson.dumps(message.data))
                if size > limit:
                    raise LimitExceeded(
                        "Message size (content characters + data as JSON bytes)", limit, size
                    )

    async def add_message(
        self, session_id: SessionId, role: str, content: str, *, data: Any = None
    ) -> Session:
        """Append one message (O(1)) and return the session.

        ``role`` is one of :data:`ROLES`; ``data`` is optional JSON. The returned
        snapshot's ``messages`` is a window holding the new message (``messages.total``
        exact; every built-in store): :meth:`get` reads the history.
        """
        return await self.add_messages(session_id, [(role, content, data)])

    @_call
    async def add_messages(
        self,
        session_id: SessionId,
        messages: Iterable[tuple[str, str] | tuple[str, str, Any]],
    ) -> Session:
        """Append several ``(role, content)`` or ``(role, content, data)`` messages atomically.

        Returns the session with a window of the new messages, as :meth:`add_message`.
        An empty list stores nothing and returns the session with an empty window.
        """
        given: object = messages  # checked at run time, whatever the annotation says
        if isinstance(given, (str, bytes)) or not isinstance(given, Iterable):
            raise InvalidUpdate(
                "add_messages() takes a list of (role, content[, data]) items; "
                f"got {kind_of(messages)}."
            )
        sid = _parse_id(session_id)
        if _in_update_fn.get() is not None:  # else each run of that function appends again
            self._refuse_in_update_fn(
                sid,
                "add_message()",
                "add the message in the function instead (return s.with_message(role, "
                "content)), or after update() returns",
            )
        await self._after_rotation(sid)
        now = self._clock.now()
        batch = [
            Message(role, content, now, data) for role, content, data in map(_fields, messages)
        ]
        if not batch:  # nothing to store: no write, no event, no history read
            session = await self.get(sid, touch=False, last_messages=0)
            if session.status.is_terminal:
                raise SessionClosed(sid, session.status)
            return session
        self._check_messages(batch, 0)
        async with _whole_write():
            session = await self._repository.append(
                sid, batch, at=now, policy=self._policy, max_messages=self._max_messages
            )
            self._emit(EventKind.MESSAGE_ADDED, sid, session, now)
        return session

    async def set_state(
        self, session_id: SessionId, changes: Mapping[str, Any] | None = None, **kw: Any
    ) -> Session:
        """Merge ``changes`` (a mapping, keywords, or both) into the session's state, as
        :meth:`Session.with_state` does: ``set_state(id, cart=1)``,
        ``set_state(id, {"changes": 7})`` (the keys ``session_id`` and ``changes`` go in
        the mapping)."""
        check_state_changes(changes, "set_state(", "id, ")
        return await self.update(session_id, lambda s: s.with_state(changes, **kw))

    @_call
    async def close(
        self, session_id: SessionId, *, status: SessionStatus = SessionStatus.EXITED
    ) -> Session:
        """Make a session terminal (EXITED by default; or CRASHED, ABNORMAL, EXPIRED).

        A closed session rejects updates with :class:`SessionClosed`, a second
        ``close()`` too (the first one's status and time stand), and stays readable
        until ``retention`` passes.
        """
        status = parse_status(status)
        if not status.is_terminal:
            raise InvalidConfiguration(
                f"close() takes a terminal status (exited, crashed, abnormal, expired), got "
                f"{status.value!r}; use archive() to park a session."
            )
        return await self._update(_parse_id(session_id), lambda s: attrs.evolve(s, status=status))

    async def archive(self, session_id: SessionId) -> Session:
        """Park an open session (ARCHIVED: no idle timeout, ``max_age`` still applies)."""
        return await self.update(
            session_id, lambda s: attrs.evolve(s, status=SessionStatus.ARCHIVED)
        )

    async def activate(self, session_id: SessionId) -> Session:
        """Make an archived session ACTIVE again."""
        return await self.update(session_id, lambda s: attrs.evolve(s, status=SessionStatus.ACTIVE))

    @_call
    async def rotate(self, session_id: SessionId, fn: UpdateFn | None = None) -> Session:
        """Move a live session to a fresh id (e.g. at login) and return it.

        The new session keeps owner, name, state, messages, status and creation time;
        the old id is dead before this returns. ``fn``, like :meth:`update`'s, changes
        the session on its way to the new id (e.g. records the logged-in user): the
        change never exists under the old id, and if ``fn`` raises, nothing changes.

        The old id is retired by a compare-and-set, so a message appended or a delete
        made meanwhile (by any process) is never lost: the rotation starts again from
        a fresh read, and a deleted session stays deleted (:class:`SessionNotFound`).
        """
        if fn is not None:
            _check_callable(fn)
        sid = _parse_id(session_id)
        self._refuse_in_update_fn(sid, "rotate()", _RETURN_THE_CHANGE)
        async with self._holding(sid):
            self._rotating[sid] = rotated = anyio.Event()
            try:
                new, now = await self._rotate(sid, fn)
            finally:
                del self._rotating[sid]
                rotated.set()
        self._emit(EventKind.CREATED, new.id, new, now)
        self._emit(EventKind.DELETED, sid, None, now)
        await anyio.lowlevel.checkpoint_if_cancelled()  # see _whole_write
        return new

    async def _after_rotation(self, sid: uuid.UUID) -> None:
        """Wait while this manager rotates ``sid`` (appends and deletes take no lock)."""
        rotated = self._rotating.get(sid)
        if rotated is not None:
            await rotated.wait()

    async def _rotate(self, sid: uuid.UUID, fn: UpdateFn | None) -> tuple[Session, datetime]:
        for _attempt in range(self._max_retries):
            old, now = await self._read_open(sid)
            await self._check_deadline(old, now)
            retired_revision = SessionRepository._next_revision(sid, old.revision)
            base = old
            if fn is not None:
                result = await self._apply(fn, old)
                now = self._clock.now()
                await self._check_still_live(old, now)
                base, _added = self._prepare(old, result, now)
                if base.status.is_terminal:
                    raise InvalidUpdate(
                        "rotate() moves a live session; its function may not close it. "
                        "Close the session with close() instead."
                    )
                await self._check_deadline(base, now)
            last_active = max(base.last_active, now)
            new = attrs.evolve(
                base,
                id=uuid.uuid4(),
                revision=0,
                last_active=last_active,
                expires_at=self._policy.deadline(
                    base.status, base.created_at, last_active, base.closed_at
                ),
            )
            # The old id ends closed and already expired: invisible to reads, and
            # appends and updates refuse it. Cleanup removes it silently (see
            # _is_retired) if the delete below never runs (a crash) or fails.
            retired = replace_trusted(
                old,
                status=SessionStatus.EXITED,
                closed_at=now,
                last_active=max(old.last_active, now),
                expires_at=now,
                revision=retired_revision,
            )
            await anyio.lowlevel.checkpoint_if_cancelled()  # see _whole_write
            with anyio.CancelScope(shield=True):  # all or nothing, even if cancelled
                if await self._swap(new, retired, old.revision):
                    return new, now
            logger.debug("session %s changed while it was rotated; retrying", sid)
        raise SessionConflict(sid, attempts=self._max_retries)

    async def _retire_applied(self, retired: Session, new_id: uuid.UUID) -> bool | None:
        """After a failed retiring save: did it apply after all? None if unknown."""
        try:
            stored = await self._repository.get(retired.id, last_messages=0)
        except Exception:
            logger.exception(
                "rotating %s: cannot tell whether its old id was retired; both %s and the "
                "old id may be live now",
                retired.id,
                new_id,
            )
            return None
        return (
            stored is not None
            and stored.revision == retired.revision
            and stored.status is retired.status
            and stored.expires_at == retired.expires_at
        )

    async def _swap(self, new: Session, retired: Session, expected_revision: int) -> bool:
        """Add ``new``, retire the old id by compare-and-set, then delete it.

        False (and ``new`` removed again) if the old session changed since it was read.
        """
        await self._repository.add(new)
        try:
            await self._repository.save(
                retired, expected_revision=expected_revision, new_messages=()
            )
        except BaseException as exc:
            retire_applied: bool | None = False
            if not isinstance(exc, SessionConflict):  # the save may have been applied
                retire_applied = await self._retire_applied(retired, new.id)
                if retire_applied is None:
                    raise  # unknown: keep both copies rather than risk losing the session
            if not retire_applied:
                try:
                    await self._repository.delete(new.id)
                except Exception:
                    logger.exception("could not remove %s after a failed rotation", new.id)
                if isinstance(exc, SessionConflict):
                    return False
                raise
        try:  # the rotation is done: the old id is closed and already expired
            await self._repository.delete(retired.id)
        except Exception:
            logger.exception("rotated %s; its retired document stays until cleanup", retired.id)
        return True

    @_call
    async def delete(self, session_id: SessionId, *, missing_ok: bool = False) -> bool:
        """Delete a session now; raise :class:`SessionNotFound` unless ``missing_ok``
        (with it, text that is no session id and None return False, as a missing
        session does).

        An expired session counts as gone already: it is removed as expired (EXPIRED,
        reported), unless its document cannot be read (cleanup leaves it for this): then
        it is deleted unread. So is a session past this manager's deadline (an
        ``idle_timeout`` or ``max_age`` added or shortened since it was written),
        recorded or not.
        A store that sets damaged documents aside (the file store's quarantine) does so
        as this reads the session, which is then not found.
        """
        check_flag(missing_ok, "missing_ok")
        try:
            sid = _parse_id(session_id)
        except SessionNotFound:
            # text that is no id, or None (a cookie or header that is not there): no
            # session; other types are a mistake
            if missing_ok and (session_id is None or isinstance(session_id, str)):
                return False
            raise
        if sid in self._rotating:  # it would wait for the rotation's function forever
            self._refuse_in_update_fn(sid, "delete()", "delete it after rotate() returns")
        await self._after_rotation(sid)
        now = self._clock.now()
        # An expired session is already gone for every reader: it is removed as expired
        # (and reported so), not deleted. So is one past this manager's deadline that no
        # write or touch has recorded yet (an idle_timeout or max_age shortened since).
        async with _whole_write():
            try:
                may_have_expired = await self._record_if_overdue(sid, now)
                expired = may_have_expired and await self._expire(sid, now)
            except SerializationError:
                # Unreadable (expired or not: a store may read before it checks the
                # deadline) and kept by the store: deleting it unread is how it goes
                # (the error's own advice).
                expired = False
            deleted = False if expired else await self._repository.delete(sid)
            if deleted:
                self._emit(EventKind.DELETED, sid, None, self._clock.now())
        if not deleted:
            if missing_ok:
                return False
            raise SessionNotFound(sid)
        return True

    async def record_error(self, session_id: SessionId) -> Session:
        """Count one error against an open session (release health)."""
        return await self.update(session_id, lambda s: attrs.evolve(s, errors=s.errors + 1))

    @asynccontextmanager
    async def bind(self, session_id: SessionId) -> AsyncIterator[Session]:
        """Make a live session current for this task and the tasks it starts.

        ``asyncsession.current_session_id()`` returns its id inside the block (concurrent
        tasks never see each other's); :class:`asyncsession.SessionIdLogFilter` adds it
        to log records. Yields the (touched) session.
        """
        session = await self.get(session_id)
        token = _current.set(session.id)
        try:
            yield session
        finally:
            try:
                _current.reset(token)
            except ValueError as exc:  # the token belongs to another task's context
                what = f"bind() of session {session.id}"
                raise WrongTask(
                    what,
                    detail=f"{what} was entered by one task and left by another, which "
                    "cannot undo it: the session stays current in the task that entered "
                    "it. Enter and leave `async with sessions.bind(...)` in one task (in "
                    "an async generator, close it with `contextlib.aclosing`).",
                ) from exc

    # -- events -------------------------------------------------------------------------

    def _emit(
        self,
        kind: EventKind,
        sid: uuid.UUID,
        session: Session | None,
        at: datetime,
        *,
        report: bool = True,
    ) -> None:
        self._events.publish(kind, sid, session, at)
        if (
            report
            and session is not None
            and self._reports is not None
            and (kind is EventKind.CLOSED or kind is EventKind.EXPIRED)
        ):
            try:
                self._reports.send_nowait(
                    SessionReport.from_session(session, self._report_attributes)
                )
            except anyio.WouldBlock:
                self._drop_report()
        if self._outbox is not None:
            revision = session.revision if session is not None else None
            try:
                self._outbox.send_nowait(_SharedEvent(kind.value, sid, at, revision, self._origin))
            except anyio.WouldBlock:
                self._events_unshared += 1
                self._outbox_overflow.dropped(self._events_unshared)

    async def _report_loop(self, receive: MemoryObjectReceiveStream[SessionReport]) -> None:
        """Pass each report to every reporter in turn (``__aexit__`` closes ``receive``)."""
        try:
            async for report in receive:
                if self._reports_overflow.active and not receive.statistics().current_buffer_used:
                    self._reports_overflow.drained()
                await self._pass_report(report, 0)
        except anyio.ClosedResourceError:  # exit counted what was left
            pass
        finally:
            self._reports_done.set()

    async def _pass_report(self, report: SessionReport, first: int) -> None:
        """Pass ``report`` to the reporters from index ``first`` on, in turn."""
        self._report_current = report
        for index in range(first, len(self._reporters)):
            self._report_next = index + 1
            await self._report_to(self._reporters[index], report)
        self._report_current = None

    async def _pass_left_reports(self) -> None:
        """At exit, after a cancellation ended the report loop early: the report it was
        passing goes on to the reporters not yet called (the one interrupted is not
        called again: it may have it), then the queued reports to every reporter."""
        if self._report_current is not None:
            # The reporter call the cancellation cut off: that reporter may not have it.
            self._reports_dropped += 1
            logger.warning(
                "the manager's block was cancelled while a reporter had a session report; "
                "that reporter may not have it (counted in stats().reports_dropped), the "
                "reporters after it get it"
            )
            await self._pass_report(self._report_current, self._report_next)
        while self._report_queue is not None:
            try:
                report = self._report_queue.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                return
            await self._pass_report(report, 0)

    async def _report_to(self, reporter: Reporter, report: SessionReport) -> None:
        """One bounded reporter call; whatever the reporter raises is logged, except a
        cancellation of the manager itself (its exit, or a scope around it)."""
        cancelled = anyio.get_cancelled_exc_class()
        try:
            with anyio.CancelScope() as scope:
                timeout = self._reporter_timeout
                if timeout is not None:
                    scope.deadline = anyio.current_time() + timeout.total_seconds()
                elif self._reports_draining:
                    scope.deadline = anyio.current_time() + _EXIT_REPORT_CALL_SECONDS
                self._report_call = scope
                try:
                    result: object = reporter.report(report)
                    if inspect.isawaitable(result):
                        await result
                    else:
                        logger.error(
                            "reporter %r failed: its report() returned %r, not an awaitable; "
                            "report() must be async (`async def report(self, report)`, with "
                            "blocking work in `await anyio.to_thread.run_sync(...)`)",
                            reporter,
                            result,
                        )
                except cancelled:
                    # Ours (the timeout) or the manager's: let it end the call or the loop.
                    if scope.cancel_called or anyio.current_effective_deadline() == -math.inf:
                        raise
                    # Nothing cancelled us: the reporter raised a cancellation of its own,
                    # e.g. from awaiting a future someone else cancelled. It is a failure.
                    logger.exception("reporter %r failed (it raised a cancellation)", reporter)
                except Exception:
                    logger.exception("reporter %r failed", reporter)
                finally:
                    self._report_call = None
        except cancelled:
            # Our scope timed out but the cancellation that left it is not the one it
            # swallows (asyncio: the reporter swallowed its timeout, then raised a
            # cancellation of its own). Unless the manager is cancelled too, that is the
            # timeout: it must not end the manager's task group and the user's block.
            if not scope.cancel_called or anyio.current_effective_deadline() == -math.inf:
                raise
        else:
            if not scope.cancelled_caught:
                return
        logger.warning("reporter %r timed out", reporter)

    async def _share_events_loop(self, *, task_status: TaskStatus[None]) -> None:
        transport = self._repository
        assert isinstance(transport, EventTransport)
        send, receive = anyio.create_memory_object_stream[_SharedEvent](self._event_buffer)
        self._outbox = send
        published = self._published = anyio.Event()

        async def publish() -> None:
            """Hand the transport everything queued (up to ``_SHARE_BATCH`` events) at
            once: one round trip shares a whole burst."""
            trouble = _Outage("sharing events")
            try:
                async with receive:
                    try:
                        async for first in receive:
                            batch = [first]
                            while len(batch) < _SHARE_BATCH:
                                try:
                                    batch.append(receive.receive_nowait())
                                except (anyio.WouldBlock, anyio.EndOfStream):
                                    break
                            self._sharing = len(batch)
                            try:
                                await transport.publish_events(batch)
                            except Exception as exc:
                                self._events_unshared += len(batch)
                                trouble.failed(
                                    exc,
                                    f"could not share {len(batch)} "
                                    f"event{'' if len(batch) == 1 else 's'} (counted in "
                                    "stats().events_unshared)",
                                )
                            except BaseException:  # cancelled: the manager left meanwhile
                                self._events_unshared += len(batch)
                                raise
                            else:
                                trouble.worked()
                            finally:
                                self._sharing = 0
                            # caught up only if nothing queued up while the batch went out
                            if not receive.statistics().current_buffer_used:
                                self._outbox_overflow.drained()
                    finally:  # cancelled: what is still queued is not shared either
                        self._events_unshared += receive.statistics().current_buffer_used
            finally:  # emptied after the manager closed the outbox, or cancelled
                published.set()

        try:
            await self._subscribed(transport, publish, task_status)
        finally:  # also when the first subscription fails and the manager does not start
            if self._outbox is send:
                self._outbox = None
            send.close()
            receive.close()

    async def _subscribed(
        self,
        transport: EventTransport,
        publish: Callable[[], Coroutine[Any, Any, None]],
        task_status: TaskStatus[None],
    ) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(publish)
            started = False
            trouble = _Outage("the event subscription")
            while True:
                try:
                    async with transport.subscribe_events() as remote:
                        trouble.worked()
                        if not started:
                            started = True
                            task_status.started()
                        async for event in remote:
                            if event.origin == self._origin:
                                continue
                            try:
                                kind = EventKind(event.kind)
                            except ValueError:
                                continue
                            self._events.publish(
                                kind,
                                event.session_id,
                                None,
                                event.at,
                                origin=event.origin,
                                revision=event.revision,
                            )
                except Exception as exc:
                    # A store that cannot subscribe now (its server is down or not up yet:
                    # StorageError) does not keep the manager from starting, as it keeps
                    # no other operation from starting; any other error does.
                    if not started and not isinstance(exc, StorageError):
                        raise
                    trouble.failed(exc, "event subscription failed; subscribing again")
                    if not started:
                        started = True
                        task_status.started()
                await anyio.sleep(1)

    def subscribe(
        self,
        *,
        buffer: int | None = None,
        session_id: SessionId | None = None,
        kinds: EventKind | str | Iterable[EventKind | str] | None = None,
    ) -> Subscription:
        """Receive lifecycle events: ``async with sessions.subscribe() as events:``.

        With ``kinds`` (an :class:`EventKind`, its value, or several), only events of
        those kinds, remote ones too: ``kinds={"closed", "expired", "deleted"}`` for
        sessions' ends. Events of other kinds never take room in its buffer.

        With ``session_id``, only that session's events (publishing to many such
        subscriptions costs per subscriber of the session, not per subscriber). The id
        is not looked up: one that matches no session receives nothing (malformed text
        raises :class:`SessionNotFound`), and a rotated session's subscription gets
        DELETED for its old id and goes on (stop on DELETED or EXPIRED yourself; the new
        id's CREATED goes to subscriptions for every session). A slow
        subscriber never stalls the manager: beyond ``buffer`` (default the manager's
        ``event_buffer``) undelivered events, new ones are dropped for it and counted in
        ``Subscription.dropped``.
        """
        self._check_running()
        sid = None if session_id is None else _parse_id(session_id)
        wanted = parse_kinds(kinds)
        size = buffer if buffer is not None else self._event_buffer
        return Subscription(self._events, size, sid, wanted)

    # -- expiry ---------------------------------------------------------------------------

    @_call
    async def purge_expired(self) -> int:
        """Remove every session whose deadline has passed; return how many.

        Reads the store's deadline index, so the cost follows what expired, not how
        many sessions exist. Safe to run from several managers on one store: each
        expired session is removed (and reported) by exactly one of them. A session
        that cannot be removed (unreadable, a storage error) is counted in
        ``stats().removals_failed`` and passed over; it is tried again at each pass, and
        removed once it can be. It is logged as a warning once, and again only if its
        failure changes (later attempts that fail alike are logged at debug level). A
        manager remembers up to 10 000 such sessions at once; beyond, one warning says
        so and the others' failures are logged at debug level only, until fewer than
        5 000 are stuck.
        The store itself failing ends the pass with its error (the next pass tries
        again), rather than wait out every removal's timeout and log each session: a
        store that fails when asked for its expired sessions again after a storage
        error (unreachable, say), or two removals in a row failing with a recoverable
        :class:`StorageError` (a write lock another process holds, a full disk: reads
        may still work). Later passes try those two sessions after the others, and a
        failure of theirs then is their own, so two broken sessions cannot stop cleanup.
        A recoverable error that names one session (:class:`SessionLocked`) is that
        session's own.
        The pass yields to the event loop before each removal, so other tasks (the
        reporters, subscribers) run meanwhile, on every store. When the reports of the
        sessions it expires outrun the reporters, it waits for room in their buffer
        rather than drop them, up to ``reporter_timeout`` (5 s if None) times the number
        of reporters plus one in all; beyond that, reports are dropped and counted as
        usual. Cancelling a pass, or leaving the manager, stops it before the next
        removal (:class:`ManagerNotRunning` after the exit); a removal under way
        finishes and is announced.
        """
        now = self._clock.now()
        removed_total = 0
        # Ids tried and not removed (unreadable, locked elsewhere, taken by another
        # manager): a store may list them again, so each scan asks past them.
        passed: set[uuid.UUID] = set()
        # A removal that failed as a store failing as a whole does (see
        # _store_wide_suspect): the store's failure if the next removal tried fails so
        # too; if one works instead, that session is tried once more (the store may
        # have just recovered), and a second failure is its own.
        suspect: tuple[uuid.UUID, SessionError] | None = None
        retried: set[uuid.UUID] = set()
        room = _ReportRoom(self._report_call_seconds() * (len(self._reporters) + 1))
        try:
            while True:
                limit = self._cleanup_batch + len(passed)
                ids = await self._repository.expired(now, limit=limit)
                # sessions that ended an earlier pass go last (stable: keeps the order)
                deferred = self._deferred
                todo = deque(
                    sorted((sid for sid in ids if sid not in passed), key=deferred.__contains__)
                )
                tried = len(todo)
                while todo:
                    sid = todo.popleft()
                    # Each removal is shielded: stop between them when cancelled. Yield
                    # too: a store that never waits (memory) would hold the event loop
                    # for the whole pass, and reports and events pile up meanwhile.
                    await anyio.lowlevel.checkpoint()
                    self._check_running()  # the manager left meanwhile: stop here
                    try:
                        with anyio.CancelScope(shield=True):  # a removal is always announced
                            taken = await self._take_expired(sid, now)
                    except (SerializationError, StorageError) as exc:
                        if self._calls.cut_off:  # the exit closed the store under this pass
                            raise
                        # One session that cannot be removed stops no others.
                        if sid not in retried:  # counted once a pass
                            self._removals_failed += 1
                        passed.add(sid)
                        if _store_wide_suspect(exc) and not (sid in retried or sid in deferred):
                            if suspect is not None:
                                # Two in a row: the store is failing, not they. Later
                                # passes try them last, so that two broken sessions
                                # cannot end every pass before the others.
                                deferred.update((suspect[0], sid))
                                raise
                            suspect = (sid, exc)
                        else:
                            self._note_unremovable(sid, exc)
                        if _store_failure(exc):
                            # This session, or the whole store? A store that fails this
                            # too ends the pass here (the next pass tries again).
                            await self._repository.expired(now, limit=1)
                        continue
                    if suspect is not None:  # the store works: try that session again
                        again = suspect[0]
                        suspect = None
                        retried.add(again)
                        passed.discard(again)
                        todo.appendleft(again)
                    deferred.discard(sid)
                    if taken is None:
                        self._unremovable.forget((sid,))
                        passed.add(sid)
                        continue
                    self._unremovable.resolved(sid, "removed expired session %s at last", sid)
                    removed_total += 1
                    session, report = taken
                    try:
                        if report:  # queued, or counted as dropped
                            await self._queue_report(session, room)
                    finally:
                        self._emit(EventKind.EXPIRED, sid, session, now, report=False)
                if len(ids) < limit or tried == 0:
                    break
            if suspect is not None:  # nothing was tried after it: its own failure
                self._note_unremovable(*suspect)
            # Every expired session was listed: forget failures of sessions that are no
            # longer there (removed or revived elsewhere), so that memory follows what is
            # stuck now.
            noted = self._unremovable.noted()
            self._unremovable.forget(sid for sid in noted if sid not in passed)
            self._deferred.intersection_update(passed)
        finally:
            if removed_total:
                plural = "" if removed_total == 1 else "s"
                logger.info("expired %d session%s", removed_total, plural)
        await anyio.lowlevel.checkpoint_if_cancelled()  # see _whole_write
        return removed_total

    def _note_unremovable(self, sid: uuid.UUID, exc: SessionError) -> None:
        self._unremovable.note(sid, cause_of(exc), "cannot remove expired session %s: %s", sid, exc)

    async def _queue_report(self, session: Session, room: _ReportRoom) -> None:
        """Queue the report of ``session``, which cleanup expired, waiting for room in
        the reporters' buffer within what is left of ``room``; a report that does not
        get in (no room in time, the manager leaving, cancelled) is counted as dropped."""
        reports = self._reports
        if reports is None:
            return
        report = SessionReport.from_session(session, self._report_attributes)
        queued = False
        try:
            try:
                reports.send_nowait(report)
                queued = True
                return
            except anyio.WouldBlock:
                pass
            if room.left <= 0 or not self._running:
                return
            start = anyio.current_time()
            with anyio.move_on_after(room.left) as waiting:
                self._room_waits.add(waiting)  # the manager's exit ends the wait
                try:
                    await reports.send(report)
                    queued = True
                finally:
                    self._room_waits.discard(waiting)
                    room.left -= anyio.current_time() - start
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            if not queued:
                self._drop_report()

    def _drop_report(self) -> None:
        """Count a report dropped (the reporters' buffer was full), warning once per
        episode."""
        self._reports_dropped += 1
        self._reports_overflow.dropped(self._reports_dropped)

    async def _expire(self, sid: uuid.UUID, now: datetime) -> bool:
        """Remove ``sid`` if it has expired at ``now`` and announce it; True if removed."""
        taken = await self._take_expired(sid, now)
        if taken is None:
            return False
        session, report = taken
        self._emit(EventKind.EXPIRED, sid, session, now, report=report)
        return True

    async def _take_expired(self, sid: uuid.UUID, now: datetime) -> tuple[Session, bool] | None:
        """Remove ``sid`` if it has expired at ``now``: the session to announce as
        EXPIRED and whether to report it, or None if nothing was removed.

        A session that was still open is announced with status EXPIRED and reported;
        one closed earlier was reported when it closed, so only the event is sent. The
        document a rotation retired (see :func:`_is_retired`) is removed silently:
        None, not counted; the rotation already announced the old id's end.
        """
        session = await self._repository.remove_expired(sid, now=now)
        if session is None:
            return None
        if _is_retired(session):
            logger.debug("removed the document %s that a rotation retired", sid)
            return None
        self._expired_total += 1
        if session.status.is_terminal:
            return session, False
        session = attrs.evolve(session, status=SessionStatus.EXPIRED, closed_at=session.expires_at)
        return session, True

    async def wait_for_cleanup(self) -> None:
        """Wait until the cleanup pass that is running or due next has finished.

        Passes are due ``cleanup_interval`` after entry, then after each pass. With a
        :class:`~asyncsession.testing.ManualClock`, whose time moves only when advanced:
        advance it to a due time, then await this to see what expired collected. It
        returns at once if that pass already ran (the clock has not moved since), and
        raises :class:`InvalidConfiguration` instead of waiting forever if no pass is
        due at the clock's time.
        """
        self._check_running()
        interval = self._cleanup_interval
        if interval is None:
            raise InvalidConfiguration(
                "This manager has no cleanup loop (cleanup_interval=None); call "
                "purge_expired() instead."
            )
        due = self._cleanup_due
        if due is not None and _is_manual(self._clock):
            now = self._clock.now()
            if self._cleanup_ended_at == now:  # the pass due by now has run already
                return
            if due > now:
                ahead = (due - now).total_seconds()
                raise InvalidConfiguration(
                    f"No cleanup pass is due at the ManualClock's time: the next one is "
                    f"due {ahead:g} s later (cleanup_interval={interval.total_seconds():g} "
                    f"s), and a manual clock does not move by itself. Advance the clock by "
                    f"at least {ahead:g} s before waiting, or call purge_expired()."
                )
        assert self._cleanup_done is not None
        await self._cleanup_done.wait()
        if not self._running:  # woken by the exit, not by a finished pass
            raise ManagerNotRunning()

    async def _cleanup_loop(
        self, due: datetime, scope: anyio.CancelScope, ended: anyio.Event
    ) -> None:
        """Run cleanup passes until ``__aexit__`` cancels ``scope``; then set ``ended``.

        (Both are arguments: the exit may cancel the scope before this task starts.)
        """
        try:
            with scope:
                await self._cleanup_passes_from(due)
        finally:
            ended.set()

    async def _cleanup_passes_from(self, due: datetime) -> None:
        # Passes are due at absolute clock times (entry + interval, then interval after
        # each pass), so a pass is never skipped because the task started late.
        assert self._cleanup_interval is not None
        cleanup = _Outage("session cleanup")
        while True:
            await self._clock.sleep(max(0.0, (due - self._clock.now()).total_seconds()))
            self._cleanup_due = None  # running
            try:
                await self.purge_expired()
            except ManagerNotRunning:
                return
            except Exception as exc:
                cleanup.failed(exc, "session cleanup pass failed; retrying next interval")
            else:
                cleanup.worked()
            self._cleanup_passes += 1
            self._cleanup_ended_at = self._clock.now()
            due = self._cleanup_due = self._cleanup_ended_at + self._cleanup_interval
            done, self._cleanup_done = self._cleanup_done, anyio.Event()
            assert done is not None
            done.set()


@asynccontextmanager
async def _whole_write() -> AsyncIterator[None]:
    """Run a store write and its announcement to the end, whatever cancels the caller.

    A cancellation that came first withdraws the write (raised before it starts); one
    that comes while it runs is raised once the write is stored and announced, so the
    caller still sees it (``fail_after`` raises, ``cancelled_caught`` is set).
    """
    await anyio.lowlevel.checkpoint_if_cancelled()
    with anyio.CancelScope(shield=True):
        yield
    await anyio.lowlevel.checkpoint_if_cancelled()


class _Outage:
    """Logs the failures of one recurring job: a store's :class:`StorageError` (its
    server down, a network blip) once, in one line, until the job works again (then at
    info level); tracebacks at debug level. Other errors, likely bugs, every time.

    At most one warning a minute for each kind of failure (:func:`_failure_kind`): a
    server that fails and recovers every second gets one warning and one "works again",
    then debug lines; an outage that began within the minute is warned about if it still
    goes on after it, or when it fails in another way."""

    __slots__ = ("_failing", "_job", "_outage", "_since", "_warned", "_warned_kinds")

    def __init__(self, job: str) -> None:
        self._job = job
        self._failing = False
        self._outage = 0  # the number of the current (or last) outage
        self._since = 0.0  # time.monotonic() when it began
        self._warned = False  # it was warned about
        # kind -> (the outage, the time) of its last warning: this outage's, and others'
        # of the last minute, oldest first
        self._warned_kinds: dict[str, tuple[int, float]] = {}

    def failed(self, exc: Exception, message: str) -> None:
        if not isinstance(exc, StorageError):
            logger.error("%s", message, exc_info=exc)
            return
        now = time.monotonic()
        if not self._failing:
            self._failing, self._outage, self._since = True, self._outage + 1, now
        kind = _failure_kind(exc)
        outage, last = self._warned_kinds.get(kind, (0, -math.inf))
        if outage == self._outage:
            logger.debug("%s (still): %s", message, exc, exc_info=exc)
            return
        if now - last < _OUTAGE_WARNING_EVERY:
            logger.debug("%s (within a minute of the last warning): %s", message, exc, exc_info=exc)
            return
        self._warned = True
        self._warned_kinds = {
            k: (n, at)
            for k, (n, at) in self._warned_kinds.items()
            if k != kind and (n == self._outage or now - at < _OUTAGE_WARNING_EVERY)
        }
        self._warned_kinds[kind] = (self._outage, now)
        while len(self._warned_kinds) > _OUTAGE_KINDS:  # the oldest go
            del self._warned_kinds[next(iter(self._warned_kinds))]
        lasted = now - self._since
        logger.warning(
            "%s: %s (%sfurther failures at debug level until %s works again)",
            message,
            exc,
            f"failing for {lasted:.0f} s; " if lasted >= 1 else "",
            self._job,
        )
        logger.debug("%s", message, exc_info=exc)

    def worked(self) -> None:
        if self._failing:
            self._failing = False
            level = logging.INFO if self._warned else logging.DEBUG
            self._warned = False
            logger.log(level, "%s works again", self._job)


def _failure_kind(exc: BaseException) -> str:
    """What tells one failure from another for :class:`_Outage`'s limit: the error's type
    and the first line of its message without its numbers (ports, ids, counts, seconds,
    hexadecimal names such as a temporary file's or an address)."""
    text = str(exc).partition("\n")[0][:300]
    return f"{type(exc).__qualname__}: {_NUMBERS.sub('#', text)}"


_NUMBERS = re.compile(r"0[xX][0-9a-fA-F]+|\b[0-9a-fA-F]*\d[0-9a-fA-F]*\b|\d+")


def _store_failure(exc: Exception) -> TypeGuard[StorageError]:
    """Whether ``exc`` may be the store's failure, not one session's: a
    :class:`StorageError` that names no session (:class:`SessionLocked` does: that
    session is busy, the store works)."""
    return isinstance(exc, StorageError) and not isinstance(exc, SessionLocked)


def _store_wide_suspect(exc: Exception) -> bool:
    """Whether a failed removal's ``exc`` is what a store raises when it fails as a
    whole: a recoverable :func:`_store_failure` (locked by another process, full,
    unreachable, overloaded; a retry may help, so not a defect of one document)."""
    return _store_failure(exc) and exc.recoverable


class _ReportRoom:
    """How long, in all, a cleanup pass may still wait for room in the reporters'
    buffer (seconds)."""

    __slots__ = ("left",)

    def __init__(self, seconds: float) -> None:
        self.left = seconds


#: How long a leaving manager waits for its queued events to be shared (share_events).
_SHARE_AT_EXIT_SECONDS = 5.0


def _is_manual(clock: Clock) -> bool:
    """Whether ``clock`` is a :class:`~asyncsession.testing.ManualClock` (not imported)."""
    testing = sys.modules.get("asyncsession.testing._clock")
    return testing is not None and isinstance(clock, testing.ManualClock)


def _is_retired(session: Session) -> bool:
    """True for the document a rotation left under the old id: EXITED and expired the
    moment it closed. A session closed by a manager is kept for ``retention`` (at least
    a microsecond) or for ever, so it never has ``expires_at == closed_at``."""
    return (
        session.status is SessionStatus.EXITED
        and session.closed_at is not None
        and session.expires_at == session.closed_at
    )


def _check_last_messages(value: object) -> None:
    if value is not None and (type(value) is not int or value < 0):
        raise InvalidConfiguration(
            f"last_messages must be an int >= 0 or None (the whole history); got {value!r}."
        )


def _check_callable(fn: object) -> None:
    if not callable(fn):
        hint = "For example `lambda s: s.with_state(count=1)`."
        if isinstance(fn, Mapping):
            hint = (
                "To merge a mapping into the state pass `lambda s: s.with_state(values)`, "
                "or call SessionManager.set_state(session_id, values)."
            )
        raise InvalidUpdate(
            "The update function must be callable (snapshot -> new snapshot); got "
            f"{kind_of(fn)}. {hint}"
        )


def _fields(item: object) -> tuple[str, str, Any]:
    """``(role, content, data)`` from an ``add_messages`` item; data is optional."""
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        role, content, *rest = item
        return role, content, rest[0] if rest else None
    hint = ""
    if isinstance(item, Mapping):  # an openai-agents or chat-completions item, say
        hint = (
            ' For a dict such as {"role": ..., "content": ...} pass (item["role"], '
            'item["content"]), or (role, "", item) to keep the whole item as data.'
        )
    raise InvalidUpdate(
        "add_messages() takes (role, content) or (role, content, data) items; got "
        f"{kind_of(item)}.{hint}"
    )


def _parse_id(session_id: SessionId) -> uuid.UUID:
    if type(session_id) is uuid.UUID:
        return session_id
    given: object = session_id  # checked at run time, whatever the annotation says
    if isinstance(given, str):
        try:
            return uuid.UUID(given)
        except ValueError:
            raise SessionNotFound(given) from None
    if isinstance(given, uuid.UUID):  # a subclass: its plain UUID, as stores keep it
        return uuid.UUID(int=given.int)
    if isinstance(given, Session):  # a slip, not an unknown id: it exists
        raise InvalidSessionId(session_id, hint="Pass the session's id: session.id.")
    raise SessionNotFound(session_id)
