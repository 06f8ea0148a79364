"""Selective validation of FHIR resources with fhir.resources (R4B models, which read R4 JSON).

Only what a study reads is validated. With `elements` (top-level element names the map reads, e.g.
{"status", "code", "effectiveDateTime", "valueQuantity", "subject"}; ``value[x]``-style choice names
are accepted), the resource is cut down to those elements plus `resourceType`, `id`, the model's
required elements and required choice groups (present in the input), the whole choice group of any
choice element named, and the ``_element`` primitive-extension twins. Required elements are always
kept, so the restriction never invents a "missing" error; an element the study does not read (a
free-text note, a Claim's billing code) can never make a resource invalid.

Two validation paths, same findings (tests check they agree on the sample data):

* ``elements=None``: the whole resource through the fhir.resources model (the reference behaviour).
* with `elements`: each kept element is validated on its own with the model's own field type
  (pydantic TypeAdapter of the R4B field annotation) and memoized per element value, so a Patient
  reference or a LOINC code shared by hundreds of Observations is validated once; the model's
  resource-level rules (unknown elements, required elements incl. the primitive-extension exception,
  exactly-one-of choice groups, no null in arrays of complex elements) are applied here. This avoids
  the per-resource fixed cost of fhir.resources model construction, which dominates for small
  resources such as Synthea Observations.

What fhir.resources checks, and what we add:

* types and formats (decimal, dateTime, date... by FHIR regex, and calendar validity: ``2020-02-30``
  fails), unknown elements, list vs object, required elements, choice groups;
* it does NOT check codes against required value sets (``status = "bogus"`` passes): we check the
  kept top-level `code` elements against the model's own complete `enum_values`, our table where
  fhir.resources truncates the list (Observation.status, DiagnosticReport.status, Encounter.status),
  and `Quantity.comparator` of Observation values;
* it accepts a JSON string for a decimal (``"12.5"``); the mapping engine parses numbers itself.

Results are memoized by (resource type, SHA-256 of the canonical JSON of the (restricted) resource)
in a bounded LRU (50k entries; element results in a second LRU of 200k), so re-validating the same
resource version is a dictionary hit. `clear_validation_cache()` empties both (benchmarks, tests).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import types
import typing
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from pydantic import TypeAdapter, ValidationError

from esource.intake.jsonvalues import json_kind, short_repr
from esource.intake.parse import R4_RESOURCE_TYPES

__all__ = [
    "ValidationIssue",
    "clear_validation_cache",
    "validate_resource",
    "validation_cache_info",
]

CACHE_SIZE = 50_000


@dataclass(frozen=True, slots=True)
class ValidationIssue:
    element: str  # e.g. "Observation.valueQuantity.value", "Observation.component[1].code"
    message: str

    def __str__(self) -> str:
        return f"{self.element}: {self.message}"


# --- model information, computed once per resource type -------------------------------------------

# Required bindings where fhir.resources' enum_values list is truncated ("+"): the full R4 value sets.
_REQUIRED_CODES: dict[tuple[str, str], frozenset[str]] = {
    ("Observation", "status"): frozenset(
        {"registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error", "unknown"}
    ),
    ("DiagnosticReport", "status"): frozenset(
        {
            "registered", "partial", "preliminary", "final", "amended", "corrected", "appended",
            "cancelled", "entered-in-error", "unknown",
        }
    ),
    ("Encounter", "status"): frozenset(
        {"planned", "arrived", "triaged", "in-progress", "onleave", "finished", "cancelled", "entered-in-error", "unknown"}
    ),
}
_COMPARATORS = frozenset({"<", "<=", ">=", ">"})


class _ModelInfo:
    """What the validator needs to know about one R4B resource model (computed once per type)."""

    __slots__ = (
        "model", "fields", "always", "choice_groups", "member_group", "required_groups",
        "required_complex", "required_primitive", "complex_lists", "codes", "_adapters",
    )

    def __init__(self, model: Any):
        self.model = model
        self.fields: dict[str, Any] = {}  # alias (incl. "_status" twins) -> FieldInfo
        always = {"resourceType", "id"}
        groups: dict[str, set[str]] = {}
        self.member_group: dict[str, str] = {}
        self.required_groups: set[str] = set()
        self.required_complex: set[str] = set()
        self.required_primitive: dict[str, str] = {}  # alias -> its "_alias" extension twin
        self.complex_lists: set[str] = set()
        self.codes: dict[str, frozenset[str]] = {}
        self._adapters: dict[str, TypeAdapter[Any]] = {}
        fields = model.model_fields
        for name, field in fields.items():
            alias = field.alias or name
            self.fields[alias] = field
            if name.endswith("__ext") or name in ("resource_type", "fhir_comments"):
                continue
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            primitive = f"{name}__ext" in fields
            if field.is_required():
                self.required_complex.add(alias)
                always.add(alias)
            if extra.get("element_required"):
                self.required_primitive[alias] = "_" + alias
                always.update((alias, "_" + alias))
            if not primitive and _is_list(field.annotation):
                self.complex_lists.add(alias)
            prefix = extra.get("one_of_many")
            if prefix:
                groups.setdefault(prefix, set()).add(alias)
                self.member_group[alias] = prefix
                if extra.get("one_of_many_required"):
                    self.required_groups.add(prefix)
            enum = extra.get("enum_values")
            if enum and "+" not in enum:
                self.codes[alias] = frozenset(enum)
        rt = model.get_resource_type()
        for (code_rt, element), allowed in _REQUIRED_CODES.items():
            if code_rt == rt:
                self.codes[element] = allowed
        self.choice_groups = {k: frozenset(v) for k, v in groups.items()}
        for prefix in self.required_groups:
            for alias in groups[prefix]:
                always.update((alias, "_" + alias))
        self.always = frozenset(always)

    def adapter(self, alias: str) -> TypeAdapter[Any]:
        adapter = self._adapters.get(alias)
        if adapter is None:
            field = self.fields[alias]
            annotation = field.annotation
            if field.metadata:
                annotation = Annotated[(annotation, *field.metadata)]  # type: ignore[valid-type]
            adapter = TypeAdapter(annotation)
            self._adapters[alias] = adapter
        return adapter


def _is_list(annotation: Any) -> bool:
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    return any(typing.get_origin(a) is list for a in args)


_MODEL_INFO: dict[str, _ModelInfo | None] = {}
_MODEL_LOCK = threading.Lock()
_MISSING = object()


def _model_info(resource_type: str) -> _ModelInfo | None:
    info = _MODEL_INFO.get(resource_type, _MISSING)
    if info is not _MISSING:
        return info  # type: ignore[return-value]
    with _MODEL_LOCK:
        if resource_type not in _MODEL_INFO:
            _MODEL_INFO[resource_type] = _build_model_info(resource_type)
        return _MODEL_INFO[resource_type]


def _build_model_info(resource_type: str) -> _ModelInfo | None:
    from fhir.resources.R4B import get_fhir_model_class

    try:
        model = get_fhir_model_class(resource_type)
    except (KeyError, ValueError, ImportError, AttributeError):
        return None
    return _ModelInfo(model)


_KEEP_CACHE: dict[tuple[str, frozenset[str]], frozenset[str]] = {}


def _keep_keys(info: _ModelInfo, resource_type: str, elements: frozenset[str]) -> frozenset[str]:
    key = (resource_type, elements)
    keep = _KEEP_CACHE.get(key)
    if keep is None:
        names = set(info.always)
        for element in elements:
            name = _top_level(element, resource_type)
            # a choice element brings its whole group: two values given at once must still be caught
            group = info.choice_groups.get(name) or info.choice_groups.get(info.member_group.get(name, ""), ())
            for alias in group:
                names.update((alias, "_" + alias))
            names.update((name, "_" + name))
        keep = frozenset(names)
        if len(_KEEP_CACHE) < 4096:
            _KEEP_CACHE[key] = keep
    return keep


def _top_level(element: str, resource_type: str) -> str:
    """The top-level element name of a map path: ``Observation.valueQuantity.value`` -> ``valueQuantity``,
    ``component[0].code`` -> ``component``, ``value[x]`` -> ``value`` (a choice group)."""
    parts = element.split(".")
    if len(parts) > 1 and parts[0] == resource_type:
        parts = parts[1:]
    name = parts[0]
    if name.endswith("[x]"):
        return name[:-3]
    bracket = name.find("[")
    return name[:bracket] if bracket > 0 else name


# --- LRU of results ----------------------------------------------------------------------------


class _LRU:
    def __init__(self, size: int):
        self.size = size
        self.data: OrderedDict[Any, tuple[ValidationIssue, ...]] = OrderedDict()
        self.lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Any) -> tuple[ValidationIssue, ...] | None:
        with self.lock:
            value = self.data.get(key)
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
                self.data.move_to_end(key)
            return value

    def put(self, key: Any, value: tuple[ValidationIssue, ...]) -> None:
        with self.lock:
            self.data[key] = value
            self.data.move_to_end(key)
            while len(self.data) > self.size:
                self.data.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.data.clear()
            self.hits = self.misses = 0


_RESULTS = _LRU(CACHE_SIZE)  # (resource type, sha256 of the canonical (restricted) resource)
_ELEMENTS = _LRU(4 * CACHE_SIZE)  # (resource type, element, sha256 of the canonical element value)


def clear_validation_cache() -> None:
    """Forget every memoized result (benchmarks, tests)."""
    _RESULTS.clear()
    _ELEMENTS.clear()


def validation_cache_info() -> dict[str, int]:
    return {
        "size": len(_RESULTS.data),
        "max_size": _RESULTS.size,
        "hits": _RESULTS.hits,
        "misses": _RESULTS.misses,
        "element_size": len(_ELEMENTS.data),
        "element_hits": _ELEMENTS.hits,
        "element_misses": _ELEMENTS.misses,
    }


# --- validation ----------------------------------------------------------------------------------


def _digest(value: Any) -> bytes | None:
    try:
        return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).digest()
    except (TypeError, orjson.JSONEncodeError):
        return None  # not plain JSON (e.g. Decimal values): validate without memoizing


def validate_resource(resource: dict[str, Any], *, elements: Iterable[str] | None = None) -> list[ValidationIssue]:
    """Validate one resource (raw JSON dict) against the R4B model; with `elements`, only those
    top-level elements (and what the model requires). Returns the issues, empty when valid.

    Without `elements` the whole resource goes through the fhir.resources model (the reference
    behaviour). With `elements`, each kept element is validated on its own with the model's field
    type (memoized per element value: a Patient reference or a LOINC code shared by hundreds of
    Observations is validated once) and the resource-level rules (unknown elements, required
    elements, choice groups, null in arrays) are applied by this module, as the model would."""
    if type(resource) is not dict:
        return [ValidationIssue("resource", "resource is not a JSON object")]
    rt = resource.get("resourceType")
    if type(rt) is not str or not rt:
        return [ValidationIssue("resource", "resource has no resourceType")]
    if rt not in R4_RESOURCE_TYPES:
        return [ValidationIssue("resourceType", f"{short_repr(rt)} is not a FHIR R4 resource type")]
    info = _model_info(rt)
    if info is None:
        # A type the R4B models do not have (R4-only, e.g. EffectEvidenceSynthesis): nothing to check.
        return []

    if elements is not None:
        keep = _keep_keys(info, rt, elements if isinstance(elements, frozenset) else frozenset(elements))
        data = {k: v for k, v in resource.items() if k in keep}
    else:
        data = resource

    digest = _digest(data)
    key = (rt, elements is None, digest)
    if digest is not None:
        cached = _RESULTS.get(key)
        if cached is not None:
            return list(cached)
    if elements is None:
        issues = _validate_model(info, rt, data)
    else:
        issues = _validate_elements(info, rt, data)
    issues.extend(_check_codes(info, rt, data))
    result = _dedupe(issues)
    if digest is not None:
        _RESULTS.put(key, result)
    return list(result)


def _dedupe(issues: list[ValidationIssue]) -> tuple[ValidationIssue, ...]:
    seen: set[ValidationIssue] = set()
    out = []
    for issue in issues:
        if issue not in seen:
            seen.add(issue)
            out.append(issue)
    return tuple(out)


def _validate_model(info: _ModelInfo, rt: str, data: dict[str, Any]) -> list[ValidationIssue]:
    """The whole (or restricted) resource through the fhir.resources model."""
    issues: list[ValidationIssue] = []
    try:
        info.model.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            issues.append(_convert(rt, err))
    except Exception as exc:  # fhir.resources can raise plain errors on odd input; never a traceback
        issues.append(ValidationIssue(rt, f"could not be validated: {type(exc).__name__}: {_first_line(str(exc))}"))
    return issues


def _validate_elements(info: _ModelInfo, rt: str, data: dict[str, Any]) -> list[ValidationIssue]:
    """Element by element with the model's field types, then the model's resource-level rules."""
    issues: list[ValidationIssue] = []
    fields = info.fields
    for key, value in data.items():
        if key == "resourceType":
            continue
        if key not in fields or key == "fhir_comments":
            issues.append(ValidationIssue(f"{rt}.{key}", "unknown element"))
            continue
        if value is None:
            continue  # as the model does: a null is an absent element (required ones are checked below)
        if key in info.complex_lists and type(value) is list and None in value:
            issues.append(ValidationIssue(f"{rt}.{key}", "null is not allowed in an array of elements"))
        if type(value) is str and len(value) <= 256:
            digest: Any = value  # short primitives key themselves: no dump, no hash
        else:
            digest = _digest(value)
        ekey = (rt, key, digest)
        cached = _ELEMENTS.get(ekey) if digest is not None else None
        if cached is None:
            found: list[ValidationIssue] = []
            try:
                info.adapter(key).validate_python(value)
            except ValidationError as exc:
                for err in exc.errors(include_url=False):
                    err = dict(err)
                    err["loc"] = (key, *err.get("loc", ()))
                    found.append(_convert(rt, err))
            except Exception as exc:  # never a traceback
                found.append(ValidationIssue(f"{rt}.{key}", f"could not be validated: {type(exc).__name__}: {_first_line(str(exc))}"))
            cached = tuple(found)
            if digest is not None:
                _ELEMENTS.put(ekey, cached)
        issues.extend(cached)

    for alias in info.required_complex:
        if data.get(alias) is None:
            issues.append(ValidationIssue(f"{rt}.{alias}", "required element is missing"))
    for alias, ext in info.required_primitive.items():
        if data.get(alias) is None:
            twin = data.get(ext)
            if not (type(twin) is dict and twin.get("extension")):
                issues.append(ValidationIssue(f"{rt}.{alias}", "required element is missing"))
    for prefix, members in info.choice_groups.items():
        present = [m for m in members if data.get(m) is not None]
        if len(present) > 1:
            issues.append(ValidationIssue(f"{rt}.{prefix}[x]", f"more than one choice given: {', '.join(sorted(present))}"))
        elif not present and prefix in info.required_groups:
            issues.append(ValidationIssue(f"{rt}.{prefix}[x]", "required element is missing"))
    return issues


def _check_codes(info: _ModelInfo, rt: str, data: dict[str, Any]) -> list[ValidationIssue]:
    issues = []
    for element, allowed in info.codes.items():
        value = data.get(element)
        if value is None:
            continue
        values = value if type(value) is list else [value]
        for i, v in enumerate(values):
            if type(v) is str and v not in allowed:
                path = f"{rt}.{element}" + (f"[{i}]" if type(value) is list else "")
                issues.append(
                    ValidationIssue(path, f"code {short_repr(v)} is not in the required value set ({', '.join(sorted(allowed))})")
                )
    if rt == "Observation":
        _check_comparator(data.get("valueQuantity"), f"{rt}.valueQuantity", issues)
        components = data.get("component")
        if type(components) is list:
            for i, comp in enumerate(components):
                if type(comp) is dict:
                    _check_comparator(comp.get("valueQuantity"), f"{rt}.component[{i}].valueQuantity", issues)
    return issues


def _check_comparator(quantity: Any, path: str, issues: list[ValidationIssue]) -> None:
    if type(quantity) is dict:
        comparator = quantity.get("comparator")
        if type(comparator) is str and comparator not in _COMPARATORS:
            issues.append(
                ValidationIssue(f"{path}.comparator", f"code {short_repr(comparator)} is not in the required value set (<, <=, >, >=)")
            )


# --- pydantic error -> element path and short message --------------------------------------------

_FIELD_NAME = re.compile(r"^_?[A-Za-z][A-Za-z0-9]*$")
_SPEC_REGEX = re.compile(r"(\w+) value string does not match spec regex")
_CHOICE_MULTI = re.compile(r"Any of one field value is expected from this list \[(.*)\], but got multiple")
_CHOICE_MISSING = re.compile(r"Expect any of field value from this list \[(.*)\]")
_TYPE_NAMES = {
    "Decimal": "decimal",
    "DateTime": "dateTime",
    "Date": "date",
    "Time": "time",
    "Instant": "instant",
    "Integer": "integer",
    "PositiveInt": "positiveInt",
    "UnsignedInt": "unsignedInt",
    "Uri": "uri",
    "Url": "url",
    "Canonical": "canonical",
    "Code": "code",
    "Id": "id",
    "Oid": "oid",
    "Uuid": "uuid",
    "Base64Binary": "base64Binary",
    "Markdown": "markdown",
    "String": "string",
    "Boolean": "boolean",
}


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:200] if text.strip() else ""


def _path(rt: str, loc: tuple[Any, ...]) -> str:
    path = rt
    for part in loc:
        if type(part) is int:
            path += f"[{part}]"
        elif type(part) is str:
            if part == "resource_type":
                part = "resourceType"
            if part != "root" and _FIELD_NAME.match(part):
                path += "." + part
    return path


def _scalar(value: Any) -> bool:
    return value is None or type(value) in (str, int, float, bool)


def _convert(rt: str, err: Any) -> ValidationIssue:
    etype = err.get("type", "")
    msg = str(err.get("msg", "")).strip()
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    loc = tuple(err.get("loc", ()))
    value = err.get("input")
    path = _path(rt, loc)

    m = _CHOICE_MULTI.search(msg)
    if m:
        names = [n.strip(" '\"") for n in m.group(1).split(",")]
        present = [n for n in names if isinstance(value, dict) and n in value]
        return ValidationIssue(_choice_path(path, names), f"more than one choice given: {', '.join(present) or ', '.join(names)}")
    m = _CHOICE_MISSING.search(msg)
    if m:
        names = [n.strip(" '\"") for n in m.group(1).split(",")]
        return ValidationIssue(_choice_path(path, names), "required element is missing")
    if etype in ("missing", "model_field_validation.missing"):
        return ValidationIssue(path, "required element is missing")
    if etype == "extra_forbidden":
        return ValidationIssue(path, "unknown element")
    if etype == "fhir-validation-wrong-resource-type":
        return ValidationIssue(f"{rt}.resourceType", f"wrong resource type {short_repr(value)}")
    m = _SPEC_REGEX.search(msg)
    if m:
        tname = _TYPE_NAMES.get(m.group(1), m.group(1))
        article = "an" if tname[:1] in "aeiou" else "a"
        return ValidationIssue(path, f"value is not {article} {tname}: {short_repr(value)}")
    if etype.startswith(("datetime", "date", "time")):
        detail = msg.split(",", 1)[1].strip() if "," in msg else msg
        return ValidationIssue(path, f"value is not a valid date/time: {short_repr(value)} ({detail})")
    if etype == "string_type":
        return ValidationIssue(path, f"value is not a string: {short_repr(value)}")
    if etype in ("bool_type", "bool_parsing"):
        return ValidationIssue(path, f"value is not a boolean: {short_repr(value)}")
    if etype in ("int_type", "int_parsing", "int_from_float"):
        return ValidationIssue(path, f"value is not an integer: {short_repr(value)}")
    if etype in ("decimal_type", "decimal_parsing", "float_type", "float_parsing"):
        return ValidationIssue(path, f"value is not a decimal: {short_repr(value)}")
    if etype == "list_type" and "None is not allowed" in msg:
        return ValidationIssue(path, "null is not allowed in an array of elements")
    if etype == "string_pattern_mismatch":
        return ValidationIssue(path, f"value has an invalid format: {short_repr(value)}")
    if etype == "list_type":
        return ValidationIssue(path, f"expected an array, got {json_kind(value)}")
    if etype in ("json_invalid", "dict_type", "model_type", "model_attributes_type") or (
        etype == "model_validation_format" and not isinstance(value, dict)
    ):
        return ValidationIssue(path, f"expected an object, got {json_kind(value)}" + (f": {short_repr(value)}" if _scalar(value) else ""))
    if etype in ("less_than_equal", "greater_than_equal", "less_than", "greater_than"):
        return ValidationIssue(path, f"{_first_line(msg).lower()}: {short_repr(value)}")
    text = _first_line(msg) or etype
    if _scalar(value) and value is not None:
        text += f": {short_repr(value)}"
    return ValidationIssue(path, text)


def _choice_path(path: str, names: list[str]) -> str:
    if not names:
        return path
    prefix = os.path.commonprefix(names)
    if prefix in names:  # e.g. valueDate / valueDateTime: drop the type word
        prefix = re.sub(r"[A-Z][a-z0-9]*$", "", prefix)
    return f"{path}.{prefix or names[0]}[x]"
