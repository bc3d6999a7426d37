"""Lifecycle events and bounded subscriptions."""

from __future__ import annotations

import enum
import logging
import uuid
import weakref
from collections.abc import Iterable
from datetime import datetime
from types import TracebackType

import anyio
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._exceptions import InvalidConfiguration
from ._models import Session, parse_choices
from ._notes import Overflow

__all__ = ["EventKind", "SessionEvent", "Subscription"]

logger = logging.getLogger(__name__)


class EventKind(str, enum.Enum):
    """What happened to a session."""

    CREATED = "created"
    UPDATED = "updated"
    MESSAGE_ADDED = "message_added"
    CLOSED = "closed"
    EXPIRED = "expired"
    DELETED = "deleted"

    def __str__(self) -> str:
        return self.value


def parse_kinds(
    kinds: EventKind | str | Iterable[EventKind | str] | None,
) -> frozenset[EventKind] | None:
    """``subscribe(kinds=...)`` as a set of :class:`EventKind` (None: every kind)."""
    return parse_choices(EventKind, kinds, "event kind", "kinds")


@attrs.frozen(slots=True)
class SessionEvent:
    """One lifecycle event. ``seq`` numbers a manager's events, so gaps show drops.

    ``session`` is the snapshot after the change (for EXPIRED, the session as it was
    removed, with status EXPIRED if it was still open; None for DELETED and for remote
    events, which carry the announcing manager's ``origin``). ``revision`` is the
    session's revision after the change (None for DELETED), for remote events too: events
    of one session from several managers may arrive out of order, and the revision
    tells which state is the later.
    """

    kind: EventKind
    session_id: uuid.UUID
    session: Session | None
    at: datetime
    seq: int
    origin: str | None = None
    revision: int | None = None

    @property
    def remote(self) -> bool:
        """True for an event another manager announced (``session`` is then None)."""
        return self.origin is not None


class Subscription:
    """An async iterator of :class:`SessionEvent`; use it with ``async with``.

    Overflow policy: each subscription buffers up to ``buffer`` events. When a slow
    subscriber's buffer is full, new events *for that subscriber* are dropped (counted
    in :attr:`dropped`; for a subscription to every event, also visible as gaps in
    ``seq``) so the manager and other subscribers never wait; the first drop logs a
    warning, the next ones nothing until the subscriber has taken every buffered event
    (then an info line says how many it missed). Iteration ends when the subscription
    or manager closes.

    One made with ``session_id`` receives only that session's events, and one made with
    ``kinds`` only events of those kinds (its ``seq`` then skips the others: count drops
    with :attr:`dropped`).

    It receives events from its creation on. The manager holds it inside ``async with``
    and while a task waits for its next event; otherwise weakly: one used without
    ``async with`` (or abandoned) stops receiving once nothing refers to it any more,
    e.g. when the task iterating it returns or is cancelled. A task that only iterates
    it (even one nobody keeps a handle of) keeps it while it waits.
    """

    def __init__(
        self,
        hub: EventHub,
        buffer: int,
        session_id: uuid.UUID | None = None,
        kinds: frozenset[EventKind] | None = None,
    ) -> None:
        if type(buffer) is not int or buffer < 1:
            raise InvalidConfiguration(f"buffer must be an int >= 1, got {buffer!r}.")
        self._hub = hub
        self._session_id = session_id
        self._kinds = kinds
        self._send: MemoryObjectSendStream[SessionEvent]
        self._receive: MemoryObjectReceiveStream[SessionEvent]
        self._send, self._receive = anyio.create_memory_object_stream[SessionEvent](buffer)
        self.dropped = 0
        self._overflow = Overflow(
            logger,
            f"event subscriber is too slow: its buffer of {buffer} events is full, so new "
            "events for it are dropped until it takes the buffered ones; %d dropped so far "
            "(see subscription.dropped)",
            "event subscriber caught up; %d events were dropped for it meanwhile",
        )
        self._entered = False
        self._waiting = 0  # tasks waiting in __anext__ (several may share it)
        hub._add(self)

    @property
    def session_id(self) -> uuid.UUID | None:
        """The session whose events it receives (None: every session's)."""
        return self._session_id

    @property
    def kinds(self) -> frozenset[EventKind] | None:
        """The kinds of event it receives (None: every kind)."""
        return self._kinds

    def __repr__(self) -> str:
        stats = self._receive.statistics()
        size = int(stats.max_buffer_size)
        if self not in self._hub._subscribers:
            return f"<Subscription closed (buffer {size}), {self.dropped} dropped>"
        return (
            f"<Subscription receiving: {stats.current_buffer_used} of {size} buffered, "
            f"{self.dropped} dropped>"
        )

    def __del__(self) -> None:
        # Dropped without aclose(): the hub let go of it too (it holds it weakly). Close
        # the streams quietly; nobody can be waiting on them any more.
        for name in ("_send", "_receive"):
            stream = self.__dict__.get(name)  # absent if __init__ refused the buffer
            if stream is not None:
                stream.close()

    def _offer(self, event: SessionEvent) -> None:
        kinds = self._kinds
        if kinds is not None and event.kind not in kinds:
            return
        try:
            self._send.send_nowait(event)
        except anyio.WouldBlock:
            self.dropped += 1
            self._overflow.dropped(self.dropped)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._hub._discard(self)

    def _end(self) -> None:
        self._hub._discard(self)
        self._send.close()

    async def aclose(self) -> None:
        """Stop receiving events."""
        self._end()
        self._receive.close()

    async def __aenter__(self) -> Subscription:
        self._entered = True
        if self in self._hub._subscribers:
            self._hub._held.add(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> SessionEvent:
        held = self._hub._held
        self._waiting += 1
        if not self._entered and self in self._hub._subscribers:
            held.add(self)  # a task waiting here keeps it (asyncio keeps no task alive)
        try:
            event = await self._receive.receive()
            if self._overflow.active:
                self._caught_up()
            return event
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._receive.close()
            raise StopAsyncIteration from None
        finally:
            self._waiting -= 1
            if not self._entered and not self._waiting:
                held.discard(self)

    def receive_nowait(self) -> SessionEvent:
        """Return a buffered event; raise :class:`anyio.WouldBlock` if none is buffered,
        or :class:`anyio.EndOfStream` once the subscription has ended and is drained (the
        manager exited), or was closed (``aclose()``, the end of ``async with``)."""
        try:
            event = self._receive.receive_nowait()
        except anyio.ClosedResourceError:  # aclose() closed it: ended, as __anext__ says
            raise anyio.EndOfStream from None
        if self._overflow.active:
            self._caught_up()
        return event

    def _caught_up(self) -> None:
        if not self._receive.statistics().current_buffer_used:
            self._overflow.drained()


#: Per-session subscription sets the hub keeps before it first looks for empty ones.
_FIRST_SWEEP = 64


class EventHub:
    """Fans events out to subscriptions without ever blocking the publisher."""

    def __init__(self) -> None:
        # Weakly: a subscription its user dropped without closing it (iterated without
        # ``async with``, its task cancelled) leaves with its last reference, instead
        # of buffering events for no one for ever.
        self._subscribers: weakref.WeakSet[Subscription] = weakref.WeakSet()
        # Those for every event, and those for one session's, by its id.
        self._everything: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self._by_session: dict[uuid.UUID, weakref.WeakSet[Subscription]] = {}
        self._sweep_at = _FIRST_SWEEP  # see _add
        # Strongly: the ones inside ``async with`` or waited on by a task.
        self._held: set[Subscription] = set()
        self._seq = 0

    def _add(self, subscription: Subscription) -> None:
        self._subscribers.add(subscription)
        sid = subscription._session_id
        if sid is None:
            self._everything.add(subscription)
            return
        by_session = self._by_session
        by_session.setdefault(sid, weakref.WeakSet()).add(subscription)
        if len(by_session) >= self._sweep_at:
            # Subscriptions dropped without closing leave their session's set empty:
            # forget those now and then, so the index follows the live subscriptions.
            for empty in [key for key, same in by_session.items() if not same]:
                del by_session[empty]
            self._sweep_at = max(_FIRST_SWEEP, 2 * len(by_session))

    def _discard(self, subscription: Subscription) -> None:
        """Stop offering events to ``subscription``."""
        self._subscribers.discard(subscription)
        self._held.discard(subscription)
        self._everything.discard(subscription)
        sid = subscription._session_id
        if sid is not None:
            same = self._by_session.get(sid)
            if same is not None:
                same.discard(subscription)
                if not same:
                    self._by_session.pop(sid, None)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def publish(
        self,
        kind: EventKind,
        session_id: uuid.UUID,
        session: Session | None,
        at: datetime,
        origin: str | None = None,
        revision: int | None = None,
    ) -> None:
        if not self._subscribers:
            return
        self._seq += 1
        if session is not None:
            revision = session.revision
        event = SessionEvent(kind, session_id, session, at, self._seq, origin, revision)
        for subscription in tuple(self._everything):
            subscription._offer(event)
        same = self._by_session.get(session_id)
        if same is not None:
            subscriptions = tuple(same)
            if not subscriptions:  # all dropped without closing
                self._by_session.pop(session_id, None)
            for subscription in subscriptions:
                subscription._offer(event)

    def close(self) -> None:
        for subscription in tuple(self._subscribers):
            subscription._end()
