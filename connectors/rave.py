"""The connector for Medidata Rave: esource's ODM transactions over Rave Web Services (RWS), with
exactly-once effect although RWS has no idempotency key.

    connector = RaveConnector("https://acme.mdsol.com", "rwsuser", password, environment="PROD",
                              key_map=SqlEdcKeyMap(store))
    receipt = connector.send(tx, odm)               # DeliveryReceipt, or raises TransientDeliveryError
    odm = connector.read_back("CV01", "001-0001")   # the subject's Snapshot in esource's keys, None if unknown

From esource's ODM to Rave's (`to_rave`), rewritten with lxml — not rebuilt with rwslib's builders:
the outbox ODM is already valid ODM 1.3.2 with AuditRecords (pseudonymous SourceID, reason for
change) that must reach Rave unchanged, and the builders would not keep it as is (they write the
FormOID as every ItemGroupOID, drop the environment from a Prod StudyOID and build with
xml.etree). The rewrite changes only what RWS needs:
- StudyOID `CV01` -> `CV01(PROD)` (Rave's `project(environment)` form); ODMVersion "1.3"; AdminData
  dropped (Rave keeps its own users and sites);
- repeat keys -> Rave's integers through the `EdcKeyMap` (persisted, allocated once, stable forever):
  ItemGroupRepeatKey (log lines: test codes such as `SYSBP` in IG.VS/IG.LB, log numbers in IG.MH)
  scoped by ItemGroupOID, StudyEventRepeatKey (added folders: the dates of SE.UNSCHED) scoped by
  StudyEventOID, per subject;
- read-back maps Rave's integers back (`rave:<n>` for a key esource never allocated, e.g. a log line
  site staff added in Rave) and drops FormRepeatKey and the environment from the StudyOID;
- the mdsol extensions RWS needs: `mdsol:Submission="SpecifiedItemsOnly"` on every ItemGroupData
  (otherwise Rave takes the group as the whole record and blanks the fields not sent) and
  `mdsol:SubjectKeyType="SubjectName"` on SubjectData.

No duplicates without an idempotency key: before a POST the subject is read back (the dataset, in
Rave's keys) and the transaction is reduced to what Rave does not hold yet — ItemData whose value
Rave already has are left out, a SubjectData Insert of a subject Rave knows becomes an Update — so a
retry after an ambiguous failure (timeout, dropped connection, an error after Rave committed, a crash
of esource between Rave's commit and its bookkeeping) sends only what is missing, or nothing
(accepted with code "duplicate"; a transaction that carries no data at all, e.g. every item
withheld for a conflict, is accepted with code "empty" without a POST). This costs one GET per POST.
`verify_before_send=False` reads back only after a failure this process saw (cheaper, but a
restarted process may then send an Update twice: Rave records it as a second, identical
transaction). An Insert over a value Rave holds that is not esource's is refused
here (code RAVE_VALUE_EXISTS) instead of overwriting what the site entered. RWS00024 "Subject
already exists." to an Insert means an earlier attempt (or the site) created the subject: the subject
is read back and the transaction is accepted when Rave holds all of it, else the rest is sent as an
Update.

Answers (parsed with rwslib: `RWSPostResponse`, `RWSPostErrorResponse`, `RWSErrorResponse`,
`RWSError`, after esource's hostile-XML check, since rwslib's parser resolves entities):
- 200 `IsTransactionSuccessful="1"` -> accepted, reference = ReferenceNumber, message =
  SuccessStatistics;
- an RWS refusal (`<Response ReasonCode=...>` or an ODM error document) with a 4xx status: validation,
  unknown study/site/subject, a field or form the user may not write (403 RWS00042) -> permanent
  rejection, code = the RWS ReasonCode, message = ErrorClientResponseMessage (and
  ErrorOriginLocation); other 4xx -> permanent with the HTTP status;
- the credentials refused (401, RWS00008 "Incorrect login and password combination", a 403 without an
  RWS reason code: a gateway refusing the account), to a POST or a read-back ->
  `EdcAuthenticationError` (the dispatcher stops sending to Rave: every transaction stays pending);
- 5xx, 408, 429 (Retry-After honoured), timeouts, dropped connections -> TransientDeliveryError
  (`ambiguous=True` when no answer came back).
Credentials (password, the Basic token) never appear in a message or repr.

Transport is httpx (pooled, thread-safe; timeouts and dropped connections told apart, Retry-After
read) rather than rwslib's `RWSConnection` (a new requests Session per call, a timeout surfaced as a
generic RWSException and no access to Retry-After); URLs are still built by rwslib's request classes
(`PostDataRequest`, `SubjectDatasetRequest`, `VersionRequest`), with the same domain rule as
`RWSConnection` (a name without http:// becomes https://{name}.mdsol.com).
"""

from __future__ import annotations

import base64
import copy
import re
import threading
from dataclasses import dataclass
from urllib.parse import quote

import httpx
from lxml import etree
from rwslib.rws_requests import PostDataRequest, SubjectDatasetRequest, VersionRequest, make_url
from rwslib.rwsobjects import RWSError, RWSErrorResponse, RWSPostErrorResponse, RWSPostResponse

from esource.connectors.common import OwnsHttpClient, parse_retry_after, redact
from esource.domain.model import SubjectTransaction
from esource.domain.ports import ConnectorCapabilities, DeliveryReceipt, EdcKeyMap
from esource.errors import IntakeError
from esource.odm.xsd import ODM_NAMESPACES, safe_parse
from esource.services.conflicts import same_value
from esource.services.dispatch import EdcAuthenticationError, TransientDeliveryError

__all__ = ["RaveConnector", "MDSOL_NS", "SUBJECT_ALREADY_EXISTS", "VALUE_EXISTS", "INCORRECT_LOGIN"]

ODM_NS = ODM_NAMESPACES["1.3.2"]
MDSOL_NS = "http://www.mdsol.com/ns/odm/metadata"
_N = "{" + ODM_NS + "}"
_M = "{" + MDSOL_NS + "}"
_XML_DECLARATION = b'<?xml version="1.0" encoding="utf-8"?>\n'
SUBJECT_ALREADY_EXISTS = "RWS00024"
INCORRECT_LOGIN = "RWS00008"
VALUE_EXISTS = "RAVE_VALUE_EXISTS"
_MAX_MESSAGE = 2000
_TRANSIENT_4XX = {408, 425, 429}
_CODE_IN_TEXT = re.compile(r"\[(RWS\d{5})\]")
_UNMAPPED = "rave:"  # read-back repeat keys esource never allocated (e.g. a log line added in Rave)

Path = tuple[str, "str | None", str, str, "str | None", str]


@dataclass(frozen=True, slots=True)
class _Answer:
    """What RWS said: accepted, refused (code + message), or a transient failure."""

    status: int
    ok: bool = False
    transient: bool = False
    rws_code: str | None = None  # the RWS ReasonCode, when the answer carried one
    code: str | None = None
    message: str = ""
    reference: str | None = None
    statistics: str | None = None
    retry_after: float | None = None


class _Refused(Exception):
    def __init__(self, answer: _Answer) -> None:
        super().__init__(answer.message)
        self.answer = answer


@dataclass(slots=True)
class _Plan:
    root: etree._Element
    remaining: int
    refusal: DeliveryReceipt | None = None


class RaveConnector(OwnsHttpClient):
    """`EdcConnector` for Medidata Rave over RWS. Thread-safe (one pooled httpx.Client)."""

    name = "rave"

    def __init__(self, base_url: str, username: str, password: str, *, environment: str = "PROD",
                 key_map: EdcKeyMap, timeout: float = 10.0, client: httpx.Client | None = None,
                 dataset_type: str = "raw", verify_before_send: bool = True,
                 virtual_dir: str = "RaveWebServices") -> None:
        if not base_url.lower().startswith("http"):  # RWSConnection's rule: a Medidata URL name
            base_url = f"https://{base_url}.mdsol.com"
        self.base_url = base_url.rstrip("/")
        self.environment = environment
        self.key_map = key_map
        self.timeout = timeout
        self.dataset_type = dataset_type
        self.verify_before_send = verify_before_send
        self._root_url = make_url(self.base_url, virtual_dir)
        self._use_client(client, timeout)
        self._auth = httpx.BasicAuth(username, password)
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        self._secrets = [s for s in (f"{username}:{password}", token, password) if s]
        self._keys_lock = threading.Lock()
        self._uncertain: set[str] = set()
        self._uncertain_lock = threading.Lock()

    def capabilities(self) -> ConnectorCapabilities:
        return ConnectorCapabilities(self.name, read_back=True, idempotency_key=False, integer_repeat_keys=True)

    def __repr__(self) -> str:
        return f"RaveConnector({self.base_url!r}, environment={self.environment!r})"

    def rave_study_oid(self, study_oid: str) -> str:
        return f"{study_oid}({self.environment})"

    def version(self) -> str:
        """RWS's version (`GET /RaveWebServices/version`, no authentication): a reachability check."""
        try:
            r = self._client.get(self._url(VersionRequest().url_path()), timeout=self.timeout)
        except (httpx.HTTPError, OSError) as exc:
            raise TransientDeliveryError(f"Rave at {self.base_url}: version request failed: "
                                         f"{type(exc).__name__}") from None
        if r.status_code != 200:
            raise TransientDeliveryError(f"Rave at {self.base_url}: version request: HTTP {r.status_code}",
                                         code=str(r.status_code))
        return r.text.strip()

    # ------------------------------------------------------------------------------------ port

    def send(self, transaction: SubjectTransaction, odm: bytes) -> DeliveryReceipt:
        study, subject = transaction.study_oid, transaction.subject_key
        key = f"{study}/{subject}/{transaction.sequence}"
        try:
            rave = self.to_rave(odm, study)
        except (IntakeError, ValueError) as exc:
            return DeliveryReceipt(False, permanent=True, code="ODM",
                                   message=f"the transaction's ODM cannot be sent to Rave: {exc}")
        others = sorted({sd.get("SubjectKey", "") for sd in rave.iter(_N + "SubjectData")} - {subject})
        if others:
            return DeliveryReceipt(False, permanent=True, code="ODM",
                                   message=f"transaction {key} carries data of other subjects ({', '.join(others)}); "
                                           "RWS takes one subject per request")
        original = sum(1 for _ in rave.iter(_N + "ItemData"))
        after_rws00024 = False
        answer: _Answer | None = None
        for _ in range(2):  # a second round only after RWS00024
            body = rave
            if self.verify_before_send or after_rws00024 or self._is_uncertain(key):
                try:
                    snapshot = self._fetch(study, subject)
                except _Refused as refused:
                    return self._rejection(refused.answer)
                plan = self._reduce(rave, snapshot, subject)
                if plan.refusal is not None:
                    return plan.refusal
                if snapshot is not None and plan.remaining == 0:
                    self._settle(key)
                    if original == 0:
                        return DeliveryReceipt(True, code="empty",
                                               message="the transaction carries no data (all withheld): nothing sent")
                    why = ("Rave answered RWS00024 Subject already exists; " if after_rws00024 else "")
                    return DeliveryReceipt(True, code="duplicate",
                                           message=f"{why}the read-back shows Rave holds all {original} item(s) of "
                                                   f"{key} already: nothing sent again")
                body = plan.root
            answer = self._post(body, key)
            if answer.ok:
                self._settle(key)
                return DeliveryReceipt(True, reference=answer.reference, code="200", message=answer.statistics)
            if answer.rws_code == SUBJECT_ALREADY_EXISTS and not after_rws00024:
                after_rws00024 = True  # created by an earlier attempt (or the site): confirm by read-back
                continue
            break
        self._settle(key)
        assert answer is not None
        return self._rejection(answer)

    def read_back(self, study_oid: str, subject_key: str) -> bytes | None:
        """The subject's data as Rave holds it (RWS subject dataset), in esource's keys; None when Rave
        does not know the subject (or the study). Raises TransientDeliveryError when it cannot read."""
        try:
            snapshot = self._fetch(study_oid, subject_key)
        except _Refused as refused:
            a = refused.answer
            raise TransientDeliveryError(f"Rave refused the read-back of {study_oid}/{subject_key}: {a.code}: "
                                         f"{a.message}", code=a.code) from None
        if snapshot is None:
            return None
        return self.to_esource(snapshot, study_oid)

    # ------------------------------------------------------------------------------------ ODM rewriting

    def to_rave(self, odm: bytes, study_oid: str) -> etree._Element:
        """esource's Transactional ODM as Rave's: see the module docstring. Allocates repeat keys."""
        src = safe_parse(odm, "outbox ODM")
        if src.tag != _N + "ODM":
            raise ValueError(f"not ODM 1.3 (root element {src.tag!r})")
        root = etree.Element(_N + "ODM", nsmap={None: ODM_NS, "mdsol": MDSOL_NS})
        for name, value in src.attrib.items():
            root.set(name, value)
        root.set("ODMVersion", "1.3")
        for cd in src.findall(_N + "ClinicalData"):
            if cd.get("StudyOID") != study_oid:
                raise ValueError(f"ClinicalData is for study {cd.get('StudyOID')!r}, the transaction for {study_oid!r}")
            root.append(cd)  # moved first: the mdsol prefix is declared on the new root
            cd.set("StudyOID", self.rave_study_oid(study_oid))
            for sd in cd.findall(_N + "SubjectData"):
                subject = sd.get("SubjectKey", "")
                sd.set(_M + "SubjectKeyType", "SubjectName")
                for se in sd.findall(_N + "StudyEventData"):
                    if se.get("StudyEventRepeatKey") is not None:
                        se.set("StudyEventRepeatKey", str(self._edc_key(study_oid, subject, se.get("StudyEventOID", ""),
                                                                        se.get("StudyEventRepeatKey", ""))))
                    for fd in se.findall(_N + "FormData"):
                        for ig in fd.findall(_N + "ItemGroupData"):
                            if ig.get("ItemGroupRepeatKey") is not None:
                                ig.set("ItemGroupRepeatKey", str(self._edc_key(study_oid, subject,
                                                                               ig.get("ItemGroupOID", ""),
                                                                               ig.get("ItemGroupRepeatKey", ""))))
                            ig.set(_M + "Submission", "SpecifiedItemsOnly")
        return root

    def to_esource(self, snapshot: etree._Element, study_oid: str) -> bytes:
        """A Rave dataset (already parsed safely) in esource's keys: StudyOID without the environment,
        repeat keys mapped back through the key map (`rave:<n>` when esource never allocated it),
        no FormRepeatKey, no mdsol attributes."""
        root = copy.deepcopy(snapshot)
        for el in root.iter():
            if isinstance(el.tag, str):
                for name in [n for n in el.attrib if n.startswith(_M)]:
                    del el.attrib[name]
        for cd in root.iter(_N + "ClinicalData"):
            cd.set("StudyOID", study_oid)
            for sd in cd.iterchildren(_N + "SubjectData"):
                subject = sd.get("SubjectKey", "")
                for se in sd.iterchildren(_N + "StudyEventData"):
                    if se.get("StudyEventRepeatKey") is not None:
                        se.set("StudyEventRepeatKey", self._esource_key(study_oid, subject, se.get("StudyEventOID", ""),
                                                                        se.get("StudyEventRepeatKey", "")))
                    for fd in se.iterchildren(_N + "FormData"):
                        fd.attrib.pop("FormRepeatKey", None)
                        for ig in fd.iterchildren(_N + "ItemGroupData"):
                            if ig.get("ItemGroupRepeatKey") is not None:
                                ig.set("ItemGroupRepeatKey", self._esource_key(study_oid, subject,
                                                                               ig.get("ItemGroupOID", ""),
                                                                               ig.get("ItemGroupRepeatKey", "")))
        etree.cleanup_namespaces(root)
        return _XML_DECLARATION + etree.tostring(root, encoding="UTF-8")

    def _edc_key(self, study: str, subject: str, scope: str, esource_key: str) -> int:
        with self._keys_lock:  # the in-memory key map is not thread-safe by itself
            return int(self.key_map.edc_key(self.name, study, subject, scope, esource_key))

    def _esource_key(self, study: str, subject: str, scope: str, rave_key: str) -> str:
        try:
            n = int(rave_key)
        except ValueError:
            return rave_key
        with self._keys_lock:
            found = self.key_map.esource_key(self.name, study, subject, scope, n)
        return found if found is not None else f"{_UNMAPPED}{n}"

    # ------------------------------------------------------------------------------------ de-duplication

    def _reduce(self, rave: etree._Element, snapshot: etree._Element | None, subject: str) -> _Plan:
        """The transaction minus what Rave holds already (see the module docstring)."""
        plan = copy.deepcopy(rave)
        if snapshot is None:  # Rave does not know the subject: everything goes
            return _Plan(plan, sum(1 for _ in plan.iter(_N + "ItemData")))
        held = _values(snapshot, subject)
        for sd in plan.iter(_N + "SubjectData"):
            if sd.get("TransactionType") == "Insert":
                sd.set("TransactionType", "Update")  # the subject exists: add to it
        for it, path in list(_items(plan)):
            tt = it.get("TransactionType")
            proposed = None if it.get("IsNull") == "Yes" or tt == "Remove" else it.get("Value")
            present = path in held
            current = held.get(path)
            if tt == "Context":
                _remove(it)
            elif proposed is None:
                if not present or current is None:
                    _remove(it)  # nothing to blank
            elif present and same_value(current, proposed):
                _remove(it)  # Rave has it: an earlier attempt was applied, or the site entered the same
            elif tt == "Insert" and present and current is not None:
                shown = "/".join(p if p is not None else "-" for p in path)
                return _Plan(plan, 0, DeliveryReceipt(
                    False, permanent=True, code=VALUE_EXISTS,
                    message=f"Insert of {shown} for subject {subject}: Rave already holds {current!r} (not entered by "
                            f"esource), esource's value is {proposed!r}; nothing sent, the value in Rave is kept"))
        for tag, child in (("ItemGroupData", "ItemData"), ("FormData", "ItemGroupData"),
                           ("StudyEventData", "FormData")):
            for el in list(plan.iter(_N + tag)):
                if next(el.iterchildren(_N + child), None) is None:
                    _remove(el)
        return _Plan(plan, sum(1 for _ in plan.iter(_N + "ItemData")))

    def _is_uncertain(self, key: str) -> bool:
        with self._uncertain_lock:
            return key in self._uncertain

    def _unsure(self, key: str) -> None:
        with self._uncertain_lock:
            self._uncertain.add(key)

    def _settle(self, key: str) -> None:
        with self._uncertain_lock:
            self._uncertain.discard(key)

    # ------------------------------------------------------------------------------------ HTTP

    def _url(self, path: str) -> str:
        return make_url(self._root_url, path)

    def _post(self, root: etree._Element, key: str) -> _Answer:
        body = _XML_DECLARATION + etree.tostring(root, encoding="UTF-8")
        request = PostDataRequest(body)
        headers = {**request.headers, "Accept": "text/xml"}
        try:
            r = self._client.post(self._url(request.url_path()), content=body, headers=headers, auth=self._auth,
                                  timeout=self.timeout)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # never reached Rave
            raise TransientDeliveryError(f"Rave at {self.base_url}: cannot connect for {key} "
                                         f"({type(exc).__name__}): {self._redact(str(exc))}") from None
        except httpx.TimeoutException as exc:
            self._unsure(key)
            raise TransientDeliveryError(
                f"Rave at {self.base_url}: no answer within {self.timeout:g}s for {key} ({type(exc).__name__}); it "
                "may have been applied: the next attempt reads the subject back first", ambiguous=True) from None
        except (httpx.TransportError, OSError) as exc:
            self._unsure(key)
            raise TransientDeliveryError(
                f"Rave at {self.base_url}: {type(exc).__name__}: {self._redact(str(exc)) or 'connection lost'} for "
                f"{key}; it may have been applied: the next attempt reads the subject back first",
                ambiguous=True) from None
        answer = self._answer(r, post=True)
        self._raise_if_auth(answer, f"the POST of {key}")
        if answer.transient:
            self._unsure(key)  # an error page after Rave committed is possible: read back before re-sending
            raise TransientDeliveryError(f"Rave: HTTP {r.status_code} for {key}: {answer.message}",
                                         code=answer.code, retry_after=answer.retry_after)
        return answer

    def _fetch(self, study: str, subject: str) -> etree._Element | None:
        """The subject's dataset (Rave's keys), None when Rave does not know the subject or the study.
        Raises TransientDeliveryError (cannot read now) or _Refused (credentials and the like)."""
        request = SubjectDatasetRequest(quote(study, safe=""), quote(self.environment, safe=""),
                                        quote(subject, safe=""), dataset_type=self.dataset_type)
        try:
            r = self._client.get(self._url(request.url_path()), headers={"Accept": "text/xml"}, auth=self._auth,
                                 timeout=self.timeout)
        except (httpx.HTTPError, OSError) as exc:
            raise TransientDeliveryError(f"Rave at {self.base_url}: read-back of {study}/{subject} failed: "
                                         f"{type(exc).__name__}") from None
        if r.status_code == 200:
            try:
                root = safe_parse(r.content, "Rave subject dataset")
            except IntakeError as exc:
                raise TransientDeliveryError(f"Rave: read-back of {study}/{subject}: {exc}") from None
            if root.tag != _N + "ODM":
                raise TransientDeliveryError(f"Rave: read-back of {study}/{subject} is not ODM 1.3")
            found = any(sd.get("SubjectKey") == subject for sd in root.iter(_N + "SubjectData"))
            return root if found else None
        answer = self._answer(r, post=False)
        if r.status_code == 404 and answer.rws_code is not None:
            return None  # the subject (RWS's not-found answer) or the study (RWS00014: the POST will say so)
        if answer.transient or r.status_code >= 500:
            raise TransientDeliveryError(f"Rave: read-back of {study}/{subject}: HTTP {r.status_code}: "
                                         f"{answer.message}", code=answer.code, retry_after=answer.retry_after)
        self._raise_if_auth(answer, f"the read-back of {study}/{subject}")
        raise _Refused(answer)

    def _raise_if_auth(self, answer: _Answer, what: str) -> None:
        """Credentials refused: not about this transaction, every request would fail the same way."""
        bare_403 = answer.status == 403 and answer.rws_code is None  # a gateway refusing the account
        if answer.status == 401 or answer.rws_code == INCORRECT_LOGIN or bare_403:
            raise EdcAuthenticationError(f"Rave at {self.base_url} refused the credentials for {what}: HTTP "
                                         f"{answer.status} {answer.code}: {answer.message}", status=answer.status,
                                         code=answer.code)

    def _answer(self, r: httpx.Response, *, post: bool) -> _Answer:
        """Read an RWS answer with rwslib's parsers, after esource's hostile-XML check (rwslib's own
        parser resolves entities and allows huge trees)."""
        status = r.status_code
        text = r.content.decode("utf-8-sig", errors="replace").strip()
        code: str | None = None
        message = ""
        if text.startswith("<") and "<html" not in text[:200].lower():
            try:
                root = safe_parse(text.encode("utf-8"), "RWS answer")
            except IntakeError as exc:
                root, message = None, f"unreadable RWS answer: {exc.problem}"
            if root is not None and root.tag == "Response":
                if status == 200 and root.get("IsTransactionSuccessful") == "1":
                    try:
                        ok = RWSPostResponse(text)
                        reference, statistics = ok.referencenumber, ok.root.get("SuccessStatistics")
                    except Exception:  # noqa: BLE001 - rwslib refuses statistics it does not know: still a success
                        reference, statistics = root.get("ReferenceNumber"), root.get("SuccessStatistics")
                    return _Answer(status, ok=True, reference=reference, statistics=statistics)
                err = RWSPostErrorResponse(text) if post else RWSErrorResponse(text)
                code = err.reasoncode
                message = err.errordescription or ""
                if err.root.get("ErrorOriginLocation"):
                    message = f"{message} (ErrorOriginLocation {err.root.get('ErrorOriginLocation')})"
            elif root is not None and etree.QName(root).localname == "ODM":
                message = RWSError(text).errordescription or ""  # "Incorrect login ... [RWS00008]"
                found = _CODE_IN_TEXT.search(message)
                code = found.group(1) if found else None
            elif root is not None:
                message = f"unexpected answer <{etree.QName(root).localname}>"
        else:
            message = re.sub(r"<[^>]+>", " ", text)  # an IIS/proxy page or plain text
        message = self._redact(" ".join(message.split()) or f"HTTP {status} {r.reason_phrase}".strip())[:_MAX_MESSAGE]
        if status == 200 and code is None:  # 200 without an RWS Response (a proxy page?): not known to be applied
            return _Answer(status, transient=True, message=message)
        transient = status >= 500 or status in _TRANSIENT_4XX
        return _Answer(status, transient=transient, rws_code=code, code=code or str(status), message=message,
                       retry_after=parse_retry_after(r.headers.get("retry-after")))

    def _rejection(self, answer: _Answer) -> DeliveryReceipt:
        return DeliveryReceipt(False, permanent=True, code=answer.code or str(answer.status), message=answer.message)

    def _redact(self, text: str) -> str:
        return redact(text, self._secrets)


# ---------------------------------------------------------------------------------------- helpers


def _int_key(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return str(int(value))
    except ValueError:
        return value


def _items(root: etree._Element) -> list[tuple[etree._Element, Path]]:
    """(ItemData, its path in Rave's keys) for every ItemData of the document."""
    out: list[tuple[etree._Element, Path]] = []
    for se in root.iter(_N + "StudyEventData"):
        for fd in se.iterchildren(_N + "FormData"):
            for ig in fd.iterchildren(_N + "ItemGroupData"):
                for it in ig.iterchildren(_N + "ItemData"):
                    out.append((it, (se.get("StudyEventOID", ""), _int_key(se.get("StudyEventRepeatKey")),
                                     fd.get("FormOID", ""), ig.get("ItemGroupOID", ""),
                                     _int_key(ig.get("ItemGroupRepeatKey")), it.get("ItemOID", ""))))
    return out


def _values(snapshot: etree._Element, subject: str) -> dict[Path, str | None]:
    held: dict[Path, str | None] = {}
    for sd in snapshot.iter(_N + "SubjectData"):
        if sd.get("SubjectKey") != subject:
            continue
        for it, path in _items(sd):
            held[path] = None if it.get("IsNull") == "Yes" else it.get("Value")
    return held


def _remove(element: etree._Element) -> None:
    parent = element.getparent()
    if parent is None:
        return
    previous = element.getprevious()
    if previous is not None:
        previous.tail = element.tail
    else:
        parent.text = element.tail
    parent.remove(element)
