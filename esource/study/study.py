"""A study ready to map: its map (validated), its ODM metadata (loaded with odmlib), compiled
selectors, and the cross-checks between the two, done once at load time."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from esource.errors import StudyConfigError
from esource.mapping.fhirpath import compile_first_of_with_path, compile_selector, top_level_elements
from esource.study.mapspec import (
    FindingsForm,
    HistoryForm,
    MedicationsForm,
    StudyMapSpec,
    SubjectForm,
    TestDef,
    Visit,
    _LineMap,
    _load_yaml,
    load_map_spec,
)
from esource.study.metadata import StudyMetadata, load_metadata

MAPS_DIR_ENV = "ESOURCE_MAPS_DIR"

# data types the engine writes for each role, as ODM 1.3.2 DataType values
_DATE_TYPES = {"date", "partialDate", "datetime", "partialDatetime", "text", "string"}
_ROLE_TYPES: dict[str, set[str]] = {
    "birth_year": {"integer", "partialDate", "text", "string"},
    "sex": {"text", "string"},
    "testcd": {"text", "string"},
    "result": {"float", "double", "integer", "text", "string"},
    "unit": {"text", "string"},
    "date": _DATE_TYPES,
    "time": {"time", "partialTime", "text", "string"},
    "range_low": {"float", "double", "integer", "text", "string"},
    "range_high": {"float", "double", "integer", "text", "string"},
    "nrind": {"text", "string"},
    "term": {"text", "string"},
    "code": {"text", "string"},
    "code_system": {"text", "string"},
    "category": {"text", "string"},
    "start": _DATE_TYPES,
    "end": _DATE_TYPES,
    "ongoing": {"text", "string"},
    "treatment": {"text", "string"},
    "dose": {"float", "double", "integer", "text", "string"},
    "dose_unit": {"text", "string"},
    "route": {"text", "string"},
    "frequency": {"text", "string"},
}


def builtin_maps_dir() -> Path:
    import esource.builtin_maps as pkg

    return Path(pkg.__file__).parent


def find_study_dir(study: str) -> Path:
    """A study is a folder: `<maps dir>/<STUDY>/map.yaml`; ESOURCE_MAPS_DIR adds a directory to search."""
    candidates = []
    env = os.environ.get(MAPS_DIR_ENV)
    if env:
        candidates.append(Path(env) / study)
    candidates.append(builtin_maps_dir() / study)
    p = Path(study)
    if (p / "map.yaml").exists():
        return p
    for c in candidates:
        if (c / "map.yaml").exists():
            return c
    raise StudyConfigError(study, f"no study map found (looked for map.yaml in {', '.join(map(str, candidates))})")


@dataclass(frozen=True, slots=True)
class TestRef:
    form_oid: str
    test_code: str
    spec: TestDef


@dataclass
class CompiledForm:
    oid: str
    spec: Any  # one of the *Form models
    selectors: dict[str, Callable[[Any], Any]] = field(default_factory=dict)
    lists: dict[str, Callable[[Any], list[Any]]] = field(default_factory=dict)


@dataclass
class Study:
    directory: Path
    map_file: Path
    spec: StudyMapSpec
    metadata: StudyMetadata
    forms: dict[str, CompiledForm]
    # (code system URI, code) -> test, for every findings form
    test_index: dict[tuple[str, str], TestRef]
    panel_codes: frozenset[tuple[str, str]]
    system_key: dict[str, str]  # URI -> key in systems.yaml ("loinc", "snomed"...)

    @property
    def oid(self) -> str:
        return self.spec.study.oid

    @property
    def metadata_version_oid(self) -> str:
        return self.spec.study.metadata_version_oid

    def scheduled_visits(self, form_oid: str) -> list[Visit]:
        return [v for v in self.spec.visits if form_oid in v.forms and not v.unscheduled and not v.log]

    def unscheduled_visit(self, form_oid: str) -> Visit | None:
        for v in self.spec.visits:
            if v.unscheduled and form_oid in v.forms:
                return v
        return None

    def uris(self, key: str) -> list[str]:
        return self.spec.systems.get(key, [key])

    def review_mode(self, form_oid: str) -> str:
        """The form's review-before-send policy in the map (`auto` for a form the map does not list);
        a data manager's stored override wins at run time (esource.reconciliation.policy)."""
        form = self.spec.forms.get(form_oid)
        return form.review if form is not None else "auto"


def _check_privacy(spec: StudyMapSpec, map_file: Path, lines: _LineMap) -> None:
    forbidden = spec.privacy.never_read
    for name, form in spec.forms.items():
        resources = [form.resource] if hasattr(form, "resource") else list(form.resources)
        for sel_name, expr in form.select.items():
            for e in [expr] if isinstance(expr, str) else expr:
                for element in top_level_elements(e):
                    for res in resources:
                        if f"{res}.{element}" in forbidden or element in forbidden:
                            raise StudyConfigError(
                                str(map_file),
                                f"selector {sel_name!r} reads {res}.{element}, which never leaves the hospital "
                                f"(privacy.never_read)",
                                key=f"forms.{name}.select.{sel_name}",
                                line=lines.line_for(("forms", name, "select", sel_name)),
                            )


def _compile_form(name: str, form: Any, map_file: Path, lines: _LineMap) -> CompiledForm:
    cf = CompiledForm(oid=name, spec=form)
    for sel_name, expr in form.select.items():
        try:
            cf.selectors[sel_name] = compile_first_of_with_path(expr)
            if isinstance(expr, str):
                cf.lists[sel_name] = compile_selector(expr)
            else:
                subs = [compile_selector(e) for e in expr]
                cf.lists[sel_name] = lambda node, subs=subs: [x for s in subs for x in s(node)]
        except ValueError as exc:
            raise StudyConfigError(str(map_file), str(exc), key=f"forms.{name}.select.{sel_name}",
                                   line=lines.line_for(("forms", name, "select", sel_name))) from None
    return cf


class _Checker:
    """Map ↔ ODM metadata cross-checks; the first problem raises, naming the key and line."""

    def __init__(self, spec: StudyMapSpec, md: StudyMetadata, map_file: Path, lines: _LineMap) -> None:
        self.spec, self.md, self.file, self.lines = spec, md, map_file, lines

    def fail(self, problem: str, *path: Any) -> None:
        key = ".".join(str(p) for p in path) if path else None
        raise StudyConfigError(str(self.file), problem, key=key, line=self.lines.line_for(tuple(path)))

    def codelist_values(self, item_oid: str) -> set[str] | None:
        cl = self.md.codelist_for(item_oid)
        return set(cl.items) if cl else None

    def in_codelist(self, item_oid: str, values: set[str], *path: Any) -> None:
        allowed = self.codelist_values(item_oid)
        if allowed is None:
            return
        missing = sorted(v for v in values if v not in allowed)
        if missing:
            cl = self.md.codelist_for(item_oid)
            self.fail(f"value(s) {missing} for {item_oid} are not in its codelist {cl.oid if cl else ''}", *path)

    def run(self) -> None:
        spec, md = self.spec, self.md
        if spec.study.oid != md.study_oid:
            self.fail(f"study OID {spec.study.oid} differs from the metadata's {md.study_oid}", "study", "oid")
        if spec.study.metadata_version_oid != md.metadata_version_oid:
            self.fail(f"MetaDataVersion {spec.study.metadata_version_oid} is not in the metadata "
                      f"(it has {md.metadata_version_oid})", "study", "metadata_version_oid")
        for i, v in enumerate(spec.visits):
            ev = md.study_events.get(v.oid)
            if ev is None:
                self.fail(f"StudyEventOID {v.oid} is not defined in the metadata", "visits", i)
            if set(v.forms) != set(ev.form_oids):
                self.fail(f"{v.oid} collects {sorted(ev.form_oids)} in the metadata but the map says {sorted(v.forms)}",
                          "visits", i)
            if v.unscheduled and not ev.repeating:
                self.fail(f"{v.oid} is unscheduled (one repeat per date) but not Repeating in the metadata", "visits", i)
        for name, form in spec.forms.items():
            fd = md.forms.get(name)
            if fd is None:
                self.fail(f"FormOID {name} is not defined in the metadata", "forms", name)
            if form.item_group not in fd.item_group_oids:
                self.fail(f"ItemGroupOID {form.item_group} is not part of {name} in the metadata", "forms", name, "item_group")
            group = md.item_groups[form.item_group]
            for role, item_oid in form.items.items():
                if item_oid not in md.items:
                    self.fail(f"ItemOID {item_oid} is not defined in the metadata", "forms", name, "items", role)
                if item_oid not in group.item_oids:
                    self.fail(f"ItemOID {item_oid} is not in item group {form.item_group}", "forms", name, "items", role)
                item = md.items[item_oid]
                allowed = _ROLE_TYPES.get(role)
                if allowed and item.data_type not in allowed:
                    self.fail(f"{item_oid} has DataType {item.data_type}; the {role} role writes {sorted(allowed)}",
                              "forms", name, "items", role)
                alias = form.cdash.get(role)
                if item.cdash_alias and alias and item.cdash_alias != alias:
                    self.fail(f"{item_oid} is CDASH {item.cdash_alias} in the metadata but the {form.template} "
                              f"template fills {alias} with it", "forms", name, "items", role)
            if isinstance(form, FindingsForm):
                self.check_findings(name, form)
            elif isinstance(form, SubjectForm):
                if "sex" in form.items:
                    self.in_codelist(form.items["sex"], set(form.codes.get("sex", {}).values()), "forms", name, "codes")
            elif isinstance(form, HistoryForm):
                if "category" in form.items:
                    self.in_codelist(form.items["category"], set(form.codes.get("category", {}).values()),
                                     "forms", name, "codes")
                if "ongoing" in form.items:
                    vals = set(form.codes.get("ongoing", {}).values())
                    if form.codes.get("ongoing_absent"):
                        vals.add(form.codes["ongoing_absent"])
                    self.in_codelist(form.items["ongoing"], vals, "forms", name, "codes")
            elif isinstance(form, MedicationsForm):
                codes = form.codes
                for role, key in (("dose_unit", "dose_unit"), ("route", "route")):
                    if role in form.items:
                        vals = {v for table in codes.get(key, {}).values() for v in table.values()}
                        self.in_codelist(form.items[role], vals, "forms", name, "codes", key)
                if "frequency" in form.items:
                    fq = codes.get("frequency", {})
                    vals = set(fq.get("per_period", {}).values()) | set(fq.get("when", {}).values()) | set(
                        fq.get("v3_timing", {}).values())
                    if fq.get("as_needed"):
                        vals.add(fq["as_needed"])
                    self.in_codelist(form.items["frequency"], vals, "forms", name, "codes", "frequency")
                if "ongoing" in form.items:
                    self.in_codelist(form.items["ongoing"], {"Y", "N"}, "forms", name, "items", "ongoing")

    def check_findings(self, name: str, form: FindingsForm) -> None:
        md = self.md
        self.in_codelist(form.items["testcd"], set(form.tests), "forms", name, "tests")
        if "unit" in form.items:
            self.in_codelist(form.items["unit"], {t.label for t in form.tests.values()}, "forms", name, "tests")
        if "nrind" in form.items:
            self.in_codelist(form.items["nrind"], set(form.codes.get("nrind", {}).values()), "forms", name, "codes")
        result = md.items[form.items["result"]]
        for test, spec in form.tests.items():
            if result.significant_digits is not None and spec.decimals > result.significant_digits:
                self.fail(f"{test} has {spec.decimals} decimals but {result.oid} allows "
                          f"SignificantDigits={result.significant_digits}", "forms", name, "tests", test, "decimals")
            if result.data_type == "integer" and spec.decimals:
                self.fail(f"{test} has decimals but {result.oid} is an integer", "forms", name, "tests", test)


@lru_cache(maxsize=16)
def _load_study_cached(directory: str, mtime_key: tuple[float, ...]) -> Study:
    return _load_study(Path(directory))


def load_study(study: str | Path) -> Study:
    """Load and check a study (cached per folder while its files are unchanged)."""
    d = find_study_dir(str(study))
    files = sorted(d.glob("*.yaml")) + sorted(d.glob("*.xml")) + sorted((d.parent / "_cdash").glob("*.yaml"))
    return _load_study_cached(str(d.resolve()), tuple(f.stat().st_mtime for f in files))


def _load_study(directory: Path) -> Study:
    map_file = directory / "map.yaml"
    spec = load_map_spec(map_file)
    _, lines = _load_yaml(map_file)
    md_path = directory / spec.study.metadata
    md = load_metadata(md_path, spec.study.metadata_version_oid)
    _check_privacy(spec, map_file, lines)
    _Checker(spec, md, map_file, lines).run()

    forms = {name: _compile_form(name, f, map_file, lines) for name, f in spec.forms.items()}
    system_key: dict[str, str] = {}
    for key, uris in spec.systems.items():
        for uri in uris:
            system_key[uri] = key
    test_index: dict[tuple[str, str], TestRef] = {}
    panels: set[tuple[str, str]] = set()
    for name, form in spec.forms.items():
        if isinstance(form, FindingsForm):
            for uri in spec.systems.get(form.code_system, [form.code_system]):
                for test, tdef in form.tests.items():
                    for code in tdef.codes:
                        if (uri, code) in test_index:
                            other = test_index[(uri, code)]
                            raise StudyConfigError(str(map_file), f"code {code} maps to both {other.form_oid}/"
                                                   f"{other.test_code} and {name}/{test}",
                                                   key=f"forms.{name}.tests.{test}.codes",
                                                   line=lines.line_for(("forms", name, "tests", test, "codes")))
                        test_index[(uri, code)] = TestRef(name, test, tdef)
                for code in form.panels:
                    panels.add((uri, code))
    return Study(directory=directory, map_file=map_file, spec=spec, metadata=md, forms=forms,
                 test_index=test_index, panel_codes=frozenset(panels), system_key=system_key)
