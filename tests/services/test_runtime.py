"""The garbage-collector tuning of esource's long-running commands (esource.runtime.settle_heap)."""

from __future__ import annotations

import gc

from esource.runtime import GC_THRESHOLDS, settle_heap


def test_settle_heap_freezes_start_up_objects_and_raises_the_thresholds():
    before = gc.get_threshold()
    try:
        settle_heap()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] > before[0]  # fewer young collections than CPython's default
        assert gc.get_freeze_count() > 0  # what start-up built is out of the collector's sight
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
