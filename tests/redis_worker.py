"""Child process for the multi-process Redis tests (run by tests/test_redis.py).

Usage::

    python tests/redis_worker.py update URL PREFIX BACKEND SESSION_ID COUNT
    python tests/redis_worker.py purge URL PREFIX BACKEND ISO_NOW

Each prints ``ready``, waits for a line on stdin (so siblings start together), works,
and prints one JSON line with its result.
"""

from __future__ import annotations

import json
import sys
import uuid
from datetime import datetime, timedelta

import anyio

from asyncsession import EventKind, Session, SessionManager
from asyncsession.stores.redis import RedisRepository


class FixedClock:
    """A clock stuck at one instant (the purge test's "later")."""

    def __init__(self, now: datetime) -> None:
        self._now = now

    def now(self) -> datetime:
        return self._now

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep_forever()


def _store(url: str, prefix: str) -> RedisRepository:
    return RedisRepository(url, prefix=prefix, key_expiry_grace=timedelta(days=3650))


async def _wait_for_go() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await anyio.to_thread.run_sync(sys.stdin.readline)


def _bump(session: Session) -> Session:
    return session.with_state(n=session.state.get("n", 0) + 1)


async def update(url: str, prefix: str, session_id: str, count: int) -> dict[str, int]:
    manager = SessionManager(_store(url, prefix), cleanup_interval=None, max_retries=10_000)
    async with manager:
        await _wait_for_go()
        for _ in range(count):
            await manager.update(session_id, _bump)
    return {"updates": count}


async def purge(url: str, prefix: str, now: str) -> dict[str, object]:
    clock = FixedClock(datetime.fromisoformat(now))
    manager = SessionManager(_store(url, prefix), cleanup_interval=None, clock=clock)
    async with manager, manager.subscribe(buffer=100_000) as events:
        await _wait_for_go()
        removed = await manager.purge_expired()
        ids: list[str] = []
        while True:
            try:
                event = events.receive_nowait()
            except anyio.WouldBlock:
                break
            if event.kind is EventKind.EXPIRED:
                ids.append(str(event.session_id))
    return {"removed": removed, "ids": ids}


def main() -> None:
    mode, url, prefix, backend, *rest = sys.argv[1:]
    if mode == "update":
        result = anyio.run(
            update, url, prefix, str(uuid.UUID(rest[0])), int(rest[1]), backend=backend
        )
    elif mode == "purge":
        result = anyio.run(purge, url, prefix, rest[0], backend=backend)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
