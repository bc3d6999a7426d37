"""Helpers for testing code that uses asyncsession, and for testing new stores.

Not imported by ``import asyncsession``; importing it does not import pytest.

* :class:`ManualClock` — pass it as ``SessionManager(..., clock=clock)`` and call
  ``clock.advance(seconds)`` to expire sessions without sleeping.
* :class:`RepositoryContract` — subclass it in a pytest module, provide a ``repository``
  fixture yielding an open store, and every contract test runs against your store.
  Override its ``replace_document()`` hook to run the tests of old and damaged stored
  documents too (they are skipped otherwise).
"""

from ._clock import ManualClock as ManualClock
from ._contract import RepositoryContract as RepositoryContract

__all__ = ["ManualClock", "RepositoryContract"]
