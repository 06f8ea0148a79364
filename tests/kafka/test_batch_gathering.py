"""How a Kafka poll becomes a batch (no broker needed: a consumer that hands out one record per poll,
as a steady stream does): lingering is counted from the previous batch, so the time a batch took to
process is not added to every record's wait again."""

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


def _intake(linger_ms: int) -> KafkaIntake:
    settings = KafkaSettings(bootstrap="127.0.0.1:9", batch_linger_ms=linger_ms, batch_max_records=10_000)
    return KafkaIntake(SimpleNamespace(settings=SimpleNamespace(kafka=settings)), settings)


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
