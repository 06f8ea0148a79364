"""Read-only aggregates the dashboard needs and the store's port does not offer (counts by site, status,
kind and day; coverage; per-rule statistics). Everything else the pages show comes from the services
of esource.audit and esource.reconciliation.

Each function takes an open unit of work (`store.uow(read_only=True)`) and runs plain SELECTs on the
tables of esource.store.schema - SQLite and PostgreSQL alike (no dialect-specific date functions: day
buckets are explicit UTC ranges). `sites` restricts every count to those sites (a CRA's assignment;
None: all sites); a subject's site is its enrollment's.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, case, func, select

from esource.store.schema import (
    OPEN_DISCREPANCY_STATUSES,
    AuditLogRow,
    DiscrepancyRow,
    EnrollmentRow,
    ItemStateRow,
    OutboxRow,
)

_outbox = OutboxRow.__table__
_disc = DiscrepancyRow.__table__
_enr = EnrollmentRow.__table__
_state = ItemStateRow.__table__
_audit = AuditLogRow.__table__

SENT_STATUSES = ("sent", "acked")
PENDING_STATUSES = ("pending", "failed")


def _site_cond(column: Any, sites: Iterable[str] | None) -> list[Any]:
    return [] if sites is None else [column.in_(sorted(sites))]


def day_start(moment: dt.datetime) -> dt.datetime:
    """Midnight UTC of `moment`'s day."""
    m = moment.astimezone(dt.timezone.utc)
    return dt.datetime(m.year, m.month, m.day, tzinfo=dt.timezone.utc)


def week_start(moment: dt.datetime) -> dt.datetime:
    """Monday 00:00 UTC of `moment`'s ISO week."""
    d = day_start(moment)
    return d - dt.timedelta(days=d.weekday())


# ---------------------------------------------------------------------------------------- overview


@dataclass
class SiteStats:
    """One site's line of the study overview."""

    site_oid: str
    subjects: int = 0
    transfers_today: int = 0  # ODM transactions queued today (UTC)
    transfers_week: int = 0  # ... since Monday (UTC)
    items_sent: int = 0  # items in transactions the EDC received (sent or acknowledged)
    items_pending: int = 0  # items in transactions still in the outbox (pending, or failed and retried)
    items_rejected: int = 0  # items in transactions the EDC rejected
    held: int = 0  # open discrepancies holding a value back
    open_discrepancies: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)  # open discrepancies by kind


def site_overview(uow: Any, study_oid: str, site_oids: Iterable[str], sites: Iterable[str] | None,
                  now: dt.datetime) -> list[SiteStats]:
    """Per site (the study's sites the caller may see, plus any enrolled elsewhere): subjects, transfers
    today and this week, items by delivery status, held values and open discrepancies by kind."""
    s = uow.session
    allowed = None if sites is None else set(sites)
    out: dict[str, SiteStats] = {site: SiteStats(site) for site in site_oids if allowed is None or site in allowed}
    for site, n in s.execute(select(_enr.c.site_oid, func.count()).where(
            _enr.c.study_oid == study_oid, *_site_cond(_enr.c.site_oid, sites)).group_by(_enr.c.site_oid)):
        out.setdefault(site, SiteStats(site)).subjects = int(n)
    today, week = day_start(now), week_start(now)
    o = _outbox
    q = select(
        o.c.site_oid,
        func.sum(case((o.c.created_at >= today, 1), else_=0)),
        func.sum(case((o.c.created_at >= week, 1), else_=0)),
        func.sum(case((o.c.status.in_(SENT_STATUSES), o.c.item_count), else_=0)),
        func.sum(case((o.c.status.in_(PENDING_STATUSES), o.c.item_count), else_=0)),
        func.sum(case((o.c.status == "rejected", o.c.item_count), else_=0)),
    ).where(o.c.study_oid == study_oid, *_site_cond(o.c.site_oid, sites)).group_by(o.c.site_oid)
    for site, t_day, t_week, sent, pending, rejected in s.execute(q):
        st = out.setdefault(site, SiteStats(site))
        st.transfers_today, st.transfers_week = int(t_day or 0), int(t_week or 0)
        st.items_sent, st.items_pending, st.items_rejected = int(sent or 0), int(pending or 0), int(rejected or 0)
    d, e = _disc, _enr
    q = (select(e.c.site_oid, d.c.kind, func.count(), func.sum(case((d.c.held_value.is_not(None), 1), else_=0)))
         .select_from(d.join(e, and_(e.c.study_oid == d.c.study_oid, e.c.subject_key == d.c.subject_key)))
         .where(d.c.study_oid == study_oid, d.c.status.in_(OPEN_DISCREPANCY_STATUSES), *_site_cond(e.c.site_oid, sites))
         .group_by(e.c.site_oid, d.c.kind))
    for site, kind, n, held in s.execute(q):
        st = out.setdefault(site, SiteStats(site))
        st.by_kind[kind] = int(n)
        st.open_discrepancies += int(n)
        st.held += int(held or 0)
    return [out[k] for k in sorted(out)]


@dataclass(frozen=True, slots=True)
class DayCount:
    day: dt.date
    transfers: int
    discrepancies: int


def daily_series(uow: Any, study_oid: str, sites: Iterable[str] | None, now: dt.datetime,
                 days: int = 14) -> list[DayCount]:
    """ODM transactions queued and discrepancies opened per UTC day, the last `days` days (today last)."""
    first = day_start(now) - dt.timedelta(days=days - 1)
    bounds = [first + dt.timedelta(days=i) for i in range(days + 1)]
    s = uow.session

    def per_day(column: Any, *conds: Any, frm: Any = None) -> list[int]:
        cols = [func.sum(case((and_(column >= bounds[i], column < bounds[i + 1]), 1), else_=0)) for i in range(days)]
        q = select(*cols)
        if frm is not None:
            q = q.select_from(frm)
        row = s.execute(q.where(column >= first, *conds)).one()
        return [int(x or 0) for x in row]

    o = _outbox
    transfers = per_day(o.c.created_at, o.c.study_oid == study_oid, *_site_cond(o.c.site_oid, sites))
    d, e = _disc, _enr
    joined = d.join(e, and_(e.c.study_oid == d.c.study_oid, e.c.subject_key == d.c.subject_key))
    opened = per_day(d.c.created_at, d.c.study_oid == study_oid, *_site_cond(e.c.site_oid, sites), frm=joined)
    return [DayCount(bounds[i].date(), transfers[i], opened[i]) for i in range(days)]


@dataclass(frozen=True, slots=True)
class EdcActivity:
    """The delivery side of the EDC connection, from the outbox (the dispatcher keeps no history)."""

    last_success: dt.datetime | None  # the newest transaction the EDC received
    last_failure_error: str | None  # the newest transaction still failing, and why
    last_failure_at: dt.datetime | None
    depth: dict[str, int]  # outbox rows by status


def edc_activity(uow: Any, study_oid: str) -> EdcActivity:
    s = uow.session
    o = _outbox
    last = s.execute(select(func.max(o.c.sent_at)).where(o.c.study_oid == study_oid,
                                                         o.c.status.in_(SENT_STATUSES))).scalar()
    failing = s.execute(select(o.c.last_error, o.c.created_at).where(
        o.c.study_oid == study_oid, o.c.status.in_(("failed", "rejected", "pending")), o.c.last_error.is_not(None))
        .order_by(o.c.id.desc()).limit(1)).first()
    depth = {st: int(n) for st, n in s.execute(select(o.c.status, func.count()).where(o.c.study_oid == study_oid)
                                               .group_by(o.c.status))}
    return EdcActivity(last, failing[0] if failing else None, failing[1] if failing else None, depth)


# ---------------------------------------------------------------------------------------- coverage


@dataclass
class FormCoverage:
    """How much of a form the EHR filled automatically. For forms with expected cells `expected` is the
    number of cells the protocol asks for by now, `filled` how many hold a value esource sent, `held`
    how many are held back by an open discrepancy; log forms (MH, CM) have no expected count: `records`."""

    form_oid: str
    kind: str  # subject | findings | log
    expected: int = 0
    filled: int = 0
    held: int = 0
    records: int = 0
    by_site: dict[str, tuple[int, int]] = field(default_factory=dict)  # site -> (filled, expected)

    @property
    def share(self) -> float | None:
        return None if self.kind == "log" or not self.expected else self.filled / self.expected


def coverage(uow: Any, study: Any, sites: Iterable[str] | None, today: dt.date) -> list[FormCoverage]:
    """Coverage per form (see `expected_cells`): cells filled automatically ÷ cells expected by `today`."""
    allowed = None if sites is None else set(sites)
    enrollments = [e for e in uow.enrollments(study.oid) if allowed is None or e.site_oid in allowed]
    site_of = {e.subject_key: e.site_oid for e in enrollments}
    s = uow.session
    st = _state
    filled: set[tuple[str, str, str, str, str]] = set()  # subject, event, form, group repeat, item
    records: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for subj, event, erk, form, igrk, item in s.execute(select(
            st.c.subject_key, st.c.study_event_oid, st.c.study_event_repeat_key, st.c.form_oid,
            st.c.item_group_repeat_key, st.c.item_oid).where(st.c.study_oid == study.oid)):
        if subj not in site_of:
            continue
        if not erk:  # scheduled visits only: unscheduled repeats are extra, not expected
            filled.add((subj, event, form, igrk, item))
        records[form].add((subj, igrk))
    held: set[tuple[str, str, str, str, str]] = set()
    d = _disc
    for subj, event, form, igrk, item in s.execute(select(
            d.c.subject_key, d.c.study_event_oid, d.c.form_oid, d.c.item_group_repeat_key, d.c.item_oid).where(
            d.c.study_oid == study.oid, d.c.status.in_(OPEN_DISCREPANCY_STATUSES))):
        if subj in site_of and event and form:
            held.add((subj, event, form, igrk or "", item or ""))
    out: dict[str, FormCoverage] = {}
    for form_oid, form in study.spec.forms.items():
        kind = getattr(form, "kind", "")
        out[form_oid] = FormCoverage(form_oid, "log" if kind in ("history", "medications") else kind)
    for e in enrollments:
        for cell in expected_cells(study, e, today):
            subj, event, form, igrk, item = cell
            cov = out[form]
            cov.expected += 1
            f_site, e_site = cov.by_site.get(e.site_oid, (0, 0))
            got = cell in filled
            cov.by_site[e.site_oid] = (f_site + got, e_site + 1)
            if got:
                cov.filled += 1
            elif cell in held or (subj, event, form, igrk, "") in held:
                cov.held += 1
    for form_oid, cov in out.items():
        if cov.kind == "log":
            cov.records = len(records.get(form_oid, ()))
    return list(out.values())


def expected_cells(study: Any, enrollment: Any, today: dt.date) -> list[tuple[str, str, str, str, str]]:
    """The eCRF cells the study expects for a subject by `today`, from the study map and its metadata:
    - a subject form (DM): each item the map fills, at the form's event;
    - a findings form (VS, LB): at each scheduled visit collecting the form whose window has opened
      (window start <= the study day of today, or of the withdrawal when earlier), one result per
      test the map defines (the result item; test code, unit and date go with it);
    - log forms (MH, CM) expect nothing: how many records a patient has is not known in advance.
    Cells are (SubjectKey, StudyEventOID, FormOID, ItemGroupRepeatKey or "", ItemOID)."""
    cells: list[tuple[str, str, str, str, str]] = []
    last_day = today if enrollment.withdrawal_date is None else min(today, enrollment.withdrawal_date)
    study_day = enrollment.study_day(last_day)
    for form_oid, form in study.spec.forms.items():
        kind = getattr(form, "kind", "")
        if kind == "subject":
            for item_oid in form.items.values():
                cells.append((enrollment.subject_key, form.event, form_oid, "", item_oid))
        elif kind == "findings":
            result = form.items.get("result")
            if not result:
                continue
            for visit in study.scheduled_visits(form_oid):
                if visit.window is None or visit.window[0] > study_day:
                    continue
                for test in form.tests:
                    cells.append((enrollment.subject_key, visit.oid, form_oid, test, result))
    return cells


# ---------------------------------------------------------------------------------------- map rules


@dataclass
class RuleStats:
    """One map rule (form / test or source type, as the map names it) and how it fared."""

    rule: str
    form_oid: str
    values_mapped: int = 0  # item values the map produced and queued (updates count again)
    records: int = 0  # eCRF records (visit + item group repeat) it fills now
    discrepancies: int = 0  # discrepancies it raised, any status
    open_discrepancies: int = 0
    last_error_kind: str | None = None
    last_error_message: str | None = None
    last_error_at: dt.datetime | None = None
    items: dict[str, int] = field(default_factory=dict)  # the rule's item roles -> values mapped

    @property
    def rate(self) -> float | None:
        """Discrepancies ÷ (records filled + discrepancies): the share of the rule's outcomes that needed a person."""
        total = self.records + self.discrepancies
        return None if total == 0 else self.discrepancies / total


def rule_group(rule: str | None, form_oid: str | None = None, source_type: str | None = None,
               group_repeat: str | None = None) -> str:
    """The rule a value or discrepancy belongs to at the map's level: `F.VS/WEIGHT/result` -> `F.VS/WEIGHT`;
    a discrepancy without a rule is filed under its form and test (a findings group repeat is the test
    code: `F.VS/HR`), else its form and source type (`F.MH/Condition`)."""
    if rule:
        parts = rule.split("/")
        return "/".join(parts[:2])
    if form_oid:
        if group_repeat and not group_repeat.isdigit():
            return f"{form_oid}/{group_repeat}"
        return f"{form_oid}/{source_type}" if source_type else form_oid
    return "-"


def rule_stats(uow: Any, study_oid: str, sites: Iterable[str] | None) -> list[RuleStats]:
    """Per map rule: values mapped (VALUE_MAPPED audit entries by esource itself), records filled now
    (item_state), discrepancies raised and the newest one (the last error)."""
    s = uow.session
    out: dict[str, RuleStats] = {}

    def get(group: str, form: str | None) -> RuleStats:
        found = out.get(group)
        if found is None:
            found = out[group] = RuleStats(group, form or group.split("/")[0])
        return found

    a = _audit
    q = select(a.c.rule, a.c.form_oid, func.count()).where(
        a.c.study_oid == study_oid, a.c.action == "value.mapped", a.c.actor == "system", a.c.rule.is_not(None),
        *_site_cond(a.c.site_oid, sites)).group_by(a.c.rule, a.c.form_oid)
    for rule, form, n in s.execute(q):
        r = get(rule_group(rule), form)
        r.values_mapped += int(n)
        if rule.count("/") >= 2:  # the item roles under a form/test rule (result, unit, date ...)
            role = rule.split("/", 2)[2]
            r.items[role] = r.items.get(role, 0) + int(n)
    st, e = _state, _enr
    joined = st.join(e, and_(e.c.study_oid == st.c.study_oid, e.c.subject_key == st.c.subject_key))
    q = (select(st.c.rule, st.c.form_oid, st.c.subject_key, st.c.study_event_oid, st.c.study_event_repeat_key,
                st.c.item_group_repeat_key).select_from(joined)
         .where(st.c.study_oid == study_oid, *_site_cond(e.c.site_oid, sites)))
    seen: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    for rule, form, subj, ev, erk, igrk in s.execute(q):
        if rule.startswith("manual:"):
            continue
        seen[rule_group(rule)].add((subj, ev, erk, igrk))
        get(rule_group(rule), form)
    for group, recs in seen.items():
        out[group].records = len(recs)
    d = _disc
    joined = d.join(e, and_(e.c.study_oid == d.c.study_oid, e.c.subject_key == d.c.subject_key))
    q = (select(d.c.rule, d.c.form_oid, d.c.source_type, d.c.item_group_repeat_key, d.c.kind, d.c.message, d.c.status,
                d.c.updated_at)
         .select_from(joined).where(d.c.study_oid == study_oid, *_site_cond(e.c.site_oid, sites))
         .order_by(d.c.updated_at, d.c.id))
    for rule, form, source_type, igrk, kind, message, status, updated in s.execute(q):
        r = get(rule_group(rule, form, source_type, igrk), form)
        r.discrepancies += 1
        if status in OPEN_DISCREPANCY_STATUSES:
            r.open_discrepancies += 1
        r.last_error_kind, r.last_error_message, r.last_error_at = kind, message, updated  # ordered: the newest wins
    return sorted(out.values(), key=lambda r: (r.form_oid, r.rule))


# ---------------------------------------------------------------------------------------- subjects


@dataclass
class SubjectLine:
    subject_key: str
    site_oid: str
    day1: dt.date
    withdrawn: dt.date | None
    items: int = 0
    open_discrepancies: int = 0
    transfers: int = 0
    last_transfer_status: str | None = None
    last_transfer_at: dt.datetime | None = None


def subject_lines(uow: Any, study_oid: str, sites: Iterable[str] | None) -> list[SubjectLine]:
    """The subjects the caller may see with their item, discrepancy and transfer counts (no values)."""
    allowed = None if sites is None else set(sites)
    lines = {e.subject_key: SubjectLine(e.subject_key, e.site_oid, e.day1, e.withdrawal_date)
             for e in uow.enrollments(study_oid) if allowed is None or e.site_oid in allowed}
    s = uow.session
    for subj, n in s.execute(select(_state.c.subject_key, func.count()).where(_state.c.study_oid == study_oid)
                             .group_by(_state.c.subject_key)):
        if subj in lines:
            lines[subj].items = int(n)
    for subj, n in s.execute(select(_disc.c.subject_key, func.count()).where(
            _disc.c.study_oid == study_oid, _disc.c.status.in_(OPEN_DISCREPANCY_STATUSES)).group_by(_disc.c.subject_key)):
        if subj in lines:
            lines[subj].open_discrepancies = int(n)
    o = _outbox
    for subj, status, created, n in s.execute(
            select(o.c.subject_key, o.c.status, o.c.created_at, func.count().over(partition_by=o.c.subject_key))
            .where(o.c.study_oid == study_oid).order_by(o.c.id)):
        if subj in lines:  # rows in id order: the last one seen is the newest
            line = lines[subj]
            line.transfers, line.last_transfer_status, line.last_transfer_at = int(n), status, created
    return [lines[k] for k in sorted(lines)]
