"""Outbox dispatch: deliver committed ODM transactions to the study's EDC connector, in order per
subject. A transaction that fails blocks the later transactions of the same subject (order matters
for Updates) while other subjects keep flowing. The service wraps this with retries (tenacity)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from esource.domain.model import SubjectTransaction
from esource.domain.ports import EdcConnector


@dataclass
class DispatchReport:
    sent: int = 0
    rejected: int = 0
    failed: int = 0
    blocked_subjects: set[tuple[str, str]] = field(default_factory=set)
    references: list[str] = field(default_factory=list)


def drain_outbox(uow_factory: Callable[[], Any], connector: EdcConnector, metadata_version_oid: str,
                 *, limit: int = 1000) -> DispatchReport:
    report = DispatchReport()
    with uow_factory() as uow:
        entries = uow.outbox_entries(statuses=("pending", "failed"), limit=limit)
    for e in entries:
        subject = (e.study_oid, e.subject_key)
        if subject in report.blocked_subjects:
            continue
        tx = SubjectTransaction(e.study_oid, metadata_version_oid, e.subject_key, e.site_oid, None, [], e.sequence)
        try:
            receipt = connector.send(tx, e.odm)
        except Exception as exc:  # transient: stays pending, blocks this subject
            report.failed += 1
            report.blocked_subjects.add(subject)
            with uow_factory() as uow:
                uow.set_outbox_status(e.id, "failed", error=f"{type(exc).__name__}: {exc}", attempted=True)
                uow.commit()
            continue
        with uow_factory() as uow:
            if receipt.accepted:
                uow.set_outbox_status(e.id, "acked" if receipt.reference else "sent", attempted=True)
                report.sent += 1
                if receipt.reference:
                    report.references.append(receipt.reference)
            else:
                uow.set_outbox_status(e.id, "rejected", error=f"{receipt.code}: {receipt.message}", attempted=True)
                report.rejected += 1
                report.blocked_subjects.add(subject)
            uow.commit()
    return report
