"""Per-key in-process locks that exist only while someone holds or waits for them."""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import Callable

import anyio

__all__ = ["KeyedLocks"]


def _task_function() -> Callable[[], object]:
    """The running backend's own current-task function (anyio's costs ~3 µs a call)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        import trio  # not asyncio: anyio's other backend

        return trio.lowlevel.current_task
    return asyncio.current_task


class _Entry:
    __slots__ = ("owner", "waiters")

    def __init__(self, owner: object) -> None:
        self.owner = owner
        # the tasks waiting for the key, in arrival order
        self.waiters: deque[tuple[anyio.Event, object]] = deque()


class _Held:
    __slots__ = ("_id", "_key", "_locks")

    def __init__(self, locks: KeyedLocks, key: uuid.UUID) -> None:
        self._locks = locks
        self._key = key
        self._id = key.int

    async def __aenter__(self) -> None:
        me = self._locks._current_task()
        entries = self._locks._entries
        entry = entries.get(self._id)
        if entry is None:  # free: taken without a checkpoint (like fast_acquire)
            entries[self._id] = _Entry(me)
            return
        if entry.owner is me:
            raise RuntimeError(
                f"This task already holds session {self._key}'s lock: an update function "
                "must not update, close or rotate its own session through the manager "
                "(return the changed snapshot instead)."
            )
        turn = anyio.Event()
        entry.waiters.append((turn, me))
        try:
            await turn.wait()
        except BaseException:
            if turn.is_set():  # handed over just as we were cancelled: pass it on
                self._release()
            else:
                entry.waiters.remove((turn, me))
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._release()

    def _release(self) -> None:
        entries = self._locks._entries
        entry = entries[self._id]
        if entry.waiters:
            turn, entry.owner = entry.waiters.popleft()  # the next waiter owns it (FIFO)
            turn.set()
        else:
            del entries[self._id]


class KeyedLocks:
    """``async with locks(key):`` serializes tasks per key; unused keys cost nothing.

    An uncontended key costs a dict entry and no event-loop primitive (updates take one
    per call). Not reentrant: a task acquiring a key it holds gets ``RuntimeError``
    instead of waiting for itself. Keyed by the id's integer (``uuid.UUID`` hashes in
    Python code).
    """

    __slots__ = ("_entries", "_task")

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self._task: Callable[[], object] | None = None

    def _current_task(self) -> object:
        task = self._task
        if task is not None:
            try:
                return task()
            except RuntimeError:  # now used under the other backend
                pass
        self._task = task = _task_function()
        return task()

    def __call__(self, key: uuid.UUID) -> _Held:
        return _Held(self, key)

    def __len__(self) -> int:
        return len(self._entries)
