"""Resolve FHIR references inside one parsed input (Bundle resolution rules of FHIR R4, plus the
pragmatic fallbacks real IPS/Synthea exports need).

Order of resolution for a reference string:

1. ``#id``: a contained resource of the context resource (``#`` alone is the context itself).
2. ``urn:uuid:`` / ``urn:oid:``: the entry whose fullUrl is exactly that.
3. Absolute URL (``https://server/base/Type/id[/_history/v]``): the entry whose fullUrl is exactly that
   (without the ``_history`` part, whose version must then match `meta.versionId` when the resource
   has one); else a resource with that ``resourceType/id`` whose fullUrl is not a RESTful URL of a
   *different* server base (a reference to another server is not this resource).
4. Relative ``Type/id[/_history/v]``: FHIR's rule first (the context entry's fullUrl is RESTful ->
   ``<its base>/Type/id`` against fullUrls); then the fullUrl ``Type/id`` itself (some exports use
   relative fullUrls, e.g. UK_NHSx ``Patient/2``); then any resource with that ``resourceType/id``,
   preferring one from the context's server base.
5. Conditional ``Type?identifier=system|value`` (transaction style): by identifier.

A `Reference` object resolves by its `reference` string; when that is absent or does not resolve,
by its `identifier` (a logical reference: a resource having that identifier, restricted to
`Reference.type` when given).

Unresolvable references return None: dangling references are common in the sample data (see the
report in tests/intake) and are the mapping engine's business, never an exception.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

from esource.domain.model import SourceResource
from esource.intake.parse import ParsedInput, R4_RESOURCE_TYPES

__all__ = ["ReferenceResolver", "split_reference"]

# [base/]Type/id[/_history/vid] -- id and version per FHIR's id datatype, but tolerate a little more
# (some exports use ids longer than 64 characters or with underscores).
_TYPE_ID = re.compile(
    r"^(?:(?P<base>.*?)/)?(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-._]{1,128})"
    r"(?:/_history/(?P<vid>[A-Za-z0-9\-._]{1,128}))?/?$"
)


def split_reference(reference: str) -> tuple[str | None, str, str, str | None] | None:
    """``(base, type, id, version)`` of a RESTful reference/URL, or None. Only known R4 types count."""
    m = _TYPE_ID.match(reference)
    if m is None or m.group("type") not in R4_RESOURCE_TYPES:
        return None
    return m.group("base") or None, m.group("type"), m.group("id"), m.group("vid")


def _restful_base(full_url: str | None) -> str | None:
    """The server base of a RESTful fullUrl (``http(s)://.../Type/id``), else None."""
    if not full_url or "://" not in full_url:
        return None
    parts = split_reference(full_url)
    return parts[0] if parts else None


def _version_matches(res: SourceResource, vid: str | None) -> bool:
    if vid is None:
        return True
    meta = res.resource.get("meta")
    current = meta.get("versionId") if type(meta) is dict else None
    return current is None or str(current) == vid


class ReferenceResolver:
    """Index one ParsedInput once, then resolve references from any of its resources."""

    def __init__(self, parsed: ParsedInput):
        self.parsed = parsed
        self._by_full_url: dict[str, SourceResource] = {}
        self._by_type_id: dict[tuple[str, str], list[SourceResource]] = {}
        self._by_identifier: dict[tuple[str, str], list[SourceResource]] | None = None  # built lazily
        self._by_identifier_value: dict[str, list[SourceResource]] = {}
        for res in parsed.resources:
            if res.full_url is not None:
                self._by_full_url.setdefault(res.full_url, res)
            if res.id is not None:
                self._by_type_id.setdefault((res.resource_type, res.id), []).append(res)

    # --- public API ------------------------------------------------------------------------------

    def resolve(
        self, reference: str | dict[str, Any] | None, context: SourceResource | None = None
    ) -> SourceResource | dict[str, Any] | None:
        """The resource a reference points to: a SourceResource of this input, a contained resource
        (dict) of `context`, the context itself for ``#``, or None when it cannot be resolved."""
        if reference is None:
            return None
        if type(reference) is dict:
            target = None
            ref = reference.get("reference")
            if type(ref) is str and ref.strip():
                target = self._resolve_str(ref.strip(), context)
            if target is None:
                ident = reference.get("identifier")
                if type(ident) is dict:
                    rtype = reference.get("type")
                    target = self.by_identifier(ident.get("system"), ident.get("value"), rtype if type(rtype) is str else None)
            return target
        if type(reference) is str:
            reference = reference.strip()
            return self._resolve_str(reference, context) if reference else None
        return None

    def resolve_resource(
        self, reference: str | dict[str, Any] | None, context: SourceResource | None = None
    ) -> SourceResource | None:
        """Like `resolve` but only Bundle entries (contained resources give None)."""
        target = self.resolve(reference, context)
        return target if isinstance(target, SourceResource) else None

    def by_identifier(
        self, system: Any, value: Any, resource_type: str | None = None, *, any_system: bool = False
    ) -> SourceResource | None:
        """The first resource (in input order) having the identifier system|value (any of its
        identifiers, not only the first). A missing system matches identifiers without a system only,
        unless `any_system`."""
        if type(value) is not str or not value:
            return None
        index = self._identifier_index()
        if any_system:
            candidates = self._by_identifier_value.get(value, ())
        else:
            candidates = index.get((system if type(system) is str else "", value), ())
        for res in candidates:
            if resource_type is None or res.resource_type == resource_type:
                return res
        return None

    def patient_of(self, resource: SourceResource) -> SourceResource | None:
        """The Patient a resource is about: itself for a Patient, else its `subject` (Observation,
        Condition, MedicationStatement, MedicationRequest, Composition...) or `patient`
        (AllergyIntolerance, Immunization...). None when the reference is absent, dangling, contained,
        or points to something other than a Patient (e.g. a Group)."""
        if resource.resource_type == "Patient":
            return resource
        body = resource.resource
        for name in ("subject", "patient"):
            ref = body.get(name)
            if type(ref) is dict:
                target = self.resolve(ref, resource)
                if isinstance(target, SourceResource) and target.resource_type == "Patient":
                    return target
                if target is None and type(ref.get("identifier")) is dict:
                    ident = ref["identifier"]
                    target = self.by_identifier(ident.get("system"), ident.get("value"), "Patient")
                    if target is not None:
                        return target
        return None

    def medication_of(self, resource: SourceResource) -> dict[str, Any] | None:
        """The medication CodeableConcept of a MedicationStatement/Request/Administration/Dispense:
        `medicationCodeableConcept`, else the `code` of the Medication its `medicationReference`
        points to (a Bundle entry or a contained Medication). None when neither gives a concept."""
        body = resource.resource
        concept = body.get("medicationCodeableConcept")
        if type(concept) is dict:
            return concept
        ref = body.get("medicationReference")
        if ref is None:
            # R5-style CodeableReference, seen in some R4-labelled exports
            med = body.get("medication")
            if type(med) is dict:
                if type(med.get("concept")) is dict:
                    return med["concept"]
                ref = med.get("reference")
        if ref is None:
            return None
        target = self.resolve(ref, resource)
        if isinstance(target, SourceResource):
            med_body: Any = target.resource if target.resource_type == "Medication" else None
        elif type(target) is dict and target.get("resourceType") == "Medication":
            med_body = target
        else:
            med_body = None
        if med_body is not None and type(med_body.get("code")) is dict:
            return med_body["code"]
        return None

    # --- internals -------------------------------------------------------------------------------

    def _identifier_index(self) -> dict[tuple[str, str], list[SourceResource]]:
        if self._by_identifier is None:
            index: dict[tuple[str, str], list[SourceResource]] = {}
            by_value = self._by_identifier_value
            for res in self.parsed.resources:
                idents = res.resource.get("identifier")
                if type(idents) is dict:
                    idents = [idents]
                elif type(idents) is not list:
                    continue
                for ident in idents:
                    if type(ident) is not dict:
                        continue
                    value = ident.get("value")
                    if type(value) is not str or not value:
                        continue
                    system = ident.get("system")
                    index.setdefault((system if type(system) is str else "", value), []).append(res)
                    hits = by_value.setdefault(value, [])
                    if not hits or hits[-1] is not res:
                        hits.append(res)
            self._by_identifier = index
        return self._by_identifier

    def _resolve_str(self, ref: str, context: SourceResource | None) -> SourceResource | dict[str, Any] | None:
        if ref[0] == "#":
            return self._contained(ref[1:], context)
        hit = self._by_full_url.get(ref)
        if hit is not None:
            return hit
        if ref.startswith("urn:"):
            return None  # urn:uuid / urn:oid only ever match a fullUrl exactly
        if "?" in ref:
            return self._conditional(ref)
        parts = split_reference(ref)
        if parts is None:
            return None
        base, rtype, rid, vid = parts
        context_url = context.full_url if context is not None else None
        context_base = _restful_base(context_url)
        absolute = "://" in ref
        if absolute:
            if vid is not None:
                hit = self._by_full_url.get(f"{base}/{rtype}/{rid}")
                if hit is not None:
                    return hit if _version_matches(hit, vid) else None
            ref_base = base
        else:
            # FHIR Bundle rule: a relative reference is relative to the context entry's server base.
            if context_base is not None:
                hit = self._by_full_url.get(f"{context_base}/{rtype}/{rid}")
                if hit is not None:
                    return hit if _version_matches(hit, vid) else None
            if vid is not None:
                hit = self._by_full_url.get(f"{rtype}/{rid}")
                if hit is not None:
                    return hit if _version_matches(hit, vid) else None
            ref_base = context_base
        candidates = self._by_type_id.get((rtype, rid))
        if not candidates:
            return None
        fallback = None
        for cand in candidates:
            cand_base = _restful_base(cand.full_url)
            if cand_base is not None and ref_base is not None and cand_base == ref_base:
                return cand if _version_matches(cand, vid) else None
            if fallback is None and (cand_base is None or not absolute):
                fallback = cand
        if fallback is not None and _version_matches(fallback, vid):
            return fallback
        return None

    def _contained(self, local_id: str, context: SourceResource | None) -> dict[str, Any] | SourceResource | None:
        if context is None:
            return None
        if not local_id:
            return context
        contained = context.resource.get("contained")
        if type(contained) is not list:
            return None
        for item in contained:
            if type(item) is dict and item.get("id") == local_id:
                return item
        return None

    def _conditional(self, ref: str) -> SourceResource | None:
        rtype, _, query = ref.partition("?")
        if rtype not in R4_RESOURCE_TYPES:
            return None
        for param in query.split("&"):
            name, _, value = param.partition("=")
            if name == "identifier" and value:
                system, bar, code = value.rpartition("|")
                if not bar:  # search semantics: identifier=value matches any system
                    return self.by_identifier(None, unquote(value), rtype, any_system=True)
                return self.by_identifier(unquote(system), unquote(code), rtype)
        return None
