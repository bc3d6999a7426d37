"""The code under test: a tiny chat service built on asyncsession."""

from __future__ import annotations

import uuid

import asyncsession


class ChatService:
    def __init__(self, sessions: asyncsession.SessionManager) -> None:
        self.sessions = sessions

    async def start(self, user: str) -> uuid.UUID:
        session = await self.sessions.create(owner=user, state={"turns": 0})
        return session.id

    async def say(self, session_id: uuid.UUID, text: str) -> str:
        async with self.sessions.bind(session_id):
            reply = f"echo: {text}"
            await self.sessions.add_messages(
                session_id, [("user", text, None), ("assistant", reply, None)]
            )
            await self.sessions.update(
                session_id, lambda s: s.with_state(turns=s.state["turns"] + 1)
            )
            return reply
