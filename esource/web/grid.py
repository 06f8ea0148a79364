"""The subject view's visits × forms grid: pure functions over what the audit and reconciliation services
return (the subject's items with their transfer status, its open discrepancies) and the study map.

A cell is one form at one visit (one repeat of the unscheduled visit per date). Its state is the most
urgent of its items' and discrepancies' states, in this order:
- conflict: an open EDC conflict (site staff changed a value in the EDC);
- rejected: a value whose last transaction the EDC rejected;
- held: an open discrepancy on the cell (a value held back, a decision pending);
- pending: a value still in the outbox (not yet received by the EDC);
- filled: every value received by the EDC;
- empty: the visit collects the form but nothing came from the EHR; `na`: the visit does not collect it.
The page always shows the counts as text too, never the colour alone.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

FILLED, PENDING, HELD, REJECTED, CONFLICT, EMPTY, NA = "filled", "pending", "held", "rejected", "conflict", "empty", "na"
URGENCY: tuple[str, ...] = (CONFLICT, REJECTED, HELD, PENDING, FILLED)


def item_state(transfer_status: str | None, conflict: bool) -> str:
    """The state of one value esource holds for the EDC."""
    if conflict:
        return CONFLICT
    if transfer_status == "rejected":
        return REJECTED
    if transfer_status in ("pending", "failed"):
        return PENDING
    return FILLED


@dataclass
class Cell:
    event_oid: str
    event_repeat_key: str | None
    form_oid: str
    applicable: bool
    counts: dict[str, int] = field(default_factory=dict)  # state -> how many values / discrepancies

    @property
    def state(self) -> str:
        if not self.applicable:
            return NA
        for s in URGENCY:
            if self.counts.get(s):
                return s
        return EMPTY


@dataclass
class Row:
    event_oid: str
    event_repeat_key: str | None
    cells: list[Cell]


@dataclass
class Grid:
    forms: list[str]
    rows: list[Row]


def _disc_cell(d: Any) -> tuple[str | None, str | None, str | None]:
    return d.study_event_oid, d.study_event_repeat_key, d.form_oid


def build_grid(study: Any, items: list[Any], discrepancies: list[Any]) -> Grid:
    """`items`: esource.audit.lineage.ItemStatus of the subject; `discrepancies`: its open
    esource.reconciliation DiscrepancyRecords."""
    forms = list(study.spec.forms)
    conflicts = conflict_paths(discrepancies)
    counts: dict[tuple[str, str | None, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for it in items:
        k = it.key
        counts[(k.study_event_oid, k.study_event_repeat_key, k.form_oid)][item_state(
            it.transfer_status, item_path(k) in conflicts)] += 1
    for rec in discrepancies:
        event, erk, form = _disc_cell(rec.discrepancy)
        if event and form and rec.discrepancy.kind.value != "edc_conflict":
            counts[(event, erk, form)][HELD] += 1
    rows: list[Row] = []
    for visit in study.spec.visits:
        repeats: list[str | None] = [None]
        if visit.unscheduled:
            found = sorted({erk for (ev, erk, _f) in counts if ev == visit.oid and erk})
            repeats = list(found) or [None]
        for erk in repeats:
            cells = [Cell(visit.oid, erk, f, f in visit.forms, dict(counts.get((visit.oid, erk, f), {}))) for f in forms]
            rows.append(Row(visit.oid, erk, cells))
    return Grid(forms, rows)


def item_path(key: Any) -> str:
    """The item's path as EDC conflicts name it (esource.services.conflicts.key_path)."""
    from esource.services.conflicts import key_path

    return key_path(key)


def conflict_paths(discrepancies: list[Any]) -> set[str]:
    out: set[str] = set()
    for rec in discrepancies:
        d = rec.discrepancy
        if d.kind.value == "edc_conflict":
            for c in d.candidates:
                if isinstance(c, dict) and c.get("item"):
                    out.add(str(c["item"]))
    return out


@dataclass
class DetailRow:
    """One item group repeat of a cell (a test of VS/LB, a record of a log) with its items."""

    repeat_key: str | None
    values: dict[str, Any]  # ItemOID -> ItemStatus


@dataclass
class CellDetail:
    event_oid: str
    event_repeat_key: str | None
    form_oid: str
    item_group_oid: str | None
    columns: list[str]  # ItemOIDs, in the metadata's order
    rows: list[DetailRow]
    discrepancies: list[Any]


def cell_detail(study: Any, items: list[Any], discrepancies: list[Any], event_oid: str, event_repeat_key: str | None,
                form_oid: str) -> CellDetail:
    """The values of one cell as a table: item group repeats × items."""
    mine = [i for i in items if i.key.study_event_oid == event_oid and i.key.form_oid == form_oid
            and (i.key.study_event_repeat_key or None) == (event_repeat_key or None)]
    group = mine[0].key.item_group_oid if mine else None
    if group is None:
        form = study.spec.forms.get(form_oid)
        group = getattr(form, "item_group", None)
    order: list[str] = []
    if group and group in study.metadata.item_groups:
        order = list(study.metadata.item_groups[group].item_oids)
    present = {i.key.item_oid for i in mine}
    columns = [o for o in order if o in present] + sorted(present - set(order))
    by_repeat: dict[str | None, dict[str, Any]] = {}
    for i in mine:
        by_repeat.setdefault(i.key.item_group_repeat_key, {})[i.key.item_oid] = i
    def repeat_order(r: str | None) -> tuple[int, int, str]:
        return (0, int(r), "") if r is not None and r.isdigit() else (1, 0, r or "")
    rows = [DetailRow(r, by_repeat[r]) for r in sorted(by_repeat, key=repeat_order)]
    disc = [rec for rec in discrepancies if _disc_cell(rec.discrepancy)[0] == event_oid
            and _disc_cell(rec.discrepancy)[2] == form_oid
            and (_disc_cell(rec.discrepancy)[1] or None) == (event_repeat_key or None)]
    return CellDetail(event_oid, event_repeat_key, form_oid, group, columns, rows, disc)
