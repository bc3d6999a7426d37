"""Immutable session models: :class:`Session`, :class:`Message`, :class:`SessionStatus`."""

from __future__ import annotations

import enum
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from itertools import islice
from typing import Any, TypeVar, overload

import attrs

from ._clock import Duration, current_time, to_timedelta, utc
from ._exceptions import (
    CorruptSessionError,
    InvalidConfiguration,
    InvalidJSONValue,
    InvalidOwner,
    InvalidRole,
    InvalidSessionName,
    SessionError,
    ValidationError,
    check_flag,
    kind_of,
)
from ._json import (
    EMPTY,
    freeze_json,
    freeze_state,
    merge_state,
    plain_optional_text,
    plain_str,
    plain_text,
)

__all__ = [
    "ROLES",
    "ExpiryPolicy",
    "Message",
    "MessageLog",
    "Session",
    "SessionStatus",
    "validate_name",
    "validate_owner",
]

#: The message roles a session accepts (``"developer"`` is OpenAI's name for the
#: instructions that newer models take in place of ``"system"``).
ROLES: tuple[str, ...] = ("user", "assistant", "system", "developer", "tool")
_ROLES = frozenset(ROLES)
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,100}")


class SessionStatus(str, enum.Enum):
    """Lifecycle status. ACTIVE and ARCHIVED are open; the others are terminal."""

    ACTIVE = "active"
    ARCHIVED = "archived"
    EXITED = "exited"
    CRASHED = "crashed"
    ABNORMAL = "abnormal"
    EXPIRED = "expired"

    @property
    def is_terminal(self) -> bool:
        """True for EXITED, CRASHED, ABNORMAL and EXPIRED."""
        return self not in _OPEN

    def __str__(self) -> str:
        return self.value


_OPEN = frozenset({SessionStatus.ACTIVE, SessionStatus.ARCHIVED})
_ACTIVE, _ARCHIVED = SessionStatus.ACTIVE, SessionStatus.ARCHIVED


_Choice = TypeVar("_Choice", bound=enum.Enum)


def parse_choice(cls: type[_Choice], value: object, what: str) -> _Choice:
    """``value`` as a member of the str enum ``cls`` (or its string value); else
    :class:`InvalidConfiguration` naming ``what`` and the choices."""
    try:
        return cls(value)
    except (TypeError, ValueError):  # TypeError: an unhashable value
        choices = [member.value for member in cls]
        close = value.strip().lower() if isinstance(value, str) else None
        hint = (
            f" (it differs from {close!r} in case or surrounding spaces)"
            if close in choices
            else ""
        )
        raise InvalidConfiguration(
            f"Unknown {what} {value!r}{hint}: use one of {', '.join(choices)}."
        ) from None


def parse_choices(
    cls: type[_Choice], value: object, what: str, argument: str
) -> frozenset[_Choice] | None:
    """``value`` (None, one member of the str enum ``cls`` or its string value, or an
    iterable of them) as a set of members; None stays None (no filter). ``argument`` is
    the parameter's name for the error."""
    if value is None:
        return None
    if isinstance(value, str):
        return frozenset({parse_choice(cls, value, what)})
    if isinstance(value, (bytes, bytearray, memoryview, Mapping)) or not isinstance(
        value, Iterable
    ):
        raise InvalidConfiguration(
            f"{argument} must be {'an' if what[0] in 'aeiou' else 'a'} {what}, or a list "
            f"or set of them (None for no filter); got {type(value).__name__}."
        )
    return frozenset(parse_choice(cls, member, what) for member in value)


def parse_status(value: SessionStatus | str) -> SessionStatus:
    """``value`` as a :class:`SessionStatus` (or its string value); else a typed error."""
    return parse_choice(SessionStatus, value, "session status")


def status_problem(value: object) -> str:
    """Why a stored ``value`` is no :class:`SessionStatus`, without showing it (a damaged
    document's field may hold any text, and stores log these errors)."""
    known = ", ".join(status.value for status in SessionStatus)
    return f"{kind_of(value)} is not a known status ({known})"


def stored_status(value: str, session_id: uuid.UUID) -> SessionStatus:
    """A store's status field ``value`` of session ``session_id``, as a
    :class:`SessionStatus`; a damaged one raises :class:`CorruptSessionError` (without
    showing it)."""
    try:
        return SessionStatus(value)
    except ValueError:
        raise CorruptSessionError(
            f"its status field: {status_problem(value)}", session_id=session_id
        ) from None


def validate_name(name: object) -> str | None:
    """Return ``name`` if it is None or 1-100 characters of ``[A-Za-z0-9_-]`` (a str
    enum member: its value)."""
    name = plain_str(name)
    if name is None:
        return None
    if type(name) is not str or _NAME_RE.fullmatch(name) is None:
        raise InvalidSessionName(name)
    return name


def validate_owner(owner: str | None) -> str | None:
    """Return ``owner`` if it is None or a non-empty printable string of ≤ 256 chars (a
    str enum member: its value)."""
    owner = plain_str(owner)
    if owner is None:
        return None
    if type(owner) is not str or not 0 < len(owner) <= 256 or not owner.isprintable():
        raise InvalidOwner(owner)
    return owner


# Converters to UTC, one per field, so that a typed error names the field.
def _timestamp(value: datetime) -> datetime:
    return utc(value, "Message.timestamp")


def _created_at(value: datetime) -> datetime:
    return utc(value, "Session.created_at")


def _last_active(value: datetime) -> datetime:
    return utc(value, "Session.last_active")


def _closed_at(value: datetime | None) -> datetime | None:
    return None if value is None else utc(value, "Session.closed_at")


def _expires_at(value: datetime | None) -> datetime | None:
    return None if value is None else utc(value, "Session.expires_at")


def _validate_role(instance: object, attribute: object, role: str) -> None:
    if type(role) is not str or role not in _ROLES:  # type first: a list is unhashable
        raise InvalidRole(role, ROLES)


def _freeze_data(value: object) -> Any:
    return None if value is None else freeze_json(value, "data")


def _check_content(instance: object, attribute: object, content: Any) -> None:
    if type(content) is not str:
        raise ValidationError(
            f"Message content must be a str, got {type(content).__name__}; put structured "
            "values in the message's data (any JSON value)."
        )
    freeze_json(content, "content")


@attrs.frozen(slots=True)
class Message:
    """One message of a conversation."""

    # A str enum member (class Role(str, Enum), StrEnum) stands for its value.
    role: str = attrs.field(converter=plain_text, validator=_validate_role)
    content: str = attrs.field(converter=plain_text, validator=_check_content)
    timestamp: datetime = attrs.field(converter=_timestamp)
    data: Any = attrs.field(default=None, converter=_freeze_data)


_new_log = object.__new__


class _Decoder:
    """How a lazy :class:`MessageLog` turns its raw stored items into messages."""

    __slots__ = ("decode", "session_id")

    def __init__(self, decode: Callable[[Any], Message], session_id: Any) -> None:
        self.decode = decode
        self.session_id = session_id


class MessageLog(Sequence[Message]):
    """An immutable, append-only sequence of messages that shares structure.

    Appending returns a new log in O(1) and leaves this one unchanged; snapshots of one
    session share the underlying storage, so no history is copied per read (also across
    threads: an append that finds the storage already extended copies it). A log may
    be a *window* of a longer history (``offset`` earlier messages not loaded); ``total``
    is the full count.

    Stores may build a *lazy* log (:meth:`_lazy`) over raw stored items: each item is
    decoded on first access and the message replaces it in the shared storage, so a
    damaged item raises :class:`CorruptSessionError` only when it is read.
    """

    __slots__ = ("_decoder", "_items", "_offset", "_start", "_stop")

    # Messages; raw items too while _decoder is set (None: the window is all decoded).
    _items: list[Any]
    _start: int
    _stop: int
    _offset: int
    _decoder: _Decoder | None

    def __init__(self, messages: Iterable[Message] = (), *, offset: int = 0) -> None:
        items = list(messages)
        for item in items:
            if not isinstance(item, Message):
                raise TypeError(f"MessageLog holds Message objects, got {kind_of(item)}")
        if offset < 0:
            raise ValueError("offset must be >= 0")
        self._items = items
        self._start = 0
        self._stop = len(items)
        self._offset = offset
        self._decoder = None

    @classmethod
    def _view(
        cls,
        items: list[Any],
        start: int,
        stop: int,
        offset: int,
        decoder: _Decoder | None = None,
    ) -> MessageLog:
        log = cls.__new__(cls)
        log._items = items
        log._start = start
        log._stop = stop
        log._offset = offset
        log._decoder = decoder
        return log

    @classmethod
    def _lazy(
        cls,
        raw_items: list[Any],
        decode: Callable[[Any], Message],
        offset: int = 0,
        *,
        session_id: Any = None,
    ) -> MessageLog:
        """A log over ``raw_items`` (owned by the log from now on), decoded on access.

        ``decode`` must be deterministic: concurrent readers may both decode an item and
        keep either result. Its ``ValueError``/``TypeError``/``KeyError``/``SessionError``
        become :class:`CorruptSessionError` naming ``session_id``.
        """
        if offset < 0:
            raise ValueError("offset must be >= 0")
        decoder = _Decoder(decode, session_id) if raw_items else None
        return cls._view(raw_items, 0, len(raw_items), offset, decoder)

    def _load(self, position: int) -> Message:
        """The message at ``position`` of the storage, decoding a raw item once."""
        decoder = self._decoder  # read first: once it is None, the window is decoded
        items = self._items
        item = items[position]
        if type(item) is Message or decoder is None or isinstance(item, Message):
            return item  # type: ignore[no-any-return]
        try:
            message = decoder.decode(item)
        except CorruptSessionError as exc:
            if exc.session_id is not None or decoder.session_id is None:
                raise
            raise CorruptSessionError(exc.detail, session_id=decoder.session_id) from exc
        except SessionError as exc:
            raise CorruptSessionError(exc.message, session_id=decoder.session_id) from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptSessionError(
                f"invalid message ({type(exc).__name__}: {exc})", session_id=decoder.session_id
            ) from exc
        if not isinstance(message, Message):
            raise TypeError(f"the message decoder returned {kind_of(message)}")
        items[position] = message
        return message

    def _iter_lazy(self) -> Iterator[Message]:
        load = self._load
        for position in range(self._start, self._stop):
            yield load(position)
        self._decoder = None  # every item of the window is a Message now

    def _range(self, start: int, stop: int) -> tuple[Message, ...]:
        if self._decoder is None:
            return tuple(self._items[start:stop])
        load = self._load
        return tuple([load(position) for position in range(start, stop)])

    @property
    def offset(self) -> int:
        """How many earlier messages of the history this window does not hold."""
        return self._offset

    @property
    def total(self) -> int:
        """The number of messages in the whole history."""
        return self._offset + self._stop - self._start

    @property
    def is_complete(self) -> bool:
        """True when this log holds the whole history."""
        return self._offset == 0

    def __len__(self) -> int:
        return self._stop - self._start

    @overload
    def __getitem__(self, index: int) -> Message: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Message, ...]: ...
    def __getitem__(self, index: int | slice) -> Message | tuple[Message, ...]:
        start = self._start
        if isinstance(index, slice):
            first, last, step = index.indices(self._stop - start)
            if step == 1:
                if self._decoder is None:
                    return tuple(self._items[start + first : start + last])
                return self._range(start + first, start + last)
            get = self._items.__getitem__ if self._decoder is None else self._load
            return tuple([get(position) for position in range(start + first, start + last, step)])
        if index < 0:  # index becomes a position in self._items
            index += self._stop
            if index < start:
                raise self._out_of_range()
        else:
            index += start
            if index >= self._stop:
                raise self._out_of_range()
        if self._decoder is None:
            return self._items[index]  # type: ignore[no-any-return]
        return self._load(index)

    def _out_of_range(self) -> IndexError:
        if self.is_complete:
            return IndexError("message index out of range")
        return IndexError(
            f"message index out of range: this log is a window of {len(self)} of the "
            f"session's {self.total} messages (a list item, or what add_message returned); "
            "read the session with get(id) for the others"
        )

    def __iter__(self) -> Iterator[Message]:
        if self._decoder is None:
            return islice(self._items, self._start, self._stop)
        return self._iter_lazy()

    def __reversed__(self) -> Iterator[Message]:
        if self._decoder is not None:
            load = self._load
            for i in range(self._stop - 1, self._start - 1, -1):
                yield load(i)
            return
        items = self._items
        for i in range(self._stop - 1, self._start - 1, -1):
            yield items[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, MessageLog):
            if self._offset != other._offset or len(self) != len(other):
                return False
            if self._items is other._items and self._start == other._start:
                return True
            return all(a == b for a, b in zip(self, other, strict=True))
        if isinstance(other, (tuple, list)):
            return (
                self._offset == 0
                and len(self) == len(other)
                and all(a == b for a, b in zip(self, other, strict=True))
            )
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self._offset, tuple(self)))

    def __repr__(self) -> str:
        extra = f", offset={self._offset}" if self._offset else ""
        return f"MessageLog({len(self)} messages{extra})"

    def append(self, message: Message) -> MessageLog:
        """Return a new log with ``message`` at the end (O(1) amortized)."""
        if not isinstance(message, Message):
            raise TypeError(f"append() takes a Message, got {kind_of(message)}")
        items = self._items
        stop = self._stop
        log = _new_log(type(self))
        if stop == len(items):
            items.append(message)
        # Storage never shrinks, so ``stop < len(items)`` here. Another thread may have
        # extended it between the length check and our append: it is ours to share only
        # if our message sits at ``stop`` (list.append is atomic; the first one wins).
        if items[stop] is message:
            log._items = items
            log._start = self._start
            log._stop = stop + 1
        else:
            fork = items[self._start : stop]
            fork.append(message)
            log._items = fork
            log._start = 0
            log._stop = len(fork)
        log._offset = self._offset
        log._decoder = self._decoder
        return log

    def extend(self, messages: Iterable[Message]) -> MessageLog:
        """Return a new log with ``messages`` appended."""
        log = self
        for message in messages:
            log = log.append(message)
        return log

    def tail(self, count: int) -> MessageLog:
        """Return a window of the last ``count`` messages, sharing storage."""
        count = max(0, min(count, len(self)))
        log = _new_log(type(self))
        log._items = self._items
        log._start = start = self._stop - count
        log._stop = self._stop
        log._offset = self._offset + start - self._start
        log._decoder = self._decoder
        return log

    def added_since(self, older: MessageLog) -> tuple[Message, ...] | None:
        """Messages appended to ``older`` to make this log, or None if it is no extension.

        O(appended) when both logs share storage (the common case in update callbacks).
        """
        if (
            self._items is older._items
            and self._start == older._start
            and self._offset == older._offset
            and self._stop >= older._stop
        ):
            return self._range(older._stop, self._stop)
        if self._offset != older._offset or len(self) < len(older):
            return None
        if any(a != b for a, b in zip(self, older, strict=False)):
            return None
        return self._range(self._start + len(older), self._stop)


EMPTY_LOG = MessageLog()


def _to_log(value: Iterable[Message] | None) -> MessageLog:
    if value is None:
        return EMPTY_LOG
    if type(value) is MessageLog:
        return value
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise InvalidConfiguration(
            f"Session.messages must be a MessageLog or an iterable of Message objects; got "
            f"{type(value).__name__}. Add messages with Session.with_message()."
        )
    items = list(value)
    for item in items:
        if not isinstance(item, Message):
            raise InvalidConfiguration(
                f"Session.messages holds Message objects, got {kind_of(item)}. Add "
                "messages with Session.with_message()."
            )
    return MessageLog(items)


def _id(value: uuid.UUID | str) -> uuid.UUID:
    if type(value) is uuid.UUID:
        return value
    if isinstance(value, uuid.UUID):
        return uuid.UUID(int=value.int)
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    raise InvalidConfiguration(
        f"Session.id must be a UUID or its string form; got {kind_of(value)} (not shown). "
        "Ids come from SessionManager.create(); keep the one you were given."
    )


def check_state_changes(changes: object, call: str, first: str) -> None:
    """Refuse a positional ``changes`` of ``with_state``/``set_state`` that is no mapping
    (``call`` is how the call starts, ``first`` what comes before ``changes``)."""
    if changes is not None and not isinstance(changes, Mapping):
        raise InvalidJSONValue(
            "state",
            f"{call}) takes a mapping of changes or keywords, not {type(changes).__name__}; "
            f"e.g. {call}{first}{{'cart': 1}}) or {call}{first}cart=1)",
        )


def _validate_name(instance: object, attribute: object, value: Any) -> None:
    validate_name(value)


def _validate_owner(instance: object, attribute: object, value: Any) -> None:
    validate_owner(value)


_COUNT_HINTS = {
    "errors": "count errors with attrs.evolve(session, errors=session.errors + 1)",
    "revision": "the revision is managed by asyncsession: leave it as the snapshot has it",
}


#: The largest value of each count every store can keep: revisions are SQLite integers
#: (signed 64 bits); errors live in the JSON document, whose ints reach 2**64 - 1.
_COUNT_LIMITS = {"errors": 2**64 - 1, "revision": 2**63 - 1}


def _non_negative(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    limit = _COUNT_LIMITS[attribute.name]
    if type(value) is not int or not 0 <= value <= limit:
        bound = "2**64 - 1" if limit == 2**64 - 1 else "2**63 - 1"
        raise InvalidConfiguration(
            f"Session.{attribute.name} must be an int from 0 to {bound}, got "
            f"{type(value).__name__} {value!r:.60}; "
            f"{_COUNT_HINTS.get(attribute.name, 'pass a count')}."
        )


@attrs.frozen(slots=True, repr=False)
class Session:
    """An immutable snapshot of one session.

    Change it with :func:`attrs.evolve` or the ``with_*`` helpers, inside
    :meth:`SessionManager.update`; a snapshot never changes after it is returned.
    """

    id: uuid.UUID = attrs.field(converter=_id)
    created_at: datetime = attrs.field(converter=_created_at)
    last_active: datetime = attrs.field(converter=_last_active)
    # A str enum member stands for its value, as in state (see plain_str).
    owner: str | None = attrs.field(
        default=None, converter=plain_optional_text, validator=_validate_owner
    )
    name: str | None = attrs.field(
        default=None, converter=plain_optional_text, validator=_validate_name
    )
    status: SessionStatus = attrs.field(default=SessionStatus.ACTIVE, converter=parse_status)
    closed_at: datetime | None = attrs.field(default=None, converter=_closed_at)
    expires_at: datetime | None = attrs.field(default=None, converter=_expires_at)
    messages: MessageLog = attrs.field(default=EMPTY_LOG, converter=_to_log)
    state: Mapping[str, Any] = attrs.field(default=EMPTY, converter=freeze_state)
    errors: int = attrs.field(default=0, validator=_non_negative)
    revision: int = attrs.field(default=0, validator=_non_negative)

    def __repr__(self) -> str:
        return (
            f"Session(id={self.id}, owner={self.owner!r}, name={self.name!r}, "
            f"status={self.status.value}, messages={self.messages.total}, "
            f"revision={self.revision})"
        )

    @property
    def is_closed(self) -> bool:
        """True when the status is terminal."""
        return self.status.is_terminal

    @property
    def duration(self) -> timedelta:
        """Time from creation to close (or to the last activity while open)."""
        end = self.closed_at if self.closed_at is not None else self.last_active
        return end - self.created_at

    def is_expired(self, now: datetime) -> bool:
        """True when ``expires_at`` has passed at ``now``."""
        return self.expires_at is not None and self.expires_at <= now

    def with_state(self, changes: Mapping[str, Any] | None = None, /, **kw: Any) -> Session:
        """Return a copy whose state has ``changes`` (and keyword changes) merged in."""
        check_state_changes(changes, "with_state(", "")
        updates = dict(changes) if changes else {}
        updates.update(kw)
        return replace_trusted(self, state=merge_state(self.state, updates))

    def without_state(self, *keys: str) -> Session:
        """Return a copy whose state lacks ``keys`` (missing keys are ignored)."""
        return replace_trusted(
            self, state=freeze_state({k: v for k, v in self.state.items() if k not in keys})
        )

    def with_message(
        self,
        role: str,
        content: str,
        *,
        data: Any = None,
        timestamp: datetime | None = None,
    ) -> Session:
        """Return a copy with one more message.

        The timestamp defaults to now on the manager's clock inside
        :meth:`SessionManager.update` (so a ``ManualClock`` stamps it), else UTC now.
        """
        message = Message(
            role, content, timestamp if timestamp is not None else current_time(), data
        )

        return replace_trusted(self, messages=self.messages.append(message))

    def with_name(self, name: str | None) -> Session:
        """Return a copy with another (validated) name."""
        return replace_trusted(self, name=validate_name(name))


def _make_replace_trusted() -> Any:
    # Straight-line code generated once, with keyword parameters (no **kwargs dict) and
    # the slots' own descriptors bound as defaults: several times faster than evolve().
    names = [a.name for a in attrs.fields(Session)]
    params = ", ".join(f"{n}=_MISSING" for n in names)
    binds = ", ".join(f"_set_{n}=_slots[{n!r}].__set__" for n in names)
    lines = [f"def replace_trusted(session, *, {params}, _new=object.__new__, {binds}):"]
    lines.append("    new = _new(_Session)")
    for n in names:
        lines.append(f"    _set_{n}(new, session.{n} if {n} is _MISSING else {n})")
    lines.append("    return new")
    namespace: dict[str, Any] = {
        "_MISSING": _MISSING,
        "_Session": Session,
        "_slots": {n: Session.__dict__[n] for n in names},
    }
    exec("\n".join(lines), namespace)
    return namespace["replace_trusted"]


_MISSING: Any = object()
_replace_trusted = _make_replace_trusted()


def replace_trusted(session: Session, **changes: Any) -> Session:
    """Copy ``session`` with ``changes`` *without* re-validating anything.

    For stores and the manager only, with values they computed themselves (times,
    deadlines, revisions, appended logs); user input always goes through the
    validating constructor or :func:`attrs.evolve`.
    """
    result: Session = _replace_trusted(session, **changes)
    return result


def last_window(session: Session, last_messages: int | None) -> Session:
    """``session`` as a read with ``last_messages`` returns it (all of it for None)."""
    if last_messages is None:
        return session
    return replace_trusted(session, messages=session.messages.tail(last_messages))


def _idle_timeout(value: Duration) -> timedelta | None:
    return to_timedelta(value, "ExpiryPolicy.idle_timeout", "Use None for no idle timeout.")


def _max_age(value: Duration) -> timedelta | None:
    return to_timedelta(value, "ExpiryPolicy.max_age", "Use None for no absolute limit.")


def _retention(value: Duration) -> timedelta | None:
    return to_timedelta(
        value, "ExpiryPolicy.retention", "None keeps closed sessions until they are deleted."
    )


def _touch_interval(value: int | float | timedelta) -> timedelta:
    return to_timedelta(value, "ExpiryPolicy.touch_interval", None, zero=True)


def _after(start: datetime, delta: timedelta) -> datetime | None:
    """``start + delta``, or None (never) when that is past the last datetime."""
    try:
        return start + delta
    except OverflowError:
        return None


@attrs.frozen(slots=True)
class ExpiryPolicy:
    """When sessions expire: the manager's policy, evaluated by stores on touch.

    * ACTIVE: ``min(last_active + idle_timeout, created_at + max_age)``.
    * ARCHIVED: ``created_at + max_age`` (parked sessions do not idle out).
    * terminal: ``closed_at + retention``.

    Stores record the deadline with each write. A write or touch of an open session at
    ``at`` first computes this policy's deadline from its stored ``last_active``: if that
    is at or before ``at`` (a limit shortened since it was written), the session has
    expired and the store records that deadline; otherwise the new deadline counts from
    ``max(last_active, at)``. A closed session keeps the deadline recorded when it closed,
    whatever a later policy's ``retention``.

    Limits are seconds (an int or float) or a :class:`~datetime.timedelta`, stored as a
    timedelta: positive and at most 36500 days, or ``None`` for no limit
    (``touch_interval``: 0 to 36500 days). A deadline
    later than a datetime can hold (after 9999-12-31 UTC) is no deadline either: no clock
    reaches it. A touch (activity without a change) moves ``last_active`` only when it
    moves it by at least ``touch_interval``, so frequent reads do not each become a write.
    """

    idle_timeout: timedelta | None = attrs.field(default=None, converter=_idle_timeout)
    max_age: timedelta | None = attrs.field(default=None, converter=_max_age)
    retention: timedelta | None = attrs.field(default=None, converter=_retention)
    touch_interval: timedelta = attrs.field(default=timedelta(0), converter=_touch_interval)

    def should_touch(self, last_active: datetime, at: datetime) -> bool:
        """Whether activity at ``at`` moves ``last_active`` (coalesced by ``touch_interval``)."""
        return at > last_active and at - last_active >= self.touch_interval

    def deadline(
        self,
        status: SessionStatus,
        created_at: datetime,
        last_active: datetime,
        closed_at: datetime | None,
    ) -> datetime | None:
        """Return when a session with these fields expires, or None (never)."""
        # (identity first: a store computes this on every write and touch)
        if status is not _ACTIVE and status is not _ARCHIVED and status.is_terminal:
            if self.retention is None or closed_at is None:
                return None
            return _after(closed_at, self.retention)
        max_age = self.max_age
        try:
            hard = None if max_age is None else created_at + max_age
        except OverflowError:  # past the last datetime: never
            hard = None
        idle = self.idle_timeout
        if idle is None or status is _ARCHIVED:
            return hard
        try:
            soft = last_active + idle
        except OverflowError:
            return hard
        return soft if hard is None or soft < hard else hard

    def deadline_of(self, session: Session) -> datetime | None:
        """Return the deadline of ``session`` under this policy."""
        return self.deadline(
            session.status, session.created_at, session.last_active, session.closed_at
        )

    def activity_deadline(
        self,
        status: SessionStatus,
        created_at: datetime,
        last_active: datetime,
        at: datetime,
        *,
        moves: bool = True,
    ) -> tuple[datetime | None, datetime | None]:
        """The deadline activity at ``at`` (a write or a touch) gives an open session with
        these stored fields, and the deadline it has already passed (else None).

        What a store computes on each write and touch (a custom store too). The session
        has expired for that activity when this policy's deadline from its *stored*
        ``last_active`` (and ``created_at``) is at or before ``at``: an ``idle_timeout``
        or ``max_age`` added or shortened since its last write can leave it so. That
        deadline is then returned twice; the store records it, nothing else, and treats
        the session as not found. Otherwise the deadline counts from
        ``max(last_active, at)``, the new ``last_active`` (``moves=False``: from the
        stored one, for a touch that :meth:`should_touch` coalesced, or when only the
        check is wanted). Under the policy the session was written with, the stored
        deadline is the one from its stored ``last_active``, so this never finds expired
        what the stored deadline had not.
        """
        check_flag(moves, "moves")
        deadline = self.deadline(status, created_at, last_active, None)
        if deadline is not None and deadline <= at:
            return deadline, deadline
        if moves and last_active < at:
            deadline = self.deadline(status, created_at, at, None)
        return deadline, None
