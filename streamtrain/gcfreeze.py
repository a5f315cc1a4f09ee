"""The trainer's heap and the garbage collector.

A process that has loaded ``datasets``, ``pyarrow``, ``pydantic`` and ``httpx`` holds a million or so objects that
live as long as it does. Python's full collection scans them all every time (100-250 ms here, while every thread
waits): during a training run, whose own objects are short-lived, that was a fifth of the trainer's CPU.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def frozen_heap() -> Iterator[Callable[[], None]]:
    """The objects that exist when training starts (modules, the client's, the dataset's) out of the garbage
    collector's sight until it ends; objects made while training are collected as usual. Yields ``again()``, which
    freezes what was made since as well (the dataset's objects, made when it opens). Left alone when the process
    froze objects itself (``gc.freeze`` before a fork): then ``again()`` does nothing and nothing is unfrozen."""
    if gc.get_freeze_count():
        yield lambda: None
        return
    gc.freeze()
    try:
        yield gc.freeze
    finally:
        gc.unfreeze()
