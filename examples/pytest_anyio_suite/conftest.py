"""Run every test on asyncio and trio; give the manager short timeouts."""

from typing import Any

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def session_manager_options() -> dict[str, Any]:
    # Overrides asyncsession's default (manager defaults: 30 min idle, 5 min cleanup).
    return {"idle_timeout": 60, "cleanup_interval": 30}
