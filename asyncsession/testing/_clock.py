"""A clock that only moves when a test moves it."""

from __future__ import annotations

import heapq
import itertools
import math
from datetime import datetime, timedelta, timezone

import anyio
import anyio.lowlevel

from .._clock import utc
from .._exceptions import InvalidConfiguration

__all__ = ["ManualClock"]


class ManualClock:
    """A deterministic clock for tests: time moves only by :meth:`advance`.

    ``sleep()`` waits until the clock has been advanced far enough, so a manager's
    cleanup loop runs exactly when a test moves time past its interval. No real time
    passes and nothing sleeps.

    ``start`` is the time it starts at (timezone-aware; kept in UTC). By default that is
    the current real UTC time, truncated to the whole second, so a ManualClock works with
    every store, Redis included, whose server deletes a session's keys by its own real
    clock (``key_expiry_grace`` after the session's deadline): times far in the past
    would have them deleted as soon as they are written. Pass ``start=`` for a fixed,
    reproducible date: any date with the stores that keep time only by the clock they
    are given (memory, SQLite, files); with Redis, a date in the past needs a
    ``key_expiry_grace`` that reaches from it past the real time.
    """

    def __init__(self, start: datetime | None = None) -> None:
        if start is None:
            start = datetime.now(timezone.utc).replace(microsecond=0)
        self._now = utc(start, "ManualClock(start=...)")
        self._sleepers: list[tuple[datetime, int, anyio.Event]] = []
        self._forever = 0  # sleeps longer than any time a datetime can hold
        self._seq = itertools.count()

    def __repr__(self) -> str:
        return f"ManualClock({self._now.isoformat()})"

    def now(self) -> datetime:
        """The current manual time (UTC)."""
        return self._now

    def advance(self, seconds: float | timedelta) -> datetime:
        """Move time forward and wake the sleepers whose time has come."""
        if isinstance(seconds, timedelta):
            delta = seconds
        elif isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise InvalidConfiguration(
                "ManualClock.advance() needs seconds (an int or float) or a timedelta, got "
                f"{type(seconds).__name__}."
            )
        else:
            try:
                delta = timedelta(seconds=seconds)
            except ValueError:  # nan
                raise InvalidConfiguration(
                    f"ManualClock.advance() needs seconds or a timedelta, got {seconds!r}."
                ) from None
            except OverflowError:  # +-inf, or beyond timedelta's range
                delta = timedelta.max if seconds > 0 else timedelta.min
        if delta < timedelta(0):
            raise InvalidConfiguration(f"ManualClock cannot go backwards (advance({seconds!r})).")
        try:
            self._now += delta
        except OverflowError:
            raise InvalidConfiguration(
                f"ManualClock cannot advance({seconds!r}) from {self._now.isoformat()}: "
                "that is past the last time a datetime can hold."
            ) from None
        while self._sleepers and self._sleepers[0][0] <= self._now:
            heapq.heappop(self._sleepers)[2].set()
        return self._now

    def jump_to(self, when: datetime) -> datetime:
        """Advance to the absolute time ``when`` (timezone-aware, not earlier than now)."""
        target = utc(when, "ManualClock.jump_to(when)")
        if target < self._now:
            raise InvalidConfiguration(
                f"ManualClock cannot go backwards: jump_to({target.isoformat()}) is before "
                f"the clock's time, {self._now.isoformat()}."
            )
        return self.advance(target - self._now)

    @property
    def sleepers(self) -> int:
        """How many sleeps are waiting for time to move."""
        return len(self._sleepers) + self._forever

    async def sleep(self, seconds: float) -> None:
        """Wait until the clock is advanced by at least ``seconds``.

        Like :func:`anyio.sleep`, ``math.inf`` (or any time past the last one a datetime
        can hold) waits until cancelled.
        """
        if not isinstance(seconds, int) and math.isnan(seconds):  # (a huge int is no NaN)
            raise InvalidConfiguration("ManualClock.sleep() needs a number of seconds, got nan.")
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        try:
            deadline: datetime | None = self._now + timedelta(seconds=seconds)
        except OverflowError:  # inf, or past datetime's range: time never gets there
            deadline = None
        if deadline is not None and deadline <= self._now:  # below datetime's microsecond
            await anyio.lowlevel.checkpoint()
            return
        if deadline is None:
            self._forever += 1
            try:
                await anyio.sleep_forever()
            finally:
                self._forever -= 1
            return
        event = anyio.Event()
        entry = (deadline, next(self._seq), event)
        heapq.heappush(self._sleepers, entry)
        try:
            await event.wait()
        finally:
            if not event.is_set():  # cancelled: forget this sleeper
                self._sleepers.remove(entry)
                heapq.heapify(self._sleepers)
