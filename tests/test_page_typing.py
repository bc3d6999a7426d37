"""``Page`` is typed: iterating a listing gives :class:`Session` objects to mypy.

``Page.__iter__`` returned ``Any``, so ``[x.titel for x in await m.list()]`` passed
``mypy --strict`` (review of the user-asyncio app: page_any.py).
"""

from __future__ import annotations

import typing
from collections.abc import Iterator

from asyncsession import Message, Page, Session, SessionIterator, SessionManager, SessionQuery
from asyncsession.abc import SessionRepository


def test_page_methods_name_their_types() -> None:
    hints = {name: typing.get_type_hints(getattr(Page, name)) for name in ("__iter__", "__len__")}
    assert hints["__iter__"] == {"return": Iterator[Session]}
    assert hints["__len__"] == {"return": int}
    assert typing.get_type_hints(Page) == {
        "items": tuple[Session, ...],
        "next_cursor": str | None,
    }


def test_iterate_names_a_type_that_has_aclose() -> None:
    """``iterate()`` was typed ``AsyncIterator[Session]``, so ``await it.aclose()`` (the
    README's) and ``contextlib.aclosing(it)`` failed ``mypy --strict`` (session 26 note)."""
    assert typing.get_type_hints(SessionManager.iterate)["return"] is SessionIterator
    hints = {
        name: typing.get_type_hints(getattr(SessionIterator, name))
        for name in ("__anext__", "aclose")
    }
    assert hints["__anext__"]["return"] is Session
    assert hints["aclose"]["return"] is type(None)


def test_entering_a_store_or_manager_gives_its_own_type() -> None:
    """``async with SQLiteRepository(path) as repo`` typed ``repo`` as the base
    ``SessionRepository``, so ``await repo.checkpoint()`` (the README's) failed
    ``mypy --strict``, and so did the custom_store example (README review). ``__aenter__``
    returns the type of ``self``."""
    for cls in (SessionRepository, SessionManager):
        hints = typing.get_type_hints(cls.__aenter__)
        returned = hints["return"]
        assert isinstance(returned, typing.TypeVar) and hints["self"] is returned
        bound = returned.__bound__  # a forward reference to the class itself
        assert isinstance(bound, typing.ForwardRef) and bound.__forward_arg__ == cls.__name__


def test_model_constructors_name_their_argument_types() -> None:
    """The converters of the public models' fields were typed ``object`` or ``Any``, so
    ``mypy --strict`` accepted ``Session(owner=123, status=42, state=[1])``,
    ``Message(role=5, content=None)`` and ``SessionQuery(owner=1, search=3)``, which all
    fail at run time (API review). attrs (and its mypy plugin) type ``__init__`` by the
    converters' parameters: these say what each field takes."""
    from asyncsession.reporting import SessionReport

    def init(cls: type) -> dict[str, str]:
        hints = dict(cls.__init__.__annotations__)
        del hints["return"]
        return hints

    assert init(Message) == {
        "role": "str",
        "content": "str",
        "timestamp": "datetime",
        "data": "object",  # any JSON value
    }
    assert init(Session) == {
        "id": "uuid.UUID | str",
        "created_at": "datetime",
        "last_active": "datetime",
        "owner": "str | None",
        "name": "str | None",
        "status": "SessionStatus | str",
        "closed_at": "datetime | None",
        "expires_at": "datetime | None",
        "messages": "Iterable[Message] | None",
        "state": "Mapping[str, Any] | None",
        "errors": "int",
        "revision": "int",
    }
    assert init(SessionQuery) == {
        "owner": "str | None",
        "status": "SessionStatus | str | Iterable[SessionStatus | str] | None",
        "search": "str | None",
        "limit": "int",
        "cursor": "str | None",
        "visible_at": "datetime | None",
    }
    assert init(SessionReport) == {
        "session_id": "uuid.UUID",
        "owner": "str | None",
        "status": "SessionStatus | str",
        "started_at": "datetime",
        "ended_at": "datetime",
        "errors": "int",
        "attributes": "Mapping[str, Any] | None",
    }
