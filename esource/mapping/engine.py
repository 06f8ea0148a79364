"""The mapping engine: one subject's source resources -> eCRF items, not-sent readings, discrepancies.

Pure domain code: no I/O. It runs over *all* of a subject's source facts every time (visit selection
depends on every reading, not only the newest message), so re-running is idempotent by construction;
the state diff downstream decides what actually goes out.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

from esource.domain.model import (
    Discrepancy,
    DiscrepancyKind,
    Enrollment,
    ItemKey,
    ItemValue,
    MappingResult,
    NotSent,
    Severity,
    SourceRef,
    SourceResource,
)
from esource.domain.ports import FirstSeenRegistry, InMemoryFirstSeen, InMemoryRepeatKeys, RepeatKeyAllocator
from esource.intake.parse import ParsedInput
from esource.intake.references import ReferenceResolver
from esource.intake.validate import validate_resource
from esource.mapping.dates import FhirDateTime, parse_fhir_datetime
from esource.mapping.findings import FindingsMapper, Problem, Reading, in_window, selection_key
from esource.mapping.numbers import fraction_str, to_exact
from esource.mapping.units import UnitConverter
from esource.privacy import mask_if_birth_date
from esource.study.mapspec import FindingsForm, HistoryForm, MedicationsForm, SubjectForm, Visit
from esource.study.study import CompiledForm, Study

_DATE_TYPES = {"date", "partialDate", "datetime", "partialDatetime"}


@dataclass
class MappingContext:
    """The engine's memory across messages (ports), and today's date for first-seen records."""

    repeat_keys: RepeatKeyAllocator = field(default_factory=InMemoryRepeatKeys)
    first_seen: FirstSeenRegistry = field(default_factory=InMemoryFirstSeen)
    today: dt.date = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).date())
    validate: bool = True  # validate selected resources with fhir.resources (R4B)
    # Incremental findings: the source identities new or changed since the last run, and the findings
    # buckets (StudyEventOID, event repeat key, FormOID, test code) that held values sent from them.
    # Only buckets holding one of their readings (or listed) are re-selected; the others produced the
    # same values last time. None = everything (a full re-map: map, Day 1 or withdrawal changes).
    changed: frozenset[str] | None = None
    changed_buckets: frozenset[tuple[str, str | None, str, str | None]] = frozenset()
    # the clinical dates the changed records had before: the buckets of those days are re-selected too
    # (a reading that left one, held or not, changes what is left there to select)
    previous_dates: frozenset[dt.date] = frozenset()


VALIDATION_MEMO_SIZE = 100_000  # validation results kept (source identity + version -> issues)

# the clinical date of an Observation that holds no reading of this map: never placed in a visit
NO_READING = dt.date(1, 1, 1)
DateRange = tuple[dt.date, dt.date]


class MappingEngine:
    def __init__(self, study: Study, converter: UnitConverter | None = None) -> None:
        self.study = study
        self.converter = converter or UnitConverter()
        self.findings = FindingsMapper(study, self.converter)
        self._validated: dict[tuple[Any, ...], list[Any]] = {}
        self._resource_types = self._needed_types()
        # Observations only findings forms read can be loaded by date (see clinical_date)
        self._dated_observations = not any(
            "Observation" in (f.resources if hasattr(f, "resources") else [f.resource])
            for f in study.spec.forms.values() if not isinstance(f, FindingsForm))
        self.clinical_basis = self._clinical_basis()

    def _clinical_basis(self) -> str:
        """What `clinical_date` depends on in this map (test codes and findings date selectors): a
        date stored under another basis (the map changed) is not trusted by `fact_ranges`."""
        tests = sorted(f"{k[0]}|{k[1]}|{v.form_oid}" for k, v in self.study.test_index.items())
        dates = {name: f.select.get("date") for name, f in sorted(self.study.spec.forms.items())
                 if isinstance(f, FindingsForm)}
        raw = json.dumps([tests, dates, self._dated_observations], sort_keys=True).encode()
        return hashlib.sha256(raw).hexdigest()[:16]

    # ------------------------------------------------------------------ incremental runs: which facts

    def clinical_date(self, resource_type: str, resource: dict[str, Any]) -> dt.date | None:
        """The day an Observation's readings are placed on (the findings date selector), so that an
        incremental run can load only the facts near the visits it re-selects. `NO_READING` when the
        Observation holds no test of this map; None (the fact is read by every run) for any other
        resource, an Observation without a valid day, or when a non-findings form reads Observations."""
        if resource_type != "Observation" or not self._dated_observations:
            return None
        src = SourceResource("Observation", None, None, resource, SourceRef("Observation", None, "-", "-"), "store", 0)
        readings = self.findings.extract(src)
        if not readings:
            return NO_READING
        first = readings[0]
        if first.problem is not None or first.when is None:
            return None
        return first.when.date()

    def fact_ranges(self, enrollment: Enrollment, changed_dates: Iterable[dt.date | None],
                    buckets: Iterable[tuple[str, str | None, str, str | None]]) -> list[DateRange] | None:
        """The clinical dates an incremental run must see: every visit window holding a changed
        reading's day (and that day, for an unscheduled repeat), and the windows of the findings
        buckets to re-select. None: load everything (a bucket whose dates cannot be bounded)."""
        visits = [v for v in self.study.spec.visits if not v.log and v.window is not None]
        by_oid = {v.oid: v for v in self.study.spec.visits}
        findings = {name for name, f in self.study.spec.forms.items() if isinstance(f, FindingsForm)}
        out: list[DateRange] = []

        def window(v: Visit) -> DateRange:
            assert v.window is not None
            return enrollment.date_of_day(v.window[0]), enrollment.date_of_day(v.window[1])

        for d in changed_dates:
            if d is None or d == NO_READING:
                continue
            out.append((d, d))
            day = enrollment.study_day(d)
            out.extend(window(v) for v in visits if not v.unscheduled and in_window(v, day))
        for event, event_repeat, form, _test in buckets:
            if form not in findings:
                continue  # history and medication facts carry no clinical date: always loaded
            v = by_oid.get(event)
            if v is None:
                return None
            if not v.unscheduled:
                if v.window is None:
                    return None
                out.append(window(v))
                continue
            try:
                if event_repeat is not None and len(event_repeat) == 10:
                    d = dt.date.fromisoformat(event_repeat)
                    out.append((d, d))
                elif event_repeat is not None and len(event_repeat) == 7:  # masked to YYYY-MM
                    first = dt.date.fromisoformat(event_repeat + "-01")
                    nxt = (first.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
                    out.append((first, nxt - dt.timedelta(days=1)))
                else:
                    return None
            except ValueError:
                return None
        return _merge_ranges(out)

    def _needed_types(self) -> frozenset[str]:
        types = {"Patient", "Medication"}
        for f in self.study.spec.forms.values():
            if hasattr(f, "resource"):
                types.add(f.resource)
            else:
                types.update(f.resources)
        return frozenset(types)

    @property
    def resource_types(self) -> frozenset[str]:
        """The resource types this study's map reads: everything else is ignored at intake."""
        return self._resource_types

    def map_subject(
        self,
        enrollment: Enrollment,
        resources: Sequence[SourceResource],
        ctx: MappingContext | None = None,
        *,
        deletions: Iterable[str] = (),
        invalid_entries: Iterable[tuple[SourceRef | None, str]] = (),
    ) -> MappingResult:
        run = _Run(self, enrollment, list(resources), ctx or MappingContext())
        for ref, message in invalid_entries:
            run.disc(DiscrepancyKind.INVALID_SOURCE, message, ref, severity=Severity.ERROR)
        for url in deletions:
            rtype, _, rid = url.partition("/")
            rid = rid.split("/")[0]
            ref = SourceRef(rtype, rid or None, "deleted", f"{rtype}/{rid}")
            run.result.retracted_sources[ref.identity] = ref
        return run.execute()


def _merge_ranges(ranges: list[DateRange]) -> list[DateRange]:
    out: list[DateRange] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + dt.timedelta(days=1):
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


class _Run:
    """One mapping run for one subject."""

    def __init__(self, engine: MappingEngine, enrollment: Enrollment, resources: list[SourceResource],
                 ctx: MappingContext) -> None:
        self.engine = engine
        self.study = engine.study
        self.spec = engine.study.spec
        self.enr = enrollment
        self.ctx = ctx
        self.resources = [r for r in resources if r.resource_type in engine.resource_types]
        self.result = MappingResult()
        self.birth_date: dt.date | None = None
        self.identifying: set[str] = set()
        self._resolver: ReferenceResolver | None = None

    # ------------------------------------------------------------------ helpers

    @property
    def resolver(self) -> ReferenceResolver:
        if self._resolver is None:
            self._resolver = ReferenceResolver(ParsedInput(origin="subject", bundle_type="collection",
                                                           resources=self.resources, problems=[], deletions=[]))
        return self._resolver

    def disc(self, kind: DiscrepancyKind, message: str, source: SourceRef | None, *, item_oid: str | None = None,
             event: str | None = None, form: str | None = None, repeat: str | None = None,
             held: str | None = None, candidates: Iterable[dict[str, Any]] = (),
             severity: Severity = Severity.WARNING, rule: str | None = None) -> None:
        self.result.discrepancies.append(Discrepancy(
            kind=kind, message=message, study_oid=self.study.oid, subject_key=self.enr.subject_key, source=source,
            item_oid=item_oid, study_event_oid=event, form_oid=form, item_group_repeat_key=repeat,
            held_value=held, candidates=tuple(candidates), severity=severity, rule=rule))

    def not_sent(self, reason: str, source: SourceRef, *, form: str | None = None, test: str | None = None,
                 event: str | None = None, detail: str | None = None) -> None:
        self.result.not_sent.append(NotSent(reason, source, form, test, event, detail))

    def item(self, event: str, event_repeat: str | None, form: CompiledForm, group_repeat: str | None, role: str,
             value: str | None, source: SourceRef, rule: str, conversions: Iterable[str] = ()) -> None:
        item_oid = form.spec.items.get(role)
        if item_oid is None or value is None or value == "":
            return
        key = ItemKey(self.study.oid, self.enr.subject_key, event, event_repeat, form.oid, form.spec.item_group,
                      group_repeat, item_oid)
        self.result.items.append(ItemValue(key, value, source, rule, tuple(conversions)))

    def invalid(self, src: SourceResource, elements: list[str]) -> list[Any]:
        """fhir.resources (R4B) validation of what the map reads, for a selected resource only."""
        if not self.ctx.validate:
            return []
        # memoised across runs by source identity and version (they fix the stored content)
        k = (src.ref.identity, src.ref.version, tuple(elements))
        memo = self.engine._validated
        if k not in memo:
            if len(memo) >= VALIDATION_MEMO_SIZE:
                memo.clear()
            memo[k] = validate_resource(src.resource, elements=elements or None)
        return memo[k]

    def invalid_problem(self, src: SourceResource, elements: list[str]) -> Problem | None:
        issues = self.invalid(src, elements)
        if not issues:
            return None
        first = issues[0]
        more = f" (and {len(issues) - 1} more)" if len(issues) > 1 else ""
        return Problem(DiscrepancyKind.INVALID_SOURCE, f"invalid FHIR: {first.element}: {first.message}{more}")

    def after_withdrawal(self, d: dt.date | None) -> bool:
        return self.enr.withdrawal_date is not None and d is not None and d > self.enr.withdrawal_date

    def parse_date(self, value: Any) -> FhirDateTime | None:
        if not isinstance(value, str):
            return None
        try:
            return parse_fhir_datetime(value)
        except ValueError:
            return None

    # ------------------------------------------------------------------ run

    def execute(self) -> MappingResult:
        patients = [r for r in self.resources if r.resource_type == "Patient"]
        self.collect_identifying(patients)
        forms = self.study.forms
        by_kind: dict[str, list[CompiledForm]] = {}
        for f in forms.values():
            by_kind.setdefault(f.spec.kind, []).append(f)
        for f in by_kind.get("subject", []):
            self.map_subject_form(f, patients)
        if by_kind.get("findings"):
            self.map_findings()
        for f in by_kind.get("history", []):
            self.map_history(f)
        for f in by_kind.get("medications", []):
            self.map_medications(f)
        self.apply_privacy()
        return self.result

    # ------------------------------------------------------------------ DM

    def collect_identifying(self, patients: list[SourceResource]) -> None:
        """Birth date (for masking) and identifying strings (to make sure none leaves)."""
        births = set()
        for p in patients:
            res = p.resource
            bd = self.parse_date(res.get("birthDate"))
            if bd is not None and bd.date() is not None:
                births.add(bd.date())
            for ident in res.get("identifier") or []:
                if isinstance(ident, dict) and isinstance(ident.get("value"), str):
                    self.identifying.add(ident["value"].strip().lower())
            for name in res.get("name") or []:
                if isinstance(name, dict):
                    parts = [name.get("text"), name.get("family"), *(name.get("given") or [])]
                    self.identifying.update(x.strip().lower() for x in parts if isinstance(x, str))
            for t in res.get("telecom") or []:
                if isinstance(t, dict) and isinstance(t.get("value"), str):
                    self.identifying.add(t["value"].strip().lower())
            if p.id:
                self.identifying.add(p.id.lower())
        self.identifying = {s for s in self.identifying if len(s) >= 3}
        if len(births) == 1:
            self.birth_date = births.pop()

    def map_subject_form(self, form: CompiledForm, patients: list[SourceResource]) -> None:
        spec: SubjectForm = form.spec
        if not patients:
            return
        # several Patient resources: the source named for a value must not depend on their order
        patients = sorted(patients, key=lambda p: (p.ref.identity, p.ref.version))
        event = spec.event
        rule = f"{form.oid}"
        # birth year
        years: dict[str, SourceResource] = {}
        for p in patients:
            bd, _ = form.selectors["birth_date"](p.resource)
            parsed = self.parse_date(bd)
            if bd is not None and parsed is None:
                self.disc(DiscrepancyKind.INVALID_SOURCE, f"Patient.birthDate {bd!r} is not a valid date", p.ref,
                          item_oid=spec.items.get("birth_year"), event=event, form=form.oid)
                continue
            if parsed is not None:
                years.setdefault(str(parsed.year), p)
        if len(years) == 1:
            (year, p), = years.items()
            self.item(event, None, form, None, "birth_year", year, p.ref, f"{rule}/birth_year",
                      ["year of Patient.birthDate (the full birth date never leaves the hospital)"])
        elif len(years) > 1:
            self.disc(DiscrepancyKind.AMBIGUOUS_DATA, f"the Patient resources give different birth years: "
                      f"{', '.join(sorted(years))}; nothing was sent", None, item_oid=spec.items.get("birth_year"),
                      event=event, form=form.oid)
        # sex
        table: dict[str, str] = spec.codes.get("sex", {})
        sexes: dict[str, SourceResource] = {}
        for p in patients:
            g, _ = form.selectors["gender"](p.resource)
            if g is None:
                continue
            if g in table:
                sexes.setdefault(table[g], p)
            else:
                self.disc(DiscrepancyKind.UNKNOWN_GENDER,
                          f"Patient.gender is {g!r}, which has no CDISC SEX (C66731) value in the study map; "
                          f"please review", p.ref, item_oid=spec.items.get("sex"), event=event, form=form.oid)
        if len(sexes) == 1:
            (sex, p), = sexes.items()
            self.item(event, None, form, None, "sex", sex, p.ref, f"{rule}/sex", [f"gender {p.resource.get('gender')} -> {sex}"])
        elif len(sexes) > 1:
            self.disc(DiscrepancyKind.AMBIGUOUS_DATA, f"the Patient resources give different sexes: "
                      f"{', '.join(sorted(sexes))}; nothing was sent", None, item_oid=spec.items.get("sex"),
                      event=event, form=form.oid)

    # ------------------------------------------------------------------ VS / LB

    def map_findings(self) -> None:
        fm = self.engine.findings
        candidates: dict[tuple[str, str, str, str | None], list[Reading]] = {}
        visits_by_oid = {v.oid: v for v in self.spec.visits}
        for src in self.resources:
            if src.resource_type != "Observation":
                continue
            readings = fm.readings(src)
            if not readings:
                continue
            for r in readings:
                form = self.study.forms[r.form_oid]
                spec: FindingsForm = form.spec
                status = r.status
                if status in spec.statuses.retracted:
                    self.result.retracted_sources[r.ref.identity] = r.src.ref
                    self.not_sent(f"source marked {status}", r.ref, form=r.form_oid, test=r.test)
                    continue
                if status in spec.statuses.wait:
                    self.not_sent(f"status {status}: waiting for the final version", r.ref, form=r.form_oid, test=r.test)
                    continue
                status_problem: Problem | None = None
                if status not in spec.statuses.send:
                    # a valid FHIR status that is not sent (cancelled, unknown): not a candidate. A status
                    # that is not a valid code (or missing) makes the resource invalid: it takes part in
                    # selection and, if selected, is held (selection rule 5), never silently skipped.
                    issues = validate_resource(r.src.resource, elements=["status"])
                    if not issues:
                        self.not_sent(f"status {status!r} is not sent", r.ref, form=r.form_oid, test=r.test)
                        continue
                    status_problem = Problem(DiscrepancyKind.INVALID_SOURCE,
                                             f"invalid FHIR: {issues[0].element}: {issues[0].message}")
                if r.problem is not None:  # date present but invalid
                    self.disc(r.problem.kind, f"{r.test}: {r.problem.message}; the reading cannot be placed in a visit",
                              r.ref, item_oid=spec.items.get("result"), form=r.form_oid, repeat=r.test,
                              severity=Severity.ERROR)
                    continue
                if r.when is None or r.date is None:
                    what = ("the date is not precise to the day: " + r.when.iso_date()) if r.when else \
                        "no effectiveDateTime, effectivePeriod.start or effectiveInstant"
                    self.disc(DiscrepancyKind.MISSING_DATE, f"{r.test} reading has {what}; it cannot be placed in a "
                              f"visit and was not sent", r.ref, item_oid=spec.items.get("date"), form=r.form_oid,
                              repeat=r.test)
                    self.not_sent("missing date", r.ref, form=r.form_oid, test=r.test)
                    continue
                if self.after_withdrawal(r.date):
                    self.not_sent("dated after the subject's withdrawal", r.ref, form=r.form_oid, test=r.test,
                                  detail=r.when.iso_date())
                    continue
                if status_problem is not None:
                    r.problem, r.evaluated = status_problem, True
                r.day = self.enr.study_day(r.date)
                placed = False
                for v in self.study.scheduled_visits(r.form_oid):
                    if in_window(v, r.day):
                        candidates.setdefault((v.oid, r.form_oid, r.test, None), []).append(r)
                        placed = True
                if placed:
                    continue
                uv = self.study.unscheduled_visit(r.form_oid)
                if uv is not None and in_window(uv, r.day):
                    candidates.setdefault((uv.oid, r.form_oid, r.test, r.date.isoformat()), []).append(r)
                    continue
                self.not_sent(f"study day {r.day} is outside every visit window for {r.form_oid}", r.ref,
                              form=r.form_oid, test=r.test, detail=r.when.iso_date())
        touched = self._touched_buckets(candidates, visits_by_oid)
        for (event, form_oid, test, event_repeat), cands in candidates.items():
            if touched is None or (event, event_repeat, form_oid, test) in touched:
                self.select(visits_by_oid[event], event_repeat, self.study.forms[form_oid], test, cands)

    def _touched_buckets(self, candidates: dict[tuple[str, str, str, str | None], list[Reading]],
                         visits_by_oid: dict[str, Visit]) -> set[tuple[str, str | None, str, str]] | None:
        """The findings buckets to re-select (None: all). A bucket's selection depends only on its own
        readings, so a bucket none of whose readings changed, and none of whose readings left it (its
        window holds none of `previous_dates`), selects what it selected before."""
        changed = self.ctx.changed
        if changed is None or any(r.ref.identity in changed for r in self.resources if r.resource_type == "Patient"):
            return None  # the birth date (masking) or identifying strings may have changed: everything
        touched: set[tuple[str, str | None, str, str]] = set()
        months = set()
        for event, event_repeat, form_oid, test in self.ctx.changed_buckets:
            if test is None:
                continue
            touched.add((event, event_repeat, form_oid, test))
            if event_repeat is not None and len(event_repeat) == 7:  # masked to YYYY-MM (birth date)
                months.add((event, event_repeat, form_oid, test))
        previous = self.ctx.previous_dates
        days = {self.enr.study_day(d) for d in previous}
        texts = {d.isoformat() for d in previous} | {d.isoformat()[:7] for d in previous}
        for (event, form_oid, test, event_repeat), cands in candidates.items():
            key = (event, event_repeat, form_oid, test)
            if key in touched:
                continue
            if any(r.ref.identity in changed for r in cands) or (
                    event_repeat is not None and (event, event_repeat[:7], form_oid, test) in months):
                touched.add(key)
            elif event_repeat is not None and event_repeat in texts:  # an unscheduled visit of that day
                touched.add(key)
            elif event_repeat is None and any(in_window(visits_by_oid[event], day) for day in days):
                touched.add(key)
        return touched

    def select(self, visit: Visit, event_repeat: str | None, form: CompiledForm, test: str,
               cands: list[Reading]) -> None:
        fm = self.engine.findings
        spec: FindingsForm = form.spec
        cands.sort(key=lambda r: selection_key(visit, r))
        first = cands[0]
        top_key = (first.day, first.time_key())
        tied = [r for r in cands if (r.day, r.time_key()) == top_key]
        rest = [r for r in cands if (r.day, r.time_key()) != top_key]
        for r in tied:
            fm.evaluate(r, form)
            if r.problem is None:
                p = self.invalid_problem(r.src, spec.validate_elements)
                if p is not None:
                    r.problem = p
        result_oid = spec.items.get("result")
        rule = f"{form.oid}/{test}"
        where = f"{test} at {visit.oid}" + (f" ({event_repeat})" if event_repeat else "")
        if len(tied) > 1:
            outcomes = {(r.text, r.problem.kind if r.problem else None) for r in tied}
            if len(outcomes) > 1:
                self.disc(DiscrepancyKind.AMBIGUOUS_DATA,
                          f"{where}: {len(tied)} readings on {first.when.iso_date()}"
                          f"{' at ' + first.when.hhmm() if first.when.time else ''} give different values "
                          f"({', '.join(sorted(str(r.text or (r.problem and r.problem.message)) for r in tied))}); "
                          f"nothing was sent", first.ref, item_oid=result_oid, event=visit.oid, form=form.oid,
                          repeat=test, candidates=[r.summary() for r in tied], rule=rule)
                for r in cands:
                    self.not_sent("ambiguous: tied readings differ", r.ref, form=form.oid, test=test, event=visit.oid)
                return
        chosen = first
        if chosen.problem is not None:
            nxt = rest[0] if rest else None
            nxt_text = (f" Next candidate: {nxt.ref.resource_type}/{nxt.ref.id} on {nxt.when.iso_date()}."
                        if nxt and nxt.when else " There is no other candidate.")
            self.disc(chosen.problem.kind,
                      f"{where}: the selected reading ({chosen.when.iso_date()}) is held: {chosen.problem.message}.{nxt_text}",
                      chosen.ref, item_oid=result_oid, event=visit.oid, form=form.oid, repeat=test,
                      held=chosen.text, candidates=[nxt.summary()] if nxt else [], rule=rule,
                      severity=Severity.ERROR if chosen.problem.kind == DiscrepancyKind.INVALID_SOURCE else Severity.WARNING)
            for r in cands:
                self.not_sent("held: the selected reading failed a check" if r is chosen else
                              "not selected (the selected reading is held)", r.ref, form=form.oid, test=test,
                              event=visit.oid)
            return
        if "reference_range" in form.lists or "interpretation" in form.lists:
            fm.reference_range(chosen, form)
        group_repeat = test
        src = chosen.ref
        when = chosen.when
        assert when is not None
        self.item(visit.oid, event_repeat, form, group_repeat, "testcd", test, src, f"{rule}/testcd")
        self.item(visit.oid, event_repeat, form, group_repeat, "result", chosen.text, src, f"{rule}/result",
                  chosen.conversions)
        self.item(visit.oid, event_repeat, form, group_repeat, "unit", chosen.tdef.label, src, f"{rule}/unit")
        self.item(visit.oid, event_repeat, form, group_repeat, "date", when.iso_date(), src, f"{rule}/date",
                  [f"from {chosen.date_path}"])
        if when.time is not None:
            self.item(visit.oid, event_repeat, form, group_repeat, "time", when.hhmm(), src, f"{rule}/time")
        self.item(visit.oid, event_repeat, form, group_repeat, "range_low", chosen.range_low, src, f"{rule}/range_low")
        self.item(visit.oid, event_repeat, form, group_repeat, "range_high", chosen.range_high, src, f"{rule}/range_high")
        self.item(visit.oid, event_repeat, form, group_repeat, "nrind", chosen.nrind, src, f"{rule}/nrind")
        if len(tied) > 1:
            for r in tied[1:]:
                self.not_sent("tied with the selected reading, same value: sent once", r.ref, form=form.oid,
                              test=test, event=visit.oid)
        for r in rest:
            if r.day == chosen.day:
                why = ("a reading with a time comes before a date-only one" if chosen.when.time is not None
                       and (r.when is None or r.when.time is None) else "earlier reading on the same date")
            elif isinstance(visit.target, int):
                why = ("closer to the target day" if abs(chosen.day - visit.target) < abs(r.day - visit.target)
                       else "same distance to the target day: the earlier day")
            else:
                why = "later day" if visit.target == "latest" else "earlier day"
            self.not_sent(f"not selected for {visit.oid}: the reading of {when.iso_date()} was preferred ({why})",
                          r.ref, form=form.oid, test=test, event=visit.oid)

    # ------------------------------------------------------------------ MH

    def _codings(self, node: Any) -> list[dict[str, Any]]:
        if not isinstance(node, dict):
            return []
        return [c for c in node.get("coding") or [] if isinstance(c, dict)]

    def _pick_code(self, codings: list[dict[str, Any]], preference: list[str], names: dict[str, str]) -> tuple[str, str] | None:
        for key in preference:
            uris = self.study.uris(key)
            for c in codings:
                if c.get("system") in uris and c.get("code"):
                    return str(c["code"]), names.get(key, key)
        return None

    def _onset(self, form: CompiledForm, src: SourceResource) -> tuple[FhirDateTime | None, str | None, bool]:
        """(onset, the element it came from, whether it is the first-seen date). An onset that is
        written but is not a date gives (None, element, False): the resource is invalid, and the
        first-seen date must not stand in for it."""
        value, path = form.selectors["onset"](src.resource)
        if value is not None:
            parsed = self.parse_date(value)
            if parsed is not None:
                return parsed, path, False
            return None, path, False
        seen = self.ctx.first_seen.first_seen(self.study.oid, self.enr.subject_key, src.ref.identity, self.ctx.today)
        return FhirDateTime(seen.year, seen.month, seen.day, None, False), "first seen by esource", True

    def map_history(self, form: CompiledForm) -> None:
        spec: HistoryForm = form.spec
        no_info_systems = {u for k in spec.no_information.systems for u in self.study.uris(k)}
        snomed = set(self.study.uris("snomed"))
        no_info_snomed = set(spec.no_information.snomed)
        event = spec.event
        for src in self.resources:
            if src.resource_type not in spec.resources:
                continue
            res = src.resource
            rtype = src.resource_type
            codings = self._codings(res.get("code"))
            if any(c.get("system") in no_info_systems or (c.get("system") in snomed and c.get("code") in no_info_snomed)
                   for c in codings):
                self.not_sent("a 'no known / no information' entry: neither history nor an event", src.ref, form=form.oid)
                continue
            verification = form.lists["verification_status"](res)
            if any(v in spec.excluded_verification for v in verification):
                if "entered-in-error" in verification:
                    self.result.retracted_sources[src.ref.identity] = src.ref
                self.not_sent(f"verification status {', '.join(verification)}", src.ref, form=form.oid)
                continue
            if rtype == "Condition":
                cats = form.lists["category"](res)
                if cats and not any(c in spec.categories.accept for c in cats):
                    self.not_sent(f"Condition category {', '.join(map(str, cats))} is not medical history",
                                  src.ref, form=form.oid)
                    continue
                if not cats and not spec.categories.accept_missing:
                    self.not_sent("Condition without a category", src.ref, form=form.oid)
                    continue
            label = f"{rtype}/{src.id}" if src.id else rtype
            onset, onset_path, from_first_seen = self._onset(form, src)
            problem = self.invalid_problem(src, spec.validate_elements)
            if problem is None and onset is None:
                problem = Problem(DiscrepancyKind.INVALID_SOURCE, f"{onset_path} is not a valid date")
            if problem is not None:
                self.disc(DiscrepancyKind.INVALID_SOURCE, f"{label}: {problem.message}; nothing was sent (neither "
                          f"history nor a possible adverse event can be decided)", src.ref, form=form.oid,
                          event=event, severity=Severity.ERROR)
                self.not_sent("invalid source resource", src.ref, form=form.oid)
                continue
            assert onset is not None
            term = (form.selectors["text"](res)[0] if "text" in form.selectors else None) or next(
                (c.get("display") for c in codings if c.get("display")), None)
            if onset.latest() >= self.enr.consent_date:
                self.disc(DiscrepancyKind.POSSIBLE_ADVERSE_EVENT,
                          f"{term or label}: onset {onset.iso_date()} ({onset_path}) is on or after consent "
                          f"({self.enr.consent_date.isoformat()}): a possible adverse event for the investigator "
                          f"to assess; adverse events are never filled automatically", src.ref, form=form.oid,
                          event=event, severity=Severity.WARNING)
                self.not_sent("onset on or after consent: possible adverse event", src.ref, form=form.oid)
                continue
            if self.enr.withdrawal_date is not None and from_first_seen and onset.earliest() > self.enr.withdrawal_date:
                self.not_sent("undated, learnt after the subject's withdrawal", src.ref, form=form.oid)
                continue
            if term is None:
                self.disc(DiscrepancyKind.MISSING_VALUE, f"{label} has no code text or display for MHTERM; "
                          f"nothing was sent", src.ref, item_oid=spec.items.get("term"), form=form.oid, event=event)
                continue
            repeat = str(self.ctx.repeat_keys.key_for(self.study.oid, self.enr.subject_key, form.oid, src.ref.identity))
            rule = f"{form.oid}/{rtype}"
            self.item(event, None, form, repeat, "term", term, src.ref, f"{rule}/term")
            picked = self._pick_code(codings, spec.code_preference, spec.code_system_names)
            if picked:
                self.item(event, None, form, repeat, "code", picked[0], src.ref, f"{rule}/code")
                self.item(event, None, form, repeat, "code_system", picked[1], src.ref, f"{rule}/code_system")
            elif codings:
                systems = ", ".join(sorted({str(c.get('system')) for c in codings}))
                self.disc(DiscrepancyKind.UNMAPPED_CODE, f"{term}: no SNOMED CT or ICD-10 coding (only {systems}); "
                          f"MHCODE was not sent", src.ref, item_oid=spec.items.get("code"), form=form.oid,
                          event=event, repeat=repeat, severity=Severity.INFO)
            self.item(event, None, form, repeat, "category", spec.codes.get("category", {}).get(rtype), src.ref,
                      f"{rule}/category")
            if not from_first_seen:
                self.item(event, None, form, repeat, "start", onset.iso_date(), src.ref, f"{rule}/start",
                          [f"from {onset_path}"])
            if "abatement" in form.selectors:
                ab, ab_path = form.selectors["abatement"](res)
                ab_date = self.parse_date(ab)
                if ab_date is not None:
                    self.item(event, None, form, repeat, "end", ab_date.iso_date(), src.ref, f"{rule}/end",
                              [f"from {ab_path}"])
            statuses = form.lists["clinical_status"](res)
            ongoing_table = spec.codes.get("ongoing", {})
            ongoing = next((ongoing_table[s] for s in statuses if s in ongoing_table), None)
            if ongoing is None:
                ongoing = spec.codes.get("ongoing_absent") if not statuses else None
            self.item(event, None, form, repeat, "ongoing", ongoing, src.ref, f"{rule}/ongoing")

    # ------------------------------------------------------------------ CM

    def map_medications(self, form: CompiledForm) -> None:
        spec: MedicationsForm = form.spec
        event = spec.event
        consent_cutoff = self.enr.consent_date - dt.timedelta(days=spec.lookback_days)
        meds = [r for r in self.resources if r.resource_type in spec.resources]
        no_info_systems = {u for k in spec.no_information.systems for u in self.study.uris(k)}
        no_info_snomed = set(spec.no_information.snomed)
        snomed = set(self.study.uris("snomed"))

        def no_information(src: SourceResource) -> bool:
            med = self.resolver.medication_of(src)
            return any(c.get("system") in no_info_systems or (c.get("system") in snomed and c.get("code") in no_info_snomed)
                       for c in self._codings(med))

        statement_codes: set[tuple[str, str]] = set()
        for src in meds:
            # a retracted statement is no statement: it does not stand in for a request
            if src.resource_type == "MedicationStatement" and src.resource.get("status") not in spec.statuses.retracted:
                statement_codes.update(self._med_codes(src))
        for src in meds:
            res = src.resource
            status = res.get("status")
            label = f"{src.resource_type}/{src.id}" if src.id else src.resource_type
            if status in spec.statuses.retracted:
                self.result.retracted_sources[src.ref.identity] = src.ref
                self.not_sent(f"source marked {status}", src.ref, form=form.oid)
                continue
            if no_information(src):
                self.not_sent("a 'no known / no information' entry: not a medication", src.ref, form=form.oid)
                continue
            if src.resource_type == "MedicationRequest":
                codes = self._med_codes(src)
                if codes & statement_codes:
                    self.not_sent("a MedicationStatement for the same medication is used instead", src.ref,
                                  form=form.oid)
                    continue
            start_raw, start_path = form.selectors["start"](res)
            end_raw, end_path = form.selectors["end"](res)
            start, end = self.parse_date(start_raw), self.parse_date(end_raw)
            problem = self.invalid_problem(src, spec.validate_elements)
            if problem is None and (start_raw is not None and start is None or end_raw is not None and end is None):
                problem = Problem(DiscrepancyKind.INVALID_SOURCE, f"{start_path if start is None and start_raw is not None else end_path} "
                                  f"is not a valid date")
            if problem is not None:
                self.disc(DiscrepancyKind.INVALID_SOURCE, f"{label}: {problem.message}; nothing was sent", src.ref,
                          form=form.oid, event=event, severity=Severity.ERROR)
                self.not_sent("invalid source resource", src.ref, form=form.oid)
                continue
            active = status in spec.statuses.active
            dated = start is not None or end is not None
            recent = (start is not None and start.latest() >= consent_cutoff) or (
                end is not None and end.latest() >= consent_cutoff)
            if not (active or recent):
                self.not_sent("neither active nor taken within the look-back before consent" if dated else
                              "no date and not active", src.ref, form=form.oid)
                continue
            if start is not None and self.after_withdrawal(start.earliest()):
                self.not_sent("started after the subject's withdrawal", src.ref, form=form.oid)
                continue
            if not dated and self.enr.withdrawal_date is not None:
                seen = self.ctx.first_seen.first_seen(self.study.oid, self.enr.subject_key, src.ref.identity,
                                                      self.ctx.today)
                if seen > self.enr.withdrawal_date:
                    self.not_sent("undated, learnt after the subject's withdrawal", src.ref, form=form.oid)
                    continue
            med = self._medication(src, form)
            term = None
            if isinstance(med, dict):
                term = med.get("text") or next((c.get("display") for c in self._codings(med) if c.get("display")), None)
            if term is None:
                self.disc(DiscrepancyKind.MISSING_VALUE, f"{label}: the medication has no text or display (CMTRT); "
                          f"nothing was sent", src.ref, item_oid=spec.items.get("treatment"), form=form.oid, event=event)
                continue
            repeat = str(self.ctx.repeat_keys.key_for(self.study.oid, self.enr.subject_key, form.oid, src.ref.identity))
            rule = f"{form.oid}/{src.resource_type}"
            self.item(event, None, form, repeat, "treatment", term, src.ref, f"{rule}/treatment")
            picked = self._pick_code(self._codings(med), spec.code_preference, spec.code_system_names)
            if picked:
                self.item(event, None, form, repeat, "code", picked[0], src.ref, f"{rule}/code")
                self.item(event, None, form, repeat, "code_system", picked[1], src.ref, f"{rule}/code_system")
            self._dosage(form, src, repeat, term, rule)
            if start is not None:
                self.item(event, None, form, repeat, "start", start.iso_date(), src.ref, f"{rule}/start",
                          [f"from {start_path}"])
            if end is not None:
                self.item(event, None, form, repeat, "end", end.iso_date(), src.ref, f"{rule}/end")
            ongoing = "Y" if active and end is None else ("N" if end is not None or status in spec.statuses.ended else None)
            self.item(event, None, form, repeat, "ongoing", ongoing, src.ref, f"{rule}/ongoing")

    def _medication(self, src: SourceResource, form: CompiledForm) -> dict[str, Any] | None:
        return self.resolver.medication_of(src)

    def _med_codes(self, src: SourceResource) -> set[tuple[str, str]]:
        med = self.resolver.medication_of(src)
        return {(str(c.get("system")), str(c.get("code"))) for c in self._codings(med) if c.get("code")}

    def _dosage(self, form: CompiledForm, src: SourceResource, repeat: str, term: str, rule: str) -> None:
        spec: MedicationsForm = form.spec
        event = spec.event
        dosages = form.lists["dosage"](src.resource)
        dosage = dosages[0] if dosages and isinstance(dosages[0], dict) else None
        if dosage is None:
            return
        codes = spec.codes
        # dose and unit: a dose without a known unit is held with its unit
        dq = form.lists["dose_quantity"](dosage)
        q = dq[0] if dq and isinstance(dq[0], dict) else None
        if q is not None and q.get("value") is not None:
            try:
                dose = fraction_str(to_exact(q["value"]))
            except (ValueError, TypeError):
                dose = None
                self.disc(DiscrepancyKind.INVALID_SOURCE, f"{term}: dose {q.get('value')!r} is not a number",
                          src.ref, item_oid=spec.items.get("dose"), form=form.oid, event=event, repeat=repeat)
            if dose is not None:
                unit = self._dose_unit(q, codes.get("dose_unit", {}))
                if unit is None:
                    shown = q.get("unit") or q.get("code")
                    self.disc(DiscrepancyKind.UNMAPPED_CODE,
                              f"{term}: dose unit {shown!r} ({q.get('system') or 'no system'}) has no CDISC unit "
                              f"(C71620) in the study map; dose {dose} is held", src.ref,
                              item_oid=spec.items.get("dose_unit"), form=form.oid, event=event, repeat=repeat,
                              held=dose, rule=f"{rule}/dose_unit")
                else:
                    self.item(event, None, form, repeat, "dose", dose, src.ref, f"{rule}/dose")
                    self.item(event, None, form, repeat, "dose_unit", unit, src.ref, f"{rule}/dose_unit")
        # route
        route_codings = [c for c in form.lists["route"](dosage) if isinstance(c, dict)]
        if route_codings:
            route = self._lookup(route_codings, codes.get("route", {}))
            if route is None:
                shown = ", ".join(f"{c.get('system')}|{c.get('code')}" for c in route_codings)
                self.disc(DiscrepancyKind.UNMAPPED_CODE, f"{term}: route {shown} has no CDISC route (C66729) in "
                          f"the study map", src.ref, item_oid=spec.items.get("route"), form=form.oid, event=event,
                          repeat=repeat, rule=f"{rule}/route")
            else:
                self.item(event, None, form, repeat, "route", route, src.ref, f"{rule}/route")
        # frequency
        freq, shown = self._frequency(form, dosage)
        if freq is not None:
            self.item(event, None, form, repeat, "frequency", freq, src.ref, f"{rule}/frequency")
        elif shown:
            self.disc(DiscrepancyKind.UNMAPPED_CODE, f"{term}: dosing frequency {shown} has no CDISC frequency "
                      f"(C71113) in the study map", src.ref, item_oid=spec.items.get("frequency"), form=form.oid,
                      event=event, repeat=repeat, rule=f"{rule}/frequency")

    def _lookup(self, codings: list[dict[str, Any]], tables: dict[str, dict[str, str]]) -> str | None:
        for c in codings:
            key = self.study.system_key.get(str(c.get("system")))
            table = tables.get(key or "")
            if table and str(c.get("code")) in table:
                return table[str(c.get("code"))]
        return None

    def _dose_unit(self, q: dict[str, Any], tables: dict[str, dict[str, str]]) -> str | None:
        system, code = q.get("system"), q.get("code")
        if system and code:
            key = self.study.system_key.get(system)
            table = tables.get(key or "", {})
            if str(code) in table:
                return table[str(code)]
            return None
        # no system: the unit text only through the UCUM table, exactly (never a guess)
        unit = q.get("unit")
        return tables.get("ucum", {}).get(unit) if isinstance(unit, str) else None

    def _frequency(self, form: CompiledForm, dosage: dict[str, Any]) -> tuple[str | None, str | None]:
        """(C71113 value, or None with a description of the unmapped timing)."""
        fq = form.spec.codes.get("frequency", {})
        repeat = (form.lists["timing_repeat"](dosage) or [None])[0]
        as_needed = (form.lists["as_needed"](dosage) or [False])[0] is True
        timing_codings = [c for c in form.lists["timing_code"](dosage) if isinstance(c, dict)]
        shown: list[str] = []
        if isinstance(repeat, dict):
            whens = repeat.get("when") or []
            if whens:
                if len(whens) == 1 and whens[0] in fq.get("when", {}):
                    return fq["when"][whens[0]], None
                shown.append(f"when={'/'.join(map(str, whens))}")
            if repeat.get("periodUnit") is not None or repeat.get("frequency") is not None:
                try:
                    n = to_exact(repeat.get("frequency", 1))
                    period = to_exact(repeat.get("period", 1))
                    key = f"{fraction_str(n)}/{fraction_str(period)}{repeat.get('periodUnit')}"
                except (ValueError, TypeError):
                    key = str(repeat)
                if key in fq.get("per_period", {}):
                    return fq["per_period"][key], None
                shown.append(key)
        for c in timing_codings:
            key = self.study.system_key.get(str(c.get("system")))
            table = fq.get(key or "", {})
            if isinstance(table, dict) and str(c.get("code")) in table:
                return table[str(c.get("code"))], None
            shown.append(f"{c.get('system')}|{c.get('code')}")
        if as_needed and fq.get("as_needed"):
            return fq["as_needed"], None
        return None, ", ".join(shown) if shown else None

    # ------------------------------------------------------------------ privacy

    def apply_privacy(self) -> None:
        """Birth-date masking on every date item; no identifying string may leave."""
        md = self.study.metadata
        out: list[ItemValue] = []
        for iv in self.result.items:
            item = md.items.get(iv.key.item_oid)
            value = iv.value
            erk = iv.key.study_event_repeat_key
            if erk is not None and self.birth_date is not None:
                # SE.UNSCHED repeat keys are dates: one equal to the birth date is masked like any date
                masked_key = mask_if_birth_date(erk, self.birth_date)
                if masked_key != erk:
                    iv = ItemValue(replace(iv.key, study_event_repeat_key=masked_key), iv.value, iv.source, iv.rule,
                                   iv.conversions + ("StudyEventRepeatKey equal to the birth date: YYYY-MM only",))
            if item is not None and item.data_type in _DATE_TYPES and self.birth_date is not None:
                masked = mask_if_birth_date(value, self.birth_date)
                if masked != value:
                    iv = ItemValue(iv.key, masked, iv.source, iv.rule,
                                   iv.conversions + ("equal to the birth date: sent as YYYY-MM only",))
            if value.strip().lower() in self.identifying:
                self.disc(DiscrepancyKind.PRIVACY_BLOCKED,
                          f"{iv.key.item_oid}: the value equals an identifier, name or contact of the patient and "
                          f"was not sent", iv.source, item_oid=iv.key.item_oid, event=iv.key.study_event_oid,
                          form=iv.key.form_oid, repeat=iv.key.item_group_repeat_key, severity=Severity.ERROR)
                continue
            out.append(iv)
        self.result.items = out
