"""openai-agents conversations stored in asyncsession: a ``session=`` for ``Runner.run``.

openai-agents (the ``agents`` package) keeps a conversation's history through any object
with its Session protocol: ``session_id`` and four async methods, ``get_items(limit)``,
``add_items(items)``, ``pop_item()`` and ``clear_session()``. ``AgentsSession`` below is
one over an asyncsession ``SessionManager``, by duck typing (this file does not import
openai-agents, so it runs with asyncsession alone). With openai-agents installed:

    from agents import Agent, Runner

    async with s.SessionManager(s.SQLiteRepository("sessions.db")) as sessions:
        session = await AgentsSession.for_owner(sessions, "user_123")  # resume or start
        result = await Runner.run(agent, "What's the weather in Oslo?", session=session)
        result = await Runner.run(agent, "And tomorrow?", session=session)  # remembers

Each item is one asyncsession message, so ``asyncsession show`` and ``list --search``
see the conversation's text. ``main()`` runs offline: a stand-in for what ``Runner.run``
does with the session in each turn (read the history, call the model and the tools, save
the turn's items), an undo with ``pop_item()``, and the history printed:

    python examples/openai_agents_session.py --backend asyncio
    python examples/openai_agents_session.py --backend trio --store memory
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import attrs

import asyncsession as s

# A Responses API input item (openai-agents' TResponseInputItem): a JSON dict such as
# {"role": "user", "content": "hi"} or {"type": "function_call", "call_id": ..., ...}.
# Any rather than dict[str, Any]: openai-agents' item types are TypedDicts, which a
# list[dict[str, Any]] parameter would refuse when your type checker compares this class
# with its Session protocol.
Item = Any


class _Unchanged(Exception):
    """Raised by an update function that has nothing to change: no write at all."""


def to_message(item: Mapping[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """An item as an asyncsession message: ``(role, content, data)``.

    role: the item's own role if asyncsession has it (user, assistant, system, developer,
    tool), "tool" for a tool's result (a type ending in "_output"), else "assistant" (a
    tool call, a reasoning item: what the model produced). content: the item's text when
    its "content" is a non-empty str, kept once, in the message (data holds the rest of
    the item); otherwise "" and data is the whole item.
    """
    role = item.get("role")
    kind = item.get("type")
    if not (isinstance(role, str) and role in s.ROLES):
        role = "tool" if isinstance(kind, str) and kind.endswith("_output") else "assistant"
    content = item.get("content")
    if isinstance(content, str) and content:
        return role, content, {key: v for key, v in item.items() if key != "content"}
    return role, "", dict(item)


def to_item(message: s.Message) -> dict[str, Any]:
    """The item a message stored by :func:`to_message` holds, as a plain mutable dict.

    It equals the item added (``==``); "content" comes back as its last key. A message
    added some other way (``sessions.add_message(sid, "system", "Be brief.")``, no
    data) reads as ``{"role": ..., "content": ...}``.
    """
    if message.data is None:
        return {"role": message.role, "content": message.content}
    item: dict[str, Any] = s.thaw(message.data)
    if message.content:  # non-empty only when the item's text was taken out of data
        item["content"] = message.content
    return item


class AgentsSession:
    """openai-agents' Session protocol over one asyncsession session.

    ``session_id`` is the asyncsession session's id as a str (asyncsession makes ids;
    keep your user or chat id as the session's ``owner``: :meth:`for_owner`).

    - ``get_items(limit)`` reads only the last ``limit`` messages (O(limit)); ``limit``
      0 gives ``[]``, a negative one raises ``InvalidConfiguration``.
    - ``add_items(items)`` is one atomic append (O(len(items))); ``[]`` writes nothing.
    - ``pop_item()`` and ``clear_session()`` rewrite the stored history (O(history), an
      atomic ``update``); on an empty history they write nothing.
    - Every call raises ``SessionNotFound`` once the session has expired or been
      deleted, and writes raise ``SessionClosed`` once it is closed.

    Like openai-agents' own sessions, it takes no lock around a turn: two runs of one
    conversation at once (a double submit) interleave their items. Run one turn per
    conversation at a time (e.g. an ``anyio.Lock`` per ``session_id`` in a process).
    """

    # Recent openai-agents releases read this; None: their defaults (a limit for a run can
    # come from RunConfig(session_settings=...)). It makes isinstance(x, Session) true too.
    session_settings: Any = None

    def __init__(self, sessions: s.SessionManager, session_id: uuid.UUID | str) -> None:
        self.sessions = sessions
        self.id = session_id if isinstance(session_id, uuid.UUID) else uuid.UUID(session_id)
        self.session_id = str(self.id)

    @classmethod
    async def for_owner(cls, sessions: s.SessionManager, owner: str) -> AgentsSession:
        """The owner's conversation: their most recently active ACTIVE session, or a new one.

        A closed session is never resumed (it cannot take items), nor an archived one
        (``activate()`` it first). Not atomic: two first requests of one owner at once
        can both find nothing and create two sessions. Later calls resume the one
        written last, and the other idles out (``idle_timeout``) unless written again.
        Where that matters, create the conversation once (at sign-up, on "new chat") and
        keep its ``session_id``, or make the first request of an owner one at a time.
        """
        page = await sessions.list(owner=owner, status=s.SessionStatus.ACTIVE, limit=1)
        if page.items:
            return cls(sessions, page.items[0].id)
        return cls(sessions, (await sessions.create(owner=owner)).id)

    async def get_items(self, limit: int | None = None) -> list[Item]:
        """The last ``limit`` items (all with None), oldest first."""
        session = await self.sessions.get(self.id, last_messages=limit)
        return [to_item(message) for message in session.messages]

    async def add_items(self, items: list[Item]) -> None:
        """Append the items, all in one write."""
        if items:
            await self.sessions.add_messages(self.id, [to_message(item) for item in items])

    async def pop_item(self) -> Item | None:
        """Remove the newest item and return it; None if there is none."""
        popped: s.Message | None = None

        def drop_last(x: s.Session) -> s.Session:
            # update() may run this more than once (the session was written meanwhile):
            # each run sets `popped`, so after update() it is the one whose result saved.
            nonlocal popped
            if not x.messages:
                raise _Unchanged
            popped = x.messages[-1]
            return attrs.evolve(x, messages=x.messages[:-1])

        try:
            await self.sessions.update(self.id, drop_last)
        except _Unchanged:
            return None
        assert popped is not None
        return to_item(popped)

    async def clear_session(self) -> None:
        """Remove every item (the session itself stays, with its id, owner and state)."""

        def drop_all(x: s.Session) -> s.Session:
            if not x.messages:
                raise _Unchanged
            return attrs.evolve(x, messages=())

        with contextlib.suppress(_Unchanged):
            await self.sessions.update(self.id, drop_all)


# --- offline stand-ins for the model, the tools and Runner.run ------------------------------


def weather(city: str) -> dict[str, Any]:
    """The app's one tool."""
    return {"city": city, "celsius": len(city) + 10}


async def fake_model(history: Sequence[Item]) -> list[Item]:
    """A deterministic stand-in for a model call: its output items for this history."""
    await anyio.lowlevel.checkpoint()  # a real call would wait on the network here
    last = history[-1]
    if last.get("type") == "function_call_output":  # the tool answered: put it into words
        result = json.loads(last["output"])
        return [_assistant(f"It is {result['celsius']} °C in {result['city']}.")]
    text = last["content"]
    if text.startswith("weather in "):
        arguments = {"city": text.removeprefix("weather in ")}
        call_id = f"call_{len(history)}"
        return [
            {"type": "reasoning", "id": f"rs_{len(history)}", "summary": []},
            {
                "type": "function_call",
                "call_id": call_id,
                "name": "weather",
                "arguments": json.dumps(arguments),
            },
        ]
    asked = sum(1 for item in history if item.get("role") == "user")
    return [_assistant(f"You said {asked} thing(s) so far; the last: {text!r}.")]


def _assistant(text: str) -> Item:
    return {
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


async def run_turn(session: AgentsSession, text: str) -> str:
    """What ``Runner.run(agent, text, session=session)`` does with the session: read the
    history, run the model and the tools it calls, save the turn's items; returns the
    final text."""
    turn: list[Item] = [{"role": "user", "content": text}]
    history = await session.get_items()  # Runner: get_items(limit) with SessionSettings
    for _step in range(8):
        output = await fake_model([*history, *turn])
        turn.extend(output)
        calls = [item for item in output if item.get("type") == "function_call"]
        if not calls:
            break
        for call in calls:
            result = weather(**json.loads(call["arguments"]))
            turn.append(
                {
                    "type": "function_call_output",
                    "call_id": call["call_id"],
                    "output": json.dumps(result),
                }
            )
    await session.add_items(turn)
    return str(turn[-1]["content"][0]["text"])


def describe(item: Item) -> str:
    """One line per item."""
    if item.get("type") == "function_call":
        return f"call {item['name']}({item['arguments']})  [{item['call_id']}]"
    if item.get("type") == "function_call_output":
        return f"tool result {item['output']}  [{item['call_id']}]"
    if item.get("type") == "reasoning":
        return "reasoning"
    content = item["content"]
    text = content if isinstance(content, str) else " ".join(part["text"] for part in content)
    return f"{item['role']}: {text}"


async def run(store: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        repo: s.SessionRepository = (
            s.MemoryRepository() if store == "memory" else s.SQLiteRepository(Path(tmp) / "s.db")
        )
        async with s.SessionManager(repo, idle_timeout=3600) as sessions:
            session = await AgentsSession.for_owner(sessions, "user_123")  # a new one
            print(f"user_123: new session {session.session_id}")
            print("agent:", await run_turn(session, "weather in Oslo"))

            # a later request of the same user (another worker, after a restart)
            session = await AgentsSession.for_owner(sessions, "user_123")
            print(f"user_123: resumed session {session.session_id}")
            print("agent:", await run_turn(session, "thanks"))
            print("agent:", await run_turn(session, "oops, wrong chat"))
            while (undone := await session.pop_item()) is not None:  # undo the last turn
                print("undone:", describe(undone))
                if undone.get("role") == "user":
                    break

            items = await session.get_items()
            print(f"history: {len(items)} items")
            for item in items:
                print("  " + describe(item))
            stored = await sessions.get(session.id, touch=False)
            roles = ", ".join(message.role for message in stored.messages)
            print(f"stored as {stored.messages.total} messages: {roles}")
            last_two = [describe(item) for item in await session.get_items(limit=2)]
            print("get_items(limit=2):", " | ".join(last_two))

            # the conversation ends; the user's next request starts a new one
            await sessions.close(session.id)
            fresh = await AgentsSession.for_owner(sessions, "user_123")
            assert fresh.session_id != session.session_id
            print(f"after close: new session, {len(await fresh.get_items())} items")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    anyio.run(run, args.store, backend=args.backend)


if __name__ == "__main__":
    main()
