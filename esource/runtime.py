"""Process-wide tuning shared by esource's long-running commands (serve, ingest, demo, sandbox EDC)."""

from __future__ import annotations

#: Allocations (net, of container objects) between two young-generation collections; CPython's
#: default is 700. Then one middle-generation collection every 20 young ones and one full collection
#: every 10 middle ones (CPython: 10 and 10).
GC_THRESHOLDS = (50_000, 20, 10)


def settle_heap() -> None:
    """Tune the cyclic garbage collector for a process that maps batches. Why: a Kafka batch keeps
    its facts, mapped items, audit rows and ODM elements alive until it commits (hundreds of thousands
    of objects), and with CPython's default thresholds every 700 net allocations start a collection
    that walks the young objects, the middle ones every 7,000, the whole heap every 70,000: measured
    in-process, 3,000 events took 15.5 s of which 3.2 s were collections (1.8 s in twelve full ones).
    Almost everything esource allocates is freed by reference counting, so collections find little;
    with these thresholds the same run spent 0.4 s in them.

    And first, move what start-up built (studies, terminology, compiled paths, models: a few hundred
    thousand objects) out of the collector's sight (`gc.freeze`): a full collection walks every
    tracked object, about 0.1 s holding the interpreter here. These objects live as long as the
    process. Memory stays bounded: cyclic garbage waits for at most one young collection (or, when
    it outlived one, for the middle collection)."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
