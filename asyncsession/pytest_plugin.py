"""pytest fixtures for testing code that uses asyncsession (installed as a ``pytest11`` plugin).

Fixtures:

* ``session_clock``: a :class:`~asyncsession.testing.ManualClock` starting at the current
  real UTC time (whole seconds), so it suits every store, Redis included (its server
  deletes keys by its own real clock); override it with ``ManualClock(start=...)`` for a
  fixed date.
* ``session_repository``: a fresh :class:`~asyncsession.MemoryRepository` (override it to
  test against another store; the manager opens and closes it).
* ``session_manager_options``: keyword arguments for the manager (override it, e.g.
  ``{"idle_timeout": 60, "cleanup_interval": 30}``).
* ``session_manager``: a running :class:`~asyncsession.SessionManager` over the two above,
  its cleanup loop driven by ``session_clock``; closed after the test.

``session_manager`` works with anyio's pytest plugin (asyncio and trio: tests marked
``@pytest.mark.anyio``) and with pytest-asyncio on asyncio (tests marked
``@pytest.mark.asyncio``, strict or auto mode, any ``loop_scope``; auto mode takes over
anyio-marked tests too, so a suite with anyio tests uses strict mode: in auto mode,
``session_manager`` fails an anyio-marked test with a message saying so). Overrides of
the three fixtures above may be parametrized (``params=``). It is a plain
fixture that picks the
async fixture of the plugin running the test:

* with anyio (the test requests ``anyio_backend``), an async generator fixture that anyio
  runs in the test's own task, so the manager's task group is entered and left there;
* with pytest-asyncio, which runs a fixture's setup and teardown as two separate tasks,
  a fixture that enters the manager inside one background task on the test's event loop
  and stops that task after the test.

Deterministic expiry: ``session_clock.advance(seconds)`` to a due pass, then
``await session_manager.wait_for_cleanup()``; passes are due ``cleanup_interval`` after
entry and then after each pass (advancing too little raises ``InvalidConfiguration``).

Importing this module imports only pytest and asyncsession's core.
"""

from __future__ import annotations

import types
from collections.abc import AsyncIterator
from typing import Any, Literal

import pytest

from . import MemoryRepository, SessionManager, SessionRepository

# The contract suite's asserts show their values, as a test module's do. This plugin
# loads before any test module could register the package, and imports it below.
pytest.register_assert_rewrite("asyncsession.testing")

from .testing import ManualClock  # noqa: E402

__all__ = [
    "session_clock",
    "session_manager",
    "session_manager_options",
    "session_repository",
]

_ANYIO_FIXTURE = "_asyncsession_manager_anyio"
_ASYNCIO_FIXTURE = "_asyncsession_manager_asyncio_{}"  # one per pytest-asyncio loop scope
_LoopScope = Literal["function", "class", "module", "package", "session"]
_LOOP_SCOPES: tuple[_LoopScope, ...] = ("function", "class", "module", "package", "session")


@pytest.fixture
def session_clock() -> ManualClock:
    """A manual clock at the current real UTC time: time moves only by ``advance()``."""
    return ManualClock()


@pytest.fixture
def session_repository() -> SessionRepository:
    """A fresh, empty in-memory store (not opened: the manager opens it)."""
    return MemoryRepository()


@pytest.fixture
def session_manager_options() -> dict[str, Any]:
    """Keyword arguments for ``session_manager`` (override to set timeouts)."""
    return {}


@pytest.fixture
def session_manager(
    request: pytest.FixtureRequest,
    session_clock: ManualClock,
    session_repository: SessionRepository,
    session_manager_options: dict[str, Any],
) -> SessionManager:
    """A running SessionManager over ``session_repository`` driven by ``session_clock``."""
    # The three fixtures above are requested here, though the variant below builds the
    # manager, so that pytest sees them among the test's fixtures: an override of one of
    # them with params= then parametrizes the test (via getfixturevalue alone, it fails).
    if "anyio_backend" in request.fixturenames:
        if _asyncio_auto_mode(request.config):
            pytest.fail(
                "session_manager: pytest-asyncio's auto mode runs anyio-marked tests itself, "
                "on another event loop than anyio's fixtures (the manager's tasks would never "
                "run). Set asyncio_mode = strict and mark pytest-asyncio tests "
                "@pytest.mark.asyncio, or run the anyio tests with -p no:asyncio.",
                pytrace=False,
            )
        manager: SessionManager = request.getfixturevalue(_ANYIO_FIXTURE)
        return manager
    if request.node.get_closest_marker("asyncio") is not None:
        if not request.config.pluginmanager.has_plugin("asyncio"):
            pytest.fail("session_manager: the test is marked asyncio but pytest-asyncio is off.")
        # The manager must live on the loop the test runs on, or its tasks never run.
        manager = request.getfixturevalue(_ASYNCIO_FIXTURE.format(_test_loop_scope(request)))
        return manager
    pytest.fail(
        "session_manager needs an async test run by anyio's pytest plugin "
        "(@pytest.mark.anyio) or by pytest-asyncio (@pytest.mark.asyncio).",
        pytrace=False,
    )


def _asyncio_auto_mode(config: pytest.Config) -> bool:
    """Whether pytest-asyncio runs, in auto mode (``--asyncio-mode`` or the ini option)."""
    if not config.pluginmanager.has_plugin("asyncio"):
        return False
    mode = config.getoption("asyncio_mode", None) or config.getini("asyncio_mode")
    return str(mode) == "auto"


def _test_loop_scope(request: pytest.FixtureRequest) -> str:
    """The scope of the pytest-asyncio event loop that runs this test."""
    marker = request.node.get_closest_marker("asyncio")
    kwargs = marker.kwargs if marker is not None else {}
    scope = kwargs.get("loop_scope") or kwargs.get("scope")
    if scope is None:
        try:
            scope = request.config.getini("asyncio_default_test_loop_scope")
        except ValueError:  # an older pytest-asyncio without that option
            scope = None
    scope = scope or "function"
    if scope not in _LOOP_SCOPES:
        pytest.fail(f"session_manager: unknown pytest-asyncio loop scope {scope!r}.")
    return str(scope)


def _build(
    clock: ManualClock, repository: SessionRepository, options: dict[str, Any]
) -> SessionManager:
    return SessionManager(repository, **{"clock": clock, **options})


@pytest.fixture(name=_ANYIO_FIXTURE)
async def _manager_anyio(
    anyio_backend: object,
    session_clock: ManualClock,
    session_repository: SessionRepository,
    session_manager_options: dict[str, Any],
) -> AsyncIterator[SessionManager]:
    """The manager, entered and left in the task anyio runs the test in."""
    async with _build(session_clock, session_repository, session_manager_options) as manager:
        yield manager


async def _manager_asyncio(
    session_clock: ManualClock,
    session_repository: SessionRepository,
    session_manager_options: dict[str, Any],
) -> AsyncIterator[SessionManager]:
    """The manager, hosted by one background task on pytest-asyncio's loop."""
    import asyncio  # pytest-asyncio only runs on asyncio; a host task is asyncio's own

    manager = _build(session_clock, session_repository, session_manager_options)
    entered = asyncio.Event()
    stop = asyncio.Event()

    async def host() -> None:
        async with manager:
            entered.set()
            await stop.wait()

    task = asyncio.get_running_loop().create_task(host(), name="asyncsession session_manager")
    started = asyncio.ensure_future(entered.wait())
    try:
        await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        started.cancel()
    if task.done():
        task.result()  # entering failed: raise its error here
    try:
        yield manager
    finally:
        stop.set()
        await task


def pytest_configure(config: pytest.Config) -> None:
    """Register the pytest-asyncio variant of the manager fixture when that plugin runs."""
    if not config.pluginmanager.has_plugin("asyncio"):
        return
    import pytest_asyncio

    fixtures = types.ModuleType("asyncsession.pytest_plugin.asyncio_fixtures")
    for scope in _LOOP_SCOPES:
        name = _ASYNCIO_FIXTURE.format(scope)
        # A fresh function per scope: pytest-asyncio keeps the loop scope on the function.
        function = types.FunctionType(_manager_asyncio.__code__, _manager_asyncio.__globals__, name)
        fixtures.__dict__[name] = pytest_asyncio.fixture(name=name, loop_scope=scope)(function)
    config.pluginmanager.register(fixtures, "asyncsession-asyncio-fixtures")
