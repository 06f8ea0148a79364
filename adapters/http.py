"""FHIR HTTP inbound adapter and the service's HTTP API (FastAPI). Installed as ``esource.adapters.http``.

    app = create_app(container)          # esource.bootstrap.build(settings)
    run_http(container, host, port)      # `esource serve`

Endpoints
- ``POST /fhir``: one FHIR R4 JSON Bundle (any type) or one resource -> `IngestService`, answered 202
  with an OperationOutcome listing every accepted resource. ``POST /fhir/$process-message``: the same
  for a FHIR message (a Bundle of type ``message`` whose first entry is a MessageHeader), answered 202
  (asynchronous processing).
- ``GET|POST /studies/{study}/subjects``, ``GET|PUT /studies/{study}/subjects/{subject_key}``: enrollment.
- ``GET /health`` (alive), ``GET /ready`` (database, studies, Kafka intake), ``GET /metrics`` (Prometheus).

Intake contract (``/fhir``)
- Media type ``application/fhir+json`` or ``application/json`` (``charset=utf-8`` and ``fhirVersion=4.0``
  parameters allowed), no content coding: anything else is refused with 415 before the body is read
  (nothing is kept: the client is told to send FHIR JSON).
- At most ``http.max_body_bytes``: a larger Content-Length is refused before reading; a body without
  one (chunked) is counted while it streams in and refused as soon as it passes the limit. Either way
  the body is never held beyond the limit; a dead letter records the reason (no payload) and the answer
  is 413.
- Request id: the ``X-Request-ID`` header, else a new UUID. The intake key is ``http:<request id>``; the
  store de-duplicates on it, so a request repeated with the same id is answered 202 again and nothing
  is processed twice.
- Not FHIR at all (not UTF-8, not JSON, no or unknown resourceType, nested too deep ...) -> 400 and a
  dead letter (payload kept inside the hospital for reprocessing).
- A single resource of a type a configured study reads is validated (the elements its map reads, as
  the engine would; the whole resource for types without a list): invalid -> 422 naming the elements,
  and a dead letter; it is not processed. In a Bundle invalid entries do not block the others: the
  Bundle is processed (the engine raises an invalid_source discrepancy for an invalid reading it
  selects) and the 202 answer carries a warning per invalid or unusable entry.
- A patient who is not enrolled is no error: 202 like any other (dropped after matching, only counted).

Everything else
- Every endpoint but /health, /ready and /metrics needs ``Authorization: Bearer <credential>`` (an API
  token, an OIDC JWT, or the bootstrap ``auth_secret``; see esource.api.auth) -> 401 otherwise; in demo
  mode a request without the header acts as the demo admin. Roles (403 otherwise): FHIR intake
  ``system`` or ``admin``; enrollment reads ``data_manager``/``admin`` and CRAs for their sites;
  enrollment writes ``admin``. The role-based API (esource.api) is mounted by ``mount_api``.
- ``/ui/...`` is the web dashboard (esource.web, mounted by ``mount_web``): HTML pages with their own
  login and signed session cookie, so no bearer token there - and never the demo admin; the session's
  principal goes through the same ``require`` as the API. Its errors are HTML pages.
- Every error of /fhir, enrollment and unknown paths — ours, FastAPI's own 404/405/422, an unexpected
  exception (500, no traceback) — is a FHIR OperationOutcome (``application/fhir+json``); the routes of
  esource.api answer RFC 9457 problem details (esource.api.problems decides by path).
- Logs carry method, path, status, duration, request id (as intake key) and reasons without values —
  never a body, a header value, an identifier or an exception text (database errors quote parameters).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
import time
import uuid
from typing import TYPE_CHECKING, Annotated, Any, Awaitable, Callable

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from esource.adapters.fhir_outcome import (
    FHIR_JSON,
    FhirJSONResponse,
    OperationOutcome,
    error_response,
    issue,
    operation_outcome,
    validation_code,
)
from esource import __version__
from esource.api.auth import Authenticator, Principal, Role, ensure_site, get_authenticator, require
from esource.api.problems import error_for_path
from esource.domain.audit import SYSTEM_ACTOR, AuditAction, AuditEvent
from esource.domain.model import Enrollment, SourceResource
from esource.errors import EnrollmentError, EsourceError, IntakeError
from esource.intake.parse import ParsedInput
from esource.intake.validate import ValidationIssue, validate_resource
from esource.services.ingest import Envelope, IntakeResult

if TYPE_CHECKING:
    from esource.bootstrap import Container
    from esource.study.study import Study

__all__ = ["CHANNEL", "PUBLIC_PATHS", "create_app", "run_http"]

log = logging.getLogger("esource.http")

CHANNEL = "http"
PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics"})
SESSION_PREFIX = "/ui/"  # the web dashboard (esource.web): its own session cookie and login, no bearer token
REQUEST_ID_HEADER = "X-Request-ID"
INTAKE_KEY_HEADER = "X-Intake-Key"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/@+=~-]{1,200}")
_MEDIA_TYPES = ("application/fhir+json", "application/json")
_ENROLLMENT_MAX_BYTES = 64 * 1024  # enrollment bodies are tiny
_READY_TIMEOUT_S = 5.0
_DEPTH_STATUSES = ("pending", "failed", "rejected")


# =================================================================================================
# edge middleware: request id, authentication, body limit of the JSON API, no traceback ever
# =================================================================================================


class _BodyTooLarge(HTTPException):
    """Raised from `receive` while FastAPI reads a JSON API body: FastAPI re-raises HTTPExceptions,
    so it ends in the OperationOutcome handler as a 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


class _EdgeMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware: streaming bodies pass through untouched)."""

    def __init__(self, app: Callable[..., Awaitable[None]], *, authenticator: Authenticator,
                 api_max_bytes: int) -> None:
        self.app = app
        self.authenticator = authenticator
        self.api_max_bytes = api_max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = Headers(scope=scope)
        method, path = scope["method"], scope["path"]
        rid = headers.get("x-request-id")
        bad_rid = rid is not None and not _REQUEST_ID.fullmatch(rid)
        if rid is None or bad_rid:
            rid = str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = rid
        state = {"status": 0, "started": False}

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
                out = MutableHeaders(scope=message)
                if REQUEST_ID_HEADER.lower() not in out:
                    out[REQUEST_ID_HEADER] = rid
            await send(message)

        try:
            bearer = path not in PUBLIC_PATHS and not path.startswith(SESSION_PREFIX) and path != SESSION_PREFIX[:-1]
            refusal = await self._authenticate(scope, headers, path, rid) if bearer else None
            refusal = refusal or self._refuse(headers, method, path, bad_rid)
            if refusal is not None:
                await refusal(scope, receive, send_with_id)
                return
            if path.startswith("/studies") and method in ("POST", "PUT", "PATCH"):
                receive = _limited_receive(receive, self.api_max_bytes)
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # the last net: an OperationOutcome, never a traceback (may quote data)
            log.error("unhandled error", extra={"channel": CHANNEL, "url": f"{method} {path}",
                                                "reason": type(exc).__name__, "intake_key": f"{CHANNEL}:{rid}"})
            if not state["started"]:
                text = f"internal error (request {rid}); nothing is lost: retry later, or report the request id"
                await error_for_path(scope.get("app"), path, 500, text, request_id=rid,
                                     fhir=lambda: error_response(500, text))(scope, receive, send_with_id)
        finally:
            log.log(logging.DEBUG if path in PUBLIC_PATHS else logging.INFO,  # probes and scrapes: not noise
                    "http request", extra={"channel": CHANNEL, "url": f"{method} {path}", "status": state["status"],
                                           "intake_key": f"{CHANNEL}:{rid}",  # the request id, as dead letters name it
                                           "duration_ms": round((time.perf_counter() - started) * 1000, 1)})

    async def _authenticate(self, scope: dict[str, Any], headers: Headers, path: str, rid: str) -> Response | None:
        """Who is calling (any valid credential; roles are checked by each route's `require`). The
        principal goes to request.state.principal; the credential itself is never logged or echoed."""
        auth = self.authenticator
        header = headers.get("authorization")
        if not header and auth.open_access:  # demo mode: as before roles existed
            scope["state"]["principal"] = auth.demo_principal()
            return None
        scheme, _, token = (header or "").partition(" ")
        token = token.strip()
        principal = None
        if header and scheme.lower() == "bearer" and token:
            try:
                principal = await run_in_threadpool(auth.authenticate_bearer, token)
            except Exception as exc:  # the store cannot answer: not the client's fault
                log.error("authentication unavailable", extra={"channel": CHANNEL, "reason": type(exc).__name__})
                text = "authentication is unavailable now (the store cannot answer); retry later"
                return error_for_path(scope.get("app"), path, 503, text, headers={"Retry-After": "5"}, request_id=rid,
                                      fhir=lambda: error_response(503, text, code="transient",
                                                                  headers={"Retry-After": "5"}))
        if principal is not None:
            scope["state"]["principal"] = principal
            return None
        if not header:
            text, challenge = "authentication required: send Authorization: Bearer <token>", 'Bearer realm="esource"'
        else:
            text = "the bearer token is not valid (unknown, malformed, expired or revoked)"
            challenge = 'Bearer realm="esource", error="invalid_token"'
        return error_for_path(scope.get("app"), path, 401, text, headers={"WWW-Authenticate": challenge},
                              request_id=rid, fhir=lambda: error_response(401, text, code="login",
                                                                         headers={"WWW-Authenticate": challenge}))

    def _refuse(self, headers: Headers, method: str, path: str, bad_rid: bool) -> Response | None:
        if bad_rid:
            return error_response(400, f"{REQUEST_ID_HEADER} must be 1 to 200 characters of letters, digits and "
                                       "._:/@+=~- (it becomes the intake key)", code="value", expression=REQUEST_ID_HEADER)
        if path.startswith("/studies") and method in ("POST", "PUT", "PATCH"):
            length = _content_length(headers)
            if length is not None and length > self.api_max_bytes:
                return error_response(413, f"request body of {length} bytes exceeds the limit of "
                                           f"{self.api_max_bytes} bytes")
        return None


def _limited_receive(receive: Callable[..., Any], limit: int) -> Callable[..., Any]:
    seen = 0

    async def limited() -> dict[str, Any]:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge(limit)
        return message

    return limited


def _content_length(headers: Headers) -> int | None:
    value = headers.get("content-length")
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        return None
    return n if n >= 0 else None


# =================================================================================================
# /fhir intake
# =================================================================================================


def _media_type_problem(content_type: str | None, content_encoding: str | None) -> str | None:
    if content_encoding and content_encoding.strip().lower() not in ("identity", ""):
        return "content coding is not supported: send the FHIR JSON uncompressed (no Content-Encoding)"
    if not content_type:
        return "no Content-Type: send application/fhir+json (FHIR R4 JSON)"
    media, *params = content_type.split(";")
    media = media.strip().lower()
    shown = content_type if len(content_type) <= 80 else content_type[:77] + "..."
    if media not in _MEDIA_TYPES:
        return f"media type {shown!r} is not supported: send application/fhir+json (FHIR R4 JSON)"
    for param in params:
        name, _, value = param.partition("=")
        name, value = name.strip().lower(), value.strip().strip('"').lower()
        if name == "charset" and value not in ("utf-8", "utf8"):
            return f"charset {value!r} is not supported: FHIR JSON is UTF-8"
        if name == "fhirversion" and not (value == "4.0" or value.startswith("4.0.")):
            return f"fhirVersion {value!r} is not supported: esource reads FHIR R4 (4.0)"
    return None


def _type_elements(container: Container) -> dict[str, frozenset[str] | None]:
    """Per resource type a configured study reads: the elements its maps validate (None: the whole
    resource, for types whose forms list none, e.g. Patient and Medication)."""
    out: dict[str, set[str]] = {}
    for processor in container.processors.values():
        for rt in processor.engine.resource_types:
            out.setdefault(rt, set())
        for form in processor.study.spec.forms.values():
            types = [form.resource] if hasattr(form, "resource") else list(getattr(form, "resources", []))
            for rt in types:
                out.setdefault(rt, set()).update(getattr(form, "validate_elements", []) or [])
    return {rt: (frozenset(els) if els else None) for rt, els in out.items()}


@dataclasses.dataclass
class _Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = dataclasses.field(default_factory=dict)

    def response(self) -> FhirJSONResponse:
        return FhirJSONResponse(self.body, status_code=self.status, headers=self.headers)


def _kept(dead_letter_id: int | None) -> dict[str, Any]:
    return issue("information", "informational",
                 f"the input was kept as dead letter {dead_letter_id} with the reason; it was not processed")


class _Intake:
    """The /fhir use: bytes + envelope -> parse -> (validate) -> IngestService, in a worker thread."""

    def __init__(self, container: Container) -> None:
        self.container = container
        self.ingest = container.ingest
        self.limit = container.settings.http.max_body_bytes
        self.elements = _type_elements(container)

    async def handle(self, request: Request, *, message: bool) -> Response:
        rid: str = request.state.request_id
        path = "/fhir/$process-message" if message else "/fhir"
        env = Envelope(CHANNEL, rid, origin=f"POST {path} ({rid})")
        problem = _media_type_problem(request.headers.get("content-type"), request.headers.get("content-encoding"))
        if problem is not None:  # refused before reading: nothing to keep, the client must resend as FHIR JSON
            return error_response(415, problem, code="not-supported")
        length = _content_length(request.headers)
        if length is not None and length > self.limit:
            return await self._too_large(request, env, f"Content-Length {length} exceeds the limit of {self.limit} bytes",
                                         remaining=length)
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > self.limit:
                    return await self._too_large(request, env, f"more than {self.limit} bytes received: the body "
                                                 f"exceeds the limit of {self.limit} bytes", remaining=None)
        except ClientDisconnect:
            log.warning("client disconnected during the body", extra={"channel": CHANNEL, "intake_key": env.intake_key})
            return error_response(400, "the client disconnected before the whole body was received; nothing was kept",
                                  code="incomplete")
        data = bytes(body)
        del body
        answer = await run_in_threadpool(self._process, data, env, message)
        answer.headers.setdefault(INTAKE_KEY_HEADER, env.intake_key)
        return answer.response()

    async def _too_large(self, request: Request, env: Envelope, why: str, *, remaining: int | None) -> Response:
        exc = IntakeError(env.origin, f"payload refused: {why} (the payload was not kept)")
        try:
            result = await run_in_threadpool(self.ingest.dead_letter, None, env, exc)
        except Exception as err:  # the store is down: still refuse the body
            log.error("could not record a dead letter", extra={"channel": CHANNEL, "reason": type(err).__name__})
            result = None
        await self._drain(request, remaining)
        more = [issue("information", "informational", f"recorded as dead letter {result.dead_letter_id}: the reason "
                      "only, the payload was not read")] if result is not None else []
        return error_response(413, f"{why}; split the input (one patient summary per request)", code="too-long",
                              more=more, headers={INTAKE_KEY_HEADER: env.intake_key})

    async def _drain(self, request: Request, remaining: int | None) -> None:
        """Read and drop what is left of a refused body when it is not much more than the limit, so the
        client (still sending) reads the 413 instead of a reset connection. Never holds the data; a
        body announcing far more than the limit is not read at all."""
        if remaining is not None and remaining > 2 * self.limit:
            return
        budget = 2 * self.limit
        try:
            with anyio.move_on_after(5.0):
                async for chunk in request.stream():
                    budget -= len(chunk)
                    if budget < 0:
                        break
        except (ClientDisconnect, RuntimeError):
            pass

    # ------------------------------------------------------------------ worker thread

    def _process(self, data: bytes, env: Envelope, message: bool) -> _Answer:
        from sqlalchemy.exc import InterfaceError, OperationalError

        from esource.store.errors import StoreConflictError, StoreError

        try:
            return self._process_unsafe(data, env, message)
        except StoreConflictError:  # a concurrent unit of work on the same subject won: nothing was written
            log.warning("store conflict, client to retry", extra={"channel": CHANNEL, "intake_key": env.intake_key})
            return _Answer(503, operation_outcome([issue("error", "transient", "a concurrent update of the same "
                                                         "subject won a race: nothing was kept; retry with the "
                                                         "same X-Request-ID")]), {"Retry-After": "1"})
        except (StoreError, OperationalError, InterfaceError) as exc:  # the database, not the input: not a dead letter
            log.error("store unavailable", extra={"channel": CHANNEL, "intake_key": env.intake_key,
                                                  "reason": type(exc).__name__})
            return _Answer(503, operation_outcome([issue("error", "transient", "the store cannot take the input now: "
                                                         "nothing was kept; retry with the same X-Request-ID")]),
                           {"Retry-After": "5"})

    def _process_unsafe(self, data: bytes, env: Envelope, message: bool) -> _Answer:
        ingest = self.ingest
        try:
            parsed = ingest.parse(data, env)
        except IntakeError as exc:
            dl = ingest.dead_letter(data, env, exc)
            return _Answer(400, operation_outcome([
                issue("error", "structure", f"not FHIR R4 JSON: {_problem_text(exc)}", exc.element), _kept(dl.dead_letter_id)]))
        if message:
            refusal = self._check_message(parsed, data, env)
            if refusal is not None:
                return refusal
        findings = self._validate(parsed)
        single = len(parsed.resources) == 1 and parsed.resources[0].index == -1
        if single and findings:
            res, issues = findings[0]
            # the reason is logged: element paths only, no values and no resource id
            elements = ", ".join(dict.fromkeys(i.element for i in issues[:5])) + (" ..." if len(issues) > 5 else "")
            exc = IntakeError(env.origin, f"invalid FHIR at {elements}", resource=res.resource_type)
            dl = ingest.dead_letter(data, env, exc, parsed=parsed)
            head = issue("error", "invalid", f"{res.label} is not valid FHIR R4 ({len(issues)} issue(s)): refused, "
                         "nothing was processed", [i.element for i in issues])
            out = [issue("error", validation_code(i.message), f"{res.label}: {i.message}", i.element) for i in issues]
            return _Answer(422, operation_outcome([head, *out, _kept(dl.dead_letter_id)]))
        result = ingest.ingest_parsed(parsed, env, data)
        if not result.accepted:
            return self._not_processed(result)
        return _Answer(202, operation_outcome(self._accepted_issues(result, parsed, findings)))

    def _check_message(self, parsed: ParsedInput, data: bytes, env: Envelope) -> _Answer | None:
        first = parsed.resources[0] if parsed.resources else None
        if parsed.bundle_type == "message" and first is not None and first.index == 0 \
                and first.resource_type == "MessageHeader":
            return None
        if parsed.bundle_type != "message":
            what = "a Bundle" if parsed.bundle_type is not None or first is None or first.index >= 0 else first.resource_type
            problem, where = (f"$process-message needs a Bundle of type 'message', got {what}"
                              + (f" of type {parsed.bundle_type!r}" if parsed.bundle_type else "")), "Bundle.type"
        else:
            problem, where = "the first entry of a message Bundle must be a MessageHeader", "Bundle.entry[0].resource"
        dl = self.ingest.dead_letter(data, env, IntakeError(env.origin, problem, element=where), parsed=parsed)
        return _Answer(422, operation_outcome([issue("error", "structure", problem, where), _kept(dl.dead_letter_id)]))

    def _validate(self, parsed: ParsedInput) -> list[tuple[SourceResource, list[ValidationIssue]]]:
        """Resources of the types a configured study reads, validated as the engine validates them
        (results are memoized: the engine's own validation of a selected reading is then a cache hit)."""
        found = []
        for res in parsed.resources:
            if res.resource_type not in self.elements:
                continue
            issues = validate_resource(res.resource, elements=self.elements[res.resource_type])
            if issues:
                found.append((res, issues))
        return found

    def _accepted_issues(self, result: IntakeResult, parsed: ParsedInput,
                         findings: list[tuple[SourceResource, list[ValidationIssue]]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if result.duplicate:
            out.append(issue("information", "duplicate", f"request {result.envelope.key} was already processed "
                             "(same X-Request-ID): nothing was processed again"))
        for p in parsed.problems:
            where = p.resource_label + (f".{p.element}" if p.element else "")
            out.append(issue("warning", "structure", f"{where}: {p.message}; skipped, the rest was accepted", where))
        for res, issues in findings:
            for i in issues:
                out.append(issue("warning", validation_code(i.message),
                                 f"{res.label}: not valid FHIR: {i.message}; accepted with the rest — a study that "
                                 "selects it holds the value with an invalid_source discrepancy", i.element))
        out.extend(issue("information", "informational", f"accepted {label}") for label in result.resource_ids)
        if not result.resource_ids:
            out.append(issue("information", "informational", "accepted: the input holds no resource"))
        return out

    def _not_processed(self, result: IntakeResult) -> _Answer:
        from esource.store.errors import AmbiguousEnrollmentError

        problem = result.problem
        kept = _kept(result.dead_letter_id)
        if isinstance(problem, AmbiguousEnrollmentError):
            return _Answer(422, operation_outcome([issue(
                "error", "multiple-matches", f"study {problem.study_oid}: the patient's identifiers match more than one "
                "enrolled subject; nothing was sent. The enrollment must be corrected, then the dead letter reprocessed"),
                kept]))
        text = str(problem) if isinstance(problem, EsourceError) else "the input could not be processed"
        return _Answer(422, operation_outcome([issue("error", "processing", text), kept]))


def _problem_text(exc: IntakeError) -> str:
    where = ""
    if exc.resource:
        where += exc.resource
    if exc.element:
        where += f" at {exc.element}"
    return f"{where}: {exc.problem}" if where else exc.problem


# =================================================================================================
# API models
# =================================================================================================


def _iso_date(value: Any) -> Any:
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        return value
    raise ValueError("expected a date YYYY-MM-DD")


IsoDate = Annotated[dt.date, BeforeValidator(_iso_date)]


class IdentifierIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {
        "system": "urn:oid:2.16.840.1.113883.3.9143.2.1.5", "value": "CY/GHS-MI-1111"}})

    system: str = Field(min_length=1, max_length=500, description="Identifier.system of the patient in the EHR")
    value: str = Field(min_length=1, max_length=500, description="Identifier.value (kept inside the hospital)")


class SubjectIn(BaseModel):
    """A new subject: matched to EHR patients by identifier system + value only."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {
        "subject_key": "001-0001", "site_oid": "SITE.001",
        "identifiers": [{"system": "urn:oid:2.16.840.1.113883.3.9143.2.1.5", "value": "CY/GHS-MI-1111"}],
        "consent": "2020-03-10", "day1": "2020-04-06", "withdrawn": None}})

    subject_key: str = Field(min_length=1, max_length=100, description="the study's SubjectKey (checked "
                                                                      "against the study's pattern)")
    site_oid: str = Field(min_length=1, max_length=100, description="one of the study's sites")
    identifiers: list[IdentifierIn] = Field(min_length=1, max_length=20)
    consent: IsoDate = Field(description="informed consent date (on or before Day 1)")
    day1: IsoDate = Field(description="Day 1 (first dose): study days count from it, without a Day 0")
    withdrawn: IsoDate | None = Field(None, description="withdrawal date (on or after consent): later data "
                                                        "is not transferred")


class SubjectUpdate(BaseModel):
    """A change to an enrolled subject: only the fields given change (`withdrawn: null` clears a
    withdrawal; `identifiers` replaces the whole list)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {"withdrawn": "2020-09-30"}})

    site_oid: str | None = Field(None, min_length=1, max_length=100)
    identifiers: list[IdentifierIn] | None = Field(None, min_length=1, max_length=20)
    consent: IsoDate | None = None
    day1: IsoDate | None = None
    withdrawn: IsoDate | None = None


class SubjectOut(BaseModel):
    """An enrolled subject. The patient's identifiers are never returned (privacy): only their count."""

    study_oid: str
    subject_key: str
    site_oid: str
    consent: dt.date
    day1: dt.date
    withdrawn: dt.date | None = None
    identifier_count: int


class ReadyOut(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra={"example": {
        "status": "ready", "database": "ok", "studies": ["CV01"], "kafka": "ok"}})

    status: str = Field(description="ready | not ready")
    database: str = Field(description="ok, or why not (no values, only the error type)")
    studies: list[str] = Field(description="the studies loaded (`missing_studies` lists configured ones that are not)")
    kafka: str | None = Field(None, description="ok | not ready; absent when the Kafka intake does not run")
    edc: list[dict[str, Any]] | None = Field(None, description="each EDC endpoint: connector, studies, state "
                                             "(closed = delivering, open = breaker pause, auth_failed), until "
                                             "when; informational, never makes the service unready")


class HealthOut(BaseModel):
    status: str = "ok"


def _subject_out(e: Enrollment) -> SubjectOut:
    return SubjectOut(study_oid=e.study_oid, subject_key=e.subject_key, site_oid=e.site_oid, consent=e.consent_date,
                      day1=e.day1, withdrawn=e.withdrawal_date, identifier_count=len(e.identifiers))


def _enrollment_event(new: Enrollment, old: Enrollment | None, actor: str) -> AuditEvent:
    """ENROLLMENT_CREATED/CHANGED for the audit trail: site and dates (old -> new), and of the patient's
    identifiers only how many there are and whether they changed — never an identifier."""
    fields = {"site_oid": "site_oid", "consent": "consent_date", "day1": "day1", "withdrawn": "withdrawal_date"}

    def text(value: Any) -> str | None:
        return None if value is None else str(value)

    detail: dict[str, Any] = {"identifier_count": len(new.identifiers)}
    if old is None:
        detail.update({name: text(getattr(new, attr)) for name, attr in fields.items()})
        return AuditEvent(AuditAction.ENROLLMENT_CREATED, actor=actor, study_oid=new.study_oid,
                          subject_key=new.subject_key, site_oid=new.site_oid, reason="subject enrolled", detail=detail)
    changed = {name: [text(getattr(old, attr)), text(getattr(new, attr))] for name, attr in fields.items()
               if getattr(old, attr) != getattr(new, attr)}
    detail["changed"] = changed
    detail["identifiers_changed"] = set(old.identifiers) != set(new.identifiers)
    what = sorted(changed) + (["identifiers"] if detail["identifiers_changed"] else [])
    return AuditEvent(AuditAction.ENROLLMENT_CHANGED, actor=actor, study_oid=new.study_oid,
                      subject_key=new.subject_key, site_oid=new.site_oid,
                      reason=f"changed: {', '.join(what)}" if what else "saved unchanged", detail=detail)


def _oo_response(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {FHIR_JSON: {"schema": {"$ref": "#/components/schemas/OperationOutcome"}}}}


_COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    401: _oo_response("No, invalid, expired or revoked `Authorization: Bearer` credential (in demo mode a "
                      "request without one acts as the demo admin)"),
    403: _oo_response("The caller lacks the role (intake: system or admin; enrollment reads: CRA of the "
                      "subject's site, data_manager, admin; enrollment writes: admin), or the study or site"),
    500: _oo_response("Unexpected error (no details; the request id names it in the logs)"),
}

_FHIR_BODY = {
    "requestBody": {
        "required": True,
        "description": "A FHIR R4 JSON Bundle (document, transaction, collection, message, searchset ...) or a "
                       "single resource, at most `http.max_body_bytes`.",
        "content": {
            FHIR_JSON: {"schema": {"type": "object", "required": ["resourceType"],
                                   "properties": {"resourceType": {"type": "string"}}},
                        "example": {"resourceType": "Observation", "id": "wt-1", "status": "final",
                                    "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
                                    "subject": {"identifier": {"system": "http://hospital.example/mrn",
                                                               "value": "MRN-1"}},
                                    "effectiveDateTime": "2024-05-30T09:00:00+02:00",
                                    "valueQuantity": {"value": 78.2, "unit": "kg",
                                                      "system": "http://unitsofmeasure.org", "code": "kg"}}},
            "application/json": {"schema": {"type": "object"}},
        },
    },
    "parameters": [{"name": REQUEST_ID_HEADER, "in": "header", "required": False, "schema": {"type": "string"},
                    "description": "Idempotency key: a request repeated with the same id is processed once "
                                   "(default: a new UUID)."}],
}

_FHIR_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"description": "Accepted: one `information` issue per accepted resource (`accepted Observation/abc`), "
                         "`warning` issues for invalid or unusable Bundle entries; headers `X-Intake-Key`, "
                         "`X-Request-ID`.",
          "headers": {INTAKE_KEY_HEADER: {"schema": {"type": "string"}, "description": "http:<request id>"}}},
    400: _oo_response("Not FHIR R4 JSON at all (not UTF-8, not JSON, no or unknown resourceType, nested too "
                      "deep ...): kept as a dead letter"),
    413: _oo_response("Body over `http.max_body_bytes` (Content-Length or counted while streaming): refused, "
                      "a dead letter records the reason without the payload"),
    415: _oo_response("Not application/fhir+json or application/json (UTF-8, FHIR 4.0), or compressed: "
                      "refused before reading, nothing kept"),
    422: _oo_response("A single resource that is not valid FHIR (issues name the elements), or a patient "
                      "matching several subjects: kept as a dead letter, not processed"),
    503: _oo_response("The store is not reachable or a concurrent update won: retry with the same X-Request-ID"),
    **_COMMON_ERRORS,
}

_DESCRIPTION = """\
esource moves hospital care data into clinical-trial eCRFs: FHIR R4 patient summaries in, CDISC ODM
transactions out to the EDC, per study map.

* **FHIR intake** — `POST /fhir` and `POST /fhir/$process-message`: answered 202 with an OperationOutcome;
  processing (matching, mapping, outbox) happens in the request's worker thread before the answer, delivery
  to the EDC later from the outbox.
* **Enrollment** — who is in which study, matched by identifier system + value. Identifiers go in, never
  come out.
* **Operations** — `/health`, `/ready`, `/metrics` (Prometheus).

* **Role-based API** — `/me`, transfers, the ODM ClinicalData pull, audit, lineage, reconciliation: for CRAs
  (their sites), data managers, admins and EDC service accounts (one study).

Errors of FHIR intake and enrollment are FHIR **OperationOutcome**s (`application/fhir+json`); errors of the
role-based API are RFC 9457 **problem details** (`application/problem+json`). Every endpoint but `/health`,
`/ready` and `/metrics` needs `Authorization: Bearer <token>`: an API token (`esource users token`), an OIDC
JWT of the configured issuer, or the bootstrap secret. Roles: `cra` ⊂ `data_manager` ⊂ `admin` (read
rights), `edc` (ODM pull of its study), `system` (FHIR intake).
"""


# =================================================================================================
# the app
# =================================================================================================


def create_app(container: Container) -> FastAPI:
    """The HTTP API over one Container (see the module docstring)."""
    settings = container.settings
    app = FastAPI(
        title="esource",
        version=__version__,
        description=_DESCRIPTION,
        openapi_tags=[
            {"name": "FHIR intake", "description": "FHIR R4 patient-summary updates in"},
            {"name": "enrollment", "description": "Subjects of a study, matched to EHR patients by identifier"},
            {"name": "operations", "description": "Liveness, readiness and metrics (no authentication)"},
        ],
    )
    app.state.container = container
    intake = _Intake(container)

    # ------------------------------------------------------------------ errors -> OperationOutcome

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"not found: {request.method} {request.url.path}"
        elif exc.status_code == 405 and detail == "Method Not Allowed":
            detail = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, detail, headers=getattr(exc, "headers", None))

    async def _store_error(request: Request, exc: Exception) -> Response:
        log.error("store unavailable", extra={"channel": CHANNEL, "url": f"{request.method} {request.url.path}",
                                              "reason": type(exc).__name__})
        return error_response(503, "the store cannot answer now; retry later", code="transient",
                              headers={"Retry-After": "5"})

    from sqlalchemy.exc import InterfaceError, OperationalError

    from esource.store.errors import StoreError

    for _exc in (StoreError, OperationalError, InterfaceError):
        app.add_exception_handler(_exc, _store_error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        issues = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ())]
            where = ".".join(loc)
            etype = str(err.get("type", ""))
            code = "required" if etype == "missing" else "structure" if etype in ("extra_forbidden", "json_invalid") \
                else "value"
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            issues.append(issue("error", code, f"{where}: {msg}" if where else msg, where or None))  # never the input
        return FhirJSONResponse(operation_outcome(issues), status_code=422)

    # ------------------------------------------------------------------ FHIR intake

    intake_role = [Depends(require(Role.SYSTEM, Role.ADMIN))]  # before the body is read (no body parameter)

    @app.post("/fhir", tags=["FHIR intake"], status_code=202, response_class=FhirJSONResponse,
              response_model=OperationOutcome, responses=_FHIR_RESPONSES, openapi_extra=_FHIR_BODY,
              dependencies=intake_role,
              summary="Receive a FHIR R4 Bundle or resource",
              description="Parse, match to enrolled subjects, map per study, and queue the ODM transactions. "
                          "A Bundle of any type or a single resource. Invalid Bundle entries do not block the "
                          "others (warnings in the answer, discrepancies in the study); an invalid single "
                          "resource is refused (422). A patient who is not enrolled is no error: 202, dropped "
                          "after matching, only counted. The same `X-Request-ID` twice is processed once.")
    async def post_fhir(request: Request) -> Response:
        return await intake.handle(request, message=False)

    @app.post("/fhir/$process-message", tags=["FHIR intake"], status_code=202, response_class=FhirJSONResponse,
              response_model=OperationOutcome, responses=_FHIR_RESPONSES, openapi_extra=_FHIR_BODY,
              dependencies=intake_role,
              summary="FHIR messaging: process a message Bundle",
              description="The body must be a Bundle of type `message` whose first entry is a MessageHeader "
                          "(else 422, kept as a dead letter). Processed like `POST /fhir`; answered 202 "
                          "(asynchronous processing) with an OperationOutcome.")
    async def process_message(request: Request) -> Response:
        return await intake.handle(request, message=True)

    # ------------------------------------------------------------------ enrollment

    def study_of(study: str) -> Study:
        found = container.studies.get(study)
        if found is None:
            raise HTTPException(404, f"no study {study!r} is configured ({', '.join(sorted(container.studies))})")
        return found

    def checked(study: Study, subject_key: str, site_oid: str, identifiers: tuple[tuple[str, str], ...],
                consent: dt.date, day1: dt.date, withdrawn: dt.date | None) -> Enrollment:
        from esource.services.dry_run import validate_enrollment

        e = Enrollment(study.oid, subject_key, site_oid, identifiers, consent, day1, withdrawn)
        try:
            return validate_enrollment(study, e)
        except EnrollmentError as exc:
            raise HTTPException(422, str(exc)) from None

    def save(enrollment: Enrollment, *, create: bool, actor: str = SYSTEM_ACTOR) -> Enrollment:
        from sqlalchemy.exc import IntegrityError

        with container.store.uow() as uow:
            existing = _find_subject(uow, enrollment.study_oid, enrollment.subject_key)
            if create and existing is not None:
                raise HTTPException(409, f"subject {enrollment.subject_key} is already enrolled in "
                                         f"{enrollment.study_oid}: use PUT to change it")
            if not create and existing is None:
                raise HTTPException(404, f"no subject {enrollment.subject_key} in {enrollment.study_oid}")
            try:
                uow.add_enrollment(enrollment)
                uow.audit(_enrollment_event(enrollment, existing, actor))
                uow.commit()
            except EnrollmentError as exc:  # an identifier already enrolled for another subject
                raise HTTPException(409, str(exc)) from None
            except IntegrityError:  # a concurrent enrollment of the same subject
                raise HTTPException(409, f"subject {enrollment.subject_key} was enrolled concurrently") from None
        log.info("enrollment saved", extra={"study": enrollment.study_oid, "subject_key": enrollment.subject_key,
                                            "kind": "create" if create else "update"})
        return enrollment

    @app.get("/studies/{study}/subjects", tags=["enrollment"], response_model=list[SubjectOut],
             responses={404: _oo_response("Unknown study"), **_COMMON_ERRORS},
             summary="List the enrolled subjects of a study",
             description="SubjectKey, site, consent, Day 1 and withdrawal of every subject. **The patients' "
                         "identifiers are never returned** (privacy: they stay inside esource); "
                         "`identifier_count` says how many are on file.")
    def list_subjects(study: str, who: Principal = Depends(require(Role.CRA))) -> list[SubjectOut]:
        s = study_of(study)
        with container.store.uow(read_only=True) as uow:
            return [_subject_out(e) for e in uow.enrollments(s.oid) if who.can_see_site(e.site_oid)]

    @app.get("/studies/{study}/subjects/{subject_key}", tags=["enrollment"], response_model=SubjectOut,
             responses={404: _oo_response("Unknown study or subject"), **_COMMON_ERRORS},
             summary="One enrolled subject", description="As in the list: identifiers are never returned.")
    def get_subject(study: str, subject_key: str, who: Principal = Depends(require(Role.CRA))) -> SubjectOut:
        s = study_of(study)
        with container.store.uow(read_only=True) as uow:
            e = _find_subject(uow, s.oid, subject_key)
        if e is None:
            raise HTTPException(404, f"no subject {subject_key} in {s.oid}")
        ensure_site(who, e.site_oid)
        return _subject_out(e)

    @app.post("/studies/{study}/subjects", tags=["enrollment"], status_code=201, response_model=SubjectOut,
              responses={404: _oo_response("Unknown study"),
                         409: _oo_response("SubjectKey already enrolled, or an identifier already enrolled for "
                                           "another subject"),
                         413: _oo_response("Body too large"),
                         422: _oo_response("Not valid for the study: SubjectKey pattern, site, consent after "
                                           "Day 1, withdrawal before consent, missing or unknown fields"),
                         **_COMMON_ERRORS},
              summary="Enroll a subject",
              description="Checked against the study (SubjectKey pattern, site among the study's sites, consent "
                          "on or before Day 1, withdrawal on or after consent). From now on FHIR input about a "
                          "patient with one of these identifiers is mapped for this subject. The answer does not "
                          "echo the identifiers.")
    def create_subject(study: str, body: SubjectIn, request: Request,
                       who: Principal = Depends(require(Role.ADMIN))) -> Response:
        s = study_of(study)
        idents = tuple(dict.fromkeys((i.system, i.value) for i in body.identifiers))
        e = save(checked(s, body.subject_key, body.site_oid, idents, body.consent, body.day1, body.withdrawn), create=True,
                 actor=who.actor)
        return JSONResponse(_subject_out(e).model_dump(mode="json"), status_code=201,
                            headers={"Location": f"/studies/{s.oid}/subjects/{e.subject_key}"})

    @app.put("/studies/{study}/subjects/{subject_key}", tags=["enrollment"], response_model=SubjectOut,
             responses={404: _oo_response("Unknown study or subject"),
                        409: _oo_response("An identifier already enrolled for another subject"),
                        413: _oo_response("Body too large"),
                        422: _oo_response("Not valid for the study (see POST)"), **_COMMON_ERRORS},
             summary="Change an enrolled subject (e.g. record a withdrawal)",
             description="Only the fields given change; `withdrawn: null` clears a withdrawal, `identifiers` "
                         "replaces the list. A withdrawal stops the transfer of data dated after it. A change of "
                         "Day 1, consent or withdrawal date re-maps the subject's stored data at once.")
    def update_subject(study: str, subject_key: str, body: SubjectUpdate,
                       who: Principal = Depends(require(Role.ADMIN))) -> SubjectOut:
        s = study_of(study)
        with container.store.uow(read_only=True) as uow:
            current = _find_subject(uow, s.oid, subject_key)
        if current is None:
            raise HTTPException(404, f"no subject {subject_key} in {s.oid}")
        given = body.model_fields_set
        for name in ("site_oid", "identifiers", "consent", "day1"):
            if name in given and getattr(body, name) is None:
                raise HTTPException(422, f"{name} cannot be null")
        idents = (tuple(dict.fromkeys((i.system, i.value) for i in body.identifiers))
                  if body.identifiers is not None else current.identifiers)
        e = checked(s, subject_key, body.site_oid or current.site_oid, idents, body.consent or current.consent_date,
                    body.day1 or current.day1, body.withdrawn if "withdrawn" in given else current.withdrawal_date)
        saved = save(e, create=False, actor=who.actor)
        moved = [name for name, old, new in (("Day 1", current.day1, saved.day1),
                                             ("consent date", current.consent_date, saved.consent_date),
                                             ("withdrawal date", current.withdrawal_date, saved.withdrawal_date))
                 if old != new]
        processor = container.processors.get(s.oid)
        if moved and processor is not None:
            # the dates place every reading in its visit: re-map the subject's stored facts at once
            processor.remap([subject_key], actor=who.actor, reason=f"enrollment changed: {', '.join(moved)}")
        return _subject_out(saved)

    # ------------------------------------------------------------------ operations

    @app.get("/health", tags=["operations"], response_model=HealthOut, summary="Liveness",
             description="200 while the process serves requests. No authentication, no dependency checked.")
    async def health() -> HealthOut:
        return HealthOut()

    @app.get("/ready", tags=["operations"], response_model=ReadyOut,
             responses={503: {"model": ReadyOut, "description": "Not ready: the fields say what is not"}},
             summary="Readiness",
             description="200 when the database answers a trivial query, every configured study is loaded and, "
                         "when the Kafka intake runs, it is ready; else 503 naming what is not. No authentication.")
    async def ready() -> JSONResponse:
        checks: dict[str, Any] = {"database": "ok", "studies": sorted(container.studies)}
        ok = True
        try:
            with anyio.fail_after(_READY_TIMEOUT_S):
                await run_in_threadpool(_ping, container)
        except TimeoutError:
            checks["database"], ok = f"no answer within {_READY_TIMEOUT_S:g} s", False
        except Exception as exc:
            checks["database"], ok = f"unreachable ({type(exc).__name__})", False
        missing = [s for s in settings.studies if s not in container.studies]
        if missing:
            checks["missing_studies"] = missing
        if missing or not container.studies:
            ok = False
        kafka = container.extras.get("kafka")
        probe = getattr(kafka, "ready", None) if kafka is not None else None
        if callable(probe):
            try:
                kafka_ok = bool(await run_in_threadpool(probe))
            except Exception as exc:
                kafka_ok = False
                log.warning("kafka readiness probe failed", extra={"reason": type(exc).__name__})
            checks["kafka"] = "ok" if kafka_ok else "not ready"
            ok = ok and kafka_ok
        states = getattr(container.dispatcher, "endpoint_states", None)
        if callable(states):
            # informational: intake goes on while an EDC is down (transactions wait in the outbox), so
            # an EDC's state never makes the service unready; the vendor's message stays in the logs
            checks["edc"] = [{k: e.get(k) for k in ("connector", "studies", "state", "until")} for e in states()]
        return JSONResponse({"status": "ready" if ok else "not ready", **checks}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["operations"], response_class=Response, summary="Prometheus metrics",
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition"}},
             description="Messages, resources, items mapped, discrepancies, dead letters, resources of patients "
                         "not enrolled (`esource_resources_not_enrolled_total`), outbox depth (refreshed from "
                         "the store on each scrape), deliveries. No authentication.")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        try:
            await run_in_threadpool(_refresh_outbox_depth, container)
        except Exception as exc:  # still serve the other metrics
            log.warning("outbox depth not refreshed", extra={"reason": type(exc).__name__})
        return Response(container.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    if settings.mode != "demo" and settings.auth_secret is None:  # Settings refuses this already
        raise ValueError("an auth secret is required outside demo mode")
    from esource.api import mount_api

    mount_api(app, container)  # the role-based API; problem details on its routes
    from esource.web import mount_web

    mount_web(app, container)  # the dashboard under /ui (session cookie; the API's roles)
    app.add_middleware(_EdgeMiddleware, authenticator=get_authenticator(container),  # type: ignore[arg-type]
                       api_max_bytes=min(settings.http.max_body_bytes, _ENROLLMENT_MAX_BYTES))
    return app


def _find_subject(uow: Any, study_oid: str, subject_key: str) -> Enrollment | None:
    for e in uow.enrollments(study_oid):
        if e.subject_key == subject_key:
            return e
    return None


def _ping(container: Container) -> None:
    with container.store.uow(read_only=True) as uow:
        ping = getattr(uow, "ping", None)
        if callable(ping):
            ping()
        else:
            from sqlalchemy import text

            uow.session.execute(text("SELECT 1")).scalar()


def _refresh_outbox_depth(container: Container) -> None:
    with container.store.uow(read_only=True) as uow:
        counts = getattr(uow, "outbox_counts", None)
        if callable(counts):
            by_status = dict(counts())
        else:
            from sqlalchemy import func, select

            from esource.store.schema import OutboxRow

            t = OutboxRow.__table__
            by_status = dict(uow.session.execute(  # type: ignore[arg-type]
                select(t.c.status, func.count()).where(t.c.status.in_(_DEPTH_STATUSES)).group_by(t.c.status)).all())
    for status in _DEPTH_STATUSES:
        container.metrics.outbox_depth.labels(status).set(by_status.get(status, 0))


def run_http(container: Container, host: str, port: int, **uvicorn_options: Any) -> None:
    """Serve `create_app(container)` with uvicorn until SIGINT/SIGTERM (`esource serve`). Logging stays
    as configured (`configure_logging`); uvicorn's access log is off (the app logs each request without
    query strings or headers)."""
    import uvicorn

    options: dict[str, Any] = {"log_config": None, "access_log": False, "server_header": False,
                               "proxy_headers": False, "log_level": container.settings.log.level.lower()}
    options.update(uvicorn_options)
    config = uvicorn.Config(create_app(container), host=host, port=port, **options)
    uvicorn.Server(config).run()
