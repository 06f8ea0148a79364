"""FHIR R4 OperationOutcome: the one shape every HTTP error (and every /fhir answer) takes.

Installed as ``esource.adapters.fhir_outcome``. Plain dicts on the wire (fast, no model round trip)
and pydantic models describing them for the OpenAPI document.

Issue codes come from the R4 IssueType value set (http://hl7.org/fhir/R4/valueset-issue-type.html).
Diagnostics never carry a secret; they may quote what the client itself sent (a bad element value),
but nothing of that goes to the logs.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

__all__ = [
    "FHIR_JSON",
    "FhirJSONResponse",
    "Issue",
    "OperationOutcome",
    "STATUS_CODES",
    "error_response",
    "issue",
    "operation_outcome",
    "validation_code",
]

FHIR_JSON = "application/fhir+json"

Severity = Literal["fatal", "error", "warning", "information"]

#: IssueType code per HTTP status, for errors raised without a more precise code.
STATUS_CODES: dict[int, str] = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    411: "invalid",
    413: "too-long",
    415: "not-supported",
    422: "invalid",
    429: "throttled",
    500: "exception",
    502: "transient",
    503: "transient",
    504: "timeout",
}


class Issue(BaseModel):
    """OperationOutcome.issue (R4): severity, IssueType code, diagnostics, and the FHIRPath of the element."""

    model_config = ConfigDict(extra="allow")

    severity: Severity
    code: str = Field(description="R4 IssueType code (invalid, structure, required, value, too-long, "
                                  "not-supported, login, not-found, conflict, duplicate, informational ...)")
    diagnostics: str | None = None
    expression: list[str] | None = Field(None, description="FHIRPath of the element concerned, e.g. "
                                                           "`Observation.status`")


class OperationOutcome(BaseModel):
    """FHIR R4 OperationOutcome (application/fhir+json)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"example": {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "information", "code": "informational", "diagnostics": "accepted Observation/abc"}],
    }})

    resourceType: Literal["OperationOutcome"] = "OperationOutcome"
    issue: list[Issue] = Field(min_length=1)


class FhirJSONResponse(JSONResponse):
    media_type = FHIR_JSON


def issue(severity: Severity, code: str, diagnostics: str | None = None, expression: Iterable[str] | str | None = None,
          **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"severity": severity, "code": code}
    if diagnostics:
        out["diagnostics"] = diagnostics
    if expression:
        out["expression"] = [expression] if isinstance(expression, str) else list(expression)
    out.update(extra)
    return out


def operation_outcome(issues: Iterable[dict[str, Any]]) -> dict[str, Any]:
    items = list(issues)
    if not items:  # an OperationOutcome needs at least one issue
        items = [issue("information", "informational", "all OK")]
    return {"resourceType": "OperationOutcome", "issue": items}


def error_response(status: int, diagnostics: str, *, code: str | None = None, expression: Iterable[str] | str | None = None,
                   headers: dict[str, str] | None = None, more: Iterable[dict[str, Any]] = (),
                   severity: Severity = "error") -> FhirJSONResponse:
    """One error (plus optional further issues) as an OperationOutcome response."""
    first = issue(severity, code or STATUS_CODES.get(status, "processing"), diagnostics, expression)
    return FhirJSONResponse(operation_outcome([first, *more]), status_code=status, headers=headers)


def validation_code(message: str) -> str:
    """IssueType for a validation message of `esource.intake.validate`."""
    if "required element is missing" in message:
        return "required"
    if "unknown element" in message or "expected an object" in message or "expected an array" in message:
        return "structure"
    if "not in the required value set" in message:
        return "code-invalid"
    return "value"
