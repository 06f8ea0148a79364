"""API routes: the reconciliation queue, its actions, review-before-send policies and the SDV report
(see esource.api and esource.reconciliation).

- `GET /studies/{study}/discrepancies`: cra (own sites), data_manager, admin. Filters: site, subject,
  kind, status, assignee, unassigned, item, form, event, created_from/created_to, min_age_days/
  max_age_days; paginated (`limit`/`offset`, with the total).
- `GET /studies/{study}/discrepancies/{id}`: the same roles; source and proposed value side by side.
- `POST /studies/{study}/discrepancies/{id}/{action}` (accept, override, dismiss, remap, repush,
  assign, review): data_manager, admin; body `{"reason": ..., "value": ... (override), "item_oid":
  ..., "assignee": ...}`.
- `POST /studies/{study}/discrepancies/bulk`: data_manager, admin; body `{"action", "reason", "filter":
  {...the list filters...}, "value", "assignee"}`; answers per discrepancy whether it worked.
- `GET /studies/{study}/review-policy`: cra, data_manager, admin; `PUT`: data_manager, admin (audited
  CONFIG_CHANGED).
- `GET /studies/{study}/reconciliation?site=&subject=&format=json|csv`: cra (own sites), data_manager,
  admin; reads the EDC back.
Reads of clinical data (discrepancy lists and details carry held values; the report carries values)
record a DATA_READ audit entry, committed before the answer is returned (no audit, no data).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from esource.api.auth import Principal, Role, ensure_site, require
from esource.api.paging import Page, PageParams, page_params
from esource.api.problems import problem_responses
from esource.domain.model import DiscrepancyKind
from esource.errors import EnrollmentError, EsourceError
from esource.reconciliation.actions import ACTIONS, Reconciliation, age_range
from esource.reconciliation.model import DiscrepancyFilter, DiscrepancyStatus, ReconciliationError
from esource.store.errors import StoreConflictError

Action = Literal["accept", "override", "dismiss", "remap", "repush", "assign", "review"]
Mode = Literal["auto", "adjudicate"]
TAG = "reconciliation"
_KINDS = {k.value for k in DiscrepancyKind}
_STATUSES = {s.value for s in DiscrepancyStatus}


class DiscrepancyOut(BaseModel):
    """One discrepancy of the queue (held values are clinical data: reading them is audited)."""

    id: int
    kind: str
    severity: str
    status: str = Field(description="open | in_review | resolved | dismissed")
    message: str = Field(description="plain language: what happened and what a data manager can do")
    study_oid: str
    site_oid: str | None
    subject_key: str
    study_event_oid: str | None
    study_event_repeat_key: str | None
    form_oid: str | None
    item_group_oid: str | None
    item_group_repeat_key: str | None
    item_oid: str | None
    held_value: str | None = Field(description="the value esource would send (held back)")
    source: dict[str, Any] | None = Field(description="FHIR resource type, id (never a Patient's) and version")
    rule: str | None
    candidates: list[dict[str, Any]] = Field(description="next candidate, tied readings, proposals, EDC answer")
    assignee: str | None
    resolution: str | None = Field(description="accepted | overridden | dismissed | remapped | repushed")
    resolved_by: str | None
    resolved_at: str | None
    resolution_reason: str | None
    resolution_value: str | None = Field(description="what accept/override sent")
    created_at: str
    updated_at: str
    age_seconds: int
    age_days: int


class ActionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=2000, description="why (required; audited; accept/override "
                                                                     "copy it into the ODM ReasonForChange)")
    value: str | None = Field(None, max_length=2000, description="override: the corrected value")
    item_oid: str | None = Field(None, description="override: the item, when the discrepancy names a group")
    assignee: str | None = Field(None, description="assign/review: the username (assign: none = unassign)")


class FilterIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    site: str | None = None
    subject: str | None = None
    kind: list[str] | None = None
    status: list[str] | None = None
    assignee: str | None = None
    unassigned: bool = False
    item: str | None = None
    form: str | None = None
    event: str | None = None
    created_from: dt.datetime | None = None
    created_to: dt.datetime | None = None
    min_age_days: float | None = Field(None, ge=0)
    max_age_days: float | None = Field(None, ge=0)
    ids: list[int] | None = None


class BulkIn(ActionIn):
    action: Action
    filter: FilterIn = Field(default_factory=FilterIn)


class ActionOut(BaseModel):
    discrepancy_id: int
    action: str
    ok: bool
    message: str
    status: str | None
    resolution: str | None
    outbox_id: int | None
    sequence: int | None
    items: list[dict[str, Any]]


class BulkOut(BaseModel):
    action: str
    matched: int
    succeeded: int
    failed: int
    results: list[ActionOut]


class PolicyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=2000)
    forms: dict[str, Mode | None] = Field(description="FormOID -> auto | adjudicate | null (back to the map's)")


class PolicyFormOut(BaseModel):
    form_oid: str
    mode: Mode
    map_mode: Mode
    source: Literal["map", "override"]
    changed_by: str | None
    changed_at: str | None


class PolicyOut(BaseModel):
    study_oid: str
    forms: list[PolicyFormOut]


def build_router(container: Any) -> APIRouter:
    router = APIRouter(tags=[TAG])
    reader = require(Role.CRA)
    decider = require(Role.DATA_MANAGER)

    def svc() -> Reconciliation:
        return Reconciliation.from_container(container)

    def study_of(study: str) -> Any:
        found = container.studies.get(study)
        if found is None:
            raise HTTPException(404, f"no study {study!r} is configured")
        return found

    def now() -> dt.datetime:
        return svc().clock.now()

    def build_filter(study: str, who: Principal, f: FilterIn) -> DiscrepancyFilter:
        for k in f.kind or ():
            if k not in _KINDS:
                raise HTTPException(422, f"unknown discrepancy kind {k!r}")
        for s in f.status or ():
            if s not in _STATUSES:
                raise HTTPException(422, f"unknown status {s!r}: open, in_review, resolved or dismissed")
        sites = who.site_filter()
        if f.site is not None:
            ensure_site(who, f.site)
            site_oids: tuple[str, ...] | None = (f.site,)
        else:
            site_oids = None if sites is None else tuple(sorted(sites))
        created_from, created_to = f.created_from, f.created_to
        age_from, age_to = age_range(now(), min_age_days=f.min_age_days, max_age_days=f.max_age_days)
        created_from = max(x for x in (created_from, age_from) if x is not None) if (created_from or age_from) else None
        created_to = min(x for x in (created_to, age_to) if x is not None) if (created_to or age_to) else None
        return DiscrepancyFilter(
            study_oid=study, site_oids=site_oids, subject_keys=(f.subject,) if f.subject else None,
            kinds=tuple(f.kind) if f.kind else None, statuses=tuple(f.status) if f.status else None,
            assignee=f.assignee, unassigned=f.unassigned, item_oid=f.item, form_oid=f.form, study_event_oid=f.event,
            created_from=_utc(created_from), created_to=_utc(created_to), ids=tuple(f.ids) if f.ids else None)

    def fail(exc: Exception) -> HTTPException:
        if isinstance(exc, ReconciliationError):
            return HTTPException(exc.status_code, str(exc))
        if isinstance(exc, StoreConflictError):
            return HTTPException(409, f"{exc}")
        if isinstance(exc, EnrollmentError):
            return HTTPException(409, str(exc))
        return HTTPException(409, str(exc))

    # ------------------------------------------------------------------ queue

    @router.get("/studies/{study}/discrepancies", response_model=Page[DiscrepancyOut],
                responses=problem_responses(401, 403, 404, 422), summary="The reconciliation queue",
                description="Discrepancies oldest first, with status, assignee, age, subject, site, item, source "
                            "and a plain-language message. CRAs see their assigned sites only. Every read is "
                            "recorded in the audit trail (held values are clinical data).")
    def list_discrepancies(
        study: str,
        site: str | None = Query(None, description="SiteOID (the subject's enrollment site)"),
        subject: str | None = Query(None, description="SubjectKey"),
        kind: list[str] | None = Query(None, description="discrepancy kind(s), e.g. out_of_range"),
        status: list[str] | None = Query(None, description="open, in_review, resolved, dismissed"),
        assignee: str | None = Query(None),
        unassigned: bool = Query(False, description="only discrepancies nobody is assigned to"),
        item: str | None = Query(None, description="ItemOID"),
        form: str | None = Query(None, description="FormOID"),
        event: str | None = Query(None, description="StudyEventOID"),
        created_from: dt.datetime | None = Query(None, description="created at or after (ISO 8601)"),
        created_to: dt.datetime | None = Query(None, description="created before (ISO 8601)"),
        min_age_days: float | None = Query(None, ge=0, description="at least this old"),
        max_age_days: float | None = Query(None, ge=0, description="at most this old"),
        page: PageParams = Depends(page_params),
        who: Principal = Depends(reader),
    ) -> dict[str, Any]:
        study_of(study)
        flt = build_filter(study, who, FilterIn(site=site, subject=subject, kind=kind, status=status, assignee=assignee,
                                                unassigned=unassigned, item=item, form=form, event=event,
                                                created_from=created_from, created_to=created_to,
                                                min_age_days=min_age_days, max_age_days=max_age_days))
        records, total = svc().query(flt, limit=page.limit, offset=page.offset)
        svc().record_read(actor=who.actor, study_oid=study, site_oid=site, subject_key=subject,
                          what="discrepancies", detail={"count": len(records), "offset": page.offset})
        moment = now()
        return {"items": [r.to_json(moment) for r in records], "total": total, "limit": page.limit,
                "offset": page.offset}

    @router.get("/studies/{study}/discrepancies/{discrepancy_id}", responses=problem_responses(401, 403, 404),
                summary="One discrepancy, source and proposed value side by side",
                description="What the EHR says (the elements the map reads, never identifiers), the value esource "
                            "would send, what it last sent, what the EDC holds (conflicts) and which actions apply.")
    def get_discrepancy(study: str, discrepancy_id: int = Path(ge=1),
                        who: Principal = Depends(reader)) -> dict[str, Any]:
        study_of(study)
        try:
            rec = svc().get(study, discrepancy_id)
            ensure_site(who, rec.site_oid)
            out = svc().detail(study, discrepancy_id)
        except ReconciliationError as exc:
            raise fail(exc) from None
        svc().record_read(actor=who.actor, study_oid=study, site_oid=rec.site_oid,
                          subject_key=rec.discrepancy.subject_key, what="discrepancy",
                          detail={"discrepancy_id": discrepancy_id})
        return out

    @router.post("/studies/{study}/discrepancies/bulk", response_model=BulkOut,
                 responses=problem_responses(401, 403, 404, 422), summary="One action on every matching discrepancy",
                 description="The filter is the list's (open and in-review discrepancies unless `status` says "
                             "otherwise); at most 500 match. Each discrepancy is its own unit of work (accepts: one "
                             "per subject, falling back to one per discrepancy): the answer says for each one "
                             "whether it worked and why not.")
    def bulk(study: str, body: BulkIn = Body(...), who: Principal = Depends(decider)) -> dict[str, Any]:
        study_of(study)
        flt = build_filter(study, who, body.filter)
        try:
            result = svc().bulk(flt, body.action, actor=who.actor, reason=body.reason, value=body.value,
                                assignee=body.assignee)
        except EsourceError as exc:
            raise fail(exc) from None
        return result.to_json()

    @router.post("/studies/{study}/discrepancies/{discrepancy_id}/{action}", response_model=ActionOut,
                 responses=problem_responses(401, 403, 404, 409, 422), summary="Act on one discrepancy",
                 description="accept (send the held value), override (send `value` instead, validated against the "
                             "study metadata), dismiss, remap (re-run the map for the subject), repush (the "
                             "subject's rejected transactions back to the outbox), assign (to `assignee`), review "
                             "(in review). A reason is required and audited. 409 when the discrepancy is closed "
                             "already or the action does not apply to its kind.")
    def act(study: str, action: Action, discrepancy_id: int = Path(ge=1), body: ActionIn = Body(...),
            who: Principal = Depends(decider)) -> dict[str, Any]:
        study_of(study)
        try:
            rec = svc().get(study, discrepancy_id)
            ensure_site(who, rec.site_oid)
            result = svc().act(study, discrepancy_id, action, actor=who.actor, reason=body.reason, value=body.value,
                               item_oid=body.item_oid, assignee=body.assignee)
        except EsourceError as exc:
            raise fail(exc) from None
        return result.to_json()

    # ------------------------------------------------------------------ policy

    @router.get("/studies/{study}/review-policy", response_model=PolicyOut, responses=problem_responses(401, 403, 404),
                summary="Review-before-send policy per form",
                description="`auto` sends values at once; `adjudicate` holds them as review_required discrepancies "
                            "until a data manager accepts them. The map's setting, or a data manager's override.")
    def get_policy(study: str, who: Principal = Depends(reader)) -> dict[str, Any]:
        study_of(study)
        return svc().review_policy(study)

    @router.put("/studies/{study}/review-policy", response_model=PolicyOut,
                responses=problem_responses(401, 403, 404, 422), summary="Change the review-before-send policy",
                description="Per form: auto, adjudicate, or null to go back to the study map's setting. Audited "
                            "(CONFIG_CHANGED); effective for the next message.")
    def put_policy(study: str, body: PolicyIn = Body(...), who: Principal = Depends(decider)) -> dict[str, Any]:
        study_of(study)
        try:
            return svc().set_review_policy(study, body.forms, actor=who.actor, reason=body.reason)
        except EsourceError as exc:
            raise fail(exc) from None

    # ------------------------------------------------------------------ SDV report

    @router.get("/studies/{study}/reconciliation", responses={
        **problem_responses(401, 403, 404, 409, 422),
        200: {"content": {"application/json": {}, "text/csv": {}},
              "description": "The report (JSON, or CSV with one line per item)"}},
        summary="Reconciliation / SDV report: what the EDC holds against what esource sent",
        description="Reads every selected subject back from the EDC and compares each item: matching, "
                    "changed_in_edc, missing_in_edc (in_transit when still in the outbox), only_in_edc; per site. "
                    "CRAs: their assigned sites only.")
    def report(study: str, site: str | None = Query(None), subject: str | None = Query(None),
               format: Literal["json", "csv"] = Query("json"), who: Principal = Depends(reader)) -> Any:
        from esource.reconciliation.report import reconcile

        study_of(study)
        if site is not None:
            ensure_site(who, site)
        connector = container.connectors.get(study) or container.connectors.get("*")
        if connector is None:
            raise HTTPException(409, f"study {study} has no EDC connector")
        try:
            can = bool(connector.capabilities().read_back)
        except Exception:
            can = False
        if not can:
            raise HTTPException(409, "the study's EDC connector cannot read data back: no reconciliation possible")
        if subject is not None:
            with container.store.uow(read_only=True) as uow:
                enrolled = next((e for e in uow.enrollments(study) if e.subject_key == subject), None)
            if enrolled is None:
                raise HTTPException(404, f"subject {subject} is not enrolled in {study}")
            ensure_site(who, enrolled.site_oid)
        sites = who.site_filter()
        result = reconcile(container.store.uow, connector, study, site=site, subject=subject,
                           sites_allowed=sites, clock=svc().clock)
        svc().record_read(actor=who.actor, study_oid=study, site_oid=site, subject_key=subject,
                          what="reconciliation_report", detail={"format": format, "counts": result.counts})
        if format == "csv":
            name = f"reconciliation-{study}{'-' + site if site else ''}{'-' + subject if subject else ''}.csv"
            return Response(result.to_csv(), media_type="text/csv; charset=utf-8",
                            headers={"Content-Disposition": f'attachment; filename="{name}"'})
        return result.to_json()

    return router


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


__all__ = ["ACTIONS", "build_router"]
