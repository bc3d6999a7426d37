"""The chat page in headless Chromium: two browsers chat at once, each sees only its own.

Needs Debian's ``chromium`` (``apt-get install -y chromium``) and the ``playwright``
Python package; the browser is the system one (no ``playwright install``). Screenshots
go to the test's tmp dir and to ``tests/artifacts/``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from web_support import CHAT, serve_sync

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 20_000  # a deadlock guard, not a timing assertion

# CI sets ASYNCSESSION_REQUIRE_BROWSER=1: there a missing Chromium fails instead of skipping.
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() and os.environ.get("ASYNCSESSION_REQUIRE_BROWSER") != "1",
    reason="headless Chromium not installed (apt-get install -y chromium)",
)


@pytest.fixture
def server_log(tmp_path: Path) -> Iterator[IO[bytes]]:
    with (tmp_path / "server.log").open("wb") as log:
        yield log


def texts(page: Any) -> list[str]:
    return [str(t) for t in page.locator("#log li").all_inner_texts()]


def send(page: Any, text: str) -> None:
    page.fill("#text", text)
    page.press("#text", "Enter")


def test_two_browsers_chat_at_once_and_see_only_their_own(
    tmp_path: Path, server_log: IO[bytes]
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    store = f"sqlite:///{tmp_path / 'chat.db'}"
    with (
        serve_sync(CHAT, "hypercorn-trio", store, server_log) as address,
        sync_api.sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=TIMEOUT_MS
        )
        try:
            pages = {}
            for user in ("alice", "bob"):
                context = browser.new_context(viewport={"width": 720, "height": 560})
                context.set_default_timeout(TIMEOUT_MS)
                page = context.new_page()
                page.goto(f"http://{address}/")
                pages[user] = page
            for page in pages.values():
                sync_api.expect(page.locator("#status")).to_have_text("live")
            ids = {user: page.inner_text("#sid") for user, page in pages.items()}
            assert ids["alice"] != ids["bob"]

            for n in (1, 2):  # both send before either waits: the chats interleave
                for user, page in pages.items():
                    send(page, f"{user} says {n}")
                for user, page in pages.items():
                    reply = f"#{n} {f'{user} says {n}'[::-1]}"
                    sync_api.expect(page.locator("#log li.assistant").last).to_have_text(reply)

            for user, page in pages.items():
                other = "bob" if user == "alice" else "alice"
                shown = texts(page)
                assert shown == [
                    f"{user} says 1",
                    f"#1 {f'{user} says 1'[::-1]}",
                    f"{user} says 2",
                    f"#2 {f'{user} says 2'[::-1]}",
                ]
                assert not any(other in t or other[::-1] in t for t in shown)
                # A reload finds the same conversation (cookie → server-side session).
                page.reload()
                sync_api.expect(page.locator("#status")).to_have_text("live")
                assert page.inner_text("#sid") == ids[user]
                sync_api.expect(page.locator("#log li")).to_have_count(4)

            ARTIFACTS.mkdir(exist_ok=True)
            for user, page in pages.items():
                shot = tmp_path / f"chat-{user}.png"
                page.screenshot(path=str(shot), full_page=True)
                name = "chat.png" if user == "alice" else f"chat-{user}.png"
                shutil.copyfile(shot, ARTIFACTS / name)
        finally:
            browser.close()
