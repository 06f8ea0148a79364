"""API routes: the audit trail and lineage (see esource.api).

- `GET /studies/{study}/audit`: entries filtered by subject, ItemOID, action, actor and time, paginated.
- `GET /studies/{study}/audit/export?format=csv|odm`: the study's (or a subject's) trail as a file,
  sources pseudonymised (esource.audit.export).
- `GET /studies/{study}/audit/verify`: recompute the hash chain (esource.audit.verify).
- `GET /studies/{study}/subjects/{subject}/items`: the subject's items with their state.
- `GET /studies/{study}/subjects/{subject}/lineage?event=&form=&group=&repeat=&item=`: one value's
  full history (esource.audit.lineage).

Roles: cra (their assigned sites only: entries of other sites — and entries without a site — are not
listed, another site's subject is 403), data_manager and admin (all sites); verify is for
data_manager and admin (the chain spans every site). `edc` and `system` have no access. Every answer
that carries clinical data is a read recorded in the trail (DATA_READ, actor = the caller) before it
is returned: the read-only unit of work writes it in a short write transaction when it closes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, Field
from starlette.responses import Response

from esource.api.auth import Principal, Role, ensure_site, require
from esource.api.paging import Page, PageParams, page_params
from esource.api.problems import problem_responses
from esource.domain.audit import AuditAction, AuditEntry, AuditEvent
from esource.domain.model import ItemKey

ODM_XML = "application/xml"
CSV = "text/csv; charset=utf-8"


class ItemKeyOut(BaseModel):
    study_event_oid: str
    study_event_repeat_key: str | None
    form_oid: str
    item_group_oid: str
    item_group_repeat_key: str | None
    item_oid: str


class SourceOut(BaseModel):
    resource_type: str
    id: str | None = Field(None, description="the resource id (never shown for a Patient)")
    version: str
    source_id: str | None = Field(None, description="the pseudonymous SourceID the EDC received with the value")
    first_seen: dt.date | None = Field(None, description="when esource first saw the record")
    latest_version: str | None = Field(None, description="the newest version of the record esource keeps")


class AuditEntryOut(BaseModel):
    id: int = Field(description="position in the hash chain (1, 2, 3 ...)")
    at: dt.datetime
    actor: str = Field(description="`system` or `user:<username>`")
    action: str
    study_oid: str | None
    subject_key: str | None
    site_oid: str | None
    item: ItemKeyOut | None
    old_value: str | None
    new_value: str | None
    reason: str | None
    source: SourceOut | None
    rule: str | None = Field(description="the map rule that produced the value")
    detail: dict[str, Any] = Field(description="outbox id and sequence, conversions, EDC reference or code ...")
    prev_hash: str
    hash: str


class ChainBreakOut(BaseModel):
    entry_id: int
    kind: str = Field(description="altered | broken_link | missing | not_in_head | head_mismatch")
    message: str


class VerifyOut(BaseModel):
    intact: bool
    entries: int = Field(description="entries verified (before the break, if any)")
    last_id: int = Field(description="the newest entry when the check started")
    broken: ChainBreakOut | None


class LineageStepOut(BaseModel):
    audit_id: int
    at: dt.datetime
    action: str
    actor: str
    manual: bool = Field(description="done by a person through the API")
    old_value: str | None
    new_value: str | None
    reason: str | None
    rule: str | None
    source: SourceOut | None
    conversions: list[str]
    transaction_type: str | None
    outbox_id: int | None
    sequence: int | None
    detail: dict[str, Any]


class LineageTransferOut(BaseModel):
    outbox_id: int
    sequence: int | None
    transaction_type: str | None
    value: str | None
    status: str | None
    attempts: int | None
    created_at: dt.datetime | None
    sent_at: dt.datetime | None
    last_error: str | None
    connector: str | None
    edc_reference: str | None
    edc_code: str | None
    edc_message: str | None


class LineageDiscrepancyOut(BaseModel):
    kind: str
    severity: str
    message: str
    held_value: str | None
    rule: str | None


class ItemLineageOut(BaseModel):
    study_oid: str
    subject_key: str
    site_oid: str | None
    item: ItemKeyOut
    value: str | None = Field(description="the value esource last sent (null: never sent)")
    frozen: bool = Field(description="its source was retracted, or site staff changed it in the EDC")
    rule: str | None
    source: SourceOut | None
    conversions: list[str]
    sources: list[SourceOut] = Field(description="every source version the value came from, oldest first")
    transfers: list[LineageTransferOut]
    manual_actions: list[LineageStepOut]
    open_discrepancies: list[LineageDiscrepancyOut]
    history: list[LineageStepOut] = Field(description="every audit entry about the value, oldest first")


class ItemStatusOut(BaseModel):
    item: ItemKeyOut
    value: str
    frozen: bool
    rule: str
    source: SourceOut
    outbox_id: int | None
    sequence: int | None
    transfer_status: str | None
    updated_at: dt.datetime | None


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _item_out(key: ItemKey | None) -> ItemKeyOut | None:
    if key is None:
        return None
    return ItemKeyOut(study_event_oid=key.study_event_oid, study_event_repeat_key=key.study_event_repeat_key,
                      form_oid=key.form_oid, item_group_oid=key.item_group_oid,
                      item_group_repeat_key=key.item_group_repeat_key, item_oid=key.item_oid)


def _plain(obj: Any) -> dict[str, Any]:
    """A lineage dataclass as a dict for its pydantic model (item keys as ItemKeyOut)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, ItemKey):
            value = _item_out(value)
        elif dataclasses.is_dataclass(value):
            value = _plain(value)
        elif isinstance(value, (list, tuple)):
            value = [_plain(v) if dataclasses.is_dataclass(v) else v for v in value]
        out[f.name] = value
    return out


def build_router(container: Any) -> APIRouter:
    from esource.audit.export import export_detail, export_source_id, export_study
    from esource.audit.lineage import item_lineage, subject_items
    from esource.audit.verify import verify_chain

    router = APIRouter()
    store = container.store
    pseudonymizer = container.pseudonymizer

    def study_of(study: str) -> Any:
        found = container.studies.get(study)
        if found is None:
            raise HTTPException(404, f"no study {study!r} is configured")
        return found

    def subject_site(uow: Any, study_oid: str, subject_key: str, who: Principal) -> str:
        site = next((e.site_oid for e in uow.enrollments(study_oid) if e.subject_key == subject_key), None)
        if site is None:
            raise HTTPException(404, f"no subject {subject_key} in {study_oid}")
        ensure_site(who, site)
        return site

    def read(who: Principal, study_oid: str, endpoint: str, *, subject_key: str | None = None,
             site_oid: str | None = None, item: ItemKey | None = None, **detail: Any) -> AuditEvent:
        return AuditEvent(AuditAction.DATA_READ, actor=who.actor, study_oid=study_oid, subject_key=subject_key,
                          site_oid=site_oid, item=item, reason=f"read through the API: {endpoint}",
                          detail={"endpoint": endpoint, **{k: v for k, v in detail.items() if v is not None}})

    def entry_out(entry: AuditEntry) -> AuditEntryOut:
        e = entry.event
        src = e.source
        source = None
        if src is not None:
            source = SourceOut(resource_type=src.resource_type, id=None if src.resource_type == "Patient" else src.id,
                               version=src.version, source_id=export_source_id(src, pseudonymizer))
        return AuditEntryOut(id=entry.id, at=entry.at, actor=e.actor, action=str(e.action), study_oid=e.study_oid,
                             subject_key=e.subject_key, site_oid=e.site_oid, item=_item_out(e.item),
                             old_value=e.old_value, new_value=e.new_value, reason=e.reason, source=source, rule=e.rule,
                             detail=export_detail(e.detail, pseudonymizer), prev_hash=entry.prev_hash,
                             hash=entry.hash)

    # ------------------------------------------------------------------ the trail

    @router.get("/studies/{study}/audit", tags=["audit"], response_model=Page[AuditEntryOut],
                responses=problem_responses(401, 403, 404, 422),
                summary="The audit trail of a study",
                description="Who did what, when and why, to which value, from which source: every entry of the "
                            "study's hash-chained trail, newest first (`order=asc`: chain order). Filters: SubjectKey, "
                            "ItemOID, action (repeatable, e.g. `value.mapped`), actor (`system`, `user:<name>`), "
                            "`since`/`until` (ISO 8601; without an offset: UTC; `until` excluded). CRAs see the "
                            "entries of their assigned sites only. Intake keys are shown as keyed hashes. The read "
                            "is itself recorded (DATA_READ).")
    def list_audit(
        study: str,
        subject: str | None = Query(None, description="SubjectKey"),
        item: str | None = Query(None, description="ItemOID"),
        action: list[str] | None = Query(None, description="one or more actions, e.g. value.mapped"),
        actor: str | None = Query(None, description="system, or user:<username>"),
        since: dt.datetime | None = Query(None, description="at or after (ISO 8601)"),
        until: dt.datetime | None = Query(None, description="before (ISO 8601)"),
        order: Literal["asc", "desc"] = Query("desc", description="desc: newest first; asc: chain order"),
        page: PageParams = Depends(page_params),
        who: Principal = Depends(require(Role.CRA)),
    ) -> Page[AuditEntryOut]:
        s = study_of(study)
        known = {a.value for a in AuditAction}
        bad = [a for a in action or () if a not in known]
        if bad:
            raise HTTPException(422, f"unknown action {bad[0]!r} (actions: {', '.join(sorted(known))})")
        with store.uow(read_only=True) as uow:
            site = subject_site(uow, s.oid, subject, who) if subject is not None else None
            entries, total = uow.audit_entries(study_oid=s.oid, subject_key=subject, item_oid=item, actions=action,
                                               actor=actor, since=_utc(since), until=_utc(until),
                                               sites=who.site_filter(), limit=page.limit, offset=page.offset,
                                               newest_first=order == "desc")
            uow.audit(read(who, s.oid, "GET /studies/{study}/audit", subject_key=subject, site_oid=site,
                           item_oid=item, actions=action, actor=actor, returned=len(entries), total=total,
                           offset=page.offset))
        return Page[AuditEntryOut](items=[entry_out(e) for e in entries], total=total, limit=page.limit,
                                   offset=page.offset)

    @router.get("/studies/{study}/audit/export", tags=["audit"], response_class=Response,
                responses={200: {"description": "CSV (text/csv) or ODM 1.3.2 with AuditRecords (application/xml)",
                                 "content": {CSV: {"schema": {"type": "string"}},
                                             ODM_XML: {"schema": {"type": "string"}}}},
                           **problem_responses(401, 403, 404, 422)},
                summary="Export the audit trail (CSV or ODM AuditRecords)",
                description="The study's trail (or one subject's), oldest first, as CSV or as an ODM 1.3.2 "
                            "Transactional file: value changes as ItemData with an AuditRecord, every other event "
                            "as an AuditRecord of ClinicalData/AuditRecords. Sources are pseudonymised (the SourceID "
                            "the EDC received), intake keys hashed: the file is meant to leave the hospital. CRAs "
                            "get their assigned sites only. Recorded as a DATA_READ.")
    def export_audit(
        study: str,
        format: Literal["csv", "odm"] = Query("csv", description="csv or odm"),
        subject: str | None = Query(None, description="one SubjectKey"),
        who: Principal = Depends(require(Role.CRA)),
    ) -> Response:
        s = study_of(study)
        if subject is not None:
            with store.uow(read_only=True) as uow:
                subject_site(uow, s.oid, subject, who)
        data = export_study(store, s.oid, format, pseudonymizer, metadata_version_oid=s.metadata_version_oid,
                            subject_key=subject, sites=who.site_filter(), actor=who.actor, via="api")
        name = f"audit-{s.oid}{'-' + subject if subject else ''}.{'csv' if format == 'csv' else 'xml'}"
        return Response(data, media_type=CSV if format == "csv" else ODM_XML,
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @router.get("/studies/{study}/audit/verify", tags=["audit"], response_model=VerifyOut,
                responses=problem_responses(401, 403, 404),
                summary="Check the audit trail's hash chain",
                description="Recomputes every entry's hash and link (the whole chain, all studies): `intact`, how "
                            "many entries were verified, and the first broken entry with the reason (altered, "
                            "broken link, missing/deleted, beyond the head). data_manager and admin.")
    def verify(study: str, who: Principal = Depends(require(Role.DATA_MANAGER))) -> VerifyOut:
        study_of(study)
        result = verify_chain(store)
        b = result.broken
        return VerifyOut(intact=b is None, entries=result.entries, last_id=result.last_id,
                         broken=ChainBreakOut(entry_id=b.entry_id, kind=b.kind, message=b.message) if b else None)

    # ------------------------------------------------------------------ lineage

    @router.get("/studies/{study}/subjects/{subject}/items", tags=["audit"], response_model=list[ItemStatusOut],
                responses=problem_responses(401, 403, 404),
                summary="A subject's eCRF items with their state",
                description="Every item esource sent for the subject: value, source, map rule, frozen or not, and "
                            "the last transaction that carried it with its status. Recorded as a DATA_READ.")
    def list_items(study: str, subject: str, who: Principal = Depends(require(Role.CRA))) -> list[ItemStatusOut]:
        s = study_of(study)
        with store.uow(read_only=True) as uow:
            site = subject_site(uow, s.oid, subject, who)
            items = subject_items(uow, s.oid, subject, pseudonymizer)
            uow.audit(read(who, s.oid, "GET /studies/{study}/subjects/{subject}/items", subject_key=subject,
                           site_oid=site, items=len(items)))
        return [ItemStatusOut(**{**_plain(i), "item": _item_out(i.key)}) for i in items]

    @router.get("/studies/{study}/subjects/{subject}/lineage", tags=["audit"], response_model=ItemLineageOut,
                responses=problem_responses(401, 403, 404, 422),
                summary="The lineage of one eCRF value",
                description="For one ItemData (StudyEventOID + repeat key, FormOID, ItemGroupOID + repeat key, "
                            "ItemOID): the value sent, its source resources and versions, the map rule, the "
                            "conversions applied, the ODM transactions that carried it (outbox id, sequence, "
                            "status) with the EDC's acknowledgement or rejection, manual actions, open "
                            "discrepancies, and every audit entry about it. Recorded as a DATA_READ.")
    def lineage(
        study: str,
        subject: str,
        event: str = Query(description="StudyEventOID, e.g. SE.WEEK4"),
        form: str = Query(description="FormOID, e.g. F.VS"),
        group: str = Query(description="ItemGroupOID, e.g. IG.VS"),
        item: str = Query(description="ItemOID, e.g. IT.VS.VSORRES"),
        repeat: str | None = Query(None, description="ItemGroupRepeatKey, e.g. WEIGHT"),
        event_repeat: str | None = Query(None, description="StudyEventRepeatKey"),
        who: Principal = Depends(require(Role.CRA)),
    ) -> ItemLineageOut:
        s = study_of(study)
        key = ItemKey(s.oid, subject, event, event_repeat, form, group, repeat, item)
        with store.uow(read_only=True) as uow:
            site = subject_site(uow, s.oid, subject, who)
            found = item_lineage(uow, key, pseudonymizer)
            if found is None:
                raise HTTPException(404, f"subject {subject} has no value and no history for "
                                         f"{event}/{form}/{group}{'[' + repeat + ']' if repeat else ''}/{item}")
            uow.audit(read(who, s.oid, "GET /studies/{study}/subjects/{subject}/lineage", subject_key=subject,
                           site_oid=site, item=key, entries=len(found.history)))
        body = _plain(found)
        body.pop("key")
        return ItemLineageOut(study_oid=s.oid, subject_key=subject, item=_item_out(key), **body)

    return router
