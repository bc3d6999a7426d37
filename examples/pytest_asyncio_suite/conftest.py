"""Short timeouts for the manager, a fixture of the user's own built on it, and one
holding a SQLite-backed manager of its own open across ``yield``."""

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

import asyncsession


@pytest.fixture
def session_manager_options() -> dict[str, Any]:
    return {"idle_timeout": 60, "cleanup_interval": 30}


@pytest_asyncio.fixture
async def alice_session(
    session_manager: asyncsession.SessionManager,
) -> AsyncIterator[asyncsession.Session]:
    """The user's own async fixture can build on session_manager."""
    session = await session_manager.create(owner="alice", name="support")
    yield session
    await session_manager.delete(session.id, missing_ok=True)


@pytest_asyncio.fixture
async def sqlite_sessions(tmp_path: Path) -> AsyncIterator[asyncsession.SessionManager]:
    """A manager of the user's own: pytest-asyncio sets it up and tears it down in two
    tasks, and the manager may be left by the second once the first has ended."""
    store = asyncsession.SQLiteRepository(tmp_path / "sessions.db")
    async with asyncsession.SessionManager(store) as manager:
        yield manager
