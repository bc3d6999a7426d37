"""SQLiteRepository's message rows: chunks, windows, damaged rows, cached documents."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import attrs
import pytest

from asyncsession import CorruptSessionError
from asyncsession.stores.sqlite import CHUNK_MESSAGES, SQLiteRepository
from asyncsession.testing._contract import POLICY, at, make_session, msg

K = CHUNK_MESSAGES


def rows(path: Path, session_id: object) -> list[tuple[int, int]]:
    """``(seq, messages in the row)`` of a session's message rows, in order."""
    conn = sqlite3.connect(path)
    try:
        return [
            (seq, body.count(b"\n") + 1)
            for seq, body in conn.execute(
                "SELECT seq, body FROM messages WHERE session_pk = "
                "(SELECT pk FROM sessions WHERE id = ?) ORDER BY seq",
                (str(session_id),),
            )
        ]
    finally:
        conn.close()


def check_layout(layout: list[tuple[int, int]], total: int) -> None:
    """Full chunks below the last multiple of K, contiguous rows, nothing missing."""
    sealed = total - total % K
    position = 0
    for seq, n in layout:
        assert seq == position
        if seq < sealed:
            assert seq % K == 0 and n == K
        position += n
    assert position == total


async def test_appends_merge_into_chunks_and_every_window_reads_right(
    tmp_path: Path, anyio_backend: str
) -> None:
    db = tmp_path / "s.db"
    session = make_session(messages=("m0", "m1", "m2"))
    contents = ["m0", "m1", "m2"]
    async with SQLiteRepository(db) as repo:
        await repo.add(session)
        # Batches of different sizes, some crossing one or two chunk boundaries.
        for size in (1, 1, 5, K - 3, 1, 2 * K + 7, 1, 1, K, 3):
            batch = [msg(f"m{len(contents) + i}", 1) for i in range(size)]
            appended = await repo.append(session.id, batch, at=at(1), policy=POLICY)
            contents += [m.content for m in batch]
            assert [m.content for m in appended.messages] == [m.content for m in batch]
            assert appended.messages.total == len(contents)
            check_layout(rows(db, session.id), len(contents))
        total = len(contents)
        assert len(rows(db, session.id)) < total // K + K  # chunks, not one row each
        whole = await repo.get(session.id)
        assert whole is not None and [m.content for m in whole.messages] == contents
        for n in (0, 1, 2, K - 1, K, K + 1, 2 * K + 3, total - 1, total, total + 5):
            window = await repo.get(session.id, last_messages=n)
            assert window is not None
            assert window.messages.total == total
            assert window.messages.offset == max(0, total - n)
            assert [m.content for m in window.messages] == contents[max(0, total - n) :]
            touched = await repo.touch(session.id, at=at(2), policy=POLICY, last_messages=n)
            assert touched is not None and list(touched.messages) == list(window.messages)


async def test_add_and_full_save_write_chunks(tmp_path: Path, anyio_backend: str) -> None:
    db = tmp_path / "s.db"
    texts = tuple(f"t{i}" for i in range(3 * K + 4))
    session = make_session(messages=texts)
    async with SQLiteRepository(db) as repo:
        await repo.add(session)
        assert rows(db, session.id) == [(0, K), (K, K), (2 * K, K), (3 * K, 4)]
        assert await repo.get(session.id) == session
        shorter = attrs.evolve(
            session, messages=session.messages[: K + 1], revision=session.revision + 1
        )
        await repo.save(shorter, expected_revision=session.revision)
        assert rows(db, session.id) == [(0, K), (K, 1)]
        assert await repo.get(session.id) == shorter


async def test_last_messages_do_not_read_earlier_rows(tmp_path: Path, anyio_backend: str) -> None:
    db = tmp_path / "s.db"
    session = make_session(messages=tuple(f"m{i}" for i in range(2 * K + 5)))
    async with SQLiteRepository(db) as repo:
        await repo.add(session)
        conn = sqlite3.connect(db)
        conn.execute(  # lose the first chunk: only reads that need it may notice
            "DELETE FROM messages WHERE seq = 0 AND session_pk = "
            "(SELECT pk FROM sessions WHERE id = ?)",
            (str(session.id),),
        )
        conn.commit()
        conn.close()
        window = await repo.get(session.id, last_messages=K + 5)
        assert window is not None
        assert [m.content for m in window.messages] == [f"m{i}" for i in range(K, 2 * K + 5)]
        with pytest.raises(CorruptSessionError, match="message rows") as info:
            await repo.get(session.id, last_messages=K + 6)
        assert info.value.session_id == session.id
        with pytest.raises(CorruptSessionError):
            await repo.get(session.id)
        # Appending still works (the damaged rows are left alone, reads report them).
        appended = await repo.append(session.id, [msg("more", 1)], at=at(1), policy=POLICY)
        assert appended.messages.total == 2 * K + 6


async def test_cached_documents_give_fresh_hot_fields(tmp_path: Path, anyio_backend: str) -> None:
    """Reads reuse decoded documents; the columns still decide the changing fields."""
    async with SQLiteRepository(tmp_path / "s.db") as repo:
        session = make_session(messages=("a",))
        await repo.add(session)
        first = await repo.get(session.id)
        appended = await repo.append(session.id, [msg("b", 3)], at=at(3), policy=POLICY)
        second = await repo.get(session.id)
        assert first == session
        assert second is not None and second == attrs.evolve(
            session,
            last_active=at(3),
            expires_at=at(63),
            revision=session.revision + 1,
            messages=[*session.messages, msg("b", 3)],
        )
        assert appended == attrs.evolve(second, messages=appended.messages)
        renamed = attrs.evolve(second, name="other", revision=second.revision + 1)
        await repo.save(renamed, expected_revision=second.revision, new_messages=())
        assert await repo.get(session.id) == renamed
        assert first == session  # earlier snapshots never change


async def test_a_row_with_the_wrong_message_count_fails_on_access(
    tmp_path: Path, anyio_backend: str
) -> None:
    db = tmp_path / "s.db"
    session = make_session(messages=tuple(f"m{i}" for i in range(2 * K)))
    async with SQLiteRepository(db) as repo:
        await repo.add(session)
        conn = sqlite3.connect(db)
        pk, body = conn.execute(
            "SELECT session_pk, body FROM messages WHERE seq = 0 AND session_pk = "
            "(SELECT pk FROM sessions WHERE id = ?)",
            (str(session.id),),
        ).fetchone()
        conn.execute(  # the first chunk loses its last message
            "UPDATE messages SET body = ? WHERE session_pk = ? AND seq = 0",
            (body.rsplit(b"\n", 1)[0], pk),
        )
        conn.commit()
        conn.close()
        loaded = await repo.get(session.id)
        assert loaded is not None and loaded.messages.total == 2 * K
        assert loaded.messages[K].content == f"m{K}"  # other rows stay readable
        with pytest.raises(CorruptSessionError, match=f"holds {K - 1} messages") as info:
            loaded.messages[0]
        assert info.value.session_id == session.id
