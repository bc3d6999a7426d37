"""Run asyncsession's repository contract against DictRepository, on asyncio and trio."""

from collections.abc import AsyncIterator

import pytest
from dict_store import DictRepository

from asyncsession import SessionManager
from asyncsession.testing import ManualClock, RepositoryContract


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class TestDictRepository(RepositoryContract):
    @pytest.fixture
    async def repository(self, anyio_backend: str) -> AsyncIterator[DictRepository]:
        async with DictRepository() as store:
            yield store


@pytest.mark.anyio
async def test_a_manager_runs_on_it() -> None:
    clock = ManualClock()
    async with SessionManager(DictRepository(), idle_timeout=60, clock=clock) as sessions:
        session = await sessions.create(owner="alice")
        await sessions.add_message(session.id, "user", "hello")
        clock.advance(60)
        assert await sessions.purge_expired() == 1
