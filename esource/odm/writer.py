"""ODM ClinicalData writer: SubjectTransactions -> one ODM 1.3.2 (or 2.0) document, as bytes.

Built directly with lxml (`SubElement`, one serialisation at the end): the writer runs for every
outgoing message, so it avoids odmlib's object model.

What leaves the hospital is only what the protocol allows: SubjectKey, SiteOID, item values, and for
each value an AuditRecord whose SourceID is the pseudonymous reference (`Pseudonymizer.source_id`),
never a resource id. A ReasonForChange that names a source by its id is rewritten with the pseudonym.

Snapshot files carry no TransactionType anywhere. Transactional files carry it on SubjectData (the
transaction's own type, else "Update"), on every ItemData (the change's type), and "Upsert" on the
StudyEventData/FormData/ItemGroupData that contain them (the ODM 1.3.2 XSD allows TransactionType on
all five; ODM 2.0 has no FormData and on its ItemGroupData levels the same rule applies).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from lxml import etree

import esource
from esource.domain.model import SYSTEM_USER_OID, ItemChange, SourceRef, SubjectTransaction, TransactionType
from esource.odm.xsd import ODM_NAMESPACES
from esource.privacy import Pseudonymizer

if TYPE_CHECKING:
    from esource.study.metadata import StudyMetadata

FileType = Literal["Snapshot", "Transactional"]

ESOURCE_USER_FULL_NAME = "esource integration"
CONTAINER_TRANSACTION_TYPE = TransactionType.UPSERT.value
_XML_DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>\n'


# --------------------------------------------------------------------------------------------------
# intermediate tree: subject -> events -> forms -> groups -> items, filled from the changes


@dataclass(slots=True)
class _Group:
    items: dict[str, ItemChange] = field(default_factory=dict)


@dataclass(slots=True)
class _Form:
    groups: dict[tuple[str, str | None], _Group] = field(default_factory=dict)


@dataclass(slots=True)
class _Event:
    forms: dict[str, _Form] = field(default_factory=dict)


@dataclass(slots=True)
class _Subject:
    study_oid: str
    metadata_version_oid: str
    subject_key: str
    site_oid: str
    transaction_type: str | None
    events: dict[tuple[str, str | None], _Event] = field(default_factory=dict)


def _natural(key: str | None) -> tuple[int, int, str]:
    """Repeat keys in natural order: none first, then numeric keys numerically, then the rest as text."""
    if key is None:
        return (0, 0, "")
    if key.isdigit():
        return (1, int(key), key)
    return (2, 0, key)


class _Order:
    """Ranks for events, forms, groups and items: the metadata's order, else first appearance."""

    def __init__(self, metadata: StudyMetadata | None):
        self.md = metadata
        self._seen: dict[str, dict[str, int]] = {"event": {}, "form": {}, "group": {}, "item": {}}
        self._checked: set[tuple[str, ...]] = set()
        if metadata is not None:
            self.events = {oid: i for i, oid in enumerate(metadata.event_order())}
            self.forms_by_event = {
                ev.oid: {f: i for i, f in enumerate(ev.form_oids)} for ev in metadata.study_events.values()
            }
            self.groups_by_form = {
                f.oid: {g: i for i, g in enumerate(f.item_group_oids)} for f in metadata.forms.values()
            }
            self.items_by_group = {g.oid: {it: i for i, it in enumerate(g.item_oids)} for g in metadata.item_groups.values()}

    def note(self, event_oid: str, form_oid: str, group_oid: str, item_oid: str) -> None:
        """Record first appearances (only needed without metadata)."""
        if self.md is not None:
            return
        for kind, oid in (("event", event_oid), ("form", form_oid), ("group", group_oid), ("item", item_oid)):
            seen = self._seen[kind]
            if oid not in seen:
                seen[oid] = len(seen)

    def check(self, sub: _Subject, change: ItemChange) -> None:
        """With metadata, every OID must exist and sit where the metadata puts it."""
        md = self.md
        if md is None:
            return
        k = change.item.key
        combo = (sub.study_oid, sub.metadata_version_oid, k.study_event_oid, k.form_oid, k.item_group_oid, k.item_oid)
        if combo in self._checked:
            return
        where = f"subject {sub.subject_key}, {k.study_event_oid}/{k.form_oid}/{k.item_group_oid}/{k.item_oid}"
        if sub.study_oid != md.study_oid or sub.metadata_version_oid != md.metadata_version_oid:
            raise ValueError(
                f"transaction for {sub.study_oid}/{sub.metadata_version_oid} but the metadata is "
                f"{md.study_oid}/{md.metadata_version_oid}"
            )
        if k.study_event_oid not in md.study_events:
            raise ValueError(f"{where}: StudyEventOID {k.study_event_oid} is not in the metadata")
        if k.form_oid not in self.forms_by_event[k.study_event_oid]:
            raise ValueError(f"{where}: form {k.form_oid} is not collected at {k.study_event_oid}")
        if k.item_group_oid not in self.groups_by_form.get(k.form_oid, {}):
            raise ValueError(f"{where}: item group {k.item_group_oid} is not part of form {k.form_oid}")
        if k.item_oid not in self.items_by_group.get(k.item_group_oid, {}):
            raise ValueError(f"{where}: item {k.item_oid} is not part of item group {k.item_group_oid}")
        self._checked.add(combo)

    def event(self, oid: str) -> int:
        return self.events[oid] if self.md is not None else self._seen["event"][oid]

    def form(self, event_oid: str, oid: str) -> int:
        return self.forms_by_event[event_oid][oid] if self.md is not None else self._seen["form"][oid]

    def group(self, form_oid: str, oid: str) -> int:
        return self.groups_by_form[form_oid][oid] if self.md is not None else self._seen["group"][oid]

    def item(self, group_oid: str, oid: str) -> int:
        return self.items_by_group[group_oid][oid] if self.md is not None else self._seen["item"][oid]


def _collect(
    transactions: Sequence[SubjectTransaction], transactional: bool, order: _Order
) -> list[_Subject]:
    subjects: list[_Subject] = []
    by_key: dict[tuple[str, str, str], _Subject] = {}
    for tx in transactions:
        key = (tx.study_oid, tx.metadata_version_oid, tx.subject_key)
        if transactional:
            sub = _Subject(
                tx.study_oid,
                tx.metadata_version_oid,
                tx.subject_key,
                tx.site_oid,
                (tx.subject_transaction_type or TransactionType.UPDATE).value,
            )
            subjects.append(sub)
        else:
            # A snapshot shows each subject once, with its current values: later changes win.
            sub = by_key.get(key)
            if sub is None:
                sub = by_key[key] = _Subject(tx.study_oid, tx.metadata_version_oid, tx.subject_key, tx.site_oid, None)
                subjects.append(sub)
            elif sub.site_oid != tx.site_oid:
                raise ValueError(f"subject {tx.subject_key} appears at two sites: {sub.site_oid} and {tx.site_oid}")
        for change in tx.changes:
            k = change.item.key
            if k.study_oid != tx.study_oid or k.subject_key != tx.subject_key:
                raise ValueError(
                    f"change for {k.study_oid}/{k.subject_key} {k.item_oid} is filed under "
                    f"transaction {tx.study_oid}/{tx.subject_key}"
                )
            order.check(sub, change)
            removal = change.transaction_type == TransactionType.REMOVE
            if not transactional and removal:
                _drop(sub, change)
                continue
            order.note(k.study_event_oid, k.form_oid, k.item_group_oid, k.item_oid)
            event = sub.events.setdefault((k.study_event_oid, k.study_event_repeat_key), _Event())
            form = event.forms.setdefault(k.form_oid, _Form())
            group = form.groups.setdefault((k.item_group_oid, k.item_group_repeat_key), _Group())
            if transactional and k.item_oid in group.items:
                raise ValueError(
                    f"transaction for subject {tx.subject_key} changes {k.item_oid} twice in "
                    f"{k.study_event_oid}[{k.study_event_repeat_key}]/{k.item_group_oid}[{k.item_group_repeat_key}]"
                )
            group.items[k.item_oid] = change
    return subjects


def _drop(sub: _Subject, change: ItemChange) -> None:
    k = change.item.key
    event = sub.events.get((k.study_event_oid, k.study_event_repeat_key))
    form = event.forms.get(k.form_oid) if event else None
    group = form.groups.get((k.item_group_oid, k.item_group_repeat_key)) if form else None
    if group is not None:
        group.items.pop(k.item_oid, None)


# --------------------------------------------------------------------------------------------------
# privacy


def _scrub(text: str, ref: SourceRef, pseudonymizer: Pseudonymizer) -> str:
    """Replace any way `text` names the source by its pseudonym: `Type/id`, fullUrl, identity (and the
    identifier value in it), bare id. One regex pass, whole tokens only, so a pseudonym is never
    re-scanned and "abc-123" inside "abc-1234" is left alone. Very short ids of non-Patient resources
    ("1") are only replaced in their `Type/id` form: alone they identify nobody and would garble text."""
    needles: set[str] = set()
    if ref.id:
        needles.add(f"{ref.resource_type}/{ref.id}")
    if ref.full_url:
        needles.add(ref.full_url)
    candidates = [ref.id, ref.identity]
    if ref.identity and "|" in ref.identity:
        candidates.append(ref.identity.rsplit("|", 1)[1])
    for s in candidates:
        if s and (len(s) >= 4 or ref.is_patient):
            needles.add(s)
    if not needles:
        return text
    pseudonym = pseudonymizer.reference(ref)
    alternatives = "|".join(re.escape(n) for n in sorted(needles, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w.\-])(?:{alternatives})(?![\w\-]|\.\w)")
    return pattern.sub(lambda _m: pseudonym, text)


# --------------------------------------------------------------------------------------------------
# XML


def _utc_iso(moment: dt.datetime) -> str:
    """ISO 8601 in UTC with a Z; a naive datetime is taken as UTC (the project's convention)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    moment = moment.astimezone(dt.timezone.utc)
    spec = "milliseconds" if moment.microsecond else "seconds"
    return moment.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def write_clinical_data(
    transactions: Sequence[SubjectTransaction],
    *,
    file_type: FileType,
    file_oid: str,
    creation: dt.datetime,
    pseudonymizer: Pseudonymizer,
    metadata: StudyMetadata | None = None,
    user_oid: str = SYSTEM_USER_OID,
    include_admin_data: bool = True,
    odm_version: str = "1.3.2",
) -> bytes:
    """Write the transactions as one ODM document (UTF-8 bytes).

    - Snapshot: one SubjectData per subject (several transactions for a subject are merged, later
      changes win, Remove changes drop the item); no TransactionType anywhere.
    - Transactional: one SubjectData per transaction, in the given order; TransactionType on SubjectData
      (the transaction's type, else "Update"), on each ItemData, and "Upsert" on the containers.
    - With `metadata`, events/forms/groups/items follow the metadata's order and every OID must be
      defined where it is used (ValueError otherwise); without it, first appearance. Repeat keys sort
      naturally (numeric keys numerically).
    - `odm_version` "1.3.2" (default) or "2.0" (FormData becomes a form-level ItemGroupData, values are
      Value elements, AuditRecord follows the value).
    """
    if file_type not in ("Snapshot", "Transactional"):
        raise ValueError(f"file_type must be 'Snapshot' or 'Transactional', not {file_type!r}")
    if odm_version not in ODM_NAMESPACES:
        raise ValueError(f"odm_version must be one of {sorted(ODM_NAMESPACES)}, not {odm_version!r}")
    if not file_oid:
        raise ValueError("file_oid must not be empty")
    transactional = file_type == "Transactional"
    order = _Order(metadata)
    subjects = _collect(transactions, transactional, order)
    stamp = _utc_iso(creation)
    v2 = odm_version == "2.0"
    ns = ODM_NAMESPACES[odm_version]
    q = _QNames(ns)

    root = etree.Element(q.ODM, nsmap={None: ns})
    root.set("FileOID", file_oid)
    root.set("FileType", file_type)
    if not transactional:
        root.set("Granularity", "All")
    root.set("CreationDateTime", stamp)
    root.set("ODMVersion", "2.0" if v2 else "1.3.2")
    root.set("Originator", "esource")
    root.set("SourceSystem", "esource")
    root.set("SourceSystemVersion", esource.__version__)

    # ClinicalData blocks, one per study/MetaDataVersion, in first-appearance order.
    studies: dict[tuple[str, str], list[_Subject]] = {}
    for sub in subjects:
        studies.setdefault((sub.study_oid, sub.metadata_version_oid), []).append(sub)
    if not studies and metadata is not None:
        studies[(metadata.study_oid, metadata.metadata_version_oid)] = []

    if include_admin_data:
        _admin_data(root, q, v2, user_oid, subjects, studies, creation_date=stamp[:10])

    writer = _SubjectWriter(q, v2, transactional, stamp, user_oid, pseudonymizer, order)
    for (study_oid, mdv_oid), subs in studies.items():
        cd = etree.SubElement(root, q.ClinicalData, {"StudyOID": study_oid, "MetaDataVersionOID": mdv_oid})
        for sub in subs:
            writer.write(cd, sub)

    return _XML_DECLARATION + etree.tostring(root, xml_declaration=False, encoding="UTF-8", pretty_print=True)


class _QNames:
    """Namespaced tag names ("{ns}Local"), computed once per document."""

    _NAMES = (
        "ODM", "AdminData", "User", "FullName", "Location", "MetaDataVersionRef", "ClinicalData",
        "SubjectData", "SiteRef", "StudyEventData", "FormData", "ItemGroupData", "ItemData", "Value",
        "AuditRecord", "UserRef", "LocationRef", "DateTimeStamp", "ReasonForChange", "SourceID",
    )  # fmt: skip
    ODM: str
    AdminData: str
    User: str
    FullName: str
    Location: str
    MetaDataVersionRef: str
    ClinicalData: str
    SubjectData: str
    SiteRef: str
    StudyEventData: str
    FormData: str
    ItemGroupData: str
    ItemData: str
    Value: str
    AuditRecord: str
    UserRef: str
    LocationRef: str
    DateTimeStamp: str
    ReasonForChange: str
    SourceID: str

    def __init__(self, ns: str):
        for name in self._NAMES:
            setattr(self, name, f"{{{ns}}}{name}")


def _admin_data(
    root: etree._Element,
    q: _QNames,
    v2: bool,
    user_oid: str,
    subjects: list[_Subject],
    studies: dict[tuple[str, str], list[_Subject]],
    creation_date: str,
) -> None:
    study_oids = {s for s, _ in studies}
    attrs = {"StudyOID": next(iter(study_oids))} if len(study_oids) == 1 else {}
    admin = etree.SubElement(root, q.AdminData, attrs)
    user = etree.SubElement(admin, q.User, {"OID": user_oid, "UserType": "Other"})
    etree.SubElement(user, q.FullName).text = ESOURCE_USER_FULL_NAME
    sites: dict[str, dict[tuple[str, str], None]] = {}
    for sub in subjects:
        sites.setdefault(sub.site_oid, {})[(sub.study_oid, sub.metadata_version_oid)] = None
    for site_oid, mdvs in sites.items():
        loc_attrs = {"OID": site_oid, "Name": site_oid}
        loc_attrs.update({"Role": "Site"} if v2 else {"LocationType": "Site"})
        loc = etree.SubElement(admin, q.Location, loc_attrs)
        for study_oid, mdv_oid in mdvs:
            # EffectiveDate is required by ODM; esource does not know when the site went live on this
            # MetaDataVersion, so it states the version is in effect as of this file.
            etree.SubElement(
                loc,
                q.MetaDataVersionRef,
                {"StudyOID": study_oid, "MetaDataVersionOID": mdv_oid, "EffectiveDate": creation_date},
            )


class _SubjectWriter:
    def __init__(
        self,
        q: _QNames,
        v2: bool,
        transactional: bool,
        stamp: str,
        user_oid: str,
        pseudonymizer: Pseudonymizer,
        order: _Order,
    ):
        self.q, self.v2, self.tx, self.stamp = q, v2, transactional, stamp
        self.user_oid, self.pseudo, self.order = user_oid, pseudonymizer, order
        self._source_ids: dict[SourceRef, str] = {}
        self.user_ref = {"UserOID": user_oid}
        self._nsmap = {None: q.ODM[1:q.ODM.index("}")]}  # the document's default namespace
        self._audit_templates: dict[str, etree._Element] = {}

    def write(self, parent: etree._Element, sub: _Subject) -> None:
        q, order, tx = self.q, self.order, self.tx
        sattrs = {"SubjectKey": sub.subject_key}
        if tx and sub.transaction_type:
            sattrs["TransactionType"] = sub.transaction_type
        sd = etree.SubElement(parent, q.SubjectData, sattrs)
        etree.SubElement(sd, q.SiteRef, {"LocationOID": sub.site_oid})
        upsert = {"TransactionType": CONTAINER_TRANSACTION_TYPE} if tx else {}

        for (ev_oid, ev_rk), event in sorted(sub.events.items(), key=lambda kv: (order.event(kv[0][0]), _natural(kv[0][1]))):
            if not _has_items(event):
                continue
            eattrs = {"StudyEventOID": ev_oid}
            if ev_rk is not None:
                eattrs["StudyEventRepeatKey"] = ev_rk
            sed = etree.SubElement(sd, q.StudyEventData, {**eattrs, **upsert})
            for form_oid, form in sorted(event.forms.items(), key=lambda kv: order.form(ev_oid, kv[0])):
                if not any(g.items for g in form.groups.values()):
                    continue
                if self.v2:  # ODM 2.0: a form is an ItemGroupDef of Type="Form"
                    fd = etree.SubElement(sed, q.ItemGroupData, {"ItemGroupOID": form_oid, **upsert})
                else:
                    fd = etree.SubElement(sed, q.FormData, {"FormOID": form_oid, **upsert})
                groups = sorted(form.groups.items(), key=lambda kv: (order.group(form_oid, kv[0][0]), _natural(kv[0][1])))
                for (ig_oid, ig_rk), group in groups:
                    if not group.items:
                        continue
                    gattrs = {"ItemGroupOID": ig_oid}
                    if ig_rk is not None:
                        gattrs["ItemGroupRepeatKey"] = ig_rk
                    igd = etree.SubElement(fd, q.ItemGroupData, {**gattrs, **upsert})
                    for item_oid, change in sorted(group.items.items(), key=lambda kv: order.item(ig_oid, kv[0])):
                        self._item(igd, sub, item_oid, change)

    def _item(self, parent: etree._Element, sub: _Subject, item_oid: str, change: ItemChange) -> None:
        q, sub_el = self.q, etree.SubElement
        attrs = {"ItemOID": item_oid}
        if self.tx:
            attrs["TransactionType"] = change.transaction_type.value
        removal = change.transaction_type is TransactionType.REMOVE
        if self.v2:
            idata = sub_el(parent, q.ItemData, attrs)
            if not removal:
                sub_el(idata, q.Value).text = change.item.value
        else:
            if not removal:
                attrs["Value"] = change.item.value
            idata = sub_el(parent, q.ItemData, attrs)
        # ODM 1.3.2: AuditRecord is ItemData's first child; ODM 2.0: it follows the Value elements.
        # (UserRef, LocationRef, DateTimeStamp, [ReasonForChange], SourceID): a copy of the site's
        # template, about half the cost of building the five elements for each of thousands of items
        audit = self._audit_template(sub.site_oid).__deepcopy__(None)
        source = change.item.source
        audit[3].text = self._source_id(source)
        if change.reason_for_change:
            reason = etree.Element(q.ReasonForChange, nsmap=self._nsmap)
            reason.text = _scrub(change.reason_for_change, source, self.pseudo)
            audit.insert(3, reason)
        idata.append(audit)

    def _audit_template(self, site_oid: str) -> etree._Element:
        template = self._audit_templates.get(site_oid)
        if template is None:
            q, sub_el = self.q, etree.SubElement
            template = etree.Element(q.AuditRecord, nsmap=self._nsmap)
            sub_el(template, q.UserRef, self.user_ref)
            sub_el(template, q.LocationRef, {"LocationOID": site_oid})
            sub_el(template, q.DateTimeStamp).text = self.stamp
            sub_el(template, q.SourceID)
            self._audit_templates[site_oid] = template
        return template

    def _source_id(self, ref: SourceRef) -> str:
        sid = self._source_ids.get(ref)
        if sid is None:
            sid = self._source_ids[ref] = self.pseudo.source_id(ref)
        return sid


def _has_items(event: _Event) -> bool:
    return any(g.items for f in event.forms.values() for g in f.groups.values())
