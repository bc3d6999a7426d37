"""The current session of a task (contextvars), and a logging filter that shows it."""

from __future__ import annotations

import logging
import uuid
from contextvars import ContextVar

__all__ = ["SessionIdLogFilter", "current_session_id"]

_current: ContextVar[uuid.UUID | None] = ContextVar("asyncsession_current", default=None)


def current_session_id() -> uuid.UUID | None:
    """The id bound by ``SessionManager.bind()`` in this task (or a parent), else None."""
    return _current.get()


class SessionIdLogFilter(logging.Filter):
    """Adds ``record.session_id`` (the current session id, or ``"-"``) to log records.

    ``handler.addFilter(SessionIdLogFilter())`` and use ``%(session_id)s`` in the format.
    A record that already has one (``logger.info(..., extra={"session_id": sid})``)
    keeps it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "session_id"):
            current = _current.get()
            record.session_id = str(current) if current is not None else "-"
        return True
