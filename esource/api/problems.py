"""Errors of the role-based API as RFC 9457 problem details, chosen by path in one place.

Which shape an error takes depends only on the request path:
- the routes mounted by `esource.api.mount_api` (`/me`, `/studies/{study}/transfers`, `/odm`, audit,
  lineage, reconciliation ...) answer `application/problem+json`: `type`, `title`, `status`, `detail`,
  `instance` (+ `errors` for a request that fails validation, `request_id`);
- everything else keeps its FHIR OperationOutcome: `/fhir...` (FHIR clients expect one) and the
  enrollment endpoints and unknown paths, whose documented contract predates this API.

`install_problem_details(app)` wraps the app's existing exception handlers (HTTPException, request
validation, store errors): an API path gets a problem document, any other path the original handler's
answer. So an `HTTPException` raised by any router (or by `esource.api.auth.require`) renders right.
Details never carry a secret; a validation error names the field, never the input.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any, Awaitable, Callable, Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

__all__ = [
    "PROBLEM_JSON",
    "Problem",
    "ProblemJSONResponse",
    "install_problem_details",
    "problem",
    "problem_responses",
    "register_problem_paths",
    "uses_problem_details",
]

PROBLEM_JSON = "application/problem+json"
_ALWAYS = (re.compile(r"^/me/?$"),)
_STATE_KEY = "problem_path_patterns"


class ProblemJSONResponse(JSONResponse):
    media_type = PROBLEM_JSON


class Problem(BaseModel):
    """RFC 9457 problem details (application/problem+json)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"example": {
        "type": "about:blank", "title": "Forbidden", "status": 403,
        "detail": "cra1 is not assigned to site SITE.002", "instance": "/studies/CV01/transfers"}})

    type: str = Field("about:blank", description="a URI naming the problem type (`about:blank`: the status says it)")
    title: str = Field(description="short summary of the problem type (the HTTP status phrase)")
    status: int = Field(description="the HTTP status code")
    detail: str | None = Field(None, description="what went wrong with this request, in plain language")
    instance: str | None = Field(None, description="the request path")


def problem(status: int, detail: str | None = None, *, instance: str | None = None, type_: str = "about:blank",
            headers: dict[str, str] | None = None, **extra: Any) -> ProblemJSONResponse:
    """One problem details response."""
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body: dict[str, Any] = {"type": type_, "title": title, "status": status}
    if detail:
        body["detail"] = detail
    if instance:
        body["instance"] = instance
    body.update({k: v for k, v in extra.items() if v is not None})
    return ProblemJSONResponse(body, status_code=status, headers=headers)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for error statuses answered as problem details."""
    text = {400: "Bad request", 401: "No, invalid, expired or revoked credentials (WWW-Authenticate: Bearer)",
            403: "The caller lacks the role, or is not allowed on this study or site",
            404: "Unknown study or resource", 422: "Invalid query or path parameters",
            503: "The store cannot answer now"}
    return {s: {"description": text.get(s, HTTPStatus(s).phrase), "model": Problem,
                "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}} for s in statuses}


def register_problem_paths(app: FastAPI, templates: Iterable[str]) -> None:
    """Answer problem details on these route templates (`/studies/{study}/transfers/{id}`), matched
    exactly (a parameter matches one segment, `{x:path}` the rest): a colleague's route under
    `/studies/{study}/subjects/...` does not turn the enrollment endpoints into problem documents."""
    patterns: list[re.Pattern[str]] = list(getattr(app.state, _STATE_KEY, []))
    for template in templates:
        out = []
        for part in template.strip("/").split("/"):
            if part.startswith("{") and part.endswith("}"):
                out.append(".+" if part.endswith(":path}") else "[^/]+")
            else:
                out.append(re.escape(part))
        pattern = re.compile("^/" + "/".join(out) + "/?$")
        if all(p.pattern != pattern.pattern for p in patterns):
            patterns.append(pattern)
    setattr(app.state, _STATE_KEY, patterns)


def uses_problem_details(app: Any, path: str) -> bool:
    """True when errors on `path` are problem details (see the module docstring)."""
    if path.startswith("/fhir"):
        return False
    if any(p.match(path) for p in _ALWAYS):
        return True
    state = getattr(app, "state", None)
    return any(p.match(path) for p in getattr(state, _STATE_KEY, ()) or ())


Handler = Callable[[Request, Exception], Awaitable[Response] | Response]


def install_problem_details(app: FastAPI) -> None:
    """Wrap the app's handlers of HTTPException, RequestValidationError and store errors: problem details
    for API paths, the existing answer (OperationOutcome) elsewhere. Call after those handlers exist."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    from esource.store.errors import StoreError

    for exc_class in (StarletteHTTPException, RequestValidationError, StoreError, OperationalError, InterfaceError):
        original = app.exception_handlers.get(exc_class)
        if getattr(original, "_problem_wrapped", False):
            continue
        app.add_exception_handler(exc_class, _wrap(original))


def _wrap(original: Handler | None) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def handler(request: Request, exc: Exception) -> Response:
        if uses_problem_details(request.app, request.url.path) or original is None:
            return _as_problem(request, exc)
        result = original(request, exc)
        return await result if hasattr(result, "__await__") else result  # type: ignore[return-value]

    handler._problem_wrapped = True  # type: ignore[attr-defined]
    return handler


def _request_id(request: Request) -> str | None:
    rid = getattr(request.state, "request_id", None)
    return rid if isinstance(rid, str) else None


def _as_problem(request: Request, exc: Exception) -> Response:
    path = request.url.path
    rid = _request_id(request)
    if isinstance(exc, RequestValidationError):
        errors = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()))
            errors.append({"loc": loc, "msg": str(err.get("msg", "invalid")).removeprefix("Value error, ")})
        detail = "; ".join(f"{e['loc']}: {e['msg']}" if e["loc"] else e["msg"] for e in errors[:5]) or "invalid request"
        return problem(422, detail, instance=path, errors=errors, request_id=rid)  # never the input values
    if isinstance(exc, StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else None
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"not found: {request.method} {path}"
        elif exc.status_code == 405 and detail == "Method Not Allowed":
            detail = f"method {request.method} is not allowed on {path}"
        return problem(exc.status_code, detail, instance=path, headers=getattr(exc, "headers", None), request_id=rid)
    # store unavailable (the original handlers log it for the OperationOutcome paths; same here)
    import logging

    logging.getLogger("esource.http").error("store unavailable", extra={
        "url": f"{request.method} {path}", "reason": type(exc).__name__})
    return problem(503, "the store cannot answer now; retry later", instance=path, headers={"Retry-After": "5"},
                   request_id=rid)


def error_for_path(app: Any, path: str, status: int, detail: str, *, headers: dict[str, str] | None = None,
                   request_id: str | None = None, fhir: Callable[[], Response]) -> Response:
    """For middlewares (no Request/handler yet): a problem document on API paths, else `fhir()`."""
    if uses_problem_details(app, path):
        return problem(status, detail, instance=path, headers=headers, request_id=request_id)
    return fhir()
