"""How a Kafka poll becomes a batch (no broker needed: a consumer that hands out one record per poll,
as a steady stream does, or a backlog a fetch at a time): lingering is counted from the previous
batch, so the time a batch took to process is not added to every record's wait again; past the
linger, a backlog still fills the batch."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from esource.adapters.kafka import KafkaIntake
from esource.settings import KafkaSettings

TP = ("ehr.fhir.updates", 0)


class Stream:
    """A record every `every` seconds, whenever polled (poll blocks up to its timeout for one)."""

    def __init__(self, every: float = 0.01) -> None:
        self.every = every
        self.offset = 0
        self.polls = 0

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, list[Any]]:
        self.polls += 1
        time.sleep(min(self.every, timeout_ms / 1000))
        self.offset += 1
        return {TP: [SimpleNamespace(offset=self.offset)]}


    def highwater(self, tp: Any) -> int:
        return self.offset  # a stream: nothing produced beyond what was handed out

    def position(self, tp: Any, timeout_ms: int = 0) -> int:
        return self.offset

    def paused(self) -> set[Any]:
        return set()


class Backlog:
    """`size` records waiting at the broker; a poll hands out what one fetch brings (`per_fetch`),
    as kafka-python does after a long batch. Partitions in `paused` hand out nothing."""

    def __init__(self, size: int, per_fetch: int = 300) -> None:
        self.size, self.per_fetch, self.offset, self.polls = size, per_fetch, 0, 0
        self.paused_tps: set[Any] = set()

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, list[Any]]:
        self.polls += 1
        n = min(self.per_fetch, max_records or self.per_fetch, self.size - self.offset)
        if TP in self.paused_tps or n <= 0:
            time.sleep(timeout_ms / 1000)
            return {}
        records = [SimpleNamespace(offset=self.offset + i) for i in range(n)]
        self.offset += n
        return {TP: records}

    def highwater(self, tp: Any) -> int:
        return self.size

    def position(self, tp: Any, timeout_ms: int = 0) -> int:
        return self.offset

    def paused(self) -> set[Any]:
        return set(self.paused_tps)


def _intake(linger_ms: int, batch_max_records: int = 10_000) -> KafkaIntake:
    settings = KafkaSettings(bootstrap="127.0.0.1:9", batch_linger_ms=linger_ms, batch_max_records=batch_max_records)
    intake = KafkaIntake(SimpleNamespace(settings=SimpleNamespace(kafka=settings)), settings)
    intake._assigned = frozenset({TP})
    return intake


def _size(batch: dict[Any, list[Any]]) -> int:
    return sum(len(v) for v in batch.values())


def test_a_batch_gathers_for_the_linger_then_processing_time_counts_as_lingering():
    intake, stream = _intake(linger_ms=300), Stream()
    first = intake._poll_batch(stream, 1000)
    assert _size(first) > 5, "a trickle is gathered into a batch for up to the linger time"
    time.sleep(0.4)  # the batch takes longer to process than the linger: what came meanwhile goes at once
    polls = stream.polls
    second = intake._poll_batch(stream, 1000)
    assert stream.polls - polls == 1 and _size(second) == 1
    third = intake._poll_batch(stream, 1000)  # then batching resumes
    assert _size(third) > 5


def test_no_linger_means_one_poll_per_batch():
    intake, stream = _intake(linger_ms=0), Stream()
    assert [_size(intake._poll_batch(stream, 1000)) for _ in range(3)] == [1, 1, 1]
    assert stream.polls == 3


def test_past_the_linger_a_backlog_still_fills_the_batch():
    intake, backlog = _intake(linger_ms=50, batch_max_records=2000), Backlog(5000)
    assert _size(intake._poll_batch(backlog, 1000)) == 2000
    time.sleep(0.1)  # the batch took longer than the linger: before, the next batch was one fetch (300)
    assert _size(intake._poll_batch(backlog, 1000)) == 2000
    assert _size(intake._poll_batch(backlog, 1000)) == 1000  # the rest, then no wait for more
    started = time.monotonic()
    assert _size(intake._poll_batch(backlog, 10)) == 0 and time.monotonic() - started < 0.5


def test_a_paused_partition_is_no_backlog():
    intake, backlog = _intake(linger_ms=0, batch_max_records=2000), Backlog(5000)
    assert _size(intake._poll_batch(backlog, 1000)) == 2000  # (linger 0: polling goes on for the backlog)
    backlog.paused_tps.add(TP)  # backing off after a failure: its records are not handed out
    polls, started = backlog.polls, time.monotonic()
    assert _size(intake._poll_batch(backlog, 1)) == 0
    assert backlog.polls - polls == 1 and time.monotonic() - started < 0.5
