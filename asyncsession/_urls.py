"""Store URLs: one grammar for the CLI, the examples and applications.

The path of a ``sqlite:`` or ``file:`` URL is percent-decoded (``my%20store.db`` names
``my store.db``), and those URLs take no query string or fragment: a ``?`` or ``#`` in a
file name is written ``%3F`` or ``%23``. A Redis URL goes to the Redis client as written,
less its ``prefix`` parameter; its port and database are checked here, so a malformed one
is refused with :class:`InvalidConfiguration` instead of failing later or meaning
something else.
"""

from __future__ import annotations

import re
import urllib.parse

from ._exceptions import InvalidConfiguration, SessionError
from .abc import SessionRepository

__all__ = ["STORE_URL_FORMS", "repository_from_url"]

#: The accepted forms, for help texts and error messages.
STORE_URL_FORMS = (
    "sqlite:///relative.db, sqlite:////absolute.db, file:///absolute/dir, "
    "file://./relative/dir, redis://host:port/0[?prefix=app:], "
    "unix:///path/to/redis.sock[?db=0&prefix=app:], memory://"
)

_DEFAULT_PREFIX = "asyncsession:"
_DB_PATH = re.compile(r"/?|/[0-9]+/?")
_DIGITS = re.compile(r"[0-9]+")
_ENCODING_HINT = (
    "percent-encode '@', ':', '/', '?' and '#' in a user name or password (%40, %3A, %2F, %3F, %23)"
)


def shown_url(url: str) -> str:
    """``url`` for a message, with the user information's password masked.

    Everything between ``://`` and the last ``@`` is user information here, whatever its
    characters: an unencoded password may hold ``/``, ``?``, ``#`` or ``@``. The user name
    (up to the first ``:``) is kept when it holds none of those.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, hostport = rest.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    if not colon or any(c in user for c in "/?#"):
        return f"{scheme}{sep}***@{hostport}"
    return f"{scheme}{sep}{user}:***@{hostport}"


def _shown(url: str) -> str:
    """``url`` for a message: quoted, with the password (if any) masked."""
    return repr(shown_url(url))


def _local_path(url: str, path: str) -> str:
    """The percent-decoded file system path of a ``sqlite:``/``file:`` URL's ``path``."""
    if "?" in path or "#" in path:
        raise InvalidConfiguration(
            f"Invalid store URL {url!r}: sqlite: and file: URLs take no query string or "
            "fragment. Write a '?' in a file name as %3F and a '#' as %23."
        )
    try:
        decoded = urllib.parse.unquote(path, errors="strict")
    except UnicodeDecodeError:
        raise InvalidConfiguration(
            f"Invalid store URL {url!r}: its percent-escapes are not UTF-8 text. "
            "Percent-encode the path's UTF-8 bytes (a space is %20)."
        ) from None
    if "\x00" in decoded:
        raise InvalidConfiguration(
            f"Invalid store URL {url!r}: a path cannot contain a NUL character (%00)."
        )
    return decoded


def _split_prefix(url: str) -> tuple[str, str]:
    """``url`` without its ``prefix`` query parameter, and the prefix.

    Only the ``prefix=...`` items of the raw query string are removed; everything else
    stays exactly as written (``urlunsplit`` would, for one, drop the empty authority of
    ``unix:///path``). The prefix is percent-decoded as a query value (``+`` is a space);
    a blank one is kept, so the store refuses it.
    """
    head, hash_sign, fragment = url.partition("#")
    base, question_mark, query = head.partition("?")
    kept: list[str] = []
    prefixes: list[str] = []
    for item in query.split("&") if query else []:
        name, _, value = item.partition("=")
        if urllib.parse.unquote_plus(name) == "prefix":
            prefixes.append(urllib.parse.unquote_plus(value))
        else:
            kept.append(item)
    if len(prefixes) > 1:
        raise InvalidConfiguration(
            f"Invalid Redis URL {_shown(url)}: it gives prefix {len(prefixes)} times; "
            "give ?prefix= once."
        )
    rest = "&".join(kept)
    plain = base + (question_mark + rest if rest else "") + hash_sign + fragment
    return plain, prefixes[0] if prefixes else _DEFAULT_PREFIX


def _check_redis_url(url: str, scheme: str) -> None:
    """Refuse a Redis URL whose host, port or database the client would misread."""
    shown = _shown(url)
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:  # a non-numeric port, an unclosed '[' of an IPv6 address
        # urllib's message is left out: it quotes parts of the URL, the password too
        netloc = url.partition("://")[2].partition("/")[0]
        problem = (
            "the '[' of its IPv6 address is not closed"
            if "[" in netloc.rpartition("@")[2] and "]" not in netloc
            else "its port is not a number from 1 to 65535"
        )
        raise InvalidConfiguration(
            f"Invalid Redis URL {shown}: {problem}. Write it as redis://host:6379/0 (IPv6 as "
            f"redis://[::1]:6379/0); {_ENCODING_HINT}."
        ) from None
    for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if name == "db" and not _DIGITS.fullmatch(value):
            raise InvalidConfiguration(
                f"Invalid Redis URL {shown}: db={value!r} is not a database number; use e.g. ?db=0."
            )
    if scheme == "unix":
        if parts.hostname or port is not None or not parts.path.startswith("/"):
            raise InvalidConfiguration(
                f"Invalid Redis URL {shown}: a unix:// URL names the socket by its "
                "absolute path after an empty host, as in unix:///run/redis.sock?db=0 "
                "(three slashes)."
            )
        return
    if not parts.hostname:
        raise InvalidConfiguration(
            f"Invalid Redis URL {shown}: it names no host; write it as "
            f"redis://host:6379/0; {_ENCODING_HINT}."
        )
    if port == 0:
        raise InvalidConfiguration(
            f"Invalid Redis URL {shown}: port 0; use the server's port (1 to 65535)."
        )
    if not _DB_PATH.fullmatch(parts.path):
        raise InvalidConfiguration(
            f"Invalid Redis URL {shown}: the path {parts.path!r} is not a database "
            "number; write it as redis://host:6379/0 (database 0), or leave it out."
        )
    path_db = parts.path.strip("/")
    query_dbs = [v for k, v in urllib.parse.parse_qsl(parts.query) if k == "db"]
    if path_db and any(int(v) != int(path_db) for v in query_dbs):
        raise InvalidConfiguration(
            f"Invalid Redis URL {shown}: it names database {path_db} in the path and "
            f"db={query_dbs[0]} in the query; give the database once."
        )


def repository_from_url(url: str) -> SessionRepository:
    """Build the (unopened) store a URL names.

    * ``sqlite:///relative.db`` or ``sqlite:////absolute/path.db`` (SQLAlchemy style),
    * ``file:///absolute/dir`` or ``file://./relative/dir``,
    * ``redis://host:port/db`` (also ``rediss://``), or ``unix:///path/to/redis.sock``
      with an optional ``?db=N``, each with an optional ``?prefix=app:`` for the key
      prefix,
    * ``memory://``.

    The paths of ``sqlite:`` and ``file:`` URLs are percent-decoded (``%20`` is a space);
    they take no query string or fragment (write ``?`` as ``%3F`` and ``#`` as ``%23``).

    Raises :class:`InvalidConfiguration` for anything else (a malformed port, a Redis
    path that is not a database number, an empty prefix...), and ImportError (saying
    what to install) for a Redis URL without the ``redis`` extra.
    """
    from .stores.files import FileRepository
    from .stores.memory import MemoryRepository
    from .stores.sqlite import SQLiteRepository

    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    bad = InvalidConfiguration(f"Invalid store URL {_shown(url)}; use one of: {STORE_URL_FORMS}.")
    if not sep:
        raise bad
    if scheme == "sqlite":
        if not rest.startswith("/") or len(rest) < 2:
            raise bad
        return SQLiteRepository(_local_path(url, rest[1:]))
    if scheme == "file":
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
        if not rest.startswith(("/", "./", "../")) or rest in ("/", "./", "../"):
            raise bad
        return FileRepository(_local_path(url, rest))
    if scheme == "memory":
        if rest not in ("", "/"):
            raise bad
        return MemoryRepository()
    if scheme in ("redis", "rediss", "unix"):
        from .stores.redis import RedisRepository

        # the Redis client only knows lowercase schemes (REDIS:// is redis://)
        plain, prefix = _split_prefix(scheme + url[len(scheme) :])
        _check_redis_url(plain, scheme)
        try:
            return RedisRepository(plain, prefix=prefix)
        except SessionError:
            raise
        except ValueError as exc:  # a query parameter the Redis client cannot parse
            raise InvalidConfiguration(f"Invalid Redis URL {_shown(url)}: {exc}.") from None
    raise bad
