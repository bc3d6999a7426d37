"""Waking a task of any event loop from another thread; the running task itself."""

from __future__ import annotations

import asyncio

import anyio
import anyio.lowlevel


def current_task() -> object:
    """The running task object itself (asyncio's or trio's), not a description of it:
    kept, it tells that task from any later one (an id may be reused once it ends)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no asyncio loop runs in this thread: trio does
        task = None
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
