"""Per-key in-process locks that exist only while someone holds or waits for them."""

from __future__ import annotations

import threading
import uuid
from collections import deque

import anyio
import anyio.lowlevel

from ._loops import current_task, set_soon

__all__ = ["KeyedLocks"]


class _Waiter:
    __slots__ = ("event", "granted", "owner", "thread", "token")

    def __init__(self, owner: object) -> None:
        self.owner = owner
        self.event = anyio.Event()
        self.token = anyio.lowlevel.current_token()  # its event loop, to wake it from others
        self.thread = threading.get_ident()  # that loop's thread
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
        me = current_task()
        locks = self._locks
        with locks._mutex:
            entry = locks._entries.get(self._id)
            if entry is None:  # free: taken without a checkpoint (like fast_acquire)
                locks._entries[self._id] = _Entry(me)
                return
            if entry.owner is me:
                raise RuntimeError(
                    f"This task already holds session {self._key}'s lock: an update "
                    "function must not update, close or rotate its own session through "
                    "the manager (return the changed snapshot instead)."
                )
            waiter = _Waiter(me)
            entry.waiters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            with locks._mutex:
                if waiter.granted:  # handed over just as we were cancelled: pass it on
                    locks._hand_over(self._id)
                else:
                    entry.waiters.remove(waiter)
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        locks = self._locks
        with locks._mutex:
            locks._hand_over(self._id)


class KeyedLocks:
    """``async with locks(key):`` serializes tasks per key; unused keys cost nothing.

    An uncontended key costs a dict entry and no event-loop primitive. Not reentrant: a
    task acquiring a key it holds gets ``RuntimeError`` instead of waiting for itself.
    Tasks of several event loops (in several threads, asyncio and trio alike) may share
    the locks: a waiter is woken through its own loop. Keyed by the id's integer
    (``uuid.UUID`` hashes in Python code).
    """

    __slots__ = ("_entries", "_mutex")

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self._mutex = threading.Lock()  # guards _entries and every entry's fields

    def __call__(self, key: uuid.UUID) -> _Held:
        return _Held(self, key)

    def __len__(self) -> int:
        return len(self._entries)

    def _hand_over(self, key: int) -> None:
        """Give ``key``'s lock to its longest waiter whose loop still runs, or free it
        (mutex held)."""
        entry = self._entries[key]
        while entry.waiters:
            waiter = entry.waiters.popleft()
            entry.owner, waiter.granted = waiter.owner, True  # FIFO
            if waiter.thread == threading.get_ident():
                waiter.event.set()
                return
            if set_soon(waiter.token, waiter.event):
                return
            # its event loop has ended, and its task with it: the next waiter
        del self._entries[key]
