"""Kafka intake against a real broker (tansu on loopback) and a real store (SQLite, and PostgreSQL when
ESOURCE_TEST_POSTGRES_DSN is set): processing, offset commits after the unit of work, redelivery without
a second transaction, dead letters (table + DLQ topic), store failures retried, lag, rebalance."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import orjson
import pytest
from kafka import TopicPartition
from kafka.errors import KafkaTimeoutError
from kafka.future import Future as KafkaFuture
from kafka_helpers import (
    CY_ENROLLMENT,
    CY_VALUE,
    DAY1,
    bundle,
    cy_bundle,
    group_offsets,
    mrn,
    patient,
    read_topic,
    set_group_offsets,
    subject_enrollment,
    unique,
    wait_until,
    weight_event,
)
from sqlalchemy.exc import OperationalError

from esource.adapters.kafka import (
    DLQ_INTAKE_KEY_HEADER,
    DLQ_ORIGIN_HEADER,
    DLQ_REASON_HEADER,
    KafkaIntake,
)
from esource.bootstrap import Container, build
from esource.connectors.odm_file import OdmFileConnector
from esource.observability import JsonFormatter
from esource.services.process import enroll
from esource.settings import load_settings

MAX_MESSAGE = 256 * 1024
SUBJECTS = [subject_enrollment(n) for n in (1, 2, 3)]


@pytest.fixture
def kafka_env(kafka_broker: str, topics) -> dict[str, Any]:
    topic, dlq = topics("fhir-updates", "fhir-dlq")
    return {"bootstrap": kafka_broker, "topic": topic, "dlq": dlq, "group": unique("esource")}


def make_container(store_url: str, tmp_path: Path, env: dict[str, Any], **kafka: Any) -> Container:
    cfg = {"bootstrap": env["bootstrap"], "topics": [env["topic"]], "group": env["group"], "dlq_topic": env["dlq"],
           "session_timeout_ms": 3000, "heartbeat_interval_ms": 1000, "poll_timeout_ms": 200,
           "max_message_bytes": MAX_MESSAGE}
    cfg.update(kafka)
    settings = load_settings(mode="demo", database_url=store_url, kafka=cfg)
    container = build(settings, connectors={"CV01": OdmFileConnector(tmp_path / "odm")})
    enroll(container.store.uow, [CY_ENROLLMENT, *SUBJECTS])
    return container


@pytest.fixture
def container(store_url: str, tmp_path: Path, kafka_env: dict[str, Any]) -> Iterator[Container]:
    c = make_container(store_url, tmp_path, kafka_env)
    yield c
    c.close()


@pytest.fixture
def intakes(container: Container) -> Iterator[Any]:
    """make(container=None, **kw) -> a KafkaIntake (fast retries); all stopped after the test."""
    made: list[KafkaIntake] = []

    def make(c: Container | None = None, **kw: Any) -> KafkaIntake:
        kw.setdefault("retry_initial_s", 0.05)
        kw.setdefault("retry_max_s", 0.5)
        intake = KafkaIntake(c or container, (c or container).settings.kafka, **kw)
        made.append(intake)
        return intake

    yield make
    for intake in made:
        intake.stop(10)


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """Every esource log line as the JSON formatter would write it (to check no patient data leaks)."""
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Capture(level=logging.DEBUG)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("esource")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def outbox(container: Container) -> list[Any]:
    with container.store.uow(read_only=True) as uow:
        return uow.outbox_entries(statuses=None)


def dead_letters(container: Container) -> list[Any]:
    with container.store.uow(read_only=True) as uow:
        return uow.dead_letters(channel="kafka", statuses=None)


def drain(intake: KafkaIntake, end: int, *, timeout: float = 30.0) -> None:
    """run_once until the consumer committed up to `end` (summed over its partitions)."""
    wait_until(intake.run_once, lambda: sum(intake.committed().values()) >= end and not intake.uncommitted(),
               timeout=timeout, what=f"offsets committed up to {end}")


def lag_sample(container: Container, topic: str, partition: int) -> float | None:
    return container.metrics.registry.get_sample_value("esource_kafka_consumer_lag",
                                                       {"topic": topic, "partition": str(partition)})


def counter(container: Container, name: str, **labels: str) -> float:
    return container.metrics.registry.get_sample_value(name, labels) or 0.0


def produce(producer: Any, topic: str, messages: list[tuple[bytes | None, bytes | None]],
            headers: list[tuple[str, bytes]] | None = None) -> None:
    for key, value in messages:
        producer.send(topic, key=key, value=value, headers=headers or [])
    producer.flush()


# ---------------------------------------------------------------------------------------------- tests

def test_records_reach_the_outbox_and_offsets_commit_only_after_processing(container, kafka_env, intakes,
                                                                           producer_factory, log_lines):
    topic, group, bootstrap = kafka_env["topic"], kafka_env["group"], kafka_env["bootstrap"]
    tp = TopicPartition(topic, 0)
    stranger = bundle({**patient(99), "identifier": [{"system": "http://hospital.example/mrn", "value": "MRN-NOPE"}]},
                      {"resourceType": "Observation", "id": "stranger-wt", "status": "final",
                       "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
                       "subject": {"reference": "Patient/pat-99"}, "effectiveDateTime": "2024-05-29",
                       "valueQuantity": {"value": 70, "unit": "kg", "system": "http://unitsofmeasure.org",
                                         "code": "kg"}})
    produce(producer_factory(), topic,
            [(CY_VALUE.encode(), cy_bundle()),
             (mrn(1).encode(), weight_event(1, "wt-1-w4", 81.4, DAY1 + dt.timedelta(days=28))),
             (b"MRN-NOPE", stranger)],
            headers=[("source-system", b"ehr-north"), ("event-time", b"2024-05-29T10:15:00Z")])

    intake = intakes()
    seen: list[tuple[Any, dict]] = []  # (envelope, committed offsets while the record was being ingested)
    real = container.ingest.ingest_batch

    def spy(items: list[tuple[bytes, Any]]) -> Any:
        committed = group_offsets(bootstrap, group)
        seen.extend((env, committed) for _, env in items)
        return real(items)

    container.ingest.ingest_batch = spy  # type: ignore[method-assign]
    assert group_offsets(bootstrap, group) == {}
    drain(intake, 3)

    # every record was ingested before its offset was committed
    for env, committed in seen:
        offset = int(env.key.rsplit(":", 1)[1])
        assert committed.get(tp, 0) <= offset
    assert group_offsets(bootstrap, group) == {tp: 3}
    env0 = seen[0][0]
    assert (env0.channel, env0.key, env0.origin) == ("kafka", f"{topic}:0:0", f"kafka {topic}[0]@0")
    assert env0.source_system == "ehr-north"
    assert env0.event_time == dt.datetime(2024, 5, 29, 10, 15, tzinfo=dt.timezone.utc)

    rows = outbox(container)
    assert {r.subject_key for r in rows} == {"001-0001", SUBJECTS[0].subject_key}
    assert intake.totals["processed"] == 3 and intake.totals["dead_letter"] == 0
    # the patient who is not enrolled: processed (offset committed), dropped, only counted (its
    # Patient and Observation resources)
    assert counter(container, "esource_resources_not_enrolled_total") == 2
    assert counter(container, "esource_messages_consumed_total", channel="kafka", outcome="processed") == 3
    assert lag_sample(container, topic, 0) == 0
    assert intake.lag() == {tp: 0}
    assert dead_letters(container) == []

    text = "\n".join(log_lines)
    assert "kafka batch" in text
    for secret in (CY_VALUE, mrn(1), "MRN-NOPE", "Family1"):
        assert secret not in text


def test_redelivery_after_reset_or_crash_creates_no_second_transaction(container, kafka_env, intakes,
                                                                        producer_factory):
    topic, group, bootstrap = kafka_env["topic"], kafka_env["group"], kafka_env["bootstrap"]
    tp = TopicPartition(topic, 0)
    producer = producer_factory()
    events = [(mrn(n).encode(), weight_event(n, f"wt-{n}-w4", 70 + n, DAY1 + dt.timedelta(days=28)))
              for n in (1, 2, 3)]
    produce(producer, topic, events)

    first = intakes()
    drain(first, 3)
    first.stop()
    before = outbox(container)
    assert len(before) == 3 and group_offsets(bootstrap, group) == {tp: 3}

    # 1. the group's offsets are reset to 0: a second consumer sees everything again, changes nothing
    set_group_offsets(bootstrap, group, {tp: 0})
    assert group_offsets(bootstrap, group) == {tp: 0}
    second = intakes()
    drain(second, 3)
    second.stop()
    assert second.totals["duplicate"] == 3 and second.totals["processed"] == 0
    assert outbox(container) == before
    assert group_offsets(bootstrap, group) == {tp: 3}

    # 2. a crash after the unit of work but before the commit: the next consumer replays, no effect
    produce(producer, topic, [(mrn(1).encode(), weight_event(1, "wt-1-w12", 74.2, DAY1 + dt.timedelta(days=84))),
                              (mrn(2).encode(), weight_event(2, "wt-2-w12", 75.3, DAY1 + dt.timedelta(days=84)))])
    crashing = intakes()

    class Crash(BaseException):
        pass

    def crash(_consumer: Any, offsets: dict) -> dict:
        if offsets:  # the records are processed, their offsets about to be committed
            raise Crash()
        return {}

    crashing._commit = crash  # type: ignore[method-assign]
    with pytest.raises(Crash):
        wait_until(crashing.run_once, lambda: False, timeout=30, what="the crash")
    crashing.close_without_commit()
    assert group_offsets(bootstrap, group) == {tp: 3}
    after_crash = outbox(container)
    assert len(after_crash) == 5  # the units of work committed before the "crash"

    third = intakes()
    drain(third, 5)
    assert third.totals["duplicate"] == 2 and third.totals["processed"] == 0
    assert outbox(container) == after_crash
    assert group_offsets(bootstrap, group) == {tp: 5}

    # 3. the producer re-sends the same content (new offset): de-duplicated by content
    produce(producer, topic, [events[0]])
    drain(third, 6)
    assert third.totals["processed"] == 1
    assert outbox(container) == after_crash
    assert group_offsets(bootstrap, group) == {tp: 6}


def _nested(depth: int) -> bytes:
    return b'{"resourceType": "Basic", "extension": ' + b'[' * depth + b']' * depth + b'}'


BAD = [  # (name, value, expected reason fragment, payload kept on the DLQ topic)
    ("malformed JSON", b'{"resourceType": "Bundle", "entry": [', "not valid JSON", True),
    ("non-FHIR JSON", b'{"hello": "world", "count": 3}', "no resourceType", True),
    ("JSON array", b'[1, 2, 3]', "expected a JSON object", True),
    ("unknown resource type", b'{"resourceType": "Spaceship"}', "not a FHIR R4 resource type", True),
    ("invalid Bundle", b'{"resourceType": "Bundle", "type": "collection", "entry": "nope"}',
     "Bundle.entry", True),
    ("oversized", b'{"resourceType": "Basic", "id": "' + b"x" * (MAX_MESSAGE + 10) + b'"}',
     f"exceeds the limit of {MAX_MESSAGE} bytes", False),
    ("deeply nested", _nested(200), "nested deeper than the limit", True),
    ("invalid UTF-8", b'{"resourceType": "Basic", "id": "\xff\xfe"}', "not valid UTF-8", True),
    ("tombstone", None, "empty message", False),
]


def test_every_bad_message_is_dead_lettered_and_the_consumer_moves_on(container, kafka_env, intakes,
                                                                      producer_factory, log_lines):
    topic, dlq, group, bootstrap = kafka_env["topic"], kafka_env["dlq"], kafka_env["group"], kafka_env["bootstrap"]
    tp = TopicPartition(topic, 0)
    good_first = weight_event(1, "wt-1-w4", 80.0, DAY1 + dt.timedelta(days=28))
    good_last = weight_event(2, "wt-2-w4", 66.0, DAY1 + dt.timedelta(days=29))
    messages = [(mrn(1).encode(), good_first)]
    messages += [(f"bad-{i}".encode(), value) for i, (_n, value, _r, _k) in enumerate(BAD, start=1)]
    messages += [(mrn(2).encode(), good_last)]
    produce(producer_factory(max_request_size=2 * MAX_MESSAGE), topic, messages,
            headers=[("source-system", b"ehr-south")])
    total = len(messages)

    intake = intakes()
    drain(intake, total)
    assert intake.totals["dead_letter"] == len(BAD)
    assert intake.totals["processed"] == 2
    assert group_offsets(bootstrap, group) == {tp: total}
    assert {r.subject_key for r in outbox(container)} == {SUBJECTS[0].subject_key, SUBJECTS[1].subject_key}
    assert lag_sample(container, topic, 0) == 0

    # the dead-letter table: one row per bad message, with the reason and the payload
    rows = {r.intake_key: r for r in dead_letters(container)}
    assert len(rows) == len(BAD)
    for i, (name, value, reason, _kept) in enumerate(BAD, start=1):
        row = rows[f"kafka:{topic}:0:{i}"]
        assert reason in row.reason, (name, row.reason)
        assert row.origin == f"kafka {topic}[0]@{i}"
        assert row.payload == (value or b"")
    assert counter(container, "esource_messages_consumed_total", channel="kafka", outcome="dead_letter") == len(BAD)

    # the DLQ topic: same key, original value (empty when oversized or a tombstone), reason headers
    records = read_topic(bootstrap, dlq, expect=len(BAD))
    assert len(records) == len(BAD)
    for rec, (i, (name, value, reason, kept)) in zip(records, enumerate(BAD, start=1)):
        headers = dict(rec.headers)
        assert rec.key == f"bad-{i}".encode()
        assert reason in headers[DLQ_REASON_HEADER].decode(), name
        assert headers[DLQ_ORIGIN_HEADER] == f"kafka {topic}[0]@{i}".encode()
        assert headers[DLQ_INTAKE_KEY_HEADER] == f"kafka:{topic}:0:{i}".encode()
        assert headers["source-system"] == b"ehr-south"
        assert rec.value == (value if kept else b""), name

    # a replay of the whole partition: no second dead letter, no second transaction; the DLQ gets
    # the bad records again (at least once there, de-duplicated by the dlq-intake-key header)
    intake.stop()
    set_group_offsets(bootstrap, group, {tp: 0})
    replay = intakes()
    before = outbox(container)
    drain(replay, total)
    assert len(dead_letters(container)) == len(BAD)
    assert outbox(container) == before
    assert replay.totals["duplicate"] == 2
    again = read_topic(bootstrap, dlq, expect=2 * len(BAD))
    assert Counter(dict(r.headers)[DLQ_INTAKE_KEY_HEADER] for r in again) == {
        f"kafka:{topic}:0:{i}".encode(): 2 for i in range(1, len(BAD) + 1)}

    text = "\n".join(log_lines)
    assert "dead letter" in text
    assert mrn(1) not in text and "xxxxxxxx" not in text


def test_a_store_failure_is_retried_not_committed_and_processed_once(container, kafka_env, intakes,
                                                                   producer_factory, log_lines):
    topic, group, bootstrap = kafka_env["topic"], kafka_env["group"], kafka_env["bootstrap"]
    tp = TopicPartition(topic, 0)
    produce(producer_factory(), topic,
            [(mrn(1).encode(), weight_event(1, "wt-1-w4", 80.0, DAY1 + dt.timedelta(days=28))),
             (mrn(2).encode(), weight_event(2, "wt-2-w4", 66.0, DAY1 + dt.timedelta(days=29)))])
    real = container.ingest.ingest_batch
    calls: list[list[str]] = []  # the intake keys of each batch
    failures = {"left": 3}

    def flaky(items: list[tuple[bytes, Any]]) -> Any:
        calls.append([env.key for _, env in items])
        if failures["left"]:
            failures["left"] -= 1
            raise OperationalError("INSERT INTO subject_fact ...", {"identifier": mrn(1)},
                                   ConnectionError(f"database unavailable while writing {mrn(1)}"))
        return real(items)

    container.ingest.ingest_batch = flaky  # type: ignore[method-assign]
    intake = intakes(retry_initial_s=0.2, retry_max_s=0.4)
    wait_until(intake.run_once, lambda: intake.totals["retry"] >= 1, timeout=30, what="the first failure")
    assert group_offsets(bootstrap, group) == {}  # nothing committed, nothing skipped
    assert outbox(container) == []
    assert intake.ready()  # the consumer keeps polling while the partition backs off

    drain(intake, 2)
    assert intake.totals["retry"] == 3
    # retried in place (every failed batch starts again at the first record), then processed in order
    assert len(calls) >= 4 and all(c[0] == f"{topic}:0:0" for c in calls[:4])
    assert [k for c in calls[3:] for k in c] == [f"{topic}:0:0", f"{topic}:0:1"]
    assert intake.totals["processed"] == 2
    assert len(outbox(container)) == 2 and dead_letters(container) == []
    assert group_offsets(bootstrap, group) == {tp: 2}

    text = "\n".join(log_lines)
    assert "will retry" in text and "OperationalError(ConnectionError)" in text
    assert mrn(1) not in text  # the database error's text (which quotes parameters) is never logged


class _FlakyProducer:
    """A KafkaProducer whose first `fail` sends are never acknowledged (the DLQ is unreachable)."""

    def __init__(self, real: Any, fail: int) -> None:
        self.real, self.fail = real, fail

    def send(self, topic: str, **kw: Any) -> Any:
        if self.fail:
            self.fail -= 1
            return KafkaFuture().failure(KafkaTimeoutError("the DLQ topic is unreachable"))
        return self.real.send(topic, **kw)

    def flush(self, timeout: float | None = None) -> None:
        self.real.flush(timeout=timeout)

    def close(self, timeout: float | None = None) -> None:
        self.real.close(timeout=timeout)


def test_an_unacknowledged_dlq_record_holds_the_commit_and_is_retried(container, kafka_env, intakes,
                                                                     producer_factory):
    from kafka import KafkaProducer

    topic, dlq, group, bootstrap = kafka_env["topic"], kafka_env["dlq"], kafka_env["group"], kafka_env["bootstrap"]
    tp = TopicPartition(topic, 0)
    produce(producer_factory(), topic,
            [(mrn(1).encode(), weight_event(1, "wt-1-w4", 80.0, DAY1 + dt.timedelta(days=28))),
             (b"bad", b"{not json"),
             (mrn(2).encode(), weight_event(2, "wt-2-w4", 66.0, DAY1 + dt.timedelta(days=29)))])
    intake = intakes(producer_factory=lambda **cfg: _FlakyProducer(KafkaProducer(**cfg), fail=1))
    wait_until(intake.run_once, lambda: intake.totals["retry"] >= 1, timeout=30, what="the DLQ failure")
    # the record before the dead letter is committed; the dead letter and what follows are not
    assert group_offsets(bootstrap, group) == {tp: 1}
    drain(intake, 3)
    assert group_offsets(bootstrap, group) == {tp: 3}
    assert len(dead_letters(container)) == 1  # stored once, published again
    records = read_topic(bootstrap, dlq, expect=1, timeout=5)
    assert [(r.key, r.value, dict(r.headers)[DLQ_INTAKE_KEY_HEADER]) for r in records] == [
        (b"bad", b"{not json", f"kafka:{topic}:0:1".encode())]
    assert len(outbox(container)) == 2


def test_partitions_keep_per_patient_order_and_lag_drains_to_zero(store_url, tmp_path, kafka_broker, topics,
                                                                 intakes, producer_factory):
    topic, dlq = topics("fhir-updates", "fhir-dlq", partitions=3)
    env = {"bootstrap": kafka_broker, "topic": topic, "dlq": dlq, "group": unique("esource")}
    container = make_container(store_url, tmp_path, env, max_poll_records=4, batch_max_records=4)
    try:
        producer = producer_factory()
        sent: dict[bytes, list[bytes]] = {}
        for day in range(26, 33):  # the Week 4 window: each new reading is a new candidate
            for n in (1, 2, 3):
                value = weight_event(n, f"wt-{n}-d{day}", 60 + n + day / 10, DAY1 + dt.timedelta(days=day - 1))
                sent.setdefault(mrn(n).encode(), []).append(value)
                producer.send(topic, key=mrn(n).encode(), value=value)
        producer.flush()
        order: dict[int, list[int]] = {}
        by_patient: dict[bytes, list[bytes]] = {}
        real = container.ingest.ingest_batch

        def spy(items: list[tuple[bytes, Any]]) -> Any:
            for data, env in items:
                _t, partition, offset = env.key.rsplit(":", 2)
                order.setdefault(int(partition), []).append(int(offset))
                who = orjson.loads(data)["entry"][0]["resource"]["identifier"][0]["value"].encode()
                by_patient.setdefault(who, []).append(data)
            return real(items)

        container.ingest.ingest_batch = spy  # type: ignore[method-assign]
        intake = intakes(container)
        lags: list[float] = []

        def step() -> None:
            intake.run_once()
            lags.append(sum(intake.lag().values()))

        wait_until(step, lambda: sum(intake.committed().values()) >= 21, what="21 records")
        for offsets in order.values():
            assert offsets == sorted(offsets) and len(offsets) == len(set(offsets))
        assert by_patient == sent  # each patient's events were ingested once, in the order produced
        assert max(lags) > 0 and lags[-1] == 0
        partitions = {tp.partition for tp in intake.assignment}
        assert partitions == {0, 1, 2}
        for p in partitions:
            assert lag_sample(container, topic, p) == 0
        committed = group_offsets(kafka_broker, env["group"])
        assert sum(committed.values()) == 21
    finally:
        container.close()


def test_background_thread_ready_and_rebalance_between_two_consumers(store_url, tmp_path, kafka_broker, topics,
                                                                    intakes, producer_factory):
    topic, dlq = topics("fhir-updates", "fhir-dlq", partitions=2)
    env = {"bootstrap": kafka_broker, "topic": topic, "dlq": dlq, "group": unique("esource")}
    container = make_container(store_url, tmp_path, env)
    try:
        one = intakes(container, client_id="one")
        assert not one.ready()
        one.start()
        deadline = time.monotonic() + 20
        while not one.ready():
            assert time.monotonic() < deadline, "the first consumer never became ready"
            time.sleep(0.05)
        assert {tp.partition for tp in one.assignment} == {0, 1}

        producer = producer_factory()
        stop = threading.Event()
        produced = {"n": 0}

        def feed() -> None:  # a steady stream while the group rebalances
            day = 0
            while not stop.is_set() and day < 60:
                for n in (1, 2, 3):
                    producer.send(topic, key=mrn(n).encode(),
                                  value=weight_event(n, f"wt-{n}-{day}", 60 + n + day / 10,
                                                     DAY1 + dt.timedelta(days=day)))
                    produced["n"] += 1
                producer.flush()
                day += 1
                time.sleep(0.02)

        feeder = threading.Thread(target=feed)
        feeder.start()
        two = intakes(container, client_id="two")
        two.start()
        deadline = time.monotonic() + 30
        while not (one.ready() and two.ready()):
            assert time.monotonic() < deadline, "the group did not settle on two members"
            time.sleep(0.05)
        assert one.assignment.isdisjoint(two.assignment)
        assert {tp.partition for tp in one.assignment | two.assignment} == {0, 1}
        feeder.join()
        total = produced["n"]

        def settled() -> bool:
            committed = group_offsets(kafka_broker, env["group"])
            return sum(committed.values()) == total

        wait_until(lambda: time.sleep(0.2), settled, timeout=60, what="every offset committed")
        one.stop()
        two.stop()
        assert not one.ready() and not two.ready()
        handled = one.totals["processed"] + two.totals["processed"]
        assert handled + one.totals["duplicate"] + two.totals["duplicate"] >= total
        assert handled == total  # what a revoked member finished was committed, never processed twice
        with container.store.uow(read_only=True) as uow:
            keys = [r.intake_key for r in uow.session.execute(
                __import__("sqlalchemy").text("SELECT intake_key FROM intake"))]
        assert len([k for k in keys if f"kafka:{topic}:" in k]) == total
    finally:
        container.close()


def test_a_member_given_no_partition_is_ready_and_takes_over_when_the_other_leaves(store_url, tmp_path,
                                                                                  kafka_broker, topics, intakes,
                                                                                  producer_factory):
    """More service replicas than partitions: the one without a partition is a healthy member of the
    group (ready: it serves HTTP and stands by), and takes the partition when the other stops."""
    topic, dlq = topics("fhir-updates", "fhir-dlq", partitions=1)
    env = {"bootstrap": kafka_broker, "topic": topic, "dlq": dlq, "group": unique("esource")}
    container = make_container(store_url, tmp_path, env)
    try:
        one = intakes(container, client_id="one")
        one.start()
        wait_until(lambda: time.sleep(0.05), one.ready, timeout=20, what="the first member ready")
        two = intakes(container, client_id="two")
        assert not two.ready()
        two.start()

        def settled() -> bool:  # the group rebalanced to two members: one holds the partition
            return one.ready() and two.ready() and len(one.assignment | two.assignment) == 1 and \
                (not one.assignment or not two.assignment)
        wait_until(lambda: time.sleep(0.05), settled, timeout=30, what="two ready members, one partition")
        idle, busy = (one, two) if not one.assignment else (two, one)
        assert idle.assignment == frozenset() and idle.ready()
        busy.stop()
        wait_until(lambda: time.sleep(0.05), lambda: bool(idle.assignment) and idle.ready(), timeout=30,
                   what="the idle member takes the partition over")
        producer = producer_factory()
        producer.send(topic, key=mrn(1).encode(), value=weight_event(1, "wt-idle", 61.0, DAY1))
        producer.flush()
        wait_until(lambda: time.sleep(0.1), lambda: idle.totals["processed"] >= 1, timeout=30,
                   what="the former idle member processing")
        idle.stop()
        assert not idle.ready()
    finally:
        container.close()


def test_a_batch_longer_than_the_readiness_bound_leaves_the_intake_ready_once_done(container, kafka_env, intakes,
                                                                                  producer_factory):
    """Readiness asks for a recent poll; a batch that took longer (a backlog on a slow machine) is
    work done, not a stuck consumer: right after it, before the next poll, the intake is ready."""
    topic = kafka_env["topic"]
    produce(producer_factory(), topic, [(mrn(1).encode(), weight_event(1, "wt-1-slow", 80.0, DAY1))])
    intake = intakes()
    s = intake.settings
    bound = max(s.session_timeout_ms, 10 * s.poll_timeout_ms) / 1000.0
    real = container.ingest.ingest_batch

    def slow(items: list[tuple[bytes, Any]]) -> Any:
        time.sleep(bound + 0.3)
        return real(items)

    container.ingest.ingest_batch = slow  # type: ignore[method-assign]
    wait_until(intake.run_once, lambda: intake.totals["processed"] >= 1, timeout=30, what="the slow batch")
    assert intake.ready()
