"""API routes: who am I, transfers (the outbox) and the ODM ClinicalData pull (see esource.api).

- `GET /me`: any authenticated caller.
- `GET /studies/{study}/transfers`: cra (own sites), data_manager, admin. Metadata only (subject, site,
  visits, status, times); filtering by visit uses the `outbox_visit` index, filled lazily from the
  stored ODM for rows not indexed yet.
- `GET /studies/{study}/transfers/{id}`: the same roles; the ODM body only for data_manager/admin, and
  every time it is returned a DATA_READ audit entry commits first (no audit, no data).
- `GET /studies/{study}/odm/clinicaldata?since=&subject=`: edc (its study), data_manager, admin. An ODM
  1.3.2 Snapshot of the values esource sent (item_state) changed since `since`, written by the project's
  ODM writer (the same pseudonymous AuditRecords as the pushed transactions); audited as DATA_READ.
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from esource.api.auth import Principal, Role, ensure_site, require
from esource.api.paging import Page, PageParams, page_params
from esource.api.problems import problem_responses
from esource.domain.audit import AuditAction, AuditEvent

ODM_XML = "application/xml"
NEXT_SINCE_HEADER = "X-Esource-Next-Since"
ITEM_COUNT_HEADER = "X-Esource-Item-Count"
#: The pull's next `since` overlaps the read by this much: a unit of work that stamped its items just
#: before the read but committed after it is picked up next time (harmless: a Snapshot is idempotent).
PULL_OVERLAP = dt.timedelta(seconds=60)

TransferStatus = Literal["pending", "sent", "acked", "rejected", "failed"]


class MeOut(BaseModel):
    username: str
    roles: list[str] = Field(description="roles held")
    effective_roles: list[str] = Field(description="roles held plus those they include (admin ⊃ data_manager ⊃ cra)")
    sites: list[str] | None = Field(description="assigned sites; null: all sites")
    studies: list[str] | None = Field(description="allowed studies; null: all studies")
    authenticated_by: str = Field(description="bootstrap | token | jwt | password | demo")


class TransferOut(BaseModel):
    """One ODM transaction in the outbox (no clinical values)."""

    id: int
    study_oid: str
    subject_key: str
    site_oid: str
    sequence: int = Field(description="per subject, the order of delivery")
    visits: list[str] = Field(description="StudyEventOIDs inside the transaction")
    item_count: int
    status: TransferStatus
    attempts: int
    created_at: dt.datetime
    sent_at: dt.datetime | None
    last_error: str | None = Field(description="the EDC's or the connector's last answer, when it failed")


class TransferDetailOut(TransferOut):
    odm: str | None = Field(None, description="the ODM 1.3.2 transaction as sent (data_manager and admin only; "
                                              "each read is recorded in the audit trail)")
    previous_values: dict[str, str] | None = Field(None, description="for Updates: the values esource sent "
                                                                     "before (data_manager and admin only)")


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


def _out(row: Any, visits: Any) -> dict[str, Any]:
    return {"id": row.id, "study_oid": row.study_oid, "subject_key": row.subject_key, "site_oid": row.site_oid,
            "sequence": row.sequence, "visits": list(visits), "item_count": row.item_count, "status": row.status,
            "attempts": row.attempts, "created_at": row.created_at, "sent_at": row.sent_at,
            "last_error": row.last_error}


def build_router(container: Any) -> APIRouter:
    router = APIRouter()
    store = container.store

    def study_of(study: str) -> Any:
        found = container.studies.get(study)
        if found is None:
            raise HTTPException(404, f"no study {study!r} is configured")
        return found

    def now() -> dt.datetime:
        clock = getattr(store, "clock", None) or getattr(store, "_clock", None)
        return clock.now() if clock is not None else dt.datetime.now(dt.timezone.utc)

    # ------------------------------------------------------------------ /me

    @router.get("/me", tags=["me"], response_model=MeOut, responses=problem_responses(401),
                summary="Who am I", description="The authenticated caller: username, roles (held and included), "
                "assigned sites and allowed studies (null: no restriction), and how it authenticated.")
    def me(who: Principal = Depends(require(*Role))) -> MeOut:
        return MeOut(username=who.username, roles=sorted(who.roles), effective_roles=sorted(who.effective_roles),
                     sites=sorted(who.sites) if who.sites is not None else None,
                     studies=sorted(who.studies) if who.studies is not None else None, authenticated_by=who.via)

    # ------------------------------------------------------------------ transfers

    @router.get("/studies/{study}/transfers", tags=["transfers"], response_model=Page[TransferOut],
                responses=problem_responses(401, 403, 404, 422),
                summary="List the ODM transactions of a study",
                description="The outbox, newest first: subject, site, visits (StudyEventOIDs), status, attempts, "
                            "times, last error. No clinical values (the ODM body is in the single-transfer view). "
                            "CRAs see their assigned sites only (asking for another site is 403). `since`/`until` "
                            "bound the creation time (ISO 8601; without an offset: UTC), `until` excluded.")
    def list_transfers(
        study: str,
        site: str | None = Query(None, description="SiteOID"),
        subject: str | None = Query(None, description="SubjectKey"),
        visit: str | None = Query(None, description="StudyEventOID inside the transaction, e.g. SE.WEEK4"),
        status: list[TransferStatus] | None = Query(None, description="one or more statuses"),
        since: dt.datetime | None = Query(None, description="created at or after (ISO 8601)"),
        until: dt.datetime | None = Query(None, description="created before (ISO 8601)"),
        page: PageParams = Depends(page_params),
        who: Principal = Depends(require(Role.CRA)),
    ) -> Page[TransferOut]:
        s = study_of(study)
        sites = who.site_filter()
        if site is not None:
            ensure_site(who, site)
            sites = frozenset({site})
        with store.uow(read_only=True) as uow:
            stale = uow.needs_visit_index(s.oid)
        if stale:
            with store.uow() as uow:
                uow.index_outbox_visits(s.oid)
                uow.commit()
        with store.uow(read_only=True) as uow:
            rows, total = uow.transfers(s.oid, sites=sites, subject_key=subject, visit=visit, statuses=status,
                                        since=_utc(since), until=_utc(until), limit=page.limit, offset=page.offset)
        return Page[TransferOut](items=[TransferOut(**_out(r, r.visits)) for r in rows], total=total,
                                 limit=page.limit, offset=page.offset)

    @router.get("/studies/{study}/transfers/{transfer_id}", tags=["transfers"], response_model=TransferDetailOut,
                responses=problem_responses(401, 403, 404, 422),
                summary="One ODM transaction (with its ODM for data managers and admins)",
                description="As in the list, plus for data_manager/admin the ODM 1.3.2 document as sent and the "
                            "values its Updates replace. Returning the ODM is a read of clinical data: it is "
                            "recorded in the audit trail (DATA_READ) before the answer. CRAs get the metadata "
                            "of their sites' transactions only.")
    def get_transfer(study: str, transfer_id: int, who: Principal = Depends(require(Role.CRA))) -> TransferDetailOut:
        s = study_of(study)
        with_odm = who.has(Role.DATA_MANAGER)
        with store.uow() as uow:
            entry = uow.outbox_entry(transfer_id)
            if entry is None or entry.study_oid != s.oid:
                raise HTTPException(404, f"no transfer {transfer_id} in {s.oid}")
            ensure_site(who, entry.site_oid)
            if not uow.outbox_visits([entry.id]):
                uow.index_outbox_visits(s.oid)
            visits = uow.outbox_visits([entry.id]).get(entry.id, [])
            if with_odm:
                uow.audit(AuditEvent(AuditAction.DATA_READ, actor=who.actor, study_oid=s.oid,
                                     subject_key=entry.subject_key, site_oid=entry.site_oid,
                                     reason="transfer ODM read through the API",
                                     detail={"endpoint": "GET /studies/{study}/transfers/{id}", "outbox_id": entry.id,
                                             "sequence": entry.sequence, "item_count": entry.item_count}))
            uow.commit()
        out = TransferDetailOut(**_out(entry, visits))
        if with_odm:
            out.odm = entry.odm.decode("utf-8")
            out.previous_values = dict(entry.previous_values)
        return out

    # ------------------------------------------------------------------ ODM pull

    @router.get("/studies/{study}/odm/clinicaldata", tags=["ODM pull"], response_class=Response,
                responses={200: {"description": "ODM 1.3.2 Snapshot (FileType=Snapshot, Granularity=All), "
                                                "XSD-valid; headers `X-Esource-Next-Since` (use as the next "
                                                "`since`) and `X-Esource-Item-Count`",
                                 "content": {ODM_XML: {"schema": {"type": "string"}}}},
                           **problem_responses(401, 403, 404, 422)},
                summary="Pull ODM ClinicalData (for EDCs that pull)",
                description="The current value of every item esource sent for the study that changed at or after "
                            "`since` (all when absent), optionally for one subject, as one ODM 1.3.2 Snapshot: "
                            "SubjectKey, SiteRef, item values, and per value an AuditRecord whose SourceID is the "
                            "pseudonymous source reference. Roles: edc (its own study only), data_manager, "
                            "admin. Every pull is recorded in the audit trail (DATA_READ).")
    async def pull_clinical_data(
        study: str,
        since: dt.datetime | None = Query(None, description="items changed at or after (ISO 8601; without an "
                                                            "offset: UTC)"),
        subject: str | None = Query(None, description="one SubjectKey"),
        who: Principal = Depends(require(Role.EDC, Role.DATA_MANAGER)),
    ) -> Response:
        s = study_of(study)
        body, count, next_since = await run_in_threadpool(_pull, s, _utc(since), subject, who)
        return Response(body, media_type=ODM_XML, headers={NEXT_SINCE_HEADER: next_since,
                                                           ITEM_COUNT_HEADER: str(count)})

    def _pull(s: Any, since: dt.datetime | None, subject: str | None, who: Principal) -> tuple[bytes, int, str]:
        from esource.domain.model import ItemChange, ItemValue, SourceRef, SubjectTransaction, TransactionType
        from esource.odm.writer import write_clinical_data

        started = now()
        with store.uow(read_only=True) as uow:  # the DATA_READ entry commits when this block closes
            rows = uow.sent_items_since(s.oid, since=since, subject_key=subject, sites=who.site_filter())
            uow.audit(AuditEvent(AuditAction.DATA_READ, actor=who.actor, study_oid=s.oid, subject_key=subject,
                                 reason="ODM ClinicalData pulled through the API",
                                 detail={"endpoint": "GET /studies/{study}/odm/clinicaldata",
                                         "since": since.isoformat() if since else None, "item_count": len(rows),
                                         "subject_count": len({r[0].key.subject_key for r in rows})}))
        by_subject: OrderedDict[str, SubjectTransaction] = OrderedDict()
        for item, site, _changed in rows:
            k = item.key
            tx = by_subject.get(k.subject_key)
            if tx is None:
                tx = by_subject[k.subject_key] = SubjectTransaction(
                    study_oid=s.oid, metadata_version_oid=s.metadata_version_oid, subject_key=k.subject_key,
                    site_oid=site, subject_transaction_type=None, changes=[])
            ref = SourceRef(resource_type=item.source_type, id=item.source_id, version=item.source_version,
                            identity=item.source_identity)
            tx.changes.append(ItemChange(ItemValue(k, item.value, ref, item.rule), TransactionType.UPSERT))
        stamp = started.astimezone(dt.timezone.utc)
        file_oid = f"ESOURCE.{s.oid}.PULL.{stamp.strftime('%Y%m%dT%H%M%S%fZ')}"
        body = write_clinical_data(list(by_subject.values()), file_type="Snapshot", file_oid=file_oid,
                                   creation=stamp, pseudonymizer=container.pseudonymizer, metadata=s.metadata)
        next_since = (stamp - PULL_OVERLAP).isoformat().replace("+00:00", "Z")
        return body, len(rows), next_since

    return router
