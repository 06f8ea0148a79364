"""The connector for REDCap: esource's ODM 1.3.2 transactions imported as REDCap records through the
REDCap API (with PyCap), and a subject's records read back as ODM ClinicalData in esource's keys.

    mapping = RedcapMapping.from_metadata(load_metadata("cdisc_maps/CV01/metadata.xml"))
    connector = RedcapConnector("https://redcap.example.org/api/", token, key_map=key_map, mapping=mapping)
    receipt = connector.send(tx, odm)             # DeliveryReceipt, or raises TransientDeliveryError
    odm = connector.read_back("CV01", "001-0001")   # ODM Snapshot in esource's keys, None when unknown

The REDCap project mirrors the study (`RedcapMapping`, built from the study's ODM metadata; the naming
rule lives in `RedcapNaming` only): one event per StudyEventDef (`SE.BASELINE` -> `se_baseline_arm_1`),
one instrument per FormDef (`F.VS` -> `vs`), one field per ItemDef (`IT.VS.VSORRES` -> `vs_vsorres`),
the record id field (`record_id`) holding the SubjectKey. A form is a repeating instrument in an
event when the event, the form or one of its item groups repeats in the ODM design: REDCap cannot
nest repeats, so the ODM repeat keys of that cell (StudyEventRepeatKey, FormRepeatKey,
ItemGroupRepeatKey: a date, a test code, a log number) together are ONE esource key, mapped to an
integer `redcap_repeat_instance` through the `EdcKeyMap` (scope `<StudyEventOID>/<FormOID>` per subject;
one part: the key itself, several: a JSON list). `SE.UNSCHED[2024-06-20]/F.VS/IG.VS[HR]` becomes
instance N of `vs` in `se_unsched_arm_1` for the key `["2024-06-20","HR"]`.

Delivery (`send`), REDCap having no idempotency key:
- The ODM is turned into REDCap cells (record, event, repeat instrument, instance, field). The subject's
  record is exported first and only the cells whose value differs are imported (flat JSON,
  `returnContent=count`), so a transaction applied before its answer was lost (a timeout or a reset
  after REDCap committed, a crash of esource between the EDC's commit and its bookkeeping) is not
  applied twice: nothing differs, nothing is imported, the receipt says `duplicate`. With
  `verify_before_write=False` the export is only made for a transaction whose previous attempt
  failed ambiguously in this process (a crash then re-imports the same values: harmless, but logged
  by REDCap as a second write).
- `overwriteBehavior=overwrite` only when the import carries an Update or a Remove (a Remove is a
  blank value, which `normal` would ignore); `normal` otherwise, so REDCap never blanks a value.
- An Insert over a value REDCap already holds (different from the Insert's) is not sent: site staff
  entered it, or an instance is taken. A permanent rejection (code `INSERT_OVER_VALUE`) names the cell.
- A transaction without ItemData (every item withheld for a conflict) is accepted without a request.

How REDCap's answers map onto the EdcConnector port:
- 200 -> accepted (code "200"); nothing to import -> accepted, code "duplicate" (or "empty").
- 400 (REDCap's validation errors, `{"error": "..."}` naming record, field and value) and other 4xx ->
  a permanent rejection carrying the HTTP status as code and REDCap's own message.
- 401/403 (a wrong or revoked token, a token without API rights), to an import or an export ->
  `EdcAuthenticationError`: the dispatcher stops sending to the project and keeps every transaction
  pending; the token is never shown.
- 408, 425, 429 and 5xx (Retry-After honoured), timeouts, connection resets and unreadable answers
  -> `TransientDeliveryError` (ambiguous when the import may have been applied).

PyCap (`redcap.Project`) makes every call: `export_records` (flat JSON, the mapped fields only, so
PyCap needs no metadata call) and `import_records`. Deviations, and why:
- PyCap does not look at HTTP statuses (it parses the body and raises `RedcapError` with the body
  only), so the connector passes a requests response hook (PyCap forwards request options) that
  raises for every non-200 answer with its status, REDCap's error text and Retry-After: 429/503 stay
  distinguishable from a 400 validation error and from a 403.
- The timeout is passed to requests through PyCap's request options the same way (PyCap has none).
- PyCap asserts on the token's format with the token in the assertion message: the connector checks
  the token itself first and never lets that message out.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from lxml import etree

from esource.connectors.common import (
    Closing,
    parse_retry_after,
    redact,
    transaction_key,
    userinfo_secrets,
    without_userinfo,
)
from esource.domain.model import SubjectTransaction
from esource.domain.ports import ConnectorCapabilities, DeliveryReceipt, EdcKeyMap
from esource.errors import IntakeError
from esource.odm.xsd import ODM_NAMESPACES, safe_parse
from esource.services.dispatch import EdcAuthenticationError, TransientDeliveryError
from esource.study.metadata import ItemDef, StudyMetadata, load_metadata

__all__ = [
    "CONNECTOR_NAME", "RECORD_ID_FIELD", "RedcapNaming", "RedcapField", "RedcapMapping", "RedcapCell",
    "RedcapConnector", "redcap_name", "cells_to_items", "transaction_key",
]

CONNECTOR_NAME = "redcap"
RECORD_ID_FIELD = "record_id"
REPEAT_FIELDS = ("redcap_event_name", "redcap_repeat_instrument", "redcap_repeat_instance")
_ODM_NS = ODM_NAMESPACES["1.3.2"]
_MAX_MESSAGE = 2000
_TRANSIENT_4XX = {408, 425, 429}
_SIMPLE_CODE = re.compile(r"^[A-Za-z0-9_]+$")
_REDCAP_NAME = re.compile(r"[a-z][a-z0-9_]*")

ItemPath = tuple[str, "str | None", str, str, "str | None", str]
"""(study_event_oid, study_event_repeat_key, form_oid, item_group_oid, item_group_repeat_key, item_oid)"""


# ------------------------------------------------------------------------------------------------ naming


def redcap_name(oid: str, *, drop_prefix: str = "") -> str:
    """An OID as a REDCap name: lower case letters, digits and underscores, starting with a letter
    (`IT.VS.VSORRES` with drop_prefix "IT." -> `vs_vsorres`)."""
    text = oid
    if drop_prefix and text.upper().startswith(drop_prefix.upper()) and len(text) > len(drop_prefix):
        text = text[len(drop_prefix):]
    name = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    if not name or not name[0].isalpha():
        name = f"v_{name}" if name else "v"
    return name


@dataclass(frozen=True, slots=True)
class RedcapNaming:
    """THE naming rule of a study's REDCap project (connector, emulator and tests all go through it).
    The names derived from the OIDs can be overridden one by one (`event_names`, `instrument_names`,
    `field_names`: OID -> REDCap name), for a project whose names were chosen by hand; an explicit
    name must be a valid REDCap name (lower case letters, digits, underscores; a letter first)."""

    item_prefix: str = "IT."
    form_prefix: str = "F."
    event_prefix: str = ""  # kept: SE.BASELINE -> se_baseline_arm_1
    arm: int = 1
    record_id_field: str = RECORD_ID_FIELD
    event_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    instrument_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    field_names: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for what, names in (("event", self.event_names), ("instrument", self.instrument_names),
                            ("field", self.field_names), ("record id field", {"": self.record_id_field})):
            bad = sorted(f"{oid} -> {name!r}" if oid else repr(name) for oid, name in names.items()
                         if not _REDCAP_NAME.fullmatch(name))
            if bad:
                raise ValueError(f"not a valid REDCap {what} name: {', '.join(bad)} (lower case letters, digits and "
                                 "underscores, a letter first)")

    def field(self, item_oid: str) -> str:
        return self.field_names.get(item_oid) or redcap_name(item_oid, drop_prefix=self.item_prefix)

    def instrument(self, form_oid: str) -> str:
        return self.instrument_names.get(form_oid) or redcap_name(form_oid, drop_prefix=self.form_prefix)

    def event(self, event_oid: str) -> str:
        derived = f"{redcap_name(event_oid, drop_prefix=self.event_prefix)}_arm_{self.arm}"
        return self.event_names.get(event_oid) or derived

    @staticmethod
    def complete_field(instrument: str) -> str:
        return f"{instrument}_complete"


# ------------------------------------------------------------------------------------------------ mapping


@dataclass(frozen=True, slots=True)
class RedcapField:
    """One REDCap field (a row of the data dictionary) and the ODM item it holds."""

    name: str
    form_oid: str
    instrument: str
    item_oid: str | None  # None for the record id field
    group_oid: str | None
    label: str
    field_type: str = "text"  # text | dropdown
    validation: str = ""  # integer | number | date_ymd | time | datetime_seconds_ymd | ""
    choices: tuple[tuple[str, str], ...] = ()
    minimum: str = ""
    maximum: str = ""
    note: str = ""


@dataclass(frozen=True, slots=True)
class RedcapCell:
    """One value in REDCap: record, unique event name, repeat instrument ("" if none), instance
    (None if none) and field."""

    record: str
    event: str
    repeat_instrument: str
    instance: int | None
    field: str

    @property
    def row(self) -> tuple[str, str, str, int | None]:
        return (self.record, self.event, self.repeat_instrument, self.instance)

    def label(self) -> str:
        where = f"{self.repeat_instrument} instance {self.instance}, " if self.repeat_instrument else ""
        return f"record {self.record}, event {self.event}, {where}field {self.field}"


@dataclass(frozen=True)
class RedcapMapping:
    """The study's REDCap project: StudyEventOID -> unique event name, FormOID -> instrument,
    ItemOID -> field, and which instruments repeat in which event. Build it with `from_metadata`."""

    study_oid: str
    metadata_version_oid: str
    study_name: str
    record_id_field: str
    events: Mapping[str, str]  # StudyEventOID -> unique event name (Protocol order)
    event_labels: Mapping[str, str]  # StudyEventOID -> event name
    instruments: Mapping[str, str]  # FormOID -> instrument (file order)
    form_labels: Mapping[str, str]
    fields: Mapping[str, str]  # ItemOID -> field name
    event_forms: Mapping[str, tuple[str, ...]]
    form_groups: Mapping[str, tuple[str, ...]]
    group_items: Mapping[str, tuple[str, ...]]
    repeating_events: frozenset[str]
    repeating_forms: frozenset[str]
    repeating_groups: frozenset[str]
    field_defs: Mapping[str, RedcapField]  # field name -> definition (record id first, then form order)
    naming: RedcapNaming = field(default_factory=RedcapNaming)

    # -- construction

    @classmethod
    def from_metadata(cls, metadata: StudyMetadata, *, naming: RedcapNaming | None = None) -> RedcapMapping:
        """The REDCap project mirroring the study's ODM metadata. ValueError for a design REDCap cannot
        hold (an item on two forms, a form with a repeating item group next to other groups, names
        that collide)."""
        naming = naming or RedcapNaming()
        md = metadata
        for what, given, known in (("StudyEventOID", naming.event_names, md.study_events),
                                   ("FormOID", naming.instrument_names, md.forms),
                                   ("ItemOID", naming.field_names, md.items)):
            unknown = sorted(set(given) - set(known))
            if unknown:
                raise ValueError(f"REDCap names given for {what}s the study {md.study_oid} does not have: "
                                 f"{', '.join(unknown)}")
        event_order = [oid for oid in md.event_order()]
        events = {oid: naming.event(oid) for oid in event_order}
        instruments = {oid: naming.instrument(oid) for oid in md.forms}
        _unique("unique event name", events)
        _unique("instrument name", instruments)

        form_of_item: dict[str, tuple[str, str]] = {}
        for form in md.forms.values():
            groups = md.item_groups_of_form(form.oid)
            repeating = [g for g in groups if g.repeating]
            if repeating and len(groups) > 1:
                raise ValueError(f"form {form.oid} has the repeating item group {repeating[0].oid} next to other "
                                 "item groups: a REDCap instrument repeats as a whole")
            for g in groups:
                for item_oid in g.item_oids:
                    if item_oid in form_of_item and form_of_item[item_oid] != (form.oid, g.oid):
                        other = form_of_item[item_oid]
                        raise ValueError(f"item {item_oid} is on {other[0]}/{other[1]} and {form.oid}/{g.oid}: a "
                                         "REDCap field belongs to one instrument")
                    form_of_item[item_oid] = (form.oid, g.oid)
        fields = {oid: naming.field(oid) for oid in form_of_item}
        _unique("field name", fields)
        reserved = {naming.record_id_field, *REPEAT_FIELDS, *(naming.complete_field(i) for i in instruments.values())}
        clash = sorted(f"{oid} -> {name}" for oid, name in fields.items() if name in reserved)
        if clash:
            raise ValueError(f"field names collide with REDCap's own fields: {', '.join(clash)}")

        used_forms = [f for e in event_order for f in md.study_events[e].form_oids]
        first_form = used_forms[0] if used_forms else next(iter(md.forms), "")
        defs: dict[str, RedcapField] = {}
        defs[naming.record_id_field] = RedcapField(naming.record_id_field, first_form, instruments.get(first_form, ""),
                                                   None, None, "Subject key (ODM SubjectKey)")
        for form in md.forms.values():
            for g in md.item_groups_of_form(form.oid):
                for item_oid in g.item_oids:
                    name = fields[item_oid]
                    defs[name] = _field_def(md, md.items[item_oid], name, form.oid, instruments[form.oid], g.oid)
        return cls(
            study_oid=md.study_oid,
            metadata_version_oid=md.metadata_version_oid,
            study_name=md.study_oid,
            record_id_field=naming.record_id_field,
            events=events,
            event_labels={oid: md.study_events[oid].name for oid in event_order},
            instruments=instruments,
            form_labels={oid: f.name for oid, f in md.forms.items()},
            fields=fields,
            event_forms={oid: tuple(md.study_events[oid].form_oids) for oid in event_order},
            form_groups={oid: tuple(f.item_group_oids) for oid, f in md.forms.items()},
            group_items={oid: tuple(g.item_oids) for oid, g in md.item_groups.items()},
            repeating_events=frozenset(oid for oid, e in md.study_events.items() if e.repeating),
            repeating_forms=frozenset(oid for oid, f in md.forms.items() if f.repeating),
            repeating_groups=frozenset(oid for oid, g in md.item_groups.items() if g.repeating),
            field_defs=defs,
            naming=naming,
        )

    @classmethod
    def load(cls, path: str | Path, metadata_version_oid: str | None = None, **options: Any) -> RedcapMapping:
        """`from_metadata` over a study's ODM 1.3.2 metadata file."""
        return cls.from_metadata(load_metadata(path, metadata_version_oid), **options)

    # -- lookups (cached reverse maps)

    def _reverse(self) -> dict[str, dict[str, Any]]:
        cached = self.__dict__.get("_reverse_cache")
        if cached is None:
            form_of: dict[str, tuple[str, str]] = {}
            for form_oid, groups in self.form_groups.items():
                for g in groups:
                    for item in self.group_items.get(g, ()):
                        form_of[item] = (form_oid, g)
            order: dict[str, int] = {}
            for seq in (self.events, self.instruments, self.group_items):
                for i, oid in enumerate(seq):
                    order[oid] = i
            for items in self.group_items.values():
                for i, oid in enumerate(items):
                    order.setdefault(oid, i)
            cached = {
                "event": {v: k for k, v in self.events.items()},
                "instrument": {v: k for k, v in self.instruments.items()},
                "field": {v: k for k, v in self.fields.items()},
                "form_of": form_of,
                "order": order,
            }
            object.__setattr__(self, "_reverse_cache", cached)
        return cached

    def event_oid(self, event_name: str) -> str | None:
        return self._reverse()["event"].get(event_name)

    def form_oid(self, instrument: str) -> str | None:
        return self._reverse()["instrument"].get(instrument)

    def item_oid(self, field_name: str) -> str | None:
        return self._reverse()["field"].get(field_name)

    def place_of(self, item_oid: str) -> tuple[str, str] | None:
        """(FormOID, ItemGroupOID) of an item."""
        return self._reverse()["form_of"].get(item_oid)

    def order_of(self, oid: str) -> int:
        return self._reverse()["order"].get(oid, 1 << 30)

    def data_fields(self) -> list[str]:
        """Every mapped field, record id first (what an export asks for)."""
        return list(self.field_defs)

    # -- repeats

    def repeat_parts(self, event_oid: str, form_oid: str) -> tuple[str, ...]:
        """Which ODM repeat keys make the REDCap instance of this form in this event ("event", "form",
        "group"); empty when the instrument does not repeat there."""
        parts = []
        if event_oid in self.repeating_events:
            parts.append("event")
        if form_oid in self.repeating_forms:
            parts.append("form")
        if any(g in self.repeating_groups for g in self.form_groups.get(form_oid, ())):
            parts.append("group")
        return tuple(parts)

    def is_repeating(self, event_oid: str, form_oid: str) -> bool:
        return bool(self.repeat_parts(event_oid, form_oid))

    @staticmethod
    def instance_scope(event_oid: str, form_oid: str) -> str:
        """The key map scope of a repeating instrument (per subject): `<StudyEventOID>/<FormOID>`."""
        return f"{event_oid}/{form_oid}"

    def instance_key(self, event_oid: str, form_oid: str, event_rk: str | None, form_rk: str | None,
                     group_rk: str | None) -> str | None:
        """esource's key of one REDCap instance (None when the instrument does not repeat)."""
        given = {"event": event_rk, "form": form_rk, "group": group_rk}
        parts = [given[p] or "" for p in self.repeat_parts(event_oid, form_oid)]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else json.dumps(parts, separators=(",", ":"))

    def split_instance_key(self, event_oid: str, form_oid: str, key: str) -> tuple[str | None, str | None, str | None]:
        """(event repeat key, form repeat key, group repeat key) of an instance key."""
        names = self.repeat_parts(event_oid, form_oid)
        values: list[str] = [key]
        if len(names) > 1:
            try:
                loaded = json.loads(key)
                values = [str(v) for v in loaded] if isinstance(loaded, list) else [key] * len(names)
            except ValueError:
                values = [key] * len(names)
        got = dict(zip(names, values))
        return got.get("event") or None, got.get("form") or None, got.get("group") or None

    # -- the REDCap project's own description (what its API exports)

    def data_dictionary(self) -> list[dict[str, str]]:
        rows = []
        for f in self.field_defs.values():
            choices = " | ".join(f"{code}, {label}" for code, label in f.choices)
            rows.append({
                "field_name": f.name, "form_name": f.instrument, "section_header": "", "field_type": f.field_type,
                "field_label": f.label, "select_choices_or_calculations": choices, "field_note": f.note,
                "text_validation_type_or_show_slider_number": f.validation, "text_validation_min": f.minimum,
                "text_validation_max": f.maximum, "identifier": "", "branching_logic": "",
                "required_field": "y" if f.item_oid is None else "", "custom_alignment": "", "question_number": "",
                "matrix_group_name": "", "matrix_ranking": "",
                "field_annotation": f"@ODM-OID={f.item_oid}" if f.item_oid else "@ODM-SUBJECTKEY",
            })
        return rows

    def instrument_rows(self) -> list[dict[str, str]]:
        return [{"instrument_name": name, "instrument_label": self.form_labels[oid]}
                for oid, name in self.instruments.items()]

    def event_rows(self) -> list[dict[str, Any]]:
        return [{"event_name": self.event_labels[oid], "arm_num": self.naming.arm, "unique_event_name": name,
                 "custom_event_label": "", "event_id": 100 + i, "days_offset": i, "offset_min": 0,
                 "offset_max": 0} for i, (oid, name) in enumerate(self.events.items())]

    def form_event_rows(self) -> list[dict[str, Any]]:
        return [{"arm_num": self.naming.arm, "unique_event_name": self.events[e], "form": self.instruments[f]}
                for e, forms in self.event_forms.items() for f in forms]

    def repeating_rows(self) -> list[dict[str, str]]:
        return [{"event_name": self.events[e], "form_name": self.instruments[f], "custom_form_label": ""}
                for e, forms in self.event_forms.items() for f in forms if self.is_repeating(e, f)]

    def designated(self, event_name: str, instrument: str) -> bool:
        e, f = self.event_oid(event_name), self.form_oid(instrument)
        return e is not None and f is not None and f in self.event_forms.get(e, ())

    def repeats_in(self, event_name: str, instrument: str) -> bool:
        e, f = self.event_oid(event_name), self.form_oid(instrument)
        return e is not None and f is not None and self.is_repeating(e, f)


def _unique(what: str, names: Mapping[str, str]) -> None:
    seen: dict[str, str] = {}
    for oid, name in names.items():
        if name in seen:
            raise ValueError(f"{seen[name]} and {oid} have the same REDCap {what} {name!r}")
        seen[name] = oid


_VALIDATION = {"integer": "integer", "float": "number", "double": "number", "date": "date_ymd", "time": "time",
               "datetime": "datetime_seconds_ymd"}


def _field_def(md: StudyMetadata, item: ItemDef, name: str, form_oid: str, instrument: str, group_oid: str) -> RedcapField:
    label = f"{item.cdash_alias or item.name} ({item.oid})"
    codelist = md.codelists.get(item.codelist_oid) if item.codelist_oid else None
    if codelist is not None:
        pairs = tuple((code, cli.decode or code) for code, cli in codelist.items.items())
        if pairs and all(_SIMPLE_CODE.match(code) for code, _ in pairs):
            return RedcapField(name, form_oid, instrument, item.oid, group_oid, label, "dropdown", choices=pairs)
        # REDCap choice codes are letters, digits and underscores: other code lists stay free text
        return RedcapField(name, form_oid, instrument, item.oid, group_oid, label,
                           note="Codes (" + codelist.oid + "): " + ", ".join(code for code, _ in pairs))
    validation = _VALIDATION.get(item.data_type, "")
    minimum = maximum = ""
    if validation in ("integer", "number"):
        for rc in item.range_checks:
            if rc.values and rc.comparator in ("GE", "GT"):
                minimum = rc.values[0]
            elif rc.values and rc.comparator in ("LE", "LT"):
                maximum = rc.values[0]
    note = f"ODM {item.data_type}" if item.data_type.startswith("partial") else ""
    return RedcapField(name, form_oid, instrument, item.oid, group_oid, label, validation=validation,
                       minimum=minimum, maximum=maximum, note=note)


# ------------------------------------------------------------------------------------------------ cells <-> items


def cells_to_items(mapping: RedcapMapping, cells: Iterable[tuple[RedcapCell, str]],
                   esource_key: Callable[[str, str, int], str | None]) -> dict[ItemPath, str]:
    """REDCap values -> {esource item path: value}. `esource_key(event_oid, form_oid, instance)` maps an
    instance back (the key map, read only); an instance esource never allocated shows as `#<n>`. Blank
    values, the record id, `_complete` fields and unmapped fields are left out."""
    out: dict[ItemPath, str] = {}
    for cell, value in cells:
        if value is None or value == "":
            continue
        item_oid = mapping.item_oid(cell.field)
        event_oid = mapping.event_oid(cell.event)
        place = mapping.place_of(item_oid) if item_oid else None
        if item_oid is None or event_oid is None or place is None:
            continue
        form_oid, group_oid = place
        if mapping.is_repeating(event_oid, form_oid):
            if cell.repeat_instrument != mapping.instruments[form_oid] or cell.instance is None:
                continue
            key = esource_key(event_oid, form_oid, cell.instance)
            if key is None:  # an instance esource never allocated (made in REDCap)
                parts = mapping.repeat_parts(event_oid, form_oid)
                unknown = f"#{cell.instance}"
                ek = unknown if "event" in parts else None
                gk = unknown if "group" in parts else None
            else:  # esource's item key has no FormRepeatKey: a repeating FormDef's key stays in the instance
                ek, _fk, gk = mapping.split_instance_key(event_oid, form_oid, key)
        else:
            if cell.repeat_instrument:
                continue
            ek = gk = None
        out[(event_oid, ek, form_oid, group_oid, gk, item_oid)] = str(value)
    return out


def export_rows_to_cells(mapping: RedcapMapping, rows: Iterable[Mapping[str, Any]]) -> list[tuple[RedcapCell, str]]:
    """Flat export rows -> (cell, value) for every mapped field with a value."""
    out = []
    rid = mapping.record_id_field
    for row in rows:
        record = str(row.get(rid, ""))
        event = str(row.get("redcap_event_name") or "")
        instrument = str(row.get("redcap_repeat_instrument") or "")
        inst = row.get("redcap_repeat_instance")
        instance = int(inst) if inst not in (None, "") and str(inst).isdigit() else None
        for name, value in row.items():
            if name == rid or name in REPEAT_FIELDS or name not in mapping.field_defs or value in (None, ""):
                continue
            out.append((RedcapCell(record, event, instrument, instance, name), str(value)))
    return out


# ------------------------------------------------------------------------------------------------ connector


class _HttpStatus(Exception):
    """Raised by the response hook for every non-200 answer (PyCap itself ignores statuses)."""

    def __init__(self, status: int, text: str, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}: {text}")
        self.status = status
        self.text = text
        self.retry_after = retry_after


class _Unmapped(Exception):
    pass


class _Refused(Exception):
    """A REDCap refusal met outside an import (carries the permanent receipt it would make)."""

    def __init__(self, receipt: DeliveryReceipt) -> None:
        super().__init__(receipt.message)
        self.receipt = receipt


@dataclass(frozen=True, slots=True)
class _Wanted:
    cell: RedcapCell
    path: ItemPath
    transaction_type: str  # Insert | Update | Upsert | Remove
    value: str  # "" for Remove / IsNull


class RedcapConnector(Closing):
    """`EdcConnector` for a REDCap project (one study). Thread-safe.

    - `api_url`: the REDCap API endpoint (`.../api/`; added when missing, PyCap insists on it).
    - `token`: the project's API token (32 characters); never shown in a message or repr.
    - `key_map`: where instance numbers are allocated and kept (persist it: `SqlEdcKeyMap` in the service).
    - `mapping`: the study's `RedcapMapping`.
    - `timeout`: seconds per request (connect and read).
    - `client`: a `redcap.Project` to use instead of building one; the connector adds its timeout
      (unless set) and its status hook to that Project's request options.
    - `verify_before_write`: export and compare before every import (default), or only after an
      ambiguous failure seen by this process.
    """

    name = CONNECTOR_NAME

    def __init__(self, api_url: str, token: str, *, key_map: EdcKeyMap, mapping: RedcapMapping,
                 timeout: float = 10, client: Any = None, verify_before_write: bool = True,
                 verify_ssl: bool | str = True) -> None:
        if not isinstance(token, str) or len(token) != 32:
            raise ValueError(f"a REDCap API token has 32 characters (this one has {len(token or '')})")
        self.api_url = _api_url(api_url)
        self.timeout = timeout
        self.key_map = key_map
        self.mapping = mapping
        self.verify_before_write = verify_before_write
        self._secrets = [token, *userinfo_secrets(self.api_url)]
        self._shown_url = without_userinfo(self.api_url)
        self._lock = threading.Lock()
        self._ambiguous: OrderedDict[str, None] = OrderedDict()  # transactions whose last attempt was ambiguous
        self._fields = mapping.data_fields()
        if client is None:
            import redcap

            try:
                client = redcap.Project(self.api_url, token, verify_ssl=verify_ssl, timeout=timeout,
                                        hooks={"response": [self._on_response]})
            except AssertionError:  # PyCap's own checks print the token: never let that message out
                raise ValueError(f"PyCap refused the REDCap API URL {self._shown_url!r} or the token") from None
        else:  # a Project built elsewhere: same timeout and status handling
            kwargs = getattr(client, "_request_kwargs", None)
            if isinstance(kwargs, dict):
                kwargs.setdefault("timeout", timeout)
                hooks = kwargs.setdefault("hooks", {})
                hooks.setdefault("response", [])
                if self._on_response not in hooks["response"]:
                    hooks["response"].append(self._on_response)
        self.project = client

    def capabilities(self) -> ConnectorCapabilities:
        return ConnectorCapabilities(CONNECTOR_NAME, read_back=True, idempotency_key=False, integer_repeat_keys=True)

    def close(self) -> None:
        """Nothing to release: PyCap pools connections in its module-wide requests session."""

    def __repr__(self) -> str:
        return f"RedcapConnector({self._shown_url!r}, study={self.mapping.study_oid!r})"

    # ------------------------------------------------------------------------------------ port

    def send(self, transaction: SubjectTransaction, odm: bytes) -> DeliveryReceipt:
        key = transaction_key(transaction)
        try:
            wanted = self.to_cells(odm, transaction)
        except IntakeError as exc:
            return DeliveryReceipt(False, permanent=True, code="BAD_ODM", message=self._redact(str(exc))[:_MAX_MESSAGE])
        except _Unmapped as exc:
            return DeliveryReceipt(False, permanent=True, code="UNMAPPED", message=str(exc)[:_MAX_MESSAGE])
        if not wanted:
            return DeliveryReceipt(True, code="empty", message="the transaction carries no ItemData: nothing imported")
        records = sorted({w.cell.record for w in wanted})
        with self._lock:
            verify = self.verify_before_write or key in self._ambiguous
        changes = wanted
        if verify:
            try:
                current = dict(export_rows_to_cells(self.mapping, self._export(records, f"check of {key} before "
                                                                                         "its import")))
            except _Refused as refused:
                return refused.receipt
            changes, clashes = [], []
            for w in wanted:
                now = current.get(w.cell, "")
                if now == w.value:
                    continue
                if w.transaction_type == "Insert" and now != "":
                    clashes.append((w, now))
                    continue
                changes.append(w)
            if clashes:
                shown = "; ".join(f"{w.cell.label()} holds {now!r}, the Insert of {_path_text(w.path)} would "
                                  f"write {w.value!r}" for w, now in clashes[:5])
                more = f" (and {len(clashes) - 5} more)" if len(clashes) > 5 else ""
                return DeliveryReceipt(False, permanent=True, code="INSERT_OVER_VALUE",
                                       message=f"REDCap already holds other values: {shown}{more}. An Insert never "
                                               "overwrites a value: nothing of the transaction was imported")
            if not changes:
                self._forget(key)
                return DeliveryReceipt(True, code="duplicate",
                                       message="REDCap already holds every value of the transaction: nothing imported")
        rows = self.to_rows(changes)
        overwrite = any(w.transaction_type in ("Update", "Remove") or (w.transaction_type == "Upsert" and w.value == "")
                        for w in changes)
        try:
            answer = self.project.import_records(rows, return_format_type="json", return_content="count",
                                                 overwrite="overwrite" if overwrite else "normal",
                                                 import_format="json")
        except Exception as exc:  # noqa: BLE001 - classified below (permanent receipt or TransientDeliveryError)
            receipt = self._failure(exc, f"import of {key}", writing=True, key=key)
            return receipt
        self._forget(key)
        count = answer.get("count") if isinstance(answer, dict) else None
        return DeliveryReceipt(True, code="200",
                               message=f"imported {len(changes)} value(s) into {count if count is not None else '?'} "
                                       f"record(s) (overwriteBehavior={'overwrite' if overwrite else 'normal'})")

    def read_back(self, study_oid: str, subject_key: str) -> bytes | None:
        if study_oid != self.mapping.study_oid:
            return None
        what = f"read-back of {study_oid}/{subject_key}"
        try:
            rows = self._export([subject_key], what)
        except _Refused as refused:  # no receipt to give: the dispatcher retries (and shows the message)
            r = refused.receipt
            raise TransientDeliveryError(f"REDCap at {self._shown_url}: {what}: {r.code}: {r.message}",
                                         code=r.code) from None
        rows = [r for r in rows if str(r.get(self.mapping.record_id_field, "")) == subject_key]
        if not rows:
            return None
        items = cells_to_items(self.mapping, export_rows_to_cells(self.mapping, rows),
                               lambda e, f, n: self.key_map.esource_key(
                                   CONNECTOR_NAME, study_oid, subject_key, self.mapping.instance_scope(e, f), n))
        return write_snapshot(self.mapping, subject_key, items)

    # ------------------------------------------------------------------------------------ conversion

    def to_cells(self, odm: bytes, transaction: SubjectTransaction | None = None) -> list[_Wanted]:
        """esource's ODM -> the REDCap cells it sets (instances allocated through the key map).
        Raises IntakeError for unreadable XML, _Unmapped for OIDs outside the mapping."""
        root = safe_parse(odm, "outbox ODM")
        m = self.mapping
        wanted: list[_Wanted] = []
        problems: list[str] = []
        for cd in root.iter("{*}ClinicalData"):
            study = cd.get("StudyOID", "")
            if study != m.study_oid:
                raise _Unmapped(f"ClinicalData is for study {study!r}; this REDCap project holds study {m.study_oid!r}")
            for sd in cd.iterchildren("{*}SubjectData"):
                subject = sd.get("SubjectKey", "")
                if transaction is not None and subject != transaction.subject_key:
                    raise _Unmapped(f"SubjectData {subject!r} in a transaction of subject {transaction.subject_key!r}")
                if sd.get("TransactionType") == "Remove":
                    raise _Unmapped(f"removing subject {subject} is not done through the REDCap API import")
                for se in sd.iterchildren("{*}StudyEventData"):
                    ev, ev_rk = se.get("StudyEventOID", ""), se.get("StudyEventRepeatKey")
                    for fd in se.iterchildren("{*}FormData"):
                        form, form_rk = fd.get("FormOID", ""), fd.get("FormRepeatKey")
                        for ig in fd.iterchildren("{*}ItemGroupData"):
                            group, group_rk = ig.get("ItemGroupOID", ""), ig.get("ItemGroupRepeatKey")
                            for it in ig.iterchildren("{*}ItemData"):
                                tt = it.get("TransactionType") or "Upsert"
                                if tt == "Context":
                                    continue
                                item = it.get("ItemOID", "")
                                path: ItemPath = (ev, ev_rk or None, form, group, group_rk or None, item)
                                problem = self._check(path)
                                if problem:
                                    problems.append(problem)
                                    continue
                                value = "" if tt == "Remove" or it.get("IsNull") == "Yes" else (it.get("Value") or "")
                                cell = self._cell(study, subject, path, form_rk or None)
                                wanted.append(_Wanted(cell, path, tt, value))
        if problems:
            raise _Unmapped("not in the REDCap mapping of study " + m.study_oid + ": " + "; ".join(problems[:5])
                            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
        return wanted

    def _check(self, path: ItemPath) -> str | None:
        m = self.mapping
        ev, _, form, group, _, item = path
        if ev not in m.events:
            return f"StudyEventOID {ev}"
        if form not in m.event_forms[ev]:
            return f"FormOID {form} in {ev}"
        if item not in m.fields:
            return f"ItemOID {item}"
        if m.place_of(item) != (form, group):
            return f"ItemOID {item} in {form}/{group}"
        return None

    def _cell(self, study: str, subject: str, path: ItemPath, form_rk: str | None) -> RedcapCell:
        m = self.mapping
        ev, ev_rk, form, _group, group_rk, item = path
        instance_key = m.instance_key(ev, form, ev_rk, form_rk, group_rk)
        if instance_key is None:
            return RedcapCell(subject, m.events[ev], "", None, m.fields[item])
        instance = self.key_map.edc_key(CONNECTOR_NAME, study, subject, m.instance_scope(ev, form), instance_key)
        return RedcapCell(subject, m.events[ev], m.instruments[form], int(instance), m.fields[item])

    def to_rows(self, wanted: Sequence[_Wanted]) -> list[dict[str, Any]]:
        """REDCap flat JSON import rows: one per record/event/instance, the changed fields only."""
        rows: dict[tuple, dict[str, Any]] = {}
        for w in wanted:
            c = w.cell
            row = rows.get(c.row)
            if row is None:
                row = rows[c.row] = {self.mapping.record_id_field: c.record, "redcap_event_name": c.event,
                                     "redcap_repeat_instrument": c.repeat_instrument,
                                     "redcap_repeat_instance": c.instance if c.instance is not None else ""}
            row[c.field] = w.value
        return list(rows.values())

    # ------------------------------------------------------------------------------------ REDCap calls

    def _export(self, records: list[str], what: str) -> list[dict[str, Any]]:
        """The records' rows (flat JSON, mapped fields). Raises _Refused for REDCap's refusals (a 403,
        a 400) and TransientDeliveryError for the rest."""
        try:
            rows = self.project.export_records(format_type="json", records=records, fields=self._fields,
                                               record_type="flat", raw_or_label="raw", event_name="unique")
        except Exception as exc:  # noqa: BLE001 - classified
            raise _Refused(self._failure(exc, what, writing=False, key=None)) from None
        if not isinstance(rows, list):
            raise TransientDeliveryError(f"REDCap at {self._shown_url}: {what}: unexpected answer "
                                         f"({type(rows).__name__})", code="BAD_ANSWER")
        return rows

    def _on_response(self, response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        """requests response hook (via PyCap's request options): statuses PyCap would not see."""
        if response.status_code == 200:
            return response
        text = _error_text(response)
        raise _HttpStatus(response.status_code, self._redact(text)[:_MAX_MESSAGE],
                          parse_retry_after(response.headers.get("retry-after")))

    def _failure(self, exc: BaseException, what: str, *, writing: bool, key: str | None) -> DeliveryReceipt:
        """A permanent receipt for REDCap's refusals; raises TransientDeliveryError for the rest."""
        where = f"REDCap at {self._shown_url}"
        if isinstance(exc, _HttpStatus):
            status = exc.status
            if status in (401, 403):
                raise EdcAuthenticationError(f"{where} refused the API token for the {what} (HTTP {status}: {exc.text}); "
                                             "check the token and its API rights", status=status,
                                             code=str(status)) from None
            if status in _TRANSIENT_4XX or status >= 500:
                if writing:
                    self._remember(key)
                raise TransientDeliveryError(f"{where}: HTTP {status} for the {what}: {exc.text}", code=str(status),
                                             retry_after=exc.retry_after, ambiguous=writing and status >= 500) from None
            if status < 400:
                return DeliveryReceipt(False, permanent=True, code=str(status),
                                       message=f"unexpected HTTP {status} (check the API URL): {exc.text}")
            return DeliveryReceipt(False, permanent=True, code=str(status), message=exc.text)
        if isinstance(exc, requests.exceptions.ConnectTimeout):
            raise TransientDeliveryError(f"{where}: could not connect within {self.timeout:g}s for the {what}") from None
        if isinstance(exc, requests.exceptions.Timeout):
            self._remember(key)
            raise TransientDeliveryError(f"{where}: no answer within {self.timeout:g}s for the {what}"
                                         + ("; it may have been applied: the record is compared before the next import"
                                            if writing else ""), ambiguous=writing) from None
        if isinstance(exc, requests.exceptions.ConnectionError):
            refused = "NewConnectionError" in repr(exc) or "Connection refused" in str(exc)
            if not refused:
                self._remember(key)
            raise TransientDeliveryError(f"{where}: connection {'refused' if refused else 'lost'} during the {what}",
                                         ambiguous=writing and not refused) from None
        if isinstance(exc, requests.exceptions.JSONDecodeError) or isinstance(exc, ValueError):
            self._remember(key)
            raise TransientDeliveryError(f"{where}: unreadable answer to the {what}", code="BAD_ANSWER",
                                         ambiguous=writing) from None
        if isinstance(exc, requests.exceptions.RequestException):
            content = exc.args[0] if exc.args else None
            if isinstance(content, dict) and "error" in content:  # PyCap: a 200 answer carrying an error
                return DeliveryReceipt(False, permanent=True, code="REDCAP_ERROR",
                                       message=self._redact(str(content["error"]))[:_MAX_MESSAGE])
            self._remember(key)
            raise TransientDeliveryError(f"{where}: {type(exc).__name__} during the {what}: "
                                         f"{self._redact(str(exc))[:300]}", ambiguous=writing) from None
        raise TransientDeliveryError(f"{where}: {type(exc).__name__} during the {what}: {self._redact(str(exc))[:300]}",
                                     ambiguous=writing) from None

    def _remember(self, key: str | None) -> None:
        if key is None:
            return
        with self._lock:
            self._ambiguous[key] = None
            self._ambiguous.move_to_end(key)
            while len(self._ambiguous) > 10_000:
                self._ambiguous.popitem(last=False)

    def _forget(self, key: str) -> None:
        with self._lock:
            self._ambiguous.pop(key, None)

    def _redact(self, text: str) -> str:
        return redact(text, self._secrets)


# ------------------------------------------------------------------------------------------------ ODM out


def write_snapshot(mapping: RedcapMapping, subject_key: str, items: Mapping[ItemPath, str]) -> bytes:
    """One subject's values as an ODM 1.3.2 Snapshot (ClinicalData, esource's keys, metadata order)."""
    ns = _ODM_NS
    stamp = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    root = etree.Element(f"{{{ns}}}ODM", nsmap={None: ns})
    root.set("FileOID", f"REDCAP.{mapping.study_oid}.{subject_key}.{stamp.replace(':', '').replace('-', '')}")
    root.set("FileType", "Snapshot")
    root.set("Granularity", "SingleSubject")
    root.set("CreationDateTime", stamp)
    root.set("ODMVersion", "1.3.2")
    root.set("Originator", "esource")
    root.set("SourceSystem", "REDCap")
    cd = etree.SubElement(root, f"{{{ns}}}ClinicalData", StudyOID=mapping.study_oid,
                          MetaDataVersionOID=mapping.metadata_version_oid)
    sd = etree.SubElement(cd, f"{{{ns}}}SubjectData", SubjectKey=subject_key)
    o = mapping.order_of
    tree: dict[tuple, dict[str, dict[tuple, dict[str, str]]]] = {}
    for (ev, ev_rk, form, group, group_rk, item), value in items.items():
        tree.setdefault((ev, ev_rk), {}).setdefault(form, {}).setdefault((group, group_rk), {})[item] = value
    for (ev, ev_rk) in sorted(tree, key=lambda k: (o(k[0]), _natural(k[1]))):
        attrs = {"StudyEventOID": ev}
        if ev_rk is not None:
            attrs["StudyEventRepeatKey"] = ev_rk
        se = etree.SubElement(sd, f"{{{ns}}}StudyEventData", attrs)
        forms = tree[(ev, ev_rk)]
        for form in sorted(forms, key=o):
            fd = etree.SubElement(se, f"{{{ns}}}FormData", FormOID=form)
            groups = forms[form]
            for (group, group_rk) in sorted(groups, key=lambda k: (o(k[0]), _natural(k[1]))):
                gattrs = {"ItemGroupOID": group}
                if group_rk is not None:
                    gattrs["ItemGroupRepeatKey"] = group_rk
                ig = etree.SubElement(fd, f"{{{ns}}}ItemGroupData", gattrs)
                order = {oid: i for i, oid in enumerate(mapping.group_items.get(group, ()))}
                for item, value in sorted(groups[(group, group_rk)].items(), key=lambda kv: order.get(kv[0], 1 << 30)):
                    etree.SubElement(ig, f"{{{ns}}}ItemData", ItemOID=item, Value=value)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + etree.tostring(root, encoding="UTF-8", pretty_print=True)


def _natural(key: str | None) -> tuple:
    if key is None:
        return (0, 0, "")
    return (1, int(key), "") if key.isdigit() else (2, 0, key)


def _path_text(path: ItemPath) -> str:
    ev, ev_rk, form, group, group_rk, item = path
    e = f"{ev}[{ev_rk}]" if ev_rk else ev
    g = f"{group}[{group_rk}]" if group_rk else group
    return f"{e}/{form}/{g}/{item}"


# ------------------------------------------------------------------------------------------------ helpers


def _api_url(url: str) -> str:
    """PyCap wants the API URL to end with `/api/`."""
    if url.endswith("/api/"):
        return url
    base = url.rstrip("/")
    return base + "/" if base.endswith("/api") else base + "/api/"


def _error_text(response: requests.Response) -> str:
    """REDCap's error message: `{"error": ...}` (JSON), `<error>...</error>` (XML), else the text."""
    body = response.text or ""
    ctype = response.headers.get("content-type", "")
    text = ""
    if "json" in ctype or body.lstrip().startswith("{"):
        try:
            data = json.loads(body)
            if isinstance(data, dict) and "error" in data:
                text = str(data["error"])
        except ValueError:
            pass
    if not text and "<error>" in body:
        m = re.search(r"<error>(.*?)</error>", body, re.S)
        text = m.group(1) if m else ""
    if not text:
        text = re.sub(r"<[^>]+>", " ", body) if "html" in ctype else body
    text = " ".join(text.split()) if "\n" not in text.strip() else text.strip()
    return text or f"HTTP {response.status_code} {response.reason or ''}".strip()
