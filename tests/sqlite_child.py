"""Child process for the SQLite crash and multi-process tests (run as a script).

``crash DB BACKEND``: add sessions from 1,000 concurrent tasks, printing each session id
once its add() has returned, then keep writing until killed.

``append DB BACKEND SESSION_ID TAG``: append 500 messages ``TAG-0`` ... ``TAG-499`` to
one session from 5 concurrent tasks, then print ``done``.

``read DB BACKEND SESSION_ID``: open the store (upgrading an older layout) and print the
session's revision.

``recovering DB``: stand for a process recovering DB's WAL (as the first opener after a
crash does): hold the write and recover locks of the ``-shm`` file (bytes 120 and 122,
SQLite's unix locking) and make the two copies of the wal-index header differ, print
``recovering``, and keep that until a line arrives on stdin. Meanwhile every other
connection's reads and writes get SQLITE_BUSY (BUSY_RECOVERY); once it exits, the next
reader recovers the index from the WAL file, which was never touched.
"""

from __future__ import annotations

import fcntl
import os
import sys
import uuid
from datetime import datetime, timedelta, timezone

import anyio

from asyncsession import ExpiryPolicy, Message, Session
from asyncsession.stores.sqlite import SQLiteRepository

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
POLICY = ExpiryPolicy(idle_timeout=timedelta(days=1))


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def crash(path: str) -> None:
    async with SQLiteRepository(path) as repo:

        async def write(n: int) -> None:
            session = Session(
                uuid.uuid4(),
                T0,
                T0,
                owner=f"child-{n}",
                state={"n": n},
                messages=[Message("user", f"hello {n}", T0)],
            )
            await repo.add(session)
            _say(str(session.id))

        round_ = 0
        while True:  # 1,000 concurrent writes per round, until the parent kills us
            async with anyio.create_task_group() as tg:
                for n in range(1000):
                    tg.start_soon(write, round_ * 1000 + n)
            round_ += 1


async def append(path: str, session_id: str, tag: str) -> None:
    sid = uuid.UUID(session_id)
    async with SQLiteRepository(path, busy_timeout=30) as repo:

        async def writer(k: int) -> None:
            for i in range(k, 500, 5):
                await repo.append(sid, [Message("user", f"{tag}-{i}", T0)], at=T0, policy=POLICY)

        async with anyio.create_task_group() as tg:
            for k in range(5):
                tg.start_soon(writer, k)
    _say("done")


async def read(path: str, session_id: str) -> None:
    async with SQLiteRepository(path) as repo:
        session = await repo.get(uuid.UUID(session_id))
    _say("missing" if session is None else str(session.revision))


def recovering(path: str) -> None:
    fd = os.open(path + "-shm", os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 120)  # WAL_WRITE_LOCK
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 122)  # WAL_RECOVER_LOCK
        # Header copies at 0 and 48 (48 bytes each): change mxFrame in the second one.
        changed = os.pread(fd, 1, 48 + 16)[0] ^ 0xFF
        os.pwrite(fd, bytes([changed]), 48 + 16)
        _say("recovering")
        sys.stdin.readline()
    finally:
        os.close(fd)  # releases the locks


def main(argv: list[str]) -> None:
    if argv[0] == "recovering":
        recovering(argv[1])
        return
    mode, path, backend = argv[:3]
    if mode == "crash":
        anyio.run(crash, path, backend=backend)
    elif mode == "append":
        anyio.run(append, path, argv[3], argv[4], backend=backend)
    elif mode == "read":
        anyio.run(read, path, argv[3], backend=backend)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
