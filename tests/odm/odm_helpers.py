"""Builders and constants for the ODM tests (a uniquely named module, imported by the test files)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from esource.domain.model import ItemChange, ItemKey, ItemValue, SourceRef, SubjectTransaction, TransactionType

REPO = Path(__file__).resolve().parents[2]
CV01_METADATA = REPO / "cdisc_maps" / "CV01" / "metadata.xml"
ODM13 = "http://www.cdisc.org/ns/odm/v1.3"
ODM20 = "http://www.cdisc.org/ns/odm/v2.0"
CREATION = dt.datetime(2025, 3, 1, 10, 30, 0, tzinfo=dt.timezone.utc)


def source(resource_type: str = "Observation", rid: str | None = "obs-1", version: str = "1", *,
           identity: str | None = None, full_url: str | None = None) -> SourceRef:
    return SourceRef(resource_type, rid, version, identity or rid or full_url or "x", full_url=full_url)


def change(event: str, event_rk: str | None, form: str, group: str, group_rk: str | None, item: str, value: str,
           *, src: SourceRef | None = None, tt: TransactionType = TransactionType.INSERT,
           reason: str | None = None, previous: str | None = None, subject: str = "001-0007",
           study: str = "CV01") -> ItemChange:
    key = ItemKey(study, subject, event, event_rk, form, group, group_rk, item)
    return ItemChange(ItemValue(key, value, src or source(), rule="test"), tt, previous, reason)


def transaction(changes: list[ItemChange], *, subject: str = "001-0007", site: str = "SITE.001",
                subject_tt: TransactionType | None = TransactionType.INSERT, study: str = "CV01",
                mdv: str = "MDV.CV01.1") -> SubjectTransaction:
    return SubjectTransaction(study, mdv, subject, site, subject_tt, changes)
