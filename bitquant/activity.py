"""What the library is doing right now, for whoever shows progress.

Long steps without a count of their own (loading a model, preparing the embedded model,
checking, writing the report) announce themselves with :func:`step`; the command line
registers a listener (:func:`listening`) that shows the step and, while nothing else is
printed, how long it has been running. Steps that have a count report it through the
progress callbacks of each pipeline instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

_listeners: list[Callable[[str], None]] = []


def step(label: str) -> None:
    """Announce the step now starting (e.g. ``"loading the teacher"``)."""
    for listener in list(_listeners):
        listener(label)


@contextmanager
def listening(listener: Callable[[str], None]) -> Iterator[None]:
    """Call ``listener(label)`` for every step announced inside the block."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)
