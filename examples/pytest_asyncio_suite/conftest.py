"""Short timeouts for the manager, and a fixture of the user's own built on it."""

from collections.abc import AsyncIterator
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
