"""Shared fixtures.

Every async test runs on asyncio and trio (``anyio_backend``). Store-parametrized tests
use ``any_repository``: one parameter per ``tests/_store_<name>.py`` module, each of
which defines ``open_store(request, tmp_path)`` returning an async context manager that
yields an open, empty :class:`asyncsession.SessionRepository`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import settings

from asyncsession import SessionManager, SessionRepository
from asyncsession.testing import ManualClock

# No per-example deadline: hypothesis's default (200 ms of wall-clock time per example)
# fails correct code on a loaded machine. A test that must be fast says so itself.
settings.register_profile("asyncsession", deadline=None)
# HYPOTHESIS_PROFILE=nightly: a long run (the state machine takes its budget from it).
settings.register_profile(
    "nightly", settings.get_profile("asyncsession"), max_examples=300, stateful_step_count=50
)
HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or "asyncsession"
settings.load_profile(HYPOTHESIS_PROFILE)

STORES = sorted(p.stem.removeprefix("_store_") for p in Path(__file__).parent.glob("_store_*.py"))


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async test runs on asyncio and on trio."""
    return str(request.param)


@pytest.fixture(params=STORES)
async def any_repository(
    request: pytest.FixtureRequest, tmp_path: Path, anyio_backend: str
) -> AsyncIterator[SessionRepository]:
    """An open, empty store of each kind under tests/_store_*.py."""
    module = importlib.import_module(f"_store_{request.param}")
    async with module.open_store(request, tmp_path) as repository:
        yield repository


#: The idle timeout of the ``sessions`` fixture's manager, in seconds.
IDLE = 1800
#: The type of the ``other_task`` fixture.
OtherTask = Callable[[Callable[[], Awaitable[object]]], Awaitable[None]]


@pytest.fixture
def clock() -> ManualClock:
    """The clock of the ``sessions`` fixture's manager."""
    return ManualClock()


@pytest.fixture
async def sessions(
    any_repository: SessionRepository, clock: ManualClock
) -> AsyncIterator[SessionManager]:
    """A running manager over each store: idle timeout :data:`IDLE`, retention 600 s,
    time from ``clock``. No cleanup loop: tests that advance the clock then purge
    explicitly would race a background pass (tests of the loop make their own manager)."""
    async with SessionManager(
        any_repository, idle_timeout=IDLE, retention=600, cleanup_interval=None, clock=clock
    ) as manager:
        yield manager


def load_example(filename: str) -> Any:
    """``examples/<filename>``, imported as a module (registered in ``sys.modules``:
    attrs resolves an example's annotations through it)."""
    path = Path(__file__).resolve().parent.parent / "examples" / filename
    name = f"example_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["sqlite", "file", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty durable store of each kind, for the CLI and the test process
    alike (Redis: the test server, under a fresh prefix)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 's.db'}"
    if request.param == "file":
        return f"file://{tmp_path / 'files'}"
    server = request.getfixturevalue("redis_server")
    return f"redis://127.0.0.1:{server.port}/0?prefix=cli-{uuid.uuid4().hex[:8]}:"


Call = Callable[[], Awaitable[object]]


@pytest.fixture
async def other_task(anyio_backend: str) -> AsyncIterator[Callable[[Call], Awaitable[None]]]:
    """``await other_task(call)`` awaits ``call()`` in a task started before the test ran:
    a write by another task of this process, e.g. while an update function runs (a task
    the function starts itself may not write its own session)."""
    send, receive = anyio.create_memory_object_stream[tuple[Call, list[Exception], anyio.Event]](1)

    async def serve() -> None:
        async with receive:
            async for call, errors, done in receive:
                try:
                    await call()
                except Exception as exc:  # raised in the caller's task instead
                    errors.append(exc)
                done.set()

    async def run(call: Call) -> None:
        errors: list[Exception] = []
        done = anyio.Event()
        await send.send((call, errors, done))
        await done.wait()
        if errors:
            raise errors[0]

    async with anyio.create_task_group() as tg, send:
        tg.start_soon(serve)
        yield run


# --- Redis store fixtures (appended block; owned by the RedisRepository work) -------------
from redis_support import lone_redis as lone_redis  # noqa: E402
from redis_support import redis_server as redis_server  # noqa: E402
# --- end of Redis block ---------------------------------------------------------------------
