"""Lazy message logs: raw stored items decoded on first access (``MessageLog._lazy``)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import messages as message_strategy

import asyncsession as s
from asyncsession._models import MessageLog
from asyncsession._serialization import dump_message, load_message

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
SID = uuid.uuid4()


def msg(i: int) -> s.Message:
    return s.Message("user" if i % 2 else "assistant", f"message {i}", T0 + timedelta(seconds=i))


class CountingDecoder:
    """``load_message`` that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, raw: bytes) -> s.Message:
        with self.lock:
            self.calls += 1
        return load_message(raw)


def lazy(
    items: list[s.Message], offset: int = 0, decode: Callable[[Any], s.Message] = load_message
) -> MessageLog:
    return MessageLog._lazy([dump_message(m) for m in items], decode, offset, session_id=SID)


def test_lazy_log_behaves_like_an_eager_one() -> None:
    items = [msg(i) for i in range(6)]
    eager = MessageLog(items, offset=3)
    log = lazy(items, offset=3)
    assert repr(log) == repr(eager) == "MessageLog(6 messages, offset=3)"
    assert (len(log), log.total, log.offset, log.is_complete) == (6, 9, 3, False)
    assert log[0] == items[0] and log[-1] == items[-1] and log[-6] == items[0]
    for bad in (6, -7):
        with pytest.raises(IndexError):
            log[bad]
    assert log[1:4] == tuple(items[1:4]) and log[::-2] == tuple(items[::-2])
    assert list(reversed(log)) == items[::-1]
    assert list(log) == items
    assert log == eager and eager == log and hash(log) == hash(eager)
    complete = lazy(items)
    assert complete == items and complete == tuple(items) and complete != items[:-1]
    assert items[2] in complete and complete.index(items[3]) == 3


def test_each_item_is_decoded_once_and_replaced() -> None:
    decoder = CountingDecoder()
    log = lazy([msg(i) for i in range(5)], decode=decoder)
    assert repr(log) == "MessageLog(5 messages)" and len(log) == 5 and decoder.calls == 0
    first = log[2]
    assert log[2] is first and decoder.calls == 1
    assert log.tail(3)[0] is first and decoder.calls == 1  # windows share the storage
    assert list(log) == [msg(i) for i in range(5)] and decoder.calls == 5
    assert list(log) == list(log.tail(5)) and decoder.calls == 5


def test_appends_to_a_lazy_log() -> None:
    decoder = CountingDecoder()
    base = lazy([msg(i) for i in range(3)], decode=decoder)
    grown = base.append(msg(3))
    assert decoder.calls == 0 and len(base) == 3 and len(grown) == 4
    assert grown.added_since(base) == (msg(3),) and decoder.calls == 0
    fork = base.extend([msg(7), msg(8)])  # base is no longer the tip: a copy
    assert list(fork) == [msg(0), msg(1), msg(2), msg(7), msg(8)]
    assert list(grown) == [msg(i) for i in range(4)]
    assert fork.added_since(grown) is None and grown.added_since(fork) is None
    assert list(base) == [msg(i) for i in range(3)]
    copy = lazy([msg(i) for i in range(3)])  # equal, but storage not shared
    assert grown.added_since(copy) == (msg(3),)
    with pytest.raises(TypeError):
        base.append("not a message")  # type: ignore[arg-type]


def test_a_corrupt_item_raises_when_accessed() -> None:
    raw = [dump_message(msg(0)), b'{"role": "wizard"}', b"not json", dump_message(msg(3))]
    log = MessageLog._lazy(raw, load_message, session_id=SID)
    assert len(log) == 4 and log[0] == msg(0) and log[3] == msg(3)
    for access in (
        lambda: log[1],
        lambda: log[-2],
        lambda: list(log),
        lambda: log[1:3],
        lambda: hash(log),
        lambda: log == MessageLog([msg(0)] * 4),
    ):
        with pytest.raises(s.CorruptSessionError) as info:
            access()
        assert info.value.session_id == SID
    with pytest.raises(s.CorruptSessionError) as info:
        log[2]
    assert info.value.session_id == SID and "invalid message" in info.value.detail
    assert log.tail(1)[0] == msg(3)


def test_decoder_errors_become_corrupt_session_errors() -> None:
    def decode(raw: Any) -> s.Message:
        if raw == "key":
            raise KeyError("role")
        if raw == "session":
            raise s.InvalidRole("wizard", s.ROLES)
        return raw  # type: ignore[no-any-return]

    log = MessageLog._lazy(["key", "session", "other"], decode, session_id=SID)
    for i in range(2):
        with pytest.raises(s.CorruptSessionError) as info:
            log[i]
        assert info.value.session_id == SID
    with pytest.raises(TypeError):
        log[2]  # a decoder that returns no Message is a bug, not corrupt data
    with pytest.raises(ValueError):
        MessageLog._lazy([], load_message, -1)
    empty = MessageLog._lazy([], load_message)
    assert empty == MessageLog() and list(empty) == [] and empty.append(msg(1)) == [msg(1)]


def test_sessions_with_lazy_logs_serialize_and_compare() -> None:
    items = [msg(i) for i in range(4)]
    eager = s.Session(SID, T0, T0, messages=items)
    session = s.Session(SID, T0, T0, messages=lazy(items))
    assert type(session.messages) is MessageLog and len(session.messages) == 4
    assert s.dumps(session) == s.dumps(eager)
    assert s.loads(s.dumps(session)) == eager == session
    grown = session.with_message("user", "more", timestamp=T0)
    assert grown.messages.added_since(session.messages) == (grown.messages[-1],)


def test_concurrent_readers_decode_safely() -> None:
    decoder = CountingDecoder()
    n = 2000
    log = lazy([msg(i) for i in range(n)], decode=decoder)
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def read(reverse: bool) -> None:
        try:
            barrier.wait()
            got = list(reversed(log)) if reverse else list(log)
            assert got == [msg(i) for i in (range(n - 1, -1, -1) if reverse else range(n))]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(i % 2 == 1,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert n <= decoder.calls <= 4 * n
    assert list(log) == [msg(i) for i in range(n)]


# -- a lazy log against an eager one under random operations ----------------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 30), message_strategy),
        st.tuples(st.just("extend"), st.integers(0, 30), st.lists(message_strategy, max_size=3)),
        st.tuples(st.just("tail"), st.integers(0, 30), st.integers(-1, 12)),
        st.tuples(st.just("index"), st.integers(0, 30), st.integers(-15, 15)),
        st.tuples(
            st.just("slice"),
            st.integers(0, 30),
            st.tuples(
                st.none() | st.integers(-15, 15),
                st.none() | st.integers(-15, 15),
                st.none() | st.integers(-3, 3).filter(bool),
            ),
        ),
        st.tuples(st.just("iterate"), st.integers(0, 30), st.booleans()),
        st.tuples(st.just("compare"), st.integers(0, 30), st.integers(0, 30)),
    ),
    max_size=40,
)


def observe(fn: Callable[[], Any]) -> Any:
    try:
        return ("ok", fn())
    except (IndexError, ValueError) as exc:
        return ("error", type(exc))


def observe_hash(log: MessageLog) -> Any:
    try:
        return hash(log)
    except TypeError:  # unhashable message data
        return TypeError


@settings(max_examples=150, deadline=None)
@given(
    st.lists(message_strategy, max_size=12),
    st.integers(0, 5),
    operations,
)
def test_lazy_and_eager_logs_agree(
    start: list[s.Message], offset: int, ops: list[tuple[Any, ...]]
) -> None:
    eager = [MessageLog(start, offset=offset)]
    lazies = [lazy(start, offset)]
    for op, pick, arg in ops:
        a, b = eager[pick % len(eager)], lazies[pick % len(lazies)]
        if op == "append":
            eager.append(a.append(arg))
            lazies.append(b.append(arg))
        elif op == "extend":
            eager.append(a.extend(arg))
            lazies.append(b.extend(arg))
        elif op == "tail":
            eager.append(a.tail(arg))
            lazies.append(b.tail(arg))
        elif op == "index":
            assert observe(lambda: b[arg]) == observe(lambda: a[arg])  # noqa: B023
        elif op == "slice":
            window = slice(*arg)
            assert observe(lambda: b[window]) == observe(lambda: a[window])  # noqa: B023
        elif op == "iterate":
            assert (list(reversed(b)) if arg else list(b)) == (
                list(reversed(a)) if arg else list(a)
            )
        else:
            other = arg % len(eager)
            assert (b == lazies[other]) == (a == eager[other])
            assert b.added_since(lazies[other]) == a.added_since(eager[other])
    for a, b in zip(eager, lazies, strict=True):
        assert (len(b), b.total, b.offset, b.is_complete, repr(b)) == (
            len(a),
            a.total,
            a.offset,
            a.is_complete,
            repr(a),
        )
        assert b == a and list(b) == list(a)
        assert observe_hash(b) == observe_hash(a)
        assert b == tuple(a) if a.is_complete else b != tuple(a)
