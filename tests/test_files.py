"""FileRepository: the contract, the document format, corruption, locks, faults, crashes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from asyncsession.stores.files import FileRepository
from asyncsession.testing import RepositoryContract


class TestFileContract(RepositoryContract):
    @pytest.fixture
    async def repository(self, anyio_backend: str, tmp_path: Path) -> AsyncIterator[FileRepository]:
        async with FileRepository(tmp_path / "store") as repo:
            yield repo
