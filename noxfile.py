"""Development sessions: `nox` runs tests (every Python found), lint and typecheck."""

from __future__ import annotations

import re
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.error_on_missing_interpreters = False
nox.options.reuse_existing_virtualenvs = True

PYPROJECT = Path(__file__).parent / "pyproject.toml"
PYTHONS = re.findall(
    r'"Programming Language :: Python :: (3\.\d+)"', PYPROJECT.read_text(encoding="utf-8")
)


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The full test suite, asyncio and trio, every store."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=PYTHONS[0], default=False)
def lowest(session: nox.Session) -> None:
    """The test suite on the oldest releases pyproject.toml allows (its floors hold)."""
    session.install("uv")
    session.run(
        "uv", "pip", "install", "--python", session.virtualenv.location,
        "--resolution", "lowest-direct", "-e", ".[test]",
    )  # fmt: skip
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package and on the examples (as users' code)."""
    session.install("-e", ".[typecheck]")
    session.run("mypy", "--strict", "asyncsession")
    # one run per example suite: each has its own conftest.py
    for target in (
        "examples/quickstart.py",
        "examples/agent_loop.py",
        "examples/openai_agents_session.py",
        "examples/chat_server.py",
        "examples/websocket_gateway.py",
        "examples/custom_store",
        "examples/pytest_anyio_suite",
        "examples/pytest_asyncio_suite",
    ):
        session.run("mypy", "--strict", target)


@nox.session(default=False)
def benchmarks(session: nox.Session) -> None:
    """Performance figures (minutes; prints tables, see benchmarks/README.md)."""
    session.install("-e", ".[test]", "matplotlib")
    session.run("python", "benchmarks/bench_core.py", *session.posargs)
