"""Directory store: one human-readable JSON document per session.

Layout of ``directory``::

    sessions/<uuid>.json        the session, pretty-printed versioned JSON
    sessions/.tmp-<uuid>-*.json a write in progress (never read as data)
    locks/<uuid>.lock           the session's lock file (``fcntl.flock``)
    quarantine/<uuid>[.n].json  documents that could not be read (never deleted)

Every write goes to a temporary file in ``sessions/``, is fsynced, renamed over the
document with :func:`os.replace` and the directory is fsynced: a reader sees the old or
the new document, never a mix, and a crash leaves at most a stale temporary file and a
lock file without a document (both removed at the next open). Each operation holds the
session's lock file (taken with non-blocking attempts and backoff, so waiting never blocks
a thread or the event loop) and checks the stored revision under it, so several processes
can share one directory.

Only this module knows the layout; documents are exactly what :func:`asyncsession.loads`
reads, plus a ``checksum`` field (BLAKE2b of the compact document) that detects damage a
JSON parser cannot, such as a flipped byte inside a message. A document without
``checksum`` (written by hand, or an older schema version) is validated in full and
migrated; its next write adds the checksum. A document that cannot be read is moved to
``quarantine/`` and reported as :class:`CorruptSessionError`; other sessions keep working.
An entry that cannot be read at all (permissions, I/O error, a directory with a document's
name) is logged once and left out of listings (an error that may pass, such as EIO or
EMFILE, is read again by a scan every 30 s); reading that session raises
:class:`StorageError` naming the file. A session that expiry or a scan must pass over for
now (locked by another process, a damaged document that cannot be quarantined yet) is
tried again each time but warned about once per cause, and logged at info level when it
is dealt with at last. Ids become file names only as canonical UUIDs, so no input can
name another path; and no entry of ``sessions/`` or ``locks/`` is followed out of the
store (whoever shares the directory may replace one): a document that is a symbolic link,
a FIFO, a socket or a device is neither followed nor read, and is quarantined as it is
(a link itself, never its target); a lock file that is a symbolic link raises
:class:`StorageError`.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import functools
import hashlib
import heapq
import hmac
import itertools
import logging
import os
import secrets
import stat
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import anyio
import anyio.lowlevel
import anyio.to_thread
import attrs
import orjson

from .._clock import to_seconds
from .._exceptions import (
    MAX_REVISION,
    CorruptSessionError,
    InvalidConfiguration,
    SchemaVersionError,
    SerializationError,
    SessionClosed,
    SessionConflict,
    SessionLocked,
    SessionNotFound,
    StorageError,
    check_flag,
    revision_exhausted,
    tilde_note,
    too_many_messages,
)
from .._locks import KeyedLocks
from .._migrations import CURRENT_VERSION, document_version
from .._models import (
    ExpiryPolicy,
    Message,
    MessageLog,
    Session,
    SessionStatus,
)
from .._notes import Notes
from .._serialization import session_from_document, session_to_document
from ..abc import (
    Page,
    SessionQuery,
    SessionRepository,
    _check_file_mode,
    decode_cursor,
    encode_cursor,
)

try:
    import fcntl
except ImportError:  # no POSIX file locks (Windows): FileRepository() refuses to be built
    fcntl = None  # type: ignore[assignment]

__all__ = ["FileRepository", "LockTimeout"]

logger = logging.getLogger(__name__)

R = TypeVar("R")

# Indirections used for every write, so tests can inject faults into this module only.
_write = os.write
_fsync = os.fsync
_replace = os.replace
_close = os.close

_TMP_PREFIX = ".tmp-"
_SUFFIX = ".json"
_CHECKSUM = "checksum"
_DUMP_OPTIONS = orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE
#: A directory mtime this close to "now" may hide a change made in the same clock tick.
_RACY_NS = 2_000_000_000
#: How often a scan reads again an entry whose read failed in a way that may pass.
_RETRY_FAILING_S = 30.0
#: How many sessions skipped for now (see :class:`~asyncsession._notes.Notes`) a store
#: remembers, so as to warn about each once, not at every pass. Beyond, one warning says
#: so and the others are logged at debug level until fewer than half that many are left.
_NOTES_REMEMBERED = 10_000

Stamp = tuple[int, int, int]  # (st_ino, st_mtime_ns, st_size) of a document


class LockTimeout(SessionLocked):
    """A session's lock file stayed locked by another process or task for too long."""

    def __init__(self, session_id: uuid.UUID, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        super().__init__(
            f"Session {session_id} is locked by another process or task (lock file {path}); gave "
            f"up after {timeout:g} s. Retry later, or raise FileRepository(lock_timeout=...) "
            "if writers legitimately hold sessions that long.",
            session_id=session_id,
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # BaseException pickles ``args`` (the message alone); rebuild from the data.
        return (type(self), (self.session_id, self.path, self.timeout), self.__dict__)


class _NotDurable(StorageError):
    """The change is in place, but fsync of its directory failed."""

    stamp: Stamp | None = None


class _Busy(enum.Enum):
    BUSY = 0


_BUSY = _Busy.BUSY


def _digest(body: bytes) -> str:
    return hashlib.blake2b(body, digest_size=16).hexdigest()


class _Damaged(Exception):
    """A stored document cannot be used (becomes :class:`CorruptSessionError`)."""


@attrs.frozen(slots=True)
class _Doc:
    """A parsed current-version document: the raw dict and a message-free snapshot.

    Messages stay raw JSON until a caller asks for them, so appends and touches never
    build Message objects for the history they carry over.
    """

    raw: dict[str, Any]
    skeleton: Session  # every field; ``messages`` is an empty window, ``total`` exact
    stamp: Stamp

    def session(self, last: int | None = None) -> Session:
        """The snapshot with all messages, or a window of the ``last`` ones."""
        messages = self.raw["messages"]
        total = len(messages)
        keep = total if last is None else max(0, min(last, total))
        part = _structure({**self.raw, "messages": messages[total - keep :]}, self.skeleton.id)
        if keep == total:
            return part
        return attrs.evolve(part, messages=MessageLog(part.messages, offset=total - keep))


def _structure(doc: dict[str, Any], sid: uuid.UUID) -> Session:
    try:
        session = session_from_document(doc, session_id=sid)
    except CorruptSessionError as exc:
        raise _Damaged(exc.detail) from exc
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise _Damaged(f"invalid document ({type(exc).__name__}: {exc})") from exc
    if session.id != sid:
        raise _Damaged(f"the document holds session {session.id}, not the id in its file name")
    return session


def _parse(data: bytes, sid: uuid.UUID, stamp: Stamp) -> _Doc:
    """Parse stored bytes; raise :class:`_Damaged` or :class:`SchemaVersionError`."""
    return _check(_object(data), sid, stamp)


def _object(data: bytes) -> dict[str, Any]:
    """The JSON object in stored bytes; raise :class:`_Damaged` for anything else."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise _Damaged(f"not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise _Damaged(f"expected a JSON object, got {type(doc).__name__}")
    return doc


def _version(data: bytes, sid: uuid.UUID) -> int:
    """The schema version of a stored document, as stored.

    Raises :class:`_Damaged` for a document that :meth:`FileRepository.get` would
    quarantine: it is validated as a read validates it (checksum, or in full for a
    document without one). A document of a newer release is not checked (a read
    refuses it with :class:`SchemaVersionError` and leaves it in place).
    """
    doc = _object(data)
    try:
        version = document_version(doc, session_id=sid)
    except CorruptSessionError as exc:
        raise _Damaged(exc.detail) from exc
    if version <= CURRENT_VERSION:
        _check(doc, sid, (0, 0, 0))
    else:
        _check_newer(doc)
    return version


def _check_newer(doc: dict[str, Any]) -> None:
    """Raise :class:`_Damaged` for a document whose version says a newer release but
    whose checksum covers the same body at a version this release writes or reads: a
    damaged version field ("version": 1 is one flipped bit from 3, 5 or 9), not a newer
    release's document (whose checksum covers its own version)."""
    checksum = doc.get(_CHECKSUM)
    if not isinstance(checksum, str):
        return
    body = {key: value for key, value in doc.items() if key != _CHECKSUM}
    stated = body.get("version")
    for version in range(CURRENT_VERSION + 1):
        try:
            encoded = orjson.dumps({**body, "version": version})
        except TypeError:  # orjson.JSONEncodeError: then it was never written so either
            return
        if hmac.compare_digest(checksum, _digest(encoded)):
            raise _Damaged(
                f"damaged version field: it says {stated}, but the checksum covers the "
                f"document at version {version}"
            )


def _check(doc: dict[str, Any], sid: uuid.UUID, stamp: Stamp) -> _Doc:
    """Validate a parsed document (consumes it); raise like :func:`_parse`."""
    version = doc.get("version")
    if type(version) is int and version > CURRENT_VERSION:
        _check_newer(doc)
    checksum = doc.pop(_CHECKSUM, None)
    if checksum is not None and not (type(version) is int and version > CURRENT_VERSION):
        # Checked whatever version up to ours the document says: a damaged version field
        # ("version": 0 is one flipped bit from 1) must not pass unchecked. A newer
        # release's document is left to raise SchemaVersionError (its checksum may differ).
        try:
            body = orjson.dumps(doc)
        except TypeError as exc:  # orjson.JSONEncodeError, e.g. nested past orjson's limit
            raise _Damaged(f"the document cannot be encoded again ({exc})") from exc
        if not (isinstance(checksum, str) and hmac.compare_digest(checksum, _digest(body))):
            raise _Damaged("checksum mismatch (damaged bytes)")
    if checksum is None or version != CURRENT_VERSION:
        # Hand-written or older documents: validate (and migrate) them in full.
        full = _structure(doc, sid)
        return _Doc(session_to_document(full), _skeleton(full), stamp)
    messages = doc.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise _Damaged("'messages' is not a list of objects")
    skeleton = _structure({**doc, "messages": []}, sid)
    return _Doc(doc, attrs.evolve(skeleton, messages=MessageLog((), offset=len(messages))), stamp)


def _skeleton(session: Session) -> Session:
    return attrs.evolve(session, messages=MessageLog((), offset=session.messages.total))


def _document(skeleton: Session, history: list[Any], new: Sequence[Message] = ()) -> dict[str, Any]:
    """The document of ``skeleton`` whose messages are raw ``history`` plus ``new``."""
    doc = session_to_document(attrs.evolve(skeleton, messages=MessageLog(new)))
    doc["messages"] = history + doc["messages"]
    return doc


def _encode(doc: dict[str, Any], sid: uuid.UUID) -> bytes:
    try:
        body = orjson.dumps(doc)
        return orjson.dumps({**doc, _CHECKSUM: _digest(body)}, option=_DUMP_OPTIONS)
    except orjson.JSONEncodeError as exc:
        raise SerializationError(f"Session {sid} cannot be encoded: {exc}") from exc


def encode_document(session: Session) -> bytes:
    """Return the pretty-printed, checksummed document this store writes for ``session``."""
    return _encode(session_to_document(session), session.id)


def decode_document(data: bytes, session_id: uuid.UUID) -> Session:
    """Decode a stored document of session ``session_id`` (any known version).

    Raises :class:`CorruptSessionError` for damaged or foreign bytes (including a
    checksum mismatch or a document of another session) and :class:`SchemaVersionError`
    for documents of a newer release.
    """
    try:
        return _parse(data, session_id, (0, 0, 0)).session()
    except _Damaged as exc:
        raise CorruptSessionError(str(exc), session_id=session_id) from exc


@attrs.frozen(slots=True)
class _Write:
    """A step's request to store ``doc`` (whose snapshot, minus messages, is ``skeleton``)."""

    doc: dict[str, Any]
    skeleton: Session


def _expiry_recorded(current: _Doc, deadline: datetime) -> _Write:
    """``current`` with ``deadline``, already past, as its deadline and nothing else
    changed: what a write or touch records when the session expired under its policy."""
    skeleton = attrs.evolve(current.skeleton, expires_at=deadline)
    return _Write(_document(skeleton, current.raw["messages"]), skeleton)


class _Delete(enum.Enum):
    DELETE = 0


_DELETE = _Delete.DELETE

#: What a read-modify-write step asks for: keep the document, replace it, or delete it.
_Action = Union[_Write, _Delete, None]


def _id_from_name(name: str) -> uuid.UUID | None:
    if not name.endswith(_SUFFIX) or len(name) != 36 + len(_SUFFIX):
        return None
    stem = name[:36]
    try:
        sid = uuid.UUID(stem)
    except ValueError:
        return None
    return sid if str(sid) == stem else None


def _id_from_quarantine_name(name: str) -> uuid.UUID | None:
    """The id of a quarantined document's name, ``<uuid>.json`` or ``<uuid>.<n>.json``."""
    if not name.endswith(_SUFFIX):
        return None
    stem, dot, n = name[: -len(_SUFFIX)].partition(".")
    if dot and not (n.isascii() and n.isdigit()):
        return None
    return _id_from_name(stem + _SUFFIX)


def _stamp(st: os.stat_result) -> Stamp:
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _file_key(st: os.stat_result) -> tuple[int, int]:
    """What makes two names one file: (device, inode)."""
    return st.st_dev, st.st_ino


#: Whether os.link can hard-link a symbolic link itself (linkat() without
#: AT_SYMLINK_FOLLOW): link() alone follows one on macOS, and os.link() follows by
#: default on Linux too from Python 3.14 (gh-81793).
_LINK_NOFOLLOW = os.link in os.supports_follow_symlinks

#: What an entry that is neither a regular file nor a directory is, by file type.
_ODD_KINDS = {
    stat.S_IFLNK: "symbolic link",
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


def _odd_kind(mode: int) -> str | None:
    """What an entry the store never opens as a file is ("symbolic link", "FIFO", ...);
    None for a regular file or a directory (a directory reads as unreadable: EISDIR)."""
    return _ODD_KINDS.get(stat.S_IFMT(mode))


def _odd_entry(path: str) -> str | None:
    """What ``path`` is when an open of it failed and it is no file (see :func:`_odd_kind`):
    an ``O_NOFOLLOW`` open fails on a symbolic link (ELOOP, EMLINK on FreeBSD), and an
    open of a socket with ENXIO."""
    try:
        return _odd_kind(os.lstat(path).st_mode)
    except OSError:
        return None


def _not_a_document(kind: str) -> _Damaged:
    return _Damaged(f"a {kind} where a document belongs (neither followed nor read)")


def _link_entry(src: str, dst: str) -> None:
    """Hard-link the entry ``src`` itself as ``dst``: a symbolic link, never its target."""
    if not _LINK_NOFOLLOW:  # no linkat(): the caller moves the entry instead
        raise OSError(errno.ENOTSUP, "cannot hard-link a symbolic link itself here")
    os.link(src, dst, follow_symlinks=False)


def _storage_error(action: str, path: str | Path, exc: OSError) -> StorageError:
    reason = exc.strerror or str(exc)
    recoverable = exc.errno in (errno.ENOSPC, errno.EAGAIN, errno.EINTR, errno.EDQUOT)
    hint = {
        errno.ENOSPC: "free disk space and retry",
        errno.EDQUOT: "free disk space and retry",
        errno.EACCES: "check the permissions of the store directory",
        errno.EPERM: "check the permissions of the store directory",
        errno.EROFS: "the file system is read-only; use a writable directory",
        errno.EIO: "the disk reported an I/O error; check the device",
    }.get(exc.errno or 0, "check the store directory and retry")
    return StorageError(
        f"Could not {action} {os.fspath(path)}: {reason} [errno {exc.errno}]; {hint}.",
        recoverable=recoverable,
    )


def _blocked_at(path: str) -> str | None:
    """The first directory on the way to ``path`` (``path`` included) that this process
    may not enter (search), or None: a missing one, or none, is not a matter of access."""
    full = os.path.abspath(path)
    chain = [full]
    while (parent := os.path.dirname(chain[-1])) != chain[-1]:
        chain.append(parent)
    effective = os.access in os.supports_effective_ids
    for directory in reversed(chain):
        try:
            if not os.path.isdir(directory):
                return None
        except OSError:
            return None
        if not os.access(directory, os.X_OK, effective_ids=effective):
            return directory
    return None


@attrs.frozen(slots=True)
class _Entry:
    """What the in-process index knows of one session."""

    skeleton: Session  # the session with an empty message window (``total`` exact)
    first: str | None  # content of the first message, for ``search``
    stamp: Stamp


def _entry(doc: _Doc) -> _Entry:
    return _Entry(doc.skeleton, _first(doc.raw), doc.stamp)


def _matches(entry: _Entry, query: SessionQuery) -> bool:
    """:meth:`SessionQuery.matches` on an index entry (the first message is cached)."""
    return query.matches_fields(entry.skeleton, entry.first)


class _Index:
    """Metadata of every session: owners, status counts, a deadline heap. Thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: dict[uuid.UUID, _Entry] = {}
        self.by_owner: dict[str | None, set[uuid.UUID]] = {}
        self.counts: Counter[SessionStatus] = Counter()
        self.deadlines: list[tuple[datetime, int, uuid.UUID]] = []
        self.seq = itertools.count()

    def put(self, entry: _Entry, *, only_if: Stamp | bool | None = True) -> None:
        """Index ``entry``; with a stamp (or None for "absent") only if it is unchanged."""
        session = entry.skeleton
        with self.lock:
            old = self.entries.get(session.id)
            if only_if is not True and (None if old is None else old.stamp) != only_if:
                return
            self.entries[session.id] = entry
            old_s = None if old is None else old.skeleton
            if old_s is None or old_s.owner != session.owner:
                if old_s is not None:
                    self._unown(old_s)
                self.by_owner.setdefault(session.owner, set()).add(session.id)
            if old_s is None or old_s.status is not session.status:
                if old_s is not None:
                    self.counts[old_s.status] -= 1
                self.counts[session.status] += 1
            if session.expires_at is not None and (
                old_s is None or old_s.expires_at != session.expires_at
            ):
                heapq.heappush(self.deadlines, (session.expires_at, next(self.seq), session.id))
                if len(self.deadlines) > 2 * len(self.entries) + 64:
                    self._rebuild_deadlines()

    def drop(self, session_id: uuid.UUID, *, only_if: Stamp | bool = True) -> None:
        """Forget a session; with a stamp only if its entry still has that stamp."""
        with self.lock:
            old = self.entries.get(session_id)
            if old is None or (only_if is not True and old.stamp != only_if):
                return
            del self.entries[session_id]
            self._unown(old.skeleton)
            self.counts[old.skeleton.status] -= 1

    def stamps(self) -> dict[uuid.UUID, Stamp]:
        with self.lock:
            return {sid: e.stamp for sid, e in self.entries.items()}

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.by_owner.clear()
            self.counts.clear()
            self.deadlines.clear()

    def _unown(self, session: Session) -> None:
        owned = self.by_owner.get(session.owner)
        if owned is not None:
            owned.discard(session.id)
            if not owned:
                del self.by_owner[session.owner]

    def _rebuild_deadlines(self) -> None:
        self.deadlines = [
            (e.skeleton.expires_at, next(self.seq), sid)
            for sid, e in self.entries.items()
            if e.skeleton.expires_at is not None
        ]
        heapq.heapify(self.deadlines)

    def expired(self, now: datetime, limit: int) -> list[uuid.UUID]:
        found: list[tuple[datetime, int, uuid.UUID]] = []
        seen: set[uuid.UUID] = set()
        with self.lock:
            heap = self.deadlines
            while heap and len(found) < limit and heap[0][0] <= now:
                item = heapq.heappop(heap)
                entry = self.entries.get(item[2])
                if (
                    entry is not None
                    and entry.skeleton.expires_at == item[0]
                    and item[2] not in seen
                ):
                    seen.add(item[2])
                    found.append(item)
            for item in found:  # stays indexed until remove_expired() takes it
                heapq.heappush(heap, item)
        return [item[2] for item in found]

    def not_expired(self, ids: Iterable[uuid.UUID], now: datetime) -> list[uuid.UUID]:
        """Those of ``ids`` that are indexed and not expired at ``now``."""
        with self.lock:
            entries = [(sid, self.entries.get(sid)) for sid in ids]
        return [sid for sid, e in entries if e is not None and not e.skeleton.is_expired(now)]

    def candidates(self, owner: str | None) -> list[_Entry]:
        with self.lock:
            if owner is None:
                return list(self.entries.values())
            return [self.entries[i] for i in self.by_owner.get(owner, ())]

    def count_by_status(self, owner: str | None) -> dict[SessionStatus, int]:
        with self.lock:
            if owner is None:
                return {status: n for status, n in self.counts.items() if n}
            counts = Counter(self.entries[i].skeleton.status for i in self.by_owner.get(owner, ()))
        return dict(counts)


class FileRepository(SessionRepository):
    """Sessions as JSON files in ``directory``, safe to share between processes.

    * ``lock_timeout`` (seconds or a ``timedelta``, above 0; default 10): the longest an
      operation waits for a session's lock, queued
      behind this process's tasks and then polling another process's lock file, before
      raising :class:`LockTimeout` (a recoverable :class:`StorageError`).
    * ``fsync``: fsync documents and the directory on every write (durable across power
      loss). With False a write survives a crash of the process but not of the machine.
    * ``shared``: other processes may write the directory. Listing, ``count_by_status``
      and ``expired`` then re-read documents changed on disk since their last call;
      with False the in-process index is trusted (the directory belongs to this process).
    * ``max_threads``: worker threads this store may use at once (in the event loop
      that opened it; tasks of other loops use their loop's default limiter).
    * ``file_mode``: permissions of the documents and lock files this store creates
      (default ``0o600``: session data is readable by its owner only); the directories
      it creates get the matching ``x`` bits (``0o700``). The process umask applies on
      top. A document keeps ``file_mode`` when rewritten.

    Each operation is one hop to a worker thread. Reads, compare-and-set saves, appends,
    touches and ``remove_expired`` always read the document under its lock, so they are
    exact even when another process wrote it a moment ago.

    Listing, ``count_by_status`` and ``expired`` use an in-process index (owner, status,
    times, deadline heap, name and first message) built at open by reading every
    document and kept current by this process's writes. With ``shared=True`` they first
    rescan the directory when its mtime changed since the last scan (or was too recent to
    trust), re-reading only documents whose (inode, mtime, size) changed, so they see
    every write completed before the call. ``expired()`` candidates are re-checked
    against the file under its lock by ``remove_expired``, so expiry stays exact anyway.

    Appending rewrites the whole document (inherent to one file per session; the history
    is carried over as raw JSON, so the cost is bytes, not objects). ``append`` returns a
    window holding the appended messages and ``get(last_messages=n)`` builds only the
    last ``n`` messages. This store suits modest histories; prefer SQLite for long ones.

    POSIX only (it locks with ``fcntl.flock``): on other platforms the constructor raises
    :class:`InvalidConfiguration`; use ``SQLiteRepository`` there.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        lock_timeout: float | timedelta = 10.0,
        fsync: bool = True,
        shared: bool = True,
        max_threads: int = 8,
        file_mode: int = 0o600,
    ) -> None:
        _check_file_mode(file_mode)
        check_flag(fsync, "fsync")
        check_flag(shared, "shared")
        lock_seconds = to_seconds(lock_timeout, "lock_timeout")
        if type(max_threads) is not int or max_threads < 1:
            raise InvalidConfiguration(f"max_threads must be an int >= 1, got {max_threads!r}.")
        if fcntl is None:
            raise InvalidConfiguration(
                "FileRepository needs POSIX file locks (fcntl); use SQLiteRepository on "
                "this platform."
            )
        self._root = Path(directory)
        self._sessions_dir = str(self._root / "sessions")
        self._locks_dir = str(self._root / "locks")
        self._quarantine_dir = str(self._root / "quarantine")
        self._lock_timeout = lock_seconds
        self._fsync = fsync
        self._shared = shared
        self._max_threads = max_threads
        self._file_mode = file_mode
        # the directories: searchable wherever readable (0o600 -> 0o700, 0o640 -> 0o750)
        self._dir_mode = file_mode | ((file_mode & 0o444) >> 2)
        self._index = _Index()
        self._session_locks = KeyedLocks()
        self._sync_lock = threading.Lock()
        self._synced_mtime: int | None = None
        # Documents a scan left out of the index (of a newer release, or unreadable), by
        # the stamp it saw (under _sync_lock): unchanged, they are neither read nor
        # reported again.
        self._skipped: dict[uuid.UUID, Stamp] = {}
        # entries whose read failed in a way that may pass (EIO, EMFILE, EACCES...): read
        # again by a scan at most every _RETRY_FAILING_S, reported once per change
        self._failing: dict[uuid.UUID, Stamp] = {}
        self._retry_at = 0.0  # time.monotonic() after which a scan reads them again
        # Sessions that expiry, or a scan's quarantine, passed over for now: each is
        # warned about once per cause, not at every cleanup pass or listing.
        self._expiry_notes = Notes(logger, remembered=_NOTES_REMEMBERED)
        self._scan_notes = Notes(logger, remembered=_NOTES_REMEMBERED)
        self._limiter: anyio.CapacityLimiter | None = None
        self._limiter_loop: object = None  # the event loop the limiter belongs to

    def __repr__(self) -> str:
        return f"FileRepository({os.fspath(self._root)!r})"

    @property
    def directory(self) -> Path:
        """The store's root directory."""
        return self._root

    # -- paths ------------------------------------------------------------------------

    def _doc_path(self, sid: uuid.UUID) -> str:
        return os.path.join(self._sessions_dir, f"{sid}{_SUFFIX}")

    def _lock_path(self, sid: uuid.UUID) -> str:
        return os.path.join(self._locks_dir, f"{sid}.lock")

    # -- opening ----------------------------------------------------------------------

    async def _open(self) -> None:
        self._limiter = anyio.CapacityLimiter(self._max_threads)
        self._limiter_loop = anyio.lowlevel.current_token().native_token
        try:
            await self._call(self._open_sync)
        except BaseException:
            self._limiter = self._limiter_loop = None
            self._index.clear()
            raise

    async def _close(self) -> None:
        self._limiter = self._limiter_loop = None  # (not keeping a closed loop alive)
        self._index.clear()
        self._expiry_notes.clear()
        self._scan_notes.clear()
        self._synced_mtime = None

    def _open_sync(self) -> None:
        root = self._root
        try:
            root_is_file = root.exists() and not root.is_dir()
            parent_is_dir = root.parent.is_dir()
        except OSError as exc:  # a directory above it may not be entered
            raise self._open_error("access", os.fspath(root), exc) from exc
        if root_is_file:
            raise StorageError(
                f"Cannot open a FileRepository at {root}: it exists and is not a directory. "
                "Pass a directory path."
            )
        if not parent_is_dir:
            raise StorageError(
                f"Cannot open a FileRepository at {root}: the parent directory "
                f"{root.parent} does not exist{tilde_note(root.parent)}. Create it first."
            )
        created = False
        # The root through its symbolic link, if it is one: os.mkdir does not follow a
        # dangling link (it fails with EEXIST), so the target is created, with its mode.
        top = os.path.realpath(root)
        # The group or others may write in the three directories below (file_mode says),
        # never in the top one: whoever may rename those could point them out of the store.
        for path, dir_mode in (
            (top, self._dir_mode & ~0o022),
            (self._sessions_dir, self._dir_mode),
            (self._locks_dir, self._dir_mode),
            (self._quarantine_dir, self._dir_mode),
        ):
            try:
                os.mkdir(path, dir_mode)
                created = True
            except FileExistsError:
                pass
            except OSError as exc:
                raise self._open_error("create the store directory", path, exc) from exc
        if created:  # make the new directories themselves survive a power loss
            self._sync_dir(os.fspath(root.parent), written=os.fspath(root))
            self._sync_dir(os.fspath(root), written=self._sessions_dir)
        self._check_layout(top)
        probe = os.path.join(self._sessions_dir, f"{_TMP_PREFIX}probe-{secrets.token_hex(6)}")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.close(fd)
            os.unlink(probe)
        except FileNotFoundError:
            pass  # another process opening the store removed it
        except OSError as exc:
            raise self._open_error("write to the store directory", self._sessions_dir, exc) from exc
        self._sync(initial=True)
        self._remove_orphan_locks()

    def _check_layout(self, top: str) -> None:
        """Refuse a store whose sessions, locks or quarantine directory is a symbolic
        link (it could send documents and lock files out of the store), and warn of a
        store directory its group or others may write (where one can be swapped)."""
        for path in (self._sessions_dir, self._locks_dir, self._quarantine_dir):
            try:
                is_link = stat.S_ISLNK(os.lstat(path).st_mode)
            except OSError as exc:
                raise self._open_error("access", path, exc) from exc
            if is_link:
                raise StorageError(
                    f"Cannot open a FileRepository at {os.fspath(self._root)}: {path} is a "
                    "symbolic link, and the store keeps its sessions, locks and quarantine "
                    "in real directories inside it (a link could send them out of the "
                    "store). Replace the link with a directory (move its files back), and "
                    "check who may write to the store directory."
                )
        try:
            mode = os.stat(top).st_mode
        except OSError as exc:
            raise self._open_error("access", top, exc) from exc
        # Group write matters where the group shares the store (file_mode gives it
        # write); others' write always does.
        writable = mode & (0o002 | (self._dir_mode & 0o020))
        if writable:
            logger.warning(
                "the file store directory %s may be written by its %s: whoever may write "
                "there can swap its sessions or locks directory for a link out of the "
                "store while it is open. Run `chmod g-w,o-w %s` (the store does not need "
                "it; only sessions/, locks/ and quarantine/ take file_mode's bits)",
                top,
                {0o022: "group and others", 0o020: "group"}.get(writable, "others"),
                top,
            )

    def _open_error(self, action: str, path: str, exc: OSError) -> StorageError:
        """The error for ``exc`` from ``action`` on ``path`` while opening: one that
        permissions caused names the directory this process may not enter, if there is
        one on the way (the store's directories may exist: they cannot be reached)."""
        if exc.errno in (errno.EACCES, errno.EPERM):
            blocked = _blocked_at(path)
            if blocked is not None:
                user = f" (uid {os.geteuid()})" if hasattr(os, "geteuid") else ""
                return StorageError(
                    f"Cannot access the store directory {os.fspath(self._root)}: this "
                    f"process{user} may not enter {blocked} ({exc.strerror}). Give the user "
                    "running it search (x) permission on every directory above the store, "
                    "and read, write and search permission on the store directory and its "
                    "sessions, locks and quarantine directories (or run it as their "
                    "owner); or pass another directory."
                )
        return _storage_error(action, path, exc)

    def _remove_orphan_locks(self) -> None:
        """Delete lock files of sessions without a document, which a crash can leave.

        A kill between deleting a document and unlocking, or during ``add`` before the
        document exists, leaves ``locks/<id>.lock`` behind. Each is taken without waiting
        (a live holder keeps its file) and removed only if the document is still absent.
        """
        try:
            with os.scandir(self._locks_dir) as items:
                names = [item.name for item in items]
        except OSError as exc:
            raise _storage_error("list", self._locks_dir, exc) from exc
        for name in names:
            sid = _id_from_lock_name(name)
            if sid is None:
                continue
            try:
                if self._exists(self._doc_path(sid)):
                    continue
                fd = self._acquire_nowait(self._lock_path(sid))
            except StorageError as exc:
                logger.warning("could not check lock file %s: %s", name, exc)
                continue
            if fd is not None and fd >= 0:
                self._release(sid, fd)  # removes the lock file if there is still no document

    # -- running operations -----------------------------------------------------------

    def _check_open(self) -> anyio.CapacityLimiter:
        if self._limiter is None:
            raise StorageError(
                f"{self!r} is not open. Use `async with FileRepository(...) as repo:` or "
                "pass it to a SessionManager, which opens it."
            )
        return self._limiter

    async def _call(self, fn: Callable[..., R], *args: Any) -> R:
        limiter: anyio.CapacityLimiter | None = self._check_open()
        if anyio.lowlevel.current_token().native_token is not self._limiter_loop:
            limiter = None  # it belongs to the loop that opened the store: this loop's own
        result: R = await anyio.to_thread.run_sync(fn, *args, limiter=limiter)
        return result

    async def _locked(
        self, sid: uuid.UUID, fn: Callable[[], R], if_missing: Callable[[], R] | None = None
    ) -> R:
        """Run ``fn`` in a worker thread holding the session's lock file.

        With ``if_missing``, a session without a document is answered by it without
        creating a lock file. Waiting for another process's lock sleeps on the event
        loop between non-blocking attempts.
        """
        # lock_timeout bounds the whole wait: queued behind this process's tasks, then
        # polling the lock file of another process.
        deadline = anyio.current_time() + self._lock_timeout
        held = self._session_locks(sid)
        with anyio.CancelScope(deadline=deadline) as waiting:
            await held.__aenter__()
        if waiting.cancelled_caught:
            raise LockTimeout(sid, self._lock_path(sid), self._lock_timeout)
        try:
            delay = 0.001
            while True:
                result: R | Literal[_Busy.BUSY] = await self._call(
                    self._attempt, sid, fn, if_missing
                )
                if result is not _BUSY:
                    return result
                now = anyio.current_time()
                if now >= deadline:
                    raise LockTimeout(sid, self._lock_path(sid), self._lock_timeout)
                await anyio.sleep(min(delay, deadline - now))
                delay = min(delay * 2, 0.05)
        finally:
            await held.__aexit__(None, None, None)

    def _attempt(
        self, sid: uuid.UUID, fn: Callable[[], R], if_missing: Callable[[], R] | None
    ) -> R | Literal[_Busy.BUSY]:
        """One try at the lock file (worker thread); ``_BUSY`` if another holder has it."""
        if if_missing is not None and not self._exists(self._doc_path(sid)):
            return if_missing()
        lock_path = self._lock_path(sid)
        for _ in range(100):
            fd = self._acquire_nowait(lock_path)
            if fd is None:
                return _BUSY
            if fd < 0:
                continue  # the lock file was replaced while we opened it
            try:
                return fn()
            finally:
                self._release(sid, fd)
        raise StorageError(
            f"The lock file {lock_path} keeps being replaced; another process may be "
            "misusing the store directory. Retry later.",
            recoverable=True,
        )

    def _acquire_nowait(self, lock_path: str) -> int | None:
        """A locked fd, None when held elsewhere, or -1 when the file was just replaced."""
        # O_NOFOLLOW: whoever may write to locks/ (a group sharing the store) must not
        # make this process create or lock a file elsewhere through a symbolic link.
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(lock_path, flags, self._file_mode)
        except OSError as exc:
            if _odd_entry(lock_path) == "symbolic link":
                raise StorageError(
                    f"The lock file {lock_path} is a symbolic link, which is not allowed "
                    "there: the store never follows one out of its directory. Remove it "
                    f"and check who may write to {self._locks_dir}.",
                    recoverable=False,
                ) from exc
            raise _storage_error("open the lock file", lock_path, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:
            os.close(fd)
            raise _storage_error("lock", lock_path, exc) from exc
        try:
            same = _file_key(os.fstat(fd)) == _file_key(os.lstat(lock_path))
        except FileNotFoundError:
            same = False
        except OSError as exc:
            os.close(fd)
            raise _storage_error("check the lock file", lock_path, exc) from exc
        if not same:
            os.close(fd)
            return -1
        return fd

    @staticmethod
    def _exists(path: str) -> bool:
        """Whether ``path`` exists; StorageError when the file system cannot tell."""
        try:
            os.lstat(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _storage_error("look up", path, exc) from exc
        return True

    # -- document I/O (worker thread, under the session lock) -------------------------

    def _read(self, sid: uuid.UUID) -> _Doc | None:
        """Read and parse a document; quarantine it if it is damaged (lock held)."""
        path = self._doc_path(sid)
        try:
            data, stamp = self._read_bytes(path)
            return _parse(data, sid, stamp)
        except FileNotFoundError:
            self._index.drop(sid)
            return None
        except _Damaged as exc:
            raise self._corrupt(sid, str(exc)) from exc

    def _corrupt(self, sid: uuid.UUID, detail: str) -> CorruptSessionError:
        """Quarantine a damaged document and return the error to raise (lock held)."""
        moved = self._quarantine(sid, detail)
        self._index.drop(sid)
        where = f"moved to quarantine as {moved}" if moved else "quarantine failed"
        return CorruptSessionError(f"{detail}; {where}", session_id=sid)

    @staticmethod
    def _read_bytes(path: str) -> tuple[bytes, Stamp]:
        """A document's bytes and stamp; :class:`_Damaged` for an entry that is no file
        (a symbolic link, a FIFO, ...: never followed, never waited on)."""
        try:
            # O_NOFOLLOW: never read a file outside the store through a symbolic link;
            # O_NONBLOCK: never wait for a writer of a FIFO (no effect on a regular file).
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise
        except OSError as exc:
            kind = _odd_entry(path)
            if kind is not None:
                raise _not_a_document(kind) from exc
            raise _storage_error("open", path, exc) from exc
        try:
            st = os.fstat(fd)
            kind = _odd_kind(st.st_mode)
            if kind is not None:
                raise _not_a_document(kind)
            chunks = []
            while True:
                chunk = os.read(fd, max(st.st_size + 1, 65536))
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks), _stamp(st)
        except OSError as exc:
            raise _storage_error("read", path, exc) from exc
        finally:
            os.close(fd)

    def _write(self, sid: uuid.UUID, doc: dict[str, Any]) -> Stamp:
        """Atomically replace the session's document; return the new file's stamp."""
        data = _encode(doc, sid)
        final = self._doc_path(sid)
        tmp = os.path.join(
            self._sessions_dir, f"{_TMP_PREFIX}{sid}-{secrets.token_hex(4)}{_SUFFIX}"
        )
        fd = -1
        action = "create"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            fd = os.open(tmp, flags, self._file_mode)
            action = "write"
            view = memoryview(data)
            while view:
                view = view[_write(fd, view) :]
            if self._fsync:
                action = "fsync"
                _fsync(fd)
            stamp = _stamp(os.fstat(fd))
            action = "close"
            closing, fd = fd, -1  # closed once even if close fails: the number is reused
            _close(closing)
            action = "replace the document with"
            _replace(tmp, final)
        except OSError as exc:
            if fd >= 0:
                _close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise _storage_error(action, tmp, exc) from exc
        except BaseException:
            if fd >= 0:
                _close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        try:
            self._sync_dir(self._sessions_dir, written=final)
        except _NotDurable as exc:
            exc.stamp = stamp
            raise
        return stamp

    def _store(self, sid: uuid.UUID, doc: dict[str, Any], skeleton: Session) -> None:
        """Write ``doc`` and index it (also when only the directory fsync failed)."""
        try:
            stamp = self._write(sid, doc)
        except _NotDurable as exc:
            if exc.stamp is not None:
                self._index.put(_Entry(skeleton, _first(doc), exc.stamp))
            raise
        self._index.put(_Entry(skeleton, _first(doc), stamp))

    def _remove(self, sid: uuid.UUID) -> None:
        """Delete the document and forget it (also when only the directory fsync failed)."""
        try:
            self._unlink(sid)
        finally:
            if not os.path.lexists(self._doc_path(sid)):
                self._index.drop(sid)

    def _unlink(self, sid: uuid.UUID) -> None:
        path = self._doc_path(sid)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _storage_error("delete", path, exc) from exc
        self._sync_dir(self._sessions_dir, written=path)

    def _sync_dir(self, directory: str, *, written: str) -> None:
        if not self._fsync:
            return
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                _fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise _NotDurable(
                f"{written} was changed but fsync of its directory {directory} failed: "
                f"{exc.strerror or exc} [errno {exc.errno}]. The change is visible but may "
                "not survive a power loss; check the device.",
                recoverable=False,
            ) from exc

    def _quarantine(self, sid: uuid.UUID, reason: str, *, scanning: bool = False) -> str | None:
        """Move a damaged document aside, never overwriting an earlier one (lock held).

        The document is hard-linked into ``quarantine/`` and then removed. If the removal
        failed before, the earlier link is found among this id's names (same inode) and
        only the removal is tried again, so copies do not pile up. A failure is logged
        (once per cause when ``scanning``: the next scan tries again) and None returned.
        """
        src = self._doc_path(sid)
        src_key: tuple[int, int] | None = None
        recreated = False
        n = 0
        while True:
            name = f"{sid}{_SUFFIX}" if n == 0 else f"{sid}.{n}{_SUFFIX}"
            dst = os.path.join(self._quarantine_dir, name)
            n += 1
            try:
                _link_entry(src, dst)  # a symbolic link itself, never its target
            except FileExistsError:
                try:
                    if src_key is None:
                        src_key = _file_key(os.lstat(src))
                    if _file_key(os.lstat(dst)) != src_key:
                        continue  # another damaged version of this session
                except FileNotFoundError:
                    continue  # the document vanished (the next link says so), or dst did
                except OSError as exc:
                    what = f"could not compare {src} with {dst}"
                    self._quarantine_failed(sid, what, exc, scanning)
                    return None
                # linked by an earlier attempt whose removal failed: remove it now
            except FileNotFoundError:
                # The document vanished, or quarantine/ was removed while the store was
                # open: then recreate it once and retry this name.
                if recreated or not os.path.lexists(src):
                    return None
                recreated, n = True, n - 1
                try:
                    os.makedirs(self._quarantine_dir, exist_ok=True)
                except OSError as exc:
                    self._quarantine_failed(
                        sid, f"could not recreate {self._quarantine_dir}", exc, scanning
                    )
                    return None
                logger.warning("recreated %s, which was removed", self._quarantine_dir)
                continue
            except OSError:
                # No hard links here: the lock serializes quarantines of this id.
                if os.path.lexists(dst):
                    continue
                try:
                    os.rename(src, dst)
                except OSError as exc:
                    self._quarantine_failed(sid, f"could not quarantine {src}", exc, scanning)
                    return None
                break
            try:
                os.unlink(src)
            except OSError as exc:
                self._quarantine_failed(sid, f"could not remove quarantined {src}", exc, scanning)
                return None
            break
        logger.warning("session document %s is corrupt (%s); moved to %s", src, reason, dst)
        try:
            self._sync_dir(self._quarantine_dir, written=dst)
            self._sync_dir(self._sessions_dir, written=src)
        except StorageError as exc:
            logger.warning("%s", exc)
        self._scan_notes.resolved(
            sid, "session %s, left in place by earlier scans, is quarantined", sid
        )
        return dst

    def _quarantine_failed(self, sid: uuid.UUID, what: str, exc: OSError, scanning: bool) -> None:
        if scanning:
            self._scan_notes.note(
                sid, f"{what}: {exc}", "session %s looks corrupt but %s: %s", sid, what, exc
            )
        else:
            logger.error("%s", what, exc_info=exc)

    # -- the index ------------------------------------------------------------------------

    def _sync(self, *, initial: bool = False) -> None:
        """Bring the index up to date with the directory (worker thread).

        Reads only documents whose (inode, mtime, size) changed. Updates are conditional
        on the entry being unchanged since the scan began, so a concurrent locked write
        of this process always wins over what the scan read.
        """
        with self._sync_lock:
            try:
                before = os.stat(self._sessions_dir).st_mtime_ns
            except OSError as exc:
                raise _storage_error("read", self._sessions_dir, exc) from exc
            retry = bool(self._failing) and time.monotonic() >= self._retry_at
            if not initial and before == self._synced_mtime and not retry:
                return
            known = self._index.stamps()
            seen: set[uuid.UUID] = set()
            try:
                with os.scandir(self._sessions_dir) as entries:
                    for item in entries:
                        self._sync_entry(item, known, seen, initial)
            except OSError as exc:
                raise _storage_error("list", self._sessions_dir, exc) from exc
            for sid, stamp in known.items():
                if sid not in seen:
                    self._index.drop(sid, only_if=stamp)
            for skipped in (self._skipped, self._failing):
                for sid in [sid for sid in skipped if sid not in seen]:
                    del skipped[sid]
            for notes in (self._expiry_notes, self._scan_notes):  # forget what is gone
                notes.forget(
                    sid
                    for sid in notes.noted()
                    if sid not in seen and not os.path.lexists(self._doc_path(sid))
                )
            racy = time.time_ns() - before < _RACY_NS
            self._synced_mtime = None if racy else before

    def _sync_entry(
        self,
        item: os.DirEntry[str],
        known: dict[uuid.UUID, Stamp],
        seen: set[uuid.UUID],
        initial: bool,
    ) -> None:
        name = item.name
        if name.startswith(_TMP_PREFIX):
            if initial:
                self._remove_stale_temp(item.path, name)
            return
        sid = _id_from_name(name)
        if sid is None:
            if initial:
                logger.warning("ignoring %s: not a session document name", item.path)
            return
        seen.add(sid)
        old = known.get(sid)
        try:
            stamp = _stamp(item.stat(follow_symlinks=False))
        except FileNotFoundError:
            seen.discard(sid)
            return
        except OSError as exc:  # one bad entry must not break the listing of the others
            self._skip(sid, (-1, -1, exc.errno or 0), old, _storage_error("stat", item.path, exc))
            return
        if old == stamp or self._skipped.get(sid) == stamp:
            return
        if self._failing.get(sid) == stamp and time.monotonic() < self._retry_at:
            return
        self._skipped.pop(sid, None)
        try:
            data, stamp = self._read_bytes(item.path)
        except FileNotFoundError:
            seen.discard(sid)
            return
        except StorageError as exc:  # e.g. a directory with a document's name, EACCES, EIO
            self._skip(sid, stamp, old, exc)
            return
        except _Damaged:  # a symbolic link, a FIFO...
            self._failing.pop(sid, None)
            self._quarantine_nowait(sid)
            seen.discard(sid)
            return
        self._failing.pop(sid, None)
        try:
            doc = _parse(data, sid, stamp)
        except _Damaged:
            self._quarantine_nowait(sid)
            seen.discard(sid)
            return
        except SchemaVersionError as exc:  # rewritten by a newer release: not listable
            self._skip(sid, stamp, old, exc)
            return
        self._scan_notes.resolved(sid, "session %s can be read again", sid)
        self._index.put(_entry(doc), only_if=old)

    def _skip(self, sid: uuid.UUID, stamp: Stamp, old: Stamp | None, why: Exception) -> None:
        """Leave a document out of the index; report it once per change.

        What its content decides (a newer release's document, a directory with a
        document's name) stays out until the entry changes; an error that may pass
        (EIO, EMFILE, EACCES, ...) is read again by a scan at most every
        ``_RETRY_FAILING_S`` (so it costs no full rescan per call). A direct read of the
        session still raises the error (:meth:`get` says which).
        """
        cause = why.__cause__
        lasting = isinstance(why, SchemaVersionError) or (
            isinstance(cause, OSError) and cause.errno == errno.EISDIR
        )
        remembered = self._skipped if lasting else self._failing
        if self._skipped.get(sid) != stamp and self._failing.get(sid) != stamp:
            logger.warning("skipping %s: %s", self._doc_path(sid), why)
        remembered[sid] = stamp
        if not lasting:
            self._retry_at = time.monotonic() + _RETRY_FAILING_S
        if old is not None:
            self._index.drop(sid, only_if=old)

    def _quarantine_nowait(self, sid: uuid.UUID) -> None:
        """Quarantine a document found damaged by a scan, if its lock is free.

        A document left in place is read again by the next scan: why it was left is
        warned about once per cause (see :class:`~asyncsession._notes.Notes`).
        """
        notes = self._scan_notes
        try:
            fd = self._acquire_nowait(self._lock_path(sid))
        except StorageError as exc:
            notes.note(sid, str(exc), "session %s looks corrupt but cannot be locked: %s", sid, exc)
            return
        if fd is None or fd < 0:
            notes.note(
                sid,
                "locked",
                "session %s looks corrupt but its lock is held (it may be being written); "
                "left in place",
                sid,
            )
            return
        try:
            try:
                data, _ = self._read_bytes(self._doc_path(sid))
                _parse(data, sid, (0, 0, 0))
            except FileNotFoundError:
                return
            except _Damaged as exc:
                self._quarantine(sid, str(exc), scanning=True)
                self._index.drop(sid)
            except SchemaVersionError:
                return
            except StorageError as exc:
                notes.note(
                    sid,
                    str(exc),
                    "session %s looks corrupt but cannot be read again: %s",
                    sid,
                    exc,
                )
                return
        finally:
            self._release(sid, fd)

    def _remove_stale_temp(self, path: str, name: str) -> None:
        """Delete a temporary file left by a crash (a live writer holds the lock)."""
        sid = _id_from_temp_name(name)
        fd: int | None = -1
        if sid is not None:
            try:
                fd = self._acquire_nowait(self._lock_path(sid))
            except StorageError as exc:
                logger.warning("left stale temporary file %s: %s", path, exc)
                return
            if fd is None or fd < 0:
                return  # a writer of this session is active
        try:
            os.unlink(path)
            logger.info("removed stale temporary file %s", path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("could not remove stale temporary file %s: %s", path, exc)
        finally:
            if sid is not None and fd is not None and fd >= 0:
                self._release(sid, fd)

    def _release(self, sid: uuid.UUID, fd: int) -> None:
        """Unlock; drop the lock file when the session has no document (lock held)."""
        try:
            os.lstat(self._doc_path(sid))
        except FileNotFoundError:
            # Unlinking under the lock is safe: lockers re-check the inode.
            with contextlib.suppress(OSError):
                os.unlink(self._lock_path(sid))
        except OSError:
            pass  # cannot tell whether the document exists: keep its lock file
        finally:
            os.close(fd)

    # -- read-modify-write ------------------------------------------------------------

    def _rmw(self, sid: uuid.UUID, step: Callable[[_Doc | None], tuple[R, _Action]]) -> R:
        """Read the document, let ``step`` decide, apply its action, update the index."""
        current = self._read(sid)
        if current is not None:  # readable now: a scan's note about it is out of date
            self._scan_notes.resolved(sid, "session %s can be read again", sid)
        try:
            result, action = step(current)
        except _Damaged as exc:
            raise self._corrupt(sid, str(exc)) from exc
        if action is None:
            if current is not None:
                self._index.put(_entry(current))
        elif action is _DELETE:
            self._remove(sid)
        else:
            self._store(sid, action.doc, action.skeleton)
        return result

    async def _run(self, sid: uuid.UUID, step: Callable[[_Doc | None], tuple[R, _Action]]) -> R:
        def missing() -> R:
            self._index.drop(sid)
            result, action = step(None)
            assert action is None, "a step must not write a missing session"
            return result

        return await self._locked(sid, lambda: self._rmw(sid, step), missing)

    # -- the contract -----------------------------------------------------------------

    async def get(
        self, session_id: uuid.UUID, *, last_messages: int | None = None
    ) -> Session | None:
        sid = self._check_id(session_id)  # only plain UUIDs ever become file names
        last_messages = self._check_last_messages(last_messages)

        def step(current: _Doc | None) -> tuple[Session | None, _Action]:
            return (None if current is None else current.session(last_messages)), None

        return await self._run(sid, step)

    async def add(self, session: Session) -> None:
        self._check_whole(session)
        sid = session.id
        doc = session_to_document(session)

        def create() -> None:
            if self._exists(self._doc_path(sid)):
                raise SessionConflict(sid, expected_revision=None)
            self._store(sid, doc, _skeleton(session))

        await self._locked(sid, create)

    async def save(
        self,
        session: Session,
        *,
        expected_revision: int,
        new_messages: Sequence[Message] | None = None,
    ) -> None:
        self._check_revision_step(session, expected_revision)
        sid = session.id
        if session.revision > MAX_REVISION:  # no session can have it: refuse it whole
            raise revision_exhausted(sid)
        self._check_window_save(session, new_messages)
        window = not session.messages.is_complete
        added = tuple(new_messages or ())
        doc = None if window else session_to_document(session)

        def step(current: _Doc | None) -> tuple[None, _Action]:
            if current is None:
                raise SessionNotFound(sid)
            revision = current.skeleton.revision
            if revision != expected_revision:
                raise SessionConflict(
                    sid, expected_revision=expected_revision, actual_revision=revision
                )
            prior = current.skeleton
            if self._save_finds_expired(session, prior.expires_at, prior.status):
                raise SessionNotFound(sid)  # expired by the save's time: stays so
            if doc is not None:
                return None, _Write(doc, _skeleton(session))
            # A window (a read with last_messages): the stored history, grown by
            # new_messages, is the history, if they bring it to the window's total.
            stored = current.skeleton.messages.total
            if stored + len(added) != session.messages.total:
                raise self._not_extending(session, stored, len(added))
            skeleton = _skeleton(session)
            return None, _Write(_document(skeleton, current.raw["messages"], added), skeleton)

        await self._run(sid, step)

    async def append(
        self,
        session_id: uuid.UUID,
        messages: Sequence[Message],
        *,
        at: datetime,
        policy: ExpiryPolicy,
        max_messages: int | None = None,
    ) -> Session:
        sid = self._check_id(session_id)  # only plain UUIDs ever become file names
        at = self._check_time(at, "at")
        messages = self._check_messages(messages)
        policy = self._check_policy(policy)
        max_messages = self._check_max_messages(max_messages)

        def step(current: _Doc | None) -> tuple[Session | None, _Action]:
            old = None if current is None else current.skeleton
            if current is None or old is None or old.is_expired(at):
                raise SessionNotFound(sid)
            if old.status.is_terminal:
                raise SessionClosed(sid, old.status)
            deadline, overdue = policy.activity_deadline(
                old.status, old.created_at, old.last_active, at
            )
            if overdue is not None:  # record that deadline, store nothing else (None: not found)
                return None, _expiry_recorded(current, overdue)
            total = old.messages.total + len(messages)
            if max_messages is not None and total > max_messages:
                raise too_many_messages(max_messages, total)
            if old.revision >= MAX_REVISION:
                raise revision_exhausted(sid)
            skeleton = attrs.evolve(
                old,
                messages=MessageLog((), offset=total),
                last_active=max(old.last_active, at),
                expires_at=deadline,
                revision=old.revision + 1,
            )
            doc = _document(skeleton, current.raw["messages"], messages)
            window = MessageLog(messages, offset=old.messages.total)
            return attrs.evolve(skeleton, messages=window), _Write(doc, skeleton)

        appended = await self._run(sid, step)
        if appended is None:
            raise SessionNotFound(sid)
        return appended

    async def touch(
        self,
        session_id: uuid.UUID,
        *,
        at: datetime,
        policy: ExpiryPolicy,
        last_messages: int | None = None,
    ) -> Session | None:
        sid = self._check_id(session_id)  # only plain UUIDs ever become file names
        at = self._check_time(at, "at")
        policy = self._check_policy(policy)
        last_messages = self._check_last_messages(last_messages)

        def step(current: _Doc | None) -> tuple[Session | None, _Action]:
            if current is None:
                return None, None
            old = current.skeleton
            if old.status.is_terminal or old.is_expired(at):
                return current.session(last_messages), None
            moves = policy.should_touch(old.last_active, at)
            deadline, overdue = policy.activity_deadline(
                old.status, old.created_at, old.last_active, at, moves=moves
            )
            if overdue is not None:  # record that deadline only
                write = _expiry_recorded(current, overdue)
                touched = _Doc(write.doc, write.skeleton, current.stamp)
                return touched.session(last_messages), write
            if not moves:
                return current.session(last_messages), None
            skeleton = attrs.evolve(old, last_active=at, expires_at=deadline)
            history = current.raw["messages"]
            touched = _Doc(_document(skeleton, history), skeleton, current.stamp)
            return touched.session(last_messages), _Write(touched.raw, skeleton)

        return await self._run(sid, step)

    async def delete(self, session_id: uuid.UUID) -> bool:
        sid = self._check_id(session_id)  # only plain UUIDs ever become file names

        def remove() -> bool:
            existed = self._exists(self._doc_path(sid))
            self._remove(sid)
            return existed

        existed = await self._locked(sid, remove, lambda: False)
        self._expiry_notes.forget((sid,))
        return existed

    async def remove_expired(self, session_id: uuid.UUID, *, now: datetime) -> Session | None:
        sid = self._check_id(session_id)  # only plain UUIDs ever become file names
        now = self._check_time(now, "now")

        def step(current: _Doc | None) -> tuple[Session | None, _Action]:
            if current is None or not current.skeleton.is_expired(now):
                return None, None
            return current.skeleton, _DELETE

        try:
            removed = await self._run(sid, step)
        except CorruptSessionError as exc:
            # Already quarantined and out of the index; cleanup carries on.
            self._expiry_notes.forget((sid,))
            logger.warning("session %s was quarantined, not removed: %s", sid, exc.detail)
            return None
        except LockTimeout as exc:
            # Held elsewhere: the session stays indexed, so the next pass tries it again
            # (warned about once, not at every pass).
            self._expiry_notes.note(
                sid, str(exc), "expiry skipped session %s for now: %s", sid, exc
            )
            return None
        if removed is not None:
            self._expiry_notes.resolved(
                sid, "removed expired session %s at last (it was locked elsewhere)", sid
            )
        else:
            self._expiry_notes.resolved(
                sid,
                "expired session %s is no longer locked elsewhere; it was revived or "
                "removed meanwhile",
                sid,
            )
        return removed

    async def expired(self, now: datetime, *, limit: int = 1000) -> Sequence[uuid.UUID]:
        now = self._check_time(now, "now")
        limit = self._check_limit(limit)
        self._check_open()
        if self._shared:
            await self._call(self._sync)
        noted = self._expiry_notes.noted()
        if noted:
            # A session skipped while locked elsewhere and revived meanwhile is no longer
            # listed, so remove_expired() would never resolve its note: forget it here,
            # so that getting stuck again later is warned about again.
            for sid in self._index.not_expired(noted, now):
                self._expiry_notes.resolved(
                    sid,
                    "session %s, which expiry skipped while it was locked elsewhere, is no "
                    "longer expired (revived meanwhile)",
                    sid,
                )
        return self._index.expired(now, limit)

    async def list(self, query: SessionQuery) -> Page:
        after = decode_cursor(query)
        self._check_open()
        if self._shared:
            await self._call(self._sync)
        candidates = self._index.candidates(query.owner)
        if after is not None:
            stamp, after_id = after
            candidates = [
                e
                for e in candidates
                if e.skeleton.last_active < stamp
                or (e.skeleton.last_active == stamp and e.skeleton.id.int < after_id.int)
            ]
        matching = (e for e in candidates if _matches(e, query))
        top = heapq.nlargest(
            query.limit + 1,
            matching,
            key=lambda e: (e.skeleton.last_active, e.skeleton.id.int),
        )
        items = tuple(e.skeleton for e in top[: query.limit])
        next_cursor = None
        if len(top) > query.limit:
            last = items[-1]
            next_cursor = encode_cursor(last.last_active, last.id, query)
        return Page(items, next_cursor)

    async def count_by_status(self, owner: str | None = None) -> Mapping[SessionStatus, int]:
        owner = self._check_owner(owner)
        self._check_open()
        if self._shared:
            await self._call(self._sync)
        return self._index.count_by_status(owner)

    async def document_versions(self, session_ids: Iterable[uuid.UUID]) -> Mapping[uuid.UUID, int]:
        """The ``version`` of each stored document file, in one worker hop.

        The worker reads the documents without their locks (writes replace a document
        atomically, so it sees a whole old or new one) and validates each as :meth:`get`
        does (checksum, or in full for a document without one). A document that looks
        damaged is read again under its lock, as :meth:`get` reads it: if it still is, it
        is moved to ``quarantine/`` and :class:`CorruptSessionError` is raised for it
        (the first such session in ``session_ids`` order; the rest are checked by the
        next call).
        """
        wanted = self._check_ids(session_ids)
        found = await self._call(self._read_versions, wanted)
        versions: dict[uuid.UUID, int] = {}
        for sid in wanted:
            if sid not in found:
                continue
            version = found[sid]
            if version is None:  # looked damaged: decide under the lock, as get() does
                version = await self._locked(
                    sid, functools.partial(self._locked_version, sid), lambda: None
                )
                if version is None:
                    continue
            versions[sid] = version
        return versions

    async def quarantined(self) -> Sequence[tuple[uuid.UUID, Path]]:
        """The documents moved to ``quarantine/`` because they were damaged, as
        ``(session id, path)`` pairs in path order (an id quarantined more than once has
        a path for each time). The store never deletes them; their sessions read as not
        found and are in no listing or count. Repair one and move it back into
        ``sessions/`` (without its ``checksum`` field), or delete it.
        """
        return await self._call(self._list_quarantine)

    def _list_quarantine(self) -> Sequence[tuple[uuid.UUID, Path]]:
        found: list[tuple[uuid.UUID, Path]] = []
        try:
            with os.scandir(self._quarantine_dir) as entries:
                for item in entries:
                    sid = _id_from_quarantine_name(item.name)
                    if sid is not None:
                        found.append((sid, Path(item.path)))
        except FileNotFoundError:  # removed by hand: recreated at the next quarantine
            return []
        except OSError as exc:
            raise _storage_error("list", self._quarantine_dir, exc) from exc
        return sorted(found, key=lambda pair: pair[1])

    async def unreadable(self) -> Sequence[tuple[uuid.UUID, Path]]:
        """The documents in ``sessions/`` that listings, counts and expiry leave out
        because they could not be read (a newer release's document, permissions, an I/O
        error, a directory with a document's name), as ``(session id, path)`` pairs in
        path order. Reading such a session raises the error. With ``shared=True`` the
        directory is scanned first, as for a listing.
        """
        return await self._call(self._list_unreadable)

    def _list_unreadable(self) -> Sequence[tuple[uuid.UUID, Path]]:
        if self._shared:
            self._sync()
        with self._sync_lock:
            ids = {*self._skipped, *self._failing}
        return sorted(((sid, Path(self._doc_path(sid))) for sid in ids), key=lambda x: x[1])

    def _read_versions(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, int | None]:
        """Each existing document's version, None for a damaged one (worker, no locks)."""
        found: dict[uuid.UUID, int | None] = {}
        for sid in ids:
            try:
                data, _ = self._read_bytes(self._doc_path(sid))
                found[sid] = _version(data, sid)
            except FileNotFoundError:
                continue
            except _Damaged:
                found[sid] = None
        return found

    def _locked_version(self, sid: uuid.UUID) -> int | None:
        """A document's version read under its lock; quarantine it if damaged."""
        try:
            data, _ = self._read_bytes(self._doc_path(sid))
            return _version(data, sid)
        except FileNotFoundError:
            self._index.drop(sid)
            return None
        except _Damaged as exc:
            raise self._corrupt(sid, str(exc)) from exc


def _first(doc: dict[str, Any]) -> str | None:
    messages = doc["messages"]
    first = messages[0].get("content") if messages else None
    return first if isinstance(first, str) else None


def _id_from_lock_name(name: str) -> uuid.UUID | None:
    stem, dot, suffix = name.partition(".")
    if dot != "." or suffix != "lock":
        return None
    try:
        sid = uuid.UUID(stem)
    except ValueError:
        return None
    return sid if str(sid) == stem else None


def _id_from_temp_name(name: str) -> uuid.UUID | None:
    stem = name[len(_TMP_PREFIX) : len(_TMP_PREFIX) + 36]
    try:
        sid = uuid.UUID(stem)
    except ValueError:
        return None
    return sid if str(sid) == stem else None
