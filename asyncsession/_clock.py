"""Time source used by the manager: a protocol, the system clock and duration helpers."""

from __future__ import annotations

from contextvars import ContextVar
from datetime import datetime, timedelta, timezone
from typing import Protocol, Union, runtime_checkable

import anyio

from ._exceptions import InvalidConfiguration

__all__ = ["Clock", "Duration", "SystemClock", "current_time", "to_timedelta"]

#: A duration argument: seconds as int/float, a timedelta, or None for "no limit".
Duration = Union[int, float, timedelta, None]


@runtime_checkable
class Clock(Protocol):
    """What the manager needs from a clock: the current UTC time and a way to wait."""

    def now(self) -> datetime:
        """Return the current time as a timezone-aware UTC datetime."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait until ``seconds`` have passed on this clock."""
        ...


class SystemClock:
    """The real wall clock (UTC) and :func:`anyio.sleep`."""

    def now(self) -> datetime:
        """Return ``datetime.now(timezone.utc)``."""
        return datetime.now(timezone.utc)

    async def sleep(self, seconds: float) -> None:
        """Sleep with :func:`anyio.sleep`."""
        await anyio.sleep(seconds)

    def __repr__(self) -> str:
        return "SystemClock()"


_LONGEST = timedelta(days=36500)  # deadlines stay far inside datetime's range


def to_timedelta(
    value: Duration, name: str, none: str = "Use None to disable it."
) -> timedelta | None:
    """Convert a duration argument to a positive timedelta, or None.

    ``none`` ends the refusal of a zero or negative value: what ``None`` would do.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, timedelta)):
        raise InvalidConfiguration(
            f"{name} must be seconds (int or float), a timedelta, or None; got {value!r}."
        )
    try:
        delta = value if isinstance(value, timedelta) else timedelta(seconds=value)
    except (OverflowError, ValueError):  # inf, nan, or beyond timedelta's range
        too_long = not isinstance(value, timedelta) and value > 0  # nan > 0 is False
        delta = _LONGEST * 2 if too_long else timedelta(0)
    if delta <= timedelta(0):
        raise InvalidConfiguration(f"{name} must be positive; got {value!r}. {none}")
    if delta > _LONGEST:
        raise InvalidConfiguration(
            f"{name} must be at most {_LONGEST.days} days; got {value!r}. Use None for no limit."
        )
    return delta


def utc(value: datetime, name: str = "datetime") -> datetime:
    """Return ``value`` in UTC; reject non-datetimes, naive datetimes and times that
    fall outside datetime's range once converted to UTC (near year 1 or 9999)."""
    if type(value) is datetime and value.tzinfo is timezone.utc:
        return value  # the common case, first
    if not isinstance(value, datetime):
        raise InvalidConfiguration(
            f"{name} must be a timezone-aware datetime; got {type(value).__name__} "
            f"{value!r:.60}. Use datetime.now(timezone.utc)."
        )
    try:
        offset = value.utcoffset()
    except (TypeError, ValueError) as exc:  # a tzinfo that returns no valid offset
        raise InvalidConfiguration(
            f"{name} has a time zone without a valid UTC offset ({exc}); got {value!r:.80}. "
            "Use a datetime with tzinfo=timezone.utc."
        ) from None
    if offset is None:
        raise InvalidConfiguration(
            f"{name} must be timezone-aware; got naive {value!r}. Use datetime.now(timezone.utc)."
        )
    if value.tzinfo is timezone.utc:
        return value
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise InvalidConfiguration(
            f"{name} {value.isoformat()} is out of range: converted to UTC it falls outside "
            f"{_FIRST.isoformat()} to {_LAST.isoformat()}, the times a datetime can hold. "
            "Use a time within that range."
        ) from None


_FIRST = datetime.min.replace(tzinfo=timezone.utc)
_LAST = datetime.max.replace(tzinfo=timezone.utc)


#: The clock of the manager whose update callback is running (see ``current_time``).
active_clock: ContextVar[Clock | None] = ContextVar("asyncsession_clock", default=None)


def current_time() -> datetime:
    """Now, on the clock of the manager running the current update callback, else UTC."""
    clock = active_clock.get()
    return clock.now() if clock is not None else datetime.now(timezone.utc)
