"""Waking a task of any event loop from another thread; the running task itself; a
context entered and left by a task of its own."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import sys
import threading
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import anyio.lowlevel

logger = logging.getLogger(__name__)

#: Detached asyncio tasks (the loop keeps only weak references to its tasks).
_DETACHED: set[asyncio.Task[None]] = set()


def current_task() -> object:
    """The running task object itself (asyncio's or trio's), not a description of it:
    kept, it tells that task from any later one (an id may be reused once it ends)."""
    imported = sys.modules.get("trio")  # not imported: not running
    # First: a trio task may run inside an asyncio task (trio.run called in one, or
    # trio's guest mode), whose loop asyncio then reports as running. Trio names itself
    # in sniffio's thread-local (sniffio is trio's dependency) while its code runs: a
    # cheap test before its own.
    if imported is not None:
        sniffio = sys.modules.get("sniffio")
        if (
            sniffio is not None
            and sniffio.thread_local.name == "trio"
            and imported.lowlevel.in_trio_task()
        ):
            return imported.lowlevel.current_task()
    loop = asyncio._get_running_loop()
    task = None if loop is None else asyncio.current_task(loop)
    if task is not None:
        return task
    import trio  # outside any task: trio's error says so

    return trio.lowlevel.current_task()


def running_backend() -> str | None:
    """``"asyncio"`` or ``"trio"``: the event loop the caller runs in; None outside one."""
    trio = sys.modules.get("trio")  # not imported: not running
    if trio is not None and trio.lowlevel.in_trio_run():
        # Trio's guest mode runs inside an asyncio loop: ask sniffio (a trio dependency)
        # whose task this is, as anyio does.
        import sniffio

        try:
            if sniffio.current_async_library() == "trio":
                return "trio"
        except sniffio.AsyncLibraryNotFoundError:
            pass
    return "asyncio" if asyncio._get_running_loop() is not None else None


def has_ended(task: object) -> bool:
    """True if ``task`` (from :func:`current_task`) has ended though something still
    refers to it: an asyncio task that is done, or a trio task whose coroutine has
    returned (a finished call of a blocking portal, until the garbage collector runs).

    (A trio task cannot end inside a task group it entered: trio ends the run.)"""
    if asyncio.isfuture(task):
        return task.done()
    coro = getattr(task, "coro", None)
    return inspect.iscoroutine(coro) and coro.cr_frame is None


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
    if asyncio.isfuture(task):  # any asyncio task class: not only the C one (3.10's
        # backports.asyncio.runner, which pytest-asyncio uses there, subclasses the other)
        detached = task.get_loop().create_task(fn(), name=name)
        _DETACHED.add(detached)
        detached.add_done_callback(_DETACHED.discard)
        return
    import trio

    trio.lowlevel.spawn_system_task(fn, name=name, context=contextvars.copy_context())


def _wait_for_host(done: threading.Event, token: anyio.lowlevel.EventLoopToken) -> bool:
    """Wait (in a worker thread) until a host in another event loop has ended; False if
    that loop stopped first (an asyncio loop stopped but not closed never runs it)."""
    loop = token.native_token
    while not done.wait(0.05):
        if isinstance(loop, asyncio.AbstractEventLoop) and not loop.is_running():
            return done.is_set()
    return True


class HostedContext:
    """An async context manager entered and left by a task of its own (its host), so
    that any task may :meth:`enter` and :meth:`leave` it.

    For what must be left by the task that entered it (a coredis client enters a task
    group), when the task that opens a store is not the one that closes it: a startup
    hook's task, a pytest-asyncio fixture's setup and teardown. The host ends when
    :meth:`leave` is called (from any task of any event loop), or on its own: when its
    event loop ends (cancelled), or when the context fails (logged); :attr:`ended`
    tells.
    """

    __slots__ = (
        "_context",
        "_done",
        "_done_here",
        "_ended",
        "_failure",
        "_name",
        "_stop",
        "_token",
    )

    def __init__(self, context: AbstractAsyncContextManager[object], name: str) -> None:
        self._context = context
        self._name = name
        self._stop: anyio.Event | None = None  # set: the host leaves
        self._token: anyio.lowlevel.EventLoopToken | None = None  # the host's loop
        self._done = threading.Event()  # set: the host has ended (any thread may wait)
        self._done_here: anyio.Event | None = None  # the same, for its own event loop
        self._ended: BaseException | None = None  # why the host ended on its own
        self._failure: list[BaseException] = []  # what entering or leaving raised

    @property
    def ended(self) -> BaseException | None:
        """Why the host ended without :meth:`leave` (its event loop ended: a
        cancellation; the context failed: its error), or None while it runs."""
        return self._ended

    async def enter(self) -> None:
        """Have a new host enter the context; raise what entering raised."""
        ready, stop, done, done_here = (
            anyio.Event(),
            anyio.Event(),
            threading.Event(),
            anyio.Event(),
        )
        failure: list[BaseException] = []
        self._stop, self._failure, self._ended = stop, failure, None
        self._done, self._done_here = done, done_here
        self._token = anyio.lowlevel.current_token()

        async def host() -> None:
            try:
                async with self._context:
                    ready.set()
                    await stop.wait()
            except BaseException as exc:  # a detached task must not raise
                if not ready.is_set() or stop.is_set():
                    failure.append(exc)  # enter() or leave() raises it
                else:
                    self._ended = exc
                    if not isinstance(exc, anyio.get_cancelled_exc_class()):
                        with contextlib.suppress(BaseException):  # on trio it would end the run
                            logger.warning("%s ended on its own: %r", self._name, exc)
            finally:
                ready.set()
                done.set()
                done_here.set()

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
        what leaving raised (not what ended the host on its own: that was logged)."""
        stop, self._stop = self._stop, None
        token, done, done_here = self._token, self._done, self._done_here
        if stop is None or token is None or done_here is None:
            return
        with anyio.CancelScope(shield=True):
            if anyio.lowlevel.current_token() == token:
                stop.set()
                await done_here.wait()
            # else the host's loop runs in another thread (or has ended: nothing to do)
            elif set_soon(token, stop) and not await anyio.to_thread.run_sync(
                _wait_for_host, done, token
            ):
                with contextlib.suppress(Exception):
                    logger.warning(
                        "%s was not left: its event loop stopped before it could run "
                        "again (close stores before their event loop stops)",
                        self._name,
                    )
        if raise_failure and self._failure:
            raise self._failure[0]
