"""The serving process freezes its heap (full collections then skip the startup objects) and
a reload lets go of what the previous freeze held."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from extproc.server import YOUNG_THRESHOLD, freeze_heap, refreeze_heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector can free it


@pytest.fixture
def thawed() -> Iterator[None]:
    gc.unfreeze()
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()  # the rest of the test session keeps the default collector
    gc.set_threshold(*thresholds)


def test_frozen_objects_are_out_of_the_collectors_reach(thawed: None) -> None:
    node = _Node()
    ref = weakref.ref(node)
    freeze_heap()
    assert gc.get_freeze_count() > 0
    del node
    gc.collect()
    assert ref() is not None  # a frozen cycle is not walked, so not freed
    refreeze_heap()
    assert ref() is None  # the reload's thaw collected it
    assert gc.get_freeze_count() > 0  # and froze the new state


def test_frozen_objects_without_cycles_are_still_freed(thawed: None) -> None:
    box = _Box(["x" * 10])
    ref = weakref.ref(box)
    freeze_heap()
    del box
    assert ref() is None  # reference counting frees it at once, frozen or not


def test_the_young_generation_waits_for_the_heap_to_grow(thawed: None) -> None:
    """Past Python's 700 young objects the streams in flight alone set off collections at
    saturation; the serving process waits for 5,000, the older generations as Python has
    them."""
    older = gc.get_threshold()[1:]
    freeze_heap()
    assert gc.get_threshold() == (YOUNG_THRESHOLD, *older)
    before = gc.get_count()[0]
    keep = [[] for _ in range(2_000)]  # would have set off a young collection at 700
    assert gc.get_count()[0] >= before + 2_000 - 10
    del keep


class _Box:
    def __init__(self, value: object) -> None:
        self.value = value
