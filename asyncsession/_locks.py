"""Per-key in-process locks that exist only while someone holds or waits for them."""

from __future__ import annotations

import uuid

import anyio

__all__ = ["KeyedLocks"]


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = anyio.Lock(fast_acquire=True)
        self.users = 0


class _Held:
    __slots__ = ("_entry", "_id", "_locks")

    def __init__(self, locks: dict[int, _Entry], key: int) -> None:
        self._locks = locks
        self._id = key

    async def __aenter__(self) -> None:
        entry = self._locks.get(self._id)
        if entry is None:
            entry = self._locks[self._id] = _Entry()
        entry.users += 1
        self._entry = entry
        try:
            await entry.lock.acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._entry.lock.release()
        self._leave()

    def _leave(self) -> None:
        self._entry.users -= 1
        if self._entry.users == 0:
            del self._locks[self._id]


class KeyedLocks:
    """``async with locks(key):`` serializes tasks per key; unused keys cost nothing.

    Keyed by the id's integer: ``uuid.UUID`` hashes in Python code.
    """

    __slots__ = ("_locks",)

    def __init__(self) -> None:
        self._locks: dict[int, _Entry] = {}

    def __call__(self, key: uuid.UUID) -> _Held:
        return _Held(self._locks, key.int)

    def __len__(self) -> int:
        return len(self._locks)
