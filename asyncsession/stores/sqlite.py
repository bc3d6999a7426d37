"""SQLite session store: the durable embedded default (stdlib :mod:`sqlite3`, WAL mode).

Layout of the database (``PRAGMA user_version`` versions it; older files are upgraded
in place when opened, unless the store is made with ``upgrade=False``):

* ``sessions``: one row per session. ``doc`` is the versioned session document without
  its messages and without the fields every append or touch changes (``last_active``,
  ``expires_at``, ``revision``): those live only in their columns, so appending never
  decodes or rewrites the document; reading puts them back. The other columns are
  derived from the document for the indexes (owner, status, ``last_active``,
  ``expires_at``) and for search (casefolded name and first message). Timestamps are
  integer microseconds since the Unix epoch, so they sort correctly. ``incarnation`` is
  a random number each add stores: it tells a session deleted and added again under its
  id from its earlier life (held snapshots record it; rows from before layout 4 have
  NULL). Layout 5 only repairs values older releases' appends stored out of range
  (a REAL revision, a deadline past ``datetime.max``; see :func:`_upgrade_4_to_5`).
* ``messages``: ``(session_pk, seq, body)``; a row holds the messages from number
  ``seq`` on, as compact JSON joined by newlines (compact JSON never contains one).
  Each append adds one row; when the history crosses a multiple of
  :data:`CHUNK_MESSAGES`, the rows since the previous multiple are merged into one
  chunk row. So appending is O(appended) (amortized), the whole history is a few rows
  (SQLite pays per row, not per byte), and the last ``n`` messages are read from the
  row holding message ``total - n`` on, without the rest of the history. Loaded messages
  are decoded lazily, when first accessed: a damaged message raises
  :class:`CorruptSessionError` (naming the session) at that access, and other messages
  and sessions stay readable.

Threading: one dedicated worker thread owns the connection. Every store operation is
one request to it (one thread hop); the worker drains its queue and runs what it found:
the reads first (WAL readers never wait for the write lock), then the writes in one
transaction (group commit), each operation inside its own SAVEPOINT so a failing
operation (a compare-and-set conflict, say) does not undo the others. A batch waits at
most ``busy_timeout`` in all for another connection's lock (once one of its operations
gives up at that deadline, the others do not wait again). While its writes wait, the
worker answers the reads queued meanwhile (WAL readers need no write lock), within the
write's deadline; a read that finds the database busy too (another process recovering
the WAL, say) is not failed at that deadline but runs again after the write, with a
``busy_timeout`` of its own (so it waits at most about twice ``busy_timeout`` in all).
Writes queued meanwhile run after the waiting one, in order. A busy error states how
long its operation waited. Callers are answered only after the commit: the worker
schedules one wake-up per event loop and batch with the loop's own thread-safe scheduler
(found through its anyio token, so asyncio and trio alike) and goes on with the next
batch at once, without waiting for the loop to run it.
A checkpoint (:meth:`SQLiteRepository.checkpoint`, with its optional ``VACUUM``) runs
outside any transaction, after its batch's writes, one by one with the batch's other
checkpoints, under the same rules: again while another connection keeps it from
finishing (answering the reads queued meanwhile), until the batch's ``busy_timeout``
deadline; once one gives up there (or the batch's writes did), the others fail at once.
Each open starts a worker with its own queue and connection; the base class runs opens
and closes one at a time.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import itertools
import logging
import os
import queue
import re
import secrets
import sqlite3
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Final, TypeVar

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
    SessionClosed,
    SessionConflict,
    SessionError,
    SessionNotFound,
    StorageError,
    check_flag,
    revision_exhausted,
    tilde_note,
    too_many_messages,
)
from .._json import freeze_json, freeze_state
from .._migrations import CURRENT_VERSION
from .._models import (
    EMPTY_LOG,
    ROLES,
    ExpiryPolicy,
    Message,
    MessageLog,
    Session,
    SessionStatus,
    replace_trusted,
    stored_status,
    validate_name,
    validate_owner,
)
from .._models import _replace_trusted as _replace_any
from .._serialization import (
    _DOCUMENT_FIELDS,
    _FAST_DOCUMENTS,
    _HOT_FIELDS,
    _orjson_time,
    dump_document,
    dump_message,
    load_message,
    load_version,
    session_from_document,
)
from ..abc import (
    Page,
    SessionQuery,
    SessionRepository,
    _check_file_mode,
    decode_cursor,
    encode_cursor,
    log_skipped,
)
from ._held import (
    DEFAULT_CACHE_BYTES,
    DecodeCache,
    HeldSnapshots,
    Incarnation,
    check_cache_bytes,
    current_updater,
)

__all__ = [
    "CHUNK_MESSAGES",
    "SCHEMA_VERSION",
    "SQLiteRepository",
    "SQLiteStatistics",
    "WAL_AUTOCHECKPOINT",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The layout version this release writes (``PRAGMA user_version``).
SCHEMA_VERSION: Final = 5
#: Messages per chunk row (see the module docstring).
CHUNK_MESSAGES: Final = 32
#: Default ``PRAGMA wal_autocheckpoint`` (pages; SQLite's own default is 1000): the WAL
#: grows to about 16 MB between checkpoints. ``pragmas={"wal_autocheckpoint": n}``
#: overrides it.
WAL_AUTOCHECKPOINT: Final = 4000
#: ``PRAGMA application_id`` of asyncsession databases ("asss").
APPLICATION_ID: Final = 0x61737373
#: The longest ``busy_timeout``.
_LONGEST_BUSY: Final = timedelta(hours=1)
#: Longest single wait (seconds) inside SQLite for another connection's lock. A write
#: waits for the lock in slices like this until its ``busy_timeout`` deadline, and the
#: worker answers the reads queued meanwhile between two slices.
_LOCK_SLICE: Final = 0.025

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
_PRAGMA_NAME = re.compile(r"[a-z_]{1,40}")
_PRAGMA_VALUE = re.compile(r"-?[0-9]{1,19}|[A-Za-z_]{1,20}")
#: Pragmas the store sets or relies on, refused in ``pragmas=``: the layout's identity
#: (a wrong ``user_version`` reruns upgrades and stays on disk), WAL mode, the lock and
#: durability settings it has options for, and the schema's integrity.
_STORE_PRAGMAS: Final = {
    "application_id": "it marks the file as an asyncsession store",
    "schema_version": "it versions the tables the store created",
    "user_version": "it records the layout version the store upgrades from",
    "journal_mode": "the store runs in WAL mode",
    "locking_mode": "other connections and processes must be able to share the file",
    "synchronous": "use SQLiteRepository(synchronous=...)",
    "busy_timeout": "use SQLiteRepository(busy_timeout=...)",
    "query_only": "the store writes",
    "writable_schema": "the store's tables must stay intact",
    "ignore_check_constraints": "the store's tables must stay intact",
}
#: Pragmas refused in ``pragmas=`` because they reach beyond the store's connection: a
#: heap limit holds for every SQLite connection of the process (a tiny one made every
#: store in it fail with MemoryError, including stores opened without pragmas).
_PROCESS_PRAGMAS: Final = {
    "hard_heap_limit": "it limits SQLite's memory for the whole process, every store in it",
    "soft_heap_limit": "it limits SQLite's memory for the whole process, every store in it",
    "threads": "it lets SQLite start helper threads beside the store's one worker thread",
    "temp_store_directory": "it sets the temporary directory of the whole process",
    "data_store_directory": "it sets a directory for the whole process",
}
_MEMORY_ADVICE: Final = (
    "A heap limit set for the whole process (PRAGMA hard_heap_limit or soft_heap_limit "
    "on any SQLite connection in it) or the process's own memory ran out: raise or "
    "remove the limit, or free memory"
)
#: The numbers SQLite stores for the words a pragma accepts as its value, to check that a
#: pragma set from ``pragmas=`` took (see ``SQLiteRepository._check_pragma``). The
#: boolean words are 0 or 1 for the switches only: a pragma that wants a number takes
#: them as 0 (``cache_size = off``), the very change the read-back is there to catch.
_BOOLEAN_WORDS: Final = {"on": 1, "off": 0, "yes": 1, "no": 0, "true": 1, "false": 0}
_SWITCH_PRAGMAS: Final = (
    "automatic_index",
    "cell_size_check",
    "checkpoint_fullfsync",
    "count_changes",
    "defer_foreign_keys",
    "empty_result_callbacks",
    "foreign_keys",
    "full_column_names",
    "fullfsync",
    "legacy_alter_table",
    "read_uncommitted",
    "recursive_triggers",
    "reverse_unordered_selects",
    "short_column_names",
    "trusted_schema",
)
_PRAGMA_WORDS: Final[dict[str, dict[str, int]]] = {
    **dict.fromkeys(_SWITCH_PRAGMAS, _BOOLEAN_WORDS),
    "temp_store": {"default": 0, "file": 1, "memory": 2},
    "auto_vacuum": {"none": 0, "full": 1, "incremental": 2},
    "secure_delete": {**_BOOLEAN_WORDS, "fast": 2},
}
#: Pragmas set from ``pragmas=`` but not read back: actions, which have no setting to
#: read (reading one back runs it again, and returns nothing), and case_sensitive_like,
#: which SQLite cannot report.
_UNREAD_PRAGMAS: Final = ("optimize", "incremental_vacuum", "case_sensitive_like")
#: The only words these pragmas take besides a number (none: a number only), checked
#: when the store is made: SQLite takes any other word for them without an error, in a
#: way reading them back cannot show (cache_spill: as on).
_PRAGMA_ONLY_WORDS: Final[dict[str, tuple[str, ...]]] = {
    "optimize": (),
    "incremental_vacuum": (),
    "case_sensitive_like": tuple(_BOOLEAN_WORDS),
    "cache_spill": tuple(_BOOLEAN_WORDS),
}
_UTC = timezone.utc
_EPOCH = datetime(1970, 1, 1, tzinfo=_UTC)
_US = timedelta(microseconds=1)
_ROLE_SET = frozenset(ROLES)
# SQLite primary result codes (the sqlite3 module exports them only from Python 3.11).
_SQLITE_PERM, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 3, 5, 6, 8
_SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 10, 13, 14, 26
# The fast message decoder below builds Messages field by field; it is only used while
# Message has exactly these fields.
_FAST_MESSAGES = tuple(f.name for f in attrs.fields(Message)) == (
    "role",
    "content",
    "timestamp",
    "data",
)

# -- schema ---------------------------------------------------------------------------

#: Version 1: the first layout (no search columns, no status index).
_SCHEMA_V1 = """
CREATE TABLE sessions (
    pk INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    owner TEXT,
    name TEXT,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    last_active INTEGER NOT NULL,
    closed_at INTEGER,
    expires_at INTEGER,
    revision INTEGER NOT NULL,
    message_count INTEGER NOT NULL,
    doc BLOB NOT NULL
);
CREATE INDEX sessions_activity ON sessions (last_active, id);
CREATE INDEX sessions_owner ON sessions (owner, last_active, id);
CREATE INDEX sessions_expiry ON sessions (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE messages (
    session_pk INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (session_pk, seq)
);
"""


def _upgrade_1_to_2(conn: sqlite3.Connection, path: Path | str) -> str | None:
    """Add casefolded search columns (backfilled) and a status index. Returns the
    warning to log once the upgrade has committed (None if every row was read): it
    names the file ``path`` and up to :data:`_IDS_LOGGED` sessions whose first message
    could not be read (a search never finds them by it)."""
    conn.execute("ALTER TABLE sessions ADD COLUMN name_cf TEXT")
    conn.execute("ALTER TABLE sessions ADD COLUMN first_cf TEXT")
    conn.execute("CREATE INDEX sessions_status ON sessions (status, last_active, id)")
    rows = conn.execute(
        "SELECT s.pk, s.id, s.name, m.body FROM sessions s "
        "LEFT JOIN messages m ON m.session_pk = s.pk AND m.seq = 0 ORDER BY s.pk"
    ).fetchall()
    unreadable = 0
    unreadable_ids: list[str] = []
    for pk, sid, name, body in rows:
        first = None
        if body is not None:
            try:
                first = load_message(body).content.casefold()
            except SessionError:
                unreadable += 1
                if len(unreadable_ids) < _IDS_LOGGED:
                    unreadable_ids.append(sid)
        name_cf = name.casefold() if name is not None else None
        conn.execute(
            "UPDATE sessions SET name_cf = ?, first_cf = ? WHERE pk = ?", (name_cf, first, pk)
        )
    if not unreadable:
        return None
    return (
        f"{path}: {unreadable} session(s) have an unreadable first message, which "
        f"searches will not find them by ({_some(unreadable_ids, unreadable)})"
    )


def _upgrade_2_to_3(conn: sqlite3.Connection) -> None:
    """Add the ``contended`` table; nothing to rewrite: every version-2 row is valid.

    ``contended`` lists sessions whose last compare-and-set was refused; the next
    successful save of such a session removes the mark and learns that others lost races
    for it (so that writer reads before its next update instead of racing ahead).

    Version-2 message rows hold one message each (a one-message chunk) and version-2
    documents still carry ``last_active``, ``expires_at`` and ``revision``, which equal
    their columns (the columns win from now on). Rows written from now on hold several
    messages or documents without those fields, which a version-2 reader would
    misread: the version bump makes older releases refuse the file instead.
    """
    conn.execute("CREATE TABLE contended (session_pk INTEGER PRIMARY KEY)")


def _upgrade_3_to_4(conn: sqlite3.Connection) -> None:
    """Add the ``incarnation`` column (NULL for the rows already there).

    Each add stores a random incarnation, so a session deleted and added again under its
    id (an import of a deleted session) is not taken for its earlier life by a store
    holding a snapshot of that. The version bump makes older releases, which would add
    sessions without one, refuse the file.
    """
    conn.execute("ALTER TABLE sessions ADD COLUMN incarnation INTEGER")


def _us(value: datetime) -> int:
    return (value - _EPOCH) // _US


#: ``datetime.max`` in microseconds: the latest deadline a datetime can hold.
_LAST_US: Final = _us(datetime.max.replace(tzinfo=_UTC))


#: Most session ids a log line names (the rest are counted).
_IDS_LOGGED: Final = 5


def _some(ids: list[str], total: int) -> str:
    """Up to :data:`_IDS_LOGGED` of ``total`` ids for a log line: "a, b and 3 more"."""
    more = total - len(ids)
    return ", ".join(ids) + (f" and {more} more" if more > 0 else "")


def _upgrade_4_to_5(conn: sqlite3.Connection, path: Path | str) -> str | None:
    """Repair the rows older releases' one-statement append left unreadable (layout 5
    promises none); the tables do not change. Returns the warning to log once the
    upgrade has committed (None if nothing needed repair): it names the file ``path``
    and up to :data:`_IDS_LOGGED` repaired sessions of each kind.

    * An append at revision ``2**63 - 1`` computed ``revision + 1`` in SQL, which SQLite
      stores as the REAL ``9.223372036854776e+18``: the session raised
      :class:`CorruptSessionError` on every read (the append's messages were stored). The
      revision becomes :data:`MAX_REVISION`: the session reads again, with those
      messages, and its next write raises :class:`LimitExceeded`.
    * A deadline past ``datetime.max`` (a huge ``idle_timeout`` or ``max_age``) was
      stored as an out-of-range integer, or as a REAL when the sum overflowed: every read
      raised ``OverflowError``. It becomes NULL (never), as ``ExpiryPolicy.deadline``
      answers for it.

    No other column was computed in SQL by those releases (``message_count + n`` was
    bounded by the message limit). Checking the revisions scans the table once, here;
    the version bump makes older releases, which could store such values again, refuse
    the file.
    """

    def repair(where: str, assignment: str, value: object, bound: object) -> tuple[int, list[str]]:
        """Set ``assignment`` on the rows ``where`` picks: how many, and the first few ids."""
        ids = [
            row[0]
            for row in conn.execute(
                f"SELECT id FROM sessions WHERE {where} ORDER BY pk LIMIT {_IDS_LOGGED}",
                (bound,),
            )
        ]
        count = conn.execute(
            f"UPDATE sessions SET {assignment} WHERE {where}", (value, bound)
        ).rowcount
        return count, ids

    repaired, real_ids = repair(
        "typeof(revision) = 'real' AND revision >= ?", "revision = ?", MAX_REVISION, MAX_REVISION
    )
    endless, endless_ids = repair("expires_at > ?", "expires_at = ?", None, _LAST_US)
    parts = []
    if repaired:
        parts.append(
            f"{repaired} session(s) with a REAL revision, now the highest allowed: their "
            f"next write raises LimitExceeded ({_some(real_ids, repaired)})"
        )
    if endless:
        parts.append(
            f"{endless} session(s) with a deadline past datetime.max, now none: they "
            f"never expire ({_some(endless_ids, endless)})"
        )
    if not parts:
        return None
    return (
        f"{path}: an older release's append stored values out of range; repaired "
        + " and ".join(parts)
    )


#: ``_UPGRADES[v](conn, path)`` turns the version-``v`` database ``path`` into version
#: ``v + 1`` and returns a warning to log once the upgrade has committed, or None.
_UPGRADES: dict[int, Callable[[sqlite3.Connection, Path], str | None]] = {
    1: _upgrade_1_to_2,
    2: lambda conn, path: _upgrade_2_to_3(conn),
    3: lambda conn, path: _upgrade_3_to_4(conn),
    4: _upgrade_4_to_5,
}


def _us_or_none(value: datetime | None) -> int | None:
    return None if value is None else (value - _EPOCH) // _US


def _casefold(value: str | None) -> str | None:
    return None if value is None else value.casefold()


# -- message decoding -----------------------------------------------------------------

#: :func:`replace_trusted` without its keyword-dict wrapper (stores' hot path).
_replace_trusted: Callable[..., Session] = _replace_any

_new = object.__new__
_set = object.__setattr__
_fromisoformat = datetime.fromisoformat
_dumps = orjson.dumps
_loads = orjson.loads


def _message(item: Any) -> Message:
    """Build a Message from a decoded row; the fast path skips re-validating our own rows."""
    if (
        _FAST_MESSAGES
        and type(item) is dict
        and item.get("role") in _ROLE_SET
        and type(item.get("content")) is str
        and type(item.get("timestamp")) is str
    ):
        try:
            stamp = _fromisoformat(item["timestamp"])
        except ValueError:
            stamp = None
        if stamp is not None and stamp.tzinfo is timezone.utc:
            data = item.get("data")
            message: Message = _new(Message)
            _set(message, "role", item["role"])
            _set(message, "content", item["content"])
            _set(message, "timestamp", stamp)
            _set(message, "data", None if data is None else freeze_json(data, "data"))
            return message
    return load_message(orjson.dumps(item))


# The fast session decoder below builds Sessions field by field from current-version
# documents; it is only used while Session has exactly these fields.
_SESSION_FIELDS = _DOCUMENT_FIELDS
_FAST_SESSIONS = _FAST_DOCUMENTS
# _HOT_FIELDS: kept only in their columns (layout 3); a document never stores them.
#: Keys of our own current-version documents: layout 3, and layout 2 (with hot fields).
_DOC_KEYS = {"version", *_SESSION_FIELDS} - {"messages", *_HOT_FIELDS}
_V2_DOC_KEYS = _DOC_KEYS | set(_HOT_FIELDS)


def _stamp(value: Any) -> datetime:
    stamp = _fromisoformat(value)  # a non-str raises TypeError
    if stamp.tzinfo is not timezone.utc:
        raise ValueError("not a UTC timestamp")
    return stamp


def _fast_session(
    doc: Any,
    messages: MessageLog,
    session_id: uuid.UUID,
    last_active: datetime,
    expires_at: datetime | None,
    revision: int,
) -> Session | None:
    """Build a Session from our own current-version document, or None to take the slow path.

    ``last_active``, ``expires_at`` and ``revision`` come from their columns (a layout-2
    document's copies of them are ignored). Every document field is still checked
    (types, UTC times, owner and name rules) and the state is frozen; only the
    converter machinery is skipped.
    """
    if (
        not _FAST_SESSIONS
        or type(doc) is not dict
        or (doc.keys() != _DOC_KEYS and doc.keys() != _V2_DOC_KEYS)
        or doc["version"] != CURRENT_VERSION
        or doc["id"] != str(session_id)
    ):
        return None
    try:
        closed = doc["closed_at"]
        values = (
            session_id,
            _stamp(doc["created_at"]),
            last_active,
            validate_owner(doc["owner"]),
            validate_name(doc["name"]),
            SessionStatus(doc["status"]),
            None if closed is None else _stamp(closed),
            expires_at,
            messages,
            freeze_state(doc["state"]),
            doc["errors"],
            revision,
        )
    except (SessionError, TypeError, ValueError):
        return None
    if not all(type(n) is int and n >= 0 for n in values[10:]):
        return None
    session: Session = _new(Session)
    for name, value in zip(_SESSION_FIELDS, values, strict=True):
        _set(session, name, value)
    return session


class _Rows:
    """The message rows one read loaded; messages are decoded from them on demand.

    The lazy log over them holds message numbers (ints, cheap to make and not tracked
    by the garbage collector), not one bytes object per message: a row holding
    several messages is split only when one of its messages is first read.
    Concurrent readers may both split a row; either result is the same.
    """

    __slots__ = ("_bodies", "_firsts", "_last", "_parts")

    def __init__(self) -> None:
        # Number of the first message of each row, then the message count: row i
        # holds messages _firsts[i] to _firsts[i + 1] - 1.
        self._firsts: list[int] = []
        self._bodies: list[bytes] = []
        self._parts: list[list[bytes] | None] = []
        # The row used last (first, end, messages): reading in order needs no search.
        self._last: tuple[int, int, list[bytes]] = (0, 0, [])

    def message(self, number: int) -> Message:
        """Decode message ``number`` (the lazy log adds the session id to errors).

        A row that does not hold as many messages as its place says is damaged.
        """
        first, end, parts = self._last  # one read: other threads replace it whole
        if not first <= number < end:
            firsts = self._firsts
            row = bisect.bisect_right(firsts, number) - 1
            first, end = firsts[row], firsts[row + 1]
            split = self._parts[row]
            if split is None:
                split = self._bodies[row].split(_SEP)
                if len(split) != end - first:
                    raise CorruptSessionError(
                        f"message row {first} holds {len(split)} messages, expected {end - first}"
                    )
                self._parts[row] = split
            parts = split
            self._last = (first, end, parts)
        return _message(_loads(parts[number - first]))


_NO_ROWS = _Rows()


#: A cached document: the session without messages, and the ``last_active`` and
#: ``expires_at`` columns (microseconds) its times were made from. A document holds no
#: hot fields and no messages (see the layout), so appends and touches leave it
#: unchanged and the next read of the session finds its template in the store's
#: :class:`DecodeCache`: a hit skips JSON and timestamp parsing, validation and the
#: freezing of the state, and an unchanged ``last_active`` is not converted again.
_Template = tuple[Session, int, int | None]
#: Documents larger than this are not cached (the cache stays small).
_MAX_DOCUMENT: Final = 16_384


class _Row:
    """What the worker read for one session; decoded on the caller's thread (a removal's
    on the worker, before it deletes anything).

    Messages are not decoded here: the session gets a lazy log that decodes each
    message when it is first read, so a damaged one raises :class:`CorruptSessionError`
    when that message is accessed, not when the session is loaded. (A plain slotted
    class: built on the worker for every operation, never changed afterwards.)
    """

    __slots__ = (
        "doc",
        "expires_at",
        "incarnation",
        "last_active",
        "messages",
        "revision",
        "rows",
        "session_id",
        "start",
        "stop",
    )

    def __init__(
        self,
        session_id: uuid.UUID,
        doc: bytes,
        last_active: int,  # the hot fields, from their columns (microseconds)
        expires_at: int | None,
        revision: int,
        start: int,
        stop: int,
        rows: _Rows,  # messages start to message_count - 1
        messages: Sequence[Message] | None = None,  # already decoded (append's own)
        incarnation: int | None = None,  # the incarnation column (held snapshots)
    ) -> None:
        self.incarnation = incarnation
        self.session_id = session_id
        self.doc = doc
        self.last_active = last_active
        self.expires_at = expires_at
        self.revision = revision
        self.start = start
        self.stop = stop
        self.rows = rows
        self.messages = messages

    def sizes(self) -> tuple[int, int]:
        """The bytes the history and the document take as stored (what held snapshots
        count), for a read of the whole history; (0, 0) for a window."""
        if self.start:
            return 0, 0
        bodies = self.rows._bodies  # rows join their messages with one separator byte
        history = sum(map(len, bodies)) - (self.stop - len(bodies))
        return max(history, 0), len(self.doc)

    def decode(self, documents: DecodeCache[_Template] | None = None) -> Session:
        cached = None if documents is None else documents.get(self.doc)
        if self.messages is not None:
            log = MessageLog(self.messages, offset=self.start)
        else:
            log = MessageLog._lazy(
                list(range(self.start, self.stop)),
                self.rows.message,
                self.start,
                session_id=self.session_id,
            )
        last_us, expires_us = self.last_active, self.expires_at
        if cached is not None and cached[0].id == self.session_id:
            template, cached_last, cached_expires = cached
            if last_us == cached_last and expires_us == cached_expires:
                return _replace_trusted(template, revision=self.revision, messages=log)
            template = _replace_trusted(
                template,
                last_active=template.last_active if last_us == cached_last else _time(last_us),
                expires_at=(
                    template.expires_at
                    if expires_us == cached_expires
                    else None
                    if expires_us is None
                    else _time(expires_us)
                ),
            )
            if documents is not None:
                documents.put(self.doc, (template, last_us, expires_us))
            return _replace_trusted(template, revision=self.revision, messages=log)
        last_active = _time(last_us)
        expires_at = None if expires_us is None else _time(expires_us)
        try:
            doc = orjson.loads(self.doc)
        except orjson.JSONDecodeError as exc:
            raise CorruptSessionError(
                f"stored document is not valid JSON ({exc})", session_id=self.session_id
            ) from exc
        session = _fast_session(doc, log, self.session_id, last_active, expires_at, self.revision)
        if session is None:
            session = self._decode_slowly(doc, log, last_active, expires_at)
        elif documents is not None:
            template = _replace_trusted(session, messages=EMPTY_LOG)
            documents.put(self.doc, (template, last_us, expires_us))
        if session.id != self.session_id:
            raise CorruptSessionError(
                f"stored document has id {session.id}", session_id=self.session_id
            )
        return session

    def _decode_slowly(
        self, doc: Any, log: MessageLog, last_active: datetime, expires_at: datetime | None
    ) -> Session:
        """Older document versions and anything unusual: the converter, then the columns."""
        if type(doc) is dict:  # give migrations and the converter a whole document
            doc = dict(doc)
            doc.setdefault("last_active", last_active.isoformat())
            doc.setdefault("expires_at", None if expires_at is None else expires_at.isoformat())
            doc.setdefault("revision", self.revision)
        session = session_from_document(doc, messages=log, session_id=self.session_id)
        if (session.last_active, session.expires_at, session.revision) != (
            last_active,
            expires_at,
            self.revision,
        ):
            session = replace_trusted(
                session, last_active=last_active, expires_at=expires_at, revision=self.revision
            )
        return session


def _encode(session: Session) -> bytes:
    """The stored document of ``session``: no messages, no hot fields (see the layout)."""
    return dump_document(session, hot=False)


def _time(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _dump_message(message: Message) -> bytes:
    """:func:`dump_message`'s bytes, with orjson formatting the UTC timestamp itself."""
    if _FAST_MESSAGES and type(message) is Message and _orjson_time(message.timestamp):
        return _dumps(
            {
                "role": message.role,
                "content": message.content,
                "timestamp": message.timestamp,
                "data": message.data,
            }
        )
    return dump_message(message)


def _encode_messages(messages: Iterable[Message]) -> list[bytes]:
    return [_dump_message(m) for m in messages]


# -- message rows (worker side) ------------------------------------------------------

_SEP: Final = b"\n"  # compact JSON never contains a raw newline
_INSERT_MESSAGES = "INSERT INTO messages (session_pk, seq, body) VALUES (?, ?, ?)"


_INSERT_SESSION = (
    "INSERT INTO sessions (incarnation, owner, name, status, created_at, last_active, "
    "closed_at, expires_at, revision, message_count, name_cf, doc, id, first_cf) VALUES "
    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_ALL_MESSAGES: Final = 1 << 62
#: A session and the rows of its last ``?`` messages (from the row holding message
#: ``message_count - ?`` on): one statement, so it needs no explicit transaction.
_READ_SESSION = (
    "SELECT s.doc, s.message_count, s.last_active, s.expires_at, s.revision, s.incarnation, "
    "m.seq, "
    "m.body "
    "FROM sessions AS s LEFT JOIN messages AS m ON m.session_pk = s.pk AND m.seq >= "
    "(SELECT max(seq) FROM messages WHERE session_pk = s.pk "
    "AND seq <= max(0, s.message_count - ?)) "
    "WHERE s.id = ? ORDER BY m.seq"
)


def _sql_int(value: int) -> int:
    """A count or limit for a SQL parameter: beyond what SQLite's 64-bit integers hold, a
    huge value means no limit (``_ALL_MESSAGES`` is more than any store holds)."""
    return max(-1, min(value, _ALL_MESSAGES))


def _window_start(count: int, last_messages: int | None) -> int:
    return 0 if last_messages is None else max(0, count - max(0, last_messages))


def _read_messages(
    conn: sqlite3.Connection, session_id: uuid.UUID, pk: int, start: int, count: int
) -> _Rows:
    """The rows holding messages ``start`` to ``count - 1`` of a session.

    Reads the row holding message ``start`` and the rows after it, nothing earlier.
    """
    if start >= count:
        return _NO_ROWS
    if start == 0:
        rows = conn.execute(
            "SELECT seq, body FROM messages WHERE session_pk = ? ORDER BY seq", (pk,)
        )
    else:
        rows = conn.execute(
            "SELECT seq, body FROM messages WHERE session_pk = ? AND seq >= "
            "(SELECT max(seq) FROM messages WHERE session_pk = ? AND seq <= ?) ORDER BY seq",
            (pk, pk, start),
        )
    return _assemble(session_id, rows, 0, start, count)


def _assemble(
    session_id: uuid.UUID, rows: Iterable[Sequence[Any]], column: int, start: int, count: int
) -> _Rows:
    """The rows holding messages ``start`` to ``count - 1`` (``seq, body`` at ``column``).

    Rows are not scanned here (that would cost as much as reading them): each row's
    message count follows from the next row's ``seq``, and :meth:`_Rows.message`
    checks it when the row is first split.
    """
    if start >= count:
        return _NO_ROWS
    found = _Rows()
    firsts, bodies = found._firsts, found._bodies
    last = -1
    for row in rows:
        seq, body = row[column], row[column + 1]
        if type(seq) is not int or not last < seq < count:  # None: LEFT JOIN, no rows
            break
        firsts.append(seq)
        bodies.append(body if type(body) is bytes else _as_bytes(body))
        last = seq
    found._parts = [None] * len(bodies)
    if not firsts or firsts[0] > start:
        held = "no rows" if not firsts else f"rows from message {firsts[0]} on"
        raise CorruptSessionError(
            f"expected message rows for messages {start} to {count - 1}, found {held}",
            session_id=session_id,
        )
    firsts.append(count)
    return found


def _as_bytes(body: object) -> bytes:
    return body.encode() if type(body) is str else b""


def _remove_rows(conn: sqlite3.Connection, pk: int) -> None:
    """Delete a session's rows (its rowid may be reused: leave no mark behind)."""
    conn.execute("DELETE FROM messages WHERE session_pk = ?", (pk,))
    conn.execute("DELETE FROM contended WHERE session_pk = ?", (pk,))
    conn.execute("DELETE FROM sessions WHERE pk = ?", (pk,))


def _store_messages(conn: sqlite3.Connection, pk: int, count: int, bodies: list[bytes]) -> None:
    """Store ``bodies`` as messages ``count`` on of a session that has ``count`` messages.

    One new row, unless the history crosses a multiple of :data:`CHUNK_MESSAGES`: then
    the rows since the previous multiple and the new messages become full chunks
    (``CHUNK_MESSAGES`` each, starting at multiples of it) and one row for the rest.
    """
    if not bodies:
        return
    base = count - count % CHUNK_MESSAGES
    if count + len(bodies) - base < CHUNK_MESSAGES:
        conn.execute(_INSERT_MESSAGES, (pk, count, _SEP.join(bodies)))
        return
    if count > base:
        tail: list[bytes] = []
        position = base
        for seq, body in conn.execute(
            "SELECT seq, body FROM messages WHERE session_pk = ? AND seq >= ? ORDER BY seq",
            (pk, base),
        ):
            if seq != position or type(body) is not bytes:
                break
            parts = body.split(_SEP)
            tail += parts
            position += len(parts)
        if position != count:
            # Damaged rows (reads report them): leave them alone, just add ours.
            conn.execute(_INSERT_MESSAGES, (pk, count, _SEP.join(bodies)))
            return
        conn.execute("DELETE FROM messages WHERE session_pk = ? AND seq >= ?", (pk, base))
        bodies = tail + bodies
    conn.executemany(
        _INSERT_MESSAGES,
        [
            (pk, base + i, _SEP.join(bodies[i : i + CHUNK_MESSAGES]))
            for i in range(0, len(bodies), CHUNK_MESSAGES)
        ],
    )


# -- requests to the worker -----------------------------------------------------------

#: A request's states. Only the worker moves a request on from ``_RUNNING`` (to
#: ``_DONE``); a caller cancelled meanwhile sets ``abandoned`` instead, so it can never
#: undo an answer given at that very moment.
_QUEUED, _RUNNING, _CANCELLED, _DONE = range(4)


class _Request:
    """One operation handed to the worker thread and the way back to its caller."""

    __slots__ = (
        "abandoned",
        "error",
        "event",
        "fn",
        "result",
        "started",
        "state",
        "token",
        "transaction",
        "write",
    )

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any] | None,
        write: bool,
        transaction: bool = True,
    ) -> None:
        self.fn = fn
        self.write = write
        self.transaction = transaction  # False: one read statement, a snapshot by itself
        self.token = token = anyio.lowlevel.current_token()
        self.event = token.backend_class.create_event()
        self.state = _QUEUED
        # A read the worker had started when its caller was cancelled (set under the
        # state lock, read under it by _take): if it is put off until after a write (see
        # _serve), it is dropped. The close-time drain reads it without the lock: a read
        # abandoned at that moment may get a "closed" error no one waits for, harmlessly.
        self.abandoned = False
        self.result: Any = None
        self.error: BaseException | None = None
        # When the worker first took it from the queue (time.monotonic): its busy error
        # counts the wait from there, even if it ran in a later batch.
        self.started: float | None = None


async def _join(thread: threading.Thread) -> None:
    """Wait for a worker that was told to stop to exit (it answered the stop already).

    With a limiter of its own: closing must not wait for the default thread limiter,
    which the application's other blocking work may be holding.
    """
    await anyio.to_thread.run_sync(thread.join, limiter=anyio.CapacityLimiter(1))


def _wake(requests: Sequence[_Request]) -> None:
    for request in requests:
        request.event.set()


def _run_soon(token: anyio.lowlevel.EventLoopToken, requests: Sequence[_Request]) -> None:
    """Schedule ``_wake(requests)`` in the token's event loop, without waiting for it.

    The native tokens' own thread-safe schedulers (an asyncio loop's
    ``call_soon_threadsafe``, a ``TrioToken``'s ``run_sync_soon``) are called directly:
    anyio's ``run_sync_soon`` wraps them in a copied context that ``_wake`` does not
    need. Raises :class:`anyio.RunFinishedError` when the loop is gone.
    """
    native = token.native_token
    soon = getattr(native, "call_soon_threadsafe", None) or getattr(native, "run_sync_soon", None)
    if soon is None:  # another backend: its documented way
        token.backend_class.run_sync_soon(_wake, (requests,), native)
        return
    try:
        soon(_wake, requests)
    except RuntimeError as exc:  # asyncio: loop closed; trio.RunFinishedError subclasses it
        raise anyio.RunFinishedError from exc


# The smallest page size: a database file is empty or at least one page long.
_SQLITE_MIN_PAGE = 512

# sqlite3_errstr() texts of the primary codes we act on: Python 3.10's exceptions carry
# no sqlite_errorcode (added in 3.11), only this message.
_CODE_BY_MESSAGE = {
    "database is locked": _SQLITE_BUSY,
    "database table is locked": _SQLITE_LOCKED,
    "database or disk is full": _SQLITE_FULL,
    "disk I/O error": _SQLITE_IOERR,
    "file is not a database": _SQLITE_NOTADB,
    "attempt to write a readonly database": _SQLITE_READONLY,
    "unable to open database file": _SQLITE_CANTOPEN,
    "access permission denied": _SQLITE_PERM,
}


def _primary_code(exc: sqlite3.Error) -> int:
    """The primary SQLite result code of ``exc`` (0 if unknown), on every Python."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return int(code) & 0xFF
    text = str(exc)
    for message, known in _CODE_BY_MESSAGE.items():
        if text.startswith(message):
            return known
    return 0


def _is_busy(exc: sqlite3.Error) -> bool:
    return _primary_code(exc) in (_SQLITE_BUSY, _SQLITE_LOCKED)


@attrs.frozen(slots=True)
class SQLiteStatistics:
    """Counters of a :class:`SQLiteRepository` since it was created."""

    #: Operations the worker ran (whatever their outcome).
    operations: int
    #: Operations withdrawn because their caller was cancelled before they ran.
    withdrawn: int
    #: Transactions committed (a group commit counts once).
    commits: int
    #: The most operations committed in one transaction.
    largest_batch: int


@attrs.frozen
class _Saved:
    """The outcome of a compare-and-set on the worker (a refusal is returned, not raised,
    so that its ``contended`` mark commits)."""

    refused: bool
    revision: int  # the stored revision it was checked against
    current: _Row | None  # on a refusal: the stored session, for the caller's retry
    contested: bool  # another writer's revision now, or a refusal marked since the last save
    incarnation: int | None  # the session's incarnation column


class _Aborted(Exception):
    """The batch transaction was rolled back by SQLite; rerun its operations one by one."""


class _Replaced(Exception):
    """The database file was deleted or replaced while open: the write batch is rolled
    back and each of its operations fails with this message."""


class _Locked(Exception):
    """The batch transaction could not begin: another connection kept its lock for the
    whole ``busy_timeout``."""

    def __init__(self, error: sqlite3.Error) -> None:
        super().__init__(str(error))
        self.error = error


class _Unfinished(Exception):
    """Raised on the worker by an operation run outside any transaction (a checkpoint)
    that another connection kept from finishing: it runs again until the batch's
    ``busy_timeout`` deadline, then fails with a recoverable :class:`StorageError` of
    this message (plus how long it waited)."""


class _OlderLayout(StorageError):
    """The file's layout is older than :data:`SCHEMA_VERSION` and the store was made with
    ``upgrade=False``: nothing was written. ``layout`` is the file's layout version,
    ``supported`` this release's, ``path`` the store's."""

    def __init__(self, path: Path, layout: int) -> None:
        self.path = path
        self.layout = layout
        self.supported = SCHEMA_VERSION
        url = "sqlite:///" + urllib.parse.quote(os.fspath(path), safe="/")
        super().__init__(
            f"Cannot open SQLite database {path}: it has layout version {layout}, older "
            f"than this asyncsession's ({SCHEMA_VERSION}), and this store does not "
            "upgrade it (upgrade=False); nothing was written. To upgrade it, run "
            f"`asyncsession migrate --store {url}` or open it with upgrade=True: releases "
            f"that know layout {layout} at most refuse the file from then on, so stop "
            "the processes running one first. Or read it with the release that wrote it."
        )


class _BusyAtOpen(StorageError):
    """The open found the file's write lock held by another connection for the whole
    ``busy_timeout`` (``waited``, in seconds); recoverable. ``path`` is the store's."""

    def __init__(self, message: str, path: Path, waited: float) -> None:
        self.path = path
        self.waited = waited
        super().__init__(message, recoverable=True)


class SQLiteRepository(SessionRepository):
    """Sessions in a SQLite database file (WAL mode), served by one worker thread.

    ``async with SQLiteRepository("sessions.db") as repo:`` opens the file (creating it
    and its tables if needed, upgrading an older layout in place unless
    ``upgrade=False``) and starts the thread;
    leaving the block finishes queued operations and stops it. Several processes may
    share one file: writes are serialized by SQLite's lock and checked by revision.

    Options:

    * ``synchronous`` — what a commit waits for (SQLite's ``PRAGMA synchronous``, WAL).
      Every mode keeps every acknowledged write across a crash or ``kill -9`` of the
      process. Across power loss or an OS crash: ``"FULL"`` / ``"EXTRA"`` keep every
      acknowledged write (one fsync per commit batch); ``"NORMAL"`` (default) keeps the
      database consistent but may lose the writes of the last moments before the
      failure (fsync at checkpoints only); ``"OFF"`` may corrupt the database.
    * ``busy_timeout`` — how long (seconds or a ``timedelta``, above 0 and at most an
      hour; default 5) to wait for another connection's write lock before
      the operation fails with a recoverable :class:`StorageError`. A read answered
      while a write waits for that lock, and finding the database busy too, runs again
      after the write with a ``busy_timeout`` of its own (see the module docstring).
    * ``upgrade`` — whether opening brings a file of an older layout up to
      :data:`SCHEMA_VERSION` in place (default ``True``); releases that know only the
      older layout refuse the file from then on. With ``False`` such a file fails the
      open with :class:`StorageError` (nothing written) saying what to do: for tools
      that only look at a file an older release may still be serving. A new file is
      created at this release's layout either way, and the store is not read-only.
    * ``max_batch`` — most operations committed together in one group commit.
    * ``pragmas`` — extra ``PRAGMA name = value`` settings for the connection (for
      example ``{"cache_size": -65536}``); names and values are checked, not trusted.
      Pragmas the store owns (``user_version``, ``application_id``, ``journal_mode``,
      ``synchronous``, ``busy_timeout``, ``locking_mode``, ...) are refused with
      :class:`InvalidConfiguration`, and so are those that reach beyond this
      connection (``hard_heap_limit``, ``soft_heap_limit``, ``threads``, ...).
      They are applied after the store's own (``wal_autocheckpoint`` is
      :data:`WAL_AUTOCHECKPOINT` pages and ``secure_delete`` is ``ON`` unless set
      here; see :meth:`checkpoint`), and each is read back: opening
      fails with :class:`InvalidConfiguration` if one did not take (an unknown name, a
      value SQLite turned into another, such as a word where it wants a number).
    * ``snapshot_cache`` — how many sessions (100,000 messages at most in all) the store
      remembers as it last wrote or read them, so the manager's ``update()`` is one hop
      to the worker (the compare-and-set) instead of a read plus a compare-and-set.
      Another process's change makes the compare-and-set refuse the remembered
      snapshot and the manager reads again. ``0`` turns it off, and the cache of
      decoded documents with it: nothing decoded is kept between calls.
    * ``snapshot_cache_bytes`` — an int >= 0 bounding the remembered sessions' data,
      counted as stored (document and messages as JSON): a session over a quarter of
      it is not remembered. The cache of decoded documents gets an eighth of it (a
      document over 1/64 of it, or over 16 KiB, is not cached). ``0`` turns both off.
    * ``file_mode`` — permissions of a database file this store creates (default
      ``0o600``: session data is readable by its owner only; the umask applies on top).
      SQLite gives the ``-wal`` and ``-shm`` files the database's mode; an existing
      file keeps its own. A path through a symbolic link creates the link's target.

    Opening checks that the process may write the file (SQLite would open a file it may
    only read without a word, and fail every write): a file, ``-wal``, ``-shm`` or
    directory it may not write fails the open with :class:`StorageError`. The file must
    stay in place while open: once it is deleted, moved or replaced, every write fails
    (nothing of it committed) with a :class:`StorageError` saying so. The file is the one
    SQLite opened: the path resolved once at the open (a relative path from the working
    directory then, a symbolic link to its target then), so a later ``os.chdir`` or a
    link pointed elsewhere does not move the store to another file.

    Cancellation: an operation still waiting in the queue is withdrawn and never runs;
    a write the worker has started completes (awaited, shielded, for at most
    ``2 * busy_timeout + 5`` seconds) before ``Cancelled`` propagates; a started read's
    caller returns at once and its answer is dropped (put off until after a waiting
    write, it is not run again). Either way the database holds the old or the new state
    of the session, never a mix: each operation is one transaction (or savepoint).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "NORMAL",
        busy_timeout: float | timedelta = 5.0,
        upgrade: bool = True,
        max_batch: int = 256,
        pragmas: Mapping[str, int | str] | None = None,
        snapshot_cache: int = 1_000,
        file_mode: int = 0o600,
        snapshot_cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        _check_file_mode(file_mode)
        check_cache_bytes(snapshot_cache_bytes)
        if isinstance(synchronous, str):
            synchronous = synchronous.upper()
        if synchronous not in _SYNCHRONOUS:
            raise InvalidConfiguration(
                f"synchronous must be one of {', '.join(_SYNCHRONOUS)}; got {synchronous!r}."
            )
        busy_seconds = to_seconds(busy_timeout, "busy_timeout", longest=_LONGEST_BUSY)
        check_flag(upgrade, "upgrade")
        if type(max_batch) is not int or not 1 <= max_batch <= 10_000:
            raise InvalidConfiguration(
                f"max_batch must be an int from 1 to 10000; got {max_batch!r}."
            )
        if pragmas is not None and not isinstance(pragmas, Mapping):
            raise InvalidConfiguration(
                f"pragmas must be a mapping of pragma names to values, e.g. "
                f'{{"cache_size": -65536}}; got {type(pragmas).__name__}.'
            )
        extra = dict(pragmas or {})
        for name, value in extra.items():
            if (
                not isinstance(name, str)
                or _PRAGMA_NAME.fullmatch(name) is None
                or (
                    isinstance(value, bool)
                    or not isinstance(value, (int, str))
                    or _PRAGMA_VALUE.fullmatch(str(value)) is None
                )
            ):
                raise InvalidConfiguration(
                    f"Invalid pragma {name!r} = {value!r}: use a lowercase pragma name and "
                    "an integer or a single word as its value."
                )
            if name in _STORE_PRAGMAS:
                raise InvalidConfiguration(
                    f"pragmas= may not set {name!r} ({_STORE_PRAGMAS[name]}). The store "
                    f"owns these pragmas: {', '.join(sorted(_STORE_PRAGMAS))}."
                )
            if name in _PROCESS_PRAGMAS:
                raise InvalidConfiguration(
                    f"pragmas= may not set {name!r}: {_PROCESS_PRAGMAS[name]}, not just "
                    "this store's connection. Refused: "
                    f"{', '.join(sorted(_PROCESS_PRAGMAS))}."
                )
            words = _PRAGMA_ONLY_WORDS.get(name)
            if (
                words is not None
                and not isinstance(value, int)
                and not value.lstrip("-").isdigit()
                and value.lower() not in words
            ):
                wanted = f"a number or {'/'.join(words)}" if words else "a number"
                raise InvalidConfiguration(
                    f"Invalid pragma {name!r} = {value!r}: this pragma wants {wanted}. "
                    "SQLite would take another word for it without an error, in a way "
                    "reading it back cannot show."
                )
        if isinstance(path, str) and (
            path.endswith(("/", os.sep)) or os.path.basename(path) in (".", "..")
        ):  # "store/" and "store/." name a directory, but Path() would make them "store"
            raise InvalidConfiguration(
                f"The SQLite path {path!r} names a directory; name the database file in "
                f"it, e.g. {os.path.join(path, 'sessions.db')!r}."
            )
        self._path = Path(path)
        self._memory = os.fspath(self._path) == ":memory:"
        # The file SQLite opened, resolved at the open (see _connect), and its
        # (st_dev, st_ino) then: _check_file compares with them before each commit.
        self._file = os.fspath(self._path)
        self._identity: tuple[int, int] | None = None
        self._file_mode = file_mode
        self._synchronous = synchronous
        self._busy_timeout = busy_seconds
        self._upgrades = upgrade
        self._lock_slice = min(self._busy_timeout, _LOCK_SLICE)
        self._max_batch = max_batch
        self._pragmas = extra
        self._queue: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._state_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._operations = 0
        self._withdrawn = 0
        self._commits = 0
        self._largest_batch = 0
        self._held = HeldSnapshots(snapshot_cache, max_bytes=snapshot_cache_bytes)
        self._documents: DecodeCache[_Template] = DecodeCache(
            1024, snapshot_cache_bytes // 8 if self._held.enabled else 0, largest=_MAX_DOCUMENT
        )

    def __repr__(self) -> str:
        return f"SQLiteRepository({str(self._path)!r}, synchronous={self._synchronous!r})"

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    def statistics(self) -> SQLiteStatistics:
        """Return the operation and commit counters (group commit shows as few commits)."""
        return SQLiteStatistics(
            self._operations, self._withdrawn, self._commits, self._largest_batch
        )

    async def checkpoint(self, *, vacuum: bool = False) -> None:
        """Copy the write-ahead log into the database file and truncate the ``-wal`` file
        to 0 bytes (SQLite's ``PRAGMA wal_checkpoint(TRUNCATE)``), in one hop to the
        worker, after the writes queued before it.

        Call it after deleting sessions (or after the manager's expiry cleanup) when
        their data must leave the files. Until a checkpoint, the ``-wal`` file still
        holds the pages the sessions were written in: the store's own checkpoints (every
        :data:`WAL_AUTOCHECKPOINT` pages) copy the log but leave the file its size, old
        pages readable until overwritten; SQLite deletes the ``-wal`` file only when
        the last connection to the database closes.

        What it guarantees: the ``-wal`` file is truncated to 0 bytes. Deleted rows were
        overwritten with zeros by ``secure_delete`` (on by default), but SQLite may leave
        older copies of rows in pages' free space (when it reorganises a page as rows
        grow and move), so fragments of deleted sessions may remain in the database file
        until a ``VACUUM``; so do rows deleted with ``pragmas={"secure_delete": "off"}``
        or before this store turned it on (an older release, or a program of your own).

        ``vacuum=True`` runs ``VACUUM`` first, then the checkpoint: the database file is
        rewritten from its live rows, so no copy of a deleted row remains in either file.
        It costs a rewrite of the whole file: it needs free disk space of up to about
        twice the file's size (a temporary copy, then the log holding every page until
        the checkpoint), and it holds the write lock while it runs, so other processes'
        writes wait (up to their busy timeout) and this store's other operations wait on
        its worker. Use it where erasure must be complete, such as a nightly job after
        the expiry cleanup, not after every deletion.

        Every connection to the file must be done with the log for the checkpoint to
        finish: another connection (another process, or another store on this file)
        reading or writing the database is waited for, up to ``busy_timeout`` (the
        store's other operations queued meanwhile: its reads are answered, its writes
        wait), while new writers of other connections wait for the checkpoint; ``VACUUM``
        waits the same way for another connection's write. If they are still at it then,
        this raises a recoverable :class:`StorageError` (part of the log may have been
        copied; nothing is lost): retry when the other processes are idle. A retry after
        a ``VACUUM`` that finished runs it again. A closed store raises
        :class:`StorageError` like every other operation; an in-memory database has no
        log (``vacuum=True`` still compacts it).
        """
        name = f"{self._path.name}-wal"
        vacuumed = not check_flag(vacuum, "vacuum")

        def op(conn: sqlite3.Connection) -> None:
            nonlocal vacuumed
            if not vacuumed:  # a retry repeats only the checkpoint
                conn.execute("VACUUM")
                vacuumed = True
            busy, log, copied = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if busy or log != copied:
                pages = f"; {copied} of {log} log pages copied" if log >= 0 else ""
                raise _Unfinished(
                    f"Checkpoint of SQLite database {self._path} could not finish: another "
                    "connection (another process, or another store on this file) kept "
                    f"reading or writing it (busy={busy}{pages}). Deleted data may remain "
                    f"in {name} until a checkpoint finishes: retry the checkpoint when the "
                    "other processes are idle (no long read or write transaction open)."
                )

        await self._call(op, write=True, transaction=False)

    # -- lifecycle ------------------------------------------------------------------

    async def _open(self) -> None:
        # The base class runs opens and closes one at a time. Each worker has its own
        # queue and connection: a worker that is still exiting never touches the next.
        opening = _Request(None, write=True)
        requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        thread = threading.Thread(
            target=self._serve,
            args=(opening, requests),
            name=f"asyncsession-sqlite:{self._path.name}",
            daemon=True,
        )
        thread.start()
        try:
            await opening.event.wait()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await opening.event.wait()
                if opening.error is None:
                    stop = _Request(None, write=False)
                    requests.put(stop)
                    await stop.event.wait()
                await _join(thread)
            raise
        if opening.error is not None:
            await _join(thread)
            raise opening.error
        with self._state_lock:
            self._queue = requests
            self._thread = thread
            self._accepting = True
        logger.debug("opened %s", self._path)

    async def _close(self) -> None:
        self._held.clear()
        with anyio.CancelScope(shield=True):
            await self._shutdown()
        logger.debug("closed %s", self._path)

    async def _shutdown(self) -> None:
        # Refusing new requests and queueing the stop are one step under the state lock
        # (as checking and queueing are in _call), so no request lands behind the stop.
        with self._state_lock:
            thread = self._thread
            if thread is None:
                return
            self._accepting = False
            stop = _Request(None, write=False)
            self._queue.put(stop)
        await stop.event.wait()
        await _join(thread)
        with self._state_lock:
            if self._thread is thread:
                self._thread = None

    # -- the caller's side of a request -------------------------------------------------

    async def _call(
        self, fn: Callable[[sqlite3.Connection], T], *, write: bool, transaction: bool = True
    ) -> T:
        """Run ``fn`` on the worker in a transaction. ``transaction=False``: for a read,
        one that runs a single statement, which SQLite already runs as one snapshot; for a
        write, one that must run outside any transaction (a checkpoint): it runs after
        its batch's other writes, again while it raises :class:`_Unfinished`."""
        request = _Request(fn, write, transaction)
        with self._state_lock:  # atomic with _shutdown(): queued before its stop, or refused
            if not self._accepting:
                raise StorageError(
                    f"{self!r} is not open. Use `async with SQLiteRepository(path) as repo:` "
                    "or pass it to `async with SessionManager(repo)`."
                )
            self._queue.put(request)
        try:
            await request.event.wait()
        except anyio.get_cancelled_exc_class():
            with self._state_lock:
                if request.state == _QUEUED:
                    request.state = _CANCELLED
                    raise
                if not write:
                    request.abandoned = True  # no one to answer: dropped if put off
            if write:
                with (
                    anyio.CancelScope(shield=True),
                    anyio.move_on_after(2 * self._busy_timeout + 5),
                ):
                    await request.event.wait()
            raise
        if request.error is not None:
            error, request.error = request.error, None
            raise error
        result: T = request.result
        return result

    # -- the worker thread --------------------------------------------------------------

    def _serve(self, opening: _Request, requests: queue.SimpleQueue[_Request]) -> None:
        """The worker: its own connection, serving its own queue until a stop request."""
        try:
            conn = self._connect()
        except BaseException as exc:  # handed back to _open()
            opening.error = exc
            self._answer([opening])
            return
        self._answer([opening])
        # Requests taken from the queue while a write waited for another connection's
        # lock, other than the reads answered meanwhile, and the reads put off until
        # after the write: they run next, the reads first, then the rest in order (a
        # put-off read whose caller was cancelled meanwhile is dropped, see _take).
        later: collections.deque[_Request] = collections.deque()

        def put_off(reads: list[_Request]) -> None:
            later.extendleft(reversed(reads))

        def reads_meanwhile(deadline: float) -> None:
            """Answer the reads queued while a write waits for another connection's
            lock (WAL readers need no lock); keep the rest for after the write.

            ``deadline`` is the waiting write's: a read that finds the database busy
            too (another process recovering the WAL, say) waits no longer than the
            write does, so the write's wait stays bounded by its own busy_timeout.
            Still busy at that deadline, it is put off: it runs again after the
            write, in the next batch, with that batch's own busy_timeout deadline."""
            reads: list[_Request] = []
            while len(reads) < self._max_batch:
                try:
                    request = requests.get_nowait()
                except queue.Empty:
                    break
                if request.fn is None or request.write:
                    request.started = time.monotonic()  # its wait begins now
                    later.append(request)
                else:
                    reads.append(request)
            live, _ = self._take(reads)
            if live:
                try:
                    self._run_group(conn, live, deadline, put_off=put_off)
                except BaseException as exc:
                    self._fail([r for r in live if r not in later], exc)
                    raise

        stopping: _Request | None = None
        while stopping is None:
            batch = [later.popleft() if later else requests.get()]
            while len(batch) < self._max_batch:  # the worker is the only consumer
                if later:
                    batch.append(later.popleft())
                elif not requests.empty():
                    batch.append(requests.get_nowait())
                else:
                    break
            live, stopping = self._take(batch)
            if live:
                try:
                    self._execute(conn, live, reads_meanwhile)
                except BaseException as exc:  # a bug here must not leave callers waiting
                    logger.exception("SQLite worker of %s failed", self._path)
                    self._rollback(conn)
                    self._fail(live, exc)
        try:
            conn.close()
        except sqlite3.Error:
            logger.exception("closing %s failed", self._path)
        assert stopping is not None
        leftovers: list[_Request] = [stopping]
        while True:  # none can follow the stop (see _call); refuse any, never leave one waiting
            try:
                request = later.popleft() if later else requests.get_nowait()
            except queue.Empty:
                break
            if request.abandoned:  # a put-off read no one waits for
                continue
            request.error = StorageError(f"{self!r} was closed before this operation ran.")
            leftovers.append(request)
        self._answer(leftovers)

    def _take(self, batch: list[_Request]) -> tuple[list[_Request], _Request | None]:
        """Mark the requests of ``batch`` the worker will run (withdrawn ones are
        skipped); return them and the stop request, if ``batch`` holds it. A read put
        off until after a write (already running) is returned and not counted again;
        dropped, uncounted, if its caller was cancelled meanwhile."""
        live: list[_Request] = []
        stopping: _Request | None = None
        now = time.monotonic()
        with self._state_lock:
            for request in batch:
                if request.fn is None:
                    stopping = request
                elif request.state == _QUEUED:
                    request.state = _RUNNING
                    if request.started is None:  # not taken out of the queue before
                        request.started = now
                    live.append(request)
                    self._operations += 1
                elif request.state == _RUNNING:
                    if not request.abandoned:
                        live.append(request)
                elif request.state == _CANCELLED:
                    self._withdrawn += 1
        return live, stopping

    def _fail(self, requests: list[_Request], exc: BaseException) -> None:
        """Answer the requests not answered yet after a bug in the worker."""
        unanswered = [r for r in requests if r.state != _DONE]
        for request in unanswered:
            request.result = None
            request.error = StorageError(
                f"Internal error in the SQLite worker of {self._path}: {exc!r}; "
                "the operation was rolled back. Please report this."
            )
        if unanswered:
            self._answer(unanswered)

    def _answer(self, requests: Sequence[_Request]) -> None:
        """Wake the callers: one wake-up per event loop for the whole batch.

        Fire and forget: the worker does not wait for the loop to run it.
        """
        native = requests[0].token.native_token
        one_loop = True
        for request in requests:
            request.state = _DONE
            if request.token.native_token is not native:
                one_loop = False
        if one_loop:
            groups: Iterable[tuple[anyio.lowlevel.EventLoopToken, Sequence[_Request]]] = (
                (requests[0].token, requests),
            )
        else:
            by_loop: dict[int, tuple[anyio.lowlevel.EventLoopToken, list[_Request]]] = {}
            for request in requests:
                key = id(request.token.native_token)
                by_loop.setdefault(key, (request.token, []))[1].append(request)
            groups = by_loop.values()
        for token, waiting in groups:
            try:
                _run_soon(token, waiting)
            except anyio.RunFinishedError:
                logger.debug("event loop gone; %d answers dropped", len(waiting))
            except Exception:
                logger.exception("could not answer %d callers of %s", len(waiting), self._path)

    def _execute(
        self,
        conn: sqlite3.Connection,
        batch: list[_Request],
        meanwhile: Callable[[float], None] | None = None,
    ) -> None:
        """Run a batch and answer each request as soon as its outcome is known.

        The batch has one ``busy_timeout`` deadline: however many of its operations have
        to be rerun one by one, none waits for another connection's write lock past it.
        Its reads run first, outside the write transaction (WAL readers never wait for
        the write lock). While its writes wait for that lock, ``meanwhile(deadline)`` is
        called between two waits (outside any transaction) to answer the reads queued
        since, within the same deadline (it puts off those still busy at the deadline).
        """
        deadline = time.monotonic() + self._busy_timeout
        outside = [r for r in batch if r.write and not r.transaction]
        if outside:
            batch = [r for r in batch if r.transaction or not r.write]
        writes = [r for r in batch if r.write]
        if writes and len(writes) < len(batch):
            self._run_group(conn, [r for r in batch if not r.write], deadline)
            batch = writes
        gave_up = None
        if batch:
            gave_up = self._run_group(conn, batch, deadline, meanwhile if writes else None)
        if outside:  # after the batch's writes: one by one, never in a transaction
            self._run_group(conn, outside, deadline, meanwhile, gave_up=gave_up)

    def _run_group(
        self,
        conn: sqlite3.Connection,
        group: list[_Request],
        deadline: float,
        meanwhile: Callable[[float], None] | None = None,
        *,
        put_off: Callable[[list[_Request]], None] | None = None,
        gave_up: sqlite3.Error | _Unfinished | None = None,
    ) -> sqlite3.Error | _Unfinished | None:
        """Run ``group`` (all reads, or all writes) in one transaction if it can, else one
        by one before ``deadline``; answer each request as soon as its outcome is known.
        Returns the busy error an operation gave up on at the deadline, if one did.

        Writes that must run outside any transaction (a checkpoint) always run one by
        one. With ``put_off``, the requests still busy at the deadline are handed to it,
        unanswered, instead of failing. ``gave_up``: an earlier group of the batch gave
        up at the deadline with this error; this group's requests fail with it at once
        (none waits once more)."""
        if len(group) > 1 and all(r.transaction or not r.write for r in group):
            try:
                self._run_batch(conn, group, deadline, meanwhile)
            except _Locked as exc:
                # The transaction waited busy_timeout for another connection's lock:
                # every operation of the group has, so none waits once more.
                self._rollback(conn)
                if put_off is not None:
                    put_off(group)
                    return None
                for request in group:
                    self._still_locked(request, exc.error)
                self._answer(group)
                return exc.error
            except _Replaced as exc:
                self._rollback(conn)
                for request in group:  # one exception each: raised in different tasks
                    request.result, request.error = None, StorageError(str(exc))
                self._answer(group)
                return None
            except (_Aborted, sqlite3.Error) as exc:
                logger.warning(
                    "group commit of %d operations on %s failed (%s); running them one by one",
                    len(group),
                    self._path,
                    exc,
                )
                self._rollback(conn)
            else:
                self._answer(group)
                return None
        locked = gave_up
        still_busy: list[_Request] = []
        for request in group:  # SQLite's own waits for a lock are slices of the deadline
            if locked is None:  # once one gave up at the deadline, none waits once more
                locked = self._run_alone(conn, request, deadline, meanwhile)
            if locked is None:
                self._answer([request])
            elif put_off is not None:
                still_busy.append(request)
            else:
                self._still_locked(request, locked)
                self._answer([request])
        if still_busy:
            assert put_off is not None
            put_off(still_busy)
        return locked

    def _still_locked(self, request: _Request, error: sqlite3.Error | _Unfinished) -> None:
        """Fail ``request`` with the busy ``error`` (or :class:`_Unfinished`) it, or
        another operation of its group, got at the group's deadline, saying how long it
        waited."""
        assert request.started is not None
        waited = time.monotonic() - request.started
        request.result = None
        if isinstance(error, _Unfinished):
            request.error = StorageError(
                f"{error} It waited {waited:.2f}s (busy_timeout {self._busy_timeout:g}s).",
                recoverable=True,
            )
        else:
            request.error = self._storage_error(error, waited)
            request.error.__cause__ = error

    def _run_batch(
        self,
        conn: sqlite3.Connection,
        batch: list[_Request],
        deadline: float,
        meanwhile: Callable[[float], None] | None = None,
    ) -> None:
        writes = any(r.write for r in batch)
        try:
            self._begin(conn, writes, deadline, meanwhile)
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                raise _Locked(exc) from exc
            raise
        results: list[tuple[Any, BaseException | None]] = []
        for request in batch:
            assert request.fn is not None
            if not request.write:  # reads change nothing: no savepoint needed
                try:
                    results.append((request.fn(conn), None))
                except sqlite3.Error as exc:
                    raise _Aborted(str(exc)) from exc
                except Exception as exc:
                    if isinstance(exc, MemoryError):
                        exc = self._memory_error(exc)
                    results.append((None, exc))
                continue
            conn.execute("SAVEPOINT op")
            try:
                value = request.fn(conn)
            except Exception as exc:
                if not conn.in_transaction:
                    raise _Aborted(str(exc)) from exc
                try:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                except sqlite3.Error as inner:
                    raise _Aborted(str(inner)) from inner
                if isinstance(exc, sqlite3.Error):
                    raise _Aborted(str(exc)) from exc  # rerun alone for a precise error
                if isinstance(exc, MemoryError):
                    exc = self._memory_error(exc)
                results.append((None, exc))
            else:
                conn.execute("RELEASE op")
                results.append((value, None))
        if writes:
            try:
                self._check_file()
            except StorageError as exc:
                raise _Replaced(str(exc)) from None
        conn.execute("COMMIT")
        self._commits += 1
        self._largest_batch = max(self._largest_batch, len(batch))
        for request, (value, error) in zip(batch, results, strict=True):
            request.result, request.error = value, error

    def _run_alone(
        self,
        conn: sqlite3.Connection,
        request: _Request,
        deadline: float,
        meanwhile: Callable[[float], None] | None = None,
    ) -> sqlite3.Error | _Unfinished | None:
        """Run ``request`` in its own transaction, again while the database is busy,
        until ``deadline``. Returns the busy error it gave up on at the deadline, leaving
        the request unanswered for the caller to fail or put off; else None.

        A request with ``transaction=False`` runs outside any transaction: a read of one
        statement (called without ``meanwhile``), or a write that must (a checkpoint).
        That write also runs again while it raises :class:`_Unfinished` (another
        connection kept it from finishing), returned like a busy error at the deadline,
        and ``meanwhile(deadline)`` is called between its tries."""
        assert request.fn is not None
        delay = 0.001
        while True:
            start = time.monotonic()
            try:
                if not request.transaction:
                    request.result = request.fn(conn)
                    return None
                self._begin(conn, request.write, deadline, meanwhile)
                try:
                    request.result = request.fn(conn)
                    if request.write:
                        self._check_file()
                except BaseException:
                    request.result = None
                    self._rollback(conn)
                    raise
                conn.execute("COMMIT")
                self._commits += 1
                self._largest_batch = max(self._largest_batch, 1)
                return None
            except (sqlite3.Error, _Unfinished) as exc:
                self._rollback(conn)
                request.result = None
                if isinstance(exc, sqlite3.Error) and not _is_busy(exc):
                    request.error = self._storage_error(exc)
                    request.error.__cause__ = exc
                    return None
                now = time.monotonic()
                if meanwhile is not None and not request.transaction:
                    if now >= deadline:
                        return exc
                    meanwhile(deadline)  # the reads queued since are answered
                    if now - start < self._lock_slice / 2:  # SQLite did not wait
                        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                        delay = min(delay * 2, 0.05)
                    continue
                if now + delay < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 0.05)
                    continue
                return exc
            except MemoryError as exc:
                self._rollback(conn)
                request.error = self._memory_error(exc)
                request.error.__cause__ = exc
                return None
            except Exception as exc:
                request.error = exc
                return None

    def _begin(
        self,
        conn: sqlite3.Connection,
        write: bool,
        deadline: float | None = None,
        meanwhile: Callable[[float], None] | None = None,
    ) -> None:
        if write:
            self._while_busy(conn, "BEGIN IMMEDIATE", deadline, meanwhile)
        else:
            self._while_busy(conn, "BEGIN", deadline)

    def _while_busy(
        self,
        conn: sqlite3.Connection,
        statement: str,
        deadline: float | None = None,
        meanwhile: Callable[[float], None] | None = None,
    ) -> sqlite3.Cursor:
        """Execute ``statement``, again while SQLite answers busy, until ``deadline``
        (``busy_timeout`` from now by default), calling ``meanwhile(deadline)`` between
        tries.

        SQLite's own wait for the lock lasts at most :data:`_LOCK_SLICE`, so the caller
        gets control back at least that often. SQLite answers busy at once, without its
        own wait, when waiting could deadlock (e.g. two connections switching a new file
        to WAL at the same time): then this waits a little before trying again.
        """
        if deadline is None:
            deadline = time.monotonic() + self._busy_timeout
        delay = 0.001
        while True:
            start = time.monotonic()
            try:
                return conn.execute(statement)
            except sqlite3.OperationalError as exc:
                now = time.monotonic()
                if not _is_busy(exc) or now >= deadline:
                    raise
                if meanwhile is not None and not conn.in_transaction:
                    meanwhile(deadline)
                if now - start < self._lock_slice / 2:  # busy at once: SQLite did not wait
                    if time.monotonic() + delay >= deadline:
                        raise
                    logger.debug("%s is locked; retrying in %.3fs", self._path, delay)
                    time.sleep(delay)
                    delay = min(delay * 2, 0.05)

    def _rollback(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                logger.exception("rollback on %s failed", self._path)

    def _storage_error(self, exc: sqlite3.Error, waited: float | None = None) -> StorageError:
        """The StorageError for ``exc``; a busy one says it waited ``waited`` seconds
        (``busy_timeout`` if not given)."""
        name = getattr(exc, "sqlite_errorname", type(exc).__name__)
        if _is_busy(exc):
            waited_text = f"{self._busy_timeout:g}s" if waited is None else f"{waited:.2f}s"
            return StorageError(
                f"SQLite database {self._path} stayed locked by another connection for "
                f"{waited_text} (busy_timeout {self._busy_timeout:g}s; {exc}). Another "
                "process holds a long write transaction: retry later, or raise "
                "SQLiteRepository(busy_timeout=...).",
                recoverable=True,
            )
        code = _primary_code(exc)
        if code == _SQLITE_FULL:
            return StorageError(
                f"SQLite database {self._path} is full ({exc}). Free disk space (or raise "
                "the max_page_count pragma) and retry; nothing was written.",
                recoverable=True,
            )
        if code == _SQLITE_IOERR:
            return StorageError(
                f"I/O error on SQLite database {self._path} ({name}: {exc}). Check the "
                "disk; nothing was written. Another cause: the database file was deleted "
                "or replaced while a process had it open (its -wal and -shm files stayed): "
                "then restart every process using it.",
                recoverable=True,
            )
        if code == _SQLITE_READONLY:
            return StorageError(
                f"SQLite database {self._path} cannot be written ({name}: {exc}); nothing "
                f"was written. {self._writable_advice()}"
            )
        return StorageError(f"SQLite database {self._path} failed: {name}: {exc}.")

    def _memory_error(self, exc: MemoryError) -> StorageError:
        return StorageError(
            f"SQLite ran out of memory on database {self._path} ({exc!r}); nothing was "
            f"written. {_MEMORY_ADVICE}, and retry.",
            recoverable=True,
        )

    def _writable_advice(self) -> str:
        user = f" (uid {os.geteuid()})" if hasattr(os, "geteuid") else ""
        path = self._path
        return (
            f"Give the user running this process{user} read and write permission on "
            f"{path}, on its {path.name}-wal and {path.name}-shm files if they exist, and on "
            f"the directory {path.parent} (SQLite creates and removes the -wal and -shm "
            "files there), on a file system mounted read-write; or pass a path it may write."
        )

    def _file_identity(self) -> tuple[int, int] | None:
        """The device and inode of the database file (None for ``:memory:``)."""
        if self._memory:
            return None
        try:
            status = os.stat(self._file)
        except OSError as exc:
            raise StorageError(
                f"Cannot open SQLite database {self._path}: it vanished while it was being "
                f"opened ({exc.strerror}). Open it again."
            ) from exc
        return status.st_dev, status.st_ino

    def _refuse_foreign_file(self) -> None:
        """Raise SQLite's "not a database" for a file shorter than any database page
        (512 bytes) that is not empty: SQLite itself takes a one-byte file (a stray
        newline) for an empty database and overwrites it. Longer files are SQLite's to
        judge (it refuses what it cannot read, and recovers a damaged first page from
        the -wal file)."""
        if self._memory:
            return
        try:
            with open(self._file, "rb") as file:
                head = file.read(_SQLITE_MIN_PAGE)
        except OSError:  # SQLite reports what it cannot read, with the path
            return
        if 0 < len(head) < _SQLITE_MIN_PAGE:
            raise sqlite3.DatabaseError("file is not a database")

    def _check_file(self) -> None:
        """Fail a write batch, before its commit, if the database file at the path is no
        longer the one this connection has open (deleted, renamed or replaced): SQLite
        would commit to the unlinked file, and the write would be lost without a word.
        One ``stat`` per batch (about a microsecond), of the path resolved at the open.
        (At close SQLite leaves such a file's ``-wal`` at the path; it is left alone: it
        may be the ``-wal`` of another process that opened the file at the path since.)"""
        identity = self._identity
        if identity is None:
            return
        try:
            status = os.stat(self._file)
        except OSError as exc:
            now = f"no file can be found at that path now: {exc.strerror}"
        else:
            if status.st_ino == identity[1] and status.st_dev == identity[0]:
                return
            now = "another file is at that path now"
        shown = f"{self._path}"
        if self._file != os.fspath(self._path):
            shown += f" (the file {self._file})"
        raise StorageError(
            f"SQLite database {shown} was deleted or replaced while this store had it "
            f"open ({now}); nothing of this write was committed. Writes to the old file "
            "would be lost: restart every process using this database (close and reopen "
            "its stores), after putting the right file back in place if it was moved."
        )

    # -- opening -------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        path = self._path
        if not self._memory:
            parent = path.parent
            try:
                parent_found = parent.exists()
                parent_is_dir = parent.is_dir()
                path_is_dir = path.is_dir()
            except OSError as exc:
                raise StorageError(
                    f"Cannot open SQLite database {path}: it cannot be accessed "
                    f"({exc.strerror}). {self._writable_advice()} The user also needs "
                    "search (x) permission on every directory above it."
                ) from exc
            if not parent_found:
                raise StorageError(
                    f"Cannot open SQLite database {path}: directory {parent} does not "
                    f"exist{tilde_note(parent)}. Create it first."
                )
            if not parent_is_dir:
                raise StorageError(
                    f"Cannot open SQLite database {path}: {parent} is not a directory."
                )
            if path_is_dir:
                raise StorageError(
                    f"Cannot open SQLite database {path}: it is a directory; pass a file path."
                )
            # The file SQLite opens, resolved once: a relative path from the working
            # directory now, symbolic links to their targets now (as SQLite follows
            # them). The connection opens it and _check_file watches it, whatever the
            # working directory or a link at the path becomes later.
            try:
                self._file = os.path.realpath(path)
            except OSError:  # a link loop: SQLite reports it below, with the path
                self._file = os.path.abspath(path)
            # A new file gets file_mode (SQLite gives its -wal and -shm files the same).
            # An existing one keeps its own; one that cannot be created here is reported
            # by sqlite3.connect below, with the path. (The link was followed above:
            # O_EXCL does not follow one, and SQLite would then create the target of a
            # dangling link with the umask's mode.)
            with contextlib.suppress(OSError):
                os.close(os.open(self._file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self._file_mode))
        try:
            conn = sqlite3.connect(
                self._file,
                timeout=self._lock_slice,
                isolation_level=None,
                check_same_thread=True,
                cached_statements=128,
            )
        except (sqlite3.Error, MemoryError) as exc:
            raise self._open_error(exc) from exc
        try:
            # The file the connection has open: _check_file compares with it before each
            # commit. Taken right after SQLite opened it.
            self._identity = self._file_identity()
            self._refuse_foreign_file()
            self._configure(conn)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, (sqlite3.Error, MemoryError)):
                raise self._open_error(exc) from exc
            raise
        return conn

    def _open_error(self, exc: sqlite3.Error | MemoryError) -> StorageError:
        if isinstance(exc, MemoryError):
            return StorageError(
                f"Cannot open SQLite database {self._path}: SQLite ran out of memory "
                f"({exc!r}). {_MEMORY_ADVICE}.",
                recoverable=True,
            )
        code, busy = _primary_code(exc), _is_busy(exc)
        if code == _SQLITE_NOTADB:
            cause = "the file is not a SQLite database"
            advice = "Pass a path to a new or existing asyncsession database."
        elif code == _SQLITE_READONLY:
            cause = "SQLite could open it for reading only"
            advice = self._writable_advice()
        elif code in (_SQLITE_CANTOPEN, _SQLITE_PERM):
            cause = "the location is read-only or not accessible"
            advice = self._writable_advice()
        elif code == _SQLITE_FULL:
            cause = "the database or disk is full"
            advice = (
                "Free disk space, or raise the max_page_count pragma (or leave it unset): "
                "the store needs room for its tables."
            )
        elif code == _SQLITE_IOERR:
            cause = "I/O error"
            advice = (
                "Check the disk. Another cause: the database file was deleted or replaced "
                "while a process had it open, and its old -wal and -shm files stayed: "
                "restart every process using it."
            )
        elif busy:
            cause = (
                "another connection held its write lock for the whole busy_timeout "
                f"({self._busy_timeout:g}s)"
            )
            advice = (
                "Another process is writing it in a long transaction (a release that "
                "upgrades an older layout of a big file takes seconds): retry when it is "
                "done, or raise SQLiteRepository(busy_timeout=...)."
            )
        else:
            cause = "SQLite error"
            advice = "Pass a writable path to a new or existing asyncsession database."
        if busy:  # the command line words its own advice (it has no busy_timeout)
            return _BusyAtOpen(
                f"Cannot open SQLite database {self._path}: {cause} ({exc}). {advice}",
                self._path,
                self._busy_timeout,
            )
        error = self._storage_error(exc)
        return StorageError(
            f"Cannot open SQLite database {self._path}: {cause} ({exc}). {advice}",
            recoverable=error.recoverable,
        )

    def _configure(self, conn: sqlite3.Connection) -> None:
        # A file the store refuses (another program's, a newer layout, an older one with
        # upgrade=False) is refused before anything is written to it: switching a
        # rollback-journal file (a VACUUM INTO backup, another program's database) to
        # WAL mode, or a pragma from pragmas=, would change it. _upgrade checks again,
        # under the write lock.
        self._begin(conn, False)
        try:
            self._checked_layout(conn)
        finally:
            self._rollback(conn)  # only read
        mode = self._while_busy(conn, "PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal" and not self._memory:
            raise StorageError(
                f"Cannot open SQLite database {self._path}: WAL mode is not available there "
                f"(journal mode {mode!r}); use a local file system."
            )
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        # Checkpoints (two fsyncs each) run on the committing thread: with SQLite's
        # default of 1000 pages they took about a fifth of the write time here.
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT}")
        # A deleted session's bytes are overwritten with zeros, not left in the file's
        # free space (SQLite's own default is off, some builds turn it on). Older
        # copies of rows in pages' free space remain until a VACUUM: see checkpoint().
        conn.execute("PRAGMA secure_delete = ON")
        for name, value in self._pragmas.items():
            # An action (optimize, incremental_vacuum) may wait for the write lock.
            self._while_busy(conn, f"PRAGMA {name} = {value}").fetchall()
            if name not in _UNREAD_PRAGMAS:
                self._check_pragma(conn, name, value)
        self._upgrade(conn)

    def _check_pragma(self, conn: sqlite3.Connection, name: str, value: int | str) -> None:
        """Read back a pragma set from ``pragmas=``: SQLite ignores an unknown name and
        turns a value it cannot use into another (a word where it wants a number into
        0: ``wal_autocheckpoint = lots`` turned checkpoints off) without an error."""
        rows = conn.execute(f"PRAGMA {name}").fetchall()
        if not rows:
            raise InvalidConfiguration(
                f"pragmas={{{name!r}: {value!r}}} did not take: reading PRAGMA {name} back "
                "returned nothing. SQLite ignores pragmas it does not know: check the name "
                "(pragmas that cannot be read back are refused too, except "
                f"{', '.join(_UNREAD_PRAGMAS)})."
            )
        read = rows[0][0] if len(rows) == 1 and len(rows[0]) == 1 else rows[:3]
        text = str(value)
        if name == "cache_spill":  # its words were checked when the store was made
            # Reads back 0 when off, else the size at which the cache spills: at least
            # the cache's size, and at least N for N pages.
            switch = _BOOLEAN_WORDS.get(text.lower())
            pages = int(text) if switch is None else switch
            if type(read) is int and (read == 0 if pages == 0 else read >= max(pages, 1)):
                return
            raise InvalidConfiguration(
                f"pragmas={{{name!r}: {value!r}}} did not take: PRAGMA {name} reads back "
                f"{read!r} (SQLite keeps a pragma within its limits, without an error). "
                "Pass on, off or a number of pages it accepts, or leave it out."
            )
        if text.lstrip("-").isdigit():  # the construction checked it: -?[0-9]{1,19}
            if type(read) is int and read == int(text):
                return
            why = (
                "SQLite keeps a pragma within its limits and ignores some changes once "
                "the file exists (page_size, auto_vacuum), without an error"
            )
        else:
            word = text.lower()
            number = _PRAGMA_WORDS.get(name, {}).get(word)
            if (type(read) is int and read == number) or (
                isinstance(read, str) and read.lower().replace("-", "") == word
            ):
                return
            if number is not None:  # a word it takes, and the change was ignored
                why = (
                    "SQLite ignores some changes once the file exists or is in WAL mode "
                    "(page_size, auto_vacuum), without an error"
                )
            else:
                why = (
                    "SQLite turns a word it does not take for this pragma into a number, "
                    "often 0, without an error; most pragmas want a number"
                )
        raise InvalidConfiguration(
            f"pragmas={{{name!r}: {value!r}}} did not take: PRAGMA {name} reads back "
            f"{read!r} ({why}). Pass a value this pragma accepts, or leave it out."
        )

    def _checked_layout(self, conn: sqlite3.Connection) -> int:
        """The file's layout version (0: a new file, without tables), read in the
        transaction ``conn`` has begun; a :class:`StorageError` for a file this store does
        not open: another program's (other tables, another application_id), a newer
        layout, or an older one when the store does not upgrade (:class:`_OlderLayout`)."""
        version: int = self._while_busy(conn, "PRAGMA user_version").fetchone()[0]
        app: int = conn.execute("PRAGMA application_id").fetchone()[0]
        if version == 0:
            tables = conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
            ).fetchone()[0]
            if tables:
                raise StorageError(
                    f"Cannot open SQLite database {self._path}: it holds other tables, "
                    "not an asyncsession store. Use a separate file."
                )
            return 0
        if app != APPLICATION_ID:
            raise StorageError(
                f"Cannot open SQLite database {self._path}: it is not an asyncsession "
                f"store (application_id {app:#x}). Use a separate file."
            )
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"Cannot open SQLite database {self._path}: its layout version {version} "
                f"is newer than this asyncsession supports ({SCHEMA_VERSION}). Upgrade "
                "asyncsession."
            )
        if version < SCHEMA_VERSION and not self._upgrades:
            raise _OlderLayout(self._path, version)
        return version

    def _upgrade(self, conn: sqlite3.Connection) -> None:
        """Create the tables, or bring an older layout up to :data:`SCHEMA_VERSION`."""
        self._begin(conn, True)
        try:
            version = self._checked_layout(conn)
            created = version == 0  # a new file: built up silently, not "upgraded"
            if created:
                for statement in _SCHEMA_V1.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                version = 1
            if not created and version < SCHEMA_VERSION:
                logger.info(
                    "upgrading %s from layout %d to %d", self._path, version, SCHEMA_VERSION
                )
            changed = created or version < SCHEMA_VERSION
            warnings: list[str] = []
            while version < SCHEMA_VERSION:
                warning = _UPGRADES[version](conn, self._path)
                if warning is not None:
                    warnings.append(warning)
                version += 1
                conn.execute(f"PRAGMA user_version = {version}")
            # Written even when unchanged: a write probe. SQLite opens a file this
            # process may not write (its mode, its owner, its -wal or -shm file, a
            # read-only mount) for reading only, without a word, and every write would
            # fail later: opening fails here instead, with SQLITE_READONLY. Unchanged,
            # it is rolled back: opening an up-to-date file leaves it as it was (a
            # backup copy, `asyncsession list`, `migrate --dry-run`, a full disk).
            conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT" if changed else "ROLLBACK")
        except BaseException:
            self._rollback(conn)
            raise
        for warning in warnings:  # only now: a failed COMMIT repaired nothing
            logger.warning("%s", warning)

    # -- worker-side operations (run inside a transaction or savepoint) ---------------

    @staticmethod
    def _read(
        conn: sqlite3.Connection, session_id: uuid.UUID, last_messages: int | None
    ) -> _Row | None:
        """The session and its last messages in one statement (a snapshot by itself)."""
        wanted = _ALL_MESSAGES if last_messages is None else max(0, _sql_int(last_messages))
        cursor = conn.execute(_READ_SESSION, (wanted, str(session_id)))
        first = cursor.fetchone()
        if first is None:
            return None
        doc, count, last_us, expires_us, revision, incarnation = first[:6]
        start = _window_start(count, last_messages)
        # Streamed, not fetchall(): each chunk is split and dropped while reading.
        rows = _assemble(session_id, itertools.chain((first,), cursor), 6, start, count)
        return _Row(
            session_id, doc, last_us, expires_us, revision, start, count, rows,
            incarnation=incarnation,
        )  # fmt: skip

    @staticmethod
    def _columns(session: Session, doc: bytes) -> tuple[Any, ...]:
        return (
            session.owner,
            session.name,
            session.status.value,
            _us(session.created_at),
            _us(session.last_active),
            _us_or_none(session.closed_at),
            _us_or_none(session.expires_at),
            session.revision,
            session.messages.total,
            _casefold(session.name),
            doc,
        )

    def _op_add(
        self, session: Session, doc: bytes, bodies: list[bytes]
    ) -> Callable[[sqlite3.Connection], int]:
        first = _casefold(session.messages[0].content) if bodies else None
        incarnation = secrets.randbits(63)

        def op(conn: sqlite3.Connection) -> int:
            try:
                cursor = conn.execute(_INSERT_SESSION, (
                    incarnation, *self._columns(session, doc), str(session.id), first
                ))  # fmt: skip
            except sqlite3.IntegrityError:
                raise SessionConflict(session.id, expected_revision=None) from None
            assert cursor.lastrowid is not None
            _store_messages(conn, cursor.lastrowid, 0, bodies)
            return incarnation

        return op

    def _op_save(
        self,
        session: Session,
        expected_revision: int,
        doc: bytes,
        added: list[bytes] | None,
        everything: list[bytes] | None,
        expected_last_us: int | None,  # set when the update was based on a lent snapshot
        expected_incarnation: int | None,
    ) -> Callable[[sqlite3.Connection], _Saved]:
        sid = str(session.id)
        # The save's time and what it would store: see SessionRepository._save_finds_expired.
        at_us, new_expires_us = _us(session.last_active), _us_or_none(session.expires_at)

        def op(conn: sqlite3.Connection) -> _Saved:
            row = conn.execute(
                "SELECT pk, revision, message_count, last_active, incarnation, expires_at, "
                "status FROM sessions WHERE id = ?",
                (sid,),
            ).fetchone()
            if row is None:
                raise SessionNotFound(session.id)
            pk, revision, count, last_us, incarnation, expires_us, status_name = row
            # Another revision, or another life of the session (deleted and added again
            # since the lent snapshot was taken): someone else's doing either way.
            other_writer = revision != expected_revision or (
                expected_last_us is not None and incarnation != expected_incarnation
            )
            if other_writer or (expected_last_us is not None and last_us != expected_last_us):
                if other_writer:  # returned, not raised: the mark must commit
                    conn.execute("INSERT OR IGNORE INTO contended (session_pk) VALUES (?)", (pk,))
                current = None
                if self._held.enabled:  # the caller's retry then needs no read
                    with contextlib.suppress(CorruptSessionError):  # (it will read)
                        current = self._read(conn, session.id, None)
                return _Saved(True, revision, current, other_writer, incarnation)
            if (
                expires_us is not None
                and expires_us <= at_us
                and (expires_us != new_expires_us or status_name != session.status.value)
            ):
                raise SessionNotFound(session.id)  # expired by the save's time: stays so
            contested = (
                conn.execute("DELETE FROM contended WHERE session_pk = ?", (pk,)).rowcount > 0
            )
            columns = self._columns(session, doc)
            update = (
                "UPDATE sessions SET owner = ?, name = ?, status = ?, created_at = ?, "
                "last_active = ?, closed_at = ?, expires_at = ?, revision = ?, "
                "message_count = ?, name_cf = ?, doc = ?"
            )
            if added is not None and count + len(added) == session.messages.total:
                if count == 0 and added:
                    first = _casefold(load_message(added[0]).content)
                    conn.execute(update + ", first_cf = ? WHERE pk = ?", (*columns, first, pk))
                else:
                    conn.execute(update + " WHERE pk = ?", (*columns, pk))
                _store_messages(conn, pk, count, added)
                return _Saved(False, expected_revision, None, contested, incarnation)
            rows = everything
            if rows is None and session.messages.is_complete:
                rows = _encode_messages(session.messages)  # the promise did not hold
            if rows is None:
                raise self._not_extending(session, count, len(added or ()))
            first = _casefold(session.messages[0].content) if rows else None
            conn.execute(update + ", first_cf = ? WHERE pk = ?", (*columns, first, pk))
            conn.execute("DELETE FROM messages WHERE session_pk = ?", (pk,))
            _store_messages(conn, pk, 0, rows)
            return _Saved(False, expected_revision, None, contested, incarnation)

        return op

    # -- the contract -------------------------------------------------------------------

    async def get(
        self, session_id: uuid.UUID, *, last_messages: int | None = None
    ) -> Session | None:
        sid = self._check_id(session_id)
        return (await self._get(sid, self._check_last_messages(last_messages)))[0]

    async def _get(
        self, sid: uuid.UUID, last_messages: int | None = None
    ) -> tuple[Session | None, Incarnation]:
        """The stored session (or None) and its incarnation."""

        def op(conn: sqlite3.Connection) -> _Row | None:
            return self._read(conn, sid, last_messages)

        row = await self._call(op, write=False, transaction=False)
        if row is None:
            return self._held.seen(sid, None), None
        session = self._held.seen(sid, row.decode(self._documents), row.incarnation, *row.sizes())
        return session, row.incarnation

    async def get_for_update(self, session_id: uuid.UUID) -> Session | None:
        sid = self._check_id(session_id)
        updater = current_updater()
        held = self._held.lend(sid, updater)
        if held is not None:
            return held
        session, incarnation = await self._get(sid)
        self._held.lend_read(session, incarnation, updater)  # the save checks this life
        return session

    async def add(self, session: Session) -> None:
        self._check_whole(session)
        doc, bodies = _encode(session), _encode_messages(session.messages)
        incarnation = await self._call(self._op_add(session, doc, bodies), write=True)
        self._held.keep(session, incarnation, sum(map(len, bodies)), len(doc))

    async def save(
        self,
        session: Session,
        *,
        expected_revision: int,
        new_messages: Sequence[Message] | None = None,
    ) -> None:
        self._check_revision_step(session, expected_revision)
        if session.revision > MAX_REVISION:  # SQLite cannot bind it: refuse it whole
            raise revision_exhausted(session.id)
        added = None if new_messages is None else _encode_messages(new_messages)
        everything = None
        self._check_window_save(session, new_messages)
        if new_messages is None:
            everything = _encode_messages(session.messages)
            history: int | None = sum(map(len, everything))
        else:  # the stored bytes of the history the new messages extend, if it is held
            assert added is not None
            history = self._held.history_bytes(
                session.id, expected_revision, session.messages.total - len(added)
            )
            if history is not None:
                history += sum(map(len, added))
        doc = _encode(session)
        updater = current_updater()
        unchanged = self._held.lent_unchanged(session.id, expected_revision, updater)
        lent = self._held.before_save(session.id, expected_revision, updater)
        expected_last_us = expected_incarnation = None
        if lent is not None:
            expected_last_us = _us(lent[0])
            expected_incarnation = lent[1] if type(lent[1]) is int else None
        try:
            saved = await self._call(
                self._op_save(
                    session,
                    expected_revision,
                    doc,
                    added,
                    everything,
                    expected_last_us,
                    expected_incarnation,
                ),
                write=True,
            )
        except SessionNotFound:
            self._held.drop(session.id)  # gone, or expired by the save's time
            raise
        if saved.refused:
            current = saved.current
            if current is not None:
                with contextlib.suppress(CorruptSessionError):  # the retry's read reports it
                    self._held.keep(
                        current.decode(self._documents), current.incarnation, *current.sizes()
                    )
            raise SessionConflict(
                session.id,
                expected_revision=expected_revision,
                actual_revision=saved.revision,
                stale_snapshot=unchanged,
            )
        # Else others lost races for it: read before the next update. Or the history is
        # not held (too long, or the update was based on a read that was not held).
        if not saved.contested and history is not None:
            self._held.keep(session, saved.incarnation, history, len(doc))

    async def append(
        self,
        session_id: uuid.UUID,
        messages: Sequence[Message],
        *,
        at: datetime,
        policy: ExpiryPolicy,
        max_messages: int | None = None,
    ) -> Session:
        sid = self._check_id(session_id)
        at = self._check_time(at, "at")
        batch = list(self._check_messages(messages))
        policy = self._check_policy(policy)
        max_messages = self._check_max_messages(max_messages)
        bodies = _encode_messages(batch)
        at_us = _us(at)
        one_statement = _append_parameters(sid, batch, at_us, policy, max_messages)

        def op(conn: sqlite3.Connection) -> _Row | None:
            if one_statement is not None:
                done = conn.execute(_APPEND, one_statement).fetchone()
                if done is not None:
                    pk, doc, total, last_us, expires_us, revision, life = done
                    if total == len(batch) and batch:  # the first messages: searchable
                        conn.execute(
                            "UPDATE sessions SET first_cf = ? WHERE pk = ?",
                            (_casefold(batch[0].content), pk),
                        )
                    _store_messages(conn, pk, total - len(batch), bodies)
                    return _Row(
                        sid, doc, last_us, expires_us, revision, total - len(batch), total,
                        _NO_ROWS, batch, life,
                    )  # fmt: skip
            # Nothing changed: find out why. (Also the path for ExpiryPolicy subclasses.)
            # None: the session expired under this policy (its deadline was recorded).
            row = conn.execute(
                "SELECT pk, doc, message_count, status, created_at, last_active, expires_at, "
                "revision, incarnation FROM sessions WHERE id = ?",
                (str(sid),),
            ).fetchone()
            if row is None:
                raise SessionNotFound(sid)
            pk, doc, count, status_name, created_us, last_us, expires_us, revision, life = row
            if expires_us is not None and expires_us <= at_us:
                raise SessionNotFound(sid)
            status = stored_status(status_name, sid)
            if status.is_terminal:
                raise SessionClosed(sid, status)
            expires_at, overdue = policy.activity_deadline(
                status, _time(created_us), _time(last_us), at
            )
            expires_us = None if expires_at is None else _us(expires_at)
            if overdue is not None:
                # Expired under this policy (an idle_timeout or max_age added or shortened
                # since): record that deadline, store nothing else.
                conn.execute("UPDATE sessions SET expires_at = ? WHERE pk = ?", (expires_us, pk))
                return None
            total = count + len(batch)
            if max_messages is not None and total > max_messages:
                raise too_many_messages(max_messages, total)
            if revision >= MAX_REVISION:  # SQLite's revision + 1 would store a REAL
                raise revision_exhausted(sid)
            if at_us > last_us:
                last_us = at_us
            revision += 1
            if count or not batch:
                conn.execute(
                    "UPDATE sessions SET last_active = ?, expires_at = ?, revision = ?, "
                    "message_count = ? WHERE pk = ?",
                    (last_us, expires_us, revision, total, pk),
                )
            else:
                conn.execute(
                    "UPDATE sessions SET last_active = ?, expires_at = ?, revision = ?, "
                    "message_count = ?, first_cf = ? WHERE pk = ?",
                    (last_us, expires_us, revision, total, _casefold(batch[0].content), pk),
                )
            _store_messages(conn, pk, count, bodies)
            return _Row(
                sid, doc, last_us, expires_us, revision, count, total, _NO_ROWS, batch, life
            )

        before = self._held.take(sid)
        row = await self._call(op, write=True)
        if row is None:
            raise SessionNotFound(sid)
        session = row.decode(self._documents)
        self._held.appended(
            before, batch, session, row.incarnation, sum(map(len, bodies)), len(row.doc)
        )
        return session

    async def touch(
        self,
        session_id: uuid.UUID,
        *,
        at: datetime,
        policy: ExpiryPolicy,
        last_messages: int | None = None,
    ) -> Session | None:
        sid = self._check_id(session_id)
        at = self._check_time(at, "at")
        policy = self._check_policy(policy)
        last_messages = self._check_last_messages(last_messages)
        at_us = _us(at)

        interval_us = policy.touch_interval // timedelta(microseconds=1)

        def op(conn: sqlite3.Connection) -> _Row | None:
            found = conn.execute(
                "SELECT pk, doc, message_count, status, created_at, last_active, expires_at, "
                "revision, incarnation FROM sessions WHERE id = ?",
                (str(sid),),
            ).fetchone()
            if found is None:
                return None
            pk, doc, count, status_name, created_us, last_us, expires_us, revision, life = found
            status = stored_status(status_name, sid)
            expired = expires_us is not None and expires_us <= at_us
            if not (status.is_terminal or expired):
                moves = not (at_us - last_us < interval_us or at_us <= last_us)
                deadline, overdue = policy.activity_deadline(
                    status, _time(created_us), _time(last_us), at, moves=moves
                )
                if overdue is not None:
                    # Expired under this policy (an idle_timeout or max_age added or
                    # shortened since): record that deadline only.
                    expires_us = _us(overdue)
                    conn.execute(
                        "UPDATE sessions SET expires_at = ? WHERE pk = ?", (expires_us, pk)
                    )
                elif moves:
                    last_us, expires_us = at_us, _us_or_none(deadline)
                    conn.execute(
                        "UPDATE sessions SET last_active = ?, expires_at = ? WHERE pk = ?",
                        (last_us, expires_us, pk),
                    )
            start = _window_start(count, last_messages)
            rows = _read_messages(conn, sid, pk, start, count)
            return _Row(
                sid, doc, last_us, expires_us, revision, start, count, rows, incarnation=life
            )

        row = await self._call(op, write=True)
        if row is None:
            return self._held.seen(sid, None)
        session = row.decode(self._documents)
        if session.is_expired(at):  # no update will be based on it
            self._held.drop(sid)
            return session
        return self._held.seen(sid, session, row.incarnation, *row.sizes())

    async def delete(self, session_id: uuid.UUID) -> bool:
        checked = self._check_id(session_id)
        self._held.drop(checked)
        sid = str(checked)

        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT pk FROM sessions WHERE id = ?", (sid,)).fetchone()
            if row is None:
                return False
            _remove_rows(conn, row[0])
            return True

        return await self._call(op, write=True)

    async def remove_expired(self, session_id: uuid.UUID, *, now: datetime) -> Session | None:
        sid = self._check_id(session_id)
        now = self._check_time(now, "now")
        self._held.drop(sid)
        now_us = _us(now)

        def op(conn: sqlite3.Connection) -> Session | None:
            row = conn.execute(
                "SELECT pk, doc, message_count, last_active, expires_at, revision "
                "FROM sessions WHERE id = ? AND expires_at <= ?",
                (str(sid), now_us),
            ).fetchone()
            if row is None:
                return None
            pk, doc, count, last_us, expires_us, revision = row
            # Decoded before anything is deleted: an unreadable document raises here and
            # stays stored (for a repair or delete()), with nothing of this op written.
            # Its messages are not returned, so not read: the document is all to check.
            found = _Row(sid, doc, last_us, expires_us, revision, count, count, _NO_ROWS)
            session = found.decode()  # not cached: a removed document is not read again
            _remove_rows(conn, pk)
            return session

        return await self._call(op, write=True)

    async def expired(self, now: datetime, *, limit: int = 1000) -> Sequence[uuid.UUID]:
        now = self._check_time(now, "now")
        limit = self._check_limit(limit)
        now_us = _us(now)
        most = _sql_int(limit)

        def op(conn: sqlite3.Connection) -> list[str]:
            return [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM sessions WHERE expires_at <= ? ORDER BY expires_at LIMIT ?",
                    (now_us, most),
                )
            ]

        return [uuid.UUID(i) for i in await self._call(op, write=False, transaction=False)]

    async def list(self, query: SessionQuery) -> Page:
        after = decode_cursor(query)
        where: list[str] = []
        params: list[Any] = []
        if query.owner is not None:
            where.append("owner = ?")
            params.append(query.owner)
        if query.status is not None:
            statuses = sorted(s.value for s in query.status)
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            params.extend(statuses)
        if query.visible_at is not None:
            where.append("(expires_at IS NULL OR expires_at > ?)")
            params.append(_us(query.visible_at))
        if query.search:
            needle = query.search.casefold()
            where.append("(instr(name_cf, ?) > 0 OR instr(first_cf, ?) > 0)")
            params.extend((needle, needle))
        if after is not None:
            after_us = _us(after[0])
            where.append("(last_active < ? OR (last_active = ? AND id < ?))")
            params.extend((after_us, after_us, str(after[1])))
        sql = "SELECT id, doc, message_count, last_active, expires_at, revision FROM sessions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY last_active DESC, id DESC LIMIT ?"
        params.append(query.limit + 1)

        def op(conn: sqlite3.Connection) -> list[tuple[str, bytes, int, int, int | None, int]]:
            return conn.execute(sql, params).fetchall()

        rows = await self._call(op, write=False, transaction=False)
        items: list[Session] = []
        for sid, doc, count, last_us, expires_us, revision in rows[: query.limit]:
            session_id = uuid.UUID(sid)
            try:
                row = _Row(session_id, doc, last_us, expires_us, revision, count, count, _NO_ROWS)
                items.append(row.decode(self._documents))
            except SessionError as exc:
                log_skipped(logger, session_id, exc)
        next_cursor = None
        if len(rows) > query.limit:
            last_id, _, _, last_us, _, _ = rows[query.limit - 1]
            next_cursor = encode_cursor(
                _EPOCH + timedelta(microseconds=last_us), uuid.UUID(last_id), query
            )
        return Page(tuple(items), next_cursor)

    async def count_by_status(self, owner: str | None = None) -> Mapping[SessionStatus, int]:
        owner = self._check_owner(owner)

        def op(conn: sqlite3.Connection) -> list[tuple[str, int]]:
            if owner is None:
                sql = "SELECT status, count(*) FROM sessions GROUP BY status"
                return conn.execute(sql).fetchall()
            sql = "SELECT status, count(*) FROM sessions WHERE owner = ? GROUP BY status"
            return conn.execute(sql, (owner,)).fetchall()

        counts: dict[SessionStatus, int] = {}
        for status, n in await self._call(op, write=False, transaction=False):
            try:
                counts[SessionStatus(status)] = n
            except ValueError:
                logger.warning("unknown status %r in %s", status, self._path)
        return counts

    async def document_versions(self, session_ids: Iterable[uuid.UUID]) -> Mapping[uuid.UUID, int]:
        """The ``version`` of each stored document (its ``doc`` column), in one worker hop.

        The worker only fetches the documents (statements of up to
        :data:`_IDS_PER_STATEMENT` ids, in one read transaction when there are several);
        the caller's thread parses each one's JSON for its ``version`` (documents hold
        neither messages nor hot fields, so they are small). A document that is not JSON
        or has no non-negative int ``version`` raises :class:`CorruptSessionError` naming
        the first such session in ``session_ids`` order, as :meth:`get` of it would.
        """
        wanted = self._check_ids(session_ids)
        keys = [str(sid) for sid in wanted]
        if not keys:
            return {}

        def op(conn: sqlite3.Connection) -> dict[str, bytes]:
            found: dict[str, bytes] = {}
            for start in range(0, len(keys), _IDS_PER_STATEMENT):
                part = keys[start : start + _IDS_PER_STATEMENT]
                sql = f"SELECT id, doc FROM sessions WHERE id IN ({', '.join('?' * len(part))})"
                found.update(conn.execute(sql, part).fetchall())
            return found

        several = len(keys) > _IDS_PER_STATEMENT
        docs = await self._call(op, write=False, transaction=several)
        versions: dict[uuid.UUID, int] = {}
        for sid, key in zip(wanted, keys, strict=True):
            doc = docs.get(key)
            if doc is not None:
                versions[sid] = load_version(doc, session_id=sid)
        return versions


#: Ids per ``SELECT ... WHERE id IN (...)`` of :meth:`SQLiteRepository.document_versions`
#: (SQLite before 3.32 allows at most 999 parameters per statement).
_IDS_PER_STATEMENT: Final = 500


#: append() in one statement, for the plain ExpiryPolicy: checks (open, unexpired, not
#: past the policy's deadline from the stored ``last_active`` at ``:at`` (neither
#: ``created_at + max_age`` nor, if active, ``last_active + idle``), within the limit,
#: below the last revision; see ExpiryPolicy.activity_deadline), new deadline
#: (ExpiryPolicy.deadline of an open session from ``max(last_active, :at)``, in
#: microseconds) and the counters.
#: No row back means one of the checks failed (or no such session). A deadline past
#: ``datetime.max`` is stored as none, as ExpiryPolicy.deadline answers. ``revision + 1``
#: past 2**63 - 1 would make SQLite store a REAL (the session unreadable from then on):
#: ``:top`` keeps it an INTEGER.
_APPEND = (
    "UPDATE sessions SET last_active = max(last_active, :at), expires_at = ("
    "SELECT CASE WHEN d > :last THEN NULL ELSE d END FROM (SELECT CASE "
    "WHEN status = 'archived' OR :idle IS NULL THEN created_at + :max_age "
    "WHEN :max_age IS NULL THEN max(last_active, :at) + :idle "
    "ELSE min(max(last_active, :at) + :idle, created_at + :max_age) END AS d)), "
    "revision = revision + 1, message_count = message_count + :n "
    "WHERE id = :id AND status IN ('active', 'archived') "
    "AND (expires_at IS NULL OR expires_at > :at) "
    "AND (:max_age IS NULL OR created_at + :max_age > :at) "
    "AND (:idle IS NULL OR status = 'archived' OR last_active + :idle > :at) "
    "AND message_count + :n <= :limit "
    "AND revision < :top "
    "RETURNING pk, doc, message_count, last_active, expires_at, revision, incarnation"
)


_HAS_RETURNING: Final = sqlite3.sqlite_version_info >= (3, 35, 0)


def _append_parameters(
    session_id: uuid.UUID,
    batch: Sequence[Message],
    at_us: int,
    policy: ExpiryPolicy,
    max_messages: int | None,
) -> dict[str, Any] | None:
    """Parameters of :data:`_APPEND`, or None when ``policy`` is not a plain ExpiryPolicy
    (or SQLite is older than 3.35, which has no ``UPDATE ... RETURNING``)."""
    if type(policy) is not ExpiryPolicy or not _HAS_RETURNING:
        return None
    idle, max_age = policy.idle_timeout, policy.max_age
    return {
        "id": str(session_id),
        "at": at_us,
        "idle": None if idle is None else idle // _US,
        "max_age": None if max_age is None else max_age // _US,
        "n": len(batch),
        "limit": _ALL_MESSAGES if max_messages is None else _sql_int(max_messages),
        "last": _LAST_US,  # a later deadline is none (ExpiryPolicy.deadline: never)
        "top": MAX_REVISION,  # the last revision: the fallback path explains the refusal
    }
