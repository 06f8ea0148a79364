"""An OpenClinica 4 emulator: the asynchronous CDISC ODM clinical-data import (submit a file, get a
job uuid, poll the job, read its per-item log), the clinical-data REST read-back, and fault injection.

    app = create_openclinica_app(None, token="oc-token", metadata=load_study("CV01").metadata)
    run_openclinica("127.0.0.1", 8091)           # standalone, with uvicorn

It answers what OpenClinica 4 answers (checked against OC4's documentation and its open-source
`ImportController`, `JobController` and `ImportServiceImpl`):

- `POST /OpenClinica/pages/auth/api/clinicaldata/import` (bearer token) takes the ODM XML as a
  multipart upload in the form field `file` (a name ending in ".xml", else 415
  `errorCode.fileFormatNotSupported`) or, as OC does for callers without an attachment, as the raw
  request body. XML that cannot be read (not well-formed, or hostile: DOCTYPE/entities) is 415
  `errorCode.invalidXMLFile`; an unknown study is 404 `errorCode.studyNotExist`. Otherwise 200 with
  the text `job uuid: <uuid>`: the import runs later, as a job.
- `GET /OpenClinica/pages/auth/api/jobs/{uuid}/downloadFile` is how a job is followed: 200
  `errorCode.jobInProgress` while it runs, 404 `errorCode.invalidUuid` for an unknown (or deleted)
  job, 200 `errorCode.noLogFileFound` for a FAILED job (OC writes no log then), else 200 with the
  job's log, a CSV file: `SubjectKey,ParticipantID,StudyEventOID,StudyEventRepeatKey,FormOID,
  ItemGroupOID,ItemGroupRepeatKey,ItemOID,Status,Timestamp,Message`, one row per ItemData with
  Status `Inserted`, `Updated`, `No Change` or `Failed` (+ the error code as Message), and one
  `Failed` row for a subject, event, form or item group that cannot be imported (its items skipped).
  `GET /OpenClinica/pages/auth/api/studies/{study}/jobs` lists the jobs (OC's JobDetailDTO: uuid,
  status IN_PROGRESS | COMPLETED | FAILED | DELETED, type XML_IMPORT, dates, sourceFileName);
  `DELETE .../jobs/{uuid}` deletes one.
- A job is one database transaction: per-item failures are documented results (the item is
  `Failed`, the rest of the file is applied: a partial success), anything else fails the whole job
  (FAILED, nothing applied). Re-importing a value an item already holds answers `No Change` and
  changes nothing: OpenClinica has no idempotency key, this is its only de-duplication.
- Item checks, as OC 4 does them: a missing Value (IsNull, or a Remove) is `errorCode.missingValue`,
  over 3999 characters `errorCode.valueTooLong`; with study metadata, the item's type (integer:
  Java int; float: OC's pattern `\\d+(\\.\\d+)?`, so no sign and no exponent; date: yyyy-MM-dd;
  boolean: true/false) gives `errorCode.valueTypeMismatch` / `errorCode.invalidDateFormat`, a
  code-listed item `errorCode.valueChoiceCodeNotFound`, and OIDs not where the design puts them
  `errorCode.invalidStudyEventOID`, `errorCode.formOIDNotFound`, `errorCode.itemGroupOIDNotFound`,
  `errorCode.itemNotFound`. OIDs are upper-cased, as OC does. Non-repeating events and item groups
  get repeat key "1" (OC's ordinal), a repeating one without a key the next ordinal.
- Read-back: `GET /OpenClinica/rest/clinicaldata/{xml|json}/view/{study}/{subject}/{event|*}/{form|*}`
  (subject: participant ID or OID) returns the subject's ClinicalData as ODM with OpenClinica's
  extension attributes (`OpenClinica:StudySubjectID` ...) and OC's keys (repeat key "1" on
  non-repeating events/groups); 404 for an unknown subject. `GET /OpenClinica/rest/metadata/xml/
  view/{study}/*/*` returns the study's ODM metadata (404 when the emulator was given none).
- Authentication: `Authorization: Bearer <token>`; anything else is 401.

Deliberate leniencies (OC 4 is stricter; each is a switch or noted here):
- `auto_enroll=True` (default) creates an unknown participant on import; OC answers
  `errorCode.participantNotFound` (participants are added first) -- `auto_enroll=False` does too.
- `strict_repeat_keys=False` (default) accepts non-integer repeat keys (esource's "WEIGHT", dates);
  OC requires integers (`errorCode.invalidRepeatKey`, `errorCode.repeatKeyTooLarge`) --
  `strict_repeat_keys=True` does too.
- A participant is found by `OpenClinica:StudySubjectID` (its ID, as OC documents), else by
  `SubjectKey` taken as its OID *or* its ID; OC takes SubjectKey as the OID only, and with both
  requires both to match the same participant.
- A visit event is scheduled without `OpenClinica:StartDate`; event and form statuses are not kept.
- ODM DataTypes other than integer/float/double/decimal/date/boolean (partialDate, partialTime,
  time, datetime ...) are text items (an OC 4 form has no partial-date type).
- XSD-invalid files (OpenClinica extension attributes aside) become a FAILED job; OC does not
  validate against the XSD and fails, or not, while processing.
- OC processes only the first ClinicalData of a file; so does the emulator.
- Jobs run one at a time, in order of the time they are due (`job_seconds` after submission).

Fault injection (`POST /_faults`, see `FaultRequest`) on the import (default), the job polls or the
read-back; plus two job-level modes: `job_stuck` (the job stays IN_PROGRESS `delay` seconds longer)
and `job_failed` (it ends FAILED, nothing applied). Test hooks: `GET /_test/items`,
`POST /_test/site_edit`, `POST /_test/participants`, `GET /_test/stats`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import email.parser
import email.policy
import json
import random
import re
import sqlite3
import threading
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from lxml import etree
from pydantic import BaseModel, ConfigDict, model_validator
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
from esource.connectors.emulators.faults import FaultRequestBase, drop_connection

__all__ = ["OpenClinicaEdc", "StudyDesign", "FaultRequest", "create_openclinica_app", "run_openclinica", "main",
           "OC_NS", "CONTEXT", "IMPORT_PATH", "LOG_COLUMNS", "DEFAULT_TOKEN"]

ODM_NS = ODM_NAMESPACES["1.3.2"]
OC_NS = "http://www.openclinica.org/ns/odm_ext_v130/v3.1"
_N = "{" + ODM_NS + "}"
_OC = "{" + OC_NS + "}"
CONTEXT = "/OpenClinica"
API = CONTEXT + "/pages/auth/api"
IMPORT_PATH = API + "/clinicaldata/import"
DEFAULT_TOKEN = "oc-emulator-token"
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
MAX_VALUE_LENGTH = 3999  # OC: errorCode.valueTooLong above this
SITE_USER = "site.crc"

LOG_COLUMNS = ("SubjectKey", "ParticipantID", "StudyEventOID", "StudyEventRepeatKey", "FormOID", "ItemGroupOID",
               "ItemGroupRepeatKey", "ItemOID", "Status", "Timestamp", "Message")

# job and item statuses, error codes: OpenClinica's own strings
IN_PROGRESS, COMPLETED, FAILED_JOB, DELETED = "IN_PROGRESS", "COMPLETED", "FAILED", "DELETED"
INSERTED, UPDATED, NO_CHANGE, FAILED = "Inserted", "Updated", "No Change", "Failed"
ERR_INVALID_XML = "errorCode.invalidXMLFile"
ERR_FILE_FORMAT = "errorCode.fileFormatNotSupported"
ERR_STUDY_NOT_EXIST = "errorCode.studyNotExist"
ERR_JOB_IN_PROGRESS = "errorCode.jobInProgress"
ERR_INVALID_UUID = "errorCode.invalidUuid"
ERR_NO_LOG_FILE = "errorCode.noLogFileFound"
ERR_PARTICIPANT_NOT_FOUND = "errorCode.participantNotFound"
ERR_MISSING_PARTICIPANT_ID = "errorCode.missingParticipantID"
# the next four strings are assumed: OC's source names the constants (ERR_SUBJECT_DOES_NOT_CONTAIN_EVENTDATA ...)
# but the ErrorConstants version at hand does not show their values
ERR_SUBJECT_NO_EVENT = "errorCode.subjectDoesNotContainEventData"
ERR_EVENT_NO_FORM = "errorCode.eventDoesNotContainFormData"
ERR_FORM_NO_GROUP = "errorCode.formDoesNotContainItemGroupData"
ERR_GROUP_NO_ITEM = "errorCode.itemGroupDoesNotContainItemData"
ERR_INVALID_EVENT = "errorCode.invalidStudyEventOID"
ERR_INVALID_EVENT_REPEAT_KEY = "errorCode.eventNotScheduled.invalidRepeatKey"
ERR_EVENT_REPEAT_KEY_TOO_LARGE = "errorCode.eventNotScheduled.repeatKeyTooLarge"
ERR_FORM_NOT_FOUND = "errorCode.formOIDNotFound"
ERR_GROUP_NOT_FOUND = "errorCode.itemGroupOIDNotFound"
ERR_INVALID_GROUP_REPEAT_KEY = "errorCode.invalidRepeatKey"
ERR_GROUP_REPEAT_KEY_TOO_LARGE = "errorCode.repeatKeyTooLarge"
ERR_ITEM_NOT_FOUND = "errorCode.itemNotFound"
ERR_MISSING_VALUE = "errorCode.missingValue"
ERR_VALUE_TOO_LONG = "errorCode.valueTooLong"
ERR_VALUE_TYPE_MISMATCH = "errorCode.valueTypeMismatch"
ERR_INVALID_DATE_FORMAT = "errorCode.invalidDateFormat"
ERR_VALUE_CHOICE = "errorCode.valueChoiceCodeNotFound"
ERR_FORM_ALREADY_COMPLETE = "errorCode.formAlreadyComplete"

FaultMode = Literal["500", "503", "429", "timeout", "reset", "reject", "slow", "auth", "job_stuck", "job_failed"]
FaultTarget = Literal["import", "poll", "read"]
_JOB_MODES = {"reject", "job_stuck", "job_failed"}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _oc_time(moment: dt.datetime) -> str:
    """OC's log/DTO timestamp: yyyy-MM-dd'T'HH:mm:ss.SSS'Z' (GMT)."""
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class OcError(Exception):
    """An answer other than success: HTTP status and body (OC answers most errors as bare text)."""

    def __init__(self, status: int, body: str | dict[str, Any], headers: dict[str, str] | None = None):
        super().__init__(body if isinstance(body, str) else json.dumps(body))
        self.status = status
        self.body = body
        self.headers = dict(headers or {})

    def response(self) -> Response:
        if isinstance(self.body, dict):
            return JSONResponse(self.body, status_code=self.status, headers=self.headers)
        return PlainTextResponse(self.body, status_code=self.status, headers=self.headers)


# --------------------------------------------------------------------------------------------------
# the study design the import checks values against (optional)

_OC_TYPES = {"integer": "INT", "float": "REAL", "double": "REAL", "decimal": "REAL", "date": "DATE",
             "boolean": "BL"}


@dataclasses.dataclass(frozen=True, slots=True)
class StudyDesign:
    """What OC knows of a study's eCRFs: events (repeating?, forms), forms (groups), groups (repeating?,
    items), items (OC data type, code list). Built from esource's StudyMetadata; OIDs upper-cased."""

    study_oid: str
    metadata_version_oid: str
    events: dict[str, tuple[bool, frozenset[str]]]
    forms: dict[str, frozenset[str]]
    groups: dict[str, tuple[bool, frozenset[str]]]
    items: dict[str, tuple[str, frozenset[str] | None]]
    odm: bytes | None = None  # the metadata file, served by the metadata REST endpoint

    @classmethod
    def from_metadata(cls, md: Any) -> StudyDesign:
        up = str.upper
        events = {up(e.oid): (bool(e.repeating), frozenset(map(up, e.form_oids))) for e in md.study_events.values()}
        forms = {up(f.oid): frozenset(map(up, f.item_group_oids)) for f in md.forms.values()}
        groups = {up(g.oid): (bool(g.repeating), frozenset(map(up, g.item_oids))) for g in md.item_groups.values()}
        items: dict[str, tuple[str, frozenset[str] | None]] = {}
        for it in md.items.values():
            codes = None
            if it.codelist_oid and it.codelist_oid in md.codelists:
                codes = frozenset(md.codelists[it.codelist_oid].items)
            items[up(it.oid)] = (_OC_TYPES.get(it.data_type, "ST"), codes)
        odm = None
        source = getattr(md, "source_file", None)
        if source and Path(source).is_file():
            odm = Path(source).read_bytes()
        return cls(up(md.study_oid), md.metadata_version_oid, events, forms, groups, items, odm)

    def event_repeating(self, oid: str) -> bool | None:
        ev = self.events.get(oid)
        return ev[0] if ev else None

    def group_repeating(self, oid: str) -> bool | None:
        g = self.groups.get(oid)
        return g[0] if g else None


def _load_design(metadata: Any) -> StudyDesign | None:
    if metadata is None or isinstance(metadata, StudyDesign):
        return metadata
    if isinstance(metadata, (str, Path)):
        from esource.study.metadata import load_metadata

        return StudyDesign.from_metadata(load_metadata(metadata))
    return StudyDesign.from_metadata(metadata)


_INT = re.compile(r"[+-]?\d+")
_REAL = re.compile(r"\d+(\.\d+)?")  # OC 4's own check (String.matches): no sign, no exponent
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def check_value(oc_type: str, value: str) -> str | None:
    """OC 4's data-type check of a non-empty value: None when it passes, else the error code."""
    if oc_type == "BL":
        return None if value in ("true", "false") else ERR_VALUE_TYPE_MISMATCH
    if oc_type == "INT":
        ok = _INT.fullmatch(value) is not None and -2**31 <= int(value) < 2**31
        return None if ok else ERR_VALUE_TYPE_MISMATCH
    if oc_type == "REAL":
        return None if _REAL.fullmatch(value) else ERR_VALUE_TYPE_MISMATCH
    if oc_type == "DATE":
        try:
            if _DATE.fullmatch(value) is None:
                raise ValueError(value)
            dt.date.fromisoformat(value)
        except ValueError:
            return ERR_INVALID_DATE_FORMAT
        return None
    return None  # ST


# --------------------------------------------------------------------------------------------------
# storage

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS participant (
    study TEXT NOT NULL,
    label TEXT NOT NULL,
    oid TEXT NOT NULL,
    site TEXT,
    created_at TEXT NOT NULL,
    PRIMARY KEY (study, label),
    UNIQUE (study, oid)
);
CREATE TABLE IF NOT EXISTS job (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    uuid TEXT NOT NULL UNIQUE,
    study TEXT NOT NULL,
    site TEXT,
    status TEXT NOT NULL,
    source_file TEXT,
    username TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT,
    completed_at TEXT,
    due_at REAL NOT NULL,
    fault TEXT,
    fault_message TEXT,
    body BLOB NOT NULL,
    log TEXT,
    failure TEXT,
    inserted INTEGER NOT NULL DEFAULT 0,
    updated INTEGER NOT NULL DEFAULT 0,
    unchanged INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS job_due ON job (status, due_at, seq);
CREATE TABLE IF NOT EXISTS item (
    {ITEM_PATH_COLUMNS},
    value TEXT NOT NULL,
    job TEXT,
    username TEXT NOT NULL,
    edited_by_site INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT NOT NULL,
    {ITEM_PATH_UNIQUE}
);
CREATE TABLE IF NOT EXISTS item_audit (
    {ITEM_PATH_COLUMNS},
    action TEXT NOT NULL,
    value TEXT,
    previous_value TEXT,
    job TEXT,
    username TEXT NOT NULL,
    reason TEXT,
    recorded_at TEXT NOT NULL
);
"""

_WHERE_ITEM = ("study = ? AND subject = ? AND event = ? AND event_repeat = ? AND form = ? AND grp = ? "
               "AND group_repeat = ? AND item = ?")


@dataclasses.dataclass(slots=True)
class LogRow:
    """One row of an import job's log (OC's DataImportReport)."""

    subject_key: str = ""
    participant_id: str = ""
    event: str = ""
    event_repeat: str = ""
    form: str = ""
    group: str = ""
    group_repeat: str = ""
    item: str = ""
    status: str = FAILED
    timestamp: str = ""
    message: str = ""

    def csv(self) -> str:
        # OC writes its log without quoting or escaping: so does the emulator
        return ",".join((self.subject_key, self.participant_id, self.event, self.event_repeat, self.form, self.group,
                         self.group_repeat, self.item, self.status, self.timestamp, self.message))


def _log_text(rows: Iterable[LogRow]) -> str:
    return ",".join(LOG_COLUMNS) + "\n" + "".join(r.csv() + "\n" for r in rows) + "\n"


def _participant_oid(label: str) -> str:
    return "SS_" + (re.sub(r"[^A-Za-z0-9]", "", label).upper() or "X")


class OpenClinicaEdc:
    """The emulator's state: stdlib sqlite3 (WAL for a file), one connection, one lock, and one worker
    thread running the import jobs when they are due. Every job is one BEGIN IMMEDIATE ... COMMIT."""

    def __init__(self, db_path: Path | None = None, *, design: StudyDesign | None = None, job_seconds: float = 0.0,
                 auto_enroll: bool = True, strict_repeat_keys: bool = False, username: str = "esource.api") -> None:
        self.db_path = Path(db_path) if db_path is not None else None
        self.design = design
        self.job_seconds = float(job_seconds)
        self.auto_enroll = auto_enroll
        self.strict_repeat_keys = strict_repeat_keys
        self.username = username
        self._lock = threading.RLock()
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._db = open_sqlite(self.db_path, _SCHEMA)
        self._worker = threading.Thread(target=self._run, name="openclinica-jobs", daemon=True)
        self._worker.start()  # also resumes jobs a previous run left IN_PROGRESS (file database)

    def close(self) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        self._worker.join(5)
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------------------------ jobs

    def submit(self, study: str, site: str | None, body: bytes, source_file: str | None, *, fault: str | None = None,
               fault_message: str | None = None, extra_delay: float = 0.0) -> str:
        """Create an import job (IN_PROGRESS); it runs `job_seconds` (+ `extra_delay`) from now."""
        job = str(uuidlib.uuid4())
        now = _now()
        with self._lock:
            self._db.execute(
                "INSERT INTO job (uuid, study, site, status, source_file, username, created_at, due_at, fault, "
                "fault_message, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job, study, site, IN_PROGRESS, source_file, self.username, _oc_time(now),
                 time.time() + self.job_seconds + extra_delay, fault, fault_message, body))
        with self._wake:
            self._wake.notify_all()
        return job

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    row = self._db.execute("SELECT uuid, due_at FROM job WHERE status = ? ORDER BY due_at, seq LIMIT 1",
                                           (IN_PROGRESS,)).fetchone()
            except sqlite3.Error:
                return  # closed
            wait = 0.5 if row is None else row["due_at"] - time.time()
            if row is not None and wait <= 0:
                self._process(row["uuid"])
                continue
            with self._wake:
                if not self._stop.is_set():
                    self._wake.wait(min(max(wait, 0.001), 0.5))

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until no job is IN_PROGRESS (tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                n = self._db.execute("SELECT COUNT(*) FROM job WHERE status = ?", (IN_PROGRESS,)).fetchone()[0]
            if n == 0:
                return True
            time.sleep(0.005)
        return False

    def _process(self, job: str) -> None:
        with self._lock:
            db = self._db
            j = db.execute("SELECT * FROM job WHERE uuid = ?", (job,)).fetchone()
            if j is None or j["status"] != IN_PROGRESS:
                return
            now = _now()
            if j["fault"] == "job_failed":
                self._finish(job, FAILED_JOB, now, failure=j["fault_message"] or "import job failed (injected fault)")
                return
            problems = validate_odm(_without_oc_extensions(j["body"]))
            if problems:
                shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
                self._finish(job, FAILED_JOB, now, failure=f"not valid against the ODM 1.3.2 schema: {shown}")
                return
            db.execute("BEGIN IMMEDIATE")
            try:
                root = safe_parse(j["body"], "import file")
                if j["fault"] == "reject":
                    rows = self._reject_all(root, j["study"], j["fault_message"] or ERR_FORM_ALREADY_COMPLETE)
                else:
                    rows = _Importer(self, db, j["study"], job, now).run(root)
                counts = Counter(r.status for r in rows)
                db.execute(
                    "UPDATE job SET status = ?, log = ?, completed_at = ?, updated_at = ?, inserted = ?, updated = ?, "
                    "unchanged = ?, failed = ? WHERE uuid = ?",
                    (COMPLETED, _log_text(rows), _oc_time(now), _oc_time(now), counts[INSERTED], counts[UPDATED],
                     counts[NO_CHANGE], sum(n for s, n in counts.items() if s not in (INSERTED, UPDATED, NO_CHANGE)),
                     job))
                db.execute("COMMIT")
            except Exception as exc:  # noqa: BLE001 - OC: an exception in the job fails it, nothing applied
                _rollback(db)
                self._finish(job, FAILED_JOB, now, failure=f"{type(exc).__name__}: {exc}")

    def _finish(self, job: str, status: str, now: dt.datetime, *, failure: str | None = None) -> None:
        self._db.execute("UPDATE job SET status = ?, failure = ?, completed_at = ?, updated_at = ? WHERE uuid = ?",
                         (status, failure, _oc_time(now), _oc_time(now), job))

    def _reject_all(self, root: etree._Element, study: str, message: str) -> list[LogRow]:
        """The `reject` fault: every form of the file fails (e.g. the form is complete/locked in OC)."""
        rows = []
        for sd in _first_clinical_data(root).iterfind(f"{_N}SubjectData"):
            label = sd.get(f"{_OC}StudySubjectID") or sd.get("SubjectKey") or ""
            for se in sd.iterfind(f"{_N}StudyEventData"):
                for fd in se.iterfind(f"{_N}FormData"):
                    rows.append(LogRow((sd.get("SubjectKey") or "").upper(), label,
                                       (se.get("StudyEventOID") or "").upper(), se.get("StudyEventRepeatKey") or "",
                                       (fd.get("FormOID") or "").upper(), status=FAILED, message=message))
        return rows

    def job(self, job: str) -> dict[str, Any] | None:
        with self._lock:
            r = self._db.execute("SELECT * FROM job WHERE uuid = ?", (job,)).fetchone()
        return _job_json(r, full=True) if r is not None else None

    def jobs(self, study: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM job", ()
        if study is not None:
            sql, args = sql + " WHERE upper(study) = upper(?) OR upper(site) = upper(?)", (study, study)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY seq", args).fetchall()
        return [_job_json(r) for r in rows]

    def delete_job(self, job: str) -> bool:
        with self._lock:
            cur = self._db.execute("UPDATE job SET status = ?, updated_at = ? WHERE uuid = ? AND status != ?",
                                   (DELETED, _oc_time(_now()), job, DELETED))
        return cur.rowcount > 0

    def write_count(self) -> int:
        """Jobs that changed at least one value (a re-import answered only "No Change" does not count)."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM job WHERE status = ? AND inserted + updated > 0",
                                        (COMPLETED,)).fetchone()[0])

    def stats(self) -> dict[str, Any]:
        with self._lock:
            by_status = {r[0]: r[1] for r in self._db.execute("SELECT status, COUNT(*) FROM job GROUP BY status")}
        return {"jobs": by_status, "writes": self.write_count()}

    # ------------------------------------------------------------------------------------ participants

    def add_participant(self, study: str, label: str, site: str | None = None) -> str:
        """Add a participant (as a site user would before importing); returns its OID."""
        with self._lock:
            return self._ensure_participant(self._db, study.upper(), label, site)

    def _ensure_participant(self, db: sqlite3.Connection, study: str, label: str, site: str | None) -> str:
        row = db.execute("SELECT oid FROM participant WHERE study = ? AND label = ?", (study, label)).fetchone()
        if row is not None:
            return str(row["oid"])
        base = oid = _participant_oid(label)
        n = 0
        while db.execute("SELECT 1 FROM participant WHERE study = ? AND oid = ?", (study, oid)).fetchone():
            n += 1
            oid = f"{base}_{n}"
        db.execute("INSERT INTO participant (study, label, oid, site, created_at) VALUES (?, ?, ?, ?, ?)",
                   (study, label, oid, site, _oc_time(_now())))
        return oid

    def find_participant(self, study: str, key: str, db: sqlite3.Connection | None = None) -> sqlite3.Row | None:
        """By participant ID (label) or OID."""
        db = db or self._db
        with self._lock:
            return db.execute("SELECT * FROM participant WHERE study = ? AND (label = ? OR oid = ?) "
                              "ORDER BY label = ? DESC LIMIT 1", (study.upper(), key, key.upper(), key)).fetchone()

    # ------------------------------------------------------------------------------------ items

    def items(self, study: str, subject: str | None = None) -> list[dict[str, Any]]:
        """Every value the EDC holds (OC's keys), optionally for one participant (ID or OID)."""
        sql, args = "SELECT * FROM item WHERE study = ?", (study.upper(),)
        if subject is not None:
            p = self.find_participant(study, subject)
            if p is None:
                return []
            sql, args = sql + " AND subject = ?", (study.upper(), p["label"])
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id", args).fetchall()
        return [{"subject": r["subject"], "event": r["event"], "event_repeat": r["event_repeat"] or None,
                 "form": r["form"], "group": r["grp"], "group_repeat": r["group_repeat"] or None, "item": r["item"],
                 "value": r["value"], "job": r["job"], "user": r["username"],
                 "edited_by_site": bool(r["edited_by_site"]), "updated_at": r["updated_at"]} for r in rows]

    def oc_keys(self, event: str, event_repeat: str | None, group: str, group_repeat: str | None) -> tuple[str, str]:
        """esource's repeat keys -> the keys OC stores (ordinal 1 for a non-repeating event or group)."""
        ev, grp = event.upper(), group.upper()
        erk = event_repeat or ""
        grk = group_repeat or ""
        if self.design is not None:
            if self.design.event_repeating(ev) is False:
                erk = "1"
            if self.design.group_repeating(grp) is False:
                grk = "1"
        return erk, grk

    def esource_keys(self, event: str, event_repeat: str | None, group: str, group_repeat: str | None
                     ) -> tuple[str | None, str | None]:
        """The inverse of `oc_keys`."""
        erk, grk = event_repeat or None, group_repeat or None
        if self.design is not None:
            if self.design.event_repeating(event) is False and erk == "1":
                erk = None
            if self.design.group_repeating(group) is False and grk == "1":
                grk = None
        return erk, grk

    def site_edit(self, study: str, subject: str, event: str, event_repeat: str | None, form: str, group: str,
                  group_repeat: str | None, item: str, value: str, *, user: str = SITE_USER,
                  reason: str | None = None) -> dict[str, Any]:
        """Site staff enter or change a value in OpenClinica (not through an import). Keys are esource's."""
        erk, grk = self.oc_keys(event, event_repeat, group, group_repeat)
        now = _oc_time(_now())
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                p = self.find_participant(study, subject, db)
                if p is None:
                    raise OcError(404, {"error": "NotFound", "message": ERR_PARTICIPANT_NOT_FOUND})
                args = (study.upper(), p["label"], event.upper(), erk, form.upper(), group.upper(), grk, item.upper())
                current = db.execute(f"SELECT value FROM item WHERE {_WHERE_ITEM}", args).fetchone()
                previous = current["value"] if current is not None else None
                if current is None:
                    db.execute("INSERT INTO item (study, subject, event, event_repeat, form, grp, group_repeat, item, "
                               "value, job, username, edited_by_site, updated_at) "
                               "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, 1, ?)", (*args, value, user, now))
                else:
                    db.execute(f"UPDATE item SET value = ?, job = NULL, username = ?, edited_by_site = 1, "
                               f"updated_at = ? WHERE {_WHERE_ITEM}", (value, user, now, *args))
                _audit(db, args, "SiteEdit", value, previous, None, user, reason, now)
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
        return {"subject": p["label"], "event": event.upper(), "event_repeat": erk or None, "form": form.upper(),
                "group": group.upper(), "group_repeat": grk or None, "item": item.upper(), "value": value,
                "previous_value": previous, "user": user, "edited_by_site": True}

    def audit(self, study: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM item_audit WHERE study = ? ORDER BY id", (study.upper(),)).fetchall()
        return [dict(r) for r in rows]

    # ------------------------------------------------------------------------------------ read-back

    def snapshot(self, study: str, subject: str, event: str = "*", form: str = "*") -> bytes | None:
        """The participant's ClinicalData as OC's REST read-back shows it (ODM 1.3 with OpenClinica
        extension attributes, OC's keys); None for an unknown participant."""
        p = self.find_participant(study, subject)
        if p is None:
            return None
        sql, args = "SELECT * FROM item WHERE study = ? AND subject = ?", [study.upper(), p["label"]]
        if event != "*":
            sql, args = sql + " AND event = ?", [*args, event.upper()]
        if form != "*":
            sql, args = sql + " AND form = ?", [*args, form.upper()]
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id", args).fetchall()
        now = _oc_time(_now())
        root = etree.Element(f"{_N}ODM", nsmap={None: ODM_NS, "OpenClinica": OC_NS})
        for name, value in (("FileOID", f"OC.{study.upper()}.{p['oid']}.{now}"), ("FileType", "Snapshot"),
                            ("Description", "Clinical data"), ("CreationDateTime", now[:-1]), ("ODMVersion", "1.3")):
            root.set(name, value)
        mdv = self.design.metadata_version_oid if self.design is not None else "null"
        cd = etree.SubElement(root, f"{_N}ClinicalData", {"StudyOID": study.upper(), "MetaDataVersionOID": mdv})
        sd = etree.SubElement(cd, f"{_N}SubjectData", {"SubjectKey": p["oid"], f"{_OC}StudySubjectID": p["label"],
                                                       f"{_OC}Status": "available"})
        tree: dict[tuple[str, str], dict[str, dict[tuple[str, str], list[sqlite3.Row]]]] = {}
        for r in rows:
            tree.setdefault((r["event"], r["event_repeat"]), {}).setdefault(r["form"], {}) \
                .setdefault((r["grp"], r["group_repeat"]), []).append(r)
        for (ev, erk), forms in tree.items():
            se = etree.SubElement(sd, f"{_N}StudyEventData", {"StudyEventOID": ev})
            if erk:
                se.set("StudyEventRepeatKey", erk)
            se.set(f"{_OC}Status", "data entry started")
            for fo, groups in forms.items():
                fd = etree.SubElement(se, f"{_N}FormData", {"FormOID": fo, f"{_OC}Status": "initial data entry"})
                for (grp, grk), items in groups.items():
                    ig = etree.SubElement(fd, f"{_N}ItemGroupData", {"ItemGroupOID": grp})
                    if grk:
                        ig.set("ItemGroupRepeatKey", grk)
                    ig.set("TransactionType", "Insert")
                    for r in items:
                        etree.SubElement(ig, f"{_N}ItemData", {"ItemOID": r["item"], "Value": r["value"]})
        return b'<?xml version="1.0" encoding="UTF-8"?>\n' + etree.tostring(root, encoding="UTF-8", pretty_print=True)


class _Importer:
    """One import job's walk over the file, OC 4's validation order: participant, event, form, item
    group, item. Errors above the item level give one Failed row and skip what is below."""

    def __init__(self, edc: OpenClinicaEdc, db: sqlite3.Connection, study: str, job: str, now: dt.datetime) -> None:
        self.edc, self.db, self.study, self.job = edc, db, study.upper(), job
        self.design = edc.design
        self.now = now
        self.stamp = _oc_time(now)
        self.rows: list[LogRow] = []

    def run(self, root: etree._Element) -> list[LogRow]:
        subjects = _first_clinical_data(root).findall(f"{_N}SubjectData")
        if not subjects:
            self.rows.append(LogRow(message="errorCode.subjectDataMissing"))
        for sd in subjects:
            self._subject(sd)
        return self.rows

    def _fail(self, base: LogRow, message: str) -> None:
        self.rows.append(dataclasses.replace(base, status=FAILED, timestamp="", message=message))

    def _subject(self, sd: etree._Element) -> None:
        key = (sd.get("SubjectKey") or "").upper() or None
        label = sd.get(f"{_OC}StudySubjectID")
        base = LogRow(key or "", label or "")
        events = sd.findall(f"{_N}StudyEventData")
        if not events:
            return self._fail(base, ERR_SUBJECT_NO_EVENT)
        if key is None and label is None:
            return self._fail(base, ERR_MISSING_PARTICIPANT_ID)
        p = self.edc.find_participant(self.study, label or sd.get("SubjectKey", ""), self.db)
        if p is None:
            if not self.edc.auto_enroll:
                return self._fail(base, ERR_PARTICIPANT_NOT_FOUND)
            site = sd.find(f"{_N}SiteRef")
            self.edc._ensure_participant(self.db, self.study, label or sd.get("SubjectKey", ""),
                                         site.get("LocationOID") if site is not None else None)
            p = self.edc.find_participant(self.study, label or sd.get("SubjectKey", ""), self.db)
        assert p is not None
        base = LogRow(p["oid"], p["label"])
        for se in events:
            self._event(base, p["label"], se)

    def _next_ordinal(self, column: str, scope: str, args: tuple) -> int:
        """OC's next ordinal: the highest integer key in use in the scope, plus one."""
        keys = [r[0] for r in self.db.execute(f"SELECT DISTINCT {column} FROM item WHERE {scope}", args)]
        return max([int(k) for k in keys if str(k).isdigit()] or [0]) + 1

    def _event(self, base: LogRow, subject: str, se: etree._Element) -> None:
        oid = (se.get("StudyEventOID") or "").upper()
        rk = se.get("StudyEventRepeatKey") or ""
        base = dataclasses.replace(base, event=oid, event_repeat=rk)
        forms = se.findall(f"{_N}FormData")
        if not forms:
            return self._fail(base, ERR_EVENT_NO_FORM)
        if self.design is not None:
            repeating = self.design.event_repeating(oid)
            if repeating is None:
                return self._fail(base, ERR_INVALID_EVENT)
            scope, args = "study = ? AND subject = ? AND event = ?", (self.study, subject, oid)
            if not repeating:
                rk = "1"
            elif rk and self.edc.strict_repeat_keys:
                if not _INT.fullmatch(rk):
                    return self._fail(base, ERR_INVALID_EVENT_REPEAT_KEY)
                if int(rk) > self._next_ordinal("event_repeat", scope, args):
                    return self._fail(base, ERR_EVENT_REPEAT_KEY_TOO_LARGE)
            elif not rk:
                rk = str(self._next_ordinal("event_repeat", scope, args))
        base = dataclasses.replace(base, event_repeat=rk)
        for fd in forms:
            self._form(base, subject, fd)

    def _form(self, base: LogRow, subject: str, fd: etree._Element) -> None:
        oid = (fd.get("FormOID") or "").upper()
        base = dataclasses.replace(base, form=oid)
        groups = fd.findall(f"{_N}ItemGroupData")
        if not groups:
            return self._fail(base, ERR_FORM_NO_GROUP)
        if self.design is not None and oid not in self.design.events[base.event][1]:
            return self._fail(base, ERR_FORM_NOT_FOUND)
        for ig in groups:
            self._group(base, subject, ig)

    def _group(self, base: LogRow, subject: str, ig: etree._Element) -> None:
        oid = (ig.get("ItemGroupOID") or "").upper()
        rk = ig.get("ItemGroupRepeatKey") or ""
        base = dataclasses.replace(base, group=oid, group_repeat=rk)
        items = ig.findall(f"{_N}ItemData")
        if not items:
            return self._fail(base, ERR_GROUP_NO_ITEM)
        if self.design is not None:
            if oid not in self.design.forms.get(base.form, ()) or oid not in self.design.groups:
                return self._fail(base, ERR_GROUP_NOT_FOUND)
            scope = "study = ? AND subject = ? AND event = ? AND event_repeat = ? AND form = ? AND grp = ?"
            args = (self.study, subject, base.event, base.event_repeat, base.form, oid)
            if not self.design.groups[oid][0]:
                rk = "1"
            elif rk and self.edc.strict_repeat_keys:
                if not _INT.fullmatch(rk):
                    return self._fail(base, ERR_INVALID_GROUP_REPEAT_KEY)
                if int(rk) > self._next_ordinal("group_repeat", scope, args):
                    return self._fail(base, ERR_GROUP_REPEAT_KEY_TOO_LARGE)
            elif not rk:
                rk = str(self._next_ordinal("group_repeat", scope, args))
        base = dataclasses.replace(base, group_repeat=rk)
        for it in items:
            self._item(base, subject, it)

    def _item(self, base: LogRow, subject: str, it: etree._Element) -> None:
        oid = (it.get("ItemOID") or "").upper()
        base = dataclasses.replace(base, item=oid)
        value = it.get("Value")
        if self.design is not None and (oid not in self.design.groups[base.group][1] or oid not in self.design.items):
            return self._fail(base, ERR_ITEM_NOT_FOUND)
        if value is None:
            return self._fail(base, ERR_MISSING_VALUE)  # IsNull="Yes", or a Remove: OC cannot import "no value"
        if len(value) > MAX_VALUE_LENGTH:
            return self._fail(base, ERR_VALUE_TOO_LONG)
        if value and self.design is not None:
            oc_type, codes = self.design.items[oid]
            problem = check_value(oc_type, value)
            if problem is None and codes is not None and value not in codes:
                problem = ERR_VALUE_CHOICE
            if problem is not None:
                return self._fail(base, problem)
        args = (self.study, subject, base.event, base.event_repeat, base.form, base.group, base.group_repeat, oid)
        current = self.db.execute(f"SELECT value FROM item WHERE {_WHERE_ITEM}", args).fetchone()
        user = self.edc.username
        if current is not None and current["value"] == value:
            self.rows.append(dataclasses.replace(base, status=NO_CHANGE, timestamp="", message=""))
            return
        if current is None:
            self.db.execute("INSERT INTO item (study, subject, event, event_repeat, form, grp, group_repeat, item, "
                            "value, job, username, edited_by_site, updated_at) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
                            (*args, value, self.job, user, self.stamp))
            status = INSERTED
        else:
            self.db.execute(f"UPDATE item SET value = ?, job = ?, username = ?, edited_by_site = 0, updated_at = ? "
                            f"WHERE {_WHERE_ITEM}", (value, self.job, user, self.stamp, *args))
            status = UPDATED
        _audit(self.db, args, status, value, current["value"] if current is not None else None, self.job, user, None,
               self.stamp)
        self.rows.append(dataclasses.replace(base, status=status, timestamp=self.stamp, message=""))


def _audit(db: sqlite3.Connection, args: tuple, action: str, value: str | None, previous: str | None, job: str | None,
           user: str, reason: str | None, now: str) -> None:
    db.execute("INSERT INTO item_audit (study, subject, event, event_repeat, form, grp, group_repeat, item, action, "
               "value, previous_value, job, username, reason, recorded_at) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (*args, action, value, previous, job, user, reason, now))


def _rollback(db: sqlite3.Connection) -> None:
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error:
        pass


def _job_json(r: sqlite3.Row, *, full: bool = False) -> dict[str, Any]:
    """OC's JobDetailDTO (+ `failureMessage`, an emulator extension: OC keeps no reason for a FAILED job)."""
    out: dict[str, Any] = {"uuid": r["uuid"], "status": r["status"], "type": "XML_IMPORT",
                           "createdByUsername": r["username"], "updatedByUsername": r["username"],
                           "siteOid": r["site"], "studyOid": r["study"], "dateCreated": r["created_at"],
                           "dateUpdated": r["updated_at"], "dateCompleted": r["completed_at"],
                           "sourceFileName": r["source_file"]}
    if r["status"] == FAILED_JOB and r["failure"]:
        out["failureMessage"] = r["failure"]
    if full:
        out.update(log=r["log"], inserted=r["inserted"], updated=r["updated"], unchanged=r["unchanged"],
                   failed=r["failed"])
    return out


def _first_clinical_data(root: etree._Element) -> etree._Element:
    cd = root.find(f"{_N}ClinicalData")
    return cd if cd is not None else etree.Element(f"{_N}ClinicalData")


def _without_oc_extensions(body: bytes) -> bytes:
    """The file without OpenClinica's extension attributes and elements (OC's import dialect), so the
    rest can be checked against the plain ODM 1.3.2 schema."""
    try:
        root = safe_parse(body, "import file")
    except IntakeError:
        return body  # validate_odm reports it
    if OC_NS not in body.decode("utf-8", "replace"):
        return body
    for el in list(root.iter()):
        if not isinstance(el.tag, str):
            continue
        if el.tag.startswith(_OC):
            el.getparent().remove(el)
            continue
        for name in [n for n in el.attrib if n.startswith(_OC)]:
            del el.attrib[name]
    etree.cleanup_namespaces(root)
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


# --------------------------------------------------------------------------------------------------
# fault injection


class FaultRequest(FaultRequestBase):
    """`POST /_faults`. `mode` (or `modes`, one picked at random per fault) fails the next `count`
    requests of `target` ("import": the import POST, default; "poll": the job polls; "read": the
    read-back) (count null: until cleared). `rate` < 1 faults each request with that probability
    (`seed` makes it reproducible). `after_commit` (true or a probability; import only): the job is
    created first, then the failure answered -- the ambiguous case. `retry_after` for 429/503,
    `delay` for timeout/slow/job_stuck, `message` for reject (the Failed rows' message) and job_failed.
    Job modes (import only): `reject` (the job completes with every form Failed, nothing applied),
    `job_stuck` (IN_PROGRESS `delay` seconds longer), `job_failed` (FAILED, nothing applied)."""

    mode: FaultMode | None = None
    modes: list[FaultMode] | None = None
    target: FaultTarget = "import"

    @model_validator(mode="after")
    def _check(self) -> FaultRequest:
        chosen = set(self.modes or []) | ({self.mode} if self.mode else set())
        if self.target != "import" and chosen & _JOB_MODES:
            raise ValueError(f"modes {sorted(chosen & _JOB_MODES)} apply to target 'import' only")
        return self


@dataclasses.dataclass(slots=True)
class Fault:
    mode: str
    after_commit: bool
    plan: FaultRequest


class FaultPlan:
    """One plan per target; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[str, FaultRequest] = {}
        self.remaining: dict[str, int | None] = {}
        self.rngs: dict[str, random.Random] = {}
        self.injected: Counter[str] = Counter()

    def set(self, req: FaultRequest) -> None:
        with self._lock:
            self.requests[req.target] = req
            self.remaining[req.target] = req.count
            self.rngs[req.target] = random.Random(req.seed)

    def clear(self, target: str | None = None) -> None:
        with self._lock:
            for t in [target] if target else list(self.requests):
                self.requests.pop(t, None)
                self.remaining.pop(t, None)

    def take(self, target: str) -> Fault | None:
        with self._lock:
            req = self.requests.get(target)
            if req is None or self.remaining.get(target) == 0:
                return None
            rng = self.rngs[target]
            if req.rate < 1.0 and rng.random() >= req.rate:
                return None
            left = self.remaining.get(target)
            if left is not None:
                self.remaining[target] = left - 1
            choices = req.modes or [req.mode]
            mode = req.mode if req.mode and not req.modes else rng.choice(choices)
            ac = req.after_commit
            after = (ac if isinstance(ac, bool) else rng.random() < float(ac)) and target == "import"
            self.injected[f"{target}:{mode}{'+after_commit' if after else ''}"] += 1
            return Fault(str(mode), after, req)

    def state(self) -> dict[str, Any]:
        with self._lock:
            active = {t: r.model_dump() for t, r in self.requests.items() if self.remaining.get(t) != 0}
            return {"active": active, "remaining": dict(self.remaining), "injected": dict(self.injected)}


def _fault_error(fault: Fault, *, applied: bool) -> OcError:
    note = " (injected fault; the import job WAS created)" if applied else " (injected fault)"
    secs = fault.plan.retry_after
    retry = str(int(secs)) if float(secs).is_integer() else f"{secs:g}"
    if fault.mode == "503":
        return OcError(503, {"status": 503, "error": "Service Unavailable", "message": "service unavailable" + note},
                       {"Retry-After": retry})
    if fault.mode == "429":
        return OcError(429, {"status": 429, "error": "Too Many Requests", "message": "rate limit exceeded" + note},
                       {"Retry-After": retry})
    if fault.mode == "auth":
        return OcError(401, {"error": "unauthorized", "error_description": "Full authentication is required" + note},
                       {"WWW-Authenticate": 'Bearer realm="OpenClinica"'})
    if fault.mode == "timeout":
        return OcError(504, {"status": 504, "error": "Gateway Timeout", "message": "upstream timed out" + note})
    return OcError(500, {"status": 500, "error": "Internal Server Error", "message": "internal server error" + note})


async def _before(fault: Fault | None, request: Request) -> Response | None:
    """Apply a fault that strikes before the request is served (returns a response to give instead)."""
    if fault is None or fault.after_commit or fault.mode in _JOB_MODES:
        return None
    if fault.mode == "reset":
        return await drop_connection(request, "OpenClinica emulator")
    if fault.mode in ("timeout", "slow"):
        await asyncio.sleep(fault.plan.delay)
        return None if fault.mode == "slow" else _fault_error(fault, applied=False).response()
    return _fault_error(fault, applied=False).response()


async def _after(fault: Fault | None, request: Request) -> Response | None:
    """Apply an after-commit fault once the import job exists."""
    if fault is None or not fault.after_commit or fault.mode in _JOB_MODES:
        return None
    if fault.mode == "reset":
        return await drop_connection(request, "OpenClinica emulator")
    if fault.mode in ("timeout", "slow"):
        await asyncio.sleep(fault.plan.delay)  # the answer comes after the client gave up
        return None
    return _fault_error(fault, applied=True).response()


# --------------------------------------------------------------------------------------------------
# request bodies


def multipart_file(body: bytes, content_type: str) -> tuple[str | None, bytes] | None:
    """The `file` part of a multipart/form-data body: (file name, content); None when absent."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise OcError(400, "errorCode.invalidMultipartRequest")
    for part in msg.iter_parts():  # type: ignore[attr-defined]
        if part.get_param("name", header="content-disposition") == "file":
            payload = part.get_payload(decode=True)
            return part.get_filename(), payload if isinstance(payload, bytes) else b""
    return None


class SiteEdit(BaseModel):
    """`POST /_test/site_edit`: site staff change a value in OpenClinica (keys are esource's)."""

    model_config = ConfigDict(extra="forbid")
    study: str
    subject: str
    event: str
    event_repeat: str | None = None
    form: str
    group: str
    group_repeat: str | None = None
    item: str
    value: str
    user: str = SITE_USER
    reason: str | None = None


class NewParticipant(BaseModel):
    model_config = ConfigDict(extra="forbid")
    study: str
    subject: str
    site: str | None = None


def _xml_to_json(el: etree._Element) -> dict[str, Any]:
    """OC's JSON rendering of its ODM: attributes as "@Name" (OpenClinica ones "@OpenClinica:Name"),
    children by local name, a list when repeated."""
    out: dict[str, Any] = {}
    for name, value in el.attrib.items():
        q = etree.QName(name)
        out["@" + (f"OpenClinica:{q.localname}" if q.namespace == OC_NS else q.localname)] = value
    for child in el:
        if not isinstance(child.tag, str):
            continue
        key = etree.QName(child).localname
        value = _xml_to_json(child)
        if key in out:
            out[key] = out[key] if isinstance(out[key], list) else [out[key]]
            out[key].append(value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------------
# the app


def create_openclinica_app(db_path: Path | None = None, *, token: str = DEFAULT_TOKEN, metadata: Any = None,
                           job_seconds: float = 0.0, auto_enroll: bool = True, strict_repeat_keys: bool = False,
                           max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, faults: bool = True) -> FastAPI:
    """The OpenClinica 4 emulator as an ASGI app. `db_path` None keeps everything in memory; `token`
    is the bearer token it accepts; `metadata` (esource `StudyMetadata`, a metadata file path, or a
    `StudyDesign`) gives the study design values are checked against (None: any study, no checks);
    `job_seconds` how long an import job stays IN_PROGRESS. `faults=False` removes `/_faults` and
    `/_test`. The state is `app.state.openclinica` (an `OpenClinicaEdc`; close it when done)."""
    design = _load_design(metadata)
    edc = OpenClinicaEdc(db_path, design=design, job_seconds=job_seconds, auto_enroll=auto_enroll,
                         strict_repeat_keys=strict_repeat_keys)
    plan = FaultPlan()
    app = FastAPI(title="OpenClinica 4 emulator (esource)", version="4", docs_url="/docs", openapi_url="/openapi.json")
    app.state.openclinica = edc
    app.state.faults = plan

    @app.exception_handler(OcError)
    async def _oc_error(_request: Request, exc: OcError) -> Response:
        return exc.response()

    def _auth(request: Request, *, rest: bool = False) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or given.strip() != token:
            body: dict[str, Any] = {"error": "NoAccessRight"} if rest else {
                "error": "unauthorized", "error_description": "Full authentication is required to access this resource"}
            raise OcError(401, body, {"WWW-Authenticate": 'Bearer realm="OpenClinica"'})

    def _too_large(size: int | None) -> OcError:
        of = f" of {size} bytes" if size is not None else ""
        return OcError(413, f"request body{of} is over the limit of {max_body_bytes} bytes")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", **edc.stats(), "persistent": edc.db_path is not None}

    @app.post(IMPORT_PATH)
    async def import_clinical_data(request: Request) -> Response:
        _auth(request)
        body = await read_limited_body(request, max_body_bytes, _too_large)
        ctype = request.headers.get("content-type", "")
        file_name: str | None = None
        if ctype.lower().startswith("multipart/"):
            part = multipart_file(body, ctype)
            if part is None:
                raise OcError(400, "Required request part 'file' is not present")
            file_name, xml = part
            if not file_name or not file_name.lower().endswith(".xml"):
                raise OcError(415, ERR_FILE_FORMAT)
        else:
            xml = body  # OC reads the request content when no file is attached
        fault = plan.take("import") if faults else None
        early = await _before(fault, request)
        if early is not None:
            return early
        text = await run_in_threadpool(_submit, xml, file_name, fault)
        late = await _after(fault, request)
        if late is not None:
            return late
        return PlainTextResponse(text, status_code=200)

    def _submit(xml: bytes, file_name: str | None, fault: Fault | None) -> str:
        try:
            root = safe_parse(xml, file_name or "import file")
        except IntakeError as exc:
            raise OcError(415, f"{ERR_INVALID_XML}\n{exc}") from None
        cd = root.find(f"{_N}ClinicalData")
        study = (cd.get("StudyOID") or "").upper() if cd is not None else ""
        if not study:
            raise OcError(404, ERR_STUDY_NOT_EXIST)
        if design is not None and study != design.study_oid:
            raise OcError(404, ERR_STUDY_NOT_EXIST)
        site = None
        sd = cd.find(f"{_N}SubjectData") if cd is not None else None
        ref = sd.find(f"{_N}SiteRef") if sd is not None else None
        if ref is not None:
            site = ref.get("LocationOID")
        mode = fault.mode if fault is not None and fault.mode in _JOB_MODES else None
        job = edc.submit(study, site, xml, file_name, fault=mode,
                         fault_message=fault.plan.message if fault is not None else None,
                         extra_delay=fault.plan.delay if mode == "job_stuck" and fault is not None else 0.0)
        return f"job uuid: {job}"

    async def _simple_fault(target: str, request: Request) -> Response | None:
        fault = plan.take(target) if faults else None
        return await _before(fault, request)

    @app.get(API + "/jobs/{job_uuid}/downloadFile")
    async def download_job_file(job_uuid: str, request: Request, open: str | None = None) -> Response:
        _auth(request)
        early = await _simple_fault("poll", request)
        if early is not None:
            return early
        job = await run_in_threadpool(edc.job, job_uuid)
        if job is None or job["status"] == DELETED:
            return PlainTextResponse(ERR_INVALID_UUID, status_code=404)
        if job["status"] == IN_PROGRESS:
            return PlainTextResponse(ERR_JOB_IN_PROGRESS, status_code=200)
        if job["status"] == FAILED_JOB or not job["log"]:
            return PlainTextResponse(ERR_NO_LOG_FILE, status_code=200)
        name = f"{job['studyOid']}-test_XML_IMPORT_{job['uuid']}.csv"
        headers = {} if open == "true" else {"Content-Disposition": f"attachment; filename={name}"}
        media = "text/plain" if open == "true" else "application/force-download"
        return Response(job["log"].encode("utf-8"), status_code=200, media_type=media, headers=headers)

    @app.get(API + "/studies/{study}/jobs")
    async def study_jobs(study: str, request: Request) -> Response:
        _auth(request)
        early = await _simple_fault("poll", request)
        if early is not None:
            return early
        if design is not None and study.upper() != design.study_oid:
            return JSONResponse(None, status_code=400, headers={"X-OpenClinica-error": "error.incorrectStudyOid"})
        return JSONResponse(await run_in_threadpool(edc.jobs, study))

    @app.delete(API + "/jobs/{job_uuid}")
    def delete_job(job_uuid: str, request: Request) -> Response:
        _auth(request)
        if not edc.delete_job(job_uuid):
            return PlainTextResponse(ERR_INVALID_UUID, status_code=404)
        return Response(status_code=200)

    @app.get(CONTEXT + "/rest/clinicaldata/{fmt}/view/{study}/{subject}/{event}/{form}")
    async def clinical_data(fmt: str, study: str, subject: str, event: str, form: str, request: Request,
                            includeDNs: str = "n", includeAudits: str = "n") -> Response:  # noqa: N803 - OC's names
        _auth(request, rest=True)
        early = await _simple_fault("read", request)
        if early is not None:
            return early
        if fmt not in ("xml", "json"):
            raise OcError(404, {"error": "NotFound", "message": f"format {fmt!r} is not supported"})
        odm = await run_in_threadpool(edc.snapshot, study, subject, event, form)
        if odm is None:
            raise OcError(404, {"error": "NotFound", "message": ERR_PARTICIPANT_NOT_FOUND})
        if fmt == "json":
            return JSONResponse(_xml_to_json(etree.fromstring(odm)))
        return Response(odm, media_type="application/xml")

    @app.get(CONTEXT + "/rest/metadata/{fmt}/view/{study}/{event}/{form}")
    def study_metadata(fmt: str, study: str, event: str, form: str, request: Request) -> Response:
        _auth(request, rest=True)
        if design is None or design.odm is None or study.upper() != design.study_oid or fmt != "xml":
            raise OcError(404, {"error": "NotFound"})
        return Response(design.odm, media_type="application/xml")

    if faults:
        add_fault_routes(app, plan, FaultRequest, target_type=FaultTarget)

        @app.get("/_test/items")
        def test_items(study: str, subject: str | None = None) -> list[dict[str, Any]]:
            return edc.items(study, subject)

        @app.post("/_test/site_edit")
        def test_site_edit(edit: SiteEdit) -> dict[str, Any]:
            return edc.site_edit(edit.study, edit.subject, edit.event, edit.event_repeat, edit.form, edit.group,
                                 edit.group_repeat, edit.item, edit.value, user=edit.user, reason=edit.reason)

        @app.post("/_test/participants")
        def test_participants(p: NewParticipant) -> dict[str, Any]:
            return {"subject": p.subject, "oid": edc.add_participant(p.study, p.subject, p.site)}

        @app.get("/_test/stats")
        def test_stats() -> dict[str, Any]:
            return edc.stats()

        @app.get("/_test/jobs/{job_uuid}")
        def test_job(job_uuid: str) -> Response:
            job = edc.job(job_uuid)
            return JSONResponse(job, status_code=200 if job else 404)

    return app


# --------------------------------------------------------------------------------------------------
# standalone


def run_openclinica(host: str = "127.0.0.1", port: int = 8091, db_path: Path | None = None, *,
                    token: str = DEFAULT_TOKEN, metadata: Any = None, job_seconds: float = 1.0,
                    log_level: str = "info") -> None:
    """Serve the emulator with uvicorn until interrupted."""
    app = create_openclinica_app(db_path, token=token, metadata=metadata, job_seconds=job_seconds)
    serve_standalone(app, host, port, app.state.openclinica.close, log_level=log_level)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="openclinica-emulator", description="OpenClinica 4 import emulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--db", type=Path, default=None, help="SQLite file (default: in memory)")
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    parser.add_argument("--metadata", type=Path, default=None, help="ODM 1.3.2 study metadata file")
    parser.add_argument("--job-seconds", type=float, default=1.0)
    args = parser.parse_args(argv)
    run_openclinica(args.host, args.port, args.db, token=args.token, metadata=args.metadata,
                    job_seconds=args.job_seconds)


if __name__ == "__main__":
    main()
