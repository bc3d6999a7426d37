"""A bounded memory of sessions passed over for now, so each is warned about once."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterable

__all__ = ["Notes"]


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
