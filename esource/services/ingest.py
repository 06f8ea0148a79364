"""One entry for every channel (Kafka, FHIR HTTP, files): bytes + envelope -> parsed FHIR -> every
study's Processor, or a dead letter with the reason. Nothing is lost: the payload of a dead letter is
kept (inside the hospital) for reprocessing, and the caller moves on."""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from esource.errors import EsourceError, IntakeError
from esource.intake.parse import ParsedInput, parse_fhir
from esource.observability import Metrics
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
                 limits: Limits | None = None) -> None:
        self.processors = processors
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
        result = IntakeResult(env, accepted=True, parsed=parsed)
        self.metrics.resources.labels(env.channel).inc(len(parsed.resources))
        try:
            for study_oid, processor in self.processors.items():
                outcome = processor.ingest(parsed, f"{study_oid}|{env.intake_key}")
                result.outcomes[study_oid] = outcome
                self._count(study_oid, outcome)
        except StoreError:
            raise  # the database, not the input: the channel retries (Kafka: no commit; HTTP: 5xx)
        except EsourceError as exc:  # e.g. identifiers matching two subjects: the whole message is parked
            return self.dead_letter(data, env, exc, parsed=parsed)
        self.metrics.messages.labels(env.channel, "duplicate" if result.duplicate else "processed").inc()
        log.info("processed", extra={"channel": env.channel, "intake_key": env.intake_key,
                                     "count": len(parsed.resources)})
        return result

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
            uow.commit()
        self.metrics.dead_letters.labels(env.channel).inc()
        self.metrics.messages.labels(env.channel, "dead_letter").inc()
        log.warning("dead letter", extra={"channel": env.channel, "intake_key": env.intake_key, "reason": reason})
        return IntakeResult(env, accepted=False, error=reason, problem=exc, dead_letter_id=dl_id, parsed=parsed)
