"""SQLiteRepository: the contract suite plus SQLite-specific, fault and crash tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from asyncsession.stores.sqlite import SQLiteRepository
from asyncsession.testing import RepositoryContract


class TestSQLiteContract(RepositoryContract):
    @pytest.fixture
    async def repository(
        self, anyio_backend: str, tmp_path: Path
    ) -> AsyncIterator[SQLiteRepository]:
        async with SQLiteRepository(tmp_path / "contract.db") as repo:
            yield repo
