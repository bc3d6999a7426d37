"""Waking a task of any event loop from another thread; the running task itself; a
context entered and left by a task of its own."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import anyio.lowlevel

logger = logging.getLogger("asyncsession")

#: Detached asyncio tasks (the loop keeps only weak references to its tasks).
_DETACHED: set[asyncio.Task[None]] = set()


def current_task() -> object:
    """The running task object itself (asyncio's or trio's), not a description of it:
    kept, it tells that task from any later one (an id may be reused once it ends)."""
    loop = asyncio._get_running_loop()  # None, not an exception, when trio runs
    task = None if loop is None else asyncio.current_task(loop)
    if task is not None:
        return task
    import trio  # only when trio runs, so it is installed

    return trio.lowlevel.current_task()


def set_soon(token: anyio.lowlevel.EventLoopToken, event: anyio.Event) -> bool:
    """Set ``event`` in the event loop ``token`` names (from any thread), without waiting
    for that loop to run it. False if that loop has ended (and its tasks with it)."""
    try:
        token.backend_class.run_sync_soon(event.set, (), token.native_token)
    except RuntimeError:  # anyio.RunFinishedError, or an asyncio loop stopped and closed
        return False
    return True


def _spawn_detached(fn: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
    """Run ``fn()`` in a task of the running loop that no task group owns (trio: a
    system task). ``fn`` must not raise: on trio that would end the whole run."""
    task = current_task()
    if isinstance(task, asyncio.Task):
        detached = task.get_loop().create_task(fn(), name=name)
        _DETACHED.add(detached)
        detached.add_done_callback(_DETACHED.discard)
        return
    import trio

    trio.lowlevel.spawn_system_task(fn, name=name, context=contextvars.copy_context())


class HostedContext:
    """An async context manager entered and left by a task of its own (its host), so
    that any task of the loop may :meth:`enter` and :meth:`leave` it.

    For what must be left by the task that entered it (a coredis client enters a task
    group), when the task that opens a store is not the one that closes it: a startup
    hook's task, a pytest-asyncio fixture's setup and teardown. The host ends when
    :meth:`leave` is called, or with the event loop (cancelled).
    """

    __slots__ = ("_context", "_done", "_failure", "_name", "_stop")

    def __init__(self, context: AbstractAsyncContextManager[object], name: str) -> None:
        self._context = context
        self._name = name
        self._stop: anyio.Event | None = None  # set: the host leaves
        self._done: anyio.Event | None = None  # set: the host has ended
        self._failure: list[BaseException] = []  # what entering or leaving raised

    async def enter(self) -> None:
        """Have the host enter the context; raise what entering raised."""
        ready, stop, done = anyio.Event(), anyio.Event(), anyio.Event()
        failure: list[BaseException] = []
        self._stop, self._done, self._failure = stop, done, failure

        async def host() -> None:
            try:
                async with self._context:
                    ready.set()
                    await stop.wait()
            except BaseException as exc:  # a detached task must not raise
                failure.append(exc)
                cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
                if ready.is_set() and not stop.is_set() and not cancelled:
                    logger.warning("%s ended on its own: %r", self._name, exc)
            finally:
                ready.set()
                done.set()

        _spawn_detached(host, self._name)
        try:
            await ready.wait()
        except BaseException:  # cancelled while the host enters: it leaves, then we go
            await self.leave(raise_failure=False)
            raise
        if failure:
            self._stop = None
            raise failure[0]

    async def leave(self, *, raise_failure: bool = True) -> None:
        """Have the host leave the context and wait for it (even when cancelled); raise
        what leaving raised."""
        stop, self._stop = self._stop, None
        if stop is None or self._done is None:
            return
        stop.set()
        with anyio.CancelScope(shield=True):
            await self._done.wait()
        failure = self._failure[0] if self._failure else None
        if raise_failure and not isinstance(failure, (type(None), anyio.get_cancelled_exc_class())):
            raise failure
