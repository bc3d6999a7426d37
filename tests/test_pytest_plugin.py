"""The pytest plugin's fixtures in real user suites (examples/), run with pytester."""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
import uuid
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from asyncsession.testing import RepositoryContract

pytest_plugins = ["pytester"]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def plugin_args() -> list[str]:
    """Load the plugin by name unless its pytest11 entry point is installed (it loads then)."""
    installed = any(
        ep.value == "asyncsession.pytest_plugin" for ep in entry_points(group="pytest11")
    )
    return [] if installed else ["-p", "asyncsession.pytest_plugin"]


# Suites that use anyio's plugin only run without pytest-asyncio (0.24 and later, merely
# installed, warns at startup about its unset loop scope; these suites make warnings errors).
# The example suites say so in their pytest.ini; the suites written here pass it.
ANYIO_ONLY = ("-p", "no:asyncio")


def run_example(pytester: pytest.Pytester, name: str, *args: str) -> pytest.RunResult:
    shutil.copytree(
        EXAMPLES / name,
        pytester.path,
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"),
    )
    return pytester.runpytest_subprocess(*plugin_args(), "-p", "no:randomly", *args)


def test_anyio_suite_on_asyncio_and_trio(pytester: pytest.Pytester) -> None:
    result = run_example(pytester, "pytest_anyio_suite", "-v")
    result.assert_outcomes(passed=10)
    result.stdout.fnmatch_lines(["*test_idle_session_expires_and_is_collected?asyncio? PASSED*"])
    result.stdout.fnmatch_lines(["*test_idle_session_expires_and_is_collected?trio? PASSED*"])


def test_pytest_asyncio_strict_suite(pytester: pytest.Pytester) -> None:
    result = run_example(pytester, "pytest_asyncio_suite")
    result.assert_outcomes(passed=6)


def test_custom_store_passes_the_contract(pytester: pytest.Pytester) -> None:
    result = run_example(pytester, "custom_store")
    contract_tests = [name for name in dir(RepositoryContract) if name.startswith("test_")]
    # tests of stored documents skip: the example does not override replace_document()
    stored = [
        name
        for name in contract_tests
        if "self.replace_document(" in inspect.getsource(getattr(RepositoryContract, name))
    ]
    assert stored
    # every other contract test on asyncio and trio, plus the suite's own manager test on both
    result.assert_outcomes(
        passed=2 * (len(contract_tests) - len(stored)) + 2, skipped=2 * len(stored)
    )


def test_a_failing_contract_test_shows_the_values_it_compared(pytester: pytest.Pytester) -> None:
    shutil.copytree(EXAMPLES / "custom_store", pytester.path, dirs_exist_ok=True)
    store = pytester.path / "dict_store.py"
    # a common mistake: expired sessions latest first (sorting by id instead passed the
    # test by chance, for 1 in 20 sets of random ids)
    store.write_text(
        store.read_text().replace(
            "due.sort(key=lambda s: (s.expires_at, s.id.int))",
            "due.sort(key=lambda s: (s.expires_at, s.id.int), reverse=True)",
        )
    )
    result = pytester.runpytest_subprocess(
        *plugin_args(), "-p", "no:randomly", "-k", "test_deadline_index and trio"
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*assert [[]UUID(*[]] == [[]UUID(*"])


def test_pytest_asyncio_auto_mode(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(
        """
        async def test_expiry(session_manager, session_clock):
            session = await session_manager.create()
            session_clock.advance(1800)
            await session_manager.wait_for_cleanup()
            assert (await session_manager.stats()).expired_total == 1
            assert not await session_manager.exists(session.id)
        """
    )
    result = pytester.runpytest_subprocess(*plugin_args(), "-W", "error")
    result.assert_outcomes(passed=1)


def test_pytest_asyncio_tests_on_wider_loop_scopes(pytester: pytest.Pytester) -> None:
    # The manager must run on the loop the test runs on, whatever its loop scope.
    pytester.makeini(
        "[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(
        """
        import pytest

        async def expiry(session_manager, session_clock):
            session = await session_manager.create()
            session_clock.advance(1800)
            await session_manager.wait_for_cleanup()
            assert not await session_manager.exists(session.id)

        @pytest.mark.asyncio(loop_scope="module")
        async def test_module_loop(session_manager, session_clock):
            await expiry(session_manager, session_clock)

        @pytest.mark.asyncio(loop_scope="session")
        async def test_session_loop(session_manager, session_clock):
            await expiry(session_manager, session_clock)

        @pytest.mark.asyncio
        async def test_function_loop(session_manager, session_clock):
            await expiry(session_manager, session_clock)
        """
    )
    result = pytester.runpytest_subprocess(
        *plugin_args(), "-W", "error", "-o", "faulthandler_timeout=60"
    )
    result.assert_outcomes(passed=3)


def test_overriding_the_repository_and_options(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest
        from asyncsession import SQLiteRepository

        @pytest.fixture
        def anyio_backend():
            return "trio"

        @pytest.fixture
        def session_repository(tmp_path):
            return SQLiteRepository(tmp_path / "sessions.db")

        @pytest.fixture
        def session_manager_options():
            return {"idle_timeout": None, "max_messages": 2}
        """
    )
    pytester.makepyfile(
        """
        import pytest
        from asyncsession import LimitExceeded, SQLiteRepository

        @pytest.mark.anyio
        async def test_sqlite(session_manager, session_repository):
            assert isinstance(session_manager.repository, SQLiteRepository)
            assert session_manager.repository is session_repository
            session = await session_manager.create()
            await session_manager.add_messages(session.id, [("user", "a", None)] * 2)
            with pytest.raises(LimitExceeded):
                await session_manager.add_message(session.id, "user", "c")
        """
    )
    result = pytester.runpytest_subprocess(*plugin_args(), *ANYIO_ONLY, "-W", "error")
    result.assert_outcomes(passed=1)


PARAMETRIZED_OVERRIDES = """
import pytest
from asyncsession import MemoryRepository, SQLiteRepository

@pytest.fixture(params=["memory", "sqlite"])
def session_repository(request, tmp_path):
    if request.param == "memory":
        return MemoryRepository()
    return SQLiteRepository(tmp_path / "sessions.db")

@pytest.fixture(params=[None, 2])
def session_manager_options(request):
    return {"max_messages": request.param}
"""

PARAMETRIZED_TEST = """
import pytest
from asyncsession import LimitExceeded

async def fill(session_manager, session_manager_options):
    session = await session_manager.create()
    await session_manager.add_messages(session.id, [("user", "a", None)] * 2)
    if session_manager_options["max_messages"] is None:
        await session_manager.add_message(session.id, "user", "c")
    else:
        with pytest.raises(LimitExceeded):
            await session_manager.add_message(session.id, "user", "c")

@pytest.mark.{mark}
async def test_each_store(session_manager, session_manager_options):
    await fill(session_manager, session_manager_options)
"""


@pytest.mark.parametrize("runner", ["anyio", "asyncio"])
def test_parametrized_overrides_parametrize_tests_that_use_only_the_manager(
    pytester: pytest.Pytester, runner: str
) -> None:
    """helper-183: ``session_manager`` loaded the three fixtures by getfixturevalue only,
    so pytest did not see them among the test's fixtures, and an override with params=
    (the way to run one suite on several stores) failed every test with pytest's "The
    requested fixture has no parameter defined for test"."""
    if runner == "asyncio":
        pytester.makeini(
            "[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
        )
    pytester.makeconftest(PARAMETRIZED_OVERRIDES)
    pytester.makepyfile(PARAMETRIZED_TEST.replace("{mark}", runner))
    args = ANYIO_ONLY if runner == "anyio" else ()
    result = pytester.runpytest_subprocess(*plugin_args(), *args, "-W", "error", "-v")
    # 2 stores x 2 option sets (x asyncio and trio with anyio)
    result.assert_outcomes(passed=8 if runner == "anyio" else 4)
    # (the order of the ids' parts differs between pytest releases)
    result.stdout.re_match_lines([r".*test_each_store\[.*(sqlite-2|2-sqlite).*\] PASSED.*"])


def test_anyio_tests_in_pytest_asyncio_auto_mode_fail_with_a_message(
    pytester: pytest.Pytester,
) -> None:
    """helper-183: pytest-asyncio's auto mode runs anyio-marked tests on its own loop, not
    the one anyio's fixtures run on: the manager's cleanup never ran, so
    ``wait_for_cleanup()`` hung on asyncio (and trio failed with "must be called from
    async context"). The fixture now says what to change."""
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.anyio
        async def test_expiry(session_manager, session_clock):
            await session_manager.create()
            session_clock.advance(1800)
            await session_manager.wait_for_cleanup()
        """
    )
    result = pytester.runpytest_subprocess(*plugin_args(), timeout=120)
    result.assert_outcomes(errors=2)  # asyncio and trio
    result.stdout.fnmatch_lines(["*auto mode runs anyio-marked tests*asyncio_mode = strict*"])


def test_the_session_clock_works_with_a_redis_repository(
    pytester: pytest.Pytester, request: pytest.FixtureRequest
) -> None:
    """Redis deletes keys by the server's real clock: the plugin's clock starts at the
    real time, so a suite overriding session_repository with Redis keeps its sessions."""
    server = request.getfixturevalue("redis_server")
    prefix = f"plugin-{uuid.uuid4().hex[:8]}:"
    pytester.makeconftest(
        f"""
        import anyio
        import pytest
        from asyncsession.stores.redis import RedisRepository

        @pytest.fixture(params=["asyncio", "trio"])
        def anyio_backend(request):
            return request.param

        @pytest.fixture
        def session_repository():
            return RedisRepository({server.url!r}, prefix={prefix!r})

        @pytest.fixture(scope="session", autouse=True)
        def delete_the_keys():
            # here, not in the outer test: pytester drops the modules a test imports
            # when it ends, and a second copy of coredis imported later broke the
            # Redis store's NOSCRIPT handling in the tests that came after
            yield
            anyio.run(_delete_keys, backend="asyncio")

        async def _delete_keys():
            async with RedisRepository({server.url!r}, prefix={prefix!r}) as store:
                keys = [key async for key in store.client.scan_iter(match={prefix + "*"!r})]
                if keys:
                    await store.client.delete(keys)

        @pytest.fixture
        def session_manager_options():
            return {{"idle_timeout": 60, "cleanup_interval": 30}}
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.anyio
        async def test_redis(session_manager, session_clock):
            s = await session_manager.create()
            await session_manager.add_message(s.id, "user", "hi")
            assert len((await session_manager.get(s.id)).messages) == 1
            session_clock.advance(60)
            await session_manager.wait_for_cleanup()
            assert not await session_manager.exists(s.id)
        """
    )
    result = pytester.runpytest_subprocess(*plugin_args(), *ANYIO_ONLY, "-W", "error")
    result.assert_outcomes(passed=2)  # asyncio and trio


def test_sync_test_gets_a_clear_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_sync(session_manager):
            pass
        """
    )
    result = pytester.runpytest_subprocess(*plugin_args())
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*session_manager needs an async test*@pytest.mark.anyio*"])


def test_manager_errors_on_entry_surface_in_setup(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        "[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makeconftest(
        """
        import pytest
        from asyncsession import FileRepository

        @pytest.fixture
        def session_repository(tmp_path):
            return FileRepository(tmp_path / "missing-parent" / "store")
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.asyncio
        async def test_never_runs(session_manager):
            pass

        @pytest.mark.anyio
        async def test_never_runs_either(session_manager):
            pass
        """
    )
    result = pytester.runpytest_subprocess(*plugin_args())
    result.assert_outcomes(errors=3)  # anyio runs the second on asyncio and trio
    result.stdout.fnmatch_lines(["*StorageError*parent directory*"])


def readme_fixture() -> str:
    """The README's pytest-asyncio fixture holding a manager open across ``yield``."""
    readme = (EXAMPLES.parent / "README.md").read_text(encoding="utf-8")
    at = readme.index("@pytest_asyncio.fixture\nasync def sessions(tmp_path)")
    start = readme.rindex("```python\n", 0, at) + len("```python\n")
    return readme[start : readme.index("```", at)]


def test_an_own_pytest_asyncio_fixture_may_hold_a_manager_across_yield(
    pytester: pytest.Pytester,
) -> None:
    """pytest-asyncio runs an async fixture's setup and teardown in two tasks: the
    README's fixture, `async with SessionManager` around `yield`, is left at teardown by
    the second task (the first has ended), with the store closed and the data kept."""
    pytester.makeini(
        "[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(
        test_fixture=readme_fixture()
        + """
import pytest
from asyncsession import SQLiteRepository, StorageError

seen = {}

@pytest.mark.asyncio
async def test_first(sessions, tmp_path):
    seen["id"] = (await sessions.create(state={"n": 1})).id
    seen["path"] = tmp_path / "sessions.db"
    seen["store"] = sessions.repository

@pytest.mark.asyncio
async def test_second():
    with pytest.raises(StorageError, match="not open"):  # the teardown closed it
        await seen["store"].get(seen["id"])
    async with SQLiteRepository(seen["path"]) as store:
        assert (await store.get(seen["id"])).state == {"n": 1}
""",
    )
    result = pytester.runpytest_subprocess(*plugin_args(), "-p", "no:randomly", "-W", "error")
    result.assert_outcomes(passed=2)


def test_importing_the_plugin_is_cheap() -> None:
    code = (
        "import sys, asyncsession.pytest_plugin as p; "
        "heavy = {'trio', 'coredis', 'pytest_asyncio', 'hypothesis', 'click', 'rich'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
