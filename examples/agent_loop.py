"""An LLM agent's conversations on asyncsession: context windows, tool calls, undo.

Each user's conversation is a session. A turn appends the user's message, then loops:
read the last CONTEXT messages, ask the model, save its answer (text, or a tool call
plus the tool's result, both in one write). A reply is saved only if nothing was added
to the conversation while the model was thinking (another turn of the same user, from
this process or another one); otherwise the model is asked again with the new history.
The model here is a deterministic stand-in, so the example runs offline:

    python examples/agent_loop.py --backend asyncio
    python examples/agent_loop.py --backend trio --store memory
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs

import asyncsession as s

CONTEXT = 20  # messages the model sees
MAX_STEPS = 8  # model calls per turn (tool calls and retries included)


@attrs.frozen
class Reply:
    """What the model answers: text, or a call of one of the app's tools."""

    text: str = ""
    tool: str | None = None
    arguments: dict[str, Any] = attrs.field(factory=dict)


async def fake_model(history: Sequence[s.Message]) -> Reply:
    """A deterministic stand-in for an LLM call (yields like a network call would)."""
    await anyio.sleep(0.01)
    last = history[-1]
    if last.role == "tool":  # the tool answered: put its result into words
        return Reply(f"It is {last.data['celsius']} °C in {last.data['city']}.")
    asked = [m.content for m in history if m.role == "user"]
    if last.content.startswith("weather in "):
        return Reply(tool="weather", arguments={"city": last.content.removeprefix("weather in ")})
    return Reply(f"You said {len(asked)} thing(s) so far; the last: {last.content!r}.")


async def run_tool(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """The app's tools (one here)."""
    assert name == "weather"
    await anyio.sleep(0.01)
    return {"city": arguments["city"], "celsius": len(arguments["city"]) + 10}


class Raced(Exception):
    """The conversation grew while the model was thinking: ask it again."""


async def turn(sessions: s.SessionManager, session_id: s.SessionId, text: str) -> str:
    """One user turn; returns the model's final text."""
    await sessions.add_message(session_id, "user", text)
    for _step in range(MAX_STEPS):
        window = await sessions.get(session_id, last_messages=CONTEXT)
        if not window.messages:  # cleared meanwhile: nothing left to answer
            return ""
        last = window.messages[-1]
        if last.role == "assistant" and last.data is None:  # another turn answered it all
            return last.content
        reply = await fake_model(window.messages)
        messages: list[tuple[str, str, Any]] = []
        if reply.tool is not None:  # the call and its result go in together
            call = {"tool": reply.tool, "arguments": reply.arguments}
            result = await run_tool(reply.tool, reply.arguments)
            messages = [("assistant", "", call), ("tool", "", result)]
        else:
            messages = [("assistant", reply.text, None)]

        def answer(x: s.Session, seen: s.Session = window, messages: Any = messages) -> s.Session:
            # compare-and-append: a reply to all before it. The total alone would miss an
            # undo plus a new message; the revision would refuse a mere state change.
            if x.messages.total != seen.messages.total or x.messages[-1] != seen.messages[-1]:
                raise Raced
            for role, content, data in messages:
                x = x.with_message(role, content, data=data)
            return x

        try:
            await sessions.update(session_id, answer)
        except Raced:
            continue
        if reply.tool is None:
            return reply.text
    raise RuntimeError(f"no answer within {MAX_STEPS} model calls")


def undo_last_turn(x: s.Session) -> s.Session:
    """Drop the last user message and everything after it (an update function).

    Removing messages rewrites the stored history (O(history)); appends stay O(1).
    """
    for back, message in enumerate(reversed(x.messages)):
        if message.role == "user":
            return attrs.evolve(x, messages=x.messages[: len(x.messages) - back - 1])
    return x


def show(session: s.Session) -> str:
    lines = [f"{session.owner}: {session.messages.total} messages"]
    for m in session.messages:
        text = m.content or json.dumps(m.data)  # data: read-only dicts, lists as tuples
        lines.append(f"  {m.role:>9}: {text}")
    return "\n".join(lines)


async def main(store: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        repo: s.SessionRepository = (
            s.MemoryRepository() if store == "memory" else s.SQLiteRepository(Path(tmp) / "s.db")
        )
        async with s.SessionManager(repo, idle_timeout=3600) as sessions:
            scripts = {
                "alice": ["hello", "weather in Oslo", "thanks"],
                "bob": ["weather in Lisbon", "and tomorrow?"],
                "carol": ["hi", "oops, ignore this"],
            }
            ids = {user: (await sessions.create(owner=user)).id for user in scripts}

            async def chat(user: str) -> None:
                for text in scripts[user]:
                    await turn(sessions, ids[user], text)

            async with anyio.create_task_group() as tg:  # the users chat concurrently
                for user in scripts:
                    tg.start_soon(chat, user)
            await sessions.update(ids["carol"], undo_last_turn)

            # two turns of one user at once (a double submit): each saved reply
            # follows every message before it, so neither answers a stale history
            async with anyio.create_task_group() as tg:
                tg.start_soon(turn, sessions, ids["bob"], "first tab")
                tg.start_soon(turn, sessions, ids["bob"], "second tab")

            for user in scripts:
                print(show(await sessions.get(ids[user])))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    anyio.run(main, args.store, backend=args.backend)
