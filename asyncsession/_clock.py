"""Time source used by the manager: a protocol, the system clock and duration helpers."""

from __future__ import annotations

from contextvars import ContextVar
from datetime import datetime, timedelta, timezone
from typing import Protocol, Union, overload, runtime_checkable

import anyio

from ._exceptions import InvalidConfiguration, kind_of, shown

__all__ = ["Clock", "Duration", "SystemClock", "current_time", "to_seconds", "to_timedelta"]

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


def _span(longest: timedelta) -> str:
    """``longest`` for a message: whole days as days, anything shorter in seconds."""
    if longest >= timedelta(days=1) and not longest % timedelta(days=1):
        return f"{longest.days} days"
    return f"{longest.total_seconds():g} seconds"


def _takes(name: str, none: str | None, zero: bool, longest: timedelta) -> str:
    """The start of a refusal: what ``name`` accepts."""
    low = "0 or more" if zero else "above 0"
    return (
        f"{name} must be seconds (an int or float) or a timedelta, {low} and at most "
        f"{_span(longest)}{', or None' if none is not None else ''}"
    )


def _checked(
    value: object, name: str, none: str | None, zero: bool, longest: timedelta
) -> int | float | timedelta | None:
    """``value`` itself once it is a duration in range (see :func:`to_timedelta`).

    Numbers are compared as given, never converted first: NaN and the infinities fail
    every comparison, and an int too large for a float or a timedelta is simply too
    long."""
    if value is None and none is not None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, timedelta)):
        raise InvalidConfiguration(
            f"{_takes(name, none, zero, longest)}; got {shown(value)}. Write e.g. 30 or "
            "timedelta(seconds=30)."
        )
    if isinstance(value, timedelta):
        too_short = value < timedelta(0) if zero else value <= timedelta(0)
        too_long = value > longest
    else:
        too_short = not (value >= 0 if zero else value > 0)  # NaN counts as too short
        too_long = not too_short and value > longest.total_seconds()
    if too_short or too_long:
        if none is None or (too_short and zero):
            hint = ""
        elif too_long:  # beyond timedelta.max, None is no way out either
            hint = " Use None for no limit." if longest < timedelta.max else ""
        else:  # 0 or below, refused: perhaps meant as "off", which None is
            hint = f" {none}"
        raise InvalidConfiguration(
            f"{_takes(name, none, zero, longest)}; got {shown(value)}.{hint}"
        )
    return value


@overload
def to_timedelta(
    value: object, name: str, none: None, *, zero: bool = ..., longest: timedelta = ...
) -> timedelta: ...
@overload
def to_timedelta(
    value: object, name: str, none: str = ..., *, zero: bool = ..., longest: timedelta = ...
) -> timedelta | None: ...
def to_timedelta(
    value: object,
    name: str,
    none: str | None = "Use None to disable it.",
    *,
    zero: bool = False,
    longest: timedelta = _LONGEST,
) -> timedelta | None:
    """The one parser of public duration arguments: ``value`` as a timedelta, or None.

    ``value`` is seconds (an int or a float, not a bool) or a :class:`timedelta`, above 0
    (0 or more with ``zero``) and at most ``longest`` (100 years by default). ``none``
    says what ``None`` does for this argument, and ends the refusal of a value too short;
    ``none=None`` refuses ``None``. Anything else raises :class:`InvalidConfiguration`
    naming ``name``, the types and the range accepted.
    """
    checked = _checked(value, name, none, zero, longest)
    if checked is None or isinstance(checked, timedelta):
        return checked
    delta = timedelta(seconds=checked)
    if not zero and not delta:  # below a microsecond, timedelta's resolution
        raise InvalidConfiguration(
            f"{_takes(name, none, zero, longest)}; got {shown(value)}, less than a "
            f"microsecond (the shortest timedelta).{f' {none}' if none is not None else ''}"
        )
    return delta


@overload
def to_seconds(
    value: object, name: str, *, none: None = ..., zero: bool = ..., longest: timedelta = ...
) -> float: ...
@overload
def to_seconds(
    value: object, name: str, *, none: str, zero: bool = ..., longest: timedelta = ...
) -> float | None: ...
def to_seconds(
    value: object,
    name: str,
    *,
    none: str | None = None,
    zero: bool = False,
    longest: timedelta = _LONGEST,
) -> float | None:
    """:func:`to_timedelta`'s check, for an argument kept as float seconds (store
    timeouts): a number is returned as given (as a float), a timedelta as its seconds.
    ``None`` is refused unless ``none`` says what it does."""
    checked = _checked(value, name, none, zero, longest)
    if checked is None:
        return None
    return checked.total_seconds() if isinstance(checked, timedelta) else float(checked)


def utc(value: datetime, name: str = "datetime") -> datetime:
    """Return ``value`` in UTC; reject non-datetimes, naive datetimes and times that
    fall outside datetime's range once converted to UTC (near year 1 or 9999)."""
    if type(value) is datetime and value.tzinfo is timezone.utc:
        return value  # the common case, first
    if not isinstance(value, datetime):
        raise InvalidConfiguration(
            f"{name} must be a timezone-aware datetime; got {kind_of(value)}. Use "
            "datetime.now(timezone.utc)."
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
