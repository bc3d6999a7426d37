"""Warnings given once: about each session passed over for now (a bounded memory of
them), and about each episode of drops from a full queue."""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections.abc import Iterable

__all__ = ["Notes", "Overflow", "cause_of"]

#: A duration in seconds as error messages give them ("waited 5.01s", "after 2 s").
_SECONDS = re.compile(r"\b\d+(?:\.\d+)?(?: ?s\b)")


def cause_of(exc: BaseException) -> str:
    """The cause ``exc`` tells, for :meth:`Notes.note`: its type and message, with the
    durations in the message left out, so that the same failure waiting a little longer
    or shorter (a busy SQLite error states how long it waited) is not a new cause."""
    return f"{type(exc).__name__}: {_SECONDS.sub('(some time)', str(exc))}"


class Notes:
    """Warnings about sessions passed over for now, given once per session and cause.

    :meth:`note` warns the first time a session is passed over and again when its cause
    changes; passing it over alike again is logged at debug level. :meth:`resolved` logs
    at info level that a noted session was dealt with at last. Beyond ``remembered``
    sessions at once, one warning says so and the others are logged at debug level, until
    fewer than half that many are remembered (so however stuck sessions come and go, at
    least ``remembered / 2`` warnings about single sessions come between two such).
    Thread-safe; :meth:`resolved` and :meth:`forget` take no lock while nothing is noted.

    ``again`` ends the first warning about a session; ``crowded`` ends the warning that
    more are passed over than remembered (``{n}`` stands for ``remembered``).
    """

    def __init__(
        self,
        log: logging.Logger,
        *,
        remembered: int,
        again: str = " (tried again later; warned again only if this changes)",
        crowded: str = (
            "; more than {n} sessions are passed over at once, so this one and the others "
            "beyond the first {n} are logged at debug level only while that lasts (each is "
            "still tried again)"
        ),
    ) -> None:
        self._log = log
        self._remembered = remembered
        self._again = again
        self._crowded = crowded.format(n=remembered)
        self._lock = threading.Lock()
        self._causes: dict[uuid.UUID, str] = {}
        self._overflow = False  # the warning that more are passed over was given

    def note(self, sid: uuid.UUID, cause: str, message: str, *args: object) -> None:
        """Log ``message % args`` about ``sid``, passed over because of ``cause``."""
        with self._lock:
            known = self._causes.get(sid)
            if known == cause:
                level, tail = logging.DEBUG, " (still)"
            elif known is None and len(self._causes) >= self._remembered:
                level, tail = logging.DEBUG, f" (beyond the {self._remembered} remembered)"
                if not self._overflow:
                    self._overflow = True
                    level, tail = logging.WARNING, self._crowded
            else:
                self._causes[sid] = cause
                level, tail = logging.WARNING, self._again
        self._log.log(level, message + tail, *args)

    def resolved(self, sid: uuid.UUID, message: str, *args: object) -> None:
        """Log ``message % args`` at info level if ``sid`` was noted, and forget it."""
        if self._causes and self._forget(sid):  # nothing noted: no lock taken
            self._log.info(message, *args)

    def forget(self, ids: Iterable[uuid.UUID]) -> None:
        """Forget ``ids`` without a word (their sessions are gone, say)."""
        if not self._causes:  # nothing noted: no lock taken (every delete comes here)
            return
        for sid in ids:
            self._forget(sid)

    def _forget(self, sid: uuid.UUID) -> bool:
        with self._lock:
            known = self._causes.pop(sid, None)
            if len(self._causes) * 2 < self._remembered:
                self._overflow = False
        return known is not None

    def noted(self) -> list[uuid.UUID]:
        """The sessions noted now, in the order they were first noted."""
        with self._lock:
            return list(self._causes)

    def clear(self) -> None:
        """Forget every session."""
        with self._lock:
            self._causes.clear()
            self._overflow = False


class Overflow:
    """Warnings about what a full queue drops: one per episode, not one per item.

    :meth:`dropped` warns at the first drop of an episode (``warning % total``, with the
    count so far, which the caller keeps where its users read it) and says nothing at
    the others. :meth:`drained`, called by the queue's reader when it has taken every
    queued item, ends the episode with ``caught_up % dropped_in_episode`` at info level.
    """

    __slots__ = ("_caught_up", "_episode", "_log", "_warning")

    def __init__(self, log: logging.Logger, warning: str, caught_up: str) -> None:
        self._log = log
        self._warning = warning
        self._caught_up = caught_up
        self._episode = 0  # dropped since the episode began; 0: no episode under way

    @property
    def active(self) -> bool:
        """Whether an episode is under way (items were dropped since the last drain)."""
        return self._episode > 0

    def dropped(self, total: int) -> None:
        """One item was dropped; ``total`` is how many in all, this one included."""
        if not self._episode:
            self._log.warning(self._warning, total)
        self._episode += 1

    def drained(self) -> None:
        """The reader emptied the queue: the episode, if any, is over."""
        if self._episode:
            episode, self._episode = self._episode, 0
            self._log.info(self._caught_up, episode)
