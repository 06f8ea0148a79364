"""esource's own EDC receiver: an ODM 1.3.2 endpoint that stores ClinicalData in SQLite and hands it
back as a Snapshot. The demo, the delivery tests and crash tests deliver to it; vendor emulators
(Rave, REDCap, OpenClinica) follow the same pattern.

    app = create_sandbox_app(Path("sandbox-edc.sqlite"))     # or None: in memory
    run_sandbox("127.0.0.1", 8090, Path("sandbox-edc.sqlite"))  # standalone, with uvicorn

What it promises, like a real EDC would:
- `POST /studies/{study}/odm` takes one Transactional ClinicalData file. Hostile or broken XML: 400;
  not valid against the ODM 1.3.2 XSD: 422 with the schema messages; bigger than the limit: 413.
- The transaction key is the `X-Esource-Transaction` header (`<study>/<subject>/<sequence>`), else
  the ODM FileOID. A key seen before answers 200 with the ORIGINAL receipt and applies nothing (the
  same key with different content is refused: 409). With the header, a subject's transactions must
  arrive in sequence (1, 2, 3 ...): anything else is 409 "out of order". A transaction the sandbox
  refused (a 4xx about its content: 400, 404, 409, 413, 422, an injected rejection) counts as arrived:
  esource may give it up (a data manager closed the rejection) and go on with the next sequence, or
  send it again after a fix (re-queued) as long as no later transaction was applied.
- A transaction applies atomically or not at all: ItemData Insert on an existing item, Update or
  Remove on a missing one, is 409 with the item named, and nothing of the file is kept.
- Per item: the value, the transaction key that set it and its AuditRecord (user, location,
  DateTimeStamp, ReasonForChange, SourceID); every change is also appended to an item audit table.
- Fault injection (`POST /_faults`) makes the next deliveries fail: 500, 503, 429 with Retry-After,
  a timeout, a dropped connection, a rejection, a slow answer, an authentication failure, and with
  `after_commit` the ambiguous case (applied, then failed).

Leniencies (documented, deliberate): SubjectData TransactionType="Insert" on a subject that exists is
accepted (site staff may have created it); ItemData without TransactionType is an Upsert; FormRepeatKey
is ignored (esource's item key has none).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import hashlib
import sqlite3
import threading
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from lxml import etree
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from esource.errors import IntakeError
from esource.odm.xsd import ODM_NAMESPACES, safe_parse, validate_odm
from esource.connectors.emulators.common import (
    ITEM_PATH_COLUMNS,
    ITEM_PATH_UNIQUE,
    add_fault_routes,
    open_sqlite,
    read_limited_body,
    serve_standalone,
)
from esource.connectors.emulators.faults import Fault, FaultPlan, FaultRequestBase, drop_connection

__all__ = ["SandboxEdc", "create_sandbox_app", "run_sandbox", "main", "TRANSACTION_HEADER", "DEFAULT_MAX_BODY_BYTES"]

TRANSACTION_HEADER = "X-Esource-Transaction"
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
ODM_NS = ODM_NAMESPACES["1.3.2"]
_N = "{" + ODM_NS + "}"
_XML_TYPES = ("application/xml", "text/xml", "application/odm+xml")
SITE_USER_OID = "USR.SITE"

FaultMode = Literal["500", "503", "429", "timeout", "reset", "reject", "slow", "auth"]


def _utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class SandboxError(Exception):
    """An answer other than success: HTTP status, a stable code and a human message."""

    def __init__(self, status: int, code: str, message: str, errors: list[str] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.errors = list(errors or [])
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.errors:
            body["errors"] = self.errors
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# --------------------------------------------------------------------------------------------------
# the parsed transaction


@dataclasses.dataclass(frozen=True, slots=True)
class ItemPath:
    event: str
    event_repeat: str  # "" when none
    form: str
    group: str
    group_repeat: str  # "" when none
    item: str

    def label(self) -> str:
        ev = f"{self.event}[{self.event_repeat}]" if self.event_repeat else self.event
        ig = f"{self.group}[{self.group_repeat}]" if self.group_repeat else self.group
        return f"{ev}/{self.form}/{ig}/{self.item}"


@dataclasses.dataclass(frozen=True, slots=True)
class ItemOp:
    path: ItemPath
    transaction_type: str  # Insert | Update | Upsert | Remove | Context
    value: str | None
    user_oid: str | None = None
    location_oid: str | None = None
    date_time_stamp: str | None = None
    reason_for_change: str | None = None
    source_id: str | None = None


@dataclasses.dataclass(slots=True)
class SubjectOp:
    study_oid: str
    metadata_version_oid: str
    subject_key: str
    site_oid: str | None
    transaction_type: str | None
    items: list[ItemOp]


_TAG_SE, _TAG_FD, _TAG_IG, _TAG_IT, _TAG_AR, _TAG_USER, _TAG_LOC = (
    _N + name for name in ("StudyEventData", "FormData", "ItemGroupData", "ItemData", "AuditRecord", "UserRef",
                           "LocationRef"))
_AUDIT_TEXTS = {_N + "DateTimeStamp": "stamp", _N + "ReasonForChange": "reason", _N + "SourceID": "source"}


def parse_transaction(root: etree._Element, study: str) -> list[SubjectOp]:
    """The subjects and ItemData of a (schema-valid) Transactional ODM file for `study`."""
    if root.get("FileType") != "Transactional":
        raise SandboxError(422, "NOT_TRANSACTIONAL",
                           f"only Transactional ODM files are accepted (FileType is {root.get('FileType')!r})")
    blocks = root.findall(f"{_N}ClinicalData")
    if not blocks:
        raise SandboxError(422, "NO_CLINICAL_DATA", "the ODM file has no ClinicalData")
    subjects: list[SubjectOp] = []
    for cd in blocks:
        if cd.get("StudyOID") != study:
            raise SandboxError(422, "WRONG_STUDY",
                               f"ClinicalData is for study {cd.get('StudyOID')!r} but was posted to study {study!r}")
        for sd in cd.findall(f"{_N}SubjectData"):
            site = sd.find(f"{_N}SiteRef")
            op = SubjectOp(study, cd.get("MetaDataVersionOID", ""), sd.get("SubjectKey", ""),
                           site.get("LocationOID") if site is not None else None, sd.get("TransactionType"), [])
            for se in sd.iterchildren(_TAG_SE):
                for fd in se.iterchildren(_TAG_FD):
                    for ig in fd.iterchildren(_TAG_IG):
                        for it in ig.iterchildren(_TAG_IT):
                            path = ItemPath(se.get("StudyEventOID", ""), se.get("StudyEventRepeatKey") or "",
                                            fd.get("FormOID", ""), ig.get("ItemGroupOID", ""),
                                            ig.get("ItemGroupRepeatKey") or "", it.get("ItemOID", ""))
                            # the AuditRecord's parts in one pass over its children (thousands of items a file)
                            found: dict[str, str | None] = {}
                            for part in next(it.iterchildren(_TAG_AR), ()):
                                tag = part.tag
                                if tag == _TAG_USER:
                                    found["user"] = part.get("UserOID")
                                elif tag == _TAG_LOC:
                                    found["loc"] = part.get("LocationOID")
                                elif tag in _AUDIT_TEXTS:
                                    found.setdefault(_AUDIT_TEXTS[tag], part.text)
                            value = None if it.get("IsNull") == "Yes" else it.get("Value", "")
                            op.items.append(ItemOp(
                                path, it.get("TransactionType") or "Upsert", value, found.get("user"),
                                found.get("loc"), found.get("stamp"), found.get("reason"), found.get("source")))
            subjects.append(op)
    if not subjects:
        raise SandboxError(422, "NO_SUBJECT", "the ODM file has no SubjectData")
    return subjects


def parse_transaction_header(value: str | None, study: str) -> tuple[str, str, int] | None:
    """`<study>/<subject>/<sequence>` -> (study, subject, sequence); None when absent."""
    if value is None:
        return None
    head, sep, seq = value.rpartition("/")
    h_study, sep2, subject = head.partition("/")
    if not sep or not sep2 or not h_study or not subject or not seq.isdigit() or int(seq) < 1:
        raise SandboxError(400, "BAD_TRANSACTION_KEY",
                           f"{TRANSACTION_HEADER} must be <study>/<subject>/<sequence> with sequence >= 1, "
                           f"got {value!r}")
    if h_study != study:
        raise SandboxError(400, "BAD_TRANSACTION_KEY",
                           f"{TRANSACTION_HEADER} names study {h_study!r} but the request is for study {study!r}")
    return h_study, subject, int(seq)


# --------------------------------------------------------------------------------------------------
# storage

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS refusal (
    study TEXT NOT NULL,
    subject TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    code TEXT NOT NULL,
    refused_at TEXT NOT NULL,
    PRIMARY KEY (study, subject, sequence)
);
CREATE TABLE IF NOT EXISTS tx (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study TEXT NOT NULL,
    key TEXT NOT NULL,
    subject TEXT,
    sequence INTEGER,
    file_oid TEXT,
    reference TEXT NOT NULL,
    received_at TEXT NOT NULL,
    items INTEGER NOT NULL,
    body_sha256 TEXT NOT NULL,
    duplicates_seen INTEGER NOT NULL DEFAULT 0,
    UNIQUE (study, key)
);
CREATE TABLE IF NOT EXISTS subject (
    study TEXT NOT NULL,
    subject TEXT NOT NULL,
    site TEXT,
    metadata_version TEXT NOT NULL DEFAULT '',
    last_sequence INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    PRIMARY KEY (study, subject)
);
CREATE TABLE IF NOT EXISTS item (
    {ITEM_PATH_COLUMNS},
    value TEXT,
    tx_key TEXT,
    user_oid TEXT,
    location_oid TEXT,
    date_time_stamp TEXT,
    reason_for_change TEXT,
    source_id TEXT,
    edited_by_site INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT NOT NULL,
    {ITEM_PATH_UNIQUE}
);
CREATE TABLE IF NOT EXISTS item_audit (
    {ITEM_PATH_COLUMNS},
    action TEXT NOT NULL,
    value TEXT,
    previous_value TEXT,
    tx_key TEXT,
    user_oid TEXT,
    reason_for_change TEXT,
    source_id TEXT,
    recorded_at TEXT NOT NULL
);
"""

_PATH_COLS = ("event", "event_repeat", "form", "grp", "group_repeat", "item")


class SandboxEdc:
    """The sandbox's storage: stdlib sqlite3 (WAL for a file), one connection, one lock. Every
    transaction is applied inside BEGIN IMMEDIATE ... COMMIT: all of it or nothing."""

    def __init__(self, db_path: Path | None = None) -> None:
        self.db_path = Path(db_path) if db_path is not None else None
        self._lock = threading.RLock()
        self._db = open_sqlite(self.db_path, _SCHEMA)  # synchronous=FULL: an acknowledged transaction survives a crash

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---------------------------------------------------------------------------------------- writes

    def receive(self, study: str, key: str, header: tuple[str, str, int] | None, file_oid: str | None,
                body_sha256: str, subjects: list[SubjectOp], *, count_duplicate: bool = True
                ) -> tuple[int, dict[str, Any]]:
        """Apply one transaction (or recognise it as a duplicate). Returns (HTTP status, receipt)."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                seen = db.execute("SELECT * FROM tx WHERE study = ? AND key = ?", (study, key)).fetchone()
                if seen is not None:
                    if seen["body_sha256"] != body_sha256:
                        raise SandboxError(409, "KEY_REUSED",
                                           f"transaction key {key!r} was already received with different content "
                                           f"(reference {seen['reference']}); nothing applied")
                    if count_duplicate:
                        db.execute("UPDATE tx SET duplicates_seen = duplicates_seen + 1 WHERE id = ?", (seen["id"],))
                    db.execute("COMMIT")
                    return 200, {"reference": seen["reference"], "items": seen["items"], "key": key,
                                 "duplicate": True}
                subject_key = sequence = None
                if header is not None:
                    _, subject_key, sequence = header
                    others = sorted({s.subject_key for s in subjects if s.subject_key != subject_key})
                    if others:
                        raise SandboxError(422, "WRONG_SUBJECT",
                                           f"{TRANSACTION_HEADER} is for subject {subject_key!r} but the file "
                                           f"carries data for {', '.join(others)}")
                    row = db.execute("SELECT last_sequence FROM subject WHERE study = ? AND subject = ?",
                                     (study, subject_key)).fetchone()
                    applied = row["last_sequence"] if row is not None else 0
                    refused = {r[0] for r in db.execute("SELECT sequence FROM refusal WHERE study = ? AND subject = ?",
                                                        (study, subject_key))}
                    last = max([applied, *refused])
                    if sequence != last + 1 and not (sequence in refused and sequence > applied):
                        raise SandboxError(409, "OUT_OF_ORDER",
                                           f"out of order: subject {subject_key} expects transaction sequence "
                                           f"{last + 1}, got {sequence}; nothing applied")
                now = _utc_now()
                n_items = 0
                for sop in subjects:
                    self._apply_subject(db, sop, key, now)
                    n_items += len(sop.items)
                cur = db.execute(
                    "INSERT INTO tx (study, key, subject, sequence, file_oid, reference, received_at, items, "
                    "body_sha256) VALUES (?, ?, ?, ?, ?, '', ?, ?, ?)",
                    (study, key, subject_key or (subjects[0].subject_key if len(subjects) == 1 else None), sequence,
                     file_oid, now, n_items, body_sha256))
                reference = f"SBX-{cur.lastrowid}"
                db.execute("UPDATE tx SET reference = ? WHERE id = ?", (reference, cur.lastrowid))
                if sequence is not None:
                    db.execute("UPDATE subject SET last_sequence = ? WHERE study = ? AND subject = ?",
                               (sequence, study, subject_key))
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
        return 201, {"reference": reference, "items": n_items, "key": key, "duplicate": False}

    def refused(self, study: str, header: tuple[str, str, int], code: str) -> None:
        """Remember a refused transaction of a subject (see the module docstring: it counts as arrived)."""
        _, subject, sequence = header
        with self._lock:
            row = self._db.execute("SELECT last_sequence FROM subject WHERE study = ? AND subject = ?",
                                   (study, subject)).fetchone()
            if row is not None and sequence <= row["last_sequence"]:
                return  # applied before (an answer lost, then refused): nothing to remember
            self._db.execute("INSERT OR REPLACE INTO refusal (study, subject, sequence, code, refused_at) "
                             "VALUES (?, ?, ?, ?, ?)", (study, subject, sequence, code, _utc_now()))

    def _apply_subject(self, db: sqlite3.Connection, sop: SubjectOp, key: str, now: str) -> None:
        exists = db.execute("SELECT 1 FROM subject WHERE study = ? AND subject = ?",
                            (sop.study_oid, sop.subject_key)).fetchone() is not None
        if not exists:
            if sop.transaction_type in ("Update", "Remove", "Context"):
                raise SandboxError(409, "UNKNOWN_SUBJECT",
                                   f"SubjectData {sop.transaction_type} for subject {sop.subject_key}, which does "
                                   "not exist in the EDC; nothing applied")
            db.execute("INSERT INTO subject (study, subject, site, metadata_version, created_at) VALUES (?, ?, ?, ?, ?)",
                       (sop.study_oid, sop.subject_key, sop.site_oid, sop.metadata_version_oid, now))
        else:
            db.execute("UPDATE subject SET site = COALESCE(?, site), metadata_version = ? WHERE study = ? AND subject = ?",
                       (sop.site_oid, sop.metadata_version_oid, sop.study_oid, sop.subject_key))
        for op in sop.items:
            self._apply_item(db, sop, op, key, now)

    def _apply_item(self, db: sqlite3.Connection, sop: SubjectOp, op: ItemOp, key: str, now: str) -> None:
        p = op.path
        where = ("study = ? AND subject = ? AND event = ? AND event_repeat = ? AND form = ? AND grp = ? "
                 "AND group_repeat = ? AND item = ?")
        args = (sop.study_oid, sop.subject_key, p.event, p.event_repeat, p.form, p.group, p.group_repeat, p.item)
        current = db.execute(f"SELECT value, edited_by_site FROM item WHERE {where}", args).fetchone()
        tt = op.transaction_type
        label = f"subject {sop.subject_key}, {p.label()}"
        if tt == "Context":
            return
        if tt == "Insert" and current is not None:
            by = " (entered by site staff)" if current["edited_by_site"] else ""
            raise SandboxError(409, "ITEM_EXISTS",
                               f"Insert of {label}: the item already has a value{by}; nothing applied")
        if tt in ("Update", "Remove") and current is None:
            raise SandboxError(409, "ITEM_MISSING", f"{tt} of {label}: the item has no value; nothing applied")
        previous = current["value"] if current is not None else None
        if tt == "Remove":
            db.execute(f"DELETE FROM item WHERE {where}", args)
        elif current is None:
            db.execute(
                "INSERT INTO item (study, subject, event, event_repeat, form, grp, group_repeat, item, value, tx_key, "
                "user_oid, location_oid, date_time_stamp, reason_for_change, source_id, edited_by_site, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
                (*args, op.value, key, op.user_oid, op.location_oid, op.date_time_stamp, op.reason_for_change,
                 op.source_id, now))
        else:
            db.execute(
                f"UPDATE item SET value = ?, tx_key = ?, user_oid = ?, location_oid = ?, date_time_stamp = ?, "
                f"reason_for_change = ?, source_id = ?, edited_by_site = 0, updated_at = ? WHERE {where}",
                (op.value, key, op.user_oid, op.location_oid, op.date_time_stamp, op.reason_for_change, op.source_id,
                 now, *args))
        action = "Remove" if tt == "Remove" else ("Insert" if current is None else "Update")
        self._audit(db, args, action, op.value if tt != "Remove" else None, previous, key, op.user_oid,
                    op.reason_for_change, op.source_id, now)

    @staticmethod
    def _audit(db: sqlite3.Connection, args: tuple, action: str, value: str | None, previous: str | None,
               key: str | None, user: str | None, reason: str | None, source_id: str | None, now: str) -> None:
        db.execute(
            "INSERT INTO item_audit (study, subject, event, event_repeat, form, grp, group_repeat, item, action, value, "
            "previous_value, tx_key, user_oid, reason_for_change, source_id, recorded_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*args, action, value, previous, key, user, reason, source_id, now))

    def site_edit(self, study: str, subject: str, path: ItemPath, value: str | None, *, user_oid: str,
                  reason: str | None) -> dict[str, Any]:
        """Site staff enter or change a value in the EDC (not through esource)."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                sub = db.execute("SELECT site FROM subject WHERE study = ? AND subject = ?", (study, subject)).fetchone()
                if sub is None:
                    raise SandboxError(404, "UNKNOWN_SUBJECT", f"subject {subject} does not exist in study {study}")
                now = _utc_now()
                args = (study, subject, path.event, path.event_repeat, path.form, path.group, path.group_repeat,
                        path.item)
                where = ("study = ? AND subject = ? AND event = ? AND event_repeat = ? AND form = ? AND grp = ? "
                         "AND group_repeat = ? AND item = ?")
                current = db.execute(f"SELECT value FROM item WHERE {where}", args).fetchone()
                previous = current["value"] if current is not None else None
                if current is None:
                    db.execute(
                        "INSERT INTO item (study, subject, event, event_repeat, form, grp, group_repeat, item, value, "
                        "tx_key, user_oid, location_oid, date_time_stamp, reason_for_change, source_id, edited_by_site, "
                        "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?, NULL, 1, ?)",
                        (*args, value, user_oid, sub["site"], now, reason, now))
                else:
                    db.execute(
                        f"UPDATE item SET value = ?, tx_key = NULL, user_oid = ?, location_oid = ?, date_time_stamp = ?, "
                        f"reason_for_change = ?, source_id = NULL, edited_by_site = 1, updated_at = ? WHERE {where}",
                        (value, user_oid, sub["site"], now, reason, now, *args))
                self._audit(db, args, "SiteEdit", value, previous, None, user_oid, reason, None, now)
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
        return {"subject": subject, **_path_json(path), "value": value, "previous_value": previous,
                "edited_by_site": True, "user": user_oid, "reason_for_change": reason, "date_time_stamp": now}

    # ----------------------------------------------------------------------------------------- reads

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def transactions(self, study: str) -> list[dict[str, Any]]:
        return [{"key": r["key"], "reference": r["reference"], "received_at": r["received_at"], "items": r["items"],
                 "duplicates_seen": r["duplicates_seen"], "subject": r["subject"], "sequence": r["sequence"],
                 "file_oid": r["file_oid"]}
                for r in self._query("SELECT * FROM tx WHERE study = ? ORDER BY id", (study,))]

    def items(self, study: str, subject: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM item WHERE study = ?", (study,)
        if subject is not None:
            sql, args = sql + " AND subject = ?", (study, subject)
        return [_item_json(r) for r in self._query(sql + " ORDER BY id", args)]

    def audit(self, study: str) -> list[dict[str, Any]]:
        return [{"subject": r["subject"], "event": r["event"], "event_repeat": r["event_repeat"] or None,
                 "form": r["form"], "group": r["grp"], "group_repeat": r["group_repeat"] or None, "item": r["item"],
                 "action": r["action"], "value": r["value"], "previous_value": r["previous_value"],
                 "transaction": r["tx_key"], "user": r["user_oid"], "reason_for_change": r["reason_for_change"],
                 "source_id": r["source_id"], "recorded_at": r["recorded_at"]}
                for r in self._query("SELECT * FROM item_audit WHERE study = ? ORDER BY id", (study,))]

    def transaction_count(self) -> int:
        return int(self._query("SELECT COUNT(*) AS n FROM tx")[0]["n"])

    def snapshot(self, study: str, subject: str) -> bytes | None:
        """The subject's current values as an ODM 1.3.2 Snapshot; None for an unknown subject."""
        with self._lock:
            sub = self._db.execute("SELECT * FROM subject WHERE study = ? AND subject = ?", (study, subject)).fetchone()
            rows = self._db.execute("SELECT * FROM item WHERE study = ? AND subject = ? ORDER BY id",
                                    (study, subject)).fetchall()
        if sub is None:
            return None
        now = _utc_now()
        root = etree.Element(f"{_N}ODM", nsmap={None: ODM_NS})
        stamp = now.replace("-", "").replace(":", "").replace(".", "")
        for name, value in (("FileOID", f"SANDBOX.{study}.{subject}.{stamp}"), ("FileType", "Snapshot"),
                            ("Granularity", "SingleSubject"), ("CreationDateTime", now), ("ODMVersion", "1.3.2"),
                            ("Originator", "esource sandbox EDC"), ("SourceSystem", "esource-sandbox-edc")):
            root.set(name, value)
        cd = etree.SubElement(root, f"{_N}ClinicalData",
                              {"StudyOID": study, "MetaDataVersionOID": sub["metadata_version"] or "MDV.UNKNOWN"})
        sd = etree.SubElement(cd, f"{_N}SubjectData", {"SubjectKey": subject})
        if sub["site"]:
            etree.SubElement(sd, f"{_N}SiteRef", {"LocationOID": sub["site"]})
        # nest in first-appearance order: event -> form -> group -> items
        tree: dict[tuple[str, str], dict[str, dict[tuple[str, str], list[sqlite3.Row]]]] = {}
        for r in rows:
            tree.setdefault((r["event"], r["event_repeat"]), {}).setdefault(r["form"], {}) \
                .setdefault((r["grp"], r["group_repeat"]), []).append(r)
        for (event, erk), forms in tree.items():
            se = etree.SubElement(sd, f"{_N}StudyEventData", {"StudyEventOID": event})
            if erk:
                se.set("StudyEventRepeatKey", erk)
            for form, groups in forms.items():
                fd = etree.SubElement(se, f"{_N}FormData", {"FormOID": form})
                for (grp, grk), items in groups.items():
                    ig = etree.SubElement(fd, f"{_N}ItemGroupData", {"ItemGroupOID": grp})
                    if grk:
                        ig.set("ItemGroupRepeatKey", grk)
                    for r in items:
                        it = etree.SubElement(ig, f"{_N}ItemData", {"ItemOID": r["item"]})
                        if r["value"] is None:
                            it.set("IsNull", "Yes")
                        else:
                            it.set("Value", r["value"])
                        if r["user_oid"] and r["location_oid"] and r["date_time_stamp"]:
                            ar = etree.SubElement(it, f"{_N}AuditRecord")
                            etree.SubElement(ar, f"{_N}UserRef", {"UserOID": r["user_oid"]})
                            etree.SubElement(ar, f"{_N}LocationRef", {"LocationOID": r["location_oid"]})
                            etree.SubElement(ar, f"{_N}DateTimeStamp").text = r["date_time_stamp"]
                            if r["reason_for_change"]:
                                etree.SubElement(ar, f"{_N}ReasonForChange").text = r["reason_for_change"]
                            if r["source_id"]:
                                etree.SubElement(ar, f"{_N}SourceID").text = r["source_id"]
        return b'<?xml version="1.0" encoding="UTF-8"?>\n' + etree.tostring(root, encoding="UTF-8", pretty_print=True)


def _is_refusal(exc: SandboxError) -> bool:
    """A refusal of the transaction's content (it counts as arrived), not a transient or credentials answer."""
    return 400 <= exc.status < 500 and exc.status not in (401, 403, 408, 425, 429) and exc.code != "OUT_OF_ORDER"


def _rollback(db: sqlite3.Connection) -> None:
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error:
        pass  # nothing was open (BEGIN itself failed)


def _path_json(p: ItemPath) -> dict[str, Any]:
    return {"event": p.event, "event_repeat": p.event_repeat or None, "form": p.form, "group": p.group,
            "group_repeat": p.group_repeat or None, "item": p.item}


def _item_json(r: sqlite3.Row) -> dict[str, Any]:
    return {"subject": r["subject"], "event": r["event"], "event_repeat": r["event_repeat"] or None, "form": r["form"],
            "group": r["grp"], "group_repeat": r["group_repeat"] or None, "item": r["item"], "value": r["value"],
            "transaction": r["tx_key"], "edited_by_site": bool(r["edited_by_site"]), "user": r["user_oid"],
            "date_time_stamp": r["date_time_stamp"], "reason_for_change": r["reason_for_change"],
            "source_id": r["source_id"]}


# --------------------------------------------------------------------------------------------------
# fault injection


class FaultRequest(FaultRequestBase):
    """`POST /_faults`. `mode` (or `modes`, one picked at random per fault) fails the next `count`
    deliveries (null: until cleared). `rate` < 1 faults each delivery with that probability only
    (`seed` makes it reproducible). `after_commit` (true, or a probability) applies the transaction
    first, then fails: the ambiguous case. `retry_after` for 429/503, `delay` for timeout/slow,
    `status`/`message` for reject."""

    mode: FaultMode | None = None
    modes: list[FaultMode] | None = None
    status: int = Field(422, ge=400, le=499)


def _fault_response(fault: Fault, *, applied: bool) -> SandboxError:
    note = " (injected fault; the transaction WAS applied)" if applied else " (injected fault)"
    plan = fault.plan
    if fault.mode == "500":
        return SandboxError(500, "INTERNAL_ERROR", "internal server error" + note)
    if fault.mode == "503":
        return SandboxError(503, "UNAVAILABLE", "service unavailable" + note,
                            headers={"Retry-After": _fmt_seconds(plan.retry_after)})
    if fault.mode == "429":
        return SandboxError(429, "RATE_LIMITED", "too many requests" + note,
                            headers={"Retry-After": _fmt_seconds(plan.retry_after)})
    if fault.mode == "auth":
        return SandboxError(401, "UNAUTHORIZED", "authentication failed" + note,
                            headers={"WWW-Authenticate": 'Bearer realm="sandbox-edc"'})
    if fault.mode == "timeout":
        return SandboxError(504, "GATEWAY_TIMEOUT", "gave up waiting" + note)
    return SandboxError(plan.status, "REJECTED", (plan.message or "transaction rejected by the EDC") + note)


def _fmt_seconds(s: float) -> str:
    return str(int(s)) if float(s).is_integer() else f"{s:g}"


# --------------------------------------------------------------------------------------------------
# the app


class SiteEdit(BaseModel):
    """`PUT /studies/{study}/subjects/{subject}/items`: one value entered or changed by site staff."""

    model_config = ConfigDict(extra="forbid")
    path: str | None = Field(None, description="EVENT[repeat]/FORM/GROUP[repeat]/ITEM (alternative to the fields)")
    event: str | None = None
    event_repeat: str | None = None
    form: str | None = None
    group: str | None = None
    group_repeat: str | None = None
    item: str | None = None
    value: str | None
    user: str = SITE_USER_OID
    reason: str | None = None

    def item_path(self) -> ItemPath:
        if self.path:
            return parse_item_path(self.path)
        missing = [n for n in ("event", "form", "group", "item") if not getattr(self, n)]
        if missing:
            raise SandboxError(422, "BAD_ITEM_PATH", f"missing {', '.join(missing)} (or give path)")
        return ItemPath(self.event or "", self.event_repeat or "", self.form or "", self.group or "",
                        self.group_repeat or "", self.item or "")


def create_sandbox_app(db_path: Path | None = None, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                       api_key: str | None = None, faults: bool = True) -> FastAPI:
    """The sandbox EDC as an ASGI app (mountable, e.g. at /edc). `db_path` None keeps everything in
    memory. With `api_key`, study endpoints require `Authorization: Bearer <api_key>`. `faults=False`
    removes the fault-injection endpoints."""
    edc = SandboxEdc(db_path)
    plan = FaultPlan()
    app = FastAPI(title="esource sandbox EDC", version="1", docs_url="/docs", openapi_url="/openapi.json")
    app.state.sandbox = edc
    app.state.faults = plan

    @app.exception_handler(SandboxError)
    async def _sandbox_error(_request: Request, exc: SandboxError) -> JSONResponse:
        return exc.response()

    def _check_auth(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise SandboxError(401, "UNAUTHORIZED", "missing or wrong credentials",
                               headers={"WWW-Authenticate": 'Bearer realm="sandbox-edc"'})

    def _too_large(size: int | None) -> SandboxError:
        of = f" of {size} bytes" if size is not None else ""
        return SandboxError(413, "TOO_LARGE", f"request body{of} is over the limit of {max_body_bytes} bytes")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "transactions": edc.transaction_count(), "persistent": edc.db_path is not None}

    @app.post("/studies/{study}/odm", status_code=201)
    async def post_odm(study: str, request: Request) -> Response:
        _check_auth(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in _XML_TYPES:
            raise SandboxError(415, "UNSUPPORTED_MEDIA_TYPE",
                               f"expected an ODM XML body ({', '.join(_XML_TYPES)}), got {ctype or 'no content type'!r}")
        body = await read_limited_body(request, max_body_bytes, _too_large)
        header = parse_transaction_header(request.headers.get(TRANSACTION_HEADER), study)
        fault = plan.take() if faults else None
        try:
            if fault is not None and not fault.after_commit:
                if fault.mode == "reset":
                    return await drop_connection(request, "sandbox EDC")
                if fault.mode == "timeout":
                    await asyncio.sleep(fault.plan.delay)
                    raise _fault_response(fault, applied=False)
                if fault.mode == "slow":
                    await asyncio.sleep(fault.plan.delay)
                else:
                    raise _fault_response(fault, applied=False)
            status, receipt = await run_in_threadpool(_apply, study, body, header)
        except SandboxError as exc:
            if header is not None and _is_refusal(exc):
                await run_in_threadpool(edc.refused, study, header, exc.code)
            raise
        if fault is not None and fault.after_commit:
            if fault.mode == "reset":
                return await drop_connection(request, "sandbox EDC")
            if fault.mode in ("timeout", "slow"):
                await asyncio.sleep(fault.plan.delay)  # the answer comes after the client gave up
            else:
                raise _fault_response(fault, applied=True)
        return JSONResponse(receipt, status_code=status)

    def _apply(study: str, body: bytes, header: tuple[str, str, int] | None) -> tuple[int, dict[str, Any]]:
        try:
            root = safe_parse(body, "ODM request body")
        except IntakeError as exc:
            raise SandboxError(400, "BAD_XML", str(exc)) from None
        errors = validate_odm(body)
        if errors:
            shown = "; ".join(errors[:3]) + (f" (and {len(errors) - 3} more)" if len(errors) > 3 else "")
            raise SandboxError(422, "INVALID_ODM", f"not valid against the ODM 1.3.2 schema: {shown}", errors)
        subjects = parse_transaction(root, study)
        file_oid = root.get("FileOID")
        key = f"{header[0]}/{header[1]}/{header[2]}" if header else (file_oid or "")
        sha = hashlib.sha256(body).hexdigest()
        return edc.receive(study, key, header, file_oid, sha, subjects)

    @app.get("/studies/{study}/subjects/{subject}/clinicaldata")
    def get_clinical_data(study: str, subject: str, request: Request) -> Response:
        _check_auth(request)
        odm = edc.snapshot(study, subject)
        if odm is None:
            raise SandboxError(404, "UNKNOWN_SUBJECT", f"subject {subject} does not exist in study {study}")
        return Response(odm, media_type="application/xml")

    @app.get("/studies/{study}/transactions")
    def get_transactions(study: str, request: Request) -> list[dict[str, Any]]:
        _check_auth(request)
        return edc.transactions(study)

    @app.get("/studies/{study}/items")
    def get_items(study: str, request: Request, subject: str | None = None) -> list[dict[str, Any]]:
        _check_auth(request)
        return edc.items(study, subject)

    @app.get("/studies/{study}/audit")
    def get_audit(study: str, request: Request) -> list[dict[str, Any]]:
        _check_auth(request)
        return edc.audit(study)

    @app.put("/studies/{study}/subjects/{subject}/items")
    def put_item(study: str, subject: str, edit: SiteEdit, request: Request) -> dict[str, Any]:
        """Site staff change (or enter) a value directly in the EDC: marked as edited by site."""
        _check_auth(request)
        return edc.site_edit(study, subject, edit.item_path(), edit.value, user_oid=edit.user, reason=edit.reason)

    if faults:
        add_fault_routes(app, plan, FaultRequest)

    return app


def parse_item_path(text: str) -> ItemPath:
    """`SE.BASELINE/F.VS/IG.VS[WEIGHT]/IT.VS.VSORRES` (repeat keys in brackets, optional)."""
    parts = text.strip("/").split("/")
    if len(parts) != 4:
        raise SandboxError(422, "BAD_ITEM_PATH", f"item path must be EVENT[repeat]/FORM/GROUP[repeat]/ITEM: {text!r}")

    def split(s: str) -> tuple[str, str]:
        if s.endswith("]") and "[" in s:
            oid, _, rk = s[:-1].partition("[")
            return oid, rk
        return s, ""

    ev, erk = split(parts[0])
    grp, grk = split(parts[2])
    return ItemPath(ev, erk, parts[1], grp, grk, parts[3])


# --------------------------------------------------------------------------------------------------
# standalone


def run_sandbox(host: str = "127.0.0.1", port: int = 8090, db_path: Path | None = None, *,
                max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, api_key: str | None = None,
                log_level: str = "info") -> None:
    """Serve the sandbox EDC with uvicorn until interrupted (`esource sandbox-edc`)."""
    from esource.runtime import settle_heap

    app = create_sandbox_app(db_path, max_body_bytes=max_body_bytes, api_key=api_key)
    settle_heap()  # it shares the machine with esource in the demo and the benchmark: see esource.runtime
    serve_standalone(app, host, port, app.state.sandbox.close, log_level=log_level)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sandbox-edc", description="esource's sandbox EDC (ODM receiver)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--db", type=Path, default=None, help="SQLite file (default: in memory)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    args = parser.parse_args(argv)
    run_sandbox(args.host, args.port, args.db, max_body_bytes=args.max_body_bytes)


if __name__ == "__main__":
    main()
