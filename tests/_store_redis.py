from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import timedelta
from pathlib import Path

import pytest

from asyncsession.stores.redis import RedisRepository


def open_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AbstractAsyncContextManager[RedisRepository]:
    """A Redis store on the session's private server, with a prefix of its own.

    Tests use fixed 2026 timestamps, so Redis key expiry gets a grace of ten years
    (the code path runs; no test data vanishes by the server's wall clock).
    """
    server = request.getfixturevalue("redis_server")
    return _store(server.url)


@asynccontextmanager
async def _store(url: str) -> AsyncIterator[RedisRepository]:
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    async with RedisRepository(url, prefix=prefix, key_expiry_grace=timedelta(days=3650)) as store:
        try:
            yield store
        finally:
            keys = [key async for key in store.client.scan_iter(match=f"{prefix}*")]
            if keys:
                await store.client.delete(keys)
