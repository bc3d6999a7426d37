"""Helpers for tests that run several event loops at once, each in a thread of its own."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Sequence

import anyio


def run_in_threads(
    main: Callable[[str], Awaitable[object]],
    backends: Sequence[str],
    *,
    on_failure: Callable[[], None] = lambda: None,
) -> list[BaseException]:
    """Run ``main(name)`` under each of ``backends`` ("asyncio", "trio"), each in a thread
    of its own, all at once (``name`` is ``"<backend>-<index>"``); return what they raised.
    ``on_failure`` runs after a failure (to release the others, say)."""
    failures: list[BaseException] = []

    def run(name: str, backend: str) -> None:
        try:
            anyio.run(main, name, backend=backend)
        except BaseException as exc:
            failures.append(exc)
            on_failure()

    threads = [
        threading.Thread(target=run, args=(f"{backend}-{i}", backend))
        for i, backend in enumerate(backends)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failures
