"""A Medidata Rave Web Services (RWS) emulator: the documented RWS protocol for clinical data, on
loopback, for the Rave connector's tests, the EDC contract suite and demos.

    app = create_rave_app(None, users={"rwsuser": "password"})      # in memory; a Path: SQLite (WAL)
    run_rave("127.0.0.1", 8091)                                     # standalone, with uvicorn

What it answers, as RWS does (payloads: tests/data/edc-api/medidata-rws/, rwslib's parsers):
- `GET /RaveWebServices/version` (and `/version/build`, `/version/codename`, `/twohundred`): plain
  text, no authentication (rwslib's `VersionRequest`).
- Everything else needs HTTP Basic authentication. No header: 401 `Authorization Header not provided`
  (text); wrong user or password: 401 with an ODM error document
  (`mdsol:ErrorDescription="Incorrect login and password combination. [RWS00008]"`), the two shapes
  rwslib's `RWSConnection` tells apart.
- `POST /RaveWebServices/webservice.aspx?PostODMClinicalData`: one ODM 1.3 Transactional document,
  ONE subject per request (as RWS documents). Hostile XML (DOCTYPE/entities), XML that is not
  well-formed and ODM that is not valid against the plain ODM 1.3.2 XSD once the mdsol extensions
  are set aside (attributes and elements in the mdsol namespace are Rave's and are tolerated) are
  refused with an ODM error document. Success is 200 with
  `<Response ReferenceNumber=".." InboundODMFileOID=".." IsTransactionSuccessful="1"
  SuccessStatistics="Rave objects touched: Subjects=..; Folders=..; Forms=..; Fields=..; LogLines=.."
  NewRecords="" SubjectNumberInStudy=".." SubjectNumberInStudySite=".."/>`; a refusal is
  `<Response ... IsTransactionSuccessful="0" ReasonCode="RWS....." ErrorOriginLocation="/ODM/..."
  ErrorClientResponseMessage=".."/>` with a 4xx status. The whole transaction applies or nothing.
- `GET /RaveWebServices/studies/{study}({env})/subjects/{subject}/datasets/{regular|raw}[/{formoid}]`
  (rwslib's `SubjectDatasetRequest`), `.../studies/{study}({env})/datasets/{regular|raw}[/{formoid}]`
  (`StudyDatasetRequest`), `.../studies/{study}({env})/subjects` (`StudySubjectsRequest`) and
  `.../studies` (`ClinicalStudiesRequest`): Snapshot ODM like the documented example, with the UTF-8
  BOM the RWS documentation says real responses start with. A subject Rave does not know gives an
  empty ClinicalData (no SubjectData).

Rave's semantics that matter to a client:
- There is NO idempotency key: every accepted POST is a new Rave transaction with its own
  ReferenceNumber (`write_count`), even when it changes nothing. The only refusals of a repeat are
  Rave's own: SubjectData TransactionType="Insert" of a subject that exists is RWS00024 "Subject
  already exists.". A client must read back before re-sending after an ambiguous failure.
- Repeat keys are integers: log lines (repeating item groups) by `ItemGroupRepeatKey`, added
  folders (unscheduled events) by `StudyEventRepeatKey`; anything else is a data-validation
  refusal. FormRepeatKey defaults to 1 (datasets always show it).
- `mdsol:Submission="SpecifiedItemsOnly"` on ItemGroupData changes only the fields given; without it
  (or with "WholeItemGroup") the posted item group instance is the whole record and its other fields
  are blanked. (Assumption: RWS's default is taken to be WholeItemGroup, the stricter reading.)
- ItemData: a value (Insert, Update, Upsert or no TransactionType: data entry, unchanged values are
  not touched), `IsNull="Yes"` or TransactionType="Remove" (blank the field), "Context" (nothing).
  SubjectData: Insert (RWS00024 when it exists), Upsert, Update/Context (the subject must exist).
- Studies and sites are configured (`studies`): an unknown study is RWS00014, an unknown site
  RWS00903. With `metadata` (esource's StudyMetadata per project) OIDs and values are checked too.

Reason codes. Documented ones (rwslib's docs and tests, the RWS documentation): RWS00008 (401,
credentials), RWS00014 (404, study does not exist), RWS00024 (400, subject already exists),
RWS00042 (403, field not authorised; the `reject` fault's default), RWS00055 (404, RWS URL does not
exist), RWS00092 ("CRF version not found", unused here). The emulator's own (an unofficial RWS009xx
range, so nobody mistakes them for Rave's list): RWS00901 invalid ODM, RWS00902 subject not found,
RWS00903 site not found, RWS00904 invalid repeat key, RWS00905 value not valid for the field's data
type, RWS00906 unknown OID, RWS00907 request not supported, RWS00908 request too large.

Test endpoints (not RWS): `POST|GET|DELETE /_faults` (the fault modes of tests/contract/harness.py:
500, 503, 429 + Retry-After, timeout, reset, reject, auth, slow; `after_commit` applies first, then
fails), `GET /_test/items`, `POST /_test/site_edit`, `GET /_test/stats`, `GET /_test/posts`.

Deliberate simplifications: the `regular` and `raw` datasets are the same (values as posted; no
coding, no unit conversion); query options (`start`, `rawsuffix`...) are accepted and ignored;
log lines are keyed by the integer the client gives (real Rave numbers new log lines itself);
AuditRecords posted with values are kept (shown by `/_test/items`), not in datasets.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import copy
import dataclasses
import datetime as dt
import hmac
import re
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from lxml import etree
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from esource.errors import IntakeError
from esource.odm.xsd import ODM_NAMESPACES, safe_parse, validate_tree
from esource.connectors.emulators.common import add_fault_routes, open_sqlite, read_limited_body, serve_standalone
from esource.connectors.emulators.faults import Fault, FaultPlan, FaultRequestBase, drop_connection

if TYPE_CHECKING:
    from esource.study.metadata import StudyMetadata

__all__ = ["create_rave_app", "run_rave", "main", "RaveRws", "RaveError", "RaveFaultRequest", "parse_study_oid",
           "RWS_VERSION", "DEFAULT_USERS", "DEFAULT_STUDIES", "DEFAULT_MAX_BODY_BYTES", "MDSOL_NS"]

RWS = "/RaveWebServices"
RWS_VERSION = "1.16.0"
RWS_BUILD = "1.16.0.3"
RWS_CODENAME = "Sherpa"
ODM_NS = ODM_NAMESPACES["1.3.2"]
MDSOL_NS = "http://www.mdsol.com/ns/odm/metadata"
XLINK_NS = "http://www.w3.org/1999/xlink"
_N = "{" + ODM_NS + "}"
_M = "{" + MDSOL_NS + "}"
XML_MEDIA = "text/xml; charset=utf-8"
BOM = "\ufeff".encode("utf-8")
DEFAULT_USERS: Mapping[str, str] = {"rwsuser": "password"}
DEFAULT_STUDIES: Mapping[str, Iterable[str] | None] = {"CV01(PROD)": None, "CV01(UAT)": None, "CV01(DEV)": None}
DEFAULT_MAX_BODY_BYTES = 1_000_000  # "My Request body does not exceed the maximum request size of 1,000,000 bytes"
SITE_USER = "rave.site.user"
NO_STATISTICS = "Rave objects touched: Subjects=0; Folders=0; Forms=0; Fields=0; LogLines=0"
NO_HEADER = "Authorization Header not provided"

# documented reason codes
AUTH, STUDY_UNKNOWN, SUBJECT_EXISTS, FIELD_NOT_AUTHORISED, URL_UNKNOWN = (
    "RWS00008", "RWS00014", "RWS00024", "RWS00042", "RWS00055")
# the emulator's own (see the module docstring)
INVALID_ODM, SUBJECT_UNKNOWN, SITE_UNKNOWN, BAD_REPEAT_KEY, BAD_VALUE, UNKNOWN_OID, UNSUPPORTED, TOO_LARGE = (
    "RWS00901", "RWS00902", "RWS00903", "RWS00904", "RWS00905", "RWS00906", "RWS00907", "RWS00908")

FaultMode = Literal["500", "503", "429", "timeout", "reset", "reject", "slow", "auth"]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _stamp(moment: dt.datetime | None = None) -> str:
    """RWS's own timestamp form: `2013-09-10T15:23:22.395-00:00`."""
    moment = moment or _now()
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}-00:00"


# --------------------------------------------------------------------------------------------------
# errors, as RWS shapes them


class RaveError(Exception):
    """A refusal: HTTP status, RWS reason code and message, in one of RWS's three shapes: the
    `<Response IsTransactionSuccessful="0" .../>` message (default), an ODM error document
    (`odm=True`: parse and credential errors) or plain text (`plain=True`)."""

    def __init__(self, status: int, code: str, message: str, *, origin: str | None = None,
                 file_oid: str | None = None, odm: bool = False, plain: bool = False, post: bool = True,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{code}: {message}" if code else message)
        self.status, self.code, self.message = status, code, message
        self.origin, self.file_oid = origin, file_oid
        self.odm, self.plain, self.post = odm, plain, post
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        if self.plain:
            return self.message.encode("utf-8")
        if self.odm:
            return odm_error_document(f"{self.message} [{self.code}]" if self.code else self.message)
        attrs = {"ReferenceNumber": str(uuid.uuid4()),
                 "InboundODMFileOID": self.file_oid if self.file_oid is not None else "Not Supplied",
                 "IsTransactionSuccessful": "0", "ReasonCode": self.code}
        if self.origin:
            attrs["ErrorOriginLocation"] = self.origin
        if self.post:
            attrs["SuccessStatistics"] = NO_STATISTICS
        attrs["ErrorClientResponseMessage"] = self.message
        return response_message(attrs)

    def response(self) -> Response:
        media = XML_MEDIA
        if self.plain:
            media = "text/html; charset=utf-8" if self.message.startswith("<html") else "text/plain; charset=utf-8"
        return Response(self.body(), status_code=self.status, media_type=media, headers=self.headers)


def response_message(attrs: Mapping[str, str]) -> bytes:
    """`<Response .../>`: no XML declaration, so it starts with `<Response` as rwslib expects."""
    return etree.tostring(etree.Element("Response", dict(attrs)), encoding="unicode").encode("utf-8")


def odm_error_document(description: str) -> bytes:
    root = etree.Element(_N + "ODM", nsmap={None: ODM_NS, "mdsol": MDSOL_NS})
    for name, value in (("FileType", "Snapshot"), ("CreationDateTime", _stamp()), ("FileOID", str(uuid.uuid4())),
                        ("ODMVersion", "1.3")):
        root.set(name, value)
    root.set(_M + "ErrorDescription", description)
    return b'<?xml version="1.0" encoding="utf-8"?>\n' + etree.tostring(root, encoding="UTF-8")


def _origin(el: etree._Element) -> str:
    """ErrorOriginLocation: `/ODM/ClinicalData[1]/SubjectData[1]/...`."""
    parts: list[str] = []
    node: etree._Element | None = el
    while node is not None:
        name = etree.QName(node).localname
        parent = node.getparent()
        if parent is None:
            parts.append(name)
            break
        same = [c for c in parent if c.tag == node.tag]
        parts.append(f"{name}[{same.index(node) + 1}]")
        node = parent
    return "/" + "/".join(reversed(parts))


# --------------------------------------------------------------------------------------------------
# studies


_STUDY_ENV = re.compile(r"^\s*(?P<project>.+?)\s*\((?P<env>[^()]*)\)\s*$")


def parse_study_oid(study_oid: str) -> tuple[str, str]:
    """(project, environment) of a Rave study OID: `CV01(PROD)`, `Mediflex (DEV)`, or `CV01` (Prod)."""
    m = _STUDY_ENV.match(study_oid)
    if m:
        return m["project"], m["env"].strip() or "PROD"
    return study_oid.strip(), "PROD"


@dataclasses.dataclass(frozen=True, slots=True)
class RaveStudy:
    project: str
    environment: str
    sites: frozenset[str] | None  # None: any site
    metadata: StudyMetadata | None

    @property
    def key(self) -> str:
        return f"{self.project}({self.environment.upper()})"

    @property
    def oid(self) -> str:
        return f"{self.project}({self.environment})"

    @property
    def name(self) -> str:  # Rave shows Prod without the environment
        return self.project if self.environment.upper() == "PROD" else f"{self.project} ({self.environment})"


class StudyRegistry:
    def __init__(self, studies: Mapping[str, Iterable[str] | None], metadata: Mapping[str, StudyMetadata]) -> None:
        self.studies: dict[str, RaveStudy] = {}
        for oid, sites in studies.items():
            project, env = parse_study_oid(oid)
            study = RaveStudy(project, env, None if sites is None else frozenset(sites), metadata.get(project))
            self.studies[study.key] = study

    def find(self, study_oid: str) -> RaveStudy | None:
        project, env = parse_study_oid(study_oid)
        return self.studies.get(f"{project}({env.upper()})")

    def get(self, study_oid: str, *, post: bool = True, origin: str | None = None,
            file_oid: str | None = None) -> RaveStudy:
        study = self.find(study_oid)
        if study is None:
            raise RaveError(404, STUDY_UNKNOWN, f"Study {study_oid} does not exist.", origin=origin,
                            file_oid=file_oid, post=post)
        return study


# --------------------------------------------------------------------------------------------------
# the posted transaction


@dataclasses.dataclass(frozen=True, slots=True)
class ItemOp:
    item: str
    transaction_type: str | None
    value: str | None  # None: IsNull="Yes"
    user_oid: str | None = None
    date_time_stamp: str | None = None
    reason_for_change: str | None = None
    source_id: str | None = None


@dataclasses.dataclass(slots=True)
class GroupOp:
    event: str
    event_repeat: int  # 0: none
    form: str
    form_repeat: int
    group: str
    group_repeat: int  # 0: none
    whole: bool  # mdsol:Submission is not SpecifiedItemsOnly: the record is replaced
    items: list[ItemOp]


@dataclasses.dataclass(slots=True)
class PostedSubject:
    study: RaveStudy
    metadata_version: str
    subject_key: str
    site: str | None
    transaction_type: str
    groups: list[GroupOp]
    origin: str
    file_oid: str | None


def _strip_mdsol(root: etree._Element) -> etree._Element:
    """A copy without Rave's extensions (mdsol attributes and elements), for the plain ODM XSD."""
    clean = copy.deepcopy(root)
    for el in list(clean.iter()):
        if not isinstance(el.tag, str):
            continue
        if el.tag.startswith(_M):
            el.getparent().remove(el)
            continue
        for name in [n for n in el.attrib if n.startswith(_M)]:
            del el.attrib[name]
    return clean


def _repeat_key(el: etree._Element, attr: str, file_oid: str | None, *, default: int = 0) -> int:
    raw = el.get(attr)
    if raw is None:
        return default
    if not re.fullmatch(r"[1-9][0-9]{0,8}", raw.strip()):
        raise RaveError(400, BAD_REPEAT_KEY, f"{attr} {raw!r} is not valid: Rave repeat keys are positive integers.",
                        origin=_origin(el), file_oid=file_oid)
    return int(raw)


_DATE = re.compile(r"\d{4}(-(0[1-9]|1[0-2])(-(0[1-9]|[12]\d|3[01]))?)?")
_TIME = re.compile(r"([01]\d|2[0-3])(:[0-5]\d(:[0-5]\d(\.\d+)?)?)?")


def _value_ok(data_type: str, value: str) -> bool:
    if data_type == "integer":
        return re.fullmatch(r"[-+]?\d+", value) is not None
    if data_type in ("float", "double"):
        try:
            return Decimal(value).is_finite()
        except InvalidOperation:
            return False
    if data_type == "date":
        return re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])", value) is not None
    if data_type == "partialDate":
        return _DATE.fullmatch(value) is not None
    if data_type in ("time", "partialTime"):
        return _TIME.fullmatch(value) is not None
    if data_type in ("datetime", "partialDatetime"):
        date, _, time = value.partition("T")
        return _DATE.fullmatch(date) is not None and (not time or _TIME.fullmatch(time[:8]) is not None)
    return True


def _check_metadata(md: StudyMetadata, se: etree._Element, fd: etree._Element, ig: etree._Element,
                    it: etree._Element, value: str | None, file_oid: str | None) -> None:
    event, form, group, item = (se.get("StudyEventOID", ""), fd.get("FormOID", ""), ig.get("ItemGroupOID", ""),
                                it.get("ItemOID", ""))

    def unknown(el: etree._Element, what: str) -> RaveError:
        return RaveError(400, UNKNOWN_OID, f"{what} not found in the study's CRF version.", origin=_origin(el),
                         file_oid=file_oid)

    if event not in md.study_events:
        raise unknown(se, f"Folder {event}")
    if form not in md.study_events[event].form_oids:
        raise unknown(fd, f"Form {form} in folder {event}")
    if group not in md.forms[form].item_group_oids:
        raise unknown(ig, f"Record {group} on form {form}")
    if item not in md.item_groups[group].item_oids or item not in md.items:
        raise unknown(it, f"Field {item} on form {form}")
    data_type = md.items[item].data_type
    if value is not None and not _value_ok(data_type, value):
        raise RaveError(400, BAD_VALUE, f"Field {item}: {value!r} is not a valid {data_type} value.",
                        origin=_origin(it), file_oid=file_oid)


def parse_post(root: etree._Element, registry: StudyRegistry) -> PostedSubject | None:
    """The one subject of a (schema-valid) Transactional ODM post; None when it carries no subject."""
    file_oid = root.get("FileOID")
    if root.get("FileType") != "Transactional":
        raise RaveError(400, UNSUPPORTED, f"FileType {root.get('FileType')!r} is not supported: post a "
                                          "Transactional ODM document.", origin="/ODM", file_oid=file_oid)
    found = [(cd, sd) for cd in root.findall(_N + "ClinicalData") for sd in cd.findall(_N + "SubjectData")]
    if not found:
        for cd in root.findall(_N + "ClinicalData"):
            registry.get(cd.get("StudyOID", ""), origin=_origin(cd), file_oid=file_oid)
        return None
    if len(found) > 1:
        raise RaveError(400, UNSUPPORTED, "Only one subject can be updated per request.", origin=_origin(found[1][1]),
                        file_oid=file_oid)
    cd, sd = found[0]
    study = registry.get(cd.get("StudyOID", ""), origin=_origin(cd), file_oid=file_oid)
    key_type = sd.get(_M + "SubjectKeyType", "SubjectName")
    if key_type != "SubjectName":
        raise RaveError(400, UNSUPPORTED, f"mdsol:SubjectKeyType {key_type} is not supported by this emulator.",
                        origin=_origin(sd), file_oid=file_oid)
    site_ref = sd.find(_N + "SiteRef")
    site = site_ref.get("LocationOID") if site_ref is not None else None
    if site is not None and study.sites is not None and site not in study.sites:
        raise RaveError(404, SITE_UNKNOWN, f"Site {site} not found in study {study.oid}.", origin=_origin(site_ref),
                        file_oid=file_oid)
    groups: list[GroupOp] = []
    for se in sd.findall(_N + "StudyEventData"):
        erk = _repeat_key(se, "StudyEventRepeatKey", file_oid)
        for fd in se.findall(_N + "FormData"):
            frk = _repeat_key(fd, "FormRepeatKey", file_oid, default=1)
            for ig in fd.findall(_N + "ItemGroupData"):
                grk = _repeat_key(ig, "ItemGroupRepeatKey", file_oid)
                whole = ig.get(_M + "Submission", "WholeItemGroup") != "SpecifiedItemsOnly"
                items: list[ItemOp] = []
                for it in ig.findall(_N + "ItemData"):
                    tt = it.get("TransactionType")
                    # IsNull="Yes", Remove, or no (or an empty) Value: the field is blanked
                    value = None if it.get("IsNull") == "Yes" or tt == "Remove" else (it.get("Value") or None)
                    if study.metadata is not None:
                        _check_metadata(study.metadata, se, fd, ig, it, value, file_oid)
                    ar = it.find(_N + "AuditRecord")
                    user = stamp = reason = source = None
                    if ar is not None:
                        ur = ar.find(_N + "UserRef")
                        user = ur.get("UserOID") if ur is not None else None
                        stamp = ar.findtext(_N + "DateTimeStamp")
                        reason = ar.findtext(_N + "ReasonForChange")
                        source = ar.findtext(_N + "SourceID")
                    items.append(ItemOp(it.get("ItemOID", ""), tt, value, user, stamp, reason, source))
                groups.append(GroupOp(se.get("StudyEventOID", ""), erk, fd.get("FormOID", ""), frk,
                                      ig.get("ItemGroupOID", ""), grk, whole, items))
    return PostedSubject(study, cd.get("MetaDataVersionOID", "1"), sd.get("SubjectKey", ""), site,
                         sd.get("TransactionType") or "Update", groups, _origin(sd), file_oid)


# --------------------------------------------------------------------------------------------------
# storage


# a data point's place in Rave (its repeat keys are integers), in the datapoint and audit tables
_POINT_COLUMNS = """id INTEGER PRIMARY KEY AUTOINCREMENT,
    study TEXT NOT NULL,
    subject TEXT NOT NULL,
    event TEXT NOT NULL,
    event_repeat INTEGER NOT NULL,
    form TEXT NOT NULL,
    form_repeat INTEGER NOT NULL,
    grp TEXT NOT NULL,
    group_repeat INTEGER NOT NULL,
    item TEXT NOT NULL"""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS subject (
    study TEXT NOT NULL,
    subject TEXT NOT NULL,
    site TEXT,
    metadata_version TEXT NOT NULL DEFAULT '1',
    number_in_study INTEGER NOT NULL,
    number_in_site INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (study, subject)
);
CREATE TABLE IF NOT EXISTS datapoint (
    {_POINT_COLUMNS},
    value TEXT NOT NULL,
    reference TEXT,
    user_oid TEXT,
    date_time_stamp TEXT,
    reason_for_change TEXT,
    source_id TEXT,
    edited_by_site INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT NOT NULL,
    UNIQUE (study, subject, event, event_repeat, form, form_repeat, grp, group_repeat, item)
);
CREATE TABLE IF NOT EXISTS audit (
    {_POINT_COLUMNS},
    action TEXT NOT NULL,
    value TEXT,
    previous_value TEXT,
    reference TEXT,
    user_oid TEXT,
    reason_for_change TEXT,
    recorded_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS post (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    reference TEXT NOT NULL UNIQUE,
    file_oid TEXT,
    study TEXT NOT NULL,
    subject TEXT,
    items INTEGER NOT NULL,
    statistics TEXT NOT NULL,
    received_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS refusal (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    reason_code TEXT NOT NULL,
    message TEXT NOT NULL,
    received_at TEXT NOT NULL
);
"""

_POINT = ("study = ? AND subject = ? AND event = ? AND event_repeat = ? AND form = ? AND form_repeat = ? AND grp = ? "
          "AND group_repeat = ? AND item = ?")


class RaveRws:
    """The emulator's storage: stdlib sqlite3 (WAL for a file), one connection, one lock; every post
    applies inside BEGIN IMMEDIATE ... COMMIT (all of it or nothing)."""

    def __init__(self, db_path: Path | str | None = None) -> None:
        self.db_path = Path(db_path) if db_path is not None else None
        self._lock = threading.RLock()
        self._db = open_sqlite(self.db_path, _SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---------------------------------------------------------------------------------------- writes

    def apply(self, sub: PostedSubject) -> bytes:
        """Apply one subject's transaction; the success `<Response>`. Raises RaveError (nothing kept)."""
        study = sub.study.key
        now = _stamp()
        reference = str(uuid.uuid4())
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT * FROM subject WHERE study = ? AND subject = ?",
                                 (study, sub.subject_key)).fetchone()
                created = False
                tt = sub.transaction_type
                if tt == "Remove":
                    raise RaveError(400, UNSUPPORTED, "Removing a subject is not supported by this emulator.",
                                    origin=sub.origin, file_oid=sub.file_oid)
                if row is not None and tt == "Insert":
                    raise RaveError(400, SUBJECT_EXISTS, "Subject already exists.", origin=sub.origin,
                                    file_oid=sub.file_oid)
                if row is None:
                    if tt in ("Update", "Context"):
                        raise RaveError(404, SUBJECT_UNKNOWN, f"Subject {sub.subject_key} not found in study "
                                                              f"{sub.study.oid}.", origin=sub.origin,
                                        file_oid=sub.file_oid)
                    if not sub.site:
                        raise RaveError(400, SITE_UNKNOWN, "A SiteRef is required to create a subject.",
                                        origin=sub.origin, file_oid=sub.file_oid)
                    n_study = db.execute("SELECT COUNT(*) FROM subject WHERE study = ?", (study,)).fetchone()[0] + 1
                    n_site = db.execute("SELECT COUNT(*) FROM subject WHERE study = ? AND site = ?",
                                        (study, sub.site)).fetchone()[0] + 1
                    db.execute("INSERT INTO subject (study, subject, site, metadata_version, number_in_study, "
                               "number_in_site, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                               (study, sub.subject_key, sub.site, sub.metadata_version, n_study, n_site, now))
                    created = True
                    row = db.execute("SELECT * FROM subject WHERE study = ? AND subject = ?",
                                     (study, sub.subject_key)).fetchone()
                elif sub.site and row["site"] != sub.site:
                    raise RaveError(400, UNSUPPORTED, f"Subject {sub.subject_key} is at site {row['site']}, not "
                                                      f"{sub.site}.", origin=sub.origin, file_oid=sub.file_oid)
                else:
                    db.execute("UPDATE subject SET metadata_version = ? WHERE study = ? AND subject = ?",
                               (sub.metadata_version, study, sub.subject_key))
                counts = self._apply_groups(db, study, sub, reference, now)
                subjects = 1 if created or any(counts.values()) else 0
                statistics = (f"Rave objects touched: Subjects={subjects}; Folders={counts['folders']}; "
                              f"Forms={counts['forms']}; Fields={counts['fields']}; LogLines={counts['loglines']}")
                db.execute("INSERT INTO post (reference, file_oid, study, subject, items, statistics, received_at) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (reference, sub.file_oid, study, sub.subject_key, sum(len(g.items) for g in sub.groups),
                            statistics, now))
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
        return response_message({
            "ReferenceNumber": reference, "InboundODMFileOID": sub.file_oid or "", "IsTransactionSuccessful": "1",
            "SuccessStatistics": statistics, "NewRecords": "", "SubjectNumberInStudy": str(row["number_in_study"]),
            "SubjectNumberInStudySite": str(row["number_in_site"])})

    def _apply_groups(self, db: sqlite3.Connection, study: str, sub: PostedSubject, reference: str,
                      now: str) -> dict[str, int]:
        counts = {"folders": 0, "forms": 0, "fields": 0, "loglines": 0}
        new_folders: set[tuple[str, int]] = set()
        new_forms: set[tuple[str, int, str, int]] = set()
        new_lines: set[tuple[str, int, str, int, str, int]] = set()
        base = (study, sub.subject_key)
        for g in sub.groups:
            folder = (g.event, g.event_repeat)
            if g.event_repeat and folder not in new_folders and db.execute(
                    "SELECT 1 FROM datapoint WHERE study = ? AND subject = ? AND event = ? AND event_repeat = ? "
                    "LIMIT 1", (*base, *folder)).fetchone() is None:
                new_folders.add(folder)
                counts["folders"] += 1
            form = (*folder, g.form, g.form_repeat)
            if folder in new_folders and form not in new_forms:
                new_forms.add(form)
                counts["forms"] += 1
            line = (*form, g.group, g.group_repeat)
            if g.group_repeat and line not in new_lines and db.execute(
                    "SELECT 1 FROM datapoint WHERE study = ? AND subject = ? AND event = ? AND event_repeat = ? AND "
                    "form = ? AND form_repeat = ? AND grp = ? AND group_repeat = ? LIMIT 1",
                    (*base, *line)).fetchone() is None:
                if any(op.value is not None and op.transaction_type != "Context" for op in g.items):
                    new_lines.add(line)
                    counts["loglines"] += 1
            posted: set[str] = set()
            for op in g.items:
                posted.add(op.item)
                if op.transaction_type == "Context":
                    continue
                counts["fields"] += self._set(db, (*base, *line, op.item), op, reference, now)
            if g.whole:  # the record is what was posted: other fields of it are blanked
                for r in db.execute(
                        "SELECT item FROM datapoint WHERE study = ? AND subject = ? AND event = ? AND event_repeat = ? "
                        "AND form = ? AND form_repeat = ? AND grp = ? AND group_repeat = ?", (*base, *line)).fetchall():
                    if r["item"] not in posted:
                        counts["fields"] += self._set(db, (*base, *line, r["item"]), ItemOp(r["item"], "Remove", None),
                                                      reference, now)
        return counts

    def _set(self, db: sqlite3.Connection, point: tuple, op: ItemOp, reference: str | None, now: str, *,
             site: bool = False) -> int:
        """Set (or blank, value None) one data point; 1 when it changed, 0 when it already was so."""
        current = db.execute(f"SELECT value FROM datapoint WHERE {_POINT}", point).fetchone()
        previous = current["value"] if current is not None else None
        if op.value is None:
            if current is None:
                return 0
            db.execute(f"DELETE FROM datapoint WHERE {_POINT}", point)
            action = "Blank"
        elif current is None:
            db.execute("INSERT INTO datapoint (study, subject, event, event_repeat, form, form_repeat, grp, "
                       "group_repeat, item, value, reference, user_oid, date_time_stamp, reason_for_change, source_id, "
                       "edited_by_site, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (*point, op.value, reference, op.user_oid, op.date_time_stamp, op.reason_for_change,
                        op.source_id, int(site), now))
            action = "Enter"
        elif previous == op.value:
            return 0  # Rave records no change for an unchanged value
        else:
            db.execute(f"UPDATE datapoint SET value = ?, reference = ?, user_oid = ?, date_time_stamp = ?, "
                       f"reason_for_change = ?, source_id = ?, edited_by_site = ?, updated_at = ? WHERE {_POINT}",
                       (op.value, reference, op.user_oid, op.date_time_stamp, op.reason_for_change, op.source_id,
                        int(site), now, *point))
            action = "Change"
        db.execute("INSERT INTO audit (study, subject, event, event_repeat, form, form_repeat, grp, group_repeat, "
                   "item, action, value, previous_value, reference, user_oid, reason_for_change, recorded_at) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (*point, action, op.value, previous, reference, op.user_oid, op.reason_for_change, now))
        return 1

    def refused(self, code: str, message: str) -> None:
        with self._lock:
            self._db.execute("INSERT INTO refusal (reason_code, message, received_at) VALUES (?, ?, ?)",
                             (code, message, _stamp()))

    def site_edit(self, study: RaveStudy, subject: str, point: tuple[str, int, str, int, str, int, str],
                  value: str | None, *, user: str, reason: str | None) -> dict[str, Any]:
        """Site staff enter or change a value in Rave directly (not through RWS)."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                if db.execute("SELECT 1 FROM subject WHERE study = ? AND subject = ?",
                              (study.key, subject)).fetchone() is None:
                    raise RaveError(404, SUBJECT_UNKNOWN, f"Subject {subject} not found in study {study.oid}.",
                                    post=False)
                previous = db.execute(f"SELECT value FROM datapoint WHERE {_POINT}",
                                      (study.key, subject, *point)).fetchone()
                changed = self._set(db, (study.key, subject, *point), ItemOp(point[-1], None, value, user, _stamp(),
                                                                            reason), None, _stamp(), site=True)
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
        return {"changed": bool(changed), "previous_value": previous["value"] if previous else None, "value": value}

    # ---------------------------------------------------------------------------------------- reads

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def subject(self, study: RaveStudy, subject: str) -> sqlite3.Row | None:
        rows = self._query("SELECT * FROM subject WHERE study = ? AND subject = ?", (study.key, subject))
        return rows[0] if rows else None

    def subjects(self, study: RaveStudy) -> list[sqlite3.Row]:
        return self._query("SELECT * FROM subject WHERE study = ? ORDER BY number_in_study", (study.key,))

    def datapoints(self, study: RaveStudy, subject: str | None = None, form: str | None = None) -> list[sqlite3.Row]:
        sql, args = "SELECT * FROM datapoint WHERE study = ?", [study.key]
        if subject is not None:
            sql += " AND subject = ?"
            args.append(subject)
        if form is not None:
            sql += " AND form = ?"
            args.append(form)
        return self._query(sql + " ORDER BY id", tuple(args))

    def items(self, study: RaveStudy, subject: str | None = None) -> list[dict[str, Any]]:
        return [{"subject": r["subject"], "event": r["event"], "event_repeat": r["event_repeat"] or None,
                 "form": r["form"], "form_repeat": r["form_repeat"], "group": r["grp"],
                 "group_repeat": r["group_repeat"] or None, "item": r["item"], "value": r["value"],
                 "reference": r["reference"], "edited_by_site": bool(r["edited_by_site"]), "user": r["user_oid"],
                 "date_time_stamp": r["date_time_stamp"], "reason_for_change": r["reason_for_change"],
                 "source_id": r["source_id"]}
                for r in self.datapoints(study, subject)]

    def posts(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query("SELECT reference, file_oid, study, subject, items, statistics, "
                                             "received_at FROM post ORDER BY id")]

    def stats(self) -> dict[str, Any]:
        posts = self._query("SELECT COUNT(*) AS n FROM post")[0]["n"]
        refusals = self._query("SELECT reason_code, COUNT(*) AS n FROM refusal GROUP BY reason_code")
        return {"writes": int(posts), "refusals": {r["reason_code"]: r["n"] for r in refusals},
                "subjects": int(self._query("SELECT COUNT(*) AS n FROM subject")[0]["n"]),
                "datapoints": int(self._query("SELECT COUNT(*) AS n FROM datapoint")[0]["n"])}

    def write_count(self) -> int:
        return int(self._query("SELECT COUNT(*) AS n FROM post")[0]["n"])

    # ---------------------------------------------------------------------------------------- ODM out

    def dataset(self, study: RaveStudy, subject: str | None = None, form: str | None = None) -> bytes:
        """Snapshot ODM like RWS's clinical views: one subject, or every subject of the study."""
        if subject is not None:
            sub = self.subject(study, subject)
            subjects = [sub] if sub is not None else []
        else:
            subjects = self.subjects(study)
        root = etree.Element(_N + "ODM", nsmap={None: ODM_NS, "mdsol": MDSOL_NS, "xlink": XLINK_NS})
        for name, value in (("FileType", "Snapshot"), ("FileOID", str(uuid.uuid4())), ("CreationDateTime", _stamp()),
                            ("ODMVersion", "1.3")):
            root.set(name, value)
        mdv = subjects[0]["metadata_version"] if len(subjects) == 1 else "1"
        cd = etree.SubElement(root, _N + "ClinicalData", {"StudyOID": study.oid, "MetaDataVersionOID": mdv})
        for sub in subjects:
            rows = self.datapoints(study, sub["subject"], form)
            if form is not None and not rows:
                continue
            sd = etree.SubElement(cd, _N + "SubjectData", {"SubjectKey": sub["subject"]})
            etree.SubElement(sd, _N + "SiteRef", {"LocationOID": sub["site"] or ""})
            tree: dict[tuple, dict[tuple, dict[tuple, list[sqlite3.Row]]]] = {}
            for r in rows:
                tree.setdefault((r["event"], r["event_repeat"]), {}).setdefault((r["form"], r["form_repeat"]), {}) \
                    .setdefault((r["grp"], r["group_repeat"]), []).append(r)
            for (event, erk), forms in tree.items():
                se = etree.SubElement(sd, _N + "StudyEventData", {"StudyEventOID": event})
                if erk:
                    se.set("StudyEventRepeatKey", str(erk))
                for (form_oid, frk), groups in forms.items():
                    fd = etree.SubElement(se, _N + "FormData", {"FormOID": form_oid, "FormRepeatKey": str(frk)})
                    for (grp, grk), points in groups.items():
                        ig = etree.SubElement(fd, _N + "ItemGroupData", {"ItemGroupOID": grp})
                        if grk:
                            ig.set("ItemGroupRepeatKey", str(grk))
                        for r in points:
                            etree.SubElement(ig, _N + "ItemData", {"ItemOID": r["item"], "Value": r["value"]})
        return BOM + b'<?xml version="1.0" encoding="utf-8"?>\n' + etree.tostring(root, encoding="UTF-8",
                                                                                 pretty_print=True)

    def subjects_document(self, study: RaveStudy) -> bytes:
        root = etree.Element(_N + "ODM", nsmap={None: ODM_NS, "mdsol": MDSOL_NS, "xlink": XLINK_NS})
        for name, value in (("FileType", "Snapshot"), ("FileOID", str(uuid.uuid4())), ("CreationDateTime", _stamp()),
                            ("ODMVersion", "1.3")):
            root.set(name, value)
        for sub in self.subjects(study):
            cd = etree.SubElement(root, _N + "ClinicalData", {"StudyOID": study.oid,
                                                              "MetaDataVersionOID": sub["metadata_version"]})
            sd = etree.SubElement(cd, _N + "SubjectData", {"SubjectKey": sub["subject"]})
            etree.SubElement(sd, _N + "SiteRef", {"LocationOID": sub["site"] or ""})
        return BOM + b'<?xml version="1.0" encoding="utf-8"?>\n' + etree.tostring(root, encoding="UTF-8")


def studies_document(registry: StudyRegistry) -> bytes:
    root = etree.Element(_N + "ODM", nsmap={None: ODM_NS, "mdsol": MDSOL_NS, "xlink": XLINK_NS})
    for name, value in (("FileType", "Snapshot"), ("FileOID", str(uuid.uuid4())), ("CreationDateTime", _stamp()),
                        ("ODMVersion", "1.3")):
        root.set(name, value)
    for study in registry.studies.values():
        el = etree.SubElement(root, _N + "Study", {"OID": study.oid})
        gv = etree.SubElement(el, _N + "GlobalVariables")
        etree.SubElement(gv, _N + "StudyName").text = study.name
        etree.SubElement(gv, _N + "StudyDescription")
        etree.SubElement(gv, _N + "ProtocolName").text = study.project
    return BOM + b'<?xml version="1.0" encoding="utf-8"?>\n' + etree.tostring(root, encoding="UTF-8")


def _rollback(db: sqlite3.Connection) -> None:
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error:
        pass


# --------------------------------------------------------------------------------------------------
# fault injection


class RaveFaultRequest(FaultRequestBase):
    """`POST /_faults`: the next `count` clinical-data POSTs (null: until cleared) fail with `mode`
    (or one of `modes` at random; `rate` < 1 faults each POST with that probability, `seed` makes it
    reproducible). `after_commit` (true, or a probability) applies the transaction first, then fails.
    `retry_after` for 429/503, `delay` for timeout/slow; `status`, `reason_code` and `message` shape
    the `reject` answer (default 403 RWS00042 "Field not authorised.")."""

    mode: FaultMode | None = None
    modes: list[FaultMode] | None = None
    status: int = Field(403, ge=400, le=499)
    reason_code: str = Field(FIELD_NOT_AUTHORISED, pattern=r"^RWS\d{5}$")


def _seconds(s: float) -> str:
    return str(int(s)) if float(s).is_integer() else f"{s:g}"


def _fault_error(fault: Fault, *, applied: bool) -> RaveError:
    note = " (injected fault; the transaction WAS applied)" if applied else " (injected fault)"
    plan = fault.plan
    if fault.mode == "500":
        return RaveError(500, "", "<html><head><title>Runtime Error</title></head><body><h1>Server Error in "
                                  "'/RaveWebServices' Application.</h1>" + note + "</body></html>", plain=True)
    if fault.mode == "503":
        return RaveError(503, "", "HTTP 503 Service Temporarily Unavailable" + note, plain=True,
                         headers={"Retry-After": _seconds(plan.retry_after)})
    if fault.mode == "429":
        return RaveError(429, "", "HTTP 429 Too Many Requests" + note, plain=True,
                         headers={"Retry-After": _seconds(plan.retry_after)})
    if fault.mode == "auth":
        return RaveError(401, AUTH, "Incorrect login and password combination.", odm=True)
    if fault.mode == "timeout":
        return RaveError(504, "", "HTTP 504 Gateway Timeout" + note, plain=True)
    return RaveError(plan.status, plan.reason_code, (plan.message or "Field not authorised.") + note,
                     origin="/ODM/ClinicalData[1]/SubjectData[1]")


# --------------------------------------------------------------------------------------------------
# the app


class SiteEdit(BaseModel):
    """`POST /_test/site_edit`: site staff change (or enter, or blank with value null) a data point,
    in Rave's keys (integer repeat keys)."""

    model_config = ConfigDict(extra="forbid")
    study: str
    subject: str
    event: str
    event_repeat: int | None = Field(None, ge=1)
    form: str
    form_repeat: int = Field(1, ge=1)
    group: str
    group_repeat: int | None = Field(None, ge=1)
    item: str
    value: str | None
    user: str = SITE_USER
    reason: str | None = None


def create_rave_app(db_path: Path | str | None = None, *, users: Mapping[str, str] | None = None,
                    studies: Mapping[str, Iterable[str] | None] | None = None,
                    metadata: Mapping[str, StudyMetadata] | None = None,
                    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, faults: bool = True) -> FastAPI:
    """The RWS emulator as an ASGI app. `db_path` None keeps everything in memory. `users`: {login:
    password} for Basic auth (default rwsuser/password). `studies`: {Rave study OID `PROJECT(ENV)`:
    allowed site LocationOIDs, or None for any}. `metadata`: {project: StudyMetadata} to check OIDs
    and values like a CRF version would. `faults=False` removes `/_faults`."""
    store = RaveRws(db_path)
    registry = StudyRegistry(DEFAULT_STUDIES if studies is None else studies, metadata or {})
    plan = FaultPlan()
    credentials = dict(DEFAULT_USERS if users is None else users)
    app = FastAPI(title="Rave Web Services emulator", version=RWS_VERSION, docs_url="/docs",
                  openapi_url="/openapi.json")
    app.state.rave = store
    app.state.faults = plan
    app.state.studies = registry

    @app.exception_handler(RaveError)
    async def _rave_error(_request: Request, exc: RaveError) -> Response:
        return exc.response()

    def authenticate(request: Request, *, post: bool = False) -> str:
        header = request.headers.get("authorization")
        if not header:
            raise RaveError(401, "", NO_HEADER, plain=True)
        scheme, _, token = header.partition(" ")
        user = password = None
        if scheme.lower() == "basic":
            try:
                user, sep, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                user = None
        expected = credentials.get(user) if user else None
        if expected is None or password is None or not hmac.compare_digest(expected.encode(), password.encode()):
            raise RaveError(401, AUTH, "Incorrect login and password combination.", odm=True, post=post)
        return user or ""

    def too_large(_size: int | None) -> RaveError:
        return RaveError(413, TOO_LARGE, f"The request body is over the maximum request size of {max_body_bytes} bytes.")

    def xml(body: bytes, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
        return Response(body, status_code=status, media_type=XML_MEDIA, headers=dict(headers or {}))

    # -- unauthenticated ------------------------------------------------------------------------------

    @app.get(RWS + "/version")
    def version() -> Response:
        return PlainTextResponse(RWS_VERSION)

    @app.get(RWS + "/version/build")
    def version_build() -> Response:
        return PlainTextResponse(RWS_BUILD)

    @app.get(RWS + "/version/codename")
    def version_codename() -> Response:
        return PlainTextResponse(RWS_CODENAME)

    @app.get(RWS + "/twohundred")
    def twohundred() -> Response:
        return Response("<html><body><h1>200</h1></body></html>", media_type="text/html")

    # -- clinical data in -----------------------------------------------------------------------------

    def post_clinical_data(body: bytes) -> bytes:
        try:
            try:
                root = safe_parse(body, "ODM request body")
            except IntakeError as exc:
                raise RaveError(400, INVALID_ODM, f"The ODM could not be parsed: {exc.problem}", odm=True) from None
            problems = validate_tree(_strip_mdsol(root), "1.3.2")
            if problems:
                shown = "; ".join(str(p) for p in problems[:3]) + (
                    f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
                raise RaveError(400, INVALID_ODM, f"The ODM is not valid ODM 1.3: {shown}", odm=True)
            posted = parse_post(root, registry)
            if posted is None:
                return response_message({"ReferenceNumber": str(uuid.uuid4()),
                                         "InboundODMFileOID": root.get("FileOID") or "",
                                         "IsTransactionSuccessful": "1", "SuccessStatistics": NO_STATISTICS,
                                         "NewRecords": ""})
            return store.apply(posted)
        except RaveError as exc:
            store.refused(exc.code, exc.message)
            raise

    @app.post(RWS + "/webservice.aspx")
    async def webservice(request: Request) -> Response:
        if "PostODMClinicalData" not in request.query_params:
            raise RaveError(404, URL_UNKNOWN, "RWS URL does not exist.", post=False)
        authenticate(request, post=True)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ("text/xml", "application/xml"):
            raise RaveError(415, "", f"Unsupported Media Type {ctype or '(none)'}: use Content-type text/xml",
                            plain=True)
        body = await read_limited_body(request, max_body_bytes, too_large)
        fault = plan.take() if faults else None
        if fault is not None and not fault.after_commit:
            if fault.mode == "reset":
                return await drop_connection(request, "Rave emulator")
            if fault.mode in ("timeout", "slow"):
                await asyncio.sleep(fault.plan.delay)
            if fault.mode != "slow":
                raise _fault_error(fault, applied=False)
        answer = await run_in_threadpool(post_clinical_data, body)
        if fault is not None and fault.after_commit:
            if fault.mode == "reset":
                return await drop_connection(request, "Rave emulator")
            if fault.mode in ("timeout", "slow"):
                await asyncio.sleep(fault.plan.delay)  # the answer comes after the client gave up
            if fault.mode != "slow":
                raise _fault_error(fault, applied=True)
        return xml(answer)

    @app.get(RWS + "/webservice.aspx")
    def webservice_get(request: Request) -> Response:
        if "CacheFlush" not in request.query_params:
            raise RaveError(404, URL_UNKNOWN, "RWS URL does not exist.", post=False)
        authenticate(request)
        return xml(response_message({"ReferenceNumber": str(uuid.uuid4()), "InboundODMFileOID": "",
                                     "IsTransactionSuccessful": "1", "SuccessStatistics": NO_STATISTICS,
                                     "NewRecords": ""}))

    # -- clinical data out ----------------------------------------------------------------------------

    def dataset_type(value: str) -> str:
        if value.lower() not in ("regular", "raw"):
            raise RaveError(404, URL_UNKNOWN, "RWS URL does not exist.", post=False)
        return value.lower()

    @app.get(RWS + "/studies")
    def get_studies(request: Request) -> Response:
        authenticate(request)
        return xml(studies_document(registry))

    @app.get(RWS + "/studies/{study}/subjects")
    def get_subjects(study: str, request: Request) -> Response:
        authenticate(request)
        return xml(store.subjects_document(registry.get(study, post=False)))

    @app.get(RWS + "/studies/{study}/subjects/{subject}/datasets/{kind}")
    def get_subject_dataset(study: str, subject: str, kind: str, request: Request) -> Response:
        authenticate(request)
        dataset_type(kind)
        return xml(store.dataset(registry.get(study, post=False), subject))

    @app.get(RWS + "/studies/{study}/subjects/{subject}/datasets/{kind}/{form}")
    def get_subject_form_dataset(study: str, subject: str, kind: str, form: str, request: Request) -> Response:
        authenticate(request)
        dataset_type(kind)
        return xml(store.dataset(registry.get(study, post=False), subject, form))

    @app.get(RWS + "/studies/{study}/datasets/{kind}")
    def get_study_dataset(study: str, kind: str, request: Request) -> Response:
        authenticate(request)
        dataset_type(kind)
        return xml(store.dataset(registry.get(study, post=False)), headers={"X-MWS-CV-Last-Updated": _stamp()})

    @app.get(RWS + "/studies/{study}/datasets/{kind}/{form}")
    def get_study_form_dataset(study: str, kind: str, form: str, request: Request) -> Response:
        authenticate(request)
        dataset_type(kind)
        return xml(store.dataset(registry.get(study, post=False), None, form),
                   headers={"X-MWS-CV-Last-Updated": _stamp()})

    # -- test endpoints (not RWS) -------------------------------------------------------------------

    @app.get("/_test/items")
    def test_items(study: str, subject: str | None = None) -> JSONResponse:
        return JSONResponse(store.items(registry.get(study, post=False), subject))

    @app.post("/_test/site_edit")
    def test_site_edit(edit: SiteEdit) -> JSONResponse:
        point = (edit.event, edit.event_repeat or 0, edit.form, edit.form_repeat, edit.group, edit.group_repeat or 0,
                 edit.item)
        return JSONResponse(store.site_edit(registry.get(edit.study, post=False), edit.subject, point, edit.value,
                                            user=edit.user, reason=edit.reason))

    @app.get("/_test/stats")
    def test_stats() -> JSONResponse:
        return JSONResponse(store.stats())

    @app.get("/_test/posts")
    def test_posts() -> JSONResponse:
        return JSONResponse(store.posts())

    if faults:
        add_fault_routes(app, plan, RaveFaultRequest)

    @app.api_route(RWS + "/{rest:path}", methods=["GET", "POST", "PUT", "DELETE"])
    def unknown_url(rest: str) -> Response:
        raise RaveError(404, URL_UNKNOWN, "RWS URL does not exist.", post=False)

    return app


# --------------------------------------------------------------------------------------------------
# standalone


def run_rave(host: str = "127.0.0.1", port: int = 8091, db_path: Path | None = None, *,
             users: Mapping[str, str] | None = None, log_level: str = "info") -> None:
    """Serve the emulator with uvicorn until interrupted."""
    app = create_rave_app(db_path, users=users)
    serve_standalone(app, host, port, app.state.rave.close, log_level=log_level)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rave-rws", description="Rave Web Services emulator (loopback)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--db", type=Path, default=None, help="SQLite file (default: in memory)")
    args = parser.parse_args(argv)
    run_rave(args.host, args.port, args.db)


if __name__ == "__main__":
    main()
