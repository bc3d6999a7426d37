"""Child process for the FileRepository crash and two-process tests.

Usage::

    python files_child.py crash DIRECTORY SESSIONS WRITES TASKS
    python files_child.py append DIRECTORY SESSION_ID TAG COUNT
    python files_child.py hold-lock LOCK_FILE
    python files_child.py stall-in add|delete DIRECTORY

``crash`` creates SESSIONS sessions, then appends WRITES messages over them from TASKS
concurrent tasks, printing ``add <id>`` / ``ack <id> <revision>`` as soon as each write
is acknowledged (the parent kills it with SIGKILL part way). ``append`` appends COUNT
messages ``TAG-<i>`` to one session. ``hold-lock`` takes the flock of a lock file, prints
``locked`` and holds it until stdin closes. ``stall-in`` stops a worker thread for good
inside ``add`` (after its lock file is created, before the temporary file) or
``delete`` (after the document is unlinked, before its directory is fsynced and the lock
released), printing ``stalled <id>``, so the parent can kill the process at that point.
The event loop is the one named by the ``FILES_CHILD_BACKEND`` environment variable,
asyncio or trio, which must be set (the tests run every child on both).
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
import uuid
from datetime import datetime, timezone

import anyio

from asyncsession import ExpiryPolicy, Message, Session
from asyncsession.stores import files
from asyncsession.stores.files import FileRepository

POLICY = ExpiryPolicy()


def now() -> datetime:
    return datetime.now(timezone.utc)


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def crash(directory: str, sessions: int, writes: int, tasks: int) -> None:
    async with FileRepository(directory) as repo:
        ids = []
        for _ in range(sessions):
            session = Session(uuid.uuid4(), now(), now(), owner="crash")
            await repo.add(session)
            ids.append(session.id)
            say(f"add {session.id}")
        counter = iter(range(writes))

        async def worker() -> None:
            for i in counter:
                sid = ids[i % len(ids)]
                result = await repo.append(
                    sid, [Message("user", f"w{i}", now())], at=now(), policy=POLICY
                )
                say(f"ack {sid} {result.revision}")

        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(worker)
        say("done")


async def append(directory: str, session_id: str, tag: str, count: int) -> None:
    async with FileRepository(directory, lock_timeout=30) as repo:
        sid = uuid.UUID(session_id)
        for i in range(count):
            await repo.append(sid, [Message("user", f"{tag}-{i}", now())], at=now(), policy=POLICY)
    say("done")


async def stall_in(step: str, directory: str) -> None:
    async with FileRepository(directory) as repo:
        session = Session(uuid.uuid4(), now(), now())

        def stall(*args: object) -> int:
            say(f"stalled {session.id}")
            threading.Event().wait()  # never set: the parent kills this process here
            raise AssertionError("unreachable")

        if step == "add":
            files._encode = stall  # before the temporary file: only the lock file exists
            await repo.add(session)
        else:
            await repo.add(session)
            files._fsync = stall
            await repo.delete(session.id)


def hold_lock(path: str) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    say("locked")
    sys.stdin.read()
    os.close(fd)


def main(argv: list[str]) -> None:
    mode = argv[1]
    backend = os.environ["FILES_CHILD_BACKEND"]  # set by the test: asyncio or trio
    if mode == "crash":
        anyio.run(crash, argv[2], int(argv[3]), int(argv[4]), int(argv[5]), backend=backend)
    elif mode == "append":
        anyio.run(append, argv[2], argv[3], argv[4], int(argv[5]), backend=backend)
    elif mode == "stall-in":
        anyio.run(stall_in, argv[2], argv[3], backend=backend)
    elif mode == "hold-lock":
        hold_lock(argv[2])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv)
