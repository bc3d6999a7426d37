"""Recently written snapshots a store keeps to base the next update on (no round trip),
and the cache of decoded stored documents and messages."""

from __future__ import annotations

import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from datetime import datetime
from typing import Final, Generic, TypeVar

from .._exceptions import InvalidConfiguration
from .._loops import current_task, has_ended
from .._models import Message, Session, replace_trusted

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "DecodeCache",
    "Held",
    "HeldSnapshots",
    "Incarnation",
    "check_cache_bytes",
    "current_updater",
]

T = TypeVar("T")

#: The default ``snapshot_cache_bytes`` of the SQLite and Redis stores: the held
#: snapshots' data, counted as stored (document and messages as JSON), is kept under it.
#: A store's caches of decoded documents or messages get an eighth of it each.
DEFAULT_CACHE_BYTES: Final = 32 * 2**20

#: What the saves of updates in flight check (the revision, ``last_active`` and
#: incarnation each was based on), remembered when the snapshot is not held (the cache is
#: off, the history too long, or the entry left): far more than updates in flight. An
#: update that never saves (its function raised, the session was closed) leaves its
#: entry until its task ends, it is evicted (oldest first) or its task updates that
#: session again.
_MAX_BASES = 10_000
#: ... and at most this many updaters of one session are remembered, or lent its held
#: snapshot (a read of it scans them): the tasks that ended go first, then the ones that
#: lent or read it least recently.
_MAX_BASES_PER_SESSION = 128

#: What a store tells one life of a session from the next by: a session deleted and
#: added again under the same id (an import, say) may come back with a revision and
#: times a held snapshot of its earlier life also has. SQLite and Redis store a random
#: value at each add; None means the store cannot tell (then revisions alone decide).
Incarnation = object
#: A held snapshot, the incarnation of the session it was taken from, and the bytes its
#: history and its document take as stored (what the byte budget counts).
Held = tuple[Session, Incarnation, int, int]
#: Who an update is for (see :func:`current_updater`): the task that runs it.
Updater = Hashable
#: What the save of an update must find stored: the revision, ``last_active`` and
#: incarnation of the session the update was based on.
_Base = tuple[int, datetime, Incarnation]


def current_updater() -> Updater:
    """The task calling (a weak reference to it): what tells an update's save from
    another task's update of the same session in flight through the same store (see
    :class:`HeldSnapshots`), and what is forgotten once that task has ended.

    A manager's update reads and saves in one task; updates of the same session
    interleaved in one task share what their saves check (the latest read's).
    """
    return weakref.ref(current_task())


def _ended(updater: Updater) -> bool:
    """Whether ``updater`` is a task that has ended (nothing it lent can be saved): gone,
    or a task that something still refers to but that is done (see :func:`has_ended`)."""
    if type(updater) is not weakref.ReferenceType:
        return False
    task = updater()
    return task is None or has_ended(task)


def _drop_ended(updaters: dict[Updater, T], *, keep_newest: bool) -> list[T]:
    """Remove the entries of tasks that ended (but the newest of them if
    ``keep_newest``) from a session's ``updaters``; return their values, oldest first.

    An update read in one task and saved in another (each call through a blocking
    portal is a task of its own) is known only by the newest such entry, as if by one
    anonymous updater: older ones were superseded."""
    ended = [u for u in updaters if _ended(u)]
    if keep_newest and ended:
        ended.pop()
    return [updaters.pop(u) for u in ended]


def _trim(updaters: dict[Updater, T]) -> int:
    """Keep at most ``_MAX_BASES_PER_SESSION`` of a session's ``updaters``: those of
    tasks that ended go first, then the oldest. Returns how many went."""
    before = len(updaters)
    _drop_ended(updaters, keep_newest=False)
    while len(updaters) > _MAX_BASES_PER_SESSION:
        del updaters[next(iter(updaters))]
    return before - len(updaters)


def check_cache_bytes(value: object) -> int:
    """``snapshot_cache_bytes``, checked: an int >= 0 (0 turns caching off)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidConfiguration(
            f"snapshot_cache_bytes must be an int >= 0 (the bytes of stored data the store "
            f"keeps decoded in memory; 0 turns caching off), got {value!r}."
        )
    return value


class DecodeCache(Generic[T]):
    """A bounded LRU of decoded immutable objects keyed by the bytes they were stored as.

    Stored documents and messages are immutable values, so equal bytes decode to equal
    objects; sharing them between snapshots is safe and skips repeated parsing and
    validation. Bounded by count (``size``) and by the stored bytes of its keys
    (``max_bytes``; each decoded object takes about as much again): a key over an
    eighth of ``max_bytes`` or over ``largest`` is not kept, and ``max_bytes`` 0 keeps
    nothing. Thread-safe (a SQLite store decodes on its callers' threads).
    """

    __slots__ = ("_bytes", "_items", "_largest", "_lock", "_max_bytes", "_size")

    def __init__(self, size: int, max_bytes: int, *, largest: int | None = None) -> None:
        self._size = size
        self._max_bytes = max_bytes
        self._largest = max_bytes // 8 if largest is None else min(largest, max_bytes // 8)
        if not max_bytes:
            self._largest = -1  # not even an empty key
        self._bytes = 0
        self._items: OrderedDict[bytes, T] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        """The stored bytes of the keys kept (at most ``max_bytes``)."""
        return self._bytes

    def get(self, key: bytes) -> T | None:
        """The object decoded from ``key`` (marked recently used), or None."""
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
        return item

    def put(self, key: bytes, item: T) -> None:
        """Keep ``item`` as decoded from ``key``, dropping the least recently used over
        the bounds."""
        size = len(key)
        if size > self._largest:
            return
        with self._lock:
            items = self._items
            if key not in items:
                self._bytes += size
            items[key] = item
            items.move_to_end(key)
            while len(items) > self._size or self._bytes > self._max_bytes:
                self._bytes -= len(items.popitem(last=False)[0])


class HeldSnapshots:
    """A bounded LRU of whole-history snapshots, newest revision wins.

    Only an optimisation for :meth:`SessionRepository.get_for_update`: the store's
    compare-and-set stays the authority, so a stale entry costs a retry, never a lost
    write. Callers :meth:`drop` an entry before any write whose outcome they may not
    learn (errors, cancellation) and :meth:`keep` what the store confirmed.

    Bounded three times: at most ``size`` sessions, at most ``max_messages`` messages
    and at most ``max_bytes`` bytes of data as stored (what the store says a snapshot's
    history and document take) in all, oldest use dropped first. A session with more
    than ``max_messages`` messages or ``max_bytes // 4`` bytes is not held (its updates
    read it first). ``size`` or ``max_bytes`` 0 turns holding off. Thread-safe: a SQLite
    store may serve callers on several event loops. Entries are keyed by the id's
    integer (``uuid.UUID`` hashes in Python code, and an update looks an id up ~10 times).

    Every entry records the :data:`Incarnation` of the session it came from. A store
    reply about another incarnation than the held one drops the entry (which of the two
    is newer cannot be told), and :meth:`before_save` hands the incarnation to the
    compare-and-set of an update based on a lent snapshot, or on a read that
    :meth:`lend_read` recorded when nothing was held.

    What a save checks is kept per updater (:func:`current_updater`, the task running
    the update): two updates of one session in flight through one store, in two tasks,
    each check the snapshot they were based on, even when another process deleted and
    added the session again in between (same revision, another life) and one of them
    was based on the new life.
    """

    __slots__ = (
        "_bases",
        "_bytes",
        "_items",
        "_largest",
        "_lent",
        "_lock",
        "_max_bytes",
        "_max_messages",
        "_messages",
        "_nbases",
        "_size",
    )

    def __init__(
        self, size: int, *, max_messages: int = 100_000, max_bytes: int = DEFAULT_CACHE_BYTES
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidConfiguration(
                f"snapshot_cache must be an int >= 0 (0 turns it off), got {size!r}."
            )
        self._max_bytes = check_cache_bytes(max_bytes)
        self._size = size if max_bytes else 0
        self._largest = max_bytes // 4  # a snapshot over this is not held
        self._max_messages = max_messages
        self._messages = 0
        self._bytes = 0
        self._items: OrderedDict[int, Held] = OrderedDict()
        # The held snapshot of a session handed out by lend() to these updaters, whose
        # saves check it: True when lent from memory (no read for the update) and not
        # changed since, False when the update read it (lend_read()).
        self._lent: dict[int, dict[Updater, bool]] = {}
        # What the save of each updater's update of a session checks when the snapshot
        # it was based on is not held (see lend_read() and _unlend()), least recently
        # recorded session first; _nbases counts them all.
        self._bases: OrderedDict[int, dict[Updater, _Base]] = OrderedDict()
        self._nbases = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Whether snapshots are kept at all (size > 0)."""
        return self._size > 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        """The bytes the held snapshots take as stored (at most ``max_bytes``)."""
        return self._bytes

    def history_bytes(self, session_id: uuid.UUID, revision: int, total: int) -> int | None:
        """The stored bytes of the held history of ``session_id`` if the held snapshot is
        of ``revision`` with ``total`` messages (an update's base), else None.

        A store saving an update that appends to its base adds the new messages' bytes
        to this for the snapshot it then holds (None: it does not hold that one).
        """
        with self._lock:
            entry = self._items.get(session_id.int)
        if entry is None or entry[0].revision != revision or entry[0].messages.total != total:
            return None
        return entry[2]

    def get(self, session_id: uuid.UUID) -> Session | None:
        """The held snapshot of a session (marked recently used), or None."""
        entry = self._use(session_id.int, lend=False)
        return None if entry is None else entry[0]

    def entry(self, session_id: uuid.UUID) -> Held | None:
        """The held snapshot and its incarnation (marked recently used), or None."""
        return self._use(session_id.int, lend=False)

    def lend(self, session_id: uuid.UUID, updater: Updater = None) -> Session | None:
        """The held snapshot, for an update of ``updater`` to be based on (see
        :meth:`before_save`).

        When None, the store reads the session and hands the read to :meth:`lend_read`.
        """
        entry = self._use(session_id.int, lend=True, updater=updater)
        return None if entry is None else entry[0]

    def lend_read(
        self, session: Session | None, incarnation: Incarnation = None, updater: Updater = None
    ) -> None:
        """Follow the read that an update of ``updater`` is based on because
        :meth:`lend` had nothing.

        The save then checks that read's revision, ``last_active`` and incarnation as
        it checks a lent snapshot's: a session deleted and added again in between (same
        revision, another incarnation) is not overwritten. The read is lent if it is
        held now; else (the cache is off, the history too long) just what the save
        checks is remembered (see ``_MAX_BASES``).
        """
        if session is None:
            return
        key = session.id.int
        with self._lock:
            entry = self._items.get(key)
            if entry is not None and entry[0] is session and entry[1] == incarnation:
                self._lend_to(key, updater, unread=False)  # read for this update
                return
            self._remember(key, updater, (session.revision, session.last_active, incarnation))
            self._drop_ended_bases(key)

    def _use(self, key: int, *, lend: bool, updater: Updater = None) -> Held | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is not None:
                self._items.move_to_end(key)
                if lend:
                    self._lend_to(key, updater, unread=True)
            return entry

    def _lend_to(self, key: int, updater: Updater, *, unread: bool) -> None:
        """``updater`` was lent the held snapshot of a session (lock held): its save
        checks it from now on, and not what was remembered for it before."""
        lent = self._lent.get(key)
        if lent is None:
            lent = self._lent[key] = {}
        else:
            lent.pop(updater, None)  # the newest last (_trim drops the oldest)
        lent[updater] = unread
        if len(lent) > 1:
            _drop_ended(lent, keep_newest=True)
            if len(lent) > _MAX_BASES_PER_SESSION:
                _trim(lent)
        self._forget(key, updater)

    def lent_unchanged(
        self, session_id: uuid.UUID, expected_revision: int, updater: Updater = None
    ) -> bool:
        """Whether the update of ``updater`` about to be saved (at
        ``expected_revision``) is based on a snapshot :meth:`lend` handed out from
        memory (not read for it) that this store has not seen change since. Call it
        before :meth:`before_save`. If the save is refused then, the snapshot was
        outdated by another process (before or while the update ran), not by a write of
        this store: the store says so in its :class:`SessionConflict`
        (``stale_snapshot``). An update of another revision than the lent snapshot's was
        based on an earlier one (the updater was lent this one since), which may be this
        store's doing.
        """
        key = session_id.int
        with self._lock:
            entry = self._items.get(key)
            return (
                entry is not None
                and self._lent.get(key, {}).get(updater, False)
                and entry[0].revision == expected_revision
            )

    def before_save(
        self, session_id: uuid.UUID, expected_revision: int, updater: Updater = None
    ) -> tuple[datetime, Incarnation] | None:
        """Forget the held snapshot until the save is confirmed (errors, cancellation).

        When the update of ``updater`` was based on a snapshot :meth:`lend` handed out
        (or a read :meth:`lend_read` recorded), returns the ``last_active`` and the
        incarnation the save must also find stored, else None. The ``last_active`` is
        the lent snapshot's (or recorded read's) as this store last saw it (its own
        reads and touches since move it, see :meth:`touched`), so a touch by another
        process since is not overruled; the incarnation keeps a session deleted and
        added again since from being overwritten. An update read in one task and saved
        in another (each call of a blocking portal is a task) has nothing recorded for
        the saving task: the save checks the latest lend or read of the session by a
        task that has ended then (none: the revision alone decides).
        """
        key = session_id.int
        with self._lock:
            self._pop(key)  # lent snapshots become what their saves check (see _pop)
            base = self._forget(key, updater)
            if base is None:  # read in a task that ended (a portal's calls): the latest's
                ended = self._drop_ended_bases(key, keep_newest=False)
                base = ended[-1] if ended else None
        if base is not None and base[0] == expected_revision:
            return base[1], base[2]
        return None

    def keep(
        self,
        session: Session | None,
        incarnation: Incarnation = None,
        history_bytes: int = 0,
        document_bytes: int = 0,
    ) -> None:
        """Hold ``session`` (of ``incarnation``) if it has its whole history and is not
        older than the entry; a reply about another incarnation drops the entry.

        ``history_bytes`` and ``document_bytes`` are what its messages and its document
        take as stored: the byte budget counts them.
        """
        if session is None or self._size == 0 or not session.messages.is_complete:
            return
        nbytes = history_bytes + document_bytes
        fits = session.messages.total <= self._max_messages and nbytes <= self._largest
        key = session.id.int
        with self._lock:
            entry = self._items.get(key)
            lent = None
            if entry is not None:
                held = entry[0]
                if entry[1] != incarnation:
                    self._pop(key)  # which life is the current one cannot be told
                    return
                if held.revision > session.revision or (
                    held.revision == session.revision and held.last_active > session.last_active
                ):
                    return  # a reply that raced with a newer local write
                # The same revision of the same life (a read, perhaps seeing a touch): a
                # lent snapshot stays lent, with these times, as touched() keeps it.
                if held.revision == session.revision and fits:
                    lent = self._lent.pop(key, None)
                self._pop(key)
            if not fits:
                return
            self._items[key] = (session, incarnation, history_bytes, document_bytes)
            self._messages += session.messages.total
            self._bytes += nbytes
            if lent:
                self._lent[key] = lent
            while (
                len(self._items) > self._size
                or self._messages > self._max_messages
                or self._bytes > self._max_bytes
            ):
                oldest_id, oldest = self._items.popitem(last=False)
                self._messages -= oldest[0].messages.total
                self._bytes -= oldest[2] + oldest[3]
                self._unlend(oldest_id, oldest)

    def take(self, session_id: uuid.UUID) -> Held | None:
        """Remove and return the held entry (before a write that may not report back)."""
        with self._lock:
            return self._pop(session_id.int)

    def _pop(self, key: int) -> Held | None:
        """Remove the entry (lock held). An update it was lent to keeps its check."""
        entry = self._items.pop(key, None)
        if entry is not None:
            self._messages -= entry[0].messages.total
            self._bytes -= entry[2] + entry[3]
            self._unlend(key, entry)
        return entry

    def _unlend(self, key: int, entry: Held) -> None:
        """An entry leaves (lock held): if it was lent, what the saves of the updates
        based on it must check moves to the recorded reads (:meth:`before_save` finds
        it there).

        Whatever removes the entry meanwhile (a read of this or another life, a delete,
        an append, an eviction), an update's save still checks the revision,
        ``last_active`` and incarnation it was based on, so a session deleted and added
        again elsewhere is never overwritten by it.
        """
        lent = self._lent.pop(key, None)
        if lent:
            base = (entry[0].revision, entry[0].last_active, entry[1])
            for updater in lent:
                self._remember(key, updater, base)
            self._drop_ended_bases(key)

    def _remember(self, key: int, updater: Updater, base: _Base) -> None:
        """Record what the save of ``updater``'s update must check (lock held), newest
        last; the oldest go over ``_MAX_BASES`` (``_MAX_BASES_PER_SESSION``)."""
        bases = self._bases.get(key)
        if bases is None:
            bases = self._bases[key] = {}
        else:
            self._bases.move_to_end(key)
        if bases.pop(updater, None) is None:
            self._nbases += 1
        bases[updater] = base
        if len(bases) > _MAX_BASES_PER_SESSION:
            self._nbases -= _trim(bases)
            if not bases:  # all of tasks that ended, this one too
                del self._bases[key]
        while self._nbases > _MAX_BASES:
            self._nbases -= len(self._bases.popitem(last=False)[1])

    def _drop_ended_bases(self, key: int, *, keep_newest: bool = True) -> list[_Base]:
        """:func:`_drop_ended` on what is remembered for a session (lock held)."""
        bases = self._bases.get(key)
        if bases is None or (keep_newest and len(bases) < 2):
            return []
        dropped = _drop_ended(bases, keep_newest=keep_newest)
        self._nbases -= len(dropped)
        if not bases:
            del self._bases[key]
        return dropped

    def _forget(self, key: int, updater: Updater) -> _Base | None:
        """Remove and return what the save of ``updater``'s update of a session was to
        check (lock held), if recorded."""
        bases = self._bases.get(key)
        if bases is None:
            return None
        base = bases.pop(updater, None)
        if base is not None:
            self._nbases -= 1
            if not bases:
                del self._bases[key]
        return base

    def appended(
        self,
        before: Held | None,
        messages: Sequence[Message],
        after: Session,
        incarnation: Incarnation = None,
        added_bytes: int = 0,
        document_bytes: int = 0,
    ) -> None:
        """Follow a confirmed append: ``before`` (what :meth:`take` returned) plus
        ``messages`` (``added_bytes`` as stored) with the times and revision of ``after``
        (the store's answer, about the session of ``incarnation``, whose stored document
        takes ``document_bytes``)."""
        if before is None or before[1] != incarnation:
            return
        held = before[0]
        if held.revision == after.revision - 1:
            self.keep(
                replace_trusted(
                    held,
                    messages=held.messages.extend(messages),
                    revision=after.revision,
                    last_active=after.last_active,
                    expires_at=after.expires_at,
                ),
                incarnation,
                before[2] + added_bytes,
                document_bytes,
            )

    def seen(
        self,
        session_id: uuid.UUID,
        session: Session | None,
        incarnation: Incarnation = None,
        history_bytes: int = 0,
        document_bytes: int = 0,
    ) -> Session | None:
        """Follow a read of ``session_id``: hold what it returned, forget a missing one.

        A window of the messages is not held, but it still tells the held snapshot's
        times (a touch moves them without a new revision) or that it is outdated. The
        byte counts are as for :meth:`keep` (only a whole history's are used).
        """
        if session is None:
            self.drop(session_id)
            return session
        if self._bases:  # only while an update based on a read is in flight
            with self._lock:
                self._follow_base(session_id.int, session, incarnation)
        if session.messages.is_complete:
            self.keep(session, incarnation, history_bytes, document_bytes)
        else:
            key = session_id.int
            with self._lock:
                entry = self._items.get(key)
                if entry is None or (
                    entry[1] == incarnation and entry[0].revision > session.revision
                ):
                    return session
                if entry[1] != incarnation or entry[0].revision < session.revision:
                    self._pop(key)
                    return session
            self.touched(session, incarnation)  # same history, perhaps touched
        return session

    def touched(self, session: Session, incarnation: Incarnation = None) -> None:
        """Follow a touch that found the held snapshot current: new times, same history.

        Unlike :meth:`keep`, a snapshot lent to an update stays lent, now with this
        touch's ``last_active``: its save still checks the incarnation and that no other
        process touched the session since.
        """
        key = session.id.int
        with self._lock:
            self._follow_base(key, session, incarnation)
            entry = self._items.get(key)
            if entry is None or entry[1] != incarnation:
                return
            held = entry[0]
            if held.revision == session.revision and held.last_active < session.last_active:
                self._items[key] = (
                    replace_trusted(
                        held, last_active=session.last_active, expires_at=session.expires_at
                    ),
                    incarnation,
                    entry[2],
                    entry[3],
                )

    def _follow_base(self, key: int, session: Session, incarnation: Incarnation) -> None:
        """Recorded reads (:meth:`lend_read`) follow this store's later reads and
        touches of the same revision and life, as a lent snapshot does (lock held)."""
        bases = self._bases.get(key)
        if bases is None:
            return
        for updater, base in bases.items():
            if (
                base[0] == session.revision
                and base[2] == incarnation
                and base[1] < session.last_active
            ):
                bases[updater] = (base[0], session.last_active, incarnation)

    def drop(self, session_id: uuid.UUID) -> None:
        """Forget a session (its next update reads it again; one in flight keeps its
        check, see :meth:`_unlend`)."""
        self.take(session_id)

    def clear(self) -> None:
        """Forget everything (e.g. when the store closes)."""
        with self._lock:
            self._items.clear()
            self._lent.clear()
            self._bases.clear()
            self._nbases = 0
            self._messages = 0
            self._bytes = 0
