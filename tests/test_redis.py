from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from _store_redis import open_store
from asyncsession.stores.redis import RedisRepository
from asyncsession.testing import RepositoryContract


class TestRedisContract(RepositoryContract):
    @pytest.fixture
    async def repository(
        self, request: pytest.FixtureRequest, anyio_backend: str
    ) -> AsyncIterator[RedisRepository]:
        async with open_store(request, None) as store:  # type: ignore[arg-type]
            yield store
