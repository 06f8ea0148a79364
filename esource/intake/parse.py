"""Read bytes as FHIR R4 JSON: one Bundle (any type) or one resource, flattened to SourceResources.

Fast path by design: orjson, no model validation here (see `esource.intake.validate` for the selective
validation of what a study reads). Two kinds of failure:

* the input cannot be read as FHIR at all -> `IntakeError(origin, problem)`, one line, the whole
  input is rejected (size, UTF-8, JSON syntax, top level not an object, missing/unknown resourceType,
  nesting too deep, Bundle.entry not a list);
* one entry is unusable (no resource, resource not an object, no/unknown resourceType...) -> an
  `EntryProblem` in `ParsedInput.problems`; every other entry is still returned.

Nested Bundles (a message Bundle whose focus is a document Bundle, or any entry resource that is a
Bundle) are flattened: their entries become resources of the same ParsedInput with `index` = the
top-level entry position; the nested Bundle itself is not returned as a resource. DELETE entries of
transaction/batch/history Bundles are recorded in `deletions` (their request URL, e.g.
``Observation/123``): the engine treats them like entered-in-error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import re

import orjson

from esource.domain.model import SourceResource
from esource.intake.jsonvalues import as_str, json_kind, short_repr
from esource.errors import IntakeError
from esource.intake.identity import make_source_ref

__all__ = [
    "BUNDLE_TYPES",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_DEPTH",
    "EntryProblem",
    "ParsedInput",
    "R4_RESOURCE_TYPES",
    "json_depth",
    "parse_fhir",
]

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_DEPTH = 64

# Every concrete resource type of FHIR R4 (4.0.1); the abstract Resource/DomainResource are not names
# a resource can carry.
R4_RESOURCE_TYPES: frozenset[str] = frozenset(
    """
    Account ActivityDefinition AdverseEvent AllergyIntolerance Appointment AppointmentResponse AuditEvent
    Basic Binary BiologicallyDerivedProduct BodyStructure Bundle CapabilityStatement CarePlan CareTeam
    CatalogEntry ChargeItem ChargeItemDefinition Claim ClaimResponse ClinicalImpression CodeSystem
    Communication CommunicationRequest CompartmentDefinition Composition ConceptMap Condition Consent
    Contract Coverage CoverageEligibilityRequest CoverageEligibilityResponse DetectedIssue Device
    DeviceDefinition DeviceMetric DeviceRequest DeviceUseStatement DiagnosticReport DocumentManifest
    DocumentReference EffectEvidenceSynthesis Encounter Endpoint EnrollmentRequest EnrollmentResponse
    EpisodeOfCare EventDefinition Evidence EvidenceVariable ExampleScenario ExplanationOfBenefit
    FamilyMemberHistory Flag Goal GraphDefinition Group GuidanceResponse HealthcareService ImagingStudy
    Immunization ImmunizationEvaluation ImmunizationRecommendation ImplementationGuide InsurancePlan
    Invoice Library Linkage List Location Measure MeasureReport Media Medication MedicationAdministration
    MedicationDispense MedicationKnowledge MedicationRequest MedicationStatement MedicinalProduct
    MedicinalProductAuthorization MedicinalProductContraindication MedicinalProductIndication
    MedicinalProductIngredient MedicinalProductInteraction MedicinalProductManufactured
    MedicinalProductPackaged MedicinalProductPharmaceutical MedicinalProductUndesirableEffect
    MessageDefinition MessageHeader MolecularSequence NamingSystem NutritionOrder Observation
    ObservationDefinition OperationDefinition OperationOutcome Organization OrganizationAffiliation
    Parameters Patient PaymentNotice PaymentReconciliation Person PlanDefinition Practitioner
    PractitionerRole Procedure Provenance Questionnaire QuestionnaireResponse RelatedPerson RequestGroup
    ResearchDefinition ResearchElementDefinition ResearchStudy ResearchSubject RiskAssessment
    RiskEvidenceSynthesis Schedule SearchParameter ServiceRequest Slot Specimen SpecimenDefinition
    StructureDefinition StructureMap Subscription Substance SubstanceNucleicAcid SubstancePolymer
    SubstanceProtein SubstanceReferenceInformation SubstanceSourceMaterial SubstanceSpecification
    SupplyDelivery SupplyRequest Task TerminologyCapabilities TestReport TestScript ValueSet
    VerificationResult VisionPrescription
    """.split()
)

# Bundle.type (R4 bundle-type value set, required binding).
BUNDLE_TYPES: frozenset[str] = frozenset(
    {
        "document",
        "message",
        "transaction",
        "transaction-response",
        "batch",
        "batch-response",
        "history",
        "searchset",
        "collection",
    }
)
_RESPONSE_TYPES = frozenset({"transaction-response", "batch-response"})

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class EntryProblem:
    """One Bundle entry (or Bundle element) that could not be used; the rest of the input still parses."""

    origin: str
    index: int  # top-level entry position (-1: the Bundle itself)
    resource_label: str  # e.g. "Bundle.entry[3]" or "Bundle.entry[3].resource.entry[1] (Observation)"
    element: str | None  # e.g. "resource", "resource.resourceType", "request.url"
    message: str

    def __str__(self) -> str:
        where = f"{self.origin}: {self.resource_label}"
        if self.element:
            where += f" at {self.element}"
        return f"{where}: {self.message}"


@dataclass(slots=True)
class ParsedInput:
    """What one input (file, message, request) holds, ready for the mapping engine."""

    origin: str
    bundle_type: str | None  # None for a single resource
    resources: list[SourceResource] = field(default_factory=list)
    problems: list[EntryProblem] = field(default_factory=list)
    deletions: list[str] = field(default_factory=list)  # request URLs of DELETE entries, e.g. "Observation/123"

    def by_type(self, resource_type: str) -> list[SourceResource]:
        """The resources of one type, in input order."""
        return [r for r in self.resources if r.resource_type == resource_type]

    def types(self) -> dict[str, int]:
        """Count of resources by type (for logs and tests)."""
        counts: dict[str, int] = {}
        for r in self.resources:
            counts[r.resource_type] = counts.get(r.resource_type, 0) + 1
        return counts


# --- nesting depth on the raw bytes --------------------------------------------------------------

_ESCAPE = re.compile(rb"\\.", re.S)
_KEEP = frozenset(b'"{}[]')
_DROP = bytes(b for b in range(256) if b not in _KEEP)
_BRACKETS = bytes.maketrans(b"[]", b"{}")


def json_depth(data: bytes, limit: int | None = None) -> int:
    """Nesting depth of *syntactically valid* JSON bytes (a scalar is 0, ``{}`` is 1, ``{"a":[1]}`` is 2).

    Iterative and in C for the heavy lifting (no recursion, no walk over the parsed objects): drop
    escape sequences, keep only quotes and brackets, drop string contents, then peel one level of
    ``{}`` pairs per round. Multi-byte UTF-8 never contains ASCII bytes, so this is encoding-safe.
    With `limit`, stops after limit + 1 rounds and returns limit + 1 when the JSON is deeper.
    """
    n_escapes = data.count(b"\\")
    if n_escapes:
        # Drop every escape sequence (backslash + next byte): escaped quotes must not end a string.
        if n_escapes > 4096:
            data = _ESCAPE.sub(b"", data)
        else:
            parts = []
            start = 0
            i = data.find(b"\\")
            while i != -1:
                parts.append(data[start:i])
                start = i + 2
                i = data.find(b"\\", start)
            parts.append(data[start:])
            data = b"".join(parts)
    s = data.translate(_BRACKETS, _DROP)
    if b'"' in s:
        s = b"".join(s.split(b'"')[0::2])
    depth = 0
    while s:
        depth += 1
        if limit is not None and depth > limit:
            return depth
        s = s.replace(b"{}", b"")
    return depth


# --- parsing -------------------------------------------------------------------------------------


def _load(data: bytes | bytearray, origin: str, max_bytes: int, max_depth: int) -> Any:
    size = len(data)
    if size > max_bytes:
        raise IntakeError(origin, f"payload of {size} bytes exceeds the limit of {max_bytes} bytes")
    offset = 0
    if data[:3] == _BOM:
        data = data[3:]
        offset = 3
    if not data.strip():
        raise IntakeError(origin, "empty input: expected a FHIR JSON resource or Bundle")
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as uexc:
            raise IntakeError(
                origin, f"not valid UTF-8 at byte offset {uexc.start + offset}: {uexc.reason}"
            ) from None
        msg = str(exc)
        if "depth limit" in msg:
            raise IntakeError(origin, f"JSON nested deeper than the limit of {max_depth} levels") from None
        raise IntakeError(origin, f"not valid JSON: {msg}") from None
    if type(doc) is not dict:
        raise IntakeError(origin, f"top level is {json_kind(doc)}, expected a JSON object (a FHIR resource)")
    if json_depth(data, max_depth) > max_depth:
        raise IntakeError(origin, f"JSON nested deeper than the limit of {max_depth} levels")
    return doc


def _check_resource_type(doc: dict[str, Any], origin: str) -> str:
    if "resourceType" not in doc:
        raise IntakeError(origin, "no resourceType at the top level: not a FHIR resource")
    rt = doc["resourceType"]
    if type(rt) is not str:
        raise IntakeError(origin, f"resourceType is {json_kind(rt)}, expected a string")
    if rt not in R4_RESOURCE_TYPES:
        raise IntakeError(origin, f"resourceType {short_repr(rt)} is not a FHIR R4 resource type")
    return rt


def parse_fhir(
    data: bytes | bytearray | memoryview | str,
    origin: str,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> ParsedInput:
    """Parse one FHIR R4 JSON input. Raises IntakeError when it cannot be read as FHIR at all;
    unusable entries go to `problems` and everything else is returned."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    elif isinstance(data, memoryview):
        data = data.tobytes()
    elif not isinstance(data, (bytes, bytearray)):
        raise IntakeError(origin, f"input is a {type(data).__name__}, expected bytes")
    doc = _load(data, origin, max_bytes, max_depth)
    rt = _check_resource_type(doc, origin)

    if rt != "Bundle":
        return ParsedInput(
            origin=origin,
            bundle_type=None,
            resources=[_source_resource(doc, rt, None, origin, -1)],
        )

    entries = doc.get("entry", [])
    if type(entries) is not list:
        raise IntakeError(origin, f"Bundle.entry is {json_kind(entries)}, expected an array", element="Bundle.entry")

    parsed = ParsedInput(origin=origin, bundle_type=None)
    btype = doc.get("type")
    if type(btype) is str:
        parsed.bundle_type = btype
        if btype not in BUNDLE_TYPES:
            parsed.problems.append(
                EntryProblem(origin, -1, "Bundle", "type", f"unknown Bundle.type {short_repr(btype)}")
            )
    else:
        parsed.problems.append(
            EntryProblem(
                origin, -1, "Bundle", "type", "Bundle.type is missing" if btype is None else "Bundle.type is not a string"
            )
        )
    _flatten(entries, parsed, btype)
    return parsed


def _source_resource(res: dict[str, Any], rt: str, full_url: str | None, origin: str, index: int) -> SourceResource:
    ref = make_source_ref(res, full_url)
    return SourceResource(
        resource_type=rt,
        id=ref.id,
        full_url=full_url,
        resource=res,
        ref=ref,
        origin=origin,
        index=index,
    )


def _flatten(top_entries: list[Any], parsed: ParsedInput, top_type: Any) -> None:
    """Walk the entries (and the entries of nested Bundles) with an explicit stack, in document order."""
    origin = parsed.origin
    resources = parsed.resources
    problems = parsed.problems
    deletions = parsed.deletions
    # stack of (entries, next position, label prefix, top-level index or None at top, bundle type)
    stack: list[tuple[list[Any], int, str, int | None, Any]] = [(top_entries, 0, "Bundle", None, top_type)]
    while stack:
        entries, pos, prefix, top_index, btype = stack.pop()
        n = len(entries)
        while pos < n:
            entry = entries[pos]
            index = pos if top_index is None else top_index
            label = f"{prefix}.entry[{pos}]"
            pos += 1
            if type(entry) is not dict:
                problems.append(EntryProblem(origin, index, label, None, f"entry is {json_kind(entry)}, expected an object"))
                continue

            full_url = entry.get("fullUrl")
            if full_url is not None and type(full_url) is not str:
                problems.append(EntryProblem(origin, index, label, "fullUrl", f"fullUrl is {json_kind(full_url)}, expected a string"))
                full_url = None
            elif full_url == "":
                full_url = None

            request = entry.get("request")
            if type(request) is dict and request.get("method") == "DELETE":
                url = as_str(request.get("url"))
                if url is None:
                    problems.append(EntryProblem(origin, index, label, "request.url", "DELETE entry without a request URL"))
                else:
                    deletions.append(url.strip())
                continue

            if "resource" not in entry or entry["resource"] is None:
                if btype in _RESPONSE_TYPES and "response" in entry:
                    continue  # a response entry without a returned resource is normal
                problems.append(EntryProblem(origin, index, label, "resource", "entry has no resource"))
                continue
            res = entry["resource"]
            if type(res) is not dict:
                problems.append(EntryProblem(origin, index, label, "resource", f"resource is {json_kind(res)}, expected an object"))
                continue
            rt = res.get("resourceType")
            if rt is None:
                problems.append(EntryProblem(origin, index, label, "resource.resourceType", "resource has no resourceType"))
                continue
            if type(rt) is not str:
                problems.append(
                    EntryProblem(origin, index, label, "resource.resourceType", f"resourceType is {json_kind(rt)}, expected a string")
                )
                continue
            if rt not in R4_RESOURCE_TYPES:
                problems.append(
                    EntryProblem(
                        origin, index, label, "resource.resourceType", f"resourceType {short_repr(rt)} is not a FHIR R4 resource type"
                    )
                )
                continue

            if rt == "Bundle":
                inner = res.get("entry", [])
                if type(inner) is not list:
                    problems.append(
                        EntryProblem(origin, index, label + " (Bundle)", "resource.entry", f"Bundle.entry is {json_kind(inner)}, expected an array")
                    )
                    continue
                # finish this level after the nested Bundle: push the rest first, then the child
                stack.append((entries, pos, prefix, top_index, btype))
                stack.append((inner, 0, label + ".resource", index, res.get("type")))
                break

            resources.append(_source_resource(res, rt, full_url, origin, index))
