from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from asyncsession import MemoryRepository
from asyncsession.testing import RepositoryContract


class TestMemoryRepository(RepositoryContract):
    @pytest.fixture
    async def repository(self, anyio_backend: str) -> AsyncIterator[MemoryRepository]:
        async with MemoryRepository() as repo:
            yield repo
