"""Using a manager from synchronous code through anyio's blocking portal (README)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import anyio
import pytest
from anyio.from_thread import start_blocking_portal

import asyncsession as s

README = Path(__file__).parent.parent / "README.md"


def readme_portal_example() -> str:
    text = README.read_text(encoding="utf-8")
    at = text.index("with start_blocking_portal() as portal")
    start = text.rindex("```python\n", 0, at) + len("```python\n")
    return text[start : text.index("```", at)]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_readme_portal_example_works(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code = readme_portal_example().replace(
        "start_blocking_portal()", f"start_blocking_portal({backend!r})"
    )
    exec(compile(code, "README portal example", "exec"), {})

    async def check() -> None:
        async with s.SQLiteRepository(tmp_path / "sessions.db") as store:
            page = await store.list(s.SessionQuery(owner="alice"))
            [stored] = page.items
            assert stored.messages.total == 1

    anyio.run(check, backend=backend)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_threads_share_one_manager_through_a_portal(backend: str, tmp_path: Path) -> None:
    """Worker threads of a sync app append to one session through one portal: every
    message is stored once, and the manager is left cleanly."""
    with (
        start_blocking_portal(backend) as portal,
        portal.wrap_async_context_manager(
            s.SessionManager(s.SQLiteRepository(tmp_path / "s.db"))
        ) as sessions,
    ):
        session = portal.call(sessions.create)

        def work(n: int) -> None:
            for i in range(10):
                portal.call(sessions.add_message, session.id, "user", f"{n}-{i}")
            portal.call(partial(sessions.set_state, session.id, **{f"t{n}": True}))

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(work, range(4)))
        got = portal.call(sessions.get, session.id)
    assert sorted(m.content for m in got.messages) == sorted(
        f"{n}-{i}" for n in range(4) for i in range(10)
    )
    assert got.state == {f"t{n}": True for n in range(4)}
    assert not sessions.running
