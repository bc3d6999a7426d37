"""Release-health reporting: what happened to each session when it ended.

A *reporter* receives a :class:`SessionReport` for every session that ends (closed with a
status, or expired). Pass reporters to ``SessionManager(..., reporters=[...])``; they run
in the manager's task group, so a reporter that raises or is slow never delays or breaks
the manager (errors are logged; each call is bounded by ``reporter_timeout``).

:func:`aggregate` turns reports (or stored sessions) into per-period release-health
figures like crash-reporting SDKs show: sessions started, ended per status, with errors,
and the crash-free rate.
"""

from __future__ import annotations

import atexit
import logging
import os
import stat
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol, runtime_checkable

import anyio
import anyio.lowlevel
import attrs
import orjson

from ._clock import utc
from ._exceptions import CorruptSessionError, InvalidConfiguration, SessionError, kind_of, shown
from ._json import freeze_state
from ._loops import set_soon
from ._models import Session, SessionStatus, parse_status, validate_owner

__all__ = [
    "HealthBucket",
    "JsonLinesReporter",
    "LoggingReporter",
    "Reporter",
    "SessionReport",
    "aggregate",
    "read_reports",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_WRITER_IDLE_SECONDS = 10.0  # a JsonLinesReporter's writer thread ends after this long idle
_EXIT_WRITE_SECONDS = 5.0  # how long the interpreter's exit waits for lines queued or being written
#: Permissions of a new report file (less the umask): owner only, as the stores' files,
#: since its lines hold owners and session ids. A file that exists keeps its own.
_REPORT_FILE_MODE = 0o600
#: How a report file is opened: appended to, created if need be; O_BINARY on Windows.
_REPORT_FILE_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)

logger = logging.getLogger(__name__)


def _report_id(value: uuid.UUID) -> uuid.UUID:
    if not isinstance(value, uuid.UUID):
        raise InvalidConfiguration(
            f"session_id must be a uuid.UUID; got {kind_of(value)} (not shown). Convert a "
            "UUID's text with uuid.UUID(text)."
        )
    return value


def _report_time(value: datetime) -> datetime:
    if not isinstance(value, datetime):
        raise InvalidConfiguration(
            f"report times must be timezone-aware datetimes; got {value!r:.60}."
        )
    try:
        return utc(value, "a report time")
    except OverflowError:  # a time at the very edge of datetime's range, off UTC
        raise InvalidConfiguration(f"report time {value!r:.60} is out of range.") from None


def _report_status(value: SessionStatus | str) -> SessionStatus:
    status = parse_status(value)
    if not status.is_terminal:
        raise InvalidConfiguration(
            f"a report is of a session that ended: its status is exited, crashed, abnormal "
            f"or expired, not {status.value}."
        )
    return status


def _report_attributes(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return freeze_state(value, "attributes")


def _report_errors(value: int) -> int:
    if type(value) is not int or value < 0:
        raise InvalidConfiguration(f"errors must be an int >= 0; got {value!r:.60}.")
    return value


@attrs.frozen(slots=True)
class SessionReport:
    """One ended session: status, duration, errors, owner and user-chosen attributes.

    Bad field values raise :class:`~asyncsession.InvalidConfiguration` (times must be
    timezone-aware, and are kept in UTC; ``ended_at`` is not before ``started_at``; the
    status is a terminal one).
    """

    session_id: uuid.UUID = attrs.field(converter=_report_id)
    owner: str | None = attrs.field(converter=validate_owner)
    status: SessionStatus = attrs.field(converter=_report_status)
    started_at: datetime = attrs.field(converter=_report_time)
    ended_at: datetime = attrs.field(converter=_report_time)
    errors: int = attrs.field(converter=_report_errors)
    attributes: Mapping[str, Any] = attrs.field(factory=dict, converter=_report_attributes)

    @ended_at.validator
    def _ends_after_start(self, attribute: object, value: datetime) -> None:
        if value < self.started_at:
            raise InvalidConfiguration(
                f"a report's ended_at ({value.isoformat()}) is before its started_at "
                f"({self.started_at.isoformat()}); a session cannot end before it starts."
            )

    @property
    def duration(self) -> timedelta:
        """How long the session lived."""
        return self.ended_at - self.started_at

    @classmethod
    def from_session(
        cls, session: Session, attributes: Mapping[str, Any] | None = None
    ) -> SessionReport:
        """Report a session that ended (its ``closed_at`` is the end; never before its
        start, which a clock behind the one that created it could make it)."""
        ended = session.closed_at or session.expires_at or session.last_active
        ended = max(ended, session.created_at)
        return cls(
            session.id,
            session.owner,
            session.status,
            session.created_at,
            ended,
            session.errors,
            attributes or {},
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``duration`` in seconds)."""
        return {
            "session_id": str(self.session_id),
            "owner": self.owner,
            "status": self.status.value,
            "started_at": self.started_at.isoformat(),
            "ended_at": self.ended_at.isoformat(),
            "duration": self.duration.total_seconds(),
            "errors": self.errors,
            "attributes": self.attributes,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SessionReport:
        """Inverse of :meth:`to_dict`; :class:`CorruptSessionError` if ``data`` is not one."""
        try:
            if not isinstance(data, Mapping):
                raise InvalidConfiguration(f"expected a JSON object, got {data!r:.60}")
            session_id = data["session_id"]
            if not isinstance(session_id, str):
                raise InvalidConfiguration(f"session_id must be a string, got {session_id!r:.60}")
            return cls(
                uuid.UUID(session_id),
                data.get("owner"),
                data["status"],
                _parse_report_time(data["started_at"]),
                _parse_report_time(data["ended_at"]),
                data["errors"],
                data.get("attributes"),  # absent or null: none; anything else is checked
            )
        except KeyError as exc:
            raise _bad_report(f"invalid session report (missing {exc})") from exc
        except (SessionError, TypeError, ValueError) as exc:
            raise _bad_report(f"invalid session report ({exc})") from exc


def _bad_report(detail: str, where: str = "") -> CorruptSessionError:
    """The error for report data that is not a report (not a stored session's)."""
    fix = (
        "JsonLinesReporter writes one report, a JSON object, per line: fix or remove that line"
        if where
        else "Pass what SessionReport.to_dict() returns"
    )
    return CorruptSessionError(f"{where}{detail}", message=f"{where}{detail}. {fix}.")


def _parse_report_time(value: object) -> datetime:
    if not isinstance(value, str):
        raise InvalidConfiguration(f"report times must be ISO 8601 strings, got {value!r:.60}")
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise InvalidConfiguration(f"report time {value!r:.60} has no UTC offset")
    return parsed


@runtime_checkable
class Reporter(Protocol):
    """Receives a report for each session as it ends."""

    async def report(self, report: SessionReport) -> None:
        """Handle one report (may do I/O)."""
        ...


class _Write:
    """One report line for a :class:`JsonLinesReporter`'s writer thread, its outcome, and
    the way back to its caller (made in the caller's event loop).

    ``abandoned``, ``failure`` and ``finished`` are guarded by the reporter's ``_state``.
    """

    __slots__ = ("abandoned", "ended", "failure", "finished", "line", "token")

    def __init__(self, line: bytes) -> None:
        self.line = line
        self.token = anyio.lowlevel.current_token()  # the caller's event loop
        self.ended = anyio.Event()  # set in that loop once the writer thread is done with it
        self.finished = False  # the writer thread is done with it
        self.abandoned = False  # its caller gave up after the writer thread took it
        self.failure: Exception | None = None


class JsonLinesReporter:
    """Appends each report as one JSON line to ``path`` (off the event loop).

    A file it creates is its owner's only (``0o600``, the umask on top), as the stores'
    files: the lines hold owners and session ids. A file that exists keeps its mode.
    ``path`` is opened again for each line, following a symbolic link there, so a file
    renamed away (log rotation) is followed by a new one. In a directory other users may
    write to (``/tmp``), create the file first and check that it is a file of yours, as
    ``asyncsession demo --reports`` does: another user could put a link or a file of
    theirs at ``path`` until it exists.

    The lines are written, in the order of the ``report()`` calls, by one daemon thread
    per reporter (started when needed, ended after a while without reports). One reporter
    may serve managers on several event loops at once, in several threads, asyncio and
    trio alike: it holds nothing bound to one event loop, and each line is queued for the
    writer thread when ``report()`` is called, so an event loop that is busy or blocked
    holds up only its own reports. Waiting takes no worker thread: the writer thread
    wakes each caller through the caller's own event loop.

    A write whose caller is cancelled (by ``reporter_timeout`` or any cancellation,
    asyncio's own included) is abandoned: the call returns at once, and the line may
    still be added later (whole); if that write fails, the failure is logged as a warning
    naming the file. Writes never interleave: a later report waits until an abandoned
    write has finished, and that wait is bounded by its caller's timeout too (a report
    that gave up while waiting is not written). So a write blocked for good (a hung
    network file system) never hangs the manager's exit, and it holds only the writer
    thread; the reports after it time out.

    At interpreter exit, lines still queued or being written are waited for, up to
    5 seconds in all for every reporter (an INFO log says so); one still unwritten then is
    logged as lost and the process ends anyway. A process ended by :func:`os._exit` or a
    signal does not wait: its lines still queued or being written are lost.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._start_fresh()
        _live_reporters.add(self)

    def _start_fresh(self) -> None:
        """New state and no writer thread: at creation, and in a forked child (which has
        none of the parent's threads, and maybe a lock one of them held)."""
        # Guards the queue, _in_flight and _writer (and each _Write's flags); notified
        # when a line is queued or written. A threading lock, not an event loop's: callers
        # may be on several loops.
        self._state = threading.Condition()
        # Lines queued for the writer thread, in the order of the report() calls; a
        # caller that gives up takes its line out, so there are never more than callers
        # waiting.
        self._queued: OrderedDict[_Write, None] = OrderedDict()
        self._in_flight: _Write | None = None  # taken by the writer thread, not yet written
        self._writer: threading.Thread | None = None
        # Last: a thread that sees this pid (unlocked, in report()) sees the state above.
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"JsonLinesReporter({self.path!r})"

    def _next_line(self) -> _Write | None:
        """The writer thread's next line, or None after a while without one (the thread
        ends then)."""
        idle_until = time.monotonic() + _WRITER_IDLE_SECONDS
        with self._state:
            while not self._queued:
                left = idle_until - time.monotonic()
                if left <= 0:
                    self._writer = None
                    return None
                self._state.wait(left)
            write, _ = self._queued.popitem(last=False)
            self._in_flight = write
            return write

    def _write_lines(self) -> None:
        """The writer thread: writes the queued lines, one at a time."""
        while (write := self._next_line()) is not None:
            failure: Exception | None = None
            try:
                _append_line(self.path, write.line)
            except Exception as exc:
                failure = exc
            finally:
                with self._state:
                    write.failure = failure
                    write.finished = True
                    abandoned = write.abandoned
                    self._in_flight = None
                    self._state.notify_all()  # for the exit's wait
                if abandoned or not set_soon(write.token, write.ended):
                    self._lost(failure)  # nobody else will hear of it
            del write, failure

    def _lost(self, failure: Exception | None) -> None:
        """Log the failure of a write whose caller left."""
        if failure is not None:
            logger.warning(
                "an abandoned report write to %s failed; that report is lost",
                self.path,
                exc_info=failure,
            )

    def _queue(self, write: _Write) -> None:
        """Queue ``write`` for the writer thread (started if there is none)."""
        with self._state:
            if self._writer is None:
                writer = threading.Thread(
                    target=self._write_lines, name=f"{self!r} writer", daemon=True
                )
                writer.start()
                self._writer = writer
            self._queued[write] = None
            self._state.notify_all()

    def _give_up(self, write: _Write) -> None:
        """Its caller leaves without its outcome (cancelled, by whatever): a line still
        queued is taken out (not written), one being written is abandoned to the writer
        thread, and the failure of one that ended meanwhile is logged."""
        with self._state:
            if write in self._queued:
                del self._queued[write]
                self._state.notify_all()  # for the exit's wait
                return
            if not write.finished:
                write.abandoned = True  # the writer thread logs its failure
                return
            failure = write.failure
        self._lost(failure)

    async def report(self, report: SessionReport) -> None:
        """Append ``report`` as a JSON line."""
        write = _Write(orjson.dumps(report.to_dict()) + b"\n")
        if self._pid != os.getpid():  # forked (e.g. gunicorn --preload) since last used
            with _fork_lock:  # two threads' first reports there start afresh once
                if self._pid != os.getpid():
                    self._start_fresh()
        self._queue(write)  # now, not when this event loop runs again: the order of calls
        try:
            await write.ended.wait()
        except BaseException:
            self._give_up(write)
            raise
        if write.failure is not None:
            raise write.failure

    def _finish_writes(self, deadline: float) -> None:
        """At exit: wait until ``deadline`` (``time.monotonic()``) for the lines queued or
        being written."""
        if self._pid != os.getpid():  # a forked child's copy: those lines are the parent's
            return
        with self._state:
            if self._in_flight is None and not self._queued:
                return
        logger.info(
            "waiting up to %.1fs for report lines still queued or being written to %s",
            max(0.0, deadline - time.monotonic()),
            self.path,
        )
        with self._state:
            while self._in_flight is not None or self._queued:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._state.wait(left)
            lost = (self._in_flight is not None) + len(self._queued)
        if lost:
            logger.warning(
                "%d report line(s) to %s were still unwritten at exit; those reports are lost",
                lost,
                self.path,
            )


def _append_line(path: str, line: bytes) -> None:
    """Append ``line`` to ``path``, on a line of its own: after a write that failed part
    way (a full disk) or a process killed while writing, a regular file ends in a torn
    line, which would otherwise swallow this one too."""
    fd = os.open(path, _REPORT_FILE_FLAGS, _REPORT_FILE_MODE)
    with open(fd, "ab") as handle:
        if _ends_torn(path, os.fstat(fd)):
            line = b"\n" + line
        handle.write(line)


def _ends_torn(path: str, written: os.stat_result) -> bool:
    """Whether the regular file ``written`` (open at ``path``) ends in a torn line. Read
    through a second descriptor (the first is write-only: a FIFO opened for reading too
    would never wait for its reader), if ``path`` is still that file and readable."""
    if not stat.S_ISREG(written.st_mode) or not written.st_size:
        return False
    try:  # non-blocking: a FIFO renamed to path meanwhile must not wait for a writer
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError:  # not readable by us (a write-only file), or renamed away meanwhile
        return False
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (written.st_dev, written.st_ino) or not now.st_size:
            return False
        os.lseek(fd, now.st_size - 1, os.SEEK_SET)
        return os.read(fd, 1) != b"\n"
    finally:
        os.close(fd)


#: Reporters whose lines still queued or being written the interpreter's exit waits for
#: (weakly held).
_live_reporters: weakref.WeakSet[JsonLinesReporter] = weakref.WeakSet()

#: Held by a report() that starts its reporter afresh in a forked child.
_fork_lock = threading.Lock()


def _new_fork_lock() -> None:
    """In a forked child: a new lock (another thread of the parent may have held it)."""
    global _fork_lock
    _fork_lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_new_fork_lock)


@atexit.register
def _finish_writes_at_exit() -> None:
    """Let the lines still queued or being written reach their files, within a bound."""
    deadline = time.monotonic() + _EXIT_WRITE_SECONDS
    for reporter in list(_live_reporters):
        reporter._finish_writes(deadline)


def _reporter_logger(value: object) -> logging.Logger | logging.LoggerAdapter[Any]:
    """``LoggingReporter``'s ``logger``: a Logger or LoggerAdapter, a logger's name, or
    None (``asyncsession.reporting``)."""
    if value is None:
        return logger
    if isinstance(value, str):
        return logging.getLogger(value)
    if isinstance(value, (logging.Logger, logging.LoggerAdapter)):
        return value
    raise InvalidConfiguration(
        f"LoggingReporter(logger=...) takes a logging.Logger (or LoggerAdapter), a logger's "
        f"name such as 'myapp.health', or None for 'asyncsession.reporting'; got "
        f"{kind_of(value)}. The level is the second argument: "
        f"LoggingReporter(logger, level=logging.INFO)."
    )


def _reporter_level(value: object) -> int:
    """``LoggingReporter``'s ``level``: an int >= 0 or a level's name ("INFO", "debug")."""
    if isinstance(value, str):
        for name in (value, value.upper()):
            number = logging.getLevelName(name)  # the number of a registered name
            if type(number) is int:
                return number
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return int(value)
    shown = repr(value)[:60] if isinstance(value, (str, int)) else kind_of(value)
    raise InvalidConfiguration(
        f"LoggingReporter(level=...) takes an int level such as logging.INFO (20) or a "
        f"level's name such as 'INFO' or 'DEBUG'; got {shown}."
    )


class LoggingReporter:
    """Logs each report (logger ``asyncsession.reporting`` at INFO by default).

    ``logger`` is a :class:`logging.Logger` or :class:`logging.LoggerAdapter`, a logger's
    name (``"myapp.health"``, for ``logging.getLogger(name)``), or None for
    ``asyncsession.reporting``. ``level`` is an int level (``logging.INFO``) or a level's
    name (``"INFO"``, ``"debug"``). Anything else raises
    :class:`~asyncsession.InvalidConfiguration` here, not at each report. Both are
    read-only afterwards (:attr:`logger` is the Logger itself, :attr:`level` the int).
    """

    def __init__(
        self,
        logger: logging.Logger | logging.LoggerAdapter[Any] | str | None = None,
        level: int | str = logging.INFO,
    ) -> None:
        self._logger = _reporter_logger(logger)
        self._level = _reporter_level(level)

    @property
    def logger(self) -> logging.Logger | logging.LoggerAdapter[Any]:
        """Where the reports are logged."""
        return self._logger

    @property
    def level(self) -> int:
        """The level they are logged at."""
        return self._level

    def __repr__(self) -> str:
        name = logging.getLevelName(self._level)
        level = repr(name) if not name.startswith("Level ") else str(self._level)
        return f"LoggingReporter(logger={self._logger.name!r}, level={level})"

    async def report(self, report: SessionReport) -> None:
        """Log one line: id, status, duration, errors, owner, attributes."""
        self._logger.log(
            self._level,
            "session %s ended %s after %.3fs with %s errors (owner=%s %s)",
            report.session_id,
            report.status.value,
            report.duration.total_seconds(),
            report.errors,
            report.owner,
            dict(report.attributes),
        )


def read_reports(
    path: str | os.PathLike[str],
    *,
    on_bad_line: Callable[[CorruptSessionError], object] | None = None,
) -> Iterator[SessionReport]:
    """Read the reports a :class:`JsonLinesReporter` wrote (blank lines skipped).

    A line that is not a valid report raises :class:`CorruptSessionError` naming the file
    and the line number; with ``on_bad_line``, that error is passed to it instead and the
    line skipped (a line torn by a full disk or a killed process leaves the rest readable).
    """
    name = os.fspath(path)
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                try:
                    data = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise _bad_report(f"not JSON ({exc})", f"{name} line {number}: ") from exc
                try:
                    report = SessionReport.from_dict(data)
                except CorruptSessionError as exc:
                    raise _bad_report(exc.detail, f"{name} line {number}: ") from exc
            except CorruptSessionError as exc:
                if on_bad_line is None:
                    raise
                on_bad_line(exc)
                continue
            yield report


@attrs.frozen(slots=True)
class HealthBucket:
    """Release health of one period starting at ``start``.

    ``started``: sessions created in the period; ``ended``: sessions that ended in it, per
    status; ``errored``: ended sessions that recorded at least one error;
    ``crash_free_rate``: share of ended sessions that did not crash (None if none ended).
    """

    start: datetime
    started: int
    ended: Mapping[SessionStatus, int]
    errored: int

    @property
    def ended_total(self) -> int:
        """All sessions that ended in the period."""
        return sum(self.ended.values())

    @property
    def crash_free_rate(self) -> float | None:
        """1 - crashed / ended, or None when nothing ended."""
        total = self.ended_total
        if total == 0:
            return None
        return 1 - self.ended.get(SessionStatus.CRASHED, 0) / total


def _floor(when: datetime, bucket: timedelta) -> datetime:
    steps = (when - _EPOCH) // bucket
    try:
        return _EPOCH + steps * bucket
    except OverflowError:  # the period would start before year 1
        raise InvalidConfiguration(
            f"{when.isoformat()} is too close to the limits of datetime for a bucket of "
            f"{bucket}; use a shorter bucket."
        ) from None


def _bucket(value: object) -> timedelta:
    """``aggregate()``'s ``bucket`` as a positive timedelta."""
    period = None
    if isinstance(value, timedelta):
        period = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            period = timedelta(seconds=value)
        except (OverflowError, ValueError):  # inf, nan, beyond timedelta's range
            period = None
    if period is None or period <= timedelta(0):
        raise InvalidConfiguration(
            f"bucket is the length of each period: a positive number of seconds or a "
            f"positive timedelta (e.g. 3600 or timedelta(hours=1)); got {shown(value)}."
        )
    return period


def aggregate(
    items: Iterable[Session | SessionReport],
    *,
    bucket: float | timedelta = timedelta(hours=1),
    now: datetime | None = None,
) -> list[HealthBucket]:
    """Per-period release health from reports or stored sessions, oldest period first.

    ``bucket`` is the period: seconds or a :class:`~datetime.timedelta`. Open sessions
    count as started only; terminal ones also as ended at ``closed_at``. With ``now``
    (a timezone-aware datetime), an open session that has expired by then (cleanup has
    not removed it yet) counts as EXPIRED at its ``expires_at``, as its report will.
    """
    # Any length: a period past datetime's range is refused in _floor, with the dates
    # that overflow.
    period = _bucket(bucket)
    if now is not None:
        now = utc(now, "aggregate()'s now")
    started: dict[datetime, int] = {}
    ended: dict[datetime, dict[SessionStatus, int]] = {}
    errored: dict[datetime, int] = {}
    for item in items:
        report: SessionReport | None
        if isinstance(item, SessionReport):
            report = item
            created = item.started_at
        elif isinstance(item, Session):
            created = item.created_at
            if item.status.is_terminal:
                report = SessionReport.from_session(item)
            elif now is not None and item.expires_at is not None and item.expires_at <= now:
                report = SessionReport(
                    item.id,
                    item.owner,
                    SessionStatus.EXPIRED,
                    item.created_at,
                    item.expires_at,
                    item.errors,
                )
            else:
                report = None
        else:
            raise InvalidConfiguration(
                f"aggregate() takes Session and SessionReport objects; got {item!r:.60}."
            )
        key = _floor(created, period)
        started[key] = started.get(key, 0) + 1
        if report is not None:
            end_key = _floor(report.ended_at, period)
            per_status = ended.setdefault(end_key, {})
            per_status[report.status] = per_status.get(report.status, 0) + 1
            if report.errors:
                errored[end_key] = errored.get(end_key, 0) + 1
    keys = sorted(set(started) | set(ended))
    return [
        HealthBucket(k, started.get(k, 0), dict(ended.get(k, {})), errored.get(k, 0)) for k in keys
    ]
