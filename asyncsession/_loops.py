"""Waking a task of any event loop from another thread."""

from __future__ import annotations

import anyio
import anyio.lowlevel


def set_soon(token: anyio.lowlevel.EventLoopToken, event: anyio.Event) -> bool:
    """Set ``event`` in the event loop ``token`` names (from any thread), without waiting
    for that loop to run it. False if that loop has ended (and its tasks with it)."""
    try:
        token.backend_class.run_sync_soon(event.set, (), token.native_token)
    except RuntimeError:  # anyio.RunFinishedError, or an asyncio loop stopped and closed
        return False
    return True
