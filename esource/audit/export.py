"""Audit trail exports per study (or subject): CSV, and ODM 1.3.2 with AuditRecords.

Exports leave the hospital (sponsor, monitors, inspectors), the store does not. So, as in the ODM
transactions esource sends to the EDC:
- a source is named by `Pseudonymizer.source_id` (`Observation:<hmac>|v=<version>`), never by its
  resource id or identity. The same pseudonym is in the AuditRecord SourceID the EDC received with
  the value, so an inspector can match the two trails; the hospital, which holds the key, resolves
  it back with esource's lineage. A Patient source is only `Patient|v=<version>`;
- free text that names a source (a discrepancy message, a reason for change) has the source's id,
  identity and fullUrl replaced by its pseudonym (the ODM writer's `_scrub`);
- `detail.intake_key` (a file path, a Kafka offset, a request id: file names can carry a patient's
  name) is replaced by a keyed hash `intake:<hmac>`.
Each row keeps its chain `hash` and `prev_hash`, so an export can be matched against the chain
(`esource audit verify` runs inside the hospital, where the unpseudonymised row can be hashed).

ODM layout (FileType Transactional — ODM's form of a value's history): every entry that set or
changed an ItemData value (it has an item key and a new value) is one SubjectData > ... > ItemData
with the value and an inline AuditRecord (ID `AR.<entry id>`); every other entry (messages, transfers,
discrepancies, enrollment, reads ...) is an AuditRecord in the ClinicalData's AuditRecords, its
ReasonForChange saying what happened. UserRef names an AdminData User per actor, LocationRef the
subject's site (a study-level Location `LOC.<study>` for entries without a site). EditPoint is
`DBAudit` (a database audit trail) throughout.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from lxml import etree

import esource
from esource.domain.audit import SYSTEM_ACTOR, AuditEntry, item_columns
from esource.domain.model import SYSTEM_USER_OID, SourceRef
from esource.odm.writer import ESOURCE_USER_FULL_NAME, _scrub, _utc_iso
from esource.odm.xsd import ODM_NAMESPACES
from esource.privacy import Pseudonymizer

CSV_COLUMNS: tuple[str, ...] = (
    "id", "at", "actor", "action", "study_oid", "subject_key", "site_oid", "study_event_oid",
    "study_event_repeat_key", "form_oid", "item_group_oid", "item_group_repeat_key", "item_oid", "old_value",
    "new_value", "reason", "source_type", "source_id", "source_version", "rule", "detail", "prev_hash", "hash",
)  # fmt: skip

_NS = ODM_NAMESPACES["1.3.2"]
_SAFE_OID = re.compile(r"[A-Za-z0-9._\-]{1,80}")
PAGE = 2000  # entries read per query while exporting


def study_entries(store: Any, study_oid: str | None, subject_key: str | None = None,
                  sites: Iterable[str] | None = None) -> list[AuditEntry]:
    """Every entry of a study (or one subject; restricted to `sites` when given), in chain order."""
    out: list[AuditEntry] = []
    with store.uow(read_only=True) as uow:
        while True:
            page, total = uow.audit_entries(study_oid=study_oid, subject_key=subject_key, sites=sites,
                                            limit=PAGE, offset=len(out))
            out.extend(page)
            if not page or len(out) >= total:
                return out


# ------------------------------------------------------------------------------------------ privacy


def export_source_id(source: SourceRef | None, pseudonymizer: Pseudonymizer) -> str | None:
    """The pseudonymous source id of an entry's source (see the module docstring)."""
    if source is None:
        return None
    if source.resource_type == "Patient" or not (source.id or source.identity):
        version = source.version[:19] if source.version.startswith("sha256:") else source.version
        return f"{source.resource_type}|v={version}"
    return pseudonymizer.source_id(source)


def _scrub_text(text: str | None, source: SourceRef | None, pseudonymizer: Pseudonymizer) -> str | None:
    if text is None or source is None or source.resource_type == "Patient":
        return text
    return _scrub(text, source, pseudonymizer)


def _intake_pseudonym(intake_key: str, pseudonymizer: Pseudonymizer) -> str:
    """`intake:<hmac>`: the keyed hash the source pseudonyms use, over the intake key."""
    return pseudonymizer.reference(SourceRef(resource_type="intake", id=None, version="", identity=intake_key))


def _scrub_intake(text: str | None, detail: dict[str, Any], pseudonymizer: Pseudonymizer) -> str | None:
    """A reason naming the entry's intake key, or the file it came from (a dead letter's reason names
    its origin: file names can carry a patient's name), gets the intake pseudonym instead."""
    intake = detail.get("intake_key")
    if text is None or not isinstance(intake, str) or not intake:
        return text
    pseudonym = _intake_pseudonym(intake, pseudonymizer)
    needles = [intake]
    body = intake.split("|", 1)[-1].removeprefix("file:")  # "[<study>|][file:]<path>[:<hash>]" -> the path
    if "/" in body:
        path = re.sub(r":[0-9a-f]{8,}$", "", body)
        needles += [path, path.rsplit("/", 1)[-1]]
    for needle in sorted({n for n in needles if len(n) >= 4}, key=len, reverse=True):
        text = text.replace(needle, pseudonym)
    return text


def export_detail(detail: dict[str, Any], pseudonymizer: Pseudonymizer) -> dict[str, Any]:
    """`detail` as exported: intake keys replaced by their keyed hash."""
    out = dict(detail)
    if isinstance(out.get("intake_key"), str):
        out["intake_key"] = _intake_pseudonym(out["intake_key"], pseudonymizer)
    return out


def export_row(entry: AuditEntry, pseudonymizer: Pseudonymizer) -> dict[str, Any]:
    """One entry as an export row (CSV_COLUMNS), pseudonymised."""
    e = entry.event
    item = e.item
    src = e.source
    return {
        "id": entry.id,
        "at": _utc_iso(entry.at),
        "actor": e.actor,
        "action": str(e.action),
        "study_oid": e.study_oid,
        "subject_key": e.subject_key,
        "site_oid": e.site_oid,
        **item_columns(item),
        "old_value": e.old_value,
        "new_value": e.new_value,
        "reason": _scrub_intake(_scrub_text(e.reason, src, pseudonymizer), e.detail, pseudonymizer),
        "source_type": src.resource_type if src else None,
        "source_id": export_source_id(src, pseudonymizer),
        "source_version": src.version if src else None,
        "rule": e.rule,
        "detail": json.dumps(export_detail(e.detail, pseudonymizer), sort_keys=True, ensure_ascii=False,
                             separators=(",", ":")),
        "prev_hash": entry.prev_hash,
        "hash": entry.hash,
    }


# ------------------------------------------------------------------------------------------ CSV


def export_csv(entries: Sequence[AuditEntry], pseudonymizer: Pseudonymizer) -> str:
    """RFC 4180 CSV with a header row (CSV_COLUMNS); an absent value is an empty field."""
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\r\n")
    writer.writeheader()
    for entry in entries:
        row = export_row(entry, pseudonymizer)
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ ODM


def user_oid_of(actor: str) -> str:
    """The AdminData User OID of an actor: USR.ESOURCE for the system, USR.<username> for a person."""
    if actor == SYSTEM_ACTOR:
        return SYSTEM_USER_OID
    name = actor.removeprefix("user:")
    if _SAFE_OID.fullmatch(name):
        return f"USR.{name}"
    return "USR.H" + hashlib.sha256(actor.encode("utf-8")).hexdigest()[:16]


def _is_value_entry(entry: AuditEntry) -> bool:
    e = entry.event
    return e.item is not None and e.new_value is not None and e.subject_key is not None


def _reason_text(entry: AuditEntry, row: dict[str, Any]) -> str:
    """ReasonForChange of an entry: what happened, why, and its detail (pseudonymised)."""
    e = entry.event
    parts = [str(e.action)]
    if row["subject_key"]:
        parts.append(f"subject {row['subject_key']}")
    if e.item is not None:
        k = e.item
        parts.append("item " + "/".join(x for x in (k.study_event_oid, k.study_event_repeat_key, k.form_oid,
                                                     k.item_group_oid, k.item_group_repeat_key, k.item_oid) if x))
    if e.old_value is not None or e.new_value is not None:
        parts.append(f"{e.old_value!r} -> {e.new_value!r}" if e.old_value is not None else f"value {e.new_value!r}")
    if row["rule"]:
        parts.append(f"rule {row['rule']}")
    text = "; ".join(parts)
    if row["reason"]:
        text += f": {row['reason']}"
    if row["detail"] not in ("{}", ""):
        text += f" {row['detail']}"
    return text


def export_odm(entries: Sequence[AuditEntry], pseudonymizer: Pseudonymizer, *, study_oid: str,
               metadata_version_oid: str, creation: dt.datetime, file_oid: str | None = None) -> bytes:
    """The entries as one ODM 1.3.2 Transactional document (see the module docstring); UTF-8 bytes."""
    stamp = _utc_iso(creation)
    q = lambda name: f"{{{_NS}}}{name}"
    root = etree.Element(q("ODM"), nsmap={None: _NS})
    root.set("FileOID", file_oid or f"ESOURCE.AUDIT.{study_oid}.{creation.strftime('%Y%m%dT%H%M%S')}")
    root.set("FileType", "Transactional")
    root.set("CreationDateTime", stamp)
    root.set("ODMVersion", "1.3.2")
    root.set("Originator", "esource")
    root.set("SourceSystem", "esource")
    root.set("SourceSystemVersion", esource.__version__)

    rows = [(entry, export_row(entry, pseudonymizer)) for entry in entries]
    study_location = f"LOC.{study_oid}"
    actors = dict.fromkeys(r["actor"] for _, r in rows)
    sites = dict.fromkeys(r["site_oid"] for _, r in rows if r["site_oid"])
    admin = etree.SubElement(root, q("AdminData"), {"StudyOID": study_oid})
    for actor in actors or {SYSTEM_ACTOR: None}:
        user = etree.SubElement(admin, q("User"), {"OID": user_oid_of(actor), "UserType": "Other"})
        etree.SubElement(user, q("FullName")).text = (ESOURCE_USER_FULL_NAME if actor == SYSTEM_ACTOR
                                                      else actor.removeprefix("user:"))
    locations = [(site, "Site") for site in sites]
    if any(not r["site_oid"] for _, r in rows) or not locations:
        locations.append((study_location, "Other"))
    for oid, kind in locations:
        loc = etree.SubElement(admin, q("Location"), {"OID": oid, "Name": oid, "LocationType": kind})
        etree.SubElement(loc, q("MetaDataVersionRef"), {"StudyOID": study_oid,
                                                         "MetaDataVersionOID": metadata_version_oid,
                                                         "EffectiveDate": stamp[:10]})

    cd = etree.SubElement(root, q("ClinicalData"), {"StudyOID": study_oid, "MetaDataVersionOID": metadata_version_oid})

    def audit_record(parent: etree._Element, entry: AuditEntry, row: dict[str, Any], reason: str | None) -> None:
        ar = etree.SubElement(parent, q("AuditRecord"), {"EditPoint": "DBAudit", "ID": f"AR.{entry.id}"})
        etree.SubElement(ar, q("UserRef"), {"UserOID": user_oid_of(row["actor"])})
        etree.SubElement(ar, q("LocationRef"), {"LocationOID": row["site_oid"] or study_location})
        etree.SubElement(ar, q("DateTimeStamp")).text = row["at"]
        if reason:
            etree.SubElement(ar, q("ReasonForChange")).text = reason
        if row["source_id"]:
            etree.SubElement(ar, q("SourceID")).text = row["source_id"]

    others: list[tuple[AuditEntry, dict[str, Any]]] = []
    for entry, row in rows:
        if not _is_value_entry(entry):
            others.append((entry, row))
            continue
        k = entry.event.item
        assert k is not None
        sd = etree.SubElement(cd, q("SubjectData"), {"SubjectKey": row["subject_key"], "TransactionType": "Update"})
        if row["site_oid"]:
            etree.SubElement(sd, q("SiteRef"), {"LocationOID": row["site_oid"]})
        upsert = {"TransactionType": "Upsert"}
        se = {"StudyEventOID": k.study_event_oid, **upsert}
        if k.study_event_repeat_key is not None:
            se["StudyEventRepeatKey"] = k.study_event_repeat_key
        sed = etree.SubElement(sd, q("StudyEventData"), se)
        fd = etree.SubElement(sed, q("FormData"), {"FormOID": k.form_oid, **upsert})
        ig = {"ItemGroupOID": k.item_group_oid, **upsert}
        if k.item_group_repeat_key is not None:
            ig["ItemGroupRepeatKey"] = k.item_group_repeat_key
        igd = etree.SubElement(fd, q("ItemGroupData"), ig)
        tx = entry.event.detail.get("transaction_type")
        if tx not in ("Insert", "Update", "Remove", "Upsert", "Context"):
            tx = "Update" if entry.event.old_value is not None else "Insert"
        idata = etree.SubElement(igd, q("ItemData"), {"ItemOID": k.item_oid, "TransactionType": tx,
                                                      "Value": row["new_value"]})
        audit_record(idata, entry, row, _reason_text(entry, row))
    if others:
        records = etree.SubElement(cd, q("AuditRecords"))
        for entry, row in others:
            audit_record(records, entry, row, _reason_text(entry, row))
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + etree.tostring(root, encoding="UTF-8", pretty_print=True)


# ------------------------------------------------------------------------------------------ use case


def export_study(store: Any, study_oid: str, fmt: str, pseudonymizer: Pseudonymizer, *,
                 metadata_version_oid: str | None = None, subject_key: str | None = None,
                 sites: Iterable[str] | None = None, actor: str = SYSTEM_ACTOR, creation: dt.datetime | None = None,
                 via: str = "cli") -> bytes:
    """The audit trail of a study (or subject; `sites` restricts it) as `fmt` "csv" or "odm" (UTF-8
    bytes; the ODM needs `metadata_version_oid`). The export is itself a read of clinical data: it is
    recorded as a DATA_READ entry (actor, format, how many entries) before it is returned."""
    from esource.domain.audit import AuditAction, AuditEvent

    if fmt not in ("csv", "odm"):
        raise ValueError(f"format must be csv or odm, not {fmt!r}")
    if fmt == "odm" and not metadata_version_oid:
        raise ValueError("the ODM export needs the study's MetaDataVersionOID")
    entries = study_entries(store, study_oid, subject_key, sites)
    now = creation or dt.datetime.now(dt.UTC)
    if fmt == "csv":
        data = export_csv(entries, pseudonymizer).encode("utf-8")
    else:
        assert metadata_version_oid is not None
        data = export_odm(entries, pseudonymizer, study_oid=study_oid, metadata_version_oid=metadata_version_oid,
                          creation=now)
    with store.uow() as uow:
        uow.audit(AuditEvent(AuditAction.DATA_READ, actor=actor, study_oid=study_oid, subject_key=subject_key,
                             reason="audit trail export",
                             detail={"what": "audit_export", "format": fmt, "entries": len(entries), "via": via,
                                     "last_id": entries[-1].id if entries else None,
                                     **({"sites": sorted(sites)} if sites is not None else {})}))
        uow.commit()
    return data
