"""FHIR intake: parse (orjson, no model), source identity, reference resolution, selective validation.

    parsed = parse_fhir(data, origin)             # IntakeError when not FHIR at all
    resolver = ReferenceResolver(parsed)
    issues = validate_resource(obs.resource, elements={"status", "code", "valueQuantity"})
"""

from esource.intake.identity import make_source_ref, source_identity, source_version
from esource.intake.parse import EntryProblem, ParsedInput, R4_RESOURCE_TYPES, parse_fhir
from esource.intake.references import ReferenceResolver
from esource.intake.validate import ValidationIssue, clear_validation_cache, validate_resource

__all__ = [
    "EntryProblem",
    "ParsedInput",
    "R4_RESOURCE_TYPES",
    "ReferenceResolver",
    "ValidationIssue",
    "clear_validation_cache",
    "make_source_ref",
    "parse_fhir",
    "source_identity",
    "source_version",
    "validate_resource",
]
