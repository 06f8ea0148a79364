"""Reconciliation / source-data-verification report: what the EDC holds now, read back per subject,
against what esource sent (item_state), per site.

    report = reconcile(store.uow, connector, "CV01", site="SITE.001")
    report.to_json()      # JSON-ready dict: sites -> subjects -> items, with counts
    report.to_csv()       # one line per item (and one per subject the EDC could not be asked about)

Each item is one of:
- `matching`        the EDC holds the value esource sent (numbers compare numerically: 71 = 71.0);
- `changed_in_edc`  the EDC holds another value (or an explicit null): site staff changed it, or an
                    EDC conflict froze it (`frozen`);
- `missing_in_edc`  esource sent (or queued) it and the EDC has nothing; `in_transit` when esource's
                    latest transaction for the item is still in the outbox (pending, failed or
                    rejected) - not delivered yet rather than lost;
- `only_in_edc`     the EDC holds an item esource never sent (entered by site staff).
The EDC's answer is untrusted input: it is parsed with the hardened parser (no DTD, no entities, no
network, no huge trees); a subject whose read-back fails is listed with the error and the report goes on.
Subjects appear by SubjectKey only, sources not at all: nothing here identifies a patient.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from esource.domain.model import ItemKey
from esource.domain.ports import Clock, EdcConnector, SentItem, SystemClock
from esource.errors import EsourceError
from esource.services.conflicts import item_path, odm_items, same_value

MATCHING = "matching"
CHANGED_IN_EDC = "changed_in_edc"
MISSING_IN_EDC = "missing_in_edc"
ONLY_IN_EDC = "only_in_edc"
CATEGORIES: tuple[str, ...] = (MATCHING, CHANGED_IN_EDC, MISSING_IN_EDC, ONLY_IN_EDC)

CSV_COLUMNS: tuple[str, ...] = ("site_oid", "subject_key", "study_event_oid", "study_event_repeat_key", "form_oid",
                                "item_group_oid", "item_group_repeat_key", "item_oid", "status", "esource_value",
                                "edc_value", "frozen", "in_transit", "note")

_ItemTuple = tuple[str, "str | None", str, str, "str | None", str]


@dataclass(frozen=True, slots=True)
class ItemComparison:
    """One eCRF cell of one subject: esource's value and the EDC's, and how they compare."""

    site_oid: str
    subject_key: str
    study_event_oid: str
    study_event_repeat_key: str | None
    form_oid: str
    item_group_oid: str
    item_group_repeat_key: str | None
    item_oid: str
    status: str
    esource_value: str | None
    edc_value: str | None
    frozen: bool = False
    in_transit: bool = False

    @property
    def path(self) -> str:
        return item_path(self.study_event_oid, self.study_event_repeat_key, self.form_oid, self.item_group_oid,
                         self.item_group_repeat_key, self.item_oid)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "study_event_oid": self.study_event_oid,
                "study_event_repeat_key": self.study_event_repeat_key, "form_oid": self.form_oid,
                "item_group_oid": self.item_group_oid, "item_group_repeat_key": self.item_group_repeat_key,
                "item_oid": self.item_oid, "status": self.status, "esource_value": self.esource_value,
                "edc_value": self.edc_value, "frozen": self.frozen, "in_transit": self.in_transit}


def _counts(items: Iterable[ItemComparison]) -> dict[str, int]:
    out = {c: 0 for c in CATEGORIES}
    for i in items:
        out[i.status] += 1
    return out


@dataclass
class SubjectReconciliation:
    subject_key: str
    site_oid: str
    items: list[ItemComparison] = field(default_factory=list)
    edc_has_subject: bool | None = None  # None when the EDC could not be asked (see error)
    error: str | None = None

    @property
    def counts(self) -> dict[str, int]:
        return _counts(self.items)

    def to_json(self) -> dict[str, Any]:
        return {"subject_key": self.subject_key, "site_oid": self.site_oid, "edc_has_subject": self.edc_has_subject,
                "error": self.error, "counts": self.counts, "items": [i.to_json() for i in self.items]}


@dataclass
class SiteReconciliation:
    site_oid: str
    subjects: list[SubjectReconciliation] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return _counts(i for s in self.subjects for i in s.items)

    def to_json(self) -> dict[str, Any]:
        return {"site_oid": self.site_oid, "subjects_checked": len(self.subjects),
                "subjects_with_errors": sum(1 for s in self.subjects if s.error), "counts": self.counts,
                "subjects": [s.to_json() for s in self.subjects]}


@dataclass
class ReconciliationReport:
    study_oid: str
    generated_at: dt.datetime
    connector: str
    sites: list[SiteReconciliation] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return _counts(i for site in self.sites for s in site.subjects for i in s.items)

    def items(self) -> list[ItemComparison]:
        return [i for site in self.sites for s in site.subjects for i in s.items]

    def to_json(self) -> dict[str, Any]:
        return {"study_oid": self.study_oid,
                "generated_at": self.generated_at.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z"),
                "connector": self.connector, "categories": list(CATEGORIES), "counts": self.counts,
                "sites": [s.to_json() for s in self.sites]}

    def to_csv(self) -> str:
        """One line per item; a subject the EDC could not be asked about gets one `error` line."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\r\n")
        w.writerow(CSV_COLUMNS)
        for site in self.sites:
            for s in site.subjects:
                if s.error:
                    w.writerow([_cell(x) for x in (site.site_oid, s.subject_key, "", "", "", "", "", "", "error", "",
                                                   "", "", "", s.error)])
                for i in s.items:
                    w.writerow([_cell(x) for x in (i.site_oid, i.subject_key, i.study_event_oid,
                                                   i.study_event_repeat_key, i.form_oid, i.item_group_oid,
                                                   i.item_group_repeat_key, i.item_oid, i.status, i.esource_value,
                                                   i.edc_value, "yes" if i.frozen else "",
                                                   "yes" if i.in_transit else "", "")])
        return buf.getvalue()


def _cell(value: Any) -> str:
    """CSV text; a value a spreadsheet would run as a formula is quoted with a leading apostrophe."""
    if value is None:
        return ""
    text = str(value)
    if text[:1] in ("=", "@", "\t", "\r") or (text[:1] in ("+", "-") and not _is_number(text)):
        return "'" + text
    return text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def compare_subject(site_oid: str, subject_key: str, sent: dict[ItemKey, SentItem],
                    edc: dict[_ItemTuple, str | None] | None, in_transit: set[_ItemTuple]) -> list[ItemComparison]:
    """Pure: esource's state for one subject against the EDC's items ({(event, erk, form, group, igrk,
    item): value}; None when the EDC does not know the subject)."""
    out: list[ItemComparison] = []
    edc = edc or {}
    seen: set[_ItemTuple] = set()
    for key, state in sorted(sent.items(), key=lambda kv: _sort_key(kv[0])):
        t: _ItemTuple = (key.study_event_oid, key.study_event_repeat_key, key.form_oid, key.item_group_oid,
                         key.item_group_repeat_key, key.item_oid)
        seen.add(t)
        if t not in edc:
            status, edc_value = MISSING_IN_EDC, None
        else:
            edc_value = edc[t]
            status = MATCHING if same_value(edc_value, state.value) else CHANGED_IN_EDC
        out.append(ItemComparison(site_oid, subject_key, *t, status=status, esource_value=state.value,
                                  edc_value=edc_value, frozen=state.frozen,
                                  in_transit=t in in_transit and status != MATCHING))
    for t, value in sorted(edc.items(), key=lambda kv: tuple(x or "" for x in kv[0])):
        if t not in seen:
            out.append(ItemComparison(site_oid, subject_key, *t, status=ONLY_IN_EDC, esource_value=None,
                                      edc_value=value))
    return out


def _sort_key(key: ItemKey) -> tuple[str, ...]:
    return (key.study_event_oid, key.study_event_repeat_key or "", key.form_oid, key.item_group_oid,
            key.item_group_repeat_key or "", key.item_oid)


def reconcile(uow_factory: Callable[..., Any], connector: EdcConnector, study_oid: str, *,
              site: str | None = None, subject: str | None = None, sites_allowed: Iterable[str] | None = None,
              clock: Clock | None = None) -> ReconciliationReport:
    """Read back every selected subject from the EDC and compare. `site`/`subject` narrow the subjects;
    `sites_allowed` (a CRA's sites) restricts them further. Subjects come from the enrollment."""
    clock = clock or SystemClock()
    allowed = None if sites_allowed is None else set(sites_allowed)
    try:
        name = connector.capabilities().name
    except Exception:
        name = type(connector).__name__
    report = ReconciliationReport(study_oid, clock.now(), name)
    with _reader(uow_factory) as uow:
        enrolled = [e for e in uow.enrollments(study_oid)
                    if (site is None or e.site_oid == site) and (subject is None or e.subject_key == subject)
                    and (allowed is None or e.site_oid in allowed)]
    by_site: dict[str, SiteReconciliation] = {}
    for e in sorted(enrolled, key=lambda e: (e.site_oid, e.subject_key)):
        with _reader(uow_factory) as uow:
            sent = uow.sent_items(study_oid, e.subject_key)
            queued = uow.outbox_entries(statuses=("pending", "failed", "rejected"), study_oid=study_oid,
                                        subject_key=e.subject_key)
        in_transit: set[_ItemTuple] = set()
        for row in queued:
            try:
                in_transit.update(i.key for i in odm_items(row.odm, "outbox ODM") if i.subject_key == e.subject_key)
            except EsourceError:
                continue
        result = SubjectReconciliation(e.subject_key, e.site_oid)
        try:
            snapshot = connector.read_back(study_oid, e.subject_key)
            edc: dict[_ItemTuple, str | None] | None = None
            if snapshot is not None:
                edc = {i.key: i.value for i in odm_items(snapshot, "EDC read-back") if i.subject_key == e.subject_key}
            result.edc_has_subject = snapshot is not None
            result.items = compare_subject(e.site_oid, e.subject_key, sent, edc, in_transit)
        except Exception as exc:  # the EDC's fault or an unreadable answer: reported, the next subject goes on
            result.error = f"the EDC could not be read back: {_describe(exc)}"
        by_site.setdefault(e.site_oid, SiteReconciliation(e.site_oid)).subjects.append(result)
    report.sites = [by_site[s] for s in sorted(by_site)]
    return report


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:300]


def _reader(uow_factory: Callable[..., Any]) -> Any:
    try:
        return uow_factory(read_only=True)
    except TypeError:
        return uow_factory()
