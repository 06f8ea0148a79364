"""Repeat keys stay distinct when several workers allocate at once (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

STUDY, SUBJECT, FORM = "CV01", "001-0001", "F.MH"


def run_threads(*targets: Callable[[], None], timeout: float = 60) -> None:
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # reported in the test thread
                errors.append(exc)

        return run

    threads = [threading.Thread(target=guarded(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a worker is stuck"
    if errors:
        raise errors[0]


def test_two_threads_allocating_at_once_get_distinct_keys(store):
    rounds = 15
    start = threading.Barrier(2)
    got: dict[str, dict[str, int]] = {"a": {}, "b": {}}

    def worker(name: str) -> Callable[[], None]:
        def run() -> None:
            start.wait(10)
            for n in range(rounds):
                # one record only this worker sees, one both see (the same source in two messages)
                for identity in (f"urn:h|{name}-{n}", f"urn:h|shared-{n}"):
                    with store.uow() as uow:
                        got[name][identity] = uow.repeat_keys.key_for(STUDY, SUBJECT, FORM, identity)
                        uow.commit()

        return run

    run_threads(worker("a"), worker("b"))

    for n in range(rounds):  # both saw the same key for the same record
        assert got["a"][f"urn:h|shared-{n}"] == got["b"][f"urn:h|shared-{n}"]
    by_identity = got["a"] | got["b"]
    assert len(by_identity) == 3 * rounds
    assert sorted(by_identity.values()) == list(range(1, 3 * rounds + 1))  # distinct, no gaps
    with store.uow() as uow:
        assert {i: uow.repeat_keys.key_for(STUDY, SUBJECT, FORM, i) for i in by_identity} == by_identity


@pytest.mark.parametrize(
    ("b_identity", "a_commits", "expected_b"),
    [
        ("urn:h|B", True, 2),  # another record: the next key
        ("urn:h|A", True, 1),  # the same record: the same key
        ("urn:h|B", False, 1),  # the first writer rolled back: its key was never taken
    ],
)
def test_an_allocation_waits_for_the_writer_holding_a_new_key(store, b_identity, a_commits, expected_b):
    """Worker A allocates key 1 and keeps its transaction open; worker B must not hand out key 1
    to another record meanwhile. It waits (SQLite: BEGIN IMMEDIATE; PostgreSQL: the unique index),
    then settles on the right key whatever A did."""
    a_allocated = threading.Event()
    release_a = threading.Event()
    b_done = threading.Event()
    result: dict[str, int] = {}

    def worker_a() -> None:
        with store.uow() as uow:
            result["a"] = uow.repeat_keys.key_for(STUDY, SUBJECT, FORM, "urn:h|A")
            a_allocated.set()
            release_a.wait(20)
            if a_commits:
                uow.commit()

    def worker_b() -> None:
        assert a_allocated.wait(20)
        with store.uow() as uow:
            result["b"] = uow.repeat_keys.key_for(STUDY, SUBJECT, FORM, b_identity)
            uow.commit()
        b_done.set()

    def referee() -> None:
        assert a_allocated.wait(20)
        time.sleep(0.5)
        try:
            assert not b_done.is_set(), "B allocated while A still held an uncommitted key"
        finally:
            release_a.set()

    run_threads(worker_a, worker_b, referee)
    assert result == {"a": 1, "b": expected_b}
    with store.uow() as uow:
        if a_commits:
            assert uow.repeat_keys.key_for(STUDY, SUBJECT, FORM, "urn:h|A") == 1
        assert uow.repeat_keys.key_for(STUDY, SUBJECT, FORM, b_identity) == expected_b


def test_concurrent_first_seen_keeps_one_date(store):
    import datetime as dt

    start = threading.Barrier(4)
    dates: list[dt.date] = []

    def worker(day: int) -> Callable[[], None]:
        def run() -> None:
            start.wait(10)
            with store.uow() as uow:
                dates.append(uow.first_seen.first_seen(STUDY, SUBJECT, "urn:h|X", dt.date(2025, 2, day)))
                uow.commit()

        return run

    run_threads(*(worker(d) for d in (1, 2, 3, 4)))
    assert len(set(dates)) == 1
    with store.uow() as uow:
        assert uow.first_seen.first_seen(STUDY, SUBJECT, "urn:h|X", dt.date(2025, 3, 1)) == dates[0]
