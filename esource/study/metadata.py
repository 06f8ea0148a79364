"""A study's ODM 1.3.2 metadata (the eCRF design), loaded into plain frozen dataclasses.

`load_metadata` checks the file against the ODM 1.3.2 XSD first (so a broken file is reported with its
line number), then reads it with odmlib, then checks that every reference points to a definition.
Any problem raises `StudyConfigError` naming the file, the line or OID, and what is wrong.

Everything downstream (map checks, the mapping engine, the ODM writer) reads `StudyMetadata`, never
odmlib objects: the dicts keep the file's order, which is the eCRF's order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from lxml import etree

from esource.errors import IntakeError, StudyConfigError
from esource.odm import xsd

NCI_ALIAS_CONTEXT = "nci:ExtCodeID"
CDASH_ALIAS_CONTEXT = "CDASH"
_ODM_NS = xsd.ODM_NAMESPACES["1.3.2"]


@dataclass(frozen=True, slots=True)
class CodeListItem:
    coded_value: str
    decode: str | None  # the English decode (else the first one)
    nci_code: str | None  # Alias Context="nci:ExtCodeID"


@dataclass(frozen=True, slots=True)
class CodeList:
    oid: str
    name: str
    data_type: str
    items: dict[str, CodeListItem]  # by coded value, in file order
    nci_code: str | None

    def __contains__(self, coded_value: object) -> bool:
        return coded_value in self.items


@dataclass(frozen=True, slots=True)
class RangeCheckDef:
    comparator: str | None  # LT LE GT GE EQ NE IN NOTIN (optional in ODM 1.3.2)
    soft_hard: str  # "Soft" | "Hard"
    values: tuple[str, ...]  # the CheckValues


@dataclass(frozen=True, slots=True)
class ItemDef:
    oid: str
    name: str
    data_type: str
    length: int | None
    significant_digits: int | None
    codelist_oid: str | None
    range_checks: tuple[RangeCheckDef, ...]
    cdash_alias: str | None


@dataclass(frozen=True, slots=True)
class ItemGroupDef:
    oid: str
    name: str
    repeating: bool
    item_oids: tuple[str, ...]  # by ItemRef OrderNumber, else file order


@dataclass(frozen=True, slots=True)
class FormDef:
    oid: str
    name: str
    repeating: bool
    item_group_oids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StudyEventDef:
    oid: str
    name: str
    repeating: bool
    type: str  # Scheduled | Unscheduled | Common
    form_oids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StudyMetadata:
    study_oid: str
    metadata_version_oid: str
    source_file: str
    study_events: dict[str, StudyEventDef]
    forms: dict[str, FormDef]
    item_groups: dict[str, ItemGroupDef]
    items: dict[str, ItemDef]
    codelists: dict[str, CodeList]
    # StudyEventOIDs in Protocol order (StudyEventRef OrderNumber); empty when the file has no Protocol
    protocol_event_oids: tuple[str, ...] = field(default=())

    def codelist_for(self, item_oid: str) -> CodeList | None:
        """The CodeList of an item (None if the item has none). KeyError for an unknown item."""
        item = self.items[item_oid]
        return self.codelists[item.codelist_oid] if item.codelist_oid else None

    def item_groups_of_form(self, form_oid: str) -> tuple[ItemGroupDef, ...]:
        return tuple(self.item_groups[oid] for oid in self.forms[form_oid].item_group_oids)

    def item_group_of_form(self, form_oid: str) -> ItemGroupDef:
        """The form's item group. KeyError for an unknown form; ValueError unless it has exactly one."""
        groups = self.item_groups_of_form(form_oid)
        if len(groups) != 1:
            raise ValueError(
                f"form {form_oid} has {len(groups)} item groups ({', '.join(g.oid for g in groups) or 'none'}); "
                "use item_groups_of_form"
            )
        return groups[0]

    def forms_of_event(self, event_oid: str) -> tuple[FormDef, ...]:
        """The event's forms in FormRef order. KeyError for an unknown event."""
        return tuple(self.forms[oid] for oid in self.study_events[event_oid].form_oids)

    def event_order(self) -> tuple[str, ...]:
        """StudyEventOIDs in Protocol order, then any event the Protocol does not list (file order)."""
        listed = [oid for oid in self.protocol_event_oids if oid in self.study_events]
        seen = set(listed)
        return tuple(listed + [oid for oid in self.study_events if oid not in seen])


# --------------------------------------------------------------------------------------------------
# loading


def load_metadata(path: str | os.PathLike[str], metadata_version_oid: str | None = None) -> StudyMetadata:
    """Load one study's ODM 1.3.2 metadata file.

    `metadata_version_oid` picks the MetaDataVersion; None is allowed only when the file has exactly one.
    Raises `StudyConfigError` for a file that cannot be read, is not valid ODM 1.3.2 (with the XSD
    error's line), has no such MetaDataVersion, or holds a reference to an undefined OID.
    """
    file = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise StudyConfigError(file, f"cannot read the ODM metadata file: {exc.strerror or exc}") from None

    try:
        root = xsd.safe_parse(data, file)
    except IntakeError as exc:
        line = _line_from_problem(exc.problem)
        raise StudyConfigError(file, exc.problem, line=line) from None
    problems = xsd.validate_tree(root, "1.3.2")
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more schema problem(s))" if len(problems) > 1 else ""
        raise StudyConfigError(file, f"not valid ODM 1.3.2: {first.message}{more}", line=first.line)

    mdv_el = _pick_metadata_version(root, file, metadata_version_oid)
    study_el = mdv_el.getparent()
    study_index = list(root.iterfind(f"{{{_ODM_NS}}}Study")).index(study_el)
    mdv_index = list(study_el.iterfind(f"{{{_ODM_NS}}}MetaDataVersion")).index(mdv_el)

    mdv = _load_with_odmlib(data, file, study_index, mdv_index)
    _check_references(mdv, root, mdv_el, file)
    return _build(mdv, str(study_el.get("OID")), file)


def _line_from_problem(problem: str) -> int | None:
    if problem.startswith("line "):
        head = problem[5:].split(":", 1)[0]
        if head.isdigit():
            return int(head)
    return None


def _pick_metadata_version(root: etree._Element, file: str, wanted: str | None) -> etree._Element:
    studies = list(root.iterfind(f"{{{_ODM_NS}}}Study"))
    if not studies:
        raise StudyConfigError(file, "the file has no Study element: study metadata is expected", line=root.sourceline)
    mdvs = [m for s in studies for m in s.iterfind(f"{{{_ODM_NS}}}MetaDataVersion")]
    if not mdvs:
        raise StudyConfigError(file, "the file has no MetaDataVersion", line=studies[0].sourceline)
    if wanted is None:
        if len(mdvs) > 1:
            oids = ", ".join(str(m.get("OID")) for m in mdvs)
            raise StudyConfigError(
                file, f"the file holds {len(mdvs)} MetaDataVersions ({oids}): say which one to use", line=mdvs[1].sourceline
            )
        return mdvs[0]
    for m in mdvs:
        if m.get("OID") == wanted:
            return m
    oids = ", ".join(str(m.get("OID")) for m in mdvs)
    raise StudyConfigError(file, f"MetaDataVersion {wanted} is not in the file (it has {oids})", key=wanted)


def _load_with_odmlib(data: bytes, file: str, study_index: int, mdv_index: int) -> Any:
    # Imported here: odmlib is only needed when a study is loaded, not by every esource import.
    import odmlib.loader as odm_loader_facade
    import odmlib.odm_loader as odm_loader

    try:
        loader = odm_loader_facade.ODMLoader(odm_loader.XMLODMLoader(model_package="odm_1_3_2"))
        loader.load_odm_string(data)  # bytes: the XML declaration's encoding is honoured
        study = loader.Study(study_index)
        return study.MetaDataVersion[mdv_index]
    except Exception as exc:  # odmlib raises many types (type checks, parsing): report them all the same way
        raise StudyConfigError(file, f"odmlib could not load the metadata: {exc}") from None


# -- referential integrity


def _check_references(mdv: Any, root: etree._Element, mdv_el: etree._Element, file: str) -> None:
    """Raise for the first reference (in file order) to an OID that has no definition."""
    events = {e.OID for e in mdv.StudyEventDef}
    forms = {f.OID for f in mdv.FormDef}
    groups = {g.OID for g in mdv.ItemGroupDef}
    items = {i.OID for i in mdv.ItemDef}
    codelists = {c.OID for c in mdv.CodeList}
    units = {str(u.get("OID")) for u in root.iterfind(f"{{{_ODM_NS}}}Study/{{{_ODM_NS}}}BasicDefinitions/{{{_ODM_NS}}}MeasurementUnit")}

    # (element name, attribute, defined OIDs, what it names) — checked on the lxml tree so the first
    # dangling reference in file order is the one reported, with its line.
    rules = {
        "StudyEventRef": ("StudyEventOID", events, "StudyEventDef"),
        "FormRef": ("FormOID", forms, "FormDef"),
        "ItemGroupRef": ("ItemGroupOID", groups, "ItemGroupDef"),
        "ItemRef": ("ItemOID", items, "ItemDef"),
        "CodeListRef": ("CodeListOID", codelists, "CodeList"),
        "MeasurementUnitRef": ("MeasurementUnitOID", units, "MeasurementUnit (BasicDefinitions)"),
    }
    for el in mdv_el.iter(*(f"{{{_ODM_NS}}}{name}" for name in rules)):
        name = etree.QName(el).localname
        attr, defined, target = rules[name]
        oid = el.get(attr)
        if oid not in defined:
            owner = _owner_label(el)
            raise StudyConfigError(
                file,
                f"{name} {attr}=\"{oid}\"{owner} points to no {target} in MetaDataVersion {mdv.OID}",
                key=oid,
                line=el.sourceline,
            )


def _owner_label(el: etree._Element) -> str:
    parent = el.getparent()
    while parent is not None and parent.get("OID") is None:
        parent = parent.getparent()
    if parent is None or etree.QName(parent).localname == "MetaDataVersion":
        return ""
    return f" in {etree.QName(parent).localname} {parent.get('OID')}"


# -- conversion to dataclasses


def _ordered(refs: Iterable[Any]) -> list[Any]:
    """Refs by OrderNumber when given (stable, unnumbered ones after), else in file order."""
    refs = list(refs)
    return sorted(refs, key=lambda r: (r.OrderNumber is None, r.OrderNumber if r.OrderNumber is not None else 0))


def _yes(value: Any) -> bool:
    return str(value) == "Yes"


def _alias(aliases: Iterable[Any], context: str) -> str | None:
    for a in aliases:
        if a.Context == context:
            return str(a.Name)
    return None


def _text(translated: Any) -> str | None:
    if translated is None:
        return None
    texts = list(translated.TranslatedText)
    for t in texts:
        if getattr(t, "lang", None) == "en":
            return t._content
    return texts[0]._content if texts else None


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _build(mdv: Any, study_oid: str, file: str) -> StudyMetadata:
    protocol_oids: tuple[str, ...] = ()
    if mdv.Protocol is not None:
        protocol_oids = tuple(r.StudyEventOID for r in _ordered(mdv.Protocol.StudyEventRef))

    events = {
        e.OID: StudyEventDef(
            oid=e.OID,
            name=e.Name,
            repeating=_yes(e.Repeating),
            type=str(e.Type),
            form_oids=tuple(r.FormOID for r in _ordered(e.FormRef)),
        )
        for e in mdv.StudyEventDef
    }
    forms = {
        f.OID: FormDef(
            oid=f.OID,
            name=f.Name,
            repeating=_yes(f.Repeating),
            item_group_oids=tuple(r.ItemGroupOID for r in _ordered(f.ItemGroupRef)),
        )
        for f in mdv.FormDef
    }
    groups = {
        g.OID: ItemGroupDef(
            oid=g.OID,
            name=g.Name,
            repeating=_yes(g.Repeating),
            item_oids=tuple(r.ItemOID for r in _ordered(g.ItemRef)),
        )
        for g in mdv.ItemGroupDef
    }
    items = {
        i.OID: ItemDef(
            oid=i.OID,
            name=i.Name,
            data_type=str(i.DataType),
            length=_int_or_none(i.Length),
            significant_digits=_int_or_none(i.SignificantDigits),
            codelist_oid=i.CodeListRef.CodeListOID if i.CodeListRef is not None else None,
            range_checks=tuple(
                RangeCheckDef(
                    comparator=rc.Comparator,
                    soft_hard=str(rc.SoftHard),
                    values=tuple(str(cv._content) for cv in rc.CheckValue),
                )
                for rc in i.RangeCheck
            ),
            cdash_alias=_alias(i.Alias, CDASH_ALIAS_CONTEXT),
        )
        for i in mdv.ItemDef
    }
    codelists: dict[str, CodeList] = {}
    for c in mdv.CodeList:
        entries: dict[str, CodeListItem] = {}
        for cli in c.CodeListItem:
            entries[cli.CodedValue] = CodeListItem(
                coded_value=cli.CodedValue, decode=_text(cli.Decode), nci_code=_alias(cli.Alias, NCI_ALIAS_CONTEXT)
            )
        for en in c.EnumeratedItem:
            entries[en.CodedValue] = CodeListItem(
                coded_value=en.CodedValue, decode=None, nci_code=_alias(en.Alias, NCI_ALIAS_CONTEXT)
            )
        codelists[c.OID] = CodeList(
            oid=c.OID,
            name=c.Name,
            data_type=str(c.DataType),
            items=entries,
            nci_code=_alias(c.Alias, NCI_ALIAS_CONTEXT),
        )
    return StudyMetadata(
        study_oid=study_oid,
        metadata_version_oid=mdv.OID,
        source_file=file,
        study_events=events,
        forms=forms,
        item_groups=groups,
        items=items,
        codelists=codelists,
        protocol_event_oids=protocol_oids,
    )
