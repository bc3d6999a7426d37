"""Per-key in-process locks that exist only while someone holds or waits for them."""

from __future__ import annotations

import uuid
from collections import deque

import anyio

__all__ = ["KeyedLocks"]


class _Held:
    __slots__ = ("_id", "_locks")

    def __init__(self, locks: dict[int, deque[anyio.Event]], key: int) -> None:
        self._locks = locks
        self._id = key

    async def __aenter__(self) -> None:
        waiters = self._locks.get(self._id)
        if waiters is None:  # free: taken without a checkpoint (like fast_acquire)
            self._locks[self._id] = deque()
            return
        turn = anyio.Event()
        waiters.append(turn)
        try:
            await turn.wait()
        except BaseException:
            if turn.is_set():  # handed over just as we were cancelled: pass it on
                self._release()
            else:
                waiters.remove(turn)
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._release()

    def _release(self) -> None:
        waiters = self._locks[self._id]
        if waiters:
            waiters.popleft().set()  # the next waiter owns the key now (FIFO)
        else:
            del self._locks[self._id]


class KeyedLocks:
    """``async with locks(key):`` serializes tasks per key; unused keys cost nothing.

    An uncontended key costs a dict entry and no event-loop primitive at all (updates
    take one per call). Keyed by the id's integer: ``uuid.UUID`` hashes in Python code.
    """

    __slots__ = ("_locks",)

    def __init__(self) -> None:
        # key -> the tasks waiting for it, in arrival order; present while held
        self._locks: dict[int, deque[anyio.Event]] = {}

    def __call__(self, key: uuid.UUID) -> _Held:
        return _Held(self._locks, key.int)

    def __len__(self) -> int:
        return len(self._locks)
