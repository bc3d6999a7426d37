"""Store URLs: one grammar for the CLI, the examples and applications."""

from __future__ import annotations

import urllib.parse

from ._exceptions import InvalidConfiguration
from .abc import SessionRepository

__all__ = ["STORE_URL_FORMS", "repository_from_url"]

#: The accepted forms, for help texts and error messages.
STORE_URL_FORMS = (
    "sqlite:///relative.db, sqlite:////absolute.db, file:///absolute/dir, "
    "file://./relative/dir, redis://host:port/0[?prefix=app:], memory://"
)


def repository_from_url(url: str) -> SessionRepository:
    """Build the (unopened) store a URL names.

    * ``sqlite:///relative.db`` or ``sqlite:////absolute/path.db`` (SQLAlchemy style),
    * ``file:///absolute/dir`` or ``file://./relative/dir``,
    * ``redis://host:port/db`` (also ``rediss://``, ``unix://``), with an optional
      ``?prefix=app:`` for the key prefix,
    * ``memory://``.

    Raises :class:`InvalidConfiguration` for anything else, and ImportError (saying what
    to install) for a Redis URL without the ``redis`` extra.
    """
    from .stores.files import FileRepository
    from .stores.memory import MemoryRepository
    from .stores.sqlite import SQLiteRepository

    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    bad = InvalidConfiguration(f"Invalid store URL {url!r}; use one of: {STORE_URL_FORMS}.")
    if not sep:
        raise bad
    if scheme == "sqlite":
        if not rest.startswith("/") or len(rest) < 2:
            raise bad
        return SQLiteRepository(rest[1:])
    if scheme == "file":
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
        if not rest.startswith(("/", "./", "../")) or rest in ("/", "./", "../"):
            raise bad
        return FileRepository(rest)
    if scheme == "memory":
        if rest not in ("", "/"):
            raise bad
        return MemoryRepository()
    if scheme in ("redis", "rediss", "unix"):
        from .stores.redis import RedisRepository

        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parts.query)
        prefix = query.pop("prefix", ["asyncsession:"])[-1]
        plain = parts._replace(query=urllib.parse.urlencode(query, doseq=True)).geturl()
        return RedisRepository(plain, prefix=prefix)
    raise bad
