from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from asyncsession.stores.sqlite import SQLiteRepository


def open_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AbstractAsyncContextManager[SQLiteRepository]:
    return SQLiteRepository(tmp_path / "sessions.db")
