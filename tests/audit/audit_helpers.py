"""Shared by the audit tests: events, raw SQL access to the audit tables (what a tamperer would do), a
fake EDC connector, and the CV01 demo data fed through the real Processor."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from esource.domain.audit import AuditAction, AuditEvent
from esource.domain.model import ItemKey, SourceRef
from esource.domain.ports import ConnectorCapabilities, DeliveryReceipt

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "config" / "demo_data"
DEMO_ENROLLMENT = ROOT / "config" / "demo_enrollment.yaml"
ARLA = DEMO / "Arla_Lang_0c89b627-646b-40ff-a620-c8509a10912c.json"  # 002-0001, SITE.002
ARLA_WEIGHT_AMENDED = DEMO / "updates" / "02_arla_baseline_weight_amended.json"
ARLA_SUBJECT, ARLA_SITE = "002-0001", "SITE.002"
PSEUDONYM_KEY = b"audit-test-key-0123456789"

WEIGHT = ItemKey("CV01", ARLA_SUBJECT, "SE.BASELINE", None, "F.VS", "IG.VS", "WEIGHT", "IT.VS.VSORRES")
WEIGHT_OBSERVATION = "a8245201-b383-43c0-922e-efd03f14df0e"


def key(subject: str = "001-0001", item: str = "IT.VS.VSORRES", group_repeat: str | None = "SYSBP",
        event: str = "SE.BASELINE") -> ItemKey:
    return ItemKey("CV01", subject, event, None, "F.VS", "IG.VS", group_repeat, item)


def mapped(value: str, *, subject: str = "001-0001", site: str = "SITE.001", old: str | None = None,
           item: ItemKey | None = None, actor: str = "system", version: str = "1",
           at: dt.datetime | None = None, **detail: Any) -> AuditEvent:
    """A VALUE_MAPPED event like the Processor records."""
    return AuditEvent(AuditAction.VALUE_MAPPED, actor=actor, study_oid="CV01", subject_key=subject, site_oid=site,
                      item=item or key(subject), old_value=old, new_value=value,
                      source=SourceRef("Observation", "obs-1", version, "Observation/obs-1"),
                      rule="F.VS/SYSBP/result", reason="first value from the source" if old is None else "update",
                      detail={"outbox_id": 1, "sequence": 1, "transaction_type": "Insert" if old is None else "Update",
                              "conversions": ["rounded half-up to 0 decimal(s): 128"], **detail}, at=at)


def record(store: Any, *events: AuditEvent) -> None:
    """Record events in one committed unit of work."""
    with store.uow() as uow:
        for e in events:
            uow.audit(e)
        uow.commit()


def sql(store: Any, statement: str, **params: Any) -> list[Any]:
    """Run raw SQL on the store's database, outside esource (what someone with database access could do)."""
    with store.engine.begin() as conn:
        result = conn.execute(sa.text(statement), params)
        return list(result) if result.returns_rows else []


def raw_rows(store: Any) -> list[dict[str, Any]]:
    """Every audit_log row as the table holds it (read with the table's column types, not the store)."""
    from esource.store.schema import AuditLogRow

    table = AuditLogRow.__table__
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(table).order_by(table.c.id))]


class FakeEdc:
    """An EdcConnector answering from a script: 'ack', 'sent' (no reference), 'reject', or 'fail'."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.sent: list[tuple[str, str, int]] = []

    def capabilities(self) -> ConnectorCapabilities:
        return ConnectorCapabilities(name="fake-edc", read_back=False, idempotency_key=True, integer_repeat_keys=False)

    def send(self, transaction: Any, odm: bytes) -> DeliveryReceipt:
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        self.sent.append((transaction.study_oid, transaction.subject_key, transaction.sequence))
        if answer == "fail":
            raise ConnectionError("EDC unreachable")
        if answer == "reject":
            return DeliveryReceipt(accepted=False, permanent=True, code="E-042", message="form locked")
        ref = f"REF-{transaction.subject_key}-{transaction.sequence}" if answer == "ack" else None
        return DeliveryReceipt(accepted=True, reference=ref)

    def read_back(self, study_oid: str, subject_key: str) -> bytes | None:
        return None


def demo_processor(store: Any, clock: Any) -> Any:
    """The CV01 Processor on `store`, with the demo enrollment loaded."""
    from esource.mapping.engine import MappingEngine
    from esource.privacy import Pseudonymizer
    from esource.services.demo import load_enrollment_file
    from esource.services.process import Processor, enroll
    from esource.study.study import load_study

    study = load_study("CV01")
    _, enrollments, _ = load_enrollment_file(DEMO_ENROLLMENT)
    enroll(store.uow, enrollments)
    return Processor(study, MappingEngine(study), store.uow, Pseudonymizer(PSEUDONYM_KEY), clock)


def ingest_file(processor: Any, path: Path) -> Any:
    from esource.intake.parse import parse_fhir
    from esource.services.process import content_key, intake_key_for

    data = path.read_bytes()
    return processor.ingest(parse_fhir(data, path.name), intake_key_for("file", content_key(data)))
