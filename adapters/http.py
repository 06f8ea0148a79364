"""FHIR HTTP intake and operations API (FastAPI).

`POST /fhir` and `POST /fhir/$process-message` feed the same use case as Kafka and files. Every error is
a FHIR OperationOutcome. Bodies are read with a size limit while streaming (413 before the limit is
exceeded in memory); input that is not FHIR becomes a dead letter (payload kept) and a 400; an invalid
single resource a 422 naming the element. A patient who is not enrolled is not an error: 202, dropped
after matching, only counted.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import uuid
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from esource import __version__
from esource.domain.model import Enrollment
from esource.errors import EnrollmentError, EsourceError, IntakeError
from esource.intake.validate import validate_resource
from esource.services.ingest import Envelope

log = logging.getLogger("esource.http")

FHIR_JSON = "application/fhir+json"
_ACCEPTED_MEDIA = {"application/fhir+json", "application/json"}


# ---------------------------------------------------------------------- OperationOutcome


def issue(severity: str, code: str, diagnostics: str, expression: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        out["expression"] = [expression]
    return out


def outcome(status: int, issues: list[dict[str, Any]], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"resourceType": "OperationOutcome", "issue": issues}, status_code=status,
                        media_type=FHIR_JSON, headers=headers)


class ApiError(Exception):
    """An error answered as an OperationOutcome."""

    def __init__(self, status: int, code: str, diagnostics: str, expression: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(diagnostics)
        self.status, self.code, self.diagnostics, self.expression, self.headers = (
            status, code, diagnostics, expression, headers)


class _TooLarge(Exception):
    def __init__(self, size: int, declared: bool) -> None:
        self.size, self.declared = size, declared


async def read_limited(request: Request, limit: int) -> bytes:
    """The body, refusing more than `limit` bytes (Content-Length first, then while streaming)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise _TooLarge(int(declared), True)
        except ValueError:
            raise ApiError(400, "invalid", "Content-Length is not a number") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge(size, False)
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------- API models


class IdentifierIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    system: str = Field(min_length=1, description="identifier system (e.g. urn:oid:1.2.250.1.213.1.4.8 for the INS)")
    value: str = Field(min_length=1)


class EnrollmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subject_key: str = Field(min_length=1, examples=["001-0007"])
    site_oid: str = Field(min_length=1, examples=["SITE.001"])
    identifiers: list[IdentifierIn] = Field(min_length=1, description="EHR Patient.identifier system + value")
    consent: dt.date
    day1: dt.date
    withdrawn: dt.date | None = None


class EnrollmentUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    site_oid: str | None = None
    identifiers: list[IdentifierIn] | None = None
    consent: dt.date | None = None
    day1: dt.date | None = None
    withdrawn: dt.date | None = None


class EnrollmentOut(BaseModel):
    study_oid: str
    subject_key: str
    site_oid: str
    consent: dt.date
    day1: dt.date
    withdrawn: dt.date | None
    identifier_count: int = Field(description="how many identifiers match this subject (their values are "
                                              "identifying and never returned)")

    @classmethod
    def of(cls, e: Enrollment) -> "EnrollmentOut":
        return cls(study_oid=e.study_oid, subject_key=e.subject_key, site_oid=e.site_oid, consent=e.consent_date,
                   day1=e.day1, withdrawn=e.withdrawal_date, identifier_count=len(e.identifiers))


# ---------------------------------------------------------------------- the app


def create_app(container: Any) -> FastAPI:
    settings = container.settings
    app = FastAPI(
        title="esource", version=__version__,
        description="FHIR patient-summary intake, study enrollment and operations. Errors are FHIR "
                    "OperationOutcome resources. Outside demo mode every endpoint but /health, /ready and "
                    "/metrics needs `Authorization: Bearer <token>`.",
    )
    read_types: frozenset[str] = frozenset().union(*(p.engine.resource_types for p in container.processors.values())) \
        if container.processors else frozenset()
    secret = settings.auth_secret.get_secret_value().encode() if settings.auth_secret else None

    def require_auth(request: Request) -> None:
        if settings.mode == "demo":
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secret or not hmac.compare_digest(token.strip().encode(), secret):
            raise ApiError(401, "login", "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})

    # -- errors: always an OperationOutcome ----------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return outcome(exc.status, [issue("error", exc.code, exc.diagnostics, exc.expression)], exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not-found", 405: "not-supported", 401: "login", 403: "forbidden"}.get(exc.status_code, "processing")
        return outcome(exc.status_code, [issue("error", code, str(exc.detail))])

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        issues = [issue("error", "invalid", e.get("msg", "invalid"), ".".join(str(p) for p in e.get("loc", ())))
                  for e in exc.errors()]
        return outcome(422, issues)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error", exc_info=exc)
        return outcome(500, [issue("fatal", "exception", f"internal error ({type(exc).__name__}); see the server log")])

    # -- FHIR intake -----------------------------------------------------------------------------
    async def intake(request: Request, *, message: bool) -> JSONResponse:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media not in _ACCEPTED_MEDIA:
            raise ApiError(415, "not-supported", f"media type {media or '(none)'!r} is not accepted: send "
                           f"application/fhir+json")
        request_id = request.headers.get("x-request-id") or str(uuid.uuid4())
        path = "/fhir/$process-message" if message else "/fhir"
        env = Envelope("http", request_id, origin=f"POST {path} ({request_id})")
        headers = {"X-Request-ID": request_id, "X-Intake-Key": env.intake_key}
        limit = settings.http.max_body_bytes
        try:
            body = await read_limited(request, limit)
        except _TooLarge as exc:
            reason = (f"payload of {'declared ' if exc.declared else 'at least '}{exc.size} bytes exceeds the "
                      f"limit of {limit} bytes")
            await run_in_threadpool(container.ingest.dead_letter, b"", env, IntakeError(env.origin, reason))
            raise ApiError(413, "too-costly", reason, headers=headers) from None
        try:
            parsed = await run_in_threadpool(container.ingest.parse, body, env)
        except IntakeError as exc:
            await run_in_threadpool(container.ingest.dead_letter, body, env, exc)
            raise ApiError(400, "structure", str(exc), exc.element, headers=headers) from None
        if message:
            first = parsed.resources[0] if parsed.resources else None
            if parsed.bundle_type != "message" or first is None or first.resource_type != "MessageHeader":
                exc = IntakeError(env.origin, "$process-message needs a Bundle of type message whose first entry "
                                  "is a MessageHeader")
                await run_in_threadpool(container.ingest.dead_letter, body, env, exc)
                raise ApiError(422, "invalid", str(exc), "Bundle.type", headers=headers)
        warnings: list[dict[str, Any]] = []
        if parsed.bundle_type is None and parsed.resources:
            res = parsed.resources[0]
            if res.resource_type in read_types:
                problems = await run_in_threadpool(validate_resource, res.resource)
                if problems:
                    first = problems[0]
                    exc = IntakeError(env.origin, f"invalid FHIR: {first.element}: {first.message}",
                                      resource=res.label, element=first.element)
                    await run_in_threadpool(container.ingest.dead_letter, body, env, exc)
                    return outcome(422, [issue("error", "invalid", f"{p.element}: {p.message}", p.element)
                                         for p in problems], headers)
        for p in parsed.problems:
            warnings.append(issue("warning", "invalid", str(p), getattr(p, "element", None)))
        result = await run_in_threadpool(container.ingest.ingest_parsed, parsed, env, body)
        if not result.accepted:
            raise ApiError(422, "processing", result.error or "the message could not be processed", headers=headers)
        issues = [issue("information", "informational", f"accepted {r.label}") for r in parsed.resources]
        if result.duplicate:
            issues.insert(0, issue("information", "duplicate", f"request {request_id} was already processed"))
        return outcome(202, issues + warnings, headers)

    @app.post("/fhir", status_code=202, summary="Submit a FHIR Bundle or a single resource",
              description="A Bundle (document, transaction, collection, message, searchset ...) or one resource. "
                          "Answers 202 with an OperationOutcome listing the accepted resources. A repeated "
                          "X-Request-ID is idempotent.", dependencies=[Depends(require_auth)],
              responses={400: {"description": "not FHIR"}, 413: {"description": "body too large"},
                         415: {"description": "wrong media type"}, 422: {"description": "invalid FHIR"}})
    async def post_fhir(request: Request) -> JSONResponse:
        return await intake(request, message=False)

    @app.post("/fhir/$process-message", status_code=202, summary="FHIR messaging: process a message Bundle",
              dependencies=[Depends(require_auth)])
    async def process_message(request: Request) -> JSONResponse:
        return await intake(request, message=True)

    # -- enrollment ------------------------------------------------------------------------------
    def study_of(study: str) -> Any:
        s = container.studies.get(study)
        if s is None:
            raise ApiError(404, "not-found", f"study {study!r} is not configured")
        return s

    def save(enrollment: Enrollment, *, create: bool) -> None:
        from esource.services.dry_run import validate_enrollment

        st = study_of(enrollment.study_oid)
        try:
            validate_enrollment(st, enrollment)
        except EnrollmentError as exc:
            raise ApiError(422, "invariant", str(exc)) from None
        with container.store.uow() as uow:
            existing = {e.subject_key for e in uow.enrollments(st.oid)}
            if create and enrollment.subject_key in existing:
                raise ApiError(409, "duplicate", f"{enrollment.subject_key} is already enrolled: use PUT to change it")
            if not create and enrollment.subject_key not in existing:
                raise ApiError(404, "not-found", f"{enrollment.subject_key} is not enrolled in {st.oid}")
            try:
                uow.add_enrollment(enrollment)
            except EnrollmentError as exc:
                raise ApiError(409, "conflict", str(exc)) from None
            uow.commit()

    @app.get("/studies/{study}/subjects", response_model=list[EnrollmentOut], summary="Enrolled subjects",
             description="Identifiers are never returned (privacy): only how many a subject has.",
             dependencies=[Depends(require_auth)])
    def list_subjects(study: str) -> list[EnrollmentOut]:
        st = study_of(study)
        with container.store.uow(read_only=True) as uow:
            return [EnrollmentOut.of(e) for e in uow.enrollments(st.oid)]

    @app.post("/studies/{study}/subjects", response_model=EnrollmentOut, status_code=201, summary="Enroll a subject",
              dependencies=[Depends(require_auth)])
    def enroll_subject(study: str, body: EnrollmentIn) -> EnrollmentOut:
        e = Enrollment(study, body.subject_key, body.site_oid, tuple((i.system, i.value) for i in body.identifiers),
                       body.consent, body.day1, body.withdrawn)
        save(e, create=True)
        return EnrollmentOut.of(e)

    @app.put("/studies/{study}/subjects/{subject_key}", response_model=EnrollmentOut,
             summary="Change an enrollment (e.g. a withdrawal date: later data is no longer transferred)",
             dependencies=[Depends(require_auth)])
    def update_subject(study: str, subject_key: str, body: EnrollmentUpdate) -> EnrollmentOut:
        st = study_of(study)
        with container.store.uow(read_only=True) as uow:
            current = next((e for e in uow.enrollments(st.oid) if e.subject_key == subject_key), None)
        if current is None:
            raise ApiError(404, "not-found", f"{subject_key} is not enrolled in {st.oid}")
        e = Enrollment(
            st.oid, subject_key, body.site_oid or current.site_oid,
            tuple((i.system, i.value) for i in body.identifiers) if body.identifiers else current.identifiers,
            body.consent or current.consent_date, body.day1 or current.day1,
            body.withdrawn if "withdrawn" in body.model_fields_set else current.withdrawal_date)
        save(e, create=False)
        return EnrollmentOut.of(e)

    # -- operations ------------------------------------------------------------------------------
    @app.get("/health", summary="Liveness")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: database reachable, studies loaded, Kafka consumer assigned")
    def ready() -> JSONResponse:
        checks: dict[str, Any] = {"studies": sorted(container.studies)}
        ok = bool(container.studies)
        try:
            with container.store.uow(read_only=True) as uow:
                uow.ping()
            checks["database"] = "ok"
        except Exception as exc:  # the answer must say why, not fail
            checks["database"] = f"unavailable: {type(exc).__name__}"
            ok = False
        kafka = container.extras.get("kafka")
        if kafka is not None and hasattr(kafka, "ready"):
            checks["kafka"] = "ok" if kafka.ready() else "not ready"
            ok = ok and kafka.ready()
        return JSONResponse({"status": "ready" if ok else "not ready", **checks}, status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def metrics() -> Response:
        try:
            with container.store.uow(read_only=True) as uow:
                counts = uow.outbox_counts()
            for status in ("pending", "failed", "rejected"):
                container.metrics.outbox_depth.labels(status).set(counts.get(status, 0))
        except EsourceError:
            pass
        return Response(container.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def run_http(container: Any, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(create_app(container), host=host, port=port, log_level="warning", access_log=False)
