"""``Page`` is typed: iterating a listing gives :class:`Session` objects to mypy.

``Page.__iter__`` returned ``Any``, so ``[x.titel for x in await m.list()]`` passed
``mypy --strict`` (review of the user-asyncio app: page_any.py).
"""

from __future__ import annotations

import typing
from collections.abc import Iterator

from asyncsession import Page, Session, SessionManager
from asyncsession.abc import SessionRepository


def test_page_methods_name_their_types() -> None:
    hints = {name: typing.get_type_hints(getattr(Page, name)) for name in ("__iter__", "__len__")}
    assert hints["__iter__"] == {"return": Iterator[Session]}
    assert hints["__len__"] == {"return": int}
    assert typing.get_type_hints(Page) == {
        "items": tuple[Session, ...],
        "next_cursor": str | None,
    }


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
