from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from asyncsession import MemoryRepository


def open_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AbstractAsyncContextManager[MemoryRepository]:
    return MemoryRepository()
