"""One entry for every channel (Kafka, FHIR HTTP, files): bytes + envelope -> parsed FHIR -> every
study's Processor, or a dead letter with the reason. Nothing is lost: the payload of a dead letter is
kept (inside the hospital) for reprocessing, and the caller moves on."""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from esource.domain.audit import AuditAction, AuditEvent
from esource.errors import EsourceError, IntakeError
from esource.intake.parse import ParsedInput, parse_fhir
from esource.observability import Metrics
from esource.privacy import DEMO_PSEUDONYM_KEY, Pseudonymizer
from esource.services.process import IngestOutcome, Processor
from esource.store.errors import StoreError

log = logging.getLogger("esource.ingest")


@dataclass(frozen=True, slots=True)
class Envelope:
    """Where an input came from. `key` makes the intake key: Kafka `topic:partition:offset`, an HTTP
    request id, a file's path and content hash."""

    channel: str
    key: str
    origin: str  # for error messages: file name, topic/partition/offset, request id
    received_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    source_system: str | None = None
    event_time: dt.datetime | None = None

    @property
    def intake_key(self) -> str:
        return f"{self.channel}:{self.key}"


@dataclass
class IntakeResult:
    envelope: Envelope
    accepted: bool
    error: str | None = None
    problem: IntakeError | EsourceError | None = None
    dead_letter_id: int | None = None
    parsed: ParsedInput | None = None
    outcomes: dict[str, IngestOutcome] = field(default_factory=dict)

    @property
    def duplicate(self) -> bool:
        return bool(self.outcomes) and all(o.duplicate for o in self.outcomes.values())

    @property
    def resource_ids(self) -> list[str]:
        if self.parsed is None:
            return []
        return [r.label for r in self.parsed.resources]

    @property
    def items_sent(self) -> int:
        return sum(s.items_sent for o in self.outcomes.values() for s in o.subjects)

    @property
    def discrepancies_by_kind(self) -> Counter:
        total: Counter = Counter()
        for o in self.outcomes.values():
            total.update(o.discrepancies_by_kind)
        return total


@dataclass(frozen=True, slots=True)
class Limits:
    max_bytes: int = 20 * 1024 * 1024
    max_depth: int = 64


class IngestService:
    def __init__(self, processors: dict[str, Processor], uow_factory: Callable[[], Any], metrics: Metrics | None = None,
                 limits: Limits | None = None, pseudonymizer: Pseudonymizer | None = None,
                 on_outbox: Callable[[], Any] | None = None) -> None:
        self.processors = processors
        self.on_outbox = on_outbox  # told after a commit that queued ODM transactions (the dispatcher's wake)
        self.pseudonymizer = pseudonymizer or next(
            (p.pseudonymizer for p in processors.values() if hasattr(p, "pseudonymizer")), None
        ) or Pseudonymizer(DEMO_PSEUDONYM_KEY)
        self.uow_factory = uow_factory
        self.metrics = metrics or Metrics()
        self.limits = limits or Limits()

    def parse(self, data: bytes, env: Envelope) -> ParsedInput:
        return parse_fhir(data, env.origin, max_bytes=self.limits.max_bytes, max_depth=self.limits.max_depth)

    def ingest_bytes(self, data: bytes, env: Envelope) -> IntakeResult:
        """Parse and process. Input that is not FHIR at all becomes a dead letter (the payload is kept)."""
        try:
            parsed = self.parse(data, env)
        except IntakeError as exc:
            return self.dead_letter(data, env, exc)
        return self.ingest_parsed(parsed, env, data)

    def ingest_parsed(self, parsed: ParsedInput, env: Envelope, data: bytes | None = None) -> IntakeResult:
        return self.ingest_many([(parsed, env, data)])[0]

    def ingest_many(self, inputs: Sequence[tuple[ParsedInput, Envelope, bytes | None]]) -> list[IntakeResult]:
        """Process parsed inputs together: one unit of work per study for the whole batch (see
        `Processor.ingest_batch`). When the batch as a whole is refused (an EsourceError such as
        identifiers matching two subjects), it is replayed input by input, so only the bad input
        becomes a dead letter and the others go through. StoreError propagates: the channel retries."""
        if not inputs:
            return []
        try:
            results = [IntakeResult(env, accepted=True, parsed=parsed) for parsed, env, _ in inputs]
            for study_oid, processor in self.processors.items():
                outcomes = processor.ingest_batch([(parsed, f"{study_oid}|{env.intake_key}")
                                                   for parsed, env, _ in inputs])
                for result, outcome in zip(results, outcomes):
                    result.outcomes[study_oid] = outcome
        except StoreError:
            raise  # the database, not the input: the channel retries (Kafka: no commit; HTTP: 5xx)
        except EsourceError as exc:
            if len(inputs) == 1:
                parsed, env, data = inputs[0]
                return [self.dead_letter(data, env, exc, parsed=parsed)]
            return [r for one in inputs for r in self.ingest_many([one])]
        for result in results:
            self._counted(result)
        if self.on_outbox is not None and any(s.outbox_id is not None for r in results
                                              for o in r.outcomes.values() for s in o.subjects):
            self.on_outbox()
        return results

    def _counted(self, result: IntakeResult) -> None:
        env = result.envelope
        assert result.parsed is not None
        self.metrics.resources.labels(env.channel).inc(len(result.parsed.resources))
        for study_oid, outcome in result.outcomes.items():
            self._count(study_oid, outcome)
        self.metrics.messages.labels(env.channel, "duplicate" if result.duplicate else "processed").inc()
        log.info("processed", extra={"channel": env.channel, "intake_key": env.intake_key,
                                     "count": len(result.parsed.resources)})

    def ingest_batch(self, items: Sequence[tuple[bytes, Envelope]]) -> list[IntakeResult]:
        """Raw inputs of one channel batch (a Kafka poll): each parsed on its own (unparsable ones become
        dead letters), the rest processed together. Results in input order."""
        results: list[IntakeResult | None] = [None] * len(items)
        parsed_inputs: list[tuple[ParsedInput, Envelope, bytes | None]] = []
        where: list[int] = []
        for i, (data, env) in enumerate(items):
            try:
                parsed_inputs.append((self.parse(data, env), env, data))
                where.append(i)
            except IntakeError as exc:
                results[i] = self.dead_letter(data, env, exc)
        for i, result in zip(where, self.ingest_many(parsed_inputs)):
            results[i] = result
        return [r for r in results if r is not None]

    def _count(self, study_oid: str, outcome: IngestOutcome) -> None:
        m = self.metrics
        if outcome.dropped_not_enrolled:
            m.dropped_not_enrolled.inc(outcome.dropped_not_enrolled)
        for s in outcome.subjects:
            if s.inserts:
                m.items_mapped.labels(study_oid, "Insert").inc(s.inserts)
            if s.updates:
                m.items_mapped.labels(study_oid, "Update").inc(s.updates)
        for kind, n in outcome.discrepancies_by_kind.items():
            m.discrepancies.labels(study_oid, kind).inc(n)

    def dead_letter(self, data: bytes | None, env: Envelope, exc: EsourceError,
                    parsed: ParsedInput | None = None) -> IntakeResult:
        reason = str(exc)
        with self.uow_factory() as uow:
            dl_id = uow.add_dead_letter(channel=env.channel, intake_key=env.intake_key, origin=env.origin,
                                        reason=reason, payload=data or b"", received_at=env.received_at)
            # the origin (file name, request id) may name a patient: the trail keeps a keyed hash of it
            ref = self.pseudonymizer.token(env.intake_key, "intake")
            uow.audit(AuditEvent(AuditAction.MESSAGE_DEAD_LETTERED, reason=reason.replace(env.origin, ref),
                                 detail={"intake": ref, "channel": env.channel,
                                         "dead_letter_id": dl_id, "bytes": len(data or b"")}))
            uow.commit()
        self.metrics.dead_letters.labels(env.channel).inc()
        self.metrics.messages.labels(env.channel, "dead_letter").inc()
        log.warning("dead letter", extra={"channel": env.channel, "intake_key": env.intake_key, "reason": reason})
        return IntakeResult(env, accepted=False, error=reason, problem=exc, dead_letter_id=dl_id, parsed=parsed)
