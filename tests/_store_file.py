from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from asyncsession.stores.files import FileRepository


def open_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AbstractAsyncContextManager[FileRepository]:
    # One process owns this directory, so shared=False (no directory rescans); and
    # fsync=False keeps the shared suites fast. tests/test_files.py runs the contract
    # with the defaults (shared=True, fsync=True).
    return FileRepository(tmp_path / "file-store", fsync=False, shared=False)
