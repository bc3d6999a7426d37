"""``python -m asyncsession`` and the ``asyncsession`` console script.

The command line lives in :mod:`asyncsession._cli` and needs the ``cli`` extra
(click and rich). Without it this prints one line saying how to install it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

_EXTRA_PACKAGES = ("click", "rich")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    try:
        from ._cli import run
    except ImportError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in _EXTRA_PACKAGES:
            raise
        sys.stderr.write(
            f"asyncsession: the command line needs the {missing!r} package; install it "
            "with `pip install 'asyncsession[cli]'`.\n"
        )
        return 2
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
