"""The ``asyncsession`` command line: demo, inspection and maintenance of a store.

Built on click (commands, options) and rich (tables, progress); both come with the
``cli`` extra. Uses the public API of :mod:`asyncsession`, and the manager's test for
a rotation's retired document. Expected failures (unknown id, bad store URL,
unreachable server, corrupt document, a SQLite file or file store that does not exist
where a command would only read or change sessions) print one line to stderr and exit
with status 1 (or 2 for usage errors and values the library refuses), without a
traceback. Ctrl-C exits 130; a closed output (``| head``) ends a command quietly with 141.
"""

from __future__ import annotations

import bisect
import contextlib
import enum
import errno
import functools
import importlib.util
import logging
import os
import random
import re
import select
import shlex
import signal
import stat
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import FrameType
from typing import IO, Any, Final, NoReturn, TypeVar, cast

import anyio
import anyio.lowlevel
import attrs
import click
import orjson
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from . import (
    CURRENT_VERSION,
    CorruptSessionError,
    EventKind,
    FileRepository,
    InvalidCursor,
    InvalidOwner,
    InvalidUpdate,
    RedisRepository,
    SerializationError,
    Session,
    SessionConflict,
    SessionError,
    SessionManager,
    SessionNotFound,
    SessionQuery,
    SessionRepository,
    SessionStatus,
    SQLiteRepository,
    StorageError,
    Subscription,
    ValidationError,
    dumps,
    loads,
    thaw,
)
from ._exceptions import _plural, tilde_note
from ._manager import _is_retired
from ._urls import STORE_URL_FORMS, repository_from_url, shown_url
from .abc import EventTransport, _collecting_skipped
from .reporting import _REPORT_FILE_MODE, JsonLinesReporter, Reporter, aggregate, read_reports
from .stores.sqlite import SCHEMA_VERSION, _BusyAtOpen, _OlderLayout

__all__ = ["CLIError", "cli", "open_store", "run"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_STORE = "sqlite:///asyncsession.db"
STORE_FORMS = STORE_URL_FORMS
STATUSES = [s.value for s in SessionStatus]
CLOSE_STATUSES = ["exited", "crashed", "abnormal"]
PAGE = 500


def _width(stream: IO[str]) -> int | None:
    """Let tables be wide when the output is a file or pipe (rich assumes 80 columns)."""
    if stream.isatty() or "COLUMNS" in os.environ:
        return None
    return 200


#: The exit status of a command whose output's reader went away (``| head``): 128 +
#: SIGPIPE, as shells report for the programs the signal ends.
OUTPUT_CLOSED: Final = 141


class _OutputClosed(Exception):
    """The reader of the command's output went away (``| head``): end quietly."""


class _Console(Console):
    """A console whose closed output ends the command with :class:`_OutputClosed`
    (rich's own handler exits with status 1)."""

    def on_broken_pipe(self) -> None:
        """Print nothing more; end the command (:func:`run` returns OUTPUT_CLOSED)."""
        self.quiet = True
        raise _OutputClosed


def _write_all(output: IO[bytes], data: bytes) -> None:
    """Write all of ``data`` to ``output``.

    A large write into a pipe whose reader goes away (``| head``) is interrupted by
    SIGPIPE after part of it: BufferedWriter.write returns how much it wrote, and
    TextIOWrapper drops the rest without an error (the command would end with status 0,
    its output cut short). Written again, the rest raises BrokenPipeError.

    An output in non-blocking mode (a pipe another program set O_NONBLOCK on) that is
    full takes none of it (a raw file returns None) or part of it (BlockingIOError): this
    waits until it can be written (:func:`_wait_writable`), then goes on.
    """
    view = memoryview(data)
    while view:
        try:
            # IO.write is typed int, but a raw file in non-blocking mode returns None
            written: int | None = output.write(view)
        except BlockingIOError as exc:  # a buffered output took (buffered) this much
            view = view[exc.characters_written :]
            _wait_writable(output)
            continue
        if written is None:  # a raw output in non-blocking mode took nothing
            _wait_writable(output)
        elif written == 0:
            raise OSError(errno.EIO, "the output took none of the data written to it")
        else:
            view = view[written:]


def _flush(stream: IO[Any]) -> None:
    """Flush ``stream``, waiting while an output in non-blocking mode is full."""
    while True:
        try:
            stream.flush()
            return
        except BlockingIOError:  # what was not written stays in the buffer, for the next
            _wait_writable(stream)


def _wait_writable(stream: IO[Any]) -> None:
    """Wait until ``stream``'s file descriptor can be written (a short pause if it has
    none, or the platform cannot wait on it)."""
    try:
        select.select([], [stream.fileno()], [])
    except (OSError, ValueError):
        time.sleep(0.01)


class _WholeWrites:
    """``sys.stdout`` or ``sys.stderr`` (looked up at each write, as rich does), each
    write made whole (:func:`_write_all`), for a rich console. A failure but a closed
    pipe is a :class:`CLIError` (``cannot write stdout: No space left on device.``)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, name: str) -> Any:
        return getattr(getattr(sys, self._name), name)

    def write(self, text: str) -> int:
        """Write ``text`` whole; BrokenPipeError if the reader went away."""
        stream = getattr(sys, self._name)
        buffer = getattr(stream, "buffer", None)
        try:
            if buffer is None or os.linesep != "\n":  # an embedding program's text stream
                return int(stream.write(text))
            _flush(stream)  # what was written through the text layer goes first
            errors = stream.errors or "strict"
            # a terminal that cannot show a character (PYTHONIOENCODING=ascii) gets its
            # escape, not a traceback after the command did its work
            data = text.encode(
                stream.encoding or "utf-8", "backslashreplace" if errors == "strict" else errors
            )
            _write_all(buffer, data)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _os_failure(f"write {self._name}", exc) from exc
        return len(text)

    def flush(self) -> None:
        """Flush the stream; BrokenPipeError if the reader went away."""
        try:
            _flush(getattr(sys, self._name))
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _os_failure(f"write {self._name}", exc) from exc


def _console(name: str) -> _Console:
    stream = getattr(sys, name)
    return _Console(file=cast(IO[str], _WholeWrites(name)), highlight=False, width=_width(stream))


#: The consoles of stdout and stderr, new for each :func:`run` (one that found its
#: output closed stays quiet).
out = _console("stdout")
err = _console("stderr")

#: Control characters but tab and newline (C0, DEL, C1), and the bidirectional-text
#: controls (marks, embeddings, overrides, isolates: they reorder what a terminal shows
#: after them, so a stored value could disguise itself or the columns next to it):
#: shown as escapes, not sent.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _bumped(session: Session, revision: int) -> Session:
    """``session`` at the revision after ``revision`` (a save's next revision):
    :class:`LimitExceeded` past the last revision a session can have."""
    return attrs.evolve(session, revision=SessionRepository._next_revision(session.id, revision))


def _plain(value: object, style: str = "") -> Text:
    """``value`` as literal text for rich: never markup (``[red]``, ``[/]``) or emoji
    codes (``:smile:``), and control characters shown as escapes (``\\x1b``), so a stored
    owner, name or message, or a store URL, is printed as it is and cannot restyle the
    output, crash it (rich's MarkupError) or drive the terminal."""
    return Text(_CONTROL.sub(lambda m: repr(m.group())[1:-1], str(value)), style=style)


class CLIError(Exception):
    """An expected failure: one line on stderr, then exit with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


# -- stores -------------------------------------------------------------------------------


def open_store(url: str) -> SessionRepository:
    """Build the (unopened) repository a store URL names; :class:`CLIError` if invalid."""
    try:
        return repository_from_url(url)
    except ImportError as exc:
        raise CLIError(
            "Redis stores need the coredis client; install it with "
            "`pip install 'asyncsession[redis]'`.",
            exit_code=2,
        ) from exc
    except SessionError as exc:
        raise CLIError(exc.message, exit_code=2) from exc


def _check_backend(backend: str) -> None:
    if backend == "trio" and importlib.util.find_spec("trio") is None:
        raise CLIError(
            "--backend trio needs trio; install it with `pip install 'asyncsession[trio]'`.",
            exit_code=2,
        )


_CREATE_ONE = (
    "check --store / ASYNCSESSION_STORE, or create one with `asyncsession demo` or "
    "`asyncsession import`."
)


def _absent(path: Path) -> bool:
    """Whether nothing is at ``path`` (a path that cannot be checked, for want of
    permission say, is left to the store, which says what is wrong)."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


#: What ``stats --reports FILE`` says of a store that does not exist.
_REPORTS_ALONE = (
    "to aggregate the reports without a store, add `--store memory://`; else check "
    "--store / ASYNCSESSION_STORE."
)


def _in_one_process(url: str, repository: SessionRepository | None = None) -> bool:
    """Whether the store ``url`` names (``repository``, if built already) lives in this
    process only: ``memory://``, or an in-memory SQLite database: any URL whose path
    :class:`SQLiteRepository` takes as ``:memory:`` (``sqlite:///:memory:``,
    percent-encoded, ``sqlite:///./:memory:``...)."""
    scheme = url.partition("://")[0].lower()
    if scheme != "sqlite":
        return scheme == "memory"
    if repository is None:
        repository = repository_from_url(url)
    return isinstance(repository, SQLiteRepository) and os.fspath(repository.path) == ":memory:"


def _check_exists(repository: SessionRepository, advice: str = _CREATE_ONE) -> None:
    """Refuse a SQLite file or a file store's directory that does not exist: opening it
    would create an empty store (a typo in the path would list, export or purge nothing,
    and leave a stray database or directory behind). ``advice`` ends the message."""
    if isinstance(repository, SQLiteRepository):
        if _absent(repository.path):
            raise CLIError(
                f"no SQLite store at {os.path.abspath(repository.path)}"
                f"{tilde_note(repository.path)}; {advice}"
            )
    elif isinstance(repository, FileRepository):
        root = repository.directory
        if _absent(root):
            problem = "the directory does not exist"
        elif root.is_dir() and _absent(root / "sessions"):
            problem = "the directory holds no sessions/ folder"
        else:
            return
        raise CLIError(
            f"no file store at {os.path.abspath(root)} ({problem}){tilde_note(root)}; {advice}"
        )


def _store(
    url: str,
    *,
    creates: bool = False,
    writes: bool = False,
    memory: bool = False,
    advice: str = _CREATE_ONE,
) -> SessionRepository:
    """The unopened store ``url`` names, for this command; :class:`CLIError` if refused.

    A SQLite store is opened without upgrading an older layout unless the command
    ``creates`` or ``writes`` sessions: the release that wrote the file refuses it once
    upgraded, and it may still be serving it (the open fails with ``_OlderLayout``,
    which :func:`_expected` reports).

    Only the commands that create sessions (``creates``: demo, import) may create a
    store; the others refuse a SQLite file or file store that does not exist, before
    anything is created (:func:`_check_exists`, whose message ends with ``advice``).
    ``memory://`` and ``sqlite:///:memory:`` are refused (a usage error) unless
    ``memory``: each command runs in a process of its own, so any other command would
    only see a new, empty store that vanishes with it.
    """
    repository = open_store(url)
    if not memory and _in_one_process(url, repository):
        context = click.get_current_context(silent=True)
        command = f"`{context.info_name}`" if context is not None else "this command"
        raise CLIError(
            f"--store {shown_url(url)} lives in one process only: {command} would see a "
            "new, empty store that vanishes when it ends. Name the store your application "
            "uses (sqlite:///..., file://..., redis://...); memory:// and "
            "sqlite:///:memory: suit only `asyncsession demo`.",
            exit_code=2,
        )
    if not creates and not _in_one_process(url, repository):  # nothing on disk to look for
        _check_exists(repository, advice)
    if isinstance(repository, SQLiteRepository) and not (creates or writes):
        repository._upgrades = False  # unopened, and this command's own
    return repository


def _with_store(
    url: str,
    backend: str,
    fn: Callable[[SessionRepository], Awaitable[T]],
    *,
    creates: bool = False,
    writes: bool = False,
    memory: bool = False,
    advice: str = _CREATE_ONE,
) -> T:
    """Open the store at ``url`` on ``backend``, run ``fn(store)``, close the store.

    ``creates``, ``writes``, ``memory`` and ``advice``: see :func:`_store`.
    """
    _check_backend(backend)
    store = _store(url, creates=creates, writes=writes, memory=memory, advice=advice)
    return _on_store(store, backend, fn)


def _on_store(
    repository: SessionRepository, backend: str, fn: Callable[[SessionRepository], Awaitable[T]]
) -> T:
    """Open ``repository`` on ``backend``, run ``fn(repository)``, close it.

    Ctrl-C cancels the command (see :class:`_CtrlC`) and then raises KeyboardInterrupt.
    """

    async def main() -> T:
        async with repository:
            return await fn(repository)

    ctrl_c = _ctrl_c or _CtrlC()  # run() installs one; a direct cli.main() call does not
    result = anyio.run(ctrl_c.cancels, main, backend=backend)
    if result is _CUT_SHORT:
        raise KeyboardInterrupt
    return cast(T, result)


class _CutShort:
    """What :meth:`_CtrlC.cancels` returns for a command Ctrl-C cancelled."""


_CUT_SHORT: Final = _CutShort()


class _CtrlC:
    """Ctrl-C for a run of the command line (:func:`run` installs it): the first one
    cancels the command under way, a second one ends the process at once.

    Left to the event loop, Ctrl-C raises KeyboardInterrupt wherever the program
    happens to be (trio) or cancels the main task (asyncio): raised inside the Redis
    client's connection setup it broke the client's task group ("Nursery stack
    corrupted") or came out as a connection error. A cancellation unwinds every
    library cleanly, lets a write the manager already sent finish, and closes the
    store; the caller raises KeyboardInterrupt after the event loop has ended (raised
    from the main task, asyncio would log it as never retrieved). Between commands (no
    event loop running) the first Ctrl-C raises KeyboardInterrupt, as Python's own
    handler does.

    The handler is a Python-level one: it runs even while the event-loop thread is
    blocked in a system call (the call is interrupted, the handler runs, the call
    resumes), so the second Ctrl-C stops a command the cancellation cannot reach
    (blocked writing to a pipe nobody reads, say). It ends the process there and then:
    a KeyboardInterrupt raised at a random point of an event loop or a library left
    tracebacks, "never awaited" warnings, a TrioInternalError or a hang. Nothing is
    lost that a crash would not lose: every store's acknowledged writes are durable.
    Outside the main thread, on Windows, and when SIGINT is ignored (``cmd &`` in a
    script), nothing is installed.
    """

    def __init__(self) -> None:
        self.pressed = False
        self._cancel: Callable[[], object] | None = None  # the command under way's
        self._previous: Any = None
        self._installed = False

    def install(self) -> None:
        """Take SIGINT for this run."""
        if sys.platform == "win32" or threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGINT)
        if previous is signal.SIG_IGN:
            return
        self._previous = previous
        signal.signal(signal.SIGINT, self._on_sigint)
        self._installed = True

    def uninstall(self) -> None:
        """Give SIGINT back, unless Ctrl-C was pressed: the program is then on its way
        out, and another Ctrl-C on that way still ends it with one line."""
        if self._installed and not self.pressed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.pressed:
            _exit_interrupted()
        self.pressed = True
        cancel = self._cancel
        if cancel is None:  # no command under way
            raise KeyboardInterrupt
        with contextlib.suppress(RuntimeError):  # its event loop has just ended
            cancel()

    async def cancels(self, main: Callable[[], Awaitable[T]]) -> T | _CutShort:
        """``main()``'s result, or :data:`_CUT_SHORT` if Ctrl-C cancelled it."""
        token = anyio.lowlevel.current_token()
        with anyio.CancelScope() as scope:
            self._cancel = functools.partial(
                token.backend_class.run_sync_soon, scope.cancel, (), token.native_token
            )
            try:
                return await main()
            except BaseException:  # whatever the cancellation came out as
                if self.pressed:
                    return _CUT_SHORT
                raise
            finally:
                self._cancel = None
        return _CUT_SHORT  # the scope ended main()'s cancellation


_ctrl_c: _CtrlC | None = None  # the one run() installed


def _parse_id(value: str, url: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise CLIError(f"no session {value!r} in {shown_url(url)} (ids are UUIDs).") from None


def _missing(value: object, url: str) -> CLIError:
    return CLIError(f"no session {value} in {shown_url(url)}.")


async def _not_live(repository: SessionRepository, sid: uuid.UUID, url: str) -> CLIError:
    """The error of a command that found no live session ``sid``: "no session", unless
    a file store quarantined its damaged document (kept for repair, and what an erasure
    must remove), or it is stored but expired (cleanup has not removed it yet)."""
    if isinstance(repository, FileRepository):
        set_aside = [path for qid, path in await repository.quarantined() if qid == sid]
        if set_aside:
            return CLIError(
                f"session {sid} in {shown_url(url)} cannot be read: its damaged document "
                f"was moved to {set_aside[-1]}. Repair it and move it back into sessions/ "
                "(without its checksum field), or delete that file; `stats` counts such "
                "documents."
            )
    try:
        stored = await repository.get(sid, last_messages=0)
    except SessionError:
        stored = None
    if stored is not None and stored.expires_at is not None and stored.is_expired(_now()):
        return CLIError(
            f"session {sid} in {shown_url(url)} expired at {_iso(stored.expires_at)}: it is "
            f"no longer live, so it cannot be changed. `asyncsession delete {sid}` deletes "
            "it now; `asyncsession purge` removes every expired session."
        )
    return _missing(sid, url)


async def _all_ids(repository: SessionRepository, owner: str | None = None) -> list[uuid.UUID]:
    """Every stored session id (expired and closed ones included; of ``owner`` only if
    given), newest first."""
    return [session.id async for session in _all_sessions(repository, owner)]


async def _all_sessions(
    repository: SessionRepository, owner: str | None = None
) -> AsyncIterator[Session]:
    cursor: str | None = None
    while True:
        page = await repository.list(SessionQuery(owner=owner, limit=PAGE, cursor=cursor))
        for session in page.items:
            yield session
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


#: How many of its events a command that changes sessions keeps for announcing (one
#: per session changed; beyond, the subscription drops them with a warning).
_ANNOUNCED_EVENTS: Final = 100_000


class _Announcer:
    """Tells the applications on a store that shares events between processes (Redis)
    what a command did, as their managers with ``share_events=True`` tell each other:
    they hear each closed, expired or deleted session as a remote event.

    The command publishes the events itself, each before it ends, instead of giving
    its manager ``share_events=True``: such a manager first subscribes to the store's
    events (a connection of its own, and the other processes' events, which a command
    has no use for), and when it leaves it waits at most 5 s for its queued events to
    go out, dropping the rest (a purge of many sessions may take longer); ``delete``
    uses no manager at all. Publishing to a channel nobody listens on costs one round
    trip. A failure is a warning: the change is made; only the announcement is lost.
    """

    def __init__(self, store: EventTransport) -> None:
        self._store = store
        self._origin = f"asyncsession-cli-{uuid.uuid4().hex}"
        self._failed = False

    async def announce(
        self, kind: EventKind, session_id: uuid.UUID, at: datetime, revision: int | None
    ) -> None:
        """Publish one event (nothing more after a failure)."""
        if self._failed:
            return
        try:
            await self._store.publish_event(
                kind.value, session_id, at=at, revision=revision, origin=self._origin
            )
        except StorageError as exc:
            self._failed = True
            logger.warning(
                "the change is made, but running applications could not be told of it "
                "(their managers with share_events=True): %s",
                exc,
            )

    async def announce_all(self, events: Subscription) -> None:
        """Publish each event of ``events`` until it ends (its manager exits)."""
        async for event in events:
            if not event.remote:
                revision = None if event.session is None else event.session.revision
                await self.announce(event.kind, event.session_id, event.at, revision)


async def _with_manager(
    repository: SessionRepository, act: Callable[[SessionManager], Awaitable[T]]
) -> T:
    """Run ``act`` with a manager on ``repository`` (no cleanup task, and no idle or age
    policy of its own: the stored deadlines decide what has expired, as the application
    set them); on a store that shares events between processes, announce what it closed,
    expired or deleted (:class:`_Announcer`)."""
    if not isinstance(repository, EventTransport):
        async with SessionManager(repository, idle_timeout=None, cleanup_interval=None) as manager:
            return await act(manager)
    announcer = _Announcer(repository)
    async with (
        anyio.create_task_group() as tg,
        SessionManager(repository, idle_timeout=None, cleanup_interval=None) as manager,
    ):
        # the subscription ends when the manager exits (first), after the events it
        # holds: the task group then waits until every one is published
        events = manager.subscribe(buffer=_ANNOUNCED_EVENTS)
        tg.start_soon(announcer.announce_all, events)
        result = await act(manager)
    return result


# -- output -------------------------------------------------------------------------------


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat()


def _when(when: datetime | None) -> str:
    if when is None:
        return "-"
    return when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _summary(session: Session, now: datetime) -> dict[str, Any]:
    return {
        "id": str(session.id),
        "owner": session.owner,
        "name": session.name,
        "status": session.status.value,
        "expired": session.is_expired(now),
        "created_at": _iso(session.created_at),
        "last_active": _iso(session.last_active),
        "closed_at": _iso(session.closed_at),
        "expires_at": _iso(session.expires_at),
        "messages": session.messages.total,
        "errors": session.errors,
        "revision": session.revision,
    }


def _status_text(session: Session, now: datetime) -> str:
    if session.is_expired(now) and not session.status.is_terminal:
        return f"{session.status.value} (expired)"
    return session.status.value


def _print_json(value: Any) -> None:
    text = orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()
    try:
        text.encode(getattr(sys.stdout, "encoding", None) or "utf-8")
    except (UnicodeEncodeError, LookupError):  # an ASCII stdout: JSON's own escapes
        text = _NON_ASCII.sub(_json_escape, text)
    try:
        out.file.write(text + "\n")
        out.file.flush()
    except BrokenPipeError:
        raise _OutputClosed from None


#: Characters JSON text needs escaped on a stdout that cannot encode them (every
#: character beyond ASCII is inside a JSON string in orjson's output).
_NON_ASCII = re.compile("[^\x00-\x7f]")


def _json_escape(match: re.Match[str]) -> str:
    """The JSON escape of one character: backslash, u, four hex digits (two such, a
    surrogate pair, beyond the BMP)."""
    code = ord(match.group())
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def _progress(enabled: bool = True) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=not enabled,
    )


def _now() -> datetime:
    return datetime.now(timezone.utc)


# -- output files -------------------------------------------------------------------------


def _check_output_file(
    path: str, option: str, *, replaced: bool
) -> tuple[str, os.stat_result | None]:
    """Refuse (usage error, exit 2) an output file that cannot be written, before any work.

    Its directory must exist; a file that exists must be writable. A file that is
    ``replaced`` (a new one is written beside it, then renamed over it) also needs a
    writable directory; one that is appended to needs that only to be created. Another
    user's symbolic link or file in a sticky world-writable directory is refused
    (:func:`_output_target`). Returns what :func:`_output_target` found.
    """
    target, found = _output_target(path, option)
    directory = os.path.dirname(target)
    exists = os.path.lexists(target)
    if os.path.isdir(target):
        problem = "is a directory; name a file"
    elif not os.path.isdir(directory):
        problem = f"is in a directory that does not exist ({directory}); create it first"
    elif exists and not os.access(target, os.W_OK):
        problem = "is not writable; make it writable or name another file"
    elif (replaced or not exists) and not os.access(directory, os.W_OK | os.X_OK):
        problem = f"cannot be written: the directory {directory} is not writable"
    else:
        return target, found
    raise CLIError(f"{option} {path} {problem}.", exit_code=2)


def _check_not_the_store(path: str, option: str, repository: SessionRepository) -> None:
    """Refuse (usage error, exit 2) an output that is the store's own file: a SQLite
    database (or its -wal, -shm or -journal file), or a path in a file store's
    directory. Written there, it replaced the database under the store and any process
    using it, or became a document of the store."""
    target = os.path.realpath(path)
    if isinstance(repository, SQLiteRepository):
        database = os.path.realpath(repository.path)
        for own in (database, *(database + end for end in ("-wal", "-shm", "-journal"))):
            if target == own or _same_file(target, own):
                raise CLIError(
                    f"{option} {path} is the store's own file ({own}): writing it would "
                    "replace the database under every process using it. Name another file.",
                    exit_code=2,
                )
    elif isinstance(repository, FileRepository):
        directory = os.path.realpath(repository.directory)
        if target == directory or target.startswith(directory.rstrip(os.sep) + os.sep):
            raise CLIError(
                f"{option} {path} is in the file store's directory {directory}. Name a "
                "file outside it.",
                exit_code=2,
            )


def _same_file(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` both exist and are one file (a hard link, say)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


_FD_ALIAS = re.compile(r"/dev/(stdout|stderr|fd/[0-9]+)|/proc/(self|[0-9]+)/fd/[0-9]+")


#: Symbolic links followed in one output path at most, as Linux (``ELOOP`` after that).
_MAX_LINKS: Final = 40


def _in_sticky_directory_of_another(directory: str, owner: int) -> bool:
    """Whether a link or file of user ``owner`` in ``directory`` is another user's in a
    sticky world-writable directory (``/tmp``): ``owner`` is neither this process's
    effective user nor the directory's owner. Linux follows such a link only if
    fs.protected_symlinks is on, and refuses to open such a file for writing if
    fs.protected_regular (fs.protected_fifos for a FIFO) is; these rules are applied here
    whatever those settings, as a file renamed over such a file would evade them."""
    if not hasattr(os, "geteuid"):  # no sticky directories to share
        return False
    try:
        status = os.stat(directory)
    except OSError:
        return False
    shared = stat.S_ISVTX | stat.S_IWOTH
    return status.st_mode & shared == shared and owner not in (os.geteuid(), status.st_uid)


def _user(uid: int) -> str:
    """User ``uid`` for a message: ``alice (1001)``, or the uid alone if no account has it."""
    try:
        import pwd
    except ImportError:  # not a POSIX system
        return str(uid)
    try:
        return f"{pwd.getpwuid(uid).pw_name} ({uid})"
    except KeyError:
        return str(uid)


def _output_target(path: str, option: str) -> tuple[str, os.stat_result | None]:
    """The file that writing to ``path`` writes (:func:`os.path.realpath`), and its
    status (None if there is none yet); :class:`CLIError` (exit 2) for another user's
    symbolic link or file in a sticky world-writable directory.

    Such a link, at any step of the path, may have been planted to make the output
    replace a file of this process's user (``/tmp/out.jsonl -> ~/.bashrc``), and such a
    file, kept with its owner, would hand that user the output. The names of open file
    descriptors (``/dev/stdout``) are the shell's redirections, not followed here.
    """
    if os.name != "posix":  # no sticky directories; paths in another syntax
        resolved = os.path.realpath(path)
        return resolved, (os.lstat(resolved) if os.path.lexists(resolved) else None)
    resolved = "/" if os.path.isabs(path) else os.getcwd()
    given = [part for part in path.split("/") if part]
    remaining = list(given)
    links = 0
    while remaining:
        part = remaining.pop(0)
        if part == ".":
            continue
        if part == "..":
            resolved = os.path.dirname(resolved)
            continue
        candidate = os.path.join(resolved, part)
        if _FD_ALIAS.fullmatch(candidate):
            return os.path.join(candidate, *remaining), None
        try:
            status = os.lstat(candidate)
        except OSError:  # missing, or not to be examined: taken as it is, as realpath does
            status = None
        if status is None or not stat.S_ISLNK(status.st_mode):
            resolved = candidate
            continue
        if _in_sticky_directory_of_another(resolved, status.st_uid):
            if links == 0 and not remaining:  # the path itself
                link = f"{option} {path} is"
            else:  # a step of the path: as the user wrote it, until a link was followed
                step = given[: len(given) - len(remaining)]
                shown = ("/" if path.startswith("/") else "") + "/".join(step)
                link = f"{shown if links == 0 else candidate}, on the path of {option} {path}, is"
            raise CLIError(
                f"{link} a symbolic link that user {_user(status.st_uid)} made in the sticky "
                f"world-writable directory {resolved}: it may lead to a file of yours; "
                "remove the link, or name the file itself.",
                exit_code=2,
            )
        links += 1
        if links > _MAX_LINKS:
            raise CLIError(
                f"{option} {path} cannot be written: too many levels of symbolic links.",
                exit_code=2,
            )
        try:
            destination = os.readlink(candidate)
        except OSError:  # gone meanwhile: taken as it is
            resolved = candidate
            continue
        if os.path.isabs(destination):
            resolved = "/"
        remaining[:0] = [part for part in destination.split("/") if part]
    try:
        status = os.lstat(resolved)
    except OSError:
        return resolved, None
    if not stat.S_ISDIR(status.st_mode) and _in_sticky_directory_of_another(
        os.path.dirname(resolved), status.st_uid
    ):
        raise CLIError(
            f"{option} {path} is a file of user {_user(status.st_uid)} in the sticky "
            f"world-writable directory {os.path.dirname(resolved)}: that user could read "
            "what is written to it; remove it, or name another file.",
            exit_code=2,
        )
    return resolved, status


def _create_appended_file(
    path: str, option: str, target: str, found: os.stat_result | None
) -> None:
    """Create ``path``, a file appended to by path later on (``demo --reports``: the
    reporter opens it at each report), right after :func:`_check_output_file` found
    ``target`` (the file ``path`` leads to) and ``found`` there (its status, or None);
    or make sure the file there is still one it would accept.

    The check alone left the name free: another user could make a link or a file there
    after it (while the store opened, say), and every report would follow or feed it.
    Created now (owner-only: :data:`~asyncsession.reporting._REPORT_FILE_MODE` less the
    umask), it is this user's own; in a sticky directory (``/tmp``) no one else may then
    remove, rename or replace it. What was made there since the check is refused: a
    symbolic link (not followed: ``O_NOFOLLOW``), or another user's file or FIFO (not
    blocked on, not written). A FIFO or a device found at the check (this user's or the
    directory owner's), or an fd alias, is left to be written in place.
    """
    if (found is not None and not stat.S_ISREG(found.st_mode)) or _FD_ALIAS.fullmatch(target):
        return
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    for name in ("O_NONBLOCK", "O_NOFOLLOW", "O_CLOEXEC", "O_BINARY"):  # as the OS has them
        flags |= getattr(os, name, 0)
    try:
        fd = os.open(target, flags, _REPORT_FILE_MODE)
    except OSError as exc:
        try:  # ELOOP for a link (EACCES on some systems), ENXIO for a FIFO: made since?
            now = os.lstat(target)
        except OSError:
            now = None
        if now is not None and (problem := _changed_since_checked(target, now)):
            raise CLIError(
                f"{option} {path} changed while it was checked: {problem}", exit_code=2
            ) from exc
        raise CLIError(f"{option} {path} cannot be written: {exc.strerror}.", exit_code=2) from exc
    try:
        status = os.fstat(fd)
    finally:
        os.close(fd)
    if problem := _changed_since_checked(target, status):
        raise CLIError(f"{option} {path} changed while it was checked: {problem}", exit_code=2)


def _changed_since_checked(target: str, status: os.stat_result) -> str | None:
    """What is wrong with ``target``, of ``status``, as a file to append to that
    :func:`_check_output_file` found a regular file or nothing: None if nothing."""
    if stat.S_ISLNK(status.st_mode):
        kind = f"is now a symbolic link that user {_user(status.st_uid)} made"
    elif not stat.S_ISREG(status.st_mode):
        kind = f"is no longer a regular file (user {_user(status.st_uid)}'s)"
    elif _in_sticky_directory_of_another(os.path.dirname(target), status.st_uid):
        kind = f"is now a file of user {_user(status.st_uid)} in a sticky world-writable directory"
    else:
        return None
    return f"{target} {kind}; remove it, or name another file."


def _written_in_place(path: str) -> bool:
    """Whether ``path`` is written directly instead of replaced by a renamed new file.

    A FIFO, a device or a socket (a reader waits on it; renaming a file over it would
    break it), and the names of open file descriptors (``/dev/stdout``, ``/dev/fd/3``,
    ``/proc/self/fd/1``: the shell's redirection, maybe an append) are written in place.
    """
    if _FD_ALIAS.fullmatch(os.path.abspath(path)):
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


#: Permissions of a new export file (less the umask): owner only, as the stores' own
#: files (``file_mode``), since an export holds every session's data.
#: :func:`tempfile.mkstemp` creates its file so.
EXPORT_FILE_MODE: Final = 0o600


def _keep_owner_and_mode(fd: int, previous: os.stat_result) -> None:
    """Give the new file ``fd`` the owner, group and permissions of the file it replaces.

    The owner is kept where the process may set it (as root); otherwise the group, if the
    process belongs to it; otherwise the new file is the process's own. An owner or group
    that cannot be set (not permitted; an id the process's user namespace does not map)
    is not kept. The read, write and execute permissions are kept, but for the group's
    when the group is not: they would let the process's own group in. An export is data:
    set-user-ID, set-group-ID and sticky are dropped (writing clears set-user-ID anyway).
    """
    for uid in (previous.st_uid, -1):
        try:
            os.fchown(fd, uid, previous.st_gid)
            break
        except OSError:  # EPERM; EINVAL for an unmapped id (shown as 65534)
            continue
    mode = previous.st_mode & 0o777
    if os.fstat(fd).st_gid != previous.st_gid:
        mode &= ~0o070
    os.fchmod(fd, mode)


class _WriteFailed(CLIError):
    """The export's output could not be written."""


def _os_failure(operation: str, exc: OSError) -> CLIError:
    """The failure of ``operation`` (what could not be done, naming the file) on ``exc``."""
    return CLIError(f"cannot {operation}: {exc.strerror or exc}.")


@contextlib.contextmanager
def _replacing(path: str, option: str) -> Iterator[IO[bytes]]:
    """A new file that replaces ``path`` only if the block succeeds.

    It is written beside ``path`` (the target of ``path`` if that is a symbolic link; not
    through another user's link in a sticky world-writable directory, nor over another
    user's file there: :func:`_output_target`), flushed to disk and renamed over it; if
    the block raises, it is deleted and ``path`` is left as it was. A new file is readable
    by its owner only (:data:`EXPORT_FILE_MODE` less the umask); one that replaces a file
    gets that file's permissions, and its owner and group as far as
    :func:`_keep_owner_and_mode` can.
    Making the rename durable (syncing the directory) is best effort once it is done:
    a directory that cannot be read (mode 0333, say) only gets a warning.
    """
    target, previous = _output_target(path, option)  # checked again, just before use
    directory, name = os.path.split(target)
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise _os_failure(f"create a new file in {directory}", exc) from exc
    try:
        with open(fd, "wb") as stream:
            if previous is not None:
                try:
                    _keep_owner_and_mode(stream.fileno(), previous)
                except OSError as exc:
                    raise _os_failure(
                        f"give the new file {temporary} the permissions of {path}", exc
                    ) from exc
            yield stream
            try:
                stream.flush()
                os.fsync(stream.fileno())
            except OSError as exc:
                raise _os_failure(f"write the new file {temporary}", exc) from exc
        try:
            os.replace(temporary, target)
        except OSError as exc:
            raise _os_failure(f"rename {temporary} to {target}", exc) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    if os.name == "posix":  # make the rename durable too
        try:
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            logger.warning(
                "%s was written, but its directory could not be synced to disk (%s): "
                "a system crash soon after may undo the replacement",
                path,
                exc.strerror or exc,
            )


# -- options ------------------------------------------------------------------------------


def _store_option(fn: F) -> F:
    option = click.option(
        "--store",
        "store_url",
        default=DEFAULT_STORE,
        envvar="ASYNCSESSION_STORE",
        show_default=True,
        metavar="URL",
        help=f"Where sessions live (env ASYNCSESSION_STORE): {STORE_FORMS}.",
    )
    return option(fn)


def _demo_store_option(fn: F) -> F:
    option = click.option(
        "--store",
        "store_url",
        default=DEFAULT_STORE,
        show_default=True,
        metavar="URL",
        help="Where the demo's made-up users' sessions go: this option only (not "
        f"ASYNCSESSION_STORE, which may name an application's store): {STORE_FORMS}.",
    )
    return option(fn)


def _backend_option(fn: F) -> F:
    option = click.option(
        "--backend",
        type=click.Choice(["asyncio", "trio"]),
        default="asyncio",
        envvar="ASYNCSESSION_BACKEND",
        show_default=True,
        help="Event loop to run on (env ASYNCSESSION_BACKEND).",
    )
    return option(fn)


def _json_option(fn: F) -> F:
    option = click.option(
        "--json", "as_json", is_flag=True, help="Print stable JSON for scripts instead of tables."
    )
    return option(fn)


def _common(fn: F) -> F:
    return _store_option(_backend_option(_json_option(fn)))


def _parse_period(value: str) -> timedelta:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value)
    if match is None or float(match.group(1)) <= 0:
        raise CLIError(f"invalid period {value!r}; use e.g. 30m, 1h, 1d or seconds.", 2)
    unit = {"": "seconds", "s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
    try:
        period = timedelta(**{unit[match.group(2)]: float(match.group(1))})
    except OverflowError:
        period = timedelta.max
    if period > _MAX_PERIOD:
        raise CLIError(f"period {value!r} is too long; use at most 36500d (100 years).", 2)
    if period < _MIN_PERIOD:  # under a microsecond rounds to nothing
        raise CLIError(f"period {value!r} is too short; use at least 1s.", 2)
    return period


_MAX_PERIOD: Final = timedelta(days=36500)
_MIN_PERIOD: Final = timedelta(seconds=1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="asyncsession", message="asyncsession %(version)s")
def cli() -> None:
    """Inspect and maintain asyncsession stores, and run the demo.

    Every command takes --store URL (default sqlite:///asyncsession.db, or env
    ASYNCSESSION_STORE, which demo ignores) and --backend asyncio|trio; most take --json.
    Only demo and import create a store; the others refuse one that does not exist.
    Commands that change no session (list, show, stats, export, checkpoint, migrate
    --dry-run) never upgrade an older SQLite layout: the release that wrote it may still
    be using the file.
    """


# -- demo ---------------------------------------------------------------------------------


class _Fate(enum.Enum):
    CHAT = "active"
    ARCHIVE = "archived"
    EXIT = "exited"
    CRASH = "crashed"
    ABNORMAL = "abnormal"
    IDLE = "expired"


#: Fates of every 20 users (shuffled): most keep chatting, some end in each way.
_FATE_PATTERN = (
    [_Fate.CHAT] * 8
    + [_Fate.EXIT] * 4
    + [_Fate.IDLE] * 3
    + [_Fate.CRASH] * 2
    + [_Fate.ARCHIVE] * 2
    + [_Fate.ABNORMAL]
)
_TOPICS = ("billing", "travel", "recipes", "homework", "garden", "music", "fitness", "python")
_QUESTIONS = (
    "Can you help me with {topic}?",
    "What would you suggest next for {topic}?",
    "Thanks! One more question about {topic}.",
    "Could you explain that in simpler words?",
    "Is there a faster way to do this?",
)
_ANSWERS = (
    "Sure, here is a short plan for {topic}.",
    "Good question; the usual answer for {topic} is to start small.",
    "Here are three options, from simplest to most thorough.",
    "In short: measure first, then change one thing at a time.",
)

#: Simulated time: one chat round per two minutes; idle sessions expire after 30 minutes.
DEMO_STEP = timedelta(minutes=2)
DEMO_IDLE_TIMEOUT = timedelta(minutes=30)
DEMO_CLEANUP_INTERVAL = 2 * DEMO_STEP


@attrs.define
class _User:
    owner: str
    topic: str
    fate: _Fate
    fate_round: int
    session_id: uuid.UUID | None = None
    done: bool = False


@attrs.define
class _Tally:
    operations: int = 0
    messages: int = 0


def _plan_users(users: int, rounds: int, rng: random.Random) -> list[_User]:
    fates = [_FATE_PATTERN[i % len(_FATE_PATTERN)] for i in range(users)]
    rng.shuffle(fates)
    idle_rounds = DEMO_IDLE_TIMEOUT // DEMO_STEP
    # An idle user stops early enough to expire and be collected before the end.
    latest_idle = rounds - idle_rounds - 3
    planned = []
    for index, fate in enumerate(fates):
        if fate is _Fate.IDLE and latest_idle < 1:
            fate = _Fate.CHAT
        last = latest_idle if fate is _Fate.IDLE else rounds - 1
        planned.append(
            _User(
                owner=f"user-{index + 1:03d}",
                topic=rng.choice(_TOPICS),
                fate=fate,
                fate_round=rng.randint(min(1, last), last) if last > 0 else 0,
            )
        )
    return planned


async def _turn(manager: SessionManager, user: _User, turn: int, tally: _Tally) -> None:
    """One simulated round of one user: chat, update state, maybe end the session."""
    if user.session_id is None:
        created = await manager.create(
            owner=user.owner, name=f"chat-{user.topic}", state={"topic": user.topic, "turns": 0}
        )
        user.session_id = created.id
        tally.operations += 1
    if user.fate is _Fate.IDLE and turn >= user.fate_round:
        user.done = True  # walks away: the session idles out
        return
    sid = user.session_id
    async with manager.bind(sid):
        question = _QUESTIONS[turn % len(_QUESTIONS)].format(topic=user.topic)
        answer = _ANSWERS[turn % len(_ANSWERS)].format(topic=user.topic)
        await manager.add_messages(sid, [("user", question, None), ("assistant", answer, None)])
        await manager.set_state(sid, turns=turn + 1)
        tally.operations += 3  # bind reads (touches) the session
        tally.messages += 2
        if turn % 5 == 4:
            await manager.list(owner=user.owner, limit=5)
            tally.operations += 1
        if turn != user.fate_round or user.fate in (_Fate.CHAT, _Fate.IDLE):
            return
        user.done = True
        if user.fate is _Fate.ARCHIVE:
            await manager.archive(sid)
        elif user.fate is _Fate.EXIT:
            await manager.close(sid, status=SessionStatus.EXITED)
        elif user.fate is _Fate.ABNORMAL:
            await manager.close(sid, status=SessionStatus.ABNORMAL)
        else:
            await manager.add_message(sid, "tool", "error: the tool call failed (simulated)")
            await manager.record_error(sid)
            await manager.close(sid, status=SessionStatus.CRASHED)
            tally.operations += 2
            tally.messages += 1
        tally.operations += 1


async def _run_demo(
    repository: SessionRepository,
    *,
    users: int,
    rounds: int,
    seed: int | None,
    reporters: Sequence[Reporter],
    show_progress: bool,
) -> dict[str, Any]:
    from .testing import ManualClock

    rng = random.Random(seed)
    planned = _plan_users(users, rounds, rng)
    # Simulated time ends at the real "now", so the sessions look recent afterwards.
    clock = ManualClock(start=_now() - DEMO_STEP * rounds)
    tally = _Tally()
    async with SessionManager(
        repository,
        idle_timeout=DEMO_IDLE_TIMEOUT,
        retention=timedelta(days=1),
        cleanup_interval=DEMO_CLEANUP_INTERVAL,
        clock=clock,
        reporters=reporters,
    ) as manager:
        next_pass = clock.now() + DEMO_CLEANUP_INTERVAL
        started = time.perf_counter()
        with _progress(show_progress) as progress:
            task = progress.add_task(f"{users} users chatting", total=rounds)
            for turn in range(rounds):
                async with anyio.create_task_group() as tg:
                    for user in planned:
                        if not user.done:
                            tg.start_soon(_turn, manager, user, turn, tally)
                clock.advance(DEMO_STEP)
                if clock.now() >= next_pass:
                    await manager.wait_for_cleanup()
                    next_pass = clock.now() + DEMO_CLEANUP_INTERVAL
                progress.advance(task)
        elapsed = time.perf_counter() - started
        stats = await manager.stats()
        outcome: Counter[str] = Counter()
        for user in planned:
            assert user.session_id is not None
            session = await repository.get(user.session_id, last_messages=0)
            if session is None:
                outcome[SessionStatus.EXPIRED.value] += 1
            else:
                outcome[_status_text(session, clock.now())] += 1
    return {
        "users": users,
        "rounds": rounds,
        "simulated_minutes": (DEMO_STEP * rounds).total_seconds() / 60,
        "sessions": dict(sorted(outcome.items())),
        "messages": tally.messages,
        "operations": tally.operations,
        "expired_collected": stats.expired_total,
        "cleanup_passes": stats.cleanup_passes,
        "seconds": round(elapsed, 3),
        "operations_per_second": round(tally.operations / elapsed, 1) if elapsed else None,
    }


@cli.command()
@click.option("--users", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option(
    "--rounds",
    type=click.IntRange(1, 1_000),
    default=40,
    show_default=True,
    help="Chat rounds per user (two simulated minutes each).",
)
@click.option("--seed", type=int, default=None, help="Random seed, for a repeatable run.")
@click.option(
    "--reports",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also append a release-health report per ended session to this JSON Lines file.",
)
@_demo_store_option
@_backend_option
@_json_option
def demo(
    users: int,
    rounds: int,
    seed: int | None,
    reports: Path | None,
    store_url: str,
    backend: str,
    as_json: bool,
) -> None:
    """Simulate many users chatting concurrently, then summarize.

    Users create sessions, exchange messages and update state at once; some close
    normally, some crash, some are archived and some walk away and expire. Time is
    simulated (a ManualClock), so an hour of chat takes seconds. Runs on --store only,
    never on the store ASYNCSESSION_STORE names.
    """
    if reports is not None:
        checked = _check_output_file(str(reports), "--reports", replaced=False)
        _check_not_the_store(str(reports), "--reports", open_store(store_url))
        _create_appended_file(str(reports), "--reports", *checked)
    reporters: list[Reporter] = [JsonLinesReporter(reports)] if reports is not None else []
    result = _with_store(
        store_url,
        backend,
        lambda repo: _run_demo(
            repo,
            users=users,
            rounds=rounds,
            seed=seed,
            reporters=reporters,
            show_progress=not as_json,
        ),
        creates=True,
        memory=True,
    )
    result["backend"] = backend
    result["store"] = shown_url(store_url)
    if as_json:
        _print_json(result)
        return
    out.print("[bold]Demo sessions by status[/bold]")
    by_status = Table()
    by_status.add_column("status")
    by_status.add_column("sessions", justify="right")
    for status, count in result["sessions"].items():
        by_status.add_row(status, str(count))
    by_status.add_row(Text("total", style="bold"), str(users))
    out.print(by_status)
    out.print("[bold]Run[/bold]")
    run_table = Table(show_header=False)
    run_table.add_column("what")
    run_table.add_column("value", justify="right")
    rows = [
        ("store", shown_url(store_url)),
        ("backend", backend),
        ("users x rounds", f"{users} x {rounds}"),
        ("simulated time", f"{result['simulated_minutes']:g} min"),
        ("messages", str(result["messages"])),
        ("operations", str(result["operations"])),
        ("expired and collected", str(result["expired_collected"])),
        ("wall time", f"{result['seconds']:.2f} s"),
        ("operations per second", f"{result['operations_per_second']:,.0f}"),
    ]
    for what, value in rows:
        run_table.add_row(what, _plain(value))
    out.print(run_table)
    _print_next(store_url)


def _print_next(store_url: str) -> None:
    """Suggest looking at the demo's sessions: a command alone on its line, the store
    quoted for a POSIX shell (``&`` or ``;`` in a URL), so it can be pasted as it is.

    Its password is masked, and the hint says so; ``--store`` is left out where
    ASYNCSESSION_STORE names the demo's store (or neither names one)."""
    shown = shown_url(store_url)
    if _in_one_process(store_url):
        out.print(
            _plain(
                f"The {shown} store ended with the demo. To look at the sessions afterwards "
                "(list, show, stats, export), run it on the default ./asyncsession.db or "
                "another --store."
            ),
            soft_wrap=True,
        )
        return
    environment = os.environ.get("ASYNCSESSION_STORE") or DEFAULT_STORE
    store_arg = "" if environment == store_url else f" --store {shlex.quote(shown)}"
    out.print("Next, look at the sessions (also with show, stats, export):")
    out.print(_plain(f"asyncsession list{store_arg}", "bold"), soft_wrap=True)
    if store_arg and shown != store_url:
        out.print(
            "The password is masked (***) above: type it in its place, or set "
            "ASYNCSESSION_STORE to the store's URL and leave --store out.",
            soft_wrap=True,
        )


# -- reading ------------------------------------------------------------------------------


@cli.command("list")
@click.option("--owner", help="Only this owner's sessions.")
@click.option(
    "--status",
    type=click.Choice(STATUSES),
    multiple=True,
    help="Only these statuses (repeatable).",
)
@click.option("--search", help="Case-insensitive text in the name or first message.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option("--cursor", help="Resume after a previous page (its next cursor).")
@click.option(
    "--all", "include_expired", is_flag=True, help="Include expired sessions not yet purged."
)
@_common
def list_sessions(
    owner: str | None,
    status: tuple[str, ...],
    search: str | None,
    limit: int,
    cursor: str | None,
    include_expired: bool,
    store_url: str,
    backend: str,
    as_json: bool,
) -> None:
    """List sessions, most recently active first (one page)."""
    now = _now()
    query = SessionQuery(
        owner=None if owner is None else _checked_owner(owner),
        status=[SessionStatus(s) for s in status] or None,
        search=search,
        limit=limit,
        cursor=cursor,
        visible_at=None if include_expired else now,
    )

    async def fetch(repository: SessionRepository) -> tuple[list[Session], str | None]:
        try:
            page = await repository.list(query)
        except InvalidCursor as exc:
            raise CLIError(
                f"invalid --cursor {cursor!r}: pass the next cursor a previous `list` with the "
                "same filters printed, or omit --cursor for the first page.",
                2,
            ) from exc
        return list(page.items), page.next_cursor

    items, next_cursor = _with_store(store_url, backend, fetch)
    if as_json:
        _print_json({"items": [_summary(s, now) for s in items], "next_cursor": next_cursor})
        return
    table = Table(title=_plain(f"Sessions in {shown_url(store_url)}"))
    table.add_column("id", no_wrap=True)
    table.add_column("owner")
    table.add_column("name")
    table.add_column("status")
    table.add_column("msgs", justify="right")
    table.add_column("last active (UTC)")
    for session in items:
        table.add_row(
            str(session.id),
            _plain(session.owner or "-"),
            _plain(session.name or "-"),
            _status_text(session, now),
            str(session.messages.total),
            _when(session.last_active),
        )
    out.print(table)
    if not items:
        out.print("No sessions match.")
    if next_cursor is not None:
        out.print(_plain(f"More: --cursor {next_cursor}"))


@cli.command()
@click.argument("session_id", metavar="ID")
@click.option(
    "--messages",
    "last",
    type=click.IntRange(0),
    default=10,
    show_default=True,
    help="How many of the last messages to show.",
)
@_common
def show(session_id: str, last: int, store_url: str, backend: str, as_json: bool) -> None:
    """Show one session with its last messages."""
    sid = _parse_id(session_id, store_url)

    async def fetch(repository: SessionRepository) -> Session:
        session = await repository.get(sid, last_messages=last)
        if session is None:
            raise await _not_live(repository, sid, store_url)
        return session

    session = _with_store(store_url, backend, fetch)
    now = _now()
    messages = list(session.messages)[-last:] if last else []
    first_number = session.messages.total - len(messages) + 1
    if as_json:
        data = _summary(session, now)
        data["state"] = thaw(session.state)
        data["last_messages"] = [
            {
                "index": first_number + i,
                "role": m.role,
                "content": m.content,
                "timestamp": _iso(m.timestamp),
                "data": thaw(m.data),
            }
            for i, m in enumerate(messages)
        ]
        _print_json(data)
        return
    out.print(f"[bold]Session {session.id}[/bold]")
    info = Table(show_header=False)
    info.add_column("field", style="bold")
    info.add_column("value")
    for field, value in (
        ("owner", session.owner or "-"),
        ("name", session.name or "-"),
        ("status", _status_text(session, now)),
        ("created", _when(session.created_at)),
        ("last active", _when(session.last_active)),
        ("closed", _when(session.closed_at)),
        ("expires", _when(session.expires_at)),
        ("messages", str(session.messages.total)),
        ("errors", str(session.errors)),
        ("revision", str(session.revision)),
        ("state", orjson.dumps(thaw(session.state)).decode()),
    ):
        info.add_row(field, _plain(value))
    out.print(info)
    if messages:
        table = Table(title=f"Last {len(messages)} of {session.messages.total} messages")
        table.add_column("#", justify="right")
        table.add_column("time (UTC)", no_wrap=True)
        table.add_column("role")
        table.add_column("content")
        for i, message in enumerate(messages):
            table.add_row(
                str(first_number + i),
                _when(message.timestamp),
                _plain(message.role),
                _plain(message.content),
            )
        out.print(table)


async def _awaiting_purge(repository: SessionRepository, now: datetime) -> int:
    """How many expired sessions ``purge`` would remove and count (up to 10000): not the
    documents a rotation retired (a failed delete leaves them; purge removes them
    silently). The sessions are read :data:`_AWAITING_READS` at a time, so a remote store
    answers in a few round trips' time, not one per session in turn."""
    awaiting = 0
    ids = iter(await repository.expired(now, limit=10_000))

    async def read_some() -> None:
        nonlocal awaiting
        for sid in ids:  # shared: each id is read once, by whichever reader is free
            try:
                session = await repository.get(sid, last_messages=0)
            except SerializationError:  # expired; purge fails on it until it is repaired
                awaiting += 1
                continue
            awaiting += session is not None and not _is_retired(session)

    async with anyio.create_task_group() as tg:
        for _ in range(_AWAITING_READS):
            tg.start_soon(read_some)
    return awaiting


_AWAITING_READS = 8
"""How many reads ``stats`` keeps in flight while it checks the expired sessions."""


@attrs.frozen
class _SetAside:
    """A file store's documents that its listings and counts leave out."""

    quarantined: int  # documents in quarantine/
    unreadable: int  # entries in sessions/ that cannot be read
    folder: Path  # quarantine/


def _read_report_file(path: Path, skip_bad_lines: bool) -> list[Any]:
    """Every report in ``path``; :class:`CLIError` naming the first bad line, or with
    ``skip_bad_lines`` a note on stderr of how many were skipped."""
    bad: list[CorruptSessionError] = []
    try:
        reports = list(read_reports(path, on_bad_line=bad.append if skip_bad_lines else None))
    except CorruptSessionError as exc:
        raise CLIError(
            f"cannot read the reports: {exc.detail}. Fix or delete that line (each line "
            "must be one JSON report as JsonLinesReporter writes it), or pass "
            "--skip-bad-lines to leave such lines out."
        ) from exc
    if bad:
        err.print(
            _plain(
                f"Skipped {len(bad)} bad line{'' if len(bad) == 1 else 's'} "
                f"(the first: {bad[0].detail})."
            )
        )
    return reports


@cli.command()
@click.option(
    "--bucket", default="1h", show_default=True, help="Release-health period: 30m, 1h, 1d..."
)
@click.option(
    "--reports",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Aggregate this JSON Lines report file (JsonLinesReporter, demo --reports) "
    "instead of the stored sessions (reports also cover purged sessions).",
)
@click.option(
    "--skip-bad-lines",
    is_flag=True,
    help="With --reports: leave out lines that are not reports (torn by a full disk or "
    "a killed process), with a note of how many, instead of failing.",
)
@_common
def stats(
    bucket: str,
    reports: Path | None,
    skip_bad_lines: bool,
    store_url: str,
    backend: str,
    as_json: bool,
) -> None:
    """Sessions by status, and release health per period (crash-free rate).

    For a file store, also the documents it set aside: quarantined (found damaged) and
    unreadable (left out of listings and counts).
    """
    period = _parse_period(bucket)
    if skip_bad_lines and reports is None:
        raise CLIError("--skip-bad-lines applies to a report file: pass it with --reports FILE.", 2)
    now = _now()

    async def fetch(
        repository: SessionRepository,
    ) -> tuple[Mapping[SessionStatus, int], int, list[Any], _SetAside | None]:
        counts = await repository.count_by_status()
        awaiting = await _awaiting_purge(repository, now)
        if reports is not None:
            items: Iterable[Any] = await anyio.to_thread.run_sync(
                _read_report_file, reports, skip_bad_lines
            )
        else:
            items = [s async for s in _all_sessions(repository)]
        aside = None
        if isinstance(repository, FileRepository):
            aside = _SetAside(
                len(await repository.quarantined()),
                len(await repository.unreadable()),
                repository.directory / "quarantine",
            )
        # expired sessions cleanup has not removed yet count as expired, as their reports
        return counts, awaiting, aggregate(items, bucket=period, now=now), aside

    # with --reports, memory:// stands for "no store": its counts are all zero
    counts, awaiting, buckets, aside = _with_store(
        store_url,
        backend,
        fetch,
        memory=reports is not None,
        advice=_CREATE_ONE if reports is None else _REPORTS_ALONE,
    )
    by_status = {s.value: counts.get(s, 0) for s in SessionStatus}
    health = [
        {
            "start": _iso(b.start),
            "started": b.started,
            "ended": {s.value: b.ended.get(s, 0) for s in SessionStatus if s.is_terminal},
            "errored": b.errored,
            "crash_free_rate": b.crash_free_rate,
        }
        for b in buckets
    ]
    if as_json:
        _print_json(
            {
                "by_status": by_status,
                "total": sum(by_status.values()),
                "expired_awaiting_purge": awaiting,
                # a file store's set-aside documents; null for stores without them
                "quarantined": None if aside is None else aside.quarantined,
                "unreadable": None if aside is None else aside.unreadable,
                "bucket_seconds": period.total_seconds(),
                "health": health,
            }
        )
        return
    out.print(Text.assemble(("Sessions by status", "bold"), " in ", _plain(shown_url(store_url))))
    table = Table()
    table.add_column("status")
    table.add_column("sessions", justify="right")
    for status, count in by_status.items():
        table.add_row(status, str(count))
    table.add_row(Text("total", style="bold"), str(sum(by_status.values())))
    out.print(table)
    if awaiting:
        out.print(f"{awaiting} expired sessions await purging (asyncsession purge).")
    if aside is not None:
        out.print(
            Text.assemble(
                f"Quarantined documents (found damaged, not counted above): {aside.quarantined}"
                " in ",
                _plain(aside.folder),
            )
        )
        out.print(f"Unreadable entries (left out of listings and counts): {aside.unreadable}")
    source = f"reports in {reports}" if reports is not None else "stored sessions"
    health_table = Table(title=_plain(f"Release health per {bucket} ({source})"))
    health_table.add_column("period start (UTC)")
    for column in ("started", "exited", "crashed", "abnormal", "expired", "errored"):
        health_table.add_column(column, justify="right")
    health_table.add_column("crash-free", justify="right")
    for b, row in zip(buckets, health, strict=True):
        rate = row["crash_free_rate"]
        health_table.add_row(
            _when(b.start),
            str(b.started),
            *(str(row["ended"][s]) for s in ("exited", "crashed", "abnormal", "expired")),
            str(b.errored),
            "-" if rate is None else f"{rate:.1%}",
        )
    out.print(health_table)


# -- changing -----------------------------------------------------------------------------


@cli.command()
@click.argument("session_id", metavar="ID")
@click.option("--status", type=click.Choice(CLOSE_STATUSES), default="exited", show_default=True)
@_common
def close(session_id: str, status: str, store_url: str, backend: str, as_json: bool) -> None:
    """Close a live session (exited, crashed or abnormal)."""
    sid = _parse_id(session_id, store_url)

    async def close_it(manager: SessionManager) -> Session:
        try:
            return await manager.close(sid, status=SessionStatus(status))
        except SessionNotFound:
            raise await _not_live(manager.repository, sid, store_url) from None

    async def act(repository: SessionRepository) -> Session:
        return await _with_manager(repository, close_it)

    session = _with_store(store_url, backend, act, writes=True)
    if as_json:
        _print_json(_summary(session, _now()))
    else:
        out.print(f"Closed {session.id} as {session.status.value}.")


@cli.command()
@click.argument("session_id", metavar="[ID]", required=False)
@click.option(
    "--owner",
    help="Instead of one ID: every stored session of this owner (expired and closed ones "
    "too), e.g. for an erasure request.",
)
@_common
def delete(
    session_id: str | None, owner: str | None, store_url: str, backend: str, as_json: bool
) -> None:
    """Delete a session now (whatever its status), or every session of an --owner."""
    if (session_id is None) == (owner is None):
        raise CLIError("pass the ID of the session to delete, or --owner OWNER (not both).", 2)
    if owner is not None:
        _delete_owner(_checked_owner(owner), store_url, backend, as_json)
        return
    sid = _parse_id(session_id or "", store_url)

    async def act(repository: SessionRepository) -> None:
        if not await _delete_one(repository, sid):
            raise await _not_live(repository, sid, store_url)

    _with_store(store_url, backend, act, writes=True)
    if as_json:
        _print_json({"deleted": str(sid)})
    else:
        out.print(f"Deleted {sid}.")


def _lists_by_owner_column(repository: SessionRepository) -> bool:
    """Whether ``repository``'s listing by owner filters on an owner column or index
    before it reads a document (the SQLite and Redis stores): a session such a listing
    skips as unreadable is that owner's."""
    return isinstance(repository, (SQLiteRepository, RedisRepository))


def _checked_owner(owner: str) -> str:
    """``--owner``, or a usage error (exit 2) saying what is wrong with it."""
    try:
        SessionQuery(owner=owner)
    except InvalidOwner as exc:
        raise CLIError(
            f"invalid --owner (not shown): {exc.problem}. Pass the owner's user id or e-mail "
            "address as the application stored it, or leave --owner out.",
            2,
        ) from exc
    return owner


async def _delete_one(repository: SessionRepository, sid: uuid.UUID) -> bool:
    """Delete session ``sid``, whatever is stored; whether there was one.

    Not the manager's delete: that one removes an expired session as expired and says
    it was not found, where this deletes whatever is stored. It announces what the
    manager's would, though: EXPIRED for an expired session (nothing for the document a
    rotation retired: the rotation announced its end), else DELETED.
    """
    try:
        if await _remove_if_expired(repository, sid):
            return True
    except SerializationError:  # unreadable, and kept by the store: deleted unread
        pass
    deleted = await repository.delete(sid)
    if deleted and isinstance(repository, EventTransport):
        await _Announcer(repository).announce(EventKind.DELETED, sid, _now(), None)
    return deleted


#: How often ``delete --owner`` lists the owner's sessions again, for those a listing
#: missed (written while it paged, they moved ahead of it).
OWNER_ROUNDS: Final = 5


def _delete_owner(owner: str, store_url: str, backend: str, as_json: bool) -> None:
    """``delete --owner``: every stored session of ``owner``, listed, then deleted.

    A session written while the listing pages moves ahead of it: the owner's sessions
    are listed again until a listing finds none left (at most :data:`OWNER_ROUNDS`
    times), and the store's count of them must then be 0. The SQLite and Redis stores
    list an owner's sessions by their owner column or index, so a session they skip as
    unreadable is the owner's: it is deleted unread. A file store's unreadable entries
    and quarantined documents are in no listing: whether they are the owner's is
    unknown. The command fails (exit 1) while any of those may remain, so that an
    erasure is never reported complete while one may.
    """

    async def act(repository: SessionRepository) -> tuple[list[uuid.UUID], bool, str]:
        by_owner_index = _lists_by_owner_column(repository)
        deleted: list[uuid.UUID] = []
        unknown: set[uuid.UUID] = set()

        def so_far() -> str:
            return (
                f"{_plural(len(deleted), 'session')} of this owner deleted before the "
                "interruption (the one under way perhaps too): the erasure is not "
                "complete; run the command again."
            )

        with _noted_if_interrupted(so_far):
            for _ in range(OWNER_ROUNDS):
                with _collecting_skipped() as skipped:
                    ids = await _all_ids(repository, owner)
                if by_owner_index:
                    ids.extend(skipped)
                else:
                    unknown.update(skipped)
                found = []
                for sid in dict.fromkeys(ids):
                    if await _delete_one(repository, sid):
                        found.append(sid)
                        deleted.append(sid)
                if not found:
                    break
        left = sum((await repository.count_by_status(owner)).values())
        problems: list[str] = []
        if left:
            problems.append(
                f"{left} of this owner's sessions {'is' if left == 1 else 'are'} still stored "
                "(written while the command ran): run it again once the owner's access "
                "is stopped."
            )
        if isinstance(repository, FileRepository):
            unknown.update(sid for sid, _ in await repository.unreadable())
            quarantined = len(await repository.quarantined())
            if quarantined:
                problems.append(
                    f"{repository.directory / 'quarantine'} holds "
                    f"{_plural(quarantined, 'damaged session document')} (the store never "
                    "deletes them): remove this owner's yourself."
                )
        if unknown:
            problems.insert(
                0,
                f"{_plural(len(unknown), 'stored session')} could not "
                f"be read, so whether {'it is' if len(unknown) == 1 else 'they are'} this "
                "owner's is unknown (see the warnings "
                "above): inspect them with `asyncsession show ID` and delete them by ID.",
            )
        return deleted, isinstance(repository, SQLiteRepository), " ".join(problems)

    deleted, sqlite, unfinished = _with_store(store_url, backend, act, writes=True)
    count = len(deleted)
    if as_json:
        _print_json({"deleted": [str(sid) for sid in deleted]})
    else:
        out.print(f"Deleted {count} session{'s' if count != 1 else ''}.")
        if count and sqlite:
            out.print(
                "Their data stays in the database files until `asyncsession checkpoint "
                "--vacuum` (see Deleting personal data in the README)."
            )
    if unfinished:
        raise CLIError(unfinished)


async def _remove_if_expired(repository: SessionRepository, sid: uuid.UUID) -> bool:
    """Remove ``sid`` if it has expired by now, announcing it EXPIRED as the manager
    would (nothing for the document a rotation retired: the rotation announced its end);
    True if it was removed."""
    now = _now()
    removed = await repository.remove_expired(sid, now=now)
    if removed is None:
        return False
    if isinstance(repository, EventTransport) and not _is_retired(removed):
        await _Announcer(repository).announce(EventKind.EXPIRED, sid, now, removed.revision)
    return True


@cli.command()
@_common
def purge(store_url: str, backend: str, as_json: bool) -> None:
    """Remove every expired session; print how many."""

    async def purge_all(manager: SessionManager) -> int:
        return await manager.purge_expired()

    async def act(repository: SessionRepository) -> int:
        return await _with_manager(repository, purge_all)

    count = _with_store(store_url, backend, act, writes=True)
    if as_json:
        _print_json({"purged": count})
    else:
        out.print(f"Purged {count} expired session{'s' if count != 1 else ''}.")


@cli.command()
@click.option(
    "--vacuum",
    is_flag=True,
    help="Run VACUUM first, so that no copy of a deleted row stays in the database file "
    "either. It rewrites the file (free disk space up to about twice its size) and holds "
    "the write lock while it runs.",
)
@_common
def checkpoint(vacuum: bool, store_url: str, backend: str, as_json: bool) -> None:
    """SQLite: copy the write-ahead log into the database and truncate it to 0 bytes.

    After `delete` or `purge`, for erasure: until a checkpoint, the -wal file still holds
    the pages the deleted sessions were written in (see "Deleting personal data" in the
    README). Other stores have no such log: the command refuses them (status 2).
    """
    _check_backend(backend)
    store = _store(store_url)
    if not isinstance(store, SQLiteRepository):
        raise CLIError(
            f"--store {shown_url(store_url)} is not a SQLite store: only SQLite keeps a "
            "write-ahead log to checkpoint (a file store unlinks a deleted session's "
            "document; Redis's persistence files follow its own settings).",
            2,
        )

    async def act(repository: SessionRepository) -> int:
        await cast(SQLiteRepository, repository).checkpoint(vacuum=vacuum)
        return store.path.stat().st_size

    size = _on_store(store, backend, act)
    if as_json:
        _print_json({"database_bytes": size, "vacuumed": vacuum})
    else:
        done = "Vacuumed and checkpointed" if vacuum else "Checkpointed"
        out.print(
            _plain(f"{done} {store.path} ({size} bytes): its -wal file was truncated to 0 bytes.")
        )


#: How often the CLI reads a session again after another writer beat its compare-and-set.
CAS_ATTEMPTS = 5


async def _until_saved(session_id: uuid.UUID, step: Callable[[int], Awaitable[T]]) -> T:
    """Run ``step(attempt)`` until it neither hits a conflict nor finds the session gone.

    ``step`` reads the session and writes it with a compare-and-set;
    :class:`SessionConflict` or :class:`SessionNotFound` from it means someone changed
    the session in between, so it runs again (reading again). After
    :data:`CAS_ATTEMPTS` attempts raises :class:`SessionConflict` with ``attempts``.
    """
    for attempt in range(CAS_ATTEMPTS):
        try:
            return await step(attempt)
        except (SessionConflict, SessionNotFound):
            continue
    raise SessionConflict(session_id, attempts=CAS_ATTEMPTS)


async def _rewrite(repository: SessionRepository, sid: uuid.UUID) -> bool:
    """Save a session unchanged but for its revision, so the store re-encodes it.

    Returns False when there was nothing to do: the session is gone, or another writer
    saved it meanwhile (which writes the current version too).
    """

    async def step(attempt: int) -> bool:
        if attempt:  # someone saved it since: perhaps there is nothing left to do
            versions = await repository.document_versions([sid])
            if versions is not None and versions.get(sid, CURRENT_VERSION) >= CURRENT_VERSION:
                return False
        session = await repository.get(sid)
        if session is None:
            return False
        await repository.save(
            _bumped(session, session.revision),
            expected_revision=session.revision,
        )
        return True

    try:
        return await _until_saved(sid, step)
    except SessionConflict as exc:
        raise CLIError(
            f"session {sid} kept changing while migrating it ({exc.attempts} attempts); "
            "run migrate again."
        ) from exc


@attrs.frozen
class _Plan:
    """What ``migrate`` found: the listed documents, the ones it rewrites, their versions."""

    documents: int
    outdated: tuple[uuid.UUID, ...]  # every listed id when the versions are unknown
    by_version: dict[int, int] | None  # documents per stored version; None: unknown


async def _plan_migration(repository: SessionRepository, ids: Sequence[uuid.UUID]) -> _Plan:
    """Ask the store for stored schema versions, :data:`PAGE` ids per call."""
    by_version: Counter[int] = Counter()
    outdated: list[uuid.UUID] = []
    for start in range(0, len(ids) or 1, PAGE):  # an empty store is asked too
        batch = ids[start : start + PAGE]
        versions = await repository.document_versions(batch)
        if versions is None:  # unknown: rewrite everything, as before the stores could tell
            return _Plan(len(ids), tuple(ids), None)
        for sid in batch:  # in listing order (a store's mapping may be in any order)
            version = versions.get(sid)
            if version is None:  # deleted since the listing
                continue
            by_version[version] += 1
            if version < CURRENT_VERSION:
                outdated.append(sid)
    return _Plan(len(ids), tuple(outdated), dict(sorted(by_version.items())))


def _versions_text(by_version: Mapping[int, int]) -> str:
    return ", ".join(f"{n} at version {v}" for v, n in by_version.items()) or "no documents"


def _older_layout(exc: BaseException) -> _OlderLayout | None:
    """The :class:`_OlderLayout` error ``exc`` is (alone in its groups, if any), or None."""
    leaves = _leaves(exc)
    return leaves[0] if len(leaves) == 1 and isinstance(leaves[0], _OlderLayout) else None


def _layout_upgrade_text(path: Path, layout: int) -> str:
    return f"the layout of SQLite store {path} from version {layout} to {SCHEMA_VERSION}"


def _migration_json(
    plan: _Plan | None, rewritten: int, *, dry_run: bool, upgrade: dict[str, int] | None
) -> dict[str, object]:
    """What ``migrate --json`` prints. No plan: a dry run on an older SQLite layout,
    whose documents are counted only once it is upgraded (the counts are null)."""
    by_version = None if plan is None else plan.by_version
    return {
        "documents": None if plan is None else plan.documents,
        "rewritten": rewritten,
        "dry_run": dry_run,
        "version": CURRENT_VERSION,
        "to_rewrite": None if plan is None else len(plan.outdated),
        "outdated": None if plan is None or by_version is None else len(plan.outdated),
        "by_version": None if by_version is None else {str(v): n for v, n in by_version.items()},
        "layout_upgrade": upgrade,
    }


@cli.command()
@click.option(
    "--dry-run", is_flag=True, help="Count the documents per stored schema version; write nothing."
)
@_common
def migrate(dry_run: bool, store_url: str, backend: str, as_json: bool) -> None:
    """Rewrite the stored documents that are below the current schema version.

    Each one is saved unchanged but for its revision (a compare-and-set, retried if the
    session changes meanwhile), so the store writes it at the current version. Documents
    already current keep their revision. A store that cannot tell which schema version
    its documents are stored at (SessionRepository.document_versions returns None) gets
    every document rewritten. A SQLite file of an older layout is upgraded first (with
    --dry-run: reported, and its documents counted only once it is upgraded).
    """

    async def act(repository: SessionRepository) -> tuple[_Plan, int]:
        with _progress(not as_json) as progress:
            task = progress.add_task("Reading the store", total=None)
            ids = await _all_ids(repository)
            progress.update(task, description="Reading schema versions")
            plan = await _plan_migration(repository, ids)
            progress.update(task, total=len(plan.outdated), completed=0)
            if dry_run:
                counted = plan.documents
                progress.update(task, total=counted, completed=counted, description="Counted")
                return plan, 0
            progress.update(task, description=f"Rewriting at version {CURRENT_VERSION}")
            rewritten = 0
            for sid in plan.outdated:
                rewritten += await _rewrite(repository, sid)
                progress.advance(task)
            return plan, rewritten

    _check_backend(backend)
    store = _store(store_url)  # a SQLite file of an older layout fails the open, untouched
    upgraded: int | None = None  # the older layout upgraded (or, dry run, to upgrade)
    try:
        plan: _Plan | None
        plan, rewritten = _on_store(store, backend, act)
    except Exception as exc:
        older = _older_layout(exc)
        if older is None:
            raise
        upgraded = older.layout
        plan, rewritten = None, 0
        if not dry_run:  # migrate upgrades it: opened again, upgrading
            plan, rewritten = _on_store(_store(store_url, writes=True), backend, act)
    upgrade = None if upgraded is None else {"from": upgraded, "to": SCHEMA_VERSION}
    if plan is None:  # a dry run on an older layout: the documents are counted once upgraded
        assert isinstance(store, SQLiteRepository)
        assert upgraded is not None
        if as_json:
            _print_json(_migration_json(None, 0, dry_run=True, upgrade=upgrade))
            return
        out.print(
            f"Would upgrade {_layout_upgrade_text(store.path, upgraded)} first: releases "
            f"that know layout {upgraded} at most refuse the file from then on, so stop "
            "the processes running one before you run migrate. Its documents can be "
            f"counted at layout {SCHEMA_VERSION} only, once it is upgraded; nothing was "
            "written."
        )
        return
    if as_json:
        _print_json(_migration_json(plan, rewritten, dry_run=dry_run, upgrade=upgrade))
        return
    if upgraded is not None:
        assert isinstance(store, SQLiteRepository)
        out.print(f"Upgraded {_layout_upgrade_text(store.path, upgraded)}.")
    if plan.by_version is None:
        note = (
            " This store cannot tell which schema version its documents are stored at, "
            "so every document is rewritten."
        )
    else:
        note = f" Found {_versions_text(plan.by_version)}."
        newer = sum(n for v, n in plan.by_version.items() if v > CURRENT_VERSION)
        if newer:
            note += (
                f" {newer} of them come from a newer release of asyncsession and are left "
                "as they are (upgrade asyncsession to read them)."
            )
    if dry_run:
        out.print(
            f"Would rewrite {len(plan.outdated)} of {plan.documents} documents at schema "
            f"version {CURRENT_VERSION}.{note}"
        )
    else:
        out.print(
            f"Rewrote {rewritten} of {plan.documents} documents at schema version "
            f"{CURRENT_VERSION}.{note}"
        )


# -- export / import ----------------------------------------------------------------------


#: How many times export lists the whole store again to confirm that every session the
#: store counts was listed, before it gives up.
CHECK_ATTEMPTS: Final = 3

#: How many times it counts the store (each right after listing its newest sessions)
#: before each of those listings.
COUNTS_PER_ATTEMPT: Final = 5

#: The size of the first page of :meth:`_Export.list_front`.
FRONT_PAGE: Final = 20


@attrs.frozen
class _Check:
    """What the completeness check of one export found."""

    stored: int  # the store's count
    unlisted: int  # counted, but in none of the listings (at least this many)
    unconfirmed: int  # counted, not matched to a listing, maybe created or deleted meanwhile


@attrs.frozen
class _Exported:
    """What ``export`` wrote, and what it had to leave out or could not confirm."""

    exported: int
    stored: int  # the store's count when the export checked it
    unreadable: int  # listed, but reading it failed
    unlisted: int  # counted by the store, but in none of its listings (at least this many)
    unconfirmed: int  # counted; maybe sessions created or deleted while it checked
    # stored sessions it could not write: unreadable ones, and quarantined documents
    damaged: frozenset[uuid.UUID] = frozenset()
    owner: str | None = None  # --owner: only this owner's sessions were exported
    # with an owner: unreadable sessions whose owner is unknown (maybe this one)
    unknown: int = 0

    @property
    def left_out(self) -> int:
        """Sessions known to be stored and not written."""
        return self.unreadable + self.unlisted

    @property
    def total(self) -> int:
        """Sessions known to be stored: the store's count, or more if more were seen."""
        return max(self.stored, self.exported + self.left_out)

    @property
    def skipped(self) -> bool:
        """Whether sessions that could not be read were left out (``--skip-unreadable``)."""
        return bool(self.unreadable or self.unknown)

    @property
    def complete(self) -> bool:
        """Whether every session stored throughout the export was written."""
        return not self.left_out and not self.unconfirmed and not self.unknown

    def succeeded(self, skip_unreadable: bool) -> bool:
        """Whether the export is complete or, with ``--skip-unreadable``, lacks only
        sessions known (by id) to be unreadable: a session that no listing showed may
        be a readable one the listings kept missing (touched meanwhile)."""
        return self.complete or (skip_unreadable and not self.unlisted and not self.unconfirmed)


def _stored(count: int, total: int, owner: str | None = None) -> str:
    """``"2 of the 3 stored sessions"`` (``"2 of this owner's 3 ..."`` with an owner)."""
    whose = "the" if owner is None else "this owner's"
    return f"{count} of {whose} {total} stored session{'s' if total != 1 else ''}"


@attrs.define
class _Export:
    """One export: the sessions written to ``output``, and those that could not be read."""

    repository: SessionRepository
    output: IO[bytes]
    name: str  # the output's, for errors
    owner: str | None = None  # export this owner's sessions only
    # every session any listing showed, and the order in which they were first listed
    listed: dict[uuid.UUID, int] = attrs.field(factory=dict)
    written: set[uuid.UUID] = attrs.field(factory=set)
    unreadable: set[uuid.UUID] = attrs.field(factory=set)
    gone: set[uuid.UUID] = attrs.field(factory=set)  # listed, then found deleted
    quarantined: set[uuid.UUID] = attrs.field(factory=set)  # a file store's, not listed
    # the sessions the store's listings skipped as unreadable (abc.log_skipped)
    skipped: list[uuid.UUID] = attrs.field(factory=list)
    # with an owner: unreadable sessions whose owner is unknown (maybe this one)
    unknown: set[uuid.UUID] = attrs.field(factory=set)
    _taken: int = 0

    def _newly_skipped(self) -> list[uuid.UUID]:
        """The sessions the listings skipped since the last call: listed, as unreadable
        ones. With an owner, a store that does not list by an owner column may have
        skipped another owner's: those are ``unknown`` instead."""
        new = self.skipped[self._taken :]
        self._taken += len(new)
        if self.owner is not None and not _lists_by_owner_column(self.repository):
            # until a listing of the owner's shows it (written then: see write())
            self.unknown.update(sid for sid in new if sid not in self.written)
            return []
        return new

    async def list_ids(self) -> list[uuid.UUID]:
        """List the whole store: the ids it holds, each once (a session whose
        ``last_active`` moved back while it was listed can be on two pages). The
        sessions the listing skipped because it could not read them count as listed:
        reading them fails, so they are counted as unreadable."""
        listed = await _all_ids(self.repository, self.owner)
        ids = list(dict.fromkeys([*listed, *self._newly_skipped()]))
        self._note(ids)
        return ids

    def _note(self, ids: Iterable[uuid.UUID]) -> None:
        for sid in ids:
            self.listed.setdefault(sid, len(self.listed))

    async def list_front(self) -> None:
        """List the store's newest sessions, up to the first page holding one listed
        before: sessions stored since the last listing (new or touched ones sort first)."""
        cursor: str | None = None
        limit = min(PAGE, FRONT_PAGE)  # quick to read: the count follows at once
        while True:
            query = SessionQuery(owner=self.owner, limit=limit, cursor=cursor)
            page = await self.repository.list(query)
            limit = PAGE
            ids = [session.id for session in page.items] + self._newly_skipped()
            reached = any(sid in self.listed for sid in ids)
            self._note(ids)
            if reached or page.next_cursor is None:
                return
            cursor = page.next_cursor

    def done(self, sid: uuid.UUID) -> bool:
        """Whether session ``sid`` was written, or found unreadable, already."""
        return sid in self.written or sid in self.unreadable

    async def write(self, sid: uuid.UUID, *, listed: bool = True) -> bool:
        """Read session ``sid`` and write it out; return whether it is stored (a session
        that cannot be read is stored, and counted as unreadable). With an owner, another
        owner's session is not written, and counts as not stored; a session no listing
        of the owner's showed (not ``listed``: a file store's unreadable entry) that
        cannot be read is ``unknown``."""
        try:
            session = await self.repository.get(sid)
            if session is not None and self.owner is not None and session.owner != self.owner:
                if listed:
                    logger.warning(
                        "session %s, listed as this owner's, belongs to another owner now: "
                        "not exported",
                        sid,
                    )
                return False
            # messages may be decoded lazily, so a damaged one can fail dumps() too
            line = None if session is None else dumps(session) + b"\n"
        except SerializationError as exc:
            logger.warning("cannot export session %s: %s", sid, exc)
            self._unreadable(sid, listed)
            return True
        if line is None:
            return False
        try:
            _write_all(self.output, line)
        except OSError as exc:
            raise _WriteFailed(_os_failure(f"write {self.name}", exc).message) from exc
        self.written.add(sid)
        self.unknown.discard(sid)  # a listing skipped it once; it is the owner's
        return True

    def _unreadable(self, sid: uuid.UUID, listed: bool) -> None:
        """Count session ``sid`` as unreadable: the owner's if a listing of the owner's
        showed it (or there is no owner), else ``unknown``."""
        if listed or self.owner is None:
            self.unknown.discard(sid)
            self.unreadable.add(sid)
        else:
            self.unknown.add(sid)

    async def exists(self, sid: uuid.UUID) -> bool:
        """Whether session ``sid`` is stored now (readable or not; with an owner, as
        that owner's: one handed to another owner meanwhile is not in its count)."""
        try:
            session = await self.repository.get(sid, last_messages=0)
        except SerializationError:
            return True
        return session is not None and (self.owner is None or session.owner == self.owner)

    async def check(self) -> _Check:
        """Write what the earlier listings missed; confirm that the store holds no
        session that no listing shows (listings skip the sessions they cannot read).

        The store's newest sessions are listed (:meth:`list_front`) and the store is
        counted at once, :data:`COUNTS_PER_ATTEMPT` times; then the whole store is
        listed. A session listed before a count and still stored after the whole
        listing (listed again, or read) was stored when it was counted: it is ``known``
        to that count. A count holding no more sessions than are known to it proves that
        every session stored then was listed, and so written or counted as unreadable.
        Otherwise the ``excess`` sessions it counted are either in no listing, or
        sessions whose place in the count is unknown: first listed after it (created
        just before it, or just after; stored still or deleted since), or listed before
        it and deleted since (before it, or after). A count is only a number, so no
        listing can tell which: only an excess larger than those ``uncertain`` sessions
        proves that sessions were left out (``unlisted``); a smaller one is
        ``unconfirmed``, the store having changed.
        This runs up to :data:`CHECK_ATTEMPTS` times, until a count proves the export
        complete. Listing the newest sessions right before each count keeps the time in
        which a session stored is uncertain short, so a store under steady traffic
        usually gets a count with none.
        """
        counts: list[tuple[int, int, int]] = []  # (stored, excess, uncertain)
        for _ in range(CHECK_ATTEMPTS):
            attempt: list[tuple[int, int]] = []
            for _ in range(COUNTS_PER_ATTEMPT):
                await self.list_front()
                stored = sum((await self.repository.count_by_status(self.owner)).values())
                attempt.append((stored, len(self.listed)))
            listed_before = attempt[-1][1]
            after = await self.list_ids()
            still = set(after)
            for sid in after:
                if not self.done(sid):
                    await self.write(sid)
            known: list[int] = []  # when each session known to a count was first listed
            gone: list[int] = []  # ... each one listed before the counts and deleted since
            for sid, order in self.listed.items():
                if order >= listed_before:
                    break
                if sid in still:
                    known.append(order)
                elif sid in self.gone:
                    continue
                elif await (self.exists(sid) if self.done(sid) else self.write(sid)):
                    known.append(order)  # stored before and after the counts
                else:
                    self.gone.add(sid)
                    gone.append(order)
            for stored, listed in attempt:
                excess = max(0, stored - bisect.bisect_left(known, listed))
                if not excess:
                    return _Check(stored, 0, 0)
                # first listed after this count (stored still or not), or deleted since
                uncertain = len(self.listed) - listed + bisect.bisect_left(gone, listed)
                counts.append((stored, excess, uncertain))
        proven = [(excess - uncertain, stored) for stored, excess, uncertain in counts]
        if any(unlisted > 0 for unlisted, _ in proven):
            unlisted, stored = min(x for x in proven if x[0] > 0)
            return _Check(stored, unlisted, 0)
        excess, stored = min((excess, stored) for stored, excess, _ in counts)
        return _Check(stored, 0, excess)

    async def set_aside(self, repository: FileRepository) -> None:
        """Account for the file store's documents that none of its listings or counts hold.

        Those it cannot read (a newer release's, permissions, I/O errors) are read here:
        they fail the export (with an owner, as ``unknown``: whose they are is unknown).
        A quarantined document of a session the export listed but did not write was
        found damaged while the export ran (by a rescan of the store, or by another
        process's read), after which its session reads as deleted: it is unreadable
        too. The other documents in quarantine are only a warning, unless there is an
        owner: whose they are is unknown, so they are ``unknown`` too.
        """
        for sid, _ in await repository.unreadable():
            if self.done(sid) or sid in self.unknown:
                continue
            try:
                await self.write(sid, listed=False)
            except StorageError as exc:  # this entry only: its read failed before
                logger.warning("cannot export session %s: %s", sid, exc)
                self._unreadable(sid, listed=False)
        kept: list[Path] = []
        restored: list[Path] = []
        for sid, path in await repository.quarantined():
            if sid in self.listed and not self.done(sid):
                logger.warning(
                    "cannot export session %s: its document was found damaged and moved "
                    "to %s while the export ran",
                    sid,
                    path,
                )
                self.unreadable.add(sid)
            elif sid in self.written:  # restored since (imported again, say)
                restored.append(path)
            else:
                kept.append(path)
                self.quarantined.add(sid)
                if self.owner is not None:  # it may be the owner's: as delete --owner
                    self.unknown.add(sid)
        if restored:
            logger.warning(
                "%s holds the old, damaged document%s of %d session%s restored since (and "
                "exported): delete %s once you no longer need %s.",
                restored[0].parent,
                "" if len(restored) == 1 else "s",
                len(restored),
                "" if len(restored) == 1 else "s",
                "it" if len(restored) == 1 else "them",
                "it" if len(restored) == 1 else "them",
            )
        if kept:
            logger.warning(
                "%s holds %d quarantined session document%s, not exported%s: the store "
                "moves the documents it finds damaged there and never deletes them. Repair "
                "one and move it back into sessions/ (without its checksum field), or "
                "delete it.",
                kept[0].parent,
                len(kept),
                "" if len(kept) == 1 else "s",
                "" if self.owner is None else " (whose they are is unknown)",
            )


async def _export(
    repository: SessionRepository,
    output: IO[bytes],
    name: str,
    show_progress: bool,
    owner: str | None = None,
) -> _Exported:
    """Write every session the store lists to ``output`` (of ``owner`` only, if given);
    count those it could not.

    Every listed session is read and written, once. Then :meth:`_Export.check` lists the
    store again: sessions the first listing missed are written too, and sessions the
    store counts but no listing shows (listings skip sessions they cannot read, with a
    warning) are counted as left out, or as unconfirmed when sessions created or deleted
    meanwhile may account for them. A listed session whose read fails (damaged messages,
    say) is skipped with a warning and counted too; other errors (the store is
    unreachable...) stop the export. Sessions created or deleted while the export runs
    fail it only when they keep the check from confirming it; those created may be
    exported too. A file store is also asked for the documents it leaves out of listings
    and counts (:meth:`_Export.set_aside`).
    """
    export = _Export(repository, output, name, owner)
    with _progress(show_progress) as progress, _collecting_skipped() as skipped:
        export.skipped = skipped
        task = progress.add_task("Reading the store", total=None)
        ids = await export.list_ids()
        progress.update(task, total=len(ids), completed=0, description="Exporting")
        for sid in ids:  # once each: list_ids() drops repeats
            await export.write(sid)
            progress.advance(task)
        progress.update(task, description="Checking")
        check = await export.check()
        if isinstance(repository, FileRepository):
            await export.set_aside(repository)
    try:
        _flush(output)
    except OSError as exc:
        raise _WriteFailed(_os_failure(f"write {name}", exc).message) from exc
    return _Exported(
        len(export.written),
        check.stored,
        len(export.unreadable),
        check.unlisted,
        check.unconfirmed,
        frozenset(export.unreadable | export.quarantined | export.unknown),
        owner,
        len(export.unknown),
    )


def _mentioned_in(path: str, ids: Collection[uuid.UUID]) -> set[uuid.UUID]:
    """The ``ids`` whose text occurs in file ``path`` (all of them if it cannot be read:
    it may hold them). One pass over the file, whatever the number of ids."""
    wanted = {str(sid).encode(): sid for sid in ids}
    found: set[uuid.UUID] = set()
    try:
        with open(path, "rb") as file:
            tail = b""
            while chunk := file.read(1 << 20):
                data = tail + chunk
                for text in _UUID_TEXT.findall(data):
                    sid = wanted.get(text.lower())  # other tools may write UUIDs in capitals
                    if sid is not None:
                        found.add(sid)
                tail = data[-35:]  # an id split across two chunks
    except OSError:
        return set(ids)
    return found


_UUID_TEXT: Final = re.compile(
    rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE
)


def _written(result: _Exported) -> str:
    """``"the 2 sessions written"`` (``"the session written"`` for one)."""
    if result.exported == 1:
        return "the session written"
    return f"the {result.exported} sessions written"


def _incomplete(result: _Exported) -> str:
    """What an export that is not complete says about the sessions it may have missed."""
    text = ""
    if result.left_out:
        parts = []
        if result.unreadable:
            parts.append(f"{result.unreadable} could not be read (see the warnings above)")
        if result.unlisted:
            one = result.unlisted == 1
            parts.append(
                f"{result.unlisted} {'was' if one else 'were'} counted by the store but "
                f"{'is' if one else 'are'} in none of its listings (listings skip unreadable "
                "sessions: see the warnings above; if the store kept changing while the "
                "export checked it, export again)"
            )
        were = "was" if result.left_out == 1 else "were"
        text = f"{_stored(result.left_out, result.total, result.owner)} {were} not exported: "
        text += "; ".join(parts) + "."
    if result.unknown:
        unknown = (
            f"{_plural(result.unknown, 'session')} could not be read, so whether "
            f"{'it is' if result.unknown == 1 else 'they are'} this owner's is unknown (see "
            "the warnings above)."
        )
        text = f"{text} {unknown}" if text else unknown
    if result.unconfirmed:
        changing = (
            "the store kept changing while the export checked it (sessions were created or "
            "deleted meanwhile), so it could not confirm that every stored session was "
            "exported; export again."
        )
        text = f"{text} Also, {changing}" if text else changing
    return text


@cli.command("export")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, allow_dash=True),
    default="-",
    show_default=True,
    help="JSON Lines file to write (- for stdout). It is replaced only by an export that "
    "succeeds: a failed one leaves it as it was, and so does one that could not read a "
    "session this file holds (its last good copy, maybe). A new file is readable by you "
    "only (0600, less the umask); a replaced one keeps its read/write/execute permissions, and its "
    "owner and group as far as you may set them (if the group cannot be kept, the new file "
    "gives its group no access). A FIFO, a device or /dev/stdout is written in place, like stdout.",
)
@click.option(
    "--skip-unreadable",
    is_flag=True,
    help="Write the sessions that can be read and exit 0 when others cannot (damaged "
    "ones, or a newer release's): the warnings name them, and the summary counts them.",
)
@click.option(
    "--owner",
    help="Only the sessions of this owner (expired and closed ones too), e.g. for an "
    "access request.",
)
@_store_option
@_backend_option
def export_sessions(
    output: str, skip_unreadable: bool, owner: str | None, store_url: str, backend: str
) -> None:
    """Write every stored session (or every one of an --owner) as JSON Lines
    (asyncsession.dumps documents).

    Fails (status 1) if any session could not be read (the store's warnings say which;
    --skip-unreadable writes the others), or if sessions were created or deleted around
    every one of its counts of the store so that it could not confirm it missed none,
    leaving the --output file as it was; on stdout, what was written is then incomplete.
    A session its listing missed (touched meanwhile) is found by listing the store
    again, and written too.
    """
    _check_backend(backend)
    if owner is not None:
        owner = _checked_owner(owner)
    if output == "-" or _written_in_place(output):
        if output != "-":
            _output_target(output, "--output")  # not another user's FIFO or link in /tmp
        store = _store(store_url)
        if output != "-":
            _check_not_the_store(output, "--output", store)
        try:
            if output == "-":
                result = _on_store(
                    store,
                    backend,
                    lambda repo: _export(repo, sys.stdout.buffer, "stdout", False, owner),
                )
            else:
                # The shell's redirection, opened before the event loop and the store
                # open descriptors of their own that /dev/fd/N could then name.
                alias = _FD_ALIAS.fullmatch(os.path.abspath(output))
                opened = _open_appended(output, blocking=True) if alias else None
                try:
                    result = _on_store(
                        store, backend, lambda repo: _export_in_place(repo, output, opened, owner)
                    )
                finally:
                    if opened is not None:
                        with contextlib.suppress(OSError):  # what failed the export (it flushed)
                            opened.close()
        except _WriteFailed as exc:  # a closed pipe (| head), a full disk...
            raise CLIError(
                f"{exc.message} The output is incomplete: the export stopped there."
            ) from exc
        if result.unlisted or (result.skipped and not skip_unreadable):
            raise CLIError(
                f"{_incomplete(result)} The output is incomplete: {_written(result)} "
                f"{'is' if result.exported == 1 else 'are'} not a complete export."
            )
        if result.unconfirmed:
            raise CLIError(
                f"{_incomplete(result)} The output may be incomplete: {_written(result)} "
                "may not be a complete export."
            )
    else:
        _check_output_file(output, "--output", replaced=True)
        kept = "was left as it was" if os.path.lexists(output) else "was not written"
        try:
            store = _store(store_url)  # refused before a new file is made beside the output
            _check_not_the_store(output, "--output", store)
            with _replacing(output, "--output") as stream:
                result = _on_store(
                    store, backend, lambda repo: _export(repo, stream, output, True, owner)
                )
                if not result.succeeded(skip_unreadable):
                    raise CLIError(_incomplete(result))
                held = _mentioned_in(output, result.damaged) if os.path.exists(output) else ()
                if held:
                    raise CLIError(
                        f"{output} holds an earlier export with the last good copy of "
                        f"{_plural(len(held), 'stored session')} that "
                        "cannot be read now (see the warnings above): export to a new file, "
                        f"and keep {output} to restore {'it' if len(held) == 1 else 'them'} from."
                    )
        except Exception as exc:
            expected = _expected(exc)
            if expected is None:
                raise
            message, exit_code = expected
            raise CLIError(f"{message} The export failed: {output} {kept}.", exit_code) from exc
    count = result.exported
    summary = f"Exported {_plural(count, 'session')}{'' if owner is None else ' of this owner'}"
    if result.unreadable:  # --skip-unreadable
        summary = (
            f"Exported {_stored(count, result.total, owner)}; skipped {result.unreadable} "
            "that could not be read"
        )
    if result.unknown:  # --skip-unreadable, with --owner
        summary += (
            f"; skipped {_plural(result.unknown, 'session')} that could not be read, whose "
            "owner is unknown"
        )
    err.print(f"{summary} (see the warnings above)." if result.skipped else f"{summary}.")


#: How often an export retries opening a FIFO that has no reader yet, in seconds.
_FIFO_RETRY: Final = 0.05


async def _export_in_place(
    repository: SessionRepository, output: str, opened: IO[bytes] | None, owner: str | None
) -> _Exported:
    """Export the open ``repository`` into ``output``, a FIFO, a device or the name of an
    open file descriptor (:func:`_written_in_place`; that one already ``opened``),
    appended to: an fd alias may stand for a redirection with ``>>`` (the shell has
    already emptied a ``>`` one).

    A FIFO or a device is opened only now that the store is open: opening a FIFO wakes
    its reader, and a store that then failed to open would have given it an empty stream
    and end-of-file, which ``gzip < fifo > backup.gz`` takes for a complete, empty
    export. A FIFO that has no reader yet is waited for (the open is retried without
    blocking, so Ctrl-C still cancels the export).
    """
    if opened is not None:
        return await _export(repository, opened, output, False, owner)
    while (stream := _open_appended(output, blocking=False)) is None:  # noqa: ASYNC110
        await anyio.sleep(_FIFO_RETRY)  # a reader's arrival has no event to wait on
    try:
        return await _export(repository, stream, output, False, owner)
    finally:
        with contextlib.suppress(OSError):  # what failed the export (it flushed)
            stream.close()


def _open_appended(output: str, *, blocking: bool) -> IO[bytes] | None:
    """``output`` (see :func:`_export_in_place`) opened to append to; None, when not
    ``blocking``, for a FIFO that has no reader yet. :class:`CLIError` (exit 2) if it
    cannot be opened."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | (0 if blocking else os.O_NONBLOCK)
    try:
        fd = os.open(output, flags, EXPORT_FILE_MODE)
    except OSError as exc:
        # ENXIO: a FIFO without a reader (a device without its driver: refused)
        if not blocking and exc.errno == errno.ENXIO and _is_fifo(output):
            return None
        raise CLIError(
            f"--output {output} cannot be written: {exc.strerror}.", exit_code=2
        ) from exc
    try:
        os.set_blocking(fd, True)
        return open(fd, "ab")
    except BaseException:
        os.close(fd)
        raise


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def _source_name(source: IO[bytes]) -> str:
    name = getattr(source, "name", None)
    return name if isinstance(name, str) and not name.startswith("<") else "the input"


def _read_lines(source: IO[bytes]) -> list[Session]:
    sessions: list[Session] = []
    seen: set[uuid.UUID] = set()
    for number, line in enumerate(source, 1):
        if not line.strip():
            continue
        try:
            session = loads(line)
        except CorruptSessionError as exc:
            raise CLIError(
                f"line {number} of {_source_name(source)} is not a session document "
                f"({exc.detail}); nothing was imported."
            ) from exc
        except SessionError as exc:
            raise CLIError(
                f"line {number} of {_source_name(source)}: {exc} Nothing was imported."
            ) from exc
        if session.id in seen:
            raise CLIError(f"line {number}: session {session.id} appears twice in the input.")
        seen.add(session.id)
        sessions.append(session)
    return sessions


async def _replace(repository: SessionRepository, session: Session) -> bool:
    """Store an imported session over the one stored under its id, in one compare-and-set.

    The stored session is replaced by ``session`` with the next revision, so running
    applications see a new revision (their held snapshots and conditional reads no longer
    match) and an update they based on the old contents is refused. A session that is
    not stored is added with its exported revision, or, when it was stored a moment ago
    (deleted in between), with a revision above every one this import saw it at (read,
    or reported by a refused save). A stored session that had expired by the imported
    one's last activity cannot be saved over (see ``SessionRepository.save``): if it has
    expired by now, it is removed as expired (as ``delete`` does) and ``session`` added
    in its place; if not, :class:`InvalidUpdate` says to delete it first. Returns True
    when a stored session was replaced; raises :class:`SessionConflict` (with
    ``attempts``) when other writers beat every attempt, in which case the stored session
    was left as it was.
    """
    seen: int | None = None  # the highest stored revision this import learnt of
    expired_replaced = False

    def saw(revision: int | None) -> None:
        nonlocal seen
        if revision is not None and (seen is None or revision > seen):
            seen = revision

    async def step(attempt: int) -> bool:
        nonlocal expired_replaced
        stored = await repository.get(session.id, last_messages=0)
        if stored is None:
            if seen is None or session.revision > seen:
                await repository.add(session)
            else:
                await repository.add(_bumped(session, seen))
            return expired_replaced
        saw(stored.revision)
        if SessionRepository._save_finds_expired(session, stored.expires_at, stored.status):
            if await _remove_if_expired(repository, session.id):
                expired_replaced = True
                raise SessionNotFound(session.id)  # gone: the next attempt adds it
            raise InvalidUpdate(
                f"it is stored with a deadline ({stored.expires_at}) at or before the "
                f"imported copy's last activity ({session.last_active}), which is still "
                "ahead: a save finds it expired then, and it is live until then. Delete it "
                f"first (asyncsession delete {session.id}), then import again with --replace."
            )
        try:
            await repository.save(
                _bumped(session, stored.revision),
                expected_revision=stored.revision,
            )
        except SessionConflict as exc:  # the revision another writer saved counts too
            saw(exc.actual_revision)
            raise
        return True

    return await _until_saved(session.id, step)


@cli.command("import")
@click.argument("source", type=click.File("rb"), default="-")
@click.option(
    "--replace",
    is_flag=True,
    help="Overwrite sessions that already exist; each gets the next revision of the "
    "stored one (one compare-and-set), so running applications see the change.",
)
@_store_option
@_backend_option
def import_sessions(source: IO[bytes], replace: bool, store_url: str, backend: str) -> None:
    """Add the sessions of a JSON Lines export (ids, times and revisions kept).

    Without --replace nothing is imported if any of the sessions already exists. With
    --replace an existing session is overwritten by the imported one in a single
    compare-and-set (never deleted first) and gets the stored revision plus one, so
    applications running on the store see a new revision and stop using what they
    remembered of it; sessions that do not exist yet keep their exported revision.
    """
    _check_backend(backend)
    store = _store(store_url, creates=True)  # refused before the input is read
    sessions = _read_lines(source)

    async def act(repository: SessionRepository) -> tuple[int, int]:
        # Read every target first (also with --replace): a store that fails to read
        # fails before anything is written.
        existing = []
        for session in sessions:
            try:
                if await repository.get(session.id, last_messages=0):
                    existing.append(session.id)
            except CorruptSessionError as exc:  # what a backup is for, but not over it
                raise CLIError(
                    f"session {session.id} is stored in {shown_url(store_url)} but cannot "
                    f"be read ({exc.detail}); nothing was imported. Delete it first "
                    f"(asyncsession delete {session.id}), then import again."
                ) from exc
        if existing and not replace:
            raise CLIError(
                f"{len(existing)} of the {len(sessions)} sessions already exist in "
                f"{shown_url(store_url)} (first: {existing[0]}); nothing was imported. "
                "Pass --replace to overwrite them."
            )
        replaced = 0
        done = 0

        def so_far() -> str:
            return (
                f"{done} of the {len(sessions)} sessions were imported before the "
                "interruption (the one under way perhaps too); run the import again with "
                "--replace to finish."
            )

        with _noted_if_interrupted(so_far), _progress() as progress:
            task = progress.add_task("Importing", total=len(sessions))
            for done, session in enumerate(sessions):  # so_far() reads done
                try:
                    if replace:
                        replaced += await _replace(repository, session)
                    else:
                        await repository.add(session)
                except SessionConflict as exc:
                    if exc.attempts is not None:
                        what = (
                            f"kept changing while importing it ({exc.attempts} attempts) "
                            "and was left as it was"
                        )
                        hint = "Run the import again with --replace to finish."
                    else:
                        what = "was added by someone else during the import"
                        hint = "Pass --replace to overwrite it."
                    raise CLIError(
                        f"session {session.id} {what}; {done} of the {len(sessions)} sessions "
                        f"were imported before it. {hint}"
                    ) from exc
                except SessionError as exc:  # storage errors, lock timeouts, limits, ...
                    hint = (
                        "; run the import again with --replace to finish."
                        if exc.recoverable
                        else "."
                    )
                    raise CLIError(
                        f"session {session.id}: {exc} {done} of the {len(sessions)} sessions "
                        f"were imported before it{hint}",
                        exit_code=2 if isinstance(exc, ValidationError) else 1,
                    ) from exc
                progress.advance(task)
        return len(sessions), replaced

    added, replaced = _on_store(store, backend, act)
    now = datetime.now(timezone.utc)
    expired = sum(1 for s in sessions if s.expires_at is not None and s.expires_at <= now)
    notes = [f"{replaced} replaced"] if replaced else []
    if expired:
        notes.append(
            f"{expired} already past their deadline: stores treat them as gone, and Redis "
            "may delete them at once"
        )
    note = f" ({'; '.join(notes)})" if notes else ""
    err.print(f"Imported {added} session{'s' if added != 1 else ''}{note}.")


# -- entry point --------------------------------------------------------------------------


def _leaves(exc: BaseException) -> list[BaseException]:
    inner = getattr(exc, "exceptions", None)
    if isinstance(inner, tuple):
        return [leaf for e in inner for leaf in _leaves(e)]
    return [exc]


def _expected(exc: BaseException) -> tuple[str, int] | None:
    """The one-line message and exit status of an expected failure, else None."""
    for leaf in _leaves(exc):
        if isinstance(leaf, CLIError):
            return leaf.message, leaf.exit_code
        if isinstance(leaf, ValidationError):
            return str(leaf), 2
        if isinstance(leaf, _OlderLayout):  # a command that only reads: see _store
            url = "sqlite:///" + urllib.parse.quote(os.fspath(leaf.path), safe="/")
            return (
                f"the SQLite store {leaf.path} has layout version {leaf.layout}, older than "
                f"this asyncsession's ({leaf.supported}); commands that only read leave it "
                f"as it is. Run `asyncsession migrate --store {url}` to upgrade it "
                f"(releases that know layout {leaf.layout} at most then refuse the file: "
                "stop the processes running one first), or use the release that wrote it."
            ), 1
        if isinstance(leaf, _BusyAtOpen):  # its advice, busy_timeout=, is not an option here
            return (
                f"the SQLite store {leaf.path} is busy: another process held its write lock "
                f"for the {leaf.waited:g}s this command waits (an upgrade of an older layout, "
                "say): retry when it is done."
            ), 1
        if isinstance(leaf, SessionError):
            return str(leaf), 1
        if isinstance(leaf, OSError):
            return f"{leaf.strerror or leaf}: {leaf.filename or ''}".rstrip(": ") + ".", 1
    return None


def _fail(message: str) -> None:
    line = " ".join(message.split())
    with contextlib.suppress(OSError):  # a stderr that cannot be written: the status says it
        sys.stderr.write(f"asyncsession: error: {line}\n")
        _flush(sys.stderr)


class _LogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += f" ({record.exc_info[1]})"
        return f"asyncsession: {record.levelname.lower()}: {' '.join(text.split())}"


class _Once(logging.Filter):
    """Let each message through once: ``export`` lists the store several times, and a
    store warns of an unreadable session at every listing."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether ``record``'s message is new (it is remembered if so)."""
        text = record.getMessage()
        if text in self._seen:
            return False
        self._seen.add(text)
        return True


@contextlib.contextmanager
def _log_to_stderr() -> Iterator[None]:
    """Show the library's warnings (e.g. a quarantined document) on the current stderr,
    as one line each, once, for one run of the command line; then put the library's
    logger back as it was. A logger that already has handlers (a program embedding the
    command line configured it) is left alone."""
    library = logging.getLogger("asyncsession")
    if library.handlers:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormatter())
    handler.addFilter(_Once())
    level, propagate = library.level, library.propagate
    library.addHandler(handler)
    library.setLevel(logging.WARNING)
    library.propagate = False
    try:
        yield
    finally:
        library.removeHandler(handler)
        library.setLevel(level)
        library.propagate = propagate


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the status.

    Ctrl-C ends it with status 130 (128 + SIGINT); a closed output (``| head``) quietly
    with :data:`OUTPUT_CLOSED` (141, 128 + SIGPIPE), but for ``export``, which then says
    that its output is incomplete (status 1). An output that cannot be written otherwise
    (a full disk) ends it with one line and status 1. Each call starts with new consoles,
    so a program may call it again after a run whose output was closed.
    """
    global out, err, _ctrl_c
    out, err = _console("stdout"), _console("stderr")
    ctrl_c = _ctrl_c = _CtrlC()
    ctrl_c.install()
    try:
        with _log_to_stderr():
            status = _run(argv)
    finally:
        _ctrl_c = None
        ctrl_c.uninstall()
    failure = _flushed(sys.stdout)
    if failure is not None and status == 0:
        if failure.errno == errno.EPIPE:
            status = OUTPUT_CLOSED
        else:
            _fail(_os_failure("write stdout", failure).message)
            status = 1
    _flushed(sys.stderr)
    return status


def _flushed(stream: IO[str]) -> OSError | None:
    """Flush ``stream``; return the error if it cannot be written (its reader went away,
    the disk is full...). What it still holds is then discarded, written to os.devnull
    (as the Python documentation's note on SIGPIPE does), instead of failing again at
    exit ("Exception ignored ... BrokenPipeError") or coming out at a later flush. Its
    file descriptor is left on os.devnull only when the process ends after this run
    (:func:`_process_ends`); an embedding program keeps its own."""
    try:
        _flush(stream)
        return None
    except OSError as exc:
        failure = exc
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # not a file (an embedding program's capture)
        return failure
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        if _process_ends():
            os.dup2(devnull, fd)
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
            return failure
        kept = os.dup(fd)
        try:
            os.dup2(devnull, fd)
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        finally:
            os.dup2(kept, fd)
            os.close(kept)
    finally:
        os.close(devnull)
    return failure


def _process_ends() -> bool:
    """Whether the process ends when :func:`run` returns: it runs as ``python -m
    asyncsession`` or as the ``asyncsession`` console script (whose ``__main__`` module
    imported :func:`asyncsession.__main__.main`), not in a program that embeds it."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if getattr(spec, "name", None) == f"{__package__}.__main__":
        return True
    entry = getattr(sys.modules.get(f"{__package__}.__main__"), "main", None)
    return entry is not None and getattr(main, "main", None) is entry


_INTERRUPTED: Final = 130  # 128 + SIGINT, as shells report for a program Ctrl-C ended


def _run(argv: Sequence[str] | None) -> int:
    args = list(argv) if argv is not None else sys.argv[1:]
    try:
        result = cli.main(args=args, prog_name="asyncsession", standalone_mode=False)
    except click.ClickException as exc:
        _from_the_environment(exc, args).show()
        return exc.exit_code
    except click.Abort as exc:  # click's stand-in for a KeyboardInterrupt or an EOFError
        if isinstance(exc.__cause__, KeyboardInterrupt):
            return _interrupted()
        _fail("aborted.")
        return 1
    except SystemExit:
        # click's own answer to a closed stdout (writing --help, say): exit 1, after it
        # made sys.stdout ignore the failure of its last flush
        # (by its name: click 8.5 renamed the class _PacifyFlushWrapper)
        if type(sys.stdout).__name__.lstrip("_") == "PacifyFlushWrapper":
            return OUTPUT_CLOSED
        raise
    except BaseException as exc:
        leaves = _leaves(exc)
        # on trio, Ctrl-C may come out of a task group, wrapped in an exception group;
        # on Python 3.10, anyio's asyncio runner turns it into the cancellation of the
        # main task, which nothing else cancels: an asyncio CancelledError gets out
        cancelled = getattr(sys.modules.get("asyncio"), "CancelledError", KeyboardInterrupt)
        if any(isinstance(leaf, (KeyboardInterrupt, cancelled)) for leaf in leaves):
            return _interrupted()
        if any(isinstance(leaf, _OutputClosed) for leaf in leaves):
            return OUTPUT_CLOSED
        expected = _expected(exc) if isinstance(exc, Exception) else None
        if expected is None:
            raise
        _fail(expected[0])
        return expected[1]
    return result if isinstance(result, int) else 0


def _from_the_environment(exc: click.ClickException, args: list[str]) -> click.ClickException:
    """A bad ``--backend`` that came from ASYNCSESSION_BACKEND, named as such (click
    names the option, which the command line did not have); else ``exc``."""
    value = os.environ.get("ASYNCSESSION_BACKEND")
    param = getattr(exc, "param", None)
    if (
        not isinstance(exc, click.BadParameter)
        or param is None
        or param.name != "backend"
        or value is None
        or any(arg == "--backend" or arg.startswith("--backend=") for arg in args)
    ):
        return exc
    return click.UsageError(
        f"ASYNCSESSION_BACKEND={value!r} is not an event loop: set it to asyncio or trio, "
        "or unset it.",
        ctx=exc.ctx,
    )


_said_interrupted = False  # "asyncsession: interrupted." is on stderr


@contextlib.contextmanager
def _noted_if_interrupted(note: Callable[[], str]) -> Iterator[None]:
    """Say ``note()`` on stderr (how far the work got, what to do) if Ctrl-C (a
    KeyboardInterrupt or a cancellation, not an error) interrupts the block, before
    "asyncsession: interrupted."."""
    try:
        yield
    except BaseException as exc:
        if not isinstance(exc, Exception):
            with contextlib.suppress(Exception):
                err.print(_plain(note()))
        raise


def _exit_interrupted() -> NoReturn:
    """End the process at once, as interrupted (a second Ctrl-C; see :class:`_CtrlC`)."""
    if not _said_interrupted:
        with contextlib.suppress(OSError):
            os.write(2, b"\nasyncsession: interrupted.\n")
    os._exit(_INTERRUPTED)


def _interrupted() -> int:
    """Say the command was interrupted; return its exit status."""
    global _said_interrupted
    with contextlib.suppress(OSError):
        _flush(sys.stderr)  # what the command wrote comes first
        # Marked said before the line is written: a second Ctrl-C landing just after the
        # write ends the process without a line of its own (marked after, the line came
        # out twice). Its handler runs in between only while stderr blocks (a full pipe:
        # the process then ends at once, as a second Ctrl-C should, without the line) or,
        # on Python 3.10, which checks for signals at every bytecode, in the few bytecodes
        # before the call.
        _said_interrupted = True
        sys.stderr.write("asyncsession: interrupted.\n")  # stderr is line-buffered
        _flush(sys.stderr)
    _said_interrupted = True
    return _INTERRUPTED
