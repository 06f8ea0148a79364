"""What a data manager does with the reconciliation queue. Each action is one unit of work (the state,
the outbox transaction, the discrepancy's new status and the audit entries commit together or not at
all) and is audited with the actor and the reason they gave.

    rec = Reconciliation.from_container(container)
    rec.accept("CV01", 12, actor="user:alice", reason="confirmed with the site: a real reading")
    rec.override("CV01", 13, actor="user:alice", reason="unit typo in the EHR", value="176.0")
    rec.bulk(DiscrepancyFilter("CV01", kinds=("review_required",), form_oid="F.LB"), "accept", actor=..., reason=...)

Actions, by discrepancy kind
- accept: send the held value.
  - a value the map held (out of range ...): sent with the rest of its item group, rebuilt from the
    reading the map selected; refused when the map no longer holds that value (the source changed);
  - REVIEW_REQUIRED (review-before-send): the held change, if the map still produces that value;
  - EDC_CONFLICT: esource's proposed value goes over the value site staff entered, as an Update whose
    previous value is the EDC's (so the dispatcher's conflict check lets it through; an Insert if the
    EDC holds nothing); the item is unfrozen: later source changes flow again;
  - ENTERED_IN_ERROR: the map's proposals replace the frozen values (Updates); an item for which the
    map now has no value is removed from the eCRF (Remove) - never silently: this is the decision;
  - EDC_REJECTED and kinds with nothing held (unknown gender, unmapped code ...): refused - use
    override (with a value), re-push or dismiss.
- override: send a corrected value, validated against the metadata (DataType, Length,
  SignificantDigits, CodeList, Hard RangeChecks) and the map's decimals for a findings result. An item
  that was frozen (EDC conflict, entered-in-error) stays frozen: the data manager's value stands over
  later source changes. A findings result goes with its item group (NRIND re-derived from the value).
- dismiss: nothing sent; the reason says why (the value stays held, a frozen item stays frozen: for an
  EDC conflict the site's value stands).
- remap: re-run the map over the subjects' stored facts (`Processor.remap`, after a map change); a
  discrepancy the map no longer reports is resolved (remapped), one still reported stays open and the
  result says so. Two units of work: the re-map's own, then the resolution.
- repush: every rejected or failed outbox transaction of the subject back to `pending`, all at once,
  so the dispatcher sends them again in sequence order (a rejected row blocks its subject's later rows;
  re-pushing only some would leave the subject blocked). For EDC_REJECTED discrepancies.
- assign / review: set the assignee; `review` also moves it to in_review (assigned to the actor unless
  given).
Decisions apply to open or in-review discrepancies only; two data managers deciding at once cannot
both win (the second gets a 409 and nothing of its unit of work is kept).

ODM: every value sent carries an AuditRecord whose ReasonForChange names the decision, the actor and
the discrepancy, e.g. "Data manager decision (accepted) by user:alice on discrepancy #12
(out_of_range): confirmed with the site".
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from esource.domain.audit import AuditAction, AuditEvent
from esource.domain.model import (
    Discrepancy,
    DiscrepancyKind,
    Enrollment,
    ItemChange,
    ItemKey,
    ItemValue,
    MappingResult,
    SourceRef,
    SubjectTransaction,
    TransactionType,
)
from esource.domain.ports import Clock, SentItem, StoredFact, SystemClock
from esource.errors import EsourceError
from esource.mapping.engine import MappingContext, MappingEngine
from esource.odm.writer import write_clinical_data
from esource.privacy import Pseudonymizer
from esource.reconciliation import keys as K
from esource.reconciliation.model import (
    OPEN_STATUSES,
    DiscrepancyFilter,
    DiscrepancyNotFound,
    DiscrepancyRecord,
    DiscrepancyStatus,
    InvalidDecision,
    ReconciliationError,
    Resolution,
    ReviewMode,
)
from esource.reconciliation.policy import ReviewPolicies, review_mode
from esource.reconciliation.validate import check_value
from esource.study.study import Study

ACTIONS: tuple[str, ...] = ("accept", "override", "dismiss", "remap", "repush", "assign", "review")
MAX_BULK = 500  # a bulk action matching more is refused: narrow the filter
MAX_REASON = 500  # characters of the reason copied into the ODM ReasonForChange

# kinds the map reports (re-running it tells whether they still hold)
_NOT_FROM_THE_MAP = frozenset({DiscrepancyKind.EDC_REJECTED, DiscrepancyKind.EDC_CONFLICT,
                               DiscrepancyKind.ENTERED_IN_ERROR, DiscrepancyKind.REVIEW_REQUIRED})


@dataclass
class ActionResult:
    """The outcome of one action on one discrepancy (also one line of a bulk result)."""

    discrepancy_id: int
    action: str
    ok: bool
    message: str
    status: str | None = None
    resolution: str | None = None
    outbox_id: int | None = None
    sequence: int | None = None
    items: list[dict[str, Any]] = field(default_factory=list)  # what was written: path, value, transaction
    error: EsourceError | None = field(default=None, repr=False, compare=False)  # why it failed, when it did

    def to_json(self) -> dict[str, Any]:
        return {"discrepancy_id": self.discrepancy_id, "action": self.action, "ok": self.ok,
                "message": self.message, "status": self.status, "resolution": self.resolution,
                "outbox_id": self.outbox_id, "sequence": self.sequence, "items": self.items}


@dataclass
class BulkResult:
    action: str
    matched: int
    results: list[ActionResult]

    @property
    def succeeded(self) -> int:
        return sum(1 for r in self.results if r.ok)

    @property
    def failed(self) -> int:
        return len(self.results) - self.succeeded

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "matched": self.matched, "succeeded": self.succeeded,
                "failed": self.failed, "results": [r.to_json() for r in self.results]}


@dataclass
class _Plan:
    """What a decision writes: values (Insert/Update), removals, and the frozen flag afterwards."""

    values: list[ItemValue]
    previous: dict[ItemKey, str | None] = field(default_factory=dict)  # explicit previous value (EDC's)
    types: dict[ItemKey, TransactionType] = field(default_factory=dict)  # explicit transaction type
    removals: list[SentItem] = field(default_factory=list)
    frozen_after: bool = False
    summary: str | None = None  # the resolution value when not a single value


class Reconciliation:
    """The queue's services over a unit-of-work factory (the store), the studies and their processors."""

    def __init__(self, studies: Mapping[str, Study], uow_factory: Callable[..., Any], pseudonymizer: Pseudonymizer,
                 *, clock: Clock | None = None, processors: Mapping[str, Any] | None = None,
                 policies: ReviewPolicies | None = None) -> None:
        self.studies = dict(studies)
        self.uow_factory = uow_factory
        self.pseudonymizer = pseudonymizer
        self.clock: Clock = clock or SystemClock()
        self.processors = dict(processors or {})
        self.policies = policies or ReviewPolicies(uow_factory)
        self._engines: dict[str, MappingEngine] = {}
        self._mappings: OrderedDict[tuple[Any, ...], MappingResult] = OrderedDict()

    @classmethod
    def from_container(cls, container: Any) -> Reconciliation:
        """The container's instance (`container.extras["reconciliation"]`), built on first use."""
        from esource.reconciliation.policy import get_review_policies

        found = container.extras.get("reconciliation")
        if found is None:
            clock = getattr(container.store, "_clock", None)
            found = cls(container.studies, container.store.uow, container.pseudonymizer, clock=clock,
                        processors=container.processors, policies=get_review_policies(container))
            container.extras["reconciliation"] = found
        return found

    # ------------------------------------------------------------------ reads

    def study(self, study_oid: str) -> Study:
        study = self.studies.get(study_oid)
        if study is None:
            raise DiscrepancyNotFound(f"study {study_oid} is not configured")
        return study

    def query(self, flt: DiscrepancyFilter, *, limit: int | None = 50,
              offset: int = 0) -> tuple[list[DiscrepancyRecord], int]:
        self.study(flt.study_oid)
        with self._reader() as uow:
            return uow.query_discrepancies(flt, limit=limit, offset=offset)

    def get(self, study_oid: str, discrepancy_id: int) -> DiscrepancyRecord:
        with self._reader() as uow:
            return self._record(uow, study_oid, discrepancy_id)

    def detail(self, study_oid: str, discrepancy_id: int) -> dict[str, Any]:
        """One discrepancy with the source and the proposed value side by side: what the EHR says (the
        elements the map reads), what esource would send, what it last sent, what the EDC holds (for
        a conflict) and which actions apply."""
        study = self.study(study_oid)
        now = self.clock.now()
        with self._reader() as uow:
            rec = self._record(uow, study_oid, discrepancy_id)
            d = rec.discrepancy
            facts = uow.facts(study_oid, d.subject_key) if d.source is not None else []
            fact = next((f for f in facts if d.source is not None and f.identity == d.source.identity), None)
            sent = uow.sent_items(study_oid, d.subject_key)
        key = self._quiet_key(study, d)
        state = sent.get(key) if key is not None else None
        edc = None
        if d.kind is DiscrepancyKind.EDC_CONFLICT and d.candidates:
            edc = {"value": d.candidates[0].get("edc_value"), "item": d.candidates[0].get("item")}
        return {
            "discrepancy": rec.to_json(now),
            "item": _key_json(key),
            "source": {"reference": d.source.outbound() if d.source else None,
                       "as_received": K.source_summary(fact, d.source.element if d.source else None),
                       "current_version": fact.version if fact else None,
                       "changed_since": bool(fact and d.source and fact.version != d.source.version)},
            "proposed": {"value": d.held_value, "rule": d.rule},
            "sent": None if state is None else {"value": state.value, "frozen": state.frozen, "rule": state.rule,
                                                "source_version": state.source_version},
            "edc": edc,
            "actions": self.available_actions(rec),
        }

    def available_actions(self, rec: DiscrepancyRecord) -> list[str]:
        if not rec.is_open:
            return []
        d = rec.discrepancy
        out = ["assign", "review", "dismiss"]
        if d.kind is DiscrepancyKind.EDC_REJECTED:
            return out + ["repush"]
        if d.held_value is not None or d.kind is DiscrepancyKind.ENTERED_IN_ERROR:
            out.append("accept")
        if d.kind in (DiscrepancyKind.ENTERED_IN_ERROR, DiscrepancyKind.EDC_CONFLICT,
                      DiscrepancyKind.REVIEW_REQUIRED) or self._writable_cell(d):
            out.append("override")
        if d.kind not in _NOT_FROM_THE_MAP or d.kind is DiscrepancyKind.REVIEW_REQUIRED:
            out.append("remap")
        return out

    def record_read(self, *, actor: str, study_oid: str, what: str, site_oid: str | None = None,
                    subject_key: str | None = None, detail: dict[str, Any] | None = None) -> None:
        """A DATA_READ audit entry for clinical data read through the API (who read what, no values)."""
        with self.uow_factory() as uow:
            uow.audit(AuditEvent(AuditAction.DATA_READ, actor=actor, study_oid=study_oid, subject_key=subject_key,
                                 site_oid=site_oid, at=self.clock.now(), detail={"what": what, **(detail or {})}))
            uow.commit()

    # ------------------------------------------------------------------ actions

    def act(self, study_oid: str, discrepancy_id: int, action: str, *, actor: str, reason: str,
            value: str | None = None, item_oid: str | None = None, assignee: str | None = None) -> ActionResult:
        """One action by name (what the API's POST .../{id}/{action} calls)."""
        if action == "accept":
            return self.accept(study_oid, discrepancy_id, actor=actor, reason=reason)
        if action == "override":
            if value is None:
                raise InvalidDecision("override needs the corrected value")
            return self.override(study_oid, discrepancy_id, actor=actor, reason=reason, value=value, item_oid=item_oid)
        if action == "dismiss":
            return self.dismiss(study_oid, discrepancy_id, actor=actor, reason=reason)
        if action == "remap":
            result = self.remap(study_oid, [discrepancy_id], actor=actor, reason=reason)[0]
            if result.error is not None:
                raise result.error
            return result
        if action == "repush":
            return self.repush(study_oid, discrepancy_id, actor=actor, reason=reason)
        if action == "assign":
            return self.assign(study_oid, discrepancy_id, actor=actor, reason=reason, assignee=assignee)
        if action == "review":
            return self.start_review(study_oid, discrepancy_id, actor=actor, reason=reason, assignee=assignee)
        raise InvalidDecision(f"unknown action {action!r}: one of {', '.join(ACTIONS)}")

    def accept(self, study_oid: str, discrepancy_id: int, *, actor: str, reason: str) -> ActionResult:
        reason = _reason(reason)
        study = self.study(study_oid)
        with self.uow_factory() as uow:
            rec = self._open_record(uow, study_oid, discrepancy_id)
            plan = self._accept_plan(uow, study, rec)
            value = plan.summary if plan.summary is not None else _single(plan)
            result = self._apply(uow, study, rec, plan, Resolution.ACCEPTED, actor, reason)
            self._close(uow, rec, Resolution.ACCEPTED, actor, reason, value, result)
            uow.commit()
        return result

    def override(self, study_oid: str, discrepancy_id: int, *, actor: str, reason: str, value: str,
                 item_oid: str | None = None) -> ActionResult:
        reason = _reason(reason)
        study = self.study(study_oid)
        with self.uow_factory() as uow:
            rec = self._open_record(uow, study_oid, discrepancy_id)
            plan = self._override_plan(uow, study, rec, value, item_oid, actor)
            result = self._apply(uow, study, rec, plan, Resolution.OVERRIDDEN, actor, reason)
            self._close(uow, rec, Resolution.OVERRIDDEN, actor, reason, _single(plan, item_oid), result)
            uow.commit()
        return result

    def dismiss(self, study_oid: str, discrepancy_id: int, *, actor: str, reason: str) -> ActionResult:
        reason = _reason(reason)
        self.study(study_oid)
        with self.uow_factory() as uow:
            rec = self._open_record(uow, study_oid, discrepancy_id)
            result = ActionResult(rec.id, "dismiss", True, "dismissed: nothing sent")
            self._close(uow, rec, Resolution.DISMISSED, actor, reason, None, result)
            uow.commit()
        return result

    def assign(self, study_oid: str, discrepancy_id: int, *, actor: str, reason: str,
               assignee: str | None) -> ActionResult:
        reason = _reason(reason)
        with self.uow_factory() as uow:
            rec = self._open_record(uow, study_oid, discrepancy_id)
            after = uow.transition_discrepancy(rec.id, from_statuses=(rec.status,), status=rec.status,
                                               assignee=assignee or None)
            self._changed(uow, rec, after, actor, reason)
            uow.commit()
        return ActionResult(rec.id, "assign", True, f"assigned to {assignee}" if assignee else "unassigned",
                            status=after.status)

    def start_review(self, study_oid: str, discrepancy_id: int, *, actor: str, reason: str,
                     assignee: str | None = None) -> ActionResult:
        reason = _reason(reason)
        with self.uow_factory() as uow:
            rec = self._open_record(uow, study_oid, discrepancy_id)
            who = assignee or rec.assignee or _username(actor)
            after = uow.transition_discrepancy(rec.id, from_statuses=(rec.status,),
                                               status=DiscrepancyStatus.IN_REVIEW.value, assignee=who)
            self._changed(uow, rec, after, actor, reason)
            uow.commit()
        return ActionResult(rec.id, "review", True, f"in review by {who}", status=after.status)

    def repush(self, study_oid: str, discrepancy_id: int, *, actor: str, reason: str) -> ActionResult:
        reason = _reason(reason)
        with self.uow_factory() as uow:
            rec = self._open_record(uow, study_oid, discrepancy_id)
            if rec.kind is not DiscrepancyKind.EDC_REJECTED:
                raise ReconciliationError(f"re-push applies to EDC rejections, not to a {rec.kind.value} discrepancy")
            ids = self._requeue(uow, rec.discrepancy.study_oid, rec.discrepancy.subject_key, rec.site_oid, actor,
                                reason, rec.id)
            if not ids:
                raise ReconciliationError(f"subject {rec.discrepancy.subject_key} has no rejected or failed transaction "
                                          "to re-push")
            result = ActionResult(rec.id, "repush", True, f"re-pushed outbox row(s) {', '.join(map(str, ids))}",
                                  outbox_id=ids[0])
            self._close(uow, rec, Resolution.REPUSHED, actor, reason, None, result)
            uow.commit()
        return result

    def repush_subject(self, study_oid: str, subject_key: str, *, actor: str, reason: str) -> list[int]:
        """Re-push a subject's rejected and failed transactions (for the transfers view)."""
        reason = _reason(reason)
        with self.uow_factory() as uow:
            site = next((e.site_oid for e in uow.enrollments(study_oid) if e.subject_key == subject_key), None)
            ids = self._requeue(uow, study_oid, subject_key, site, actor, reason, None)
            uow.commit()
        return ids

    def remap(self, study_oid: str, discrepancy_ids: Iterable[int], *, actor: str,
              reason: str) -> list[ActionResult]:
        """Re-run the map for the subjects of these discrepancies (one `Processor.remap`), then resolve
        each discrepancy the map no longer reports."""
        reason = _reason(reason)
        study = self.study(study_oid)
        processor = self.processors.get(study_oid)
        if processor is None:
            raise ReconciliationError(f"no processor for study {study_oid}: re-map is not available")
        results: dict[int, ActionResult] = {}
        todo: list[DiscrepancyRecord] = []
        with self._reader() as uow:
            for i in dict.fromkeys(discrepancy_ids):
                try:
                    rec = self._open_record(uow, study_oid, i)
                    if rec.kind in _NOT_FROM_THE_MAP and rec.kind is not DiscrepancyKind.REVIEW_REQUIRED:
                        raise ReconciliationError(f"re-map does not apply to a {rec.kind.value} discrepancy (it does "
                                                  "not come from the map)")
                    todo.append(rec)
                except EsourceError as exc:
                    results[i] = ActionResult(i, "remap", False, str(exc), error=exc)
        subjects = list(dict.fromkeys(r.discrepancy.subject_key for r in todo))
        if subjects:
            try:
                processor.remap(subjects, actor=actor, reason=reason)
            except EsourceError as exc:
                for r in todo:
                    results[r.id] = ActionResult(r.id, "remap", False, f"re-map failed: {exc}", status=r.status,
                                                 error=exc)
                todo = []
        self._mappings.clear()  # the re-map may have changed state: map afresh
        for r in todo:
            try:
                with self.uow_factory() as uow:
                    rec = self._open_record(uow, study_oid, r.id)
                    if self._still_reported(uow, study, rec):
                        results[r.id] = ActionResult(r.id, "remap", False, "re-mapped, but the map still reports it: "
                                                     "it stays open", status=rec.status)
                        continue
                    result = ActionResult(r.id, "remap", True, "re-mapped: the map no longer reports it")
                    self._close(uow, rec, Resolution.REMAPPED, actor, reason, None, result)
                    uow.commit()
                    results[r.id] = result
            except EsourceError as exc:
                results[r.id] = ActionResult(r.id, "remap", False, str(exc), error=exc)
        return [results[i] for i in dict.fromkeys(discrepancy_ids)]

    def bulk(self, flt: DiscrepancyFilter, action: str, *, actor: str, reason: str, value: str | None = None,
             assignee: str | None = None, limit: int = MAX_BULK) -> BulkResult:
        """One action on every discrepancy the filter matches (open and in-review ones unless the filter
        says otherwise), each in its own unit of work: one failure does not undo the others; the result
        lists every one. Accepts are grouped per subject into one unit of work and one transaction (see
        `_accept_grouped`). More than `limit` matches is refused (narrow the filter)."""
        if action not in ACTIONS:
            raise InvalidDecision(f"unknown action {action!r}: one of {', '.join(ACTIONS)}")
        reason = _reason(reason)
        self.study(flt.study_oid)
        if flt.statuses is None:
            flt = _with_statuses(flt, OPEN_STATUSES)
        with self._reader() as uow:
            ids = uow.discrepancy_ids(flt, limit=limit + 1)
        if len(ids) > limit:
            raise InvalidDecision(f"the filter matches more than {limit} discrepancies: narrow it")
        all_ids = list(ids)
        if action == "remap":
            return BulkResult(action, len(ids), self.remap(flt.study_oid, ids, actor=actor, reason=reason))
        results: list[ActionResult] = []
        try:
            if action == "accept":
                done, ids = self._accept_grouped(flt.study_oid, ids, actor=actor, reason=reason)
                results.extend(done)
            for i in ids:
                try:
                    results.append(self.act(flt.study_oid, i, action, actor=actor, reason=reason, value=value,
                                            assignee=assignee))
                except EsourceError as exc:
                    results.append(ActionResult(i, action, False, str(exc), error=exc))
        finally:
            self._mappings.clear()
        order = {i: n for n, i in enumerate(all_ids)}
        return BulkResult(action, len(all_ids), sorted(results, key=lambda r: order.get(r.discrepancy_id, 0)))

    def _accept_grouped(self, study_oid: str, ids: list[int], *, actor: str,
                        reason: str) -> tuple[list[ActionResult], list[int]]:
        """Bulk accept: each subject's accepts in one unit of work and one ODM transaction (an adjudicated
        form approved at once reaches the EDC as one transaction). A subject whose group fails falls back
        to one unit of work per discrepancy, so each failure is reported on its own. Returns (results,
        ids still to do one by one)."""
        study = self.study(study_oid)
        with self._reader() as uow:
            records, _ = uow.query_discrepancies(DiscrepancyFilter(study_oid, ids=tuple(ids)))
        by_subject: dict[str, list[int]] = {}
        for rec in records:
            by_subject.setdefault(rec.discrepancy.subject_key, []).append(rec.id)
        done: list[ActionResult] = []
        left: list[int] = []
        for group in by_subject.values():
            if len(group) == 1:
                left.extend(group)
                continue
            try:
                with self.uow_factory() as uow:
                    decided = []
                    for i in group:
                        rec = self._open_record(uow, study_oid, i)
                        decided.append((rec, self._accept_plan(uow, study, rec)))
                    results = self._apply_many(uow, study, decided, Resolution.ACCEPTED, actor, reason)
                    for (rec, plan), result in zip(decided, results):
                        value = plan.summary if plan.summary is not None else _single(plan)
                        self._close(uow, rec, Resolution.ACCEPTED, actor, reason, value, result)
                    uow.commit()
                done.extend(results)
            except EsourceError:
                self._mappings.clear()  # mapped inside a rolled-back unit of work: map afresh
                left.extend(group)  # one by one: the failing ones say why
        return done, [i for i in ids if i in set(left)]

    # ------------------------------------------------------------------ review policy

    def review_policy(self, study_oid: str) -> dict[str, Any]:
        """Every form's policy in force, where it comes from (map or a stored override) and who set it."""
        study = self.study(study_oid)
        with self._reader() as uow:
            stored = uow.review_policies(study_oid)
        forms = []
        for form_oid in study.spec.forms:
            override = stored.get(form_oid)
            forms.append({"form_oid": form_oid, "mode": review_mode(study, form_oid, {
                k: v[0] for k, v in stored.items()}).value, "map_mode": study.review_mode(form_oid),
                "source": "override" if override else "map", "changed_by": override[1] if override else None,
                "changed_at": override[2].isoformat() if override else None})
        return {"study_oid": study_oid, "forms": forms}

    def set_review_policy(self, study_oid: str, modes: Mapping[str, str | None], *, actor: str,
                          reason: str) -> dict[str, Any]:
        """Override forms' policies at run time ({FormOID: auto | adjudicate | None to go back to the
        map's}); audited as CONFIG_CHANGED, effective for the next message."""
        reason = _reason(reason)
        study = self.study(study_oid)
        for form_oid, mode in modes.items():
            if form_oid not in study.spec.forms:
                raise InvalidDecision(f"{form_oid} is not a form of the study map")
            if mode is not None and mode not in {m.value for m in ReviewMode}:
                raise InvalidDecision(f"{form_oid}: review mode must be auto or adjudicate, not {mode!r}")
        now = self.clock.now()
        with self.uow_factory() as uow:
            for form_oid, mode in modes.items():
                previous = uow.set_review_policy(study_oid, form_oid, mode, changed_by=actor, reason=reason)
                uow.audit(AuditEvent(AuditAction.CONFIG_CHANGED, actor=actor, study_oid=study_oid, reason=reason,
                                     old_value=previous or f"map:{study.review_mode(form_oid)}",
                                     new_value=mode or f"map:{study.review_mode(form_oid)}", at=now,
                                     detail={"setting": "review_policy", "form_oid": form_oid}))
            uow.commit()
        self.policies.invalidate(study_oid)
        return self.review_policy(study_oid)

    # ------------------------------------------------------------------ plans

    def _accept_plan(self, uow: Any, study: Study, rec: DiscrepancyRecord) -> _Plan:
        d = rec.discrepancy
        kind = d.kind
        if kind is DiscrepancyKind.EDC_REJECTED:
            raise ReconciliationError("an EDC rejection holds no value: re-push the transaction (after fixing the "
                                      "cause in the EDC) or dismiss it")
        if kind is DiscrepancyKind.ENTERED_IN_ERROR:
            return self._retraction_plan(uow, study, rec)
        if d.held_value is None:
            raise ReconciliationError(f"nothing is held to send for a {kind.value} discrepancy: override it with a "
                                      "value, or dismiss it")
        if kind is DiscrepancyKind.EDC_CONFLICT:
            key, edc_value = self._conflict_key(d)
            state = uow.sent_items(d.study_oid, d.subject_key).get(key)
            iv = ItemValue(key, d.held_value, d.source or _manual_ref(rec), state.rule if state else (d.rule or "edc"))
            return _Plan([iv], previous={key: edc_value},
                         types={key: TransactionType.INSERT if edc_value is None else TransactionType.UPDATE})
        result = self._mapping(uow, study, rec)
        if kind is DiscrepancyKind.REVIEW_REQUIRED:
            key = self._review_key(d)
            current = next((iv for iv in result.items if iv.key == key), None)
            if current is None or current.value != d.held_value:
                raise ReconciliationError("the map no longer produces the held value (the source changed since): "
                                          "the newer value is held for review on the next message; re-map to refresh")
            return _Plan([current])
        if not any(x.key == d.key and x.held_value == d.held_value for x in result.discrepancies):
            raise ReconciliationError("the map no longer holds this value (the source changed since): re-map the "
                                      "subject to refresh the queue")
        facts = uow.facts(d.study_oid, d.subject_key)
        if K.is_findings_result(study, d, d.item_oid):
            fact = _fact_of(facts, d)
            values = K.findings_group(study, self._engine(study), d, fact, d.held_value,
                                      result_rule=f"{d.rule}/result" if d.rule else "accepted")
        else:
            values = [ItemValue(K.derive_key(study, d), d.held_value, d.source or _manual_ref(rec), d.rule or "accepted")]
        return _Plan(K.mask(study, values, K.birth_date(facts)))

    def _override_plan(self, uow: Any, study: Study, rec: DiscrepancyRecord, value: str, item_oid: str | None,
                       actor: str) -> _Plan:
        d = rec.discrepancy
        kind = d.kind
        note = (f"value entered by {actor} (override of discrepancy #{rec.id})",)
        if kind is DiscrepancyKind.EDC_REJECTED:
            raise ReconciliationError("an EDC rejection is about a transaction, not a value: re-push or dismiss it")
        if kind is DiscrepancyKind.EDC_CONFLICT:
            key, edc_value = self._conflict_key(d)
            _same_item(key, item_oid)
            checked = check_value(study, key.item_oid, value, form_oid=key.form_oid, test=key.item_group_repeat_key)
            return _Plan([ItemValue(key, checked, d.source or _manual_ref(rec), "manual:override", note)],
                         previous={key: edc_value},
                         types={key: TransactionType.INSERT if edc_value is None else TransactionType.UPDATE},
                         frozen_after=True)
        if kind is DiscrepancyKind.ENTERED_IN_ERROR:
            if not item_oid:
                raise InvalidDecision("say which item of the frozen group the value is for (item_oid)")
            frozen = {s.key.item_oid: s for s in self._frozen_group(uow, d)}
            state = frozen.get(item_oid)
            if state is None:
                raise InvalidDecision(f"{item_oid} is not one of the frozen items ({', '.join(sorted(frozen))})")
            checked = check_value(study, item_oid, value, form_oid=state.key.form_oid,
                                  test=state.key.item_group_repeat_key)
            src = SourceRef(state.source_type, state.source_id, state.source_version, state.source_identity)
            return _Plan([ItemValue(state.key, checked, src, "manual:override", note)], frozen_after=True)
        if kind is DiscrepancyKind.REVIEW_REQUIRED:
            key = self._review_key(d)
            _same_item(key, item_oid)
            checked = check_value(study, key.item_oid, value, form_oid=key.form_oid, test=key.item_group_repeat_key)
            return _Plan([ItemValue(key, checked, d.source or _manual_ref(rec), "manual:override", note)])
        target = item_oid or d.item_oid
        if target is None:
            raise InvalidDecision("the discrepancy names no item: say which item the value is for (item_oid)")
        checked = check_value(study, target, value, form_oid=d.form_oid, test=d.item_group_repeat_key)
        facts = uow.facts(d.study_oid, d.subject_key)
        if K.is_findings_result(study, d, target):
            fact = _fact_of(facts, d)
            values = K.findings_group(study, self._engine(study), d, fact, checked, result_rule="manual:override",
                                      result_notes=note, recompute=True)
        else:
            values = [ItemValue(K.derive_key(study, d, item_oid=target), checked, d.source or _manual_ref(rec),
                                "manual:override", note)]
        state = uow.sent_items(d.study_oid, d.subject_key)
        frozen = any(state.get(v.key) is not None and state[v.key].frozen for v in values)
        return _Plan(K.mask(study, values, K.birth_date(facts)), frozen_after=frozen)

    def _retraction_plan(self, uow: Any, study: Study, rec: DiscrepancyRecord) -> _Plan:
        """ENTERED_IN_ERROR accepted: the map's current values replace the frozen ones; no value: Remove."""
        d = rec.discrepancy
        frozen = self._frozen_group(uow, d)
        if not frozen:
            raise ReconciliationError("no frozen item of this source is left (already settled): dismiss it")
        produced = {iv.key: iv for iv in self._mapping(uow, study, rec).items}
        values: list[ItemValue] = []
        removals: list[SentItem] = []
        shown = []
        for s in frozen:
            iv = produced.get(s.key)
            if iv is None:
                removals.append(s)
                shown.append(f"{s.key.item_oid}: removed")
            else:
                values.append(iv)
                shown.append(f"{s.key.item_oid}={iv.value}")
        return _Plan(values, removals=removals, summary="; ".join(shown))

    # ------------------------------------------------------------------ writing

    def _apply(self, uow: Any, study: Study, rec: DiscrepancyRecord, plan: _Plan, decision: Resolution, actor: str,
               reason: str) -> ActionResult:
        """The plan's values into item_state and one ODM transaction in the outbox (same unit of work)."""
        return self._apply_many(uow, study, [(rec, plan)], decision, actor, reason)[0]

    def _apply_many(self, uow: Any, study: Study, decided: list[tuple[DiscrepancyRecord, _Plan]],
                    decision: Resolution, actor: str, reason: str) -> list[ActionResult]:
        """Several decisions about one subject in one ODM transaction (each ItemData's ReasonForChange
        names its own discrepancy); item_state follows in the same unit of work."""
        first = decided[0][0].discrepancy
        study_oid, subject = first.study_oid, first.subject_key
        site = decided[0][0].site_oid
        if site is None:
            raise ReconciliationError(f"subject {subject} is not enrolled in {study_oid}: nothing can be sent")
        if any(r.discrepancy.subject_key != subject for r, _ in decided):
            raise ReconciliationError("one transaction carries one subject")
        action = "accept" if decision is Resolution.ACCEPTED else "override"
        now = self.clock.now()
        sent = uow.sent_items(study_oid, subject)
        changes: list[ItemChange] = []
        owner: list[DiscrepancyRecord] = []
        states: list[SentItem] = []
        removed: list[ItemKey] = []
        results: list[ActionResult] = []
        for rec, plan in decided:
            why = _reason_for_change(decision, actor, rec, reason)
            shown: list[dict[str, Any]] = []
            n = 0
            for iv in plan.values:
                prev = sent.get(iv.key)
                explicit = iv.key in plan.previous
                previous = plan.previous[iv.key] if explicit else (prev.value if prev is not None else None)
                ttype = plan.types.get(iv.key) or (TransactionType.UPDATE if prev is not None else TransactionType.INSERT)
                states.append(SentItem(iv.key, iv.value, iv.source.identity, iv.source.version,
                                       iv.source.resource_type, iv.source.id, iv.rule, plan.frozen_after))
                if prev is not None and not explicit and prev.value == iv.value:
                    shown.append({"item": K_path(iv.key), "value": iv.value, "transaction_type": None})
                    continue  # the EDC has this value already: only the lineage (and frozen flag) changes
                changes.append(ItemChange(iv, ttype, previous if ttype is TransactionType.UPDATE else None, why))
                owner.append(rec)
                shown.append({"item": K_path(iv.key), "value": iv.value, "transaction_type": ttype.value})
                n += 1
            for st in plan.removals:
                src = SourceRef(st.source_type, st.source_id, st.source_version, st.source_identity)
                changes.append(ItemChange(ItemValue(st.key, st.value, src, st.rule), TransactionType.REMOVE, st.value,
                                          why))
                owner.append(rec)
                removed.append(st.key)
                shown.append({"item": K_path(st.key), "value": None, "transaction_type": TransactionType.REMOVE.value})
                n += 1
            results.append(ActionResult(rec.id, action, True, str(n), items=shown))
        outbox_id = sequence = None
        if changes:
            known = uow.subject_known(study_oid, subject)
            tx = SubjectTransaction(study_oid=study_oid, metadata_version_oid=study.metadata_version_oid,
                                    subject_key=subject, site_oid=site,
                                    subject_transaction_type=None if known else TransactionType.INSERT,
                                    changes=changes, sequence=uow.next_sequence(study_oid, subject))
            try:
                odm = write_clinical_data([tx], file_type="Transactional",
                                          file_oid=f"ESOURCE.{study_oid}.{subject}.{tx.sequence:06d}",
                                          creation=now, pseudonymizer=self.pseudonymizer, metadata=study.metadata)
            except ValueError as exc:  # e.g. two decisions writing one cell: refused, nothing kept
                raise ReconciliationError(f"cannot write the transaction: {exc}") from None
            outbox_id = uow.add_outbox(tx, odm)
            sequence = tx.sequence
            where = {"outbox_id": outbox_id, "sequence": tx.sequence, "decision": decision.value}
            for c, rec in zip(changes, owner):
                uow.audit(AuditEvent(
                    AuditAction.VALUE_MAPPED, actor=actor, study_oid=study_oid, subject_key=subject, site_oid=site,
                    item=c.item.key, old_value=c.previous_value,
                    new_value=None if c.transaction_type is TransactionType.REMOVE else c.item.value,
                    source=c.item.source, rule=c.item.rule, reason=reason, at=now,
                    detail={**where, "discrepancy_id": rec.id, "transaction_type": c.transaction_type.value,
                            "conversions": list(c.item.conversions)}))
            uow.audit(AuditEvent(AuditAction.TRANSFER_QUEUED, actor=actor, study_oid=study_oid, subject_key=subject,
                                 site_oid=site, reason=reason, at=now,
                                 detail={**where, "items": len(changes),
                                         "discrepancy_ids": [r.id for r, _ in decided]}))
        uow.put_sent_items(states)
        if removed:
            uow.delete_sent_items(removed)
        for result in results:
            n = int(result.message)
            if n:
                result.outbox_id, result.sequence = outbox_id, sequence
            result.message = (f"{decision.value}: {n} item(s) queued for the EDC (outbox #{outbox_id})" if n
                              else f"{decision.value}: the EDC already holds these values; nothing to send")
        return results

    def _close(self, uow: Any, rec: DiscrepancyRecord, resolution: Resolution, actor: str, reason: str,
               value: str | None, result: ActionResult) -> None:
        status = DiscrepancyStatus.DISMISSED if resolution is Resolution.DISMISSED else DiscrepancyStatus.RESOLVED
        after = uow.transition_discrepancy(rec.id, from_statuses=OPEN_STATUSES, status=status.value,
                                           resolution=resolution.value, actor=actor, reason=reason, value=value)
        d = rec.discrepancy
        action = AuditAction.DISCREPANCY_DISMISSED if status is DiscrepancyStatus.DISMISSED \
            else AuditAction.DISCREPANCY_RESOLVED
        uow.audit(AuditEvent(action, actor=actor, study_oid=d.study_oid, subject_key=d.subject_key,
                             site_oid=rec.site_oid, item=self._quiet_key(self.studies.get(d.study_oid), d),
                             old_value=rec.status, new_value=after.status, reason=reason, source=d.source, rule=d.rule,
                             at=self.clock.now(),
                             detail={"discrepancy_id": rec.id, "kind": d.kind.value, "resolution": resolution.value,
                                     "value": value, "outbox_id": result.outbox_id}))
        result.status, result.resolution = after.status, after.resolution

    def _changed(self, uow: Any, before: DiscrepancyRecord, after: DiscrepancyRecord, actor: str,
                 reason: str) -> None:
        d = before.discrepancy
        uow.audit(AuditEvent(AuditAction.DISCREPANCY_CHANGED, actor=actor, study_oid=d.study_oid,
                             subject_key=d.subject_key, site_oid=before.site_oid, old_value=before.status,
                             new_value=after.status, reason=reason, at=self.clock.now(),
                             detail={"discrepancy_id": before.id, "kind": d.kind.value,
                                     "assignee": after.assignee, "previous_assignee": before.assignee}))

    def _requeue(self, uow: Any, study_oid: str, subject_key: str, site: str | None, actor: str, reason: str,
                 discrepancy_id: int | None) -> list[int]:
        rows = sorted(uow.outbox_entries(statuses=("rejected", "failed"), study_oid=study_oid, subject_key=subject_key),
                      key=lambda e: e.sequence)
        done = []
        for e in rows:
            if uow.requeue_outbox(e.id, note=f"re-pushed by {actor} (was {e.status}: {e.last_error or '-'})"):
                done.append(e.id)
                uow.audit(AuditEvent(AuditAction.TRANSFER_REPUSHED, actor=actor, study_oid=study_oid,
                                     subject_key=subject_key, site_oid=site, reason=reason, old_value=e.status,
                                     new_value="pending", at=self.clock.now(),
                                     detail={"outbox_id": e.id, "sequence": e.sequence, "discrepancy_id": discrepancy_id,
                                             "last_error": e.last_error}))
        return done

    # ------------------------------------------------------------------ helpers

    def _reader(self) -> Any:
        try:
            return self.uow_factory(read_only=True)
        except TypeError:
            return self.uow_factory()

    def _record(self, uow: Any, study_oid: str, discrepancy_id: int) -> DiscrepancyRecord:
        rec = uow.get_discrepancy(discrepancy_id)
        if rec is None or rec.discrepancy.study_oid != study_oid:
            raise DiscrepancyNotFound(f"no discrepancy {discrepancy_id} in study {study_oid}")
        return rec

    def _open_record(self, uow: Any, study_oid: str, discrepancy_id: int) -> DiscrepancyRecord:
        from esource.reconciliation.model import DiscrepancyStateError

        rec = self._record(uow, study_oid, discrepancy_id)
        if not rec.is_open:
            raise DiscrepancyStateError(f"discrepancy {discrepancy_id} is {rec.status} ({rec.resolution}): decisions "
                                        "apply to open or in-review discrepancies")
        return rec

    def _engine(self, study: Study) -> MappingEngine:
        processor = self.processors.get(study.oid)
        engine = getattr(processor, "engine", None)
        if engine is not None and getattr(engine, "study", None) is study:
            return engine
        found = self._engines.get(study.oid)
        if found is None or found.study is not study:
            found = self._engines[study.oid] = MappingEngine(study)
        return found

    def _enrollment(self, uow: Any, study_oid: str, subject_key: str) -> Enrollment:
        found = next((e for e in uow.enrollments(study_oid) if e.subject_key == subject_key), None)
        if found is None:
            raise ReconciliationError(f"subject {subject_key} is not enrolled in {study_oid}")
        return found

    def _mapping(self, uow: Any, study: Study, rec: DiscrepancyRecord) -> MappingResult:
        """The map over the subject's stored facts as they are now (memoised by fact versions, so a bulk
        action maps each subject once)."""
        d = rec.discrepancy
        facts = uow.facts(d.study_oid, d.subject_key)
        memo_key = (d.study_oid, d.subject_key, id(study), tuple((f.identity, f.version) for f in facts))
        found = self._mappings.get(memo_key)
        if found is not None:
            return found
        enrollment = self._enrollment(uow, d.study_oid, d.subject_key)
        ctx = MappingContext(repeat_keys=uow.repeat_keys, first_seen=uow.first_seen, today=self.clock.now().date())
        result = self._engine(study).map_subject(enrollment, [K.source_resource(f) for f in facts], ctx)
        self._mappings[memo_key] = result
        while len(self._mappings) > 256:
            self._mappings.popitem(last=False)
        return result

    def _still_reported(self, uow: Any, study: Study, rec: DiscrepancyRecord) -> bool:
        d = rec.discrepancy
        result = self._mapping(uow, study, rec)
        if d.kind is DiscrepancyKind.REVIEW_REQUIRED:
            key = self._review_key(d)
            current = next((iv for iv in result.items if iv.key == key), None)
            state = uow.sent_items(d.study_oid, d.subject_key).get(key)
            return current is not None and (state is None or state.value != current.value)
        return any(x.key == d.key for x in result.discrepancies)

    def _frozen_group(self, uow: Any, d: Discrepancy) -> list[SentItem]:
        identity = d.source.identity if d.source else None
        return [s for s in uow.sent_items(d.study_oid, d.subject_key).values()
                if s.frozen and s.source_identity == identity and s.key.study_event_oid == d.study_event_oid
                and s.key.form_oid == d.form_oid and s.key.item_group_repeat_key == d.item_group_repeat_key]

    @staticmethod
    def _conflict_key(d: Discrepancy) -> tuple[ItemKey, str | None]:
        if not d.candidates or not d.candidates[0].get("item"):
            raise ReconciliationError("the conflict does not name its item")
        first = d.candidates[0]
        return K.key_from_path(d.study_oid, d.subject_key, str(first["item"])), first.get("edc_value")

    @staticmethod
    def _review_key(d: Discrepancy) -> ItemKey:
        if not (d.item_oid and d.form_oid and d.study_event_oid and d.item_group_oid):
            raise ReconciliationError("the review hold does not carry its full item key")
        return ItemKey(d.study_oid, d.subject_key, d.study_event_oid, d.study_event_repeat_key, d.form_oid,
                       d.item_group_oid, d.item_group_repeat_key, d.item_oid)

    def _writable_cell(self, d: Discrepancy) -> bool:
        study = self.studies.get(d.study_oid)
        if study is None or not d.item_oid or not d.form_oid:
            return False
        try:
            K.event_of(study, d)
        except EsourceError:
            return False
        return True

    def _quiet_key(self, study: Study | None, d: Discrepancy) -> ItemKey | None:
        """The item the discrepancy is about, when it can be told without the facts (for display/audit)."""
        try:
            if d.kind is DiscrepancyKind.EDC_CONFLICT:
                return self._conflict_key(d)[0]
            if d.kind is DiscrepancyKind.REVIEW_REQUIRED:
                return self._review_key(d)
            if study is None or not d.item_oid:
                return None
            return K.derive_key(study, d)
        except EsourceError:
            return None


# ---------------------------------------------------------------------- module helpers


def K_path(key: ItemKey) -> str:  # noqa: N802 - reads like the item path it returns
    from esource.services.conflicts import key_path

    return key_path(key)


def _reason(reason: str | None) -> str:
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidDecision("a reason is required")
    return reason.strip()


def _reason_for_change(decision: Resolution, actor: str, rec: DiscrepancyRecord, reason: str) -> str:
    text = reason if len(reason) <= MAX_REASON else reason[:MAX_REASON - 1] + "…"
    return (f"Data manager decision ({decision.value}) by {actor} on discrepancy #{rec.id} "
            f"({rec.kind.value}): {text}")


def _username(actor: str) -> str:
    return actor.split(":", 1)[1] if actor.startswith("user:") else actor


def _manual_ref(rec: DiscrepancyRecord) -> SourceRef:
    """Lineage of a value with no EHR source (e.g. a birth year the Patient resources disagree on)."""
    return SourceRef("DataManagerDecision", None, str(rec.id), f"discrepancy/{rec.id}")


def _fact_of(facts: list[StoredFact], d: Discrepancy) -> StoredFact:
    fact = next((f for f in facts if d.source is not None and f.identity == d.source.identity), None)
    if fact is None:
        raise ReconciliationError("the source of the discrepancy is no longer among the subject's facts")
    return fact


def _same_item(key: ItemKey, item_oid: str | None) -> None:
    if item_oid and item_oid != key.item_oid:
        raise InvalidDecision(f"this discrepancy is about {key.item_oid}, not {item_oid}")


def _single(plan: _Plan, item_oid: str | None = None) -> str | None:
    if len(plan.values) == 1 and not plan.removals:
        return plan.values[0].value
    for iv in plan.values:
        if item_oid and iv.key.item_oid == item_oid:
            return iv.value
    results = [iv for iv in plan.values if iv.rule.endswith("/result") or iv.rule.startswith("manual:")]
    return results[0].value if results else None


def _key_json(key: ItemKey | None) -> dict[str, Any] | None:
    if key is None:
        return None
    return {"study_event_oid": key.study_event_oid, "study_event_repeat_key": key.study_event_repeat_key,
            "form_oid": key.form_oid, "item_group_oid": key.item_group_oid,
            "item_group_repeat_key": key.item_group_repeat_key, "item_oid": key.item_oid, "path": K_path(key)}


def _with_statuses(flt: DiscrepancyFilter, statuses: tuple[str, ...]) -> DiscrepancyFilter:
    from dataclasses import replace

    return replace(flt, statuses=statuses)


def age_range(now: dt.datetime, *, min_age_days: float | None = None,
              max_age_days: float | None = None) -> tuple[dt.datetime | None, dt.datetime | None]:
    """(created_from, created_to) for "older than min_age_days" / "younger than max_age_days"."""
    created_to = now - dt.timedelta(days=min_age_days) if min_age_days is not None else None
    created_from = now - dt.timedelta(days=max_age_days) if max_age_days is not None else None
    return created_from, created_to
