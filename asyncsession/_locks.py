"""Per-key in-process locks that exist only while someone holds or waits for them."""

from __future__ import annotations

import contextlib
import sys
import threading
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.lowlevel

from ._loops import current_task, set_soon

__all__ = ["KeyedLocks", "ki_protected", "locks_of"]


class _Waiter:
    __slots__ = ("event", "granted", "loop", "owner", "token")

    def __init__(self, owner: object) -> None:
        self.owner = owner
        self.event = anyio.Event()
        self.token = anyio.lowlevel.current_token()  # its event loop, to wake it from others
        self.loop = self.token.native_token
        self.granted = False  # handed the lock (under the mutex)


class _Entry:
    __slots__ = ("owner", "waiters")

    def __init__(self, owner: object) -> None:
        self.owner = owner
        self.waiters: deque[_Waiter] = deque()  # the tasks waiting for the key, in order


class _Held:
    __slots__ = ("_id", "_key", "_locks")

    def __init__(self, locks: KeyedLocks, key: uuid.UUID) -> None:
        self._locks = locks
        self._key = key
        self._id = key.int

    async def __aenter__(self) -> None:
        waiter = self.take_or_queue()
        if waiter is not None:
            await self.wait(waiter)

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def take_or_queue(self) -> _Waiter | None:
        """Take the key if it is free (None: taken without a checkpoint, like
        fast_acquire), else queue the current task: then ``await wait(waiter)``."""
        return self._locks._enter(self._id, self._key)

    async def wait(self, waiter: _Waiter) -> None:
        """Wait until ``waiter`` (this task, queued) is handed the key."""
        try:
            await waiter.event.wait()
        except BaseException:
            self._locks._give_up(self._id, waiter)
            raise

    def release(self) -> None:
        self._locks._release(self._id)


class KeyedLocks:
    """``async with locks(key):`` serializes tasks per key; unused keys cost nothing.

    An uncontended key costs a dict entry and no event-loop primitive. Not reentrant: a
    task acquiring a key it holds gets ``RuntimeError`` instead of waiting for itself.
    Tasks of several event loops (in several threads, asyncio and trio alike) may share
    the locks: a waiter is woken through its own loop, and one whose loop has closed is
    passed over. A task left holding or waiting for a key in a loop that was stopped
    with its tasks still pending holds that key up for good: cancel a loop's tasks
    before stopping it, as ``asyncio.run`` and ``anyio.run`` do. Keyed by the id's
    integer (``uuid.UUID`` hashes in Python code).
    """

    __slots__ = ("_entries", "_mutex")

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self._mutex = threading.Lock()  # guards _entries and every entry's fields

    def __call__(self, key: uuid.UUID) -> _Held:
        return _Held(self, key)

    def __len__(self) -> int:
        return len(self._entries)

    def owner(self, key: uuid.UUID) -> object:
        """The task holding ``key`` (or handed it and not yet resumed), None if free."""
        with self._mutex:
            entry = self._entries.get(key.int)
            return None if entry is None else entry.owner

    # The three steps below change the entries under the mutex. On trio, Ctrl-C must not
    # interrupt them half way (waiters of other event loops would be stranded): they are
    # protected from KeyboardInterrupt once trio is in use (see _protect_from_ki).

    def _enter(self, key: int, name: uuid.UUID) -> _Waiter | None:
        """Take ``key`` if it is free (None), else queue the current task (its waiter)."""
        if not _KI_PROTECTED:
            _protect_from_ki()
        me = current_task()
        with self._mutex:
            entry = self._entries.get(key)
            if entry is None:
                self._entries[key] = _Entry(me)
                return None
            if entry.owner is me:
                raise RuntimeError(
                    f"This task already holds session {name}'s lock: an update function "
                    "must not update, close or rotate its own session through the "
                    "manager (return the changed snapshot instead)."
                )
            waiter = _Waiter(me)
            entry.waiters.append(waiter)
            return waiter

    def _give_up(self, key: int, waiter: _Waiter) -> None:
        """``waiter``'s wait ended (cancelled): leave the queue, or pass the key on if it
        was handed over just then."""
        with self._mutex:
            if waiter.granted:
                self._hand_over(key)
                return
            entry = self._entries.get(key)
            if entry is not None and waiter in entry.waiters:  # (not if passed over)
                entry.waiters.remove(waiter)

    def _release(self, key: int) -> None:
        with self._mutex:
            self._hand_over(key)

    def _hand_over(self, key: int) -> None:
        """Give ``key`` to its longest waiter whose loop still runs, or free it (mutex
        held)."""
        entry = self._entries[key]
        here: object = None
        while entry.waiters:
            waiter = entry.waiters.popleft()
            entry.owner, waiter.granted = waiter.owner, True  # FIFO
            if here is None:
                here = _current_loop()
            if waiter.loop is here:
                waiter.event.set()
                return
            if set_soon(waiter.token, waiter.event):
                return
            # Its event loop has closed: the waiter will never run (its coroutine may
            # still be closed later, by the garbage collector: it must not pass the key
            # on then, not being its owner). The next waiter.
            waiter.granted = False
        del self._entries[key]


def locks_of(store: object) -> KeyedLocks:
    """The :class:`KeyedLocks` every manager of ``store`` in this process shares, so that
    their updates of one session wait in turn instead of colliding in the store (a
    store that cannot be weakly referenced gets fresh locks each time)."""
    with _SHARED_MUTEX:
        for key in [k for k, (ref, _locks) in _SHARED.items() if ref() is None]:
            del _SHARED[key]  # stores gone (few: one entry per live store)
        found = _SHARED.get(id(store))
        if found is not None and found[0]() is store:
            return found[1]
        locks = KeyedLocks()
        with contextlib.suppress(TypeError):  # (a virtual subclass with __slots__: not kept)
            _SHARED[id(store)] = (weakref.ref(store), locks)
        return locks


_SHARED: dict[int, tuple[weakref.ref[object], KeyedLocks]] = {}
_SHARED_MUTEX = threading.Lock()


def _current_loop() -> object:
    """The running event loop's token, or a stand-in outside one (a waiter's coroutine
    closed by the garbage collector: every waiter is then woken through its own loop)."""
    try:
        return anyio.lowlevel.current_token().native_token
    except RuntimeError:  # anyio's NoEventLoopError (a RuntimeError) outside a loop
        return _NO_LOOP


_NO_LOOP = object()
_KI_PROTECTED = False
_F = TypeVar("_F", bound=Callable[..., object])


def ki_protected(step: _F) -> _F:
    """Mark ``step`` (a function or ``async def`` that takes or gives back a lock) to be
    protected from trio's KeyboardInterrupt, as :class:`KeyedLocks`' own steps are: a
    Ctrl-C between taking a lock and the code that gives it back would keep it taken."""
    _KI_STEPS.append(step)
    if _KI_PROTECTED:
        _protect_from_ki()
    return step


def _protect_from_ki() -> None:
    """Protect the lock steps (see :func:`ki_protected`) from trio's KeyboardInterrupt,
    once trio is imported (importing it here would cost asyncio users its import)."""
    global _KI_PROTECTED
    # (Another thread may be importing trio: its lowlevel module comes last. Until then,
    # no trio run can be under way, and the next call looks again.)
    enable = getattr(
        getattr(sys.modules.get("trio"), "lowlevel", None), "enable_ki_protection", None
    )
    if enable is None:
        return
    for step in _KI_STEPS:
        enable(step)  # (trio marks the code object: the function stays the same)
    _KI_PROTECTED = True


_KI_STEPS: list[Callable[..., object]] = [
    KeyedLocks._enter,
    KeyedLocks._give_up,
    KeyedLocks._release,
    _Held.__aenter__,
    _Held.__aexit__,
]
