"""The connector for OpenClinica 4: ODM clinical data through OC's asynchronous import API.

    connector = OpenClinicaConnector("https://acme.openclinica.io/OpenClinica", token, timeout=10)
    receipt = connector.send(tx, odm)            # submits, follows the import job, reads its log
    odm = connector.read_back("CV01", "001-0001")  # the participant's data in esource's keys, or None

`base_url` is OpenClinica's web application root, context path included (".../OpenClinica"); `token`
an OAuth bearer token of a user with a data-entry role in the study (OC 4 imports asynchronously for
such users). A token refresher is out of scope: pass a fresh connector, or a `client` with auth.

How a transaction goes:
1. Checks before anything is sent: a transaction without ItemData (what remains when every item was
   withheld for a conflict) is accepted as a no-op (OC would fail it:
   `errorCode.subjectDoesNotContainEventData`); an ItemData Remove is refused permanently (OC's import
   cannot remove a value: it answers `errorCode.missingValue`; a data manager removes it in OC).
2. `POST {base}/pages/auth/api/clinicaldata/import`, the ODM as a multipart file `file` named
   `esource_<study>_<subject>_<sequence>.xml` (OC's Bulk Actions Log shows it), each SubjectData
   carrying `OpenClinica:StudySubjectID` (the participant ID, as OC's import requires). OC answers
   200 `job uuid: <uuid>`.
3. The job is followed with `GET {base}/pages/auth/api/jobs/{uuid}/downloadFile`: `poll_initial`
   seconds after submitting, then doubling up to `poll_max`, for at most `poll_timeout` seconds
   (the time slept between polls, or the wall clock, whichever is longer). While OC answers
   `errorCode.jobInProgress` the job runs; then the answer is the job's CSV log, one row per item.
   `errorCode.noLogFileFound` means the job FAILED (confirmed with `GET .../studies/{study}/jobs`).
   Failing polls (5xx, 429, timeouts, resets) are retried within `poll_timeout`.

How answers map to the EdcConnector port:
- Every row `Inserted`, `Updated` or `No Change` -> accepted, reference = the job uuid. When every
  row is `No Change` (nothing applied: e.g. a re-send after an ambiguous failure) the receipt's code
  is "duplicate". OC has no idempotency key: re-importing identical values is its de-duplication.
- Any `Failed` row -> a permanent rejection. Its code is OC's error code(s) (e.g.
  `errorCode.valueTypeMismatch`), its message names each failed item with OC's message and -- a
  partial success -- lists the items that WERE applied and stay in OpenClinica.
- Job FAILED (nothing applied) -> permanent rejection, code `error.jobFailed`.
- Import answers: 404 (`errorCode.studyNotExist`), 415 (`errorCode.invalidXMLFile`,
  `errorCode.fileFormatNotSupported`), other 4xx, and a 200 carrying an error code instead of a job
  uuid (`errorCode.noRoleSetUp`, `errorCode.noSufficientPrivileges` ...) -> permanent rejection with
  OC's code.
- 401/403 (the token refused: expired, revoked, wrong) to the import, a job poll, a read-back or the
  study metadata -> `EdcAuthenticationError`: the dispatcher stops sending to OpenClinica and keeps
  every transaction pending. A job already submitted is still remembered and followed afterwards.
- 408/425/429/5xx (Retry-After honoured), timeouts, connection resets, a job not finished within
  `poll_timeout`, a job OC no longer knows -> `TransientDeliveryError`. Re-sending is safe: identical
  values come back "No Change".

A job that did not finish within `poll_timeout` is remembered (per subject, in memory): the next
send of the same transaction follows that job instead of submitting the file again, and no later
transaction of the subject is submitted while it still runs (a late job would overwrite newer
values); a job OC never finishes thus holds its subject, visibly (the row stays `failed` with that
reason), until the connector is restarted. Across a restart that memory is gone; re-sending is still safe for the values, but a job
still running in OC could then land after a newer one (OC gives no ordering between jobs).

Read-back: `GET {base}/rest/clinicaldata/xml/view/{study}/{subject}/*/*` (includeDNs=n,
includeAudits=n), rewritten as a plain ODM 1.3.2 Snapshot in esource's keys: the participant ID as
SubjectKey, and OC's ordinal "1" removed from non-repeating events and item groups (learnt from the
study's metadata, `GET {base}/rest/metadata/xml/view/{study}/*/*`, once per study).
Credentials never appear in a message.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import hashlib
import io
import re
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx
from lxml import etree

from esource.connectors.common import OwnsHttpClient, parse_retry_after, redact, transaction_key
from esource.domain.model import SubjectTransaction
from esource.domain.ports import ConnectorCapabilities, DeliveryReceipt
from esource.errors import IntakeError
from esource.odm.xsd import ODM_NAMESPACES, safe_parse
from esource.services.dispatch import EdcAuthenticationError, TransientDeliveryError

__all__ = ["OpenClinicaConnector", "ImportLogRow", "parse_import_log", "transaction_key", "OC_NS"]

ODM_NS = ODM_NAMESPACES["1.3.2"]
OC_NS = "http://www.openclinica.org/ns/odm_ext_v130/v3.1"
_N = "{" + ODM_NS + "}"
_OC = "{" + OC_NS + "}"
_MAX_MESSAGE = 2000
_TRANSIENT_4XX = {408, 425, 429}
_AUTH_STATUSES = (401, 403)
_APPLIED = ("Inserted", "Updated")
_NO_CHANGE = "No Change"
_LOG_HEADER = "SubjectKey"
JOB_FAILED = "error.jobFailed"


# ---------------------------------------------------------------------------------------- the job log


@dataclasses.dataclass(frozen=True, slots=True)
class ImportLogRow:
    """One row of an OC import job's log."""

    subject_key: str
    participant_id: str
    event: str
    event_repeat: str
    form: str
    group: str
    group_repeat: str
    item: str
    status: str
    timestamp: str
    message: str

    @property
    def path(self) -> str:
        """`001-0001 SE.BASELINE/F.VS/IG.VS[WEIGHT]/IT.VS.VSORRES` (as far as the row goes)."""
        parts = []
        if self.event:
            parts.append(f"{self.event}[{self.event_repeat}]" if self.event_repeat else self.event)
        if self.form:
            parts.append(self.form)
        if self.group:
            parts.append(f"{self.group}[{self.group_repeat}]" if self.group_repeat else self.group)
        if self.item:
            parts.append(self.item)
        who = self.participant_id or self.subject_key
        return f"{who} {'/'.join(parts)}".strip() if parts else (who or "(file)")

    @property
    def failed(self) -> bool:
        return self.status not in (*_APPLIED, _NO_CHANGE)


def parse_import_log(text: str) -> list[ImportLogRow]:
    """OC's import log (CSV, header `SubjectKey,ParticipantID,...,Status,Timestamp,Message`). OC does
    not quote its fields: a message with commas spills into extra fields, joined back here."""
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    rows: list[ImportLogRow] = []
    header_seen = False
    for fields in reader:
        if not fields or not any(f.strip() for f in fields):
            continue
        if not header_seen:
            header_seen = True
            if fields[0].strip() == _LOG_HEADER:
                continue
        if len(fields) < 11:
            fields += [""] * (11 - len(fields))
        head, message = [f.strip() for f in fields[:10]], ",".join(fields[10:]).strip()
        rows.append(ImportLogRow(*head, message))  # type: ignore[arg-type]
    return rows


@dataclasses.dataclass(slots=True)
class _Pending:
    key: str
    sha: str
    job: str
    file_name: str


@dataclasses.dataclass(slots=True)
class _JobOutcome:
    """What one poll learnt: `kind` done (the log in `rows`) | failed | running | gone (OC does not know
    the job) | error (the poll failed; `retry_after` when OC gave one) | abort (authentication)."""

    kind: str
    rows: list[ImportLogRow] = dataclasses.field(default_factory=list)
    detail: str = ""
    retry_after: float | None = None
    status: int | None = None  # the HTTP status of an abort


# ---------------------------------------------------------------------------------------- the connector


class OpenClinicaConnector(OwnsHttpClient):
    """`EdcConnector` for OpenClinica 4. Thread-safe (one pooled httpx.Client)."""

    name = "openclinica"

    def __init__(self, base_url: str, token: str, *, timeout: float = 10.0, poll_initial: float = 0.1,
                 poll_max: float = 5.0, poll_timeout: float = 120.0, client: httpx.Client | None = None,
                 sleep: Callable[[float], Any] = time.sleep) -> None:
        if poll_initial <= 0 or poll_max < poll_initial or poll_timeout <= 0:
            raise ValueError("need 0 < poll_initial <= poll_max and poll_timeout > 0")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.poll_initial = poll_initial
        self.poll_max = poll_max
        self.poll_timeout = poll_timeout
        self._sleep = sleep
        self._use_client(client, timeout)
        self._auth = {"Authorization": f"Bearer {token}"}
        self._secrets = [s for s in (token,) if s]
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._designs: dict[str, tuple[frozenset[str], frozenset[str]]] = {}

    def capabilities(self) -> ConnectorCapabilities:
        return ConnectorCapabilities("openclinica", read_back=True, idempotency_key=False, integer_repeat_keys=False)

    def __repr__(self) -> str:
        return f"OpenClinicaConnector({self.base_url!r})"

    # ------------------------------------------------------------------------------------ send

    def send(self, transaction: SubjectTransaction, odm: bytes) -> DeliveryReceipt:
        key = transaction_key(transaction)
        subject = (transaction.study_oid, transaction.subject_key)
        try:
            root = safe_parse(odm, f"outbox ODM {key}")
        except IntakeError as exc:
            return DeliveryReceipt(accepted=False, permanent=True, code="INVALID_ODM", message=str(exc)[:_MAX_MESSAGE])
        items = list(root.iter(f"{_N}ItemData"))
        removals = [it for it in items if it.get("TransactionType") == "Remove"]
        if removals:
            names = ", ".join(_item_label(it) for it in removals[:10])
            return DeliveryReceipt(
                accepted=False, permanent=True, code="REMOVE_NOT_SUPPORTED",
                message=(f"OpenClinica's import cannot remove a value ({names}); nothing was sent. A data manager "
                         "removes it in OpenClinica, then re-queues the transaction without the Remove."))
        if not items:
            return DeliveryReceipt(accepted=True, code="no-op",
                                   message="no ItemData to import: nothing sent to OpenClinica")
        sha = hashlib.sha256(odm).hexdigest()

        with self._lock:
            pending = self._pending.get(subject)
        if pending is not None:
            outcome = self._await_job(pending.job, transaction.study_oid, key)
            if outcome.kind == "abort":
                raise EdcAuthenticationError(f"OpenClinica at {self.base_url}: cannot follow import job {pending.job} "
                                             f"of {pending.key}: {outcome.detail}", status=outcome.status)
            if pending.key == key and pending.sha == sha:
                return self._conclude(subject, pending, outcome, resumed=True)
            if outcome.kind in ("running", "error"):
                raise TransientDeliveryError(
                    f"OpenClinica: import job {pending.job} of {pending.key} is still unresolved "
                    f"({outcome.detail}); {key} waits for it (a late job would overwrite newer values)",
                    ambiguous=False)
            self._forget(subject, pending.job)

        file_name = _file_name(transaction)
        try:
            job = self._submit(key, _with_participant_ids(root), file_name)
        except _Rejected as exc:
            return DeliveryReceipt(accepted=False, permanent=True, code=exc.code, message=_cap(exc.message))
        pending = _Pending(key, sha, job, file_name)
        with self._lock:
            self._pending[subject] = pending
        outcome = self._await_job(job, transaction.study_oid, key)
        return self._conclude(subject, pending, outcome, resumed=False)

    def _submit(self, key: str, payload: bytes, file_name: str) -> str:
        url = f"{self.base_url}/pages/auth/api/clinicaldata/import"
        try:
            r = self._client.post(url, files={"file": (file_name, payload, "text/xml")},
                                  headers={"Accept": "*/*", **self._auth}, timeout=self.timeout)
        except httpx.TimeoutException as exc:
            raise TransientDeliveryError(
                f"OpenClinica at {self.base_url}: no answer within {self.timeout:g}s to the import of {key} "
                f"({type(exc).__name__}); an import job may exist, re-sending is safe (identical values answer "
                "No Change)", ambiguous=True) from None
        except (httpx.TransportError, OSError) as exc:
            raise TransientDeliveryError(
                f"OpenClinica at {self.base_url}: {type(exc).__name__}: "
                f"{self._redact(str(exc)) or 'connection failed'} importing {key}; re-sending is safe",
                ambiguous=True) from None
        status, text = r.status_code, self._text(r)
        if status == 200:
            m = re.search(r"job uuid:\s*([0-9A-Za-z-]+)", r.text)
            if m:
                return m.group(1)
            code = _oc_code(text) or "UNEXPECTED_ANSWER"
            raise _Rejected(code, f"OpenClinica did not start an import job for {key}: {text}")
        retry_after = parse_retry_after(r.headers.get("retry-after"))
        if status in _TRANSIENT_4XX or status >= 500 or status < 400:
            raise TransientDeliveryError(f"OpenClinica: HTTP {status} importing {key}: {text}", code=str(status),
                                         retry_after=retry_after)
        code = _oc_code(text) or str(status)
        if status in _AUTH_STATUSES:
            raise EdcAuthenticationError(f"OpenClinica at {self.base_url}: HTTP {status}, authentication failed "
                                         f"importing {key}: {text}", status=status, code=code)
        raise _Rejected(code, f"OpenClinica: HTTP {status}, import refused for {key}: {text}")

    def _await_job(self, job: str, study: str, key: str) -> _JobOutcome:
        """Poll the job with capped exponential backoff until it is done, FAILED, unknown, or poll_timeout."""
        started = time.monotonic()
        slept = 0.0
        delay = self.poll_initial
        last = _JobOutcome("running", detail="not polled yet")
        while True:
            wait = max(delay, last.retry_after or 0.0)
            budget = self.poll_timeout - max(slept, time.monotonic() - started)
            if budget <= 0:
                return last
            self._sleep(min(wait, budget))
            slept += min(wait, budget)
            last = self._poll(job, study)
            if last.kind in ("done", "failed", "gone", "abort"):
                return last
            delay = min(delay * 2, self.poll_max)

    def _poll(self, job: str, study: str) -> _JobOutcome:
        url = f"{self.base_url}/pages/auth/api/jobs/{quote(job, safe='')}/downloadFile"
        try:
            r = self._client.get(url, headers={"Accept": "*/*", **self._auth}, timeout=self.timeout)
        except (httpx.HTTPError, OSError) as exc:
            return _JobOutcome("error", detail=f"polling failed: {type(exc).__name__}")
        body = r.text
        low = body.lower()
        if r.status_code == 200:
            if "jobinprogress" in low:
                return _JobOutcome("running", detail="IN_PROGRESS")
            if body.lstrip("\ufeff \r\n").startswith(_LOG_HEADER):
                return _JobOutcome("done", parse_import_log(body))
            if "nologfilefound" in low:
                return self._job_status(job, study)
            return _JobOutcome("error", detail=f"unexpected answer to the job poll: {self._text(r)[:200]}")
        if r.status_code == 404:
            return _JobOutcome("gone", detail=self._text(r)[:200])
        if r.status_code in _AUTH_STATUSES:
            return _JobOutcome("abort", detail=f"HTTP {r.status_code} polling the job: {self._text(r)[:200]}",
                               status=r.status_code)
        return _JobOutcome("error", detail=f"HTTP {r.status_code} polling the job: {self._text(r)[:200]}",
                           retry_after=parse_retry_after(r.headers.get("retry-after")))

    def _job_status(self, job: str, study: str) -> _JobOutcome:
        """A job without a log: FAILED, or something odd. OC's job list says which."""
        url = f"{self.base_url}/pages/auth/api/studies/{quote(study, safe='')}/jobs"
        try:
            r = self._client.get(url, headers={"Accept": "application/json", **self._auth}, timeout=self.timeout)
            jobs = r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, OSError, ValueError) as exc:
            return _JobOutcome("error", detail=f"no log and the job list failed: {type(exc).__name__}")
        found = next((j for j in jobs or [] if isinstance(j, dict) and j.get("uuid") == job), None)
        if found is None:
            return _JobOutcome("error",
                               detail=f"no log, and the job is not in the study's job list (HTTP {r.status_code})")
        status = str(found.get("status"))
        if status == "FAILED":
            why = found.get("failureMessage")
            return _JobOutcome("failed", detail=self._redact(str(why)) if why else "")
        if status == "IN_PROGRESS":
            return _JobOutcome("running", detail="IN_PROGRESS")
        return _JobOutcome("error", detail=f"the job is {status} but OpenClinica has no log for it")

    def _conclude(self, subject: tuple[str, str], pending: _Pending, outcome: _JobOutcome, *,
                  resumed: bool) -> DeliveryReceipt:
        key, job = pending.key, pending.job
        again = " (followed again after an earlier send)" if resumed else ""
        if outcome.kind == "abort":
            raise EdcAuthenticationError(
                f"OpenClinica at {self.base_url}: cannot follow import job {job} of {key}{again}: {outcome.detail}; "
                "the next send follows the same job", status=outcome.status)
        if outcome.kind in ("running", "error"):
            raise TransientDeliveryError(
                f"OpenClinica: import job {job} of {key} not finished within {self.poll_timeout:g}s{again} "
                f"({outcome.detail}); the next send follows the same job", ambiguous=True,
                retry_after=outcome.retry_after)
        self._forget(subject, job)
        if outcome.kind == "gone":
            raise TransientDeliveryError(
                f"OpenClinica no longer knows import job {job} of {key} ({outcome.detail}); it may have been applied, "
                "re-sending is safe", ambiguous=True)
        if outcome.kind == "failed":
            why = f": {outcome.detail}" if outcome.detail else " (OpenClinica keeps no log for a failed job)"
            return DeliveryReceipt(accepted=False, permanent=True, code=JOB_FAILED, reference=job,
                                   message=_cap(f"OpenClinica import job {job} ({pending.file_name}) FAILED{why}; "
                                                "nothing of the file was applied"))
        rows = outcome.rows
        failed = [r for r in rows if r.failed]
        applied = [r for r in rows if r.status in _APPLIED]
        unchanged = [r for r in rows if r.status == _NO_CHANGE]
        if not rows:
            return DeliveryReceipt(accepted=False, permanent=True, code="EMPTY_LOG", reference=job,
                                   message=f"OpenClinica import job {job} ({pending.file_name}) completed with an "
                                           "empty log: nothing was reported as imported")
        if not failed:
            if not applied:
                return DeliveryReceipt(accepted=True, reference=job, code="duplicate",
                                       message=f"OpenClinica answered No Change for all {len(unchanged)} item(s) of "
                                               f"job {job}: already applied, nothing changed")
            counts = _counts(rows)
            return DeliveryReceipt(accepted=True, reference=job, code="COMPLETED",
                                   message=f"job {job}{again}: {counts}")
        codes = sorted({r.message or r.status for r in failed})
        lines = [f"OpenClinica import job {job} ({pending.file_name}) completed with {len(failed)} failed row(s): "
                 + "; ".join(f"{r.path}: {r.message or r.status}" for r in failed) + "."]
        if applied:
            lines.append(f"PARTIAL SUCCESS: {len(applied)} item(s) of this transaction WERE applied and stay in "
                         "OpenClinica: " + "; ".join(f"{r.path} ({r.status})" for r in applied) + ".")
        else:
            lines.append("Nothing of this transaction was applied.")
        if unchanged:
            lines.append(f"{len(unchanged)} item(s) already held these values (No Change).")
        lines.append("Fix the cause and re-queue: applied items will answer No Change.")
        return DeliveryReceipt(accepted=False, permanent=True, reference=job, code=_cap(",".join(codes), 200),
                               message=_cap(" ".join(lines)))

    def _forget(self, subject: tuple[str, str], job: str) -> None:
        with self._lock:
            p = self._pending.get(subject)
            if p is not None and p.job == job:
                del self._pending[subject]

    def pending_jobs(self) -> dict[str, str]:
        """{transaction key: job uuid} of the jobs this connector is still following (unfinished)."""
        with self._lock:
            return {p.key: p.job for p in self._pending.values()}

    # ------------------------------------------------------------------------------------ read-back

    def read_back(self, study_oid: str, subject_key: str) -> bytes | None:
        url = (f"{self.base_url}/rest/clinicaldata/xml/view/{quote(study_oid, safe='')}/"
               f"{quote(subject_key, safe='')}/*/*")
        try:
            r = self._client.get(url, params={"includeDNs": "n", "includeAudits": "n"},
                                 headers={"Accept": "application/xml", **self._auth}, timeout=self.timeout)
        except (httpx.HTTPError, OSError) as exc:
            raise TransientDeliveryError(
                f"OpenClinica at {self.base_url}: read-back of {study_oid}/{subject_key} failed: {type(exc).__name__}",
                ambiguous=False) from None
        if r.status_code == 404:
            return None
        if r.status_code in _AUTH_STATUSES:
            raise EdcAuthenticationError(f"OpenClinica at {self.base_url}: HTTP {r.status_code} to the read-back of "
                                         f"{study_oid}/{subject_key}: {self._text(r)}", status=r.status_code,
                                         code=str(r.status_code))
        if r.status_code != 200:
            raise TransientDeliveryError(
                f"OpenClinica: read-back of {study_oid}/{subject_key}: HTTP {r.status_code}: {self._text(r)}",
                code=str(r.status_code), retry_after=parse_retry_after(r.headers.get("retry-after")))
        try:
            root = safe_parse(r.content, "OpenClinica read-back")
        except IntakeError as exc:
            raise TransientDeliveryError(f"OpenClinica: read-back of {study_oid}/{subject_key}: {exc}") from None
        subject = _find_subject(root, subject_key)
        if subject is None:
            return None
        single_events, single_groups = self._design(study_oid)
        return _snapshot(root, subject, study_oid, subject_key, single_events, single_groups)

    def _design(self, study: str) -> tuple[frozenset[str], frozenset[str]]:
        """(non-repeating StudyEventOIDs, non-repeating ItemGroupOIDs) from OC's study metadata, cached."""
        with self._lock:
            known = self._designs.get(study)
        if known is not None:
            return known
        url = f"{self.base_url}/rest/metadata/xml/view/{quote(study, safe='')}/*/*"
        try:
            r = self._client.get(url, headers={"Accept": "application/xml", **self._auth}, timeout=self.timeout)
        except (httpx.HTTPError, OSError) as exc:
            raise TransientDeliveryError(f"OpenClinica: study metadata of {study}: {type(exc).__name__}") from None
        if r.status_code in _AUTH_STATUSES:
            raise EdcAuthenticationError(f"OpenClinica at {self.base_url}: HTTP {r.status_code} to the study metadata "
                                         f"of {study}: {self._text(r)}", status=r.status_code, code=str(r.status_code))
        if r.status_code == 404:
            design: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())
        elif r.status_code != 200:
            raise TransientDeliveryError(f"OpenClinica: study metadata of {study}: HTTP {r.status_code}",
                                         code=str(r.status_code))
        else:
            try:
                md = safe_parse(r.content, "OpenClinica study metadata")
            except IntakeError as exc:
                raise TransientDeliveryError(f"OpenClinica: study metadata of {study}: {exc}") from None
            events = frozenset(e.get("OID", "").upper() for e in md.iter(f"{_N}StudyEventDef")
                               if e.get("Repeating") == "No")
            groups = frozenset(g.get("OID", "").upper() for g in md.iter(f"{_N}ItemGroupDef")
                               if g.get("Repeating") == "No")
            design = (events, groups)
        with self._lock:
            self._designs[study] = design
        return design

    # ------------------------------------------------------------------------------------ helpers

    def _text(self, r: httpx.Response) -> str:
        try:
            body = r.json() if "json" in r.headers.get("content-type", "") else None
        except ValueError:
            body = None
        if isinstance(body, dict):
            text = body.get("message") or body.get("error_description") or body.get("error") or body.get("detail")
            text = str(text) if text is not None else r.text
        else:
            text = r.text
        text = " ".join(text.split()) or f"HTTP {r.status_code} {r.reason_phrase}".strip()
        return self._redact(text)[:_MAX_MESSAGE]

    def _redact(self, text: str) -> str:
        return redact(text, self._secrets)


class _Rejected(Exception):
    """Internal: the import was refused for good (becomes a permanent receipt)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------------------- ODM rewriting


def _item_label(it: etree._Element) -> str:
    ig, fd = it.getparent(), None
    fd = ig.getparent() if ig is not None else None
    se = fd.getparent() if fd is not None else None
    parts = [se.get("StudyEventOID") if se is not None else "?", fd.get("FormOID") if fd is not None else "?",
             ig.get("ItemGroupOID") if ig is not None else "?", it.get("ItemOID") or "?"]
    return "/".join(p or "?" for p in parts)


def _with_participant_ids(root: etree._Element) -> bytes:
    """The ODM as OC's import reads it: every SubjectData also names its participant ID
    (`OpenClinica:StudySubjectID`, which OC requires; esource's SubjectKey is that ID)."""
    nsmap = dict(root.nsmap)
    if nsmap.get("OpenClinica") != OC_NS:
        nsmap["OpenClinica"] = OC_NS
        new = etree.Element(root.tag, attrib=dict(root.attrib), nsmap=nsmap)
        new.text = root.text
        for child in root:
            new.append(child)
        root = new
    for sd in root.iter(f"{_N}SubjectData"):
        if sd.get(f"{_OC}StudySubjectID") is None and sd.get("SubjectKey"):
            sd.set(f"{_OC}StudySubjectID", sd.get("SubjectKey", ""))
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + etree.tostring(root, encoding="UTF-8")


def _file_name(tx: SubjectTransaction) -> str:
    raw = f"esource_{tx.study_oid}_{tx.subject_key}_{tx.sequence:06d}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", raw) + ".xml"


def _find_subject(root: etree._Element, subject_key: str) -> etree._Element | None:
    for sd in root.iter(f"{_N}SubjectData"):
        if sd.get(f"{_OC}StudySubjectID") == subject_key or sd.get("SubjectKey") == subject_key:
            return sd
    return None


def _snapshot(root: etree._Element, subject: etree._Element, study: str, subject_key: str,
              single_events: frozenset[str], single_groups: frozenset[str]) -> bytes:
    """OC's read-back as a plain ODM 1.3.2 Snapshot in esource's keys."""
    cd_in = subject.getparent()
    mdv = cd_in.get("MetaDataVersionOID") if cd_in is not None else None
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"
    out = etree.Element(f"{_N}ODM", nsmap={None: ODM_NS})
    for name, value in (("FileOID", f"OPENCLINICA.{study}.{subject_key}.{now}"), ("FileType", "Snapshot"),
                        ("Granularity", "SingleSubject"), ("CreationDateTime", now), ("ODMVersion", "1.3.2"),
                        ("Originator", "OpenClinica read-back (esource)"), ("SourceSystem", "OpenClinica")):
        out.set(name, value)
    cd = etree.SubElement(out, f"{_N}ClinicalData", {
        "StudyOID": study, "MetaDataVersionOID": mdv if mdv and mdv != "null" else "MDV.UNKNOWN"})
    sd = etree.SubElement(cd, f"{_N}SubjectData", {"SubjectKey": subject_key})
    for se_in in subject.iterchildren(f"{_N}StudyEventData"):
        ev = se_in.get("StudyEventOID", "")
        se = etree.SubElement(sd, f"{_N}StudyEventData", {"StudyEventOID": ev})
        erk = se_in.get("StudyEventRepeatKey")
        if erk and not (ev.upper() in single_events and erk == "1"):
            se.set("StudyEventRepeatKey", erk)
        for fd_in in se_in.iterchildren(f"{_N}FormData"):
            fd = etree.SubElement(se, f"{_N}FormData", {"FormOID": fd_in.get("FormOID", "")})
            for ig_in in fd_in.iterchildren(f"{_N}ItemGroupData"):
                grp = ig_in.get("ItemGroupOID", "")
                ig = etree.SubElement(fd, f"{_N}ItemGroupData", {"ItemGroupOID": grp})
                grk = ig_in.get("ItemGroupRepeatKey")
                if grk and not (grp.upper() in single_groups and grk == "1"):
                    ig.set("ItemGroupRepeatKey", grk)
                for it_in in ig_in.iterchildren(f"{_N}ItemData"):
                    attrs = {"ItemOID": it_in.get("ItemOID", "")}
                    if it_in.get("Value") is None:
                        attrs["IsNull"] = "Yes"
                    else:
                        attrs["Value"] = it_in.get("Value", "")
                    etree.SubElement(ig, f"{_N}ItemData", attrs)
    # drop empty containers (ODM requires at least one child below StudyEventData/FormData/ItemGroupData)
    for tag in ("ItemGroupData", "FormData", "StudyEventData"):
        for el in list(sd.iter(f"{_N}{tag}")):
            if len(el) == 0:
                el.getparent().remove(el)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + etree.tostring(out, encoding="UTF-8", pretty_print=True)


def _oc_code(text: str) -> str | None:
    m = re.search(r"\b(error(?:Code)?\.[A-Za-z][\w.]*)", text)
    return m.group(1) if m else None


def _counts(rows: list[ImportLogRow]) -> str:
    n = {s: sum(1 for r in rows if r.status == s) for s in ("Inserted", "Updated", _NO_CHANGE)}
    return f"{n['Inserted']} inserted, {n['Updated']} updated, {n[_NO_CHANGE]} no change"


def _cap(text: str, limit: int = _MAX_MESSAGE) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
