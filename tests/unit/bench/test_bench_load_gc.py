"""The open-loop generator records its own collector pauses (so a tail can be checked
against them)."""

from __future__ import annotations

import gc

from bench.load import _gc_pauses


def test_a_collection_inside_the_block_is_recorded_with_its_generation() -> None:
    callbacks = len(gc.callbacks)
    with _gc_pauses() as pauses:
        assert len(gc.callbacks) == callbacks + 1
        gc.collect(0)
        gc.collect()
    assert [g for g, _ in pauses][-2:] == [0, 2]
    assert all(0 <= seconds < 5 for _, seconds in pauses)
    assert len(gc.callbacks) == callbacks


def test_collections_after_the_block_are_not_recorded() -> None:
    with _gc_pauses() as pauses:
        pass
    gc.collect()
    assert pauses == []
