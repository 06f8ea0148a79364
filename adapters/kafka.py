"""Kafka inbound adapter: FHIR updates from a consumer group -> `IngestService`, with exactly-once effect.

Installed as ``esource.adapters.kafka``. One `KafkaIntake` owns one `KafkaConsumer` (a member of
`settings.group` on `settings.topics`) and processes each assigned partition strictly in order on one
thread, so a patient's messages (keyed by patient) are handled in the order they were produced.

Delivery contract
- Consumption is at least once: auto-commit is off, and the offset `offset + 1` of a partition is
  committed (synchronously) only after the unit of work of every record up to it has committed, and
  after the dead-letter producer has been flushed.
- The effect is exactly once: the use case de-duplicates by intake key (``kafka:topic:partition:offset``,
  per study) and by content (facts are upserted by source identity and version; the state diff only
  sends what changed). A record re-delivered after a crash or a rebalance changes nothing. A record that
  was dead-lettered before a crash is not stored a second time: while a partition may be replaying
  (after an assignment or a retry, until the first record that is new to the store), the dead-letter
  table is checked for the record's intake key first, and the record is only re-published to the DLQ
  topic (the DLQ topic itself is at least once; its ``dlq-intake-key`` header de-duplicates).
- Bad input never stalls a partition: a tombstone, a message over ``max_message_bytes`` (the fetch
  sizes leave headroom so such a message is received, not stuck), and anything `IngestService` cannot
  read as FHIR become a dead letter in the store (with the payload, kept inside the hospital for
  reprocessing) and a record on ``settings.dlq_topic`` (the original key, value — empty for a tombstone
  or an oversized message — and headers ``dlq-reason``, ``dlq-origin``, ``dlq-intake-key``).
- A failure that is not about the input (store unavailable, DLQ unreachable, a bug) is never skipped:
  the partition is sought back to its first unfinished offset and paused with exponential backoff
  (jittered, capped); the other partitions and the service keep running.

Logs carry only topic, partition, offset, intake key, counts and reasons — never a key (a patient
identifier), a value or an exception text that could quote either (database errors quote their
parameters), only the exception's type.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError, MessageSizeTooLargeError
from kafka.structs import OffsetAndMetadata

from esource.errors import IntakeError
from esource.services.ingest import Envelope
from esource.settings import KafkaSettings

if TYPE_CHECKING:
    from esource.bootstrap import Container

__all__ = ["BatchResult", "KafkaIntake", "CHANNEL", "DLQ_REASON_HEADER", "DLQ_ORIGIN_HEADER",
           "DLQ_INTAKE_KEY_HEADER", "SOURCE_SYSTEM_HEADER", "EVENT_TIME_HEADER"]

log = logging.getLogger("esource.kafka")

CHANNEL = "kafka"
SOURCE_SYSTEM_HEADER = "source-system"
EVENT_TIME_HEADER = "event-time"
DLQ_REASON_HEADER = "dlq-reason"
DLQ_ORIGIN_HEADER = "dlq-origin"
DLQ_INTAKE_KEY_HEADER = "dlq-intake-key"

#: Fetch headroom over max_message_bytes: a message a little over the limit is still received (and
#: dead-lettered) rather than stalling its partition. Brokers that follow KIP-74 return an even larger
#: first batch anyway; the headroom covers brokers and record batches that do not.
FETCH_HEADROOM_BYTES = 1024 * 1024
#: Past the linger, how long a poll may wait for the next fetch while the broker holds a backlog.
BACKLOG_FETCH_MS = 100
_MAX_HEADER_TEXT = 256


@dataclass
class BatchResult:
    """What one `run_once` did (for tests and the loop's own accounting)."""

    polled: int = 0
    outcomes: Counter = field(default_factory=Counter)  # processed | duplicate | dead_letter | retry
    committed: dict[TopicPartition, int] = field(default_factory=dict)

    @property
    def processed(self) -> int:
        return self.outcomes["processed"]

    @property
    def dead_letters(self) -> int:
        return self.outcomes["dead_letter"]

    @property
    def retries(self) -> int:
        return self.outcomes["retry"]


@dataclass
class _PartitionState:
    done: int | None = None  # next offset to commit: every record before it has its unit of work committed
    committed: int | None = None  # last offset this consumer committed
    failures: int = 0  # consecutive failures of the record at `done`
    retry_at: float | None = None  # monotonic time the paused partition resumes
    replaying: bool = True  # records may have been handled before (after an assignment or a retry)


@dataclass
class _DlqSend:
    tp: TopicPartition
    offset: int
    key: bytes | None
    headers: list[tuple[str, bytes]]
    value: bytes
    future: Any = None


@dataclass
class _Work:
    """A polled record on its way through one batch."""

    tp: TopicPartition
    state: _PartitionState
    record: Any
    env: Envelope
    outcome: str | None = None  # processed | duplicate | dead_letter
    fresh: bool = False  # dead-lettered now (not a replay of an earlier dead letter)
    dlq: tuple[str, bytes] | None = None  # (reason, payload) to publish on the dead-letter topic


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, intake: "KafkaIntake") -> None:
        self.intake = intake

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.intake._on_revoked(set(revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.intake._on_assigned(set(assigned))


class KafkaIntake:
    """Kafka consumer feeding `container.ingest`. `start()` runs it on a background thread;
    `run_once()` does one poll → process → flush → commit cycle on the caller's thread (tests).
    Use one or the other: the consumer is not thread-safe."""

    def __init__(self, container: "Container", settings: KafkaSettings | None = None, *,
                 client_id: str = "esource", retry_initial_s: float = 0.5, retry_max_s: float = 30.0,
                 consumer_factory: Callable[..., Any] | None = None,
                 producer_factory: Callable[..., Any] | None = None) -> None:
        self.container = container
        self.settings = settings or container.settings.kafka
        if not self.settings.bootstrap:
            raise ValueError("kafka.bootstrap is not set: no Kafka intake")
        self.client_id = client_id
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self._consumer_factory = consumer_factory or KafkaConsumer
        self._producer_factory = producer_factory or KafkaProducer
        self._consumer: Any = None
        self._producer: Any = None
        self._parts: dict[TopicPartition, _PartitionState] = {}
        self._assigned: frozenset[TopicPartition] = frozenset()
        # a member of the group with its assignment (possibly no partition: more members than
        # partitions); False from the start of a rebalance (eager assignors revoke everything first)
        # until its assignment arrives
        self._joined = False
        self._last_poll: float | None = None
        self._gathered_at: float | None = None  # when the previous batch was gathered (see _poll_batch)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # creation and closing of the clients
        self._closed = False
        self._lag: dict[TopicPartition, int] = {}
        self.totals: Counter = Counter()

    # ------------------------------------------------------------------ clients

    @property
    def fetch_partition_bytes(self) -> int:
        return self.settings.max_message_bytes + FETCH_HEADROOM_BYTES

    def consumer_config(self) -> dict[str, Any]:
        s = self.settings
        partition_bytes = self.fetch_partition_bytes
        return dict(
            bootstrap_servers=[b.strip() for b in s.bootstrap.split(",") if b.strip()],  # type: ignore[union-attr]
            group_id=s.group,
            client_id=f"{self.client_id}-intake",
            enable_auto_commit=False,
            auto_offset_reset=s.auto_offset_reset,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            max_poll_records=s.max_poll_records,
            max_partition_fetch_bytes=partition_bytes,
            fetch_max_bytes=max(52_428_800, partition_bytes),
            key_deserializer=None,
            value_deserializer=None,
        )

    def producer_config(self) -> dict[str, Any]:
        s = self.settings
        return dict(
            bootstrap_servers=[b.strip() for b in s.bootstrap.split(",") if b.strip()],  # type: ignore[union-attr]
            client_id=f"{self.client_id}-dlq",
            acks="all",
            max_request_size=s.max_message_bytes + 64 * 1024,
            linger_ms=0,
            max_block_ms=10_000,  # a missing DLQ topic must not block the consumer thread for a minute
        )

    def _ensure_consumer(self) -> Any:
        with self._lock:
            if self._closed:
                raise RuntimeError("this KafkaIntake is stopped: build a new one")
            if self._consumer is None:
                consumer = self._consumer_factory(**self.consumer_config())
                consumer.subscribe(topics=list(self.settings.topics), listener=_Rebalance(self))
                self._consumer = consumer
                log.info("kafka intake subscribed", extra={"topic": ",".join(self.settings.topics),
                                                           "count": len(self.settings.topics)})
            return self._consumer

    def _ensure_producer(self) -> Any:
        if self._producer is None:
            self._producer = self._producer_factory(**self.producer_config())
        return self._producer

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Run the consumer loop on a daemon thread until `stop()`."""
        if self._thread is not None:
            raise RuntimeError("the Kafka intake is already started")
        self._thread = threading.Thread(target=self._run, name="esource-kafka-intake", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop (the batch in hand is finished or cut at a record boundary, what is done is
        committed), leave the group and close the clients."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("kafka intake did not stop in time", extra={"duration_ms": int(timeout * 1000)})
                return
        self._close(commit=True)

    def close_without_commit(self) -> None:
        """Drop the clients without committing anything (what a crash does): for tests."""
        self._stop.set()
        self._close(commit=False)

    def ready(self) -> bool:
        """The consumer is a member of its group with its assignment, and polled, or finished a batch,
        recently (a batch that takes longer than the bound is work, not a stuck consumer: it counts
        once it is done). A member given no partition (more members than partitions) is ready: it
        takes partitions over when another member leaves, and it serves HTTP meanwhile."""
        if self._closed or self._consumer is None or self._last_poll is None:
            return False
        if self._thread is not None and not self._thread.is_alive():
            return False
        recent = max(self.settings.session_timeout_ms, 10 * self.settings.poll_timeout_ms) / 1000.0
        return self._joined and time.monotonic() - self._last_poll <= recent

    @property
    def assignment(self) -> frozenset[TopicPartition]:
        return self._assigned

    def committed(self) -> dict[TopicPartition, int]:
        """Offsets this consumer committed, per partition it holds (the next record to consume)."""
        return {tp: s.committed for tp, s in list(self._parts.items())
                if s.committed is not None and tp in self._assigned}

    def uncommitted(self) -> dict[TopicPartition, int]:
        """Partitions whose finished records are not committed yet: {partition: next offset to commit}."""
        return self._done_offsets()

    def _run(self) -> None:
        log.info("kafka intake started", extra={"topic": ",".join(self.settings.topics)})
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    self.run_once()
                    failures = 0
                except Exception as exc:  # broker unreachable, commit refused ...: keep the service up
                    failures += 1
                    delay = self._backoff(failures)
                    log.warning("kafka intake cycle failed; retrying",
                                extra={"reason": _kind(exc), "attempt": failures,
                                       "duration_ms": int(delay * 1000)})
                    self._stop.wait(delay)
        finally:
            self._close(commit=True)
            log.info("kafka intake stopped", extra={"count": self.totals["processed"]})

    def _close(self, *, commit: bool) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            consumer, producer = self._consumer, self._producer
            self._consumer = self._producer = None
        try:
            if producer is not None:
                try:
                    producer.flush(timeout=5) if commit else None
                finally:
                    producer.close(timeout=5 if commit else 0)
        except Exception as exc:
            log.warning("closing the DLQ producer failed", extra={"reason": _kind(exc)})
        if consumer is None:
            return
        try:
            if commit:
                self._commit(consumer, self._done_offsets())
        except Exception as exc:
            log.warning("final offset commit failed", extra={"reason": _kind(exc)})
        try:
            consumer.close(autocommit=False)
        except Exception as exc:
            log.warning("closing the consumer failed", extra={"reason": _kind(exc)})
        self._assigned = frozenset()
        self._joined = False

    # ------------------------------------------------------------------ one cycle

    def run_once(self, timeout_ms: int | None = None) -> BatchResult:
        """Poll once, process the whole poll as one batch (one unit of work per study, each subject
        mapped once: `IngestService.ingest_batch`), flush the DLQ producer, commit. A store failure
        sends every partition of the batch back to its first unprocessed record (nothing is skipped)."""
        consumer = self._ensure_consumer()
        self._resume_due(consumer)
        batch = self._poll_batch(consumer, self.settings.poll_timeout_ms if timeout_ms is None else timeout_ms)
        result = BatchResult()
        dlq: list[_DlqSend] = []
        work: list[_Work] = []
        for tp, records in batch.items():
            state = self._parts.get(tp)
            if state is None:
                if tp not in consumer.assignment():
                    continue  # revoked during the poll: the next owner starts from the committed offset
                state = self._parts.setdefault(tp, _PartitionState())
            if state.retry_at is not None:  # backing off: hand the records back, refetch them later
                consumer.seek(tp, records[0].offset)
                continue
            for record in records:
                result.polled += 1
                if self._stop.is_set():
                    consumer.seek(tp, record.offset)  # cut at a record boundary; the rest is refetched
                    break
                if state.done is not None and record.offset < state.done:
                    continue  # already handled (a fetch that raced a seek)
                work.append(_Work(tp, state, record, self._envelope(record)))
        if work:
            self._process(consumer, work, dlq, result)
        if dlq:
            self._flush_dlq(consumer, dlq, result)
        try:
            result.committed = self._commit(consumer, self._done_offsets())
        except KafkaError as exc:  # e.g. a rebalance under way: retried next cycle, or replayed by the next owner
            log.warning("offset commit failed; will retry", extra={"reason": _kind(exc)})
        self._update_lag(consumer)
        self._last_poll = time.monotonic()  # alive: the batch is done (the next poll may take poll_timeout_ms)
        self.totals.update(result.outcomes)
        if result.polled:
            log.info("kafka batch", extra={"count": result.polled, "kind": dict(result.outcomes)})
        return result

    def _poll_batch(self, consumer: Any, timeout_ms: int) -> dict[TopicPartition, list[Any]]:
        """One poll, then more while fewer than `batch_max_records` came, until `batch_linger_ms` after
        the previous batch was gathered: a backlog is processed in large batches (each subject mapped
        once per batch), a trickle in batches of about one linger's worth. Why from the previous
        batch: the time that batch took to process counts as lingering (what arrived meanwhile is
        there at once), so under steady load a record waits at most one cycle instead of a whole
        processing plus a whole linger; after an idle spell the first record goes at once. Past the
        linger, polling goes on while the broker holds more than was handed out (a backlog): one
        poll returns only what the last fetch brought (a few hundred records after a long batch), and
        a small batch maps each subject again for a handful of records."""
        s = self.settings
        batch: dict[TopicPartition, list[Any]] = {}
        polled = consumer.poll(timeout_ms=timeout_ms, max_records=min(s.max_poll_records, s.batch_max_records))
        self._last_poll = time.monotonic()
        total = 0
        for tp, records in polled.items():
            batch.setdefault(tp, []).extend(records)
            total += len(records)
        start = self._gathered_at if self._gathered_at is not None else time.monotonic()
        deadline = start + s.batch_linger_ms / 1000.0
        while 0 < total < s.batch_max_records and not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining > 0:
                wait_ms = max(1, int(remaining * 1000))
            elif self._backlog(consumer):
                wait_ms = BACKLOG_FETCH_MS
            else:
                break
            polled = consumer.poll(timeout_ms=wait_ms,
                                   max_records=min(s.max_poll_records, s.batch_max_records - total))
            self._last_poll = time.monotonic()
            if not polled:
                break
            for tp, records in polled.items():
                batch.setdefault(tp, []).extend(records)
                total += len(records)
        self._gathered_at = time.monotonic()
        return batch

    def _process(self, consumer: Any, work: list["_Work"], dlq: list[_DlqSend], result: BatchResult) -> None:
        earlier = self._dead_letter_reasons([w.env.intake_key for w in work if w.state.replaying])
        batch: list[_Work] = []
        for w in work:
            w.outcome = self._precheck(w, earlier)
            if w.outcome is None:
                batch.append(w)
        if batch:
            try:
                answers = self.container.ingest.ingest_batch([(w.record.value, w.env) for w in batch])
            except Exception as exc:
                first: dict[TopicPartition, _Work] = {}
                for w in batch:
                    first.setdefault(w.tp, w)
                for w in work:  # what precedes a partition's first failed record is done
                    f = first.get(w.tp)
                    if f is None or w.record.offset < f.record.offset:
                        self._to_dlq(w, dlq)
                        self._done(w, result)
                for tp, w in first.items():
                    self._retry_later(consumer, tp, w.state, w.record.offset, exc)
                    result.outcomes["retry"] += 1
                return
            for w, res in zip(batch, answers):
                if not res.accepted:
                    w.dlq = (res.error or "rejected", w.record.value)
                    w.outcome, w.fresh = "dead_letter", True
                else:
                    w.outcome = "duplicate" if res.duplicate else "processed"
        for w in work:  # DLQ records in input order
            self._to_dlq(w, dlq)
            self._done(w, result)

    def _to_dlq(self, w: "_Work", dlq: list[_DlqSend]) -> None:
        if w.dlq is not None:
            reason, value = w.dlq
            dlq.append(self._dlq_record(w.tp, w.record, w.env, reason, value))

    def _done(self, w: "_Work", result: BatchResult) -> None:
        w.state.done = w.record.offset + 1
        w.state.failures = 0
        if w.outcome == "processed" or w.fresh:
            w.state.replaying = False
        result.outcomes[w.outcome or "processed"] += 1

    def _precheck(self, w: "_Work", earlier: dict[str, str]) -> str | None:
        """Records that never reach the mapping: empty, oversized, or dead-lettered before a crash or
        rebalance (then only re-published to the DLQ topic). None: process it."""
        value: bytes | None = w.record.value
        limit = self.settings.max_message_bytes
        problem: str | None = None
        if value is None:
            problem = "empty message"
        elif len(value) > limit:
            problem = f"message of {len(value)} bytes exceeds the limit of {limit} bytes"
        dlq_value = value if problem is None else b""
        if w.state.replaying and w.env.intake_key in earlier:
            w.dlq = (earlier[w.env.intake_key], dlq_value)
            return "dead_letter"
        if problem is not None:
            exc = IntakeError(w.env.origin, problem)
            self.container.ingest.dead_letter(value or b"", w.env, exc)
            w.dlq = (str(exc), dlq_value)
            w.fresh = True
            return "dead_letter"
        return None

    def _envelope(self, record: Any) -> Envelope:
        topic, partition, offset = record.topic, record.partition, record.offset
        headers = _headers(record)
        source_system = _text(headers.get(SOURCE_SYSTEM_HEADER))
        event_time = None
        raw_time = _text(headers.get(EVENT_TIME_HEADER))
        if raw_time:
            event_time = _iso_datetime(raw_time)
            if event_time is None:
                log.warning("ignored an event-time header that is not ISO 8601",
                            extra={"topic": topic, "partition": partition, "offset": offset})
        return Envelope(CHANNEL, f"{topic}:{partition}:{offset}", origin=f"kafka {topic}[{partition}]@{offset}",
                        source_system=source_system, event_time=event_time)

    def _dead_letter_reasons(self, intake_keys: list[str]) -> dict[str, str]:
        """Reasons of inputs dead-lettered before (one query for the whole poll)."""
        if not intake_keys:
            return {}
        from sqlalchemy import select

        from esource.store.schema import DeadLetterRow

        t = DeadLetterRow.__table__
        out: dict[str, str] = {}
        with self.container.store.uow(read_only=True) as uow:
            for i in range(0, len(intake_keys), 500):
                rows = uow.session.execute(select(t.c.intake_key, t.c.reason)
                                           .where(t.c.channel == CHANNEL, t.c.intake_key.in_(intake_keys[i:i + 500]))
                                           .order_by(t.c.id))
                for key, reason in rows:
                    out.setdefault(key, reason)
        return out

    # ------------------------------------------------------------------ dead-letter topic

    def _dlq_record(self, tp: TopicPartition, record: Any, env: Envelope, reason: str, value: bytes) -> _DlqSend:
        headers = [(k, v) for k, v in (record.headers or []) if not k.startswith("dlq-") and v is not None]
        headers += [(DLQ_REASON_HEADER, reason.encode("utf-8", "replace")),
                    (DLQ_ORIGIN_HEADER, env.origin.encode()),
                    (DLQ_INTAKE_KEY_HEADER, env.intake_key.encode())]
        send = _DlqSend(tp, record.offset, record.key, headers, value)
        self._send(send)
        return send

    def _send(self, send: _DlqSend) -> None:
        producer = self._ensure_producer()
        try:
            send.future = producer.send(self.settings.dlq_topic, key=send.key, value=send.value, headers=send.headers)
        except MessageSizeTooLargeError:
            send.value = b""  # the payload stays in the dead-letter table
            send.future = producer.send(self.settings.dlq_topic, key=send.key, value=b"", headers=send.headers)

    def _flush_dlq(self, consumer: Any, sends: list[_DlqSend], result: BatchResult) -> None:
        """Every DLQ record of the batch is acknowledged before any offset after it is committed; a
        partition whose DLQ record was not acknowledged goes back to that record and retries."""
        producer = self._ensure_producer()
        try:
            producer.flush(timeout=max(5.0, self.settings.session_timeout_ms / 1000.0))
        except Exception as exc:
            log.warning("DLQ flush failed", extra={"reason": _kind(exc)})
        failed: dict[TopicPartition, tuple[int, BaseException]] = {}
        for send in sends:
            error = _send_error(send.future)
            if isinstance(error, MessageSizeTooLargeError) and send.value:
                # the DLQ takes less than the input topic did: publish the reason without the payload
                send.value = b""
                try:
                    self._send(send)
                    producer.flush(timeout=5)
                    error = _send_error(send.future)
                except Exception as exc:
                    error = exc
            if error is not None and (send.tp not in failed or send.offset < failed[send.tp][0]):
                failed[send.tp] = (send.offset, error)
        for tp, (offset, error) in failed.items():
            state = self._parts.get(tp)
            if state is None:
                continue  # revoked meanwhile: nothing after the last commit is lost
            if state.done is not None and state.done > offset:
                state.done = offset
            result.outcomes["retry"] += 1
            self._retry_later(consumer, tp, state, offset, error)

    # ------------------------------------------------------------------ offsets, retries, rebalance

    def _done_offsets(self) -> dict[TopicPartition, int]:
        assigned = self._assigned
        return {tp: s.done for tp, s in list(self._parts.items())
                if s.done is not None and s.done != s.committed and tp in assigned}

    def _commit(self, consumer: Any, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        if not offsets:
            return {}
        consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})
        for tp, off in offsets.items():
            state = self._parts.get(tp)
            if state is not None:
                state.committed = off
        log.debug("offsets committed", extra={"count": len(offsets)})
        return dict(offsets)

    def _retry_later(self, consumer: Any, tp: TopicPartition, state: _PartitionState, offset: int,
                     exc: BaseException) -> None:
        state.failures += 1
        delay = self._backoff(state.failures)
        state.retry_at = time.monotonic() + delay
        state.replaying = True
        try:
            consumer.seek(tp, offset)
            consumer.pause(tp)
        except Exception as err:  # revoked meanwhile: the next owner starts from the committed offset
            log.warning("could not seek back", extra={"topic": tp.topic, "partition": tp.partition,
                                                      "offset": offset, "reason": _kind(err)})
        log.warning("record not processed; partition paused, will retry",
                    extra={"topic": tp.topic, "partition": tp.partition, "offset": offset,
                           "intake_key": f"{CHANNEL}:{tp.topic}:{tp.partition}:{offset}", "attempt": state.failures,
                           "duration_ms": int(delay * 1000), "reason": _kind(exc)})

    def _backoff(self, failures: int) -> float:
        base = min(self.retry_max_s, self.retry_initial_s * (2 ** min(failures - 1, 30)))
        return base * (0.5 + random.random() / 2)

    def _resume_due(self, consumer: Any) -> None:
        now = time.monotonic()
        due = [tp for tp, s in self._parts.items() if s.retry_at is not None and s.retry_at <= now]
        for tp in due:
            self._parts[tp].retry_at = None
            if tp in self._assigned:
                consumer.resume(tp)

    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        self._joined = False
        consumer = self._consumer
        if consumer is not None and revoked:
            try:
                if self._producer is not None:
                    self._producer.flush(timeout=5)
                self._commit(consumer, {tp: off for tp, off in self._done_offsets().items() if tp in revoked})
            except Exception as exc:  # the next owner replays from the last commit; de-duplicated
                log.warning("commit on revoke failed", extra={"reason": _kind(exc), "count": len(revoked)})
        for tp in revoked:
            self._parts.pop(tp, None)
            self._lag.pop(tp, None)
            try:
                self.container.metrics.consumer_lag.remove(tp.topic, str(tp.partition))
            except KeyError:
                pass
        self._assigned = frozenset(self._assigned - revoked)
        if revoked:
            log.info("partitions revoked", extra={"count": len(revoked),
                                                  "partition": sorted(f"{t.topic}[{t.partition}]" for t in revoked)})

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._joined = True
        for tp in assigned:
            self._parts[tp] = _PartitionState()  # positions come from the committed offsets
        self._assigned = frozenset(self._assigned | assigned)
        if assigned:
            log.info("partitions assigned", extra={"count": len(assigned),
                                                   "partition": sorted(f"{t.topic}[{t.partition}]" for t in assigned)})

    def _backlog(self, consumer: Any) -> bool:
        """Whether an assigned partition that is not paused has records past the position (from the
        high watermark of the last fetch response, as the lag)."""
        try:
            paused = consumer.paused()
        except Exception:
            paused = set()
        return any(_behind(consumer, tp) for tp in self._assigned if tp not in paused)

    def _update_lag(self, consumer: Any) -> None:
        """Lag per partition = high watermark (from the last fetch response) - position. The broker's
        ListOffsets answer is not used: some Kafka-compatible brokers report a wrong end there."""
        gauge = self.container.metrics.consumer_lag
        for tp in self._assigned:
            lag = _behind(consumer, tp)
            if lag is None:
                continue
            self._lag[tp] = lag
            gauge.labels(tp.topic, str(tp.partition)).set(lag)

    def lag(self) -> dict[TopicPartition, int]:
        """The last lag published per assigned partition (messages behind the high watermark)."""
        return {tp: n for tp, n in list(self._lag.items()) if tp in self._assigned}


# ---------------------------------------------------------------------- helpers

def _behind(consumer: Any, tp: TopicPartition) -> int | None:
    """Records of `tp` past the consumer's position, by the high watermark of the last fetch
    response (None while either is unknown)."""
    try:
        high = consumer.highwater(tp)
        pos = consumer.position(tp, timeout_ms=0) if high is not None else None
    except Exception:
        return None
    if high is None or pos is None:
        return None
    return max(0, high - pos)


def _send_error(future: Any) -> BaseException | None:
    if future is None:
        return RuntimeError("DLQ record not sent")
    if not future.is_done:
        return TimeoutError("DLQ record not acknowledged")
    return future.exception if future.failed() else None


def _headers(record: Any) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for k, v in record.headers or []:
        if isinstance(k, str) and isinstance(v, (bytes, bytearray)) and k not in out:
            out[k] = bytes(v)
    return out


def _text(raw: bytes | None) -> str | None:
    if not raw:
        return None
    text = raw[:_MAX_HEADER_TEXT].decode("utf-8", "replace").strip()
    return text or None


def _iso_datetime(text: str) -> dt.datetime | None:
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith(("Z", "z")) else text)
    except ValueError:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)


def _kind(exc: BaseException) -> str:
    """An exception's type (and its database driver's), never its text: SQL errors quote parameters."""
    name = type(exc).__name__
    orig = getattr(exc, "orig", None)
    if orig is not None:
        name += f"({type(orig).__name__})"
    if isinstance(exc, KafkaError):
        name = f"{name}: {exc}"  # Kafka errors name the broker condition, never record content
    return name
