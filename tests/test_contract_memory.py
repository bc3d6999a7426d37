from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from asyncsession import CURRENT_VERSION, MemoryRepository
from asyncsession.testing import RepositoryContract
from asyncsession.testing._contract import make_session


class TestMemoryRepository(RepositoryContract):
    @pytest.fixture
    async def repository(self, anyio_backend: str) -> AsyncIterator[MemoryRepository]:
        async with MemoryRepository() as repo:
            yield repo


@pytest.mark.anyio
async def test_memory_store_knows_every_document_is_current(anyio_backend: str) -> None:
    """It holds Session objects, never old documents (the contract also accepts None)."""
    async with MemoryRepository() as repo:
        session = make_session()
        await repo.add(session)
        versions = await repo.document_versions([session.id, uuid.uuid4()])
        assert versions == {session.id: CURRENT_VERSION}
