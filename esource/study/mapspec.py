"""The declarative study map: its schema (pydantic, strict) and its loader.

A study map is YAML in `cdisc_maps/<STUDY>/map.yaml`. Each form names a shared CDASH template in
`cdisc_maps/_cdash/` (selectors, statuses, standard code maps); the study's own keys override the
template's. Every error names the file, the line and the key path, and what is wrong.
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from esource.errors import StudyConfigError

TEMPLATES_DIR = "_cdash"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class StudySection(_Strict):
    oid: str
    metadata_version_oid: str
    metadata: str
    subject_key_pattern: str | None = None
    sites: list[str] = Field(min_length=1)
    default_consent_offset_days: int = -28

    @field_validator("subject_key_pattern")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return v


class StudyDays(_Strict):
    day_zero: bool = False


class Visit(_Strict):
    oid: str
    forms: list[str] = Field(min_length=1)
    window: tuple[int, int] | None = None
    target: int | Literal["latest", "earliest"] | None = None
    unscheduled: bool = False
    repeat_key: Literal["date"] | None = None
    log: bool = False

    @model_validator(mode="after")
    def _shape(self) -> "Visit":
        if self.log:
            if self.window or self.target is not None or self.unscheduled:
                raise ValueError("a log event (log: true) has no window, target or unscheduled flag")
            return self
        if self.window is None:
            raise ValueError("a visit needs a window [first day, last day] (or log: true)")
        lo, hi = self.window
        if lo > hi:
            raise ValueError(f"window starts after it ends: [{lo}, {hi}]")
        if self.unscheduled:
            if self.repeat_key is None:
                raise ValueError("an unscheduled visit needs repeat_key (e.g. date)")
            if self.target is not None:
                raise ValueError("an unscheduled visit has no target day (one repeat per date)")
        else:
            if self.target is None:
                raise ValueError("a scheduled visit needs a target day (a study day, or latest/earliest)")
            if isinstance(self.target, int) and not lo <= self.target <= hi:
                raise ValueError(f"target day {self.target} is outside the window [{lo}, {hi}]")
        return self


class Units(_Strict):
    synonyms: dict[str, str] = Field(default_factory=dict)


class Privacy(_Strict):
    birth_date_precision: Literal["month", "year"] = "month"
    never_read: list[str] = Field(default_factory=list)


class Conversion(_Strict):
    """value_standard = value × multiply ÷ divide + add, for one source unit (optionally only some codes)."""

    from_unit: str = Field(alias="from")
    multiply: Decimal = Decimal(1)
    divide: Decimal = Decimal(1)
    add: Decimal = Decimal(0)
    codes: list[str] | None = None

    @field_validator("divide")
    @classmethod
    def _nonzero(cls, v: Decimal) -> Decimal:
        if v == 0:
            raise ValueError("divide must not be 0")
        return v


class TestDef(_Strict):
    codes: list[str] = Field(min_length=1)
    unit: str
    label: str
    decimals: int = Field(ge=0, le=10)
    range: tuple[Decimal, Decimal] | None = None
    conversions: list[Conversion] = Field(default_factory=list)

    @field_validator("codes", mode="before")
    @classmethod
    def _codes_as_text(cls, v: Any) -> Any:
        return [str(c) for c in v] if isinstance(v, list) else v

    @field_validator("range")
    @classmethod
    def _ordered(cls, v: tuple[Decimal, Decimal] | None) -> tuple[Decimal, Decimal] | None:
        if v is not None and v[0] > v[1]:
            raise ValueError(f"range low {v[0]} is above high {v[1]}")
        return v


Selector = Union[str, list[str]]


class _FormBase(_Strict):
    template: str
    item_group: str
    items: dict[str, str]
    cdash: dict[str, str]
    select: dict[str, Selector]
    validate_elements: list[str] = Field(default_factory=list)
    codes: dict[str, Any] = Field(default_factory=dict)
    # review-before-send: `auto` sends values at once; `adjudicate` holds them (REVIEW_REQUIRED
    # discrepancies) until an authorised user approves (esource.reconciliation.policy)
    review: Literal["auto", "adjudicate"] = "auto"

    ROLES: frozenset[str] = frozenset()

    @model_validator(mode="after")
    def _roles(self) -> "_FormBase":
        unknown = sorted(set(self.items) - set(self.cdash))
        if unknown:
            raise ValueError(
                f"items has unknown role(s) {unknown}; the {self.template} template defines {sorted(self.cdash)}"
            )
        return self


class SubjectForm(_FormBase):
    kind: Literal["subject"]
    resource: Literal["Patient"]
    event: str


class StatusSets(_Strict):
    send: list[str]
    wait: list[str] = Field(default_factory=list)
    retracted: list[str] = Field(default_factory=list)


class FindingsForm(_FormBase):
    kind: Literal["findings"]
    resource: Literal["Observation"]
    statuses: StatusSets
    code_system: str
    tests: dict[str, TestDef] = Field(min_length=1)
    panels: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_codes(self) -> "FindingsForm":
        seen: dict[str, str] = {}
        for test, spec in self.tests.items():
            for code in spec.codes:
                if code in seen:
                    raise ValueError(f"code {code} is listed for both {seen[code]} and {test}")
                seen[code] = test
        for role in ("testcd", "result", "date"):
            if role not in self.items:
                raise ValueError(f"items needs the {role!r} role")
        return self


class Categories(_Strict):
    accept: list[str]
    accept_missing: bool = True


class NoInformation(_Strict):
    systems: list[str] = Field(default_factory=list)
    snomed: list[str] = Field(default_factory=list)


class HistoryForm(_FormBase):
    kind: Literal["history"]
    resources: list[Literal["Condition", "AllergyIntolerance"]]
    event: str
    categories: Categories
    excluded_verification: list[str] = Field(default_factory=list)
    no_information: NoInformation = Field(default_factory=NoInformation)
    code_preference: list[str]
    code_system_names: dict[str, str]


class MedStatuses(_Strict):
    active: list[str]
    ended: list[str] = Field(default_factory=list)
    retracted: list[str] = Field(default_factory=list)


class MedicationsForm(_FormBase):
    kind: Literal["medications"]
    resources: list[Literal["MedicationStatement", "MedicationRequest"]]
    event: str
    statuses: MedStatuses
    no_information: NoInformation = Field(default_factory=NoInformation)
    code_preference: list[str]
    code_system_names: dict[str, str]
    lookback_days: int = Field(default=30, ge=0)


FormMap = Annotated[Union[SubjectForm, FindingsForm, HistoryForm, MedicationsForm], Field(discriminator="kind")]


class StudyMapSpec(_Strict):
    study: StudySection
    study_days: StudyDays = Field(default_factory=StudyDays)
    visits: list[Visit] = Field(min_length=1)
    units: Units = Field(default_factory=Units)
    privacy: Privacy = Field(default_factory=Privacy)
    forms: dict[str, FormMap] = Field(min_length=1)
    systems: dict[str, list[str]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> "StudyMapSpec":
        oids = [v.oid for v in self.visits]
        dupes = {o for o in oids if oids.count(o) > 1}
        if dupes:
            raise ValueError(f"visit OID(s) listed twice: {sorted(dupes)}")
        for v in self.visits:
            for f in v.forms:
                if f not in self.forms:
                    raise ValueError(f"visit {v.oid} lists form {f}, which has no entry under forms")
            if not self.study_days.day_zero and v.window and 0 in range(v.window[0], v.window[1] + 1) and v.window != (0, 0):
                if v.window[0] <= 0 <= v.window[1]:
                    raise ValueError(f"visit {v.oid}: window {list(v.window)} spans day 0, which does not exist")
        for name, form in self.forms.items():
            if isinstance(form, (SubjectForm, HistoryForm, MedicationsForm)):
                if form.event not in oids:
                    raise ValueError(f"form {name}: event {form.event} is not one of the visits")
            if not any(name in v.forms for v in self.visits):
                raise ValueError(f"form {name} is collected at no visit")
        return self


# ---------------------------------------------------------------- YAML with line numbers


class _LineMap:
    """Key path -> line number, from PyYAML's node tree (so errors can name the line)."""

    def __init__(self, node: yaml.Node | None) -> None:
        self.lines: dict[tuple[Any, ...], int] = {}
        if node is not None:
            self._walk(node, ())

    def _walk(self, node: yaml.Node, path: tuple[Any, ...]) -> None:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = key_node.value
                self.lines[path + (key,)] = key_node.start_mark.line + 1
                self._walk(value_node, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, child in enumerate(node.value):
                self._walk(child, path + (i,))

    def line_for(self, path: tuple[Any, ...]) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get(())


def _load_yaml(path: Path) -> tuple[Any, _LineMap]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StudyConfigError(str(path), "file not found") from None
    except UnicodeDecodeError as exc:
        raise StudyConfigError(str(path), f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise StudyConfigError(str(path), f"not valid YAML: {problem}", line=mark.line + 1 if mark else None) from None
    return data, _LineMap(node)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _loc_text(loc: tuple[Any, ...]) -> str:
    parts = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic inserts the discriminator tag (e.g. 'findings') and 'function-after' steps into locs
    return tuple(p for p in loc if p not in {"subject", "findings", "history", "medications"} or isinstance(p, int))


def load_map_spec(map_path: Path) -> StudyMapSpec:
    """Load, merge templates into, and validate a study map. Raises StudyConfigError."""
    map_path = Path(map_path)
    data, lines = _load_yaml(map_path)
    if not isinstance(data, dict):
        raise StudyConfigError(str(map_path), "the map must be a YAML mapping with study, visits and forms", line=1)

    templates_dir = map_path.parent.parent / TEMPLATES_DIR
    template_lines: dict[str, tuple[Path, _LineMap]] = {}
    systems: dict[str, list[str]] = {}
    systems_file = templates_dir / "systems.yaml"
    if systems_file.exists():
        sys_data, _ = _load_yaml(systems_file)
        systems = dict((sys_data or {}).get("systems", {}))
    systems.update(data.get("systems") or {})

    forms = data.get("forms")
    merged_forms: dict[str, Any] = {}
    if isinstance(forms, dict):
        for name, form in forms.items():
            if not isinstance(form, dict):
                merged_forms[name] = form
                continue
            template = form.get("template")
            if not isinstance(template, str):
                raise StudyConfigError(str(map_path), "each form needs `template:` naming a CDASH template",
                                       key=f"forms.{name}", line=lines.line_for(("forms", name)))
            tpath = templates_dir / f"{template}.yaml"
            if not tpath.exists():
                available = sorted(p.stem for p in templates_dir.glob("*.yaml") if p.stem != "systems")
                raise StudyConfigError(str(map_path), f"template {template!r} not found in {templates_dir} "
                                       f"(available: {', '.join(available)})",
                                       key=f"forms.{name}.template", line=lines.line_for(("forms", name, "template")))
            tdata, tlines = _load_yaml(tpath)
            if not isinstance(tdata, dict):
                raise StudyConfigError(str(tpath), "a template must be a YAML mapping", line=1)
            template_lines[name] = (tpath, tlines)
            merged_forms[name] = _deep_merge(tdata, form)
    merged = dict(data)
    if merged_forms:
        merged["forms"] = merged_forms
    merged["systems"] = systems

    try:
        return StudyMapSpec.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = _clean_loc(tuple(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not part of the map format; check the spelling)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        file, line = str(map_path), lines.line_for(loc) if loc else None
        # an error inside a form's key that only the template defines: name the template file
        if len(loc) >= 3 and loc[0] == "forms" and loc[1] in template_lines and loc not in lines.lines:
            tpath, tlines = template_lines[loc[1]]
            if loc[2:] in tlines.lines:
                file, line = str(tpath), tlines.line_for(loc[2:])
        more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
        raise StudyConfigError(file, msg + more, key=_loc_text(loc) or None, line=line) from None
