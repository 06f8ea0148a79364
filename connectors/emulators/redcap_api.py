"""A REDCap API emulator: one longitudinal project with repeating instruments that mirrors a study's
ODM metadata (CV01 by default), served at `POST /api/` as REDCap serves it, for tests and demos.

    app = create_redcap_app(None, tokens={DEFAULT_TOKEN: "CV01"})   # in memory; a Path: SQLite (WAL)
    run_redcap("127.0.0.1", 8092)                                    # standalone, with uvicorn

The project (`RedcapMapping.from_metadata`, the naming rule of connectors/redcap.py): one event per
StudyEventDef (`se_baseline_arm_1`, arm 1), one instrument per FormDef (`vs`), one field per ItemDef
(`vs_vsorres`), the record id field `record_id` first; an instrument repeats in an event when the ODM
design repeats there (event, form or item group). Code lists whose codes are REDCap-safe become
dropdowns, integer/float items `integer`/`number` validated text fields; partial dates stay text.

What it answers, like REDCap (form-encoded POST parameters, the answer in `format`/`returnFormat`:
json, csv or xml; errors as `{"error": "..."}` in JSON):
- A wrong or missing `token`: 403 `You do not have permissions to use the API`.
- `content=record`, `action=import` (the default when `data` is given): `format=json|csv|xml|odm`,
  `type=flat|eav`, `overwriteBehavior=normal|overwrite` (normal never blanks a stored value; overwrite
  deletes the values given blank), `returnContent=count|ids|auto_ids|nothing`, `dateFormat`. The
  import is all-or-nothing: any error answers 400 with REDCap's error lines
  `"record","field","value","message"` (unknown fields, invalid event, instrument not repeating or not
  designated in the event, instance not a positive integer — `new` takes the next one —, values
  failing their validation or not a choice of the dropdown) and keeps nothing. REDCap has no
  idempotency key: importing the same data twice is two writes.
- `content=record`, `action=export` (the default without `data`): `format=json|csv`, `type=flat|eav`,
  `records[]`, `fields[]`, `forms[]`, `events[]`; `redcap_repeat_instance` is an integer on rows of a
  repeating instrument, "" elsewhere.
- `content=record`, `action=delete`: `records[]` -> the number deleted.
- `content=version` (text), `project`, `metadata` (`fields[]`, `forms[]`), `instrument`, `arm`,
  `event`, `formEventMapping`, `repeatingFormsEvents`, `exportFieldNames`, and `project_xml` (the
  project as CDISC ODM 1.3.1 with `redcap:` extensions, `returnMetadataOnly`, which `format=odm`
  imports accept back).
- Fault injection (`POST/GET/DELETE /_faults`): the next record imports (or exports, `scope`) fail
  with 500, 503 (Retry-After), 429 (Retry-After), a timeout (an answer after `delay`), a dropped
  connection, a rejection (400 with a REDCap error naming the first value: a locked form), an
  authentication failure (403) or a slow answer; `after_commit` applies the import first.
- Test helpers: `GET /_test/items` (stored values), `POST /_test/site_edit` (site staff change a value
  in the data entry forms: logged, not an API write), `GET /_test/imports`, `GET /_test/log`.

Leniencies (deliberate): `eventName=label` still exports unique event names; no DAGs, no surveys,
no calculated fields, no range (min/max) enforcement on import (REDCap only warns there either).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import datetime as dt
import io
import json
import re
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from lxml import etree
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from esource.connectors.redcap import REPEAT_FIELDS, RedcapField, RedcapMapping
from esource.errors import IntakeError
from esource.odm.xsd import safe_parse
from esource.study.metadata import StudyMetadata, load_metadata
from esource.connectors.emulators.common import add_fault_routes, open_sqlite, read_limited_body, serve_standalone
from esource.connectors.emulators.faults import Fault, FaultPlan, FaultRequestBase, drop_connection

__all__ = ["DEFAULT_TOKEN", "REDCAP_VERSION", "RedcapProject", "RedcapApiError", "create_redcap_app", "run_redcap",
           "default_metadata_path", "main"]

DEFAULT_TOKEN = "3C5A9E1B7D2F4608A1B2C3D4E5F60718"
REDCAP_VERSION = "14.5.10"
NO_PERMISSION = "You do not have permissions to use the API"
DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024
ODM_NS = "http://www.cdisc.org/ns/odm/v1.3"
REDCAP_NS = "https://projectredcap.org"
SITE_USER = "site_user"
API_USER = "api_user"
_R = "{" + REDCAP_NS + "}"

FaultMode = Literal["500", "503", "429", "timeout", "reset", "reject", "slow", "auth"]


def default_metadata_path() -> Path:
    """CV01's ODM metadata (the study the default project mirrors)."""
    from esource.study.study import builtin_maps_dir

    return builtin_maps_dir() / "CV01" / "metadata.xml"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


class RedcapApiError(Exception):
    """An answer other than success: HTTP status and REDCap's message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def _line(record: str, field: str, value: Any, message: str) -> str:
    """One of REDCap's import error lines: "record","field","value","message"."""
    def q(s: Any) -> str:
        return '"' + str(s).replace('"', '""') + '"'

    return ",".join((q(record), q(field), q(value), q(message)))


_INTEGER = re.compile(r"^[-+]?\d+$")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
_TIME = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")
_DATETIME_S = re.compile(r"^\d{4}-\d{2}-\d{2} ([01]\d|2[0-3]):[0-5]\d:[0-5]\d$")
_FORMAT_MESSAGE = "The value you provided could not be validated because it does not follow the expected format. " \
                  "Please try again."


def _natural(text: str) -> tuple:
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t)


# --------------------------------------------------------------------------------------------------
# the project: storage and REDCap's import/export rules


@dataclasses.dataclass(frozen=True, slots=True)
class _Cell:
    record: str
    event: str
    instrument: str  # the repeat instrument, "" for a non-repeating row
    instance: int  # 1 on a non-repeating row
    field: str


_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (record TEXT PRIMARY KEY, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS data (
    record TEXT NOT NULL, event TEXT NOT NULL, instrument TEXT NOT NULL, instance INTEGER NOT NULL,
    field TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (record, event, instrument, instance, field));
CREATE TABLE IF NOT EXISTS imports (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL, format TEXT NOT NULL, type TEXT NOT NULL,
    overwrite_behavior TEXT NOT NULL, records TEXT NOT NULL, changed INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS log (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL, username TEXT NOT NULL, action TEXT NOT NULL,
    record TEXT NOT NULL, event TEXT NOT NULL, instrument TEXT NOT NULL, instance INTEGER NOT NULL,
    field TEXT NOT NULL, old_value TEXT, new_value TEXT);
"""


class RedcapProject:
    """One REDCap project's data (SQLite; in memory when `db_path` is None). Thread-safe: every call
    runs under one lock, every import in one database transaction."""

    def __init__(self, mapping: RedcapMapping, db_path: Path | str | None = None) -> None:
        self.mapping = mapping
        self.db_path = Path(db_path) if db_path is not None else None
        self._lock = threading.RLock()
        self._db = open_sqlite(self.db_path, _SCHEMA, synchronous="NORMAL")
        rid = mapping.record_id_field
        self._defs: dict[str, RedcapField] = dict(mapping.field_defs)
        self._complete = {mapping.naming.complete_field(i): i for i in mapping.instruments.values()}
        # every column of a flat export, REDCap's order: each instrument's fields, then its _complete
        self._columns: list[str] = [rid]
        for instrument in mapping.instruments.values():
            self._columns += [f.name for f in self._defs.values() if f.instrument == instrument and f.name != rid]
            self._columns.append(mapping.naming.complete_field(instrument))
        self._event_order = {name: i for i, name in enumerate(mapping.events.values())}
        self._instrument_order = {name: i for i, name in enumerate(mapping.instruments.values())}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- field facts

    def instrument_of(self, field: str) -> str | None:
        if field in self._complete:
            return self._complete[field]
        d = self._defs.get(field)
        return d.instrument if d is not None else None

    def is_field(self, field: str) -> bool:
        return field in self._defs or field in self._complete

    def _invalid(self, field: str, value: str) -> str | None:
        """Why REDCap refuses the (non-blank) value, or None."""
        if field in self._complete:
            return None if value in ("0", "1", "2") else f"The value is not a valid category for {field}"
        d = self._defs[field]
        if d.field_type == "dropdown":
            return None if value in {c for c, _ in d.choices} else f"The value is not a valid category for {field}"
        v = d.validation
        if v == "integer" and not _INTEGER.match(value):
            return _FORMAT_MESSAGE + " (integer)"
        if v == "number" and not _NUMBER.match(value):
            return _FORMAT_MESSAGE + " (number)"
        if v == "date_ymd":
            m = _DATE.match(value)
            try:
                ok = m is not None and dt.date(int(m[1]), int(m[2]), int(m[3])) is not None
            except ValueError:
                ok = False
            if not ok:
                return _FORMAT_MESSAGE + " (date_ymd)"
        if v == "time" and not _TIME.match(value):
            return _FORMAT_MESSAGE + " (time)"
        if v == "datetime_seconds_ymd" and not _DATETIME_S.match(value):
            return _FORMAT_MESSAGE + " (datetime_seconds_ymd)"
        return None

    # -- import

    def check_rows(self, rows: list[dict[str, Any]], *, date_format: str = "YMD") -> tuple[dict[_Cell, str], list[str], list[str]]:
        """Flat rows -> ({cell: value}, records in import order, error lines). Instance "new" becomes a
        negative placeholder resolved when applied."""
        m = self.mapping
        rid = m.record_id_field
        errors: list[str] = []
        unknown: dict[str, None] = {}
        cells: dict[_Cell, str] = {}
        records: dict[str, None] = {}
        new_instances = 0
        for n, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                errors.append(f"Row {n} of the data is not a record (an object of field names and values)")
                continue
            record = _text(row.get(rid)).strip()
            if not record:
                errors.append(_line("", rid, "", f"The record ID field ({rid}) is missing or blank in row {n}"))
                continue
            records[record] = None
            event = _text(row.get("redcap_event_name")).strip()
            instrument = _text(row.get("redcap_repeat_instrument")).strip()
            raw_instance = _text(row.get("redcap_repeat_instance")).strip()
            if not event:
                errors.append(_line(record, "redcap_event_name", "", "The redcap_event_name is missing: this project "
                                                                    "is longitudinal, every row names its event"))
                continue
            if m.event_oid(event) is None:
                errors.append(_line(record, "redcap_event_name", event, "This is not a valid unique event name"))
                continue
            instance = 1
            if instrument:
                if m.form_oid(instrument) is None:
                    errors.append(_line(record, "redcap_repeat_instrument", instrument,
                                        "This is not a valid instrument name"))
                    continue
                if not m.repeats_in(event, instrument):
                    errors.append(_line(record, "redcap_repeat_instrument", instrument,
                                        f"This instrument is not set up as a repeating instrument in event {event}"))
                    continue
                if raw_instance.lower() == "new":
                    new_instances += 1
                    instance = -new_instances
                elif raw_instance.isdigit() and int(raw_instance) >= 1:
                    instance = int(raw_instance)
                else:
                    errors.append(_line(record, "redcap_repeat_instance", raw_instance,
                                        "The repeat instance must be a positive integer (or \"new\") for a repeating "
                                        "instrument"))
                    continue
            elif raw_instance not in ("", "1"):
                errors.append(_line(record, "redcap_repeat_instance", raw_instance,
                                    "A repeat instance needs redcap_repeat_instrument (this project has no repeating "
                                    "events)"))
                continue
            for name, raw in row.items():
                if name == rid or name in REPEAT_FIELDS:
                    continue
                if not self.is_field(name):
                    unknown[name] = None
                    continue
                value = _text(raw)
                owner = self.instrument_of(name) or ""
                # blank values of fields that do not belong on this row (a full export row) are ignored
                if not m.designated(event, owner):
                    if value != "":
                        errors.append(_line(record, name, value, f"The field is on instrument {owner}, which is not "
                                                                 f"designated for event {event}"))
                    continue
                if instrument and owner != instrument:
                    if value != "":
                        errors.append(_line(record, name, value, f"The field is on instrument {owner}, not on the "
                                                                 f"repeating instrument {instrument} of this row"))
                    continue
                if not instrument and m.repeats_in(event, owner):
                    if value != "":
                        errors.append(_line(record, name, value, f"Instrument {owner} repeats in event {event}: give "
                                                                 "redcap_repeat_instrument and redcap_repeat_instance"))
                    continue
                if value != "":
                    value = self._date_in(name, value, date_format)
                    problem = self._invalid(name, value)
                    if problem:
                        errors.append(_line(record, name, value, problem))
                        continue
                cells[_Cell(record, event, instrument, instance, name)] = value
        if unknown:
            errors.insert(0, "The following fields were not found in the project as real data fields: "
                             + ", ".join(unknown))
        return cells, list(records), errors

    def _date_in(self, field: str, value: str, date_format: str) -> str:
        d = self._defs.get(field)
        if d is None or d.validation != "date_ymd" or date_format == "YMD":
            return value
        m = re.match(r"^(\d{1,2})[/-](\d{1,2})[/-](\d{4})$", value)
        if not m:
            return value
        a, b, year = m.groups()
        month, day = (a, b) if date_format == "MDY" else (b, a)
        return f"{year}-{int(month):02d}-{int(day):02d}"

    def import_rows(self, rows: list[dict[str, Any]], *, overwrite: bool, date_format: str = "YMD",
                    fmt: str = "json", type_: str = "flat", user: str = API_USER) -> list[str]:
        """Apply an import (all or nothing). Returns the records, in import order. RedcapApiError(400)
        with REDCap's error lines when anything is wrong."""
        cells, records, errors = self.check_rows(rows, date_format=date_format)
        if errors:
            raise RedcapApiError(400, "\n".join(errors))
        if not records:
            return []  # nothing to import: nothing applied, nothing logged
        with self._lock, self._transaction():
            changed = self._apply(cells, overwrite=overwrite, user=user)
            self._db.execute("INSERT INTO imports (ts, format, type, overwrite_behavior, records, changed) "
                             "VALUES (?, ?, ?, ?, ?, ?)", (_now(), fmt, type_, "overwrite" if overwrite else "normal",
                                                          json.dumps(records), changed))
        return records

    def _transaction(self) -> Any:
        db = self._db

        class _Tx:
            def __enter__(self) -> None:
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type: Any, *_: Any) -> None:
                db.execute("COMMIT" if exc_type is None else "ROLLBACK")

        return _Tx()

    def _apply(self, cells: Mapping[_Cell, str], *, overwrite: bool, user: str) -> int:
        db = self._db
        now = _now()
        changed = 0
        placeholders: dict[tuple[str, str, str, int], int] = {}
        next_free: dict[tuple[str, str, str], int] = {}
        touched: set[tuple[str, str, str, int]] = set()
        for cell, value in cells.items():
            instance = cell.instance
            if instance < 0:  # "new": the next instance of that instrument in that event
                slot = (cell.record, cell.event, cell.instrument, instance)
                if slot not in placeholders:
                    group = slot[:3]
                    if group not in next_free:
                        top = db.execute("SELECT MAX(instance) FROM data WHERE record=? AND event=? AND instrument=?",
                                         group).fetchone()[0] or 0
                        next_free[group] = top + 1
                    placeholders[slot] = next_free[group]
                    next_free[group] += 1
                instance = placeholders[slot]
            if db.execute("SELECT 1 FROM records WHERE record=?", (cell.record,)).fetchone() is None:
                db.execute("INSERT INTO records (record, created) VALUES (?, ?)", (cell.record, now))
                self._log(user, "Create record", cell.record, "", "", 0, "", None, None)
            key = (cell.record, cell.event, cell.instrument, instance, cell.field)
            row = db.execute("SELECT value FROM data WHERE record=? AND event=? AND instrument=? AND instance=? "
                             "AND field=?", key).fetchone()
            old = row["value"] if row is not None else None
            if value == "":
                if overwrite and old is not None:
                    db.execute("DELETE FROM data WHERE record=? AND event=? AND instrument=? AND instance=? AND field=?",
                               key)
                    self._log(user, "Update record", *key, old, None)
                    changed += 1
                continue
            if old == value:
                continue
            db.execute("INSERT INTO data (record, event, instrument, instance, field, value) VALUES (?, ?, ?, ?, ?, ?) "
                       "ON CONFLICT (record, event, instrument, instance, field) DO UPDATE SET value=excluded.value",
                       (*key, value))
            self._log(user, "Update record", *key, old, value)
            changed += 1
            if cell.field not in self._complete:
                touched.add((cell.record, cell.event, cell.instrument, instance, self.instrument_of(cell.field) or ""))
        for record, event, instrument, instance, owner in touched:  # a form with data gets a status: Incomplete
            db.execute("INSERT OR IGNORE INTO data (record, event, instrument, instance, field, value) "
                       "VALUES (?, ?, ?, ?, ?, '0')",
                       (record, event, instrument, instance, self.mapping.naming.complete_field(owner)))
        return changed

    def _log(self, user: str, action: str, record: str, event: str, instrument: str, instance: int, field: str,
             old: str | None, new: str | None) -> None:
        self._db.execute("INSERT INTO log (ts, username, action, record, event, instrument, instance, field, "
                         "old_value, new_value) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (_now(), user, action, record, event, instrument, instance, field, old, new))

    # -- export

    def columns(self, fields: Iterable[str] = (), forms: Iterable[str] = ()) -> list[str]:
        """The flat export's columns for `fields[]`/`forms[]` (all when neither is given), record id first."""
        fields, forms = list(fields), list(forms)
        bad = [f for f in fields if f != self.mapping.record_id_field and not self.is_field(f)]
        if bad:
            raise RedcapApiError(400, "The following values in the parameter \"fields\" are not valid: " + ", ".join(bad))
        bad = [f for f in forms if f not in self._instrument_order]
        if bad:
            raise RedcapApiError(400, "The following values in the parameter \"forms\" are not valid: " + ", ".join(bad))
        if not fields and not forms:
            return list(self._columns)
        wanted = set(fields)
        rid = self.mapping.record_id_field
        return [rid] + [c for c in self._columns[1:] if c in wanted or self.instrument_of(c) in forms]

    def export_rows(self, records: Iterable[str] = (), fields: Iterable[str] = (), forms: Iterable[str] = (),
                    events: Iterable[str] = ()) -> list[dict[str, Any]]:
        """Flat rows: one per record/event/repeat instance holding data in the selected columns."""
        columns = self.columns(fields, forms)
        events = list(events)
        bad = [e for e in events if e not in self._event_order]
        if bad:
            raise RedcapApiError(400, "The following values in the parameter \"events\" are not valid: " + ", ".join(bad))
        rid = self.mapping.record_id_field
        selected = set(columns[1:])
        rows: dict[tuple, dict[str, str]] = {}
        with self._lock:
            for r in self._select(records, events):
                slot = (r["record"], r["event"], r["instrument"], r["instance"])
                values = rows.setdefault(slot, {})
                if r["field"] in selected:
                    values[r["field"]] = r["value"]
        out = []
        only_id = not selected
        for (record, event, instrument, instance) in sorted(rows, key=self._row_order):
            values = rows[(record, event, instrument, instance)]
            if not values and not only_id:
                continue
            row: dict[str, Any] = {rid: record, "redcap_event_name": event, "redcap_repeat_instrument": instrument,
                                   "redcap_repeat_instance": instance if instrument else ""}
            for c in columns[1:]:
                row[c] = values.get(c, "")
            out.append(row)
        return out

    def export_eav(self, records: Iterable[str] = (), fields: Iterable[str] = (), forms: Iterable[str] = (),
                   events: Iterable[str] = ()) -> list[dict[str, Any]]:
        rid = self.mapping.record_id_field
        out = []
        for row in self.export_rows(records, fields, forms, events):
            for name, value in row.items():
                if name in REPEAT_FIELDS or name == rid or value == "":
                    continue
                out.append({"record": row[rid], "redcap_event_name": row["redcap_event_name"],
                            "redcap_repeat_instrument": row["redcap_repeat_instrument"],
                            "redcap_repeat_instance": row["redcap_repeat_instance"], "field_name": name,
                            "value": value})
        return out

    def _select(self, records: Iterable[str], events: Iterable[str]) -> list[sqlite3.Row]:
        sql, args = "SELECT record, event, instrument, instance, field, value FROM data", []
        where = []
        records, events = list(records), list(events)
        if records:
            where.append(f"record IN ({','.join('?' * len(records))})")
            args += records
        if events:
            where.append(f"event IN ({','.join('?' * len(events))})")
            args += events
        if where:
            sql += " WHERE " + " AND ".join(where)
        return self._db.execute(sql, args).fetchall()

    def _row_order(self, slot: tuple) -> tuple:
        record, event, instrument, instance = slot
        return (_natural(record), self._event_order.get(event, 1 << 20),
                -1 if not instrument else self._instrument_order.get(instrument, 1 << 20), instance)

    def record_ids(self) -> list[str]:
        with self._lock:
            return sorted((r[0] for r in self._db.execute("SELECT record FROM records")), key=_natural)

    def delete_records(self, records: Iterable[str], user: str = API_USER) -> int:
        records = list(records)
        with self._lock:
            known = {r[0] for r in self._db.execute("SELECT record FROM records")}
            missing = [r for r in records if r not in known]
            if missing:
                raise RedcapApiError(400, "One or more of the records provided cannot be deleted because they do not "
                                          "exist in the project. The following records do not exist: "
                                     + ", ".join(missing))
            with self._transaction():
                for r in records:
                    self._db.execute("DELETE FROM data WHERE record=?", (r,))
                    self._db.execute("DELETE FROM records WHERE record=?", (r,))
                    self._log(user, "Delete record", r, "", "", 0, "", None, None)
        return len(records)

    # -- test helpers

    def items(self, record: str | None = None) -> list[dict[str, Any]]:
        """Every stored value (EAV), `_complete` statuses included."""
        with self._lock:
            rows = self._select([record] if record else [], [])
        out = [{"record": r["record"], "redcap_event_name": r["event"], "redcap_repeat_instrument": r["instrument"],
                "redcap_repeat_instance": r["instance"] if r["instrument"] else None, "field_name": r["field"],
                "value": r["value"]} for r in rows]
        return sorted(out, key=lambda i: (self._row_order((i["record"], i["redcap_event_name"],
                                                           i["redcap_repeat_instrument"],
                                                           i["redcap_repeat_instance"] or 1)),
                                          self._columns.index(i["field_name"]) if i["field_name"] in self._columns
                                          else 1 << 20))

    def site_edit(self, record: str, event: str, repeat_instrument: str, instance: int | None, field: str,
                  value: str | None, user: str = SITE_USER) -> dict[str, Any]:
        """Site staff enter or change a value on a data entry form (checked like an import; not an API
        write). A None/blank value clears it."""
        row = {self.mapping.record_id_field: record, "redcap_event_name": event,
               "redcap_repeat_instrument": repeat_instrument or "",
               "redcap_repeat_instance": instance if repeat_instrument else "", field: value or ""}
        cells, _, errors = self.check_rows([row])
        if errors:
            raise RedcapApiError(400, "\n".join(errors))
        with self._lock, self._transaction():
            changed = self._apply(cells, overwrite=True, user=user)
        return {"record": record, "field": field, "value": value, "changed": changed}

    def import_count(self) -> int:
        """Record imports REDCap applied through the API (site edits are not counted)."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM imports").fetchone()[0])

    def imports(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM imports ORDER BY id").fetchall()
        return [{**dict(r), "records": json.loads(r["records"])} for r in rows]

    def log(self, record: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            if record:
                rows = self._db.execute("SELECT * FROM log WHERE record=? ORDER BY id", (record,)).fetchall()
            else:
                rows = self._db.execute("SELECT * FROM log ORDER BY id").fetchall()
        return [dict(r) for r in rows]


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# --------------------------------------------------------------------------------------------------
# data formats


def parse_records(data: str, fmt: str, type_: str, mapping: RedcapMapping) -> list[dict[str, Any]]:
    """The `data` of a record import -> flat rows. RedcapApiError(400) when it cannot be read."""
    rid = mapping.record_id_field
    try:
        if fmt == "json":
            loaded = json.loads(data)
            if isinstance(loaded, dict):
                loaded = [loaded]
            if not isinstance(loaded, list):
                raise ValueError("not a list")
            raw = loaded
        elif fmt == "csv":
            raw = list(csv.DictReader(io.StringIO(data)))
        elif fmt == "xml":
            root = safe_parse(data.encode("utf-8"), "REDCap XML records")
            raw = [{child.tag: child.text or "" for child in item} for item in root.iter("item")]
        elif fmt == "odm":
            return _odm_rows(data, mapping)
        else:
            raise RedcapApiError(400, f"The value of the parameter \"format\" ({fmt}) is not valid")
    except RedcapApiError:
        raise
    except (ValueError, csv.Error, IntakeError) as exc:
        raise RedcapApiError(400, f"The data being imported is not formatted correctly as {fmt.upper()}: {exc}") from None
    if type_ == "flat":
        return raw
    if type_ != "eav":
        raise RedcapApiError(400, f"The value of the parameter \"type\" ({type_}) is not valid")
    rows: dict[tuple, dict[str, Any]] = {}
    for item in raw:
        if not isinstance(item, dict):
            raise RedcapApiError(400, "The data being imported is not formatted correctly: EAV rows are objects")
        record = _text(item.get("record"))
        slot = (record, _text(item.get("redcap_event_name")), _text(item.get("redcap_repeat_instrument")),
                _text(item.get("redcap_repeat_instance")))
        row = rows.setdefault(slot, {rid: record, "redcap_event_name": slot[1], "redcap_repeat_instrument": slot[2],
                                     "redcap_repeat_instance": slot[3]})
        name = _text(item.get("field_name"))
        if name and name != rid:
            row[name] = item.get("value", "")
    return list(rows.values())


def _odm_rows(data: str, mapping: RedcapMapping) -> list[dict[str, Any]]:
    """REDCap's CDISC ODM (the project XML flavour) -> flat rows."""
    root = safe_parse(data.encode("utf-8"), "ODM records")
    rid = mapping.record_id_field
    rows: dict[tuple, dict[str, Any]] = {}
    for sd in root.iter("{*}SubjectData"):
        record = sd.get("SubjectKey", "")
        for se in sd.iterchildren("{*}StudyEventData"):
            event = se.get(f"{_R}UniqueEventName") or _strip(se.get("StudyEventOID", ""), "Event.")
            for fd in se.iterchildren("{*}FormData"):
                instrument = _strip(fd.get("FormOID", ""), "Form.")
                repeating = mapping.repeats_in(event, instrument)
                instance = fd.get("FormRepeatKey", "1") if repeating else ""
                slot = (record, event, instrument if repeating else "", instance)
                row = rows.setdefault(slot, {rid: record, "redcap_event_name": event,
                                             "redcap_repeat_instrument": slot[2], "redcap_repeat_instance": instance})
                for it in fd.iter("{*}ItemData"):
                    name = it.get("ItemOID", "")
                    if name != rid:
                        row[name] = "" if it.get("IsNull") == "Yes" else it.get("Value", "")
    return list(rows.values())


def _strip(text: str, prefix: str) -> str:
    return text[len(prefix):] if text.startswith(prefix) else text


def _csv(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    buf = io.StringIO()
    cols = columns or (list(rows[0]) if rows else [])
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    if cols:
        w.writeheader()
    for r in rows:
        w.writerow({k: "" if v is None else v for k, v in r.items()})
    return buf.getvalue()


def _xml(rows: Any) -> str:
    root = etree.Element("records")
    for r in rows if isinstance(rows, list) else [rows]:
        item = etree.SubElement(root, "item")
        for k, v in (r.items() if isinstance(r, dict) else []):
            etree.SubElement(item, re.sub(r"[^A-Za-z0-9_]", "_", str(k))).text = "" if v is None else str(v)
    return '<?xml version="1.0" encoding="UTF-8" ?>\n' + etree.tostring(root, encoding="unicode")


def _answer(data: Any, fmt: str, columns: list[str] | None = None) -> Response:
    if fmt == "csv":
        if isinstance(data, dict):
            data = [data]
        return Response(_csv(data, columns), media_type="text/csv; charset=utf-8")
    if fmt == "xml":
        return Response(_xml(data), media_type="text/xml; charset=utf-8")
    return JSONResponse(data)


def _error(status: int, message: str, fmt: str, headers: dict[str, str] | None = None) -> Response:
    """REDCap's error answer in the request's (return) format."""
    if fmt == "json":
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    if fmt == "csv":
        return Response(f"ERROR: {message}", status_code=status, media_type="text/csv; charset=utf-8", headers=headers)
    body = etree.Element("hash")
    etree.SubElement(body, "error").text = message
    return Response('<?xml version="1.0" encoding="UTF-8" ?>\n' + etree.tostring(body, encoding="unicode"),
                    status_code=status, media_type="text/xml; charset=utf-8", headers=headers)


# --------------------------------------------------------------------------------------------------
# the project XML (CDISC ODM 1.3.1 with redcap: extensions)


_ODM_TYPES = {"integer": ("integer", "int"), "number": ("float", "float"), "date_ymd": ("date", "date_ymd"),
              "time": ("time", "time"), "datetime_seconds_ymd": ("datetime", "datetime_seconds_ymd")}


def project_xml(project: RedcapProject, *, metadata_only: bool, records: Iterable[str] = ()) -> str:
    m = project.mapping
    o, r = "{" + ODM_NS + "}", _R
    stamp = dt.datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
    root = etree.Element(o + "ODM", nsmap={None: ODM_NS, "redcap": REDCAP_NS})
    for k, v in (("ODMVersion", "1.3.1"), ("FileOID", f"000-00-{m.study_oid}"), ("FileType", "Snapshot"),
                 ("Description", m.study_name), ("AsOfDateTime", stamp), ("CreationDateTime", stamp),
                 ("SourceSystem", "REDCap"), ("SourceSystemVersion", REDCAP_VERSION)):
        root.set(k, v)
    study = etree.SubElement(root, o + "Study", OID=f"Project.{m.study_oid}")
    gv = etree.SubElement(study, o + "GlobalVariables")
    for tag in ("StudyName", "StudyDescription", "ProtocolName"):
        etree.SubElement(gv, o + tag).text = m.study_name
    for tag, value in (("RecordAutonumberingEnabled", "0"), ("SurveysEnabled", "0"), ("Purpose", "2")):
        etree.SubElement(gv, r + tag).text = value
    mdv_oid = f"Metadata.{m.study_oid}_{stamp[:10]}"
    mdv = etree.SubElement(study, o + "MetaDataVersion", {"OID": mdv_oid, "Name": m.study_name,
                                                          r + "RecordIdField": m.record_id_field})
    protocol = etree.SubElement(mdv, o + "Protocol")
    for i, name in enumerate(m.events.values(), 1):
        etree.SubElement(protocol, o + "StudyEventRef", StudyEventOID=f"Event.{name}", OrderNumber=str(i),
                         Mandatory="No")
    for i, (oid, name) in enumerate(m.events.items()):
        sed = etree.SubElement(mdv, o + "StudyEventDef", {
            "OID": f"Event.{name}", "Name": m.event_labels[oid], "Type": "Common", "Repeating": "No",
            r + "EventName": m.event_labels[oid], r + "CustomEventLabel": "", r + "UniqueEventName": name,
            r + "ArmNum": str(m.naming.arm), r + "ArmName": f"Arm {m.naming.arm}", r + "DayOffset": str(i),
            r + "OffsetMin": "0", r + "OffsetMax": "0"})
        for j, form in enumerate(m.event_forms[oid], 1):
            etree.SubElement(sed, o + "FormRef", {"FormOID": f"Form.{m.instruments[form]}", "OrderNumber": str(j),
                                                  "Mandatory": "No", r + "FormName": m.instruments[form]})
    defs = list(m.field_defs.values())
    groups = _project_groups(m)
    for form_oid, instrument in m.instruments.items():
        fd = etree.SubElement(mdv, o + "FormDef", {"OID": f"Form.{instrument}", "Name": m.form_labels[form_oid],
                                                   "Repeating": "No", r + "FormName": instrument})
        for group in groups[instrument]:
            etree.SubElement(fd, o + "ItemGroupRef", ItemGroupOID=group, Mandatory="No")
    for form_oid, instrument in m.instruments.items():
        names = [d.name for d in defs if d.instrument == instrument]
        complete = m.naming.complete_field(instrument)
        data_group, status_group = groups[instrument]
        for group, label, members in ((data_group, m.form_labels[form_oid], names),
                                      (status_group, "Form Status", [complete])):
            ig = etree.SubElement(mdv, o + "ItemGroupDef", OID=group, Name=label, Repeating="No")
            for name in members:
                etree.SubElement(ig, o + "ItemRef", {"ItemOID": name, "Mandatory": "No", r + "Variable": name})
    codelists = []
    for d in defs:
        data_type, rc_validation = _ODM_TYPES.get(d.validation, ("text", ""))
        attrs = {"OID": d.name, "Name": d.name, "DataType": data_type, "Length": "999", r + "Variable": d.name,
                 r + "FieldType": "select" if d.field_type == "dropdown" else "text"}
        if rc_validation:
            attrs[r + "TextValidationType"] = rc_validation
        if d.note:
            attrs[r + "FieldNote"] = d.note
        item = etree.SubElement(mdv, o + "ItemDef", attrs)
        etree.SubElement(etree.SubElement(item, o + "Question"), o + "TranslatedText").text = d.label
        if d.choices:
            etree.SubElement(item, o + "CodeListRef", CodeListOID=f"{d.name}.choices")
            codelists.append((d.name, d.choices))
    for instrument in m.instruments.values():
        complete = m.naming.complete_field(instrument)
        item = etree.SubElement(mdv, o + "ItemDef", {"OID": complete, "Name": complete, "DataType": "text",
                                                     "Length": "1", r + "Variable": complete,
                                                     r + "FieldType": "select", r + "SectionHeader": "Form Status"})
        etree.SubElement(etree.SubElement(item, o + "Question"), o + "TranslatedText").text = "Complete?"
        etree.SubElement(item, o + "CodeListRef", CodeListOID=f"{complete}.choices")
        codelists.append((complete, (("0", "Incomplete"), ("1", "Unverified"), ("2", "Complete"))))
    for name, choices in codelists:
        cl = etree.SubElement(mdv, o + "CodeList", {"OID": f"{name}.choices", "Name": name, "DataType": "text",
                                                    r + "Variable": name})
        for code, label in choices:
            cli = etree.SubElement(cl, o + "CodeListItem", CodedValue=code)
            etree.SubElement(etree.SubElement(cli, o + "Decode"), o + "TranslatedText").text = label
    if not metadata_only:
        cd = etree.SubElement(root, o + "ClinicalData", StudyOID=f"Project.{m.study_oid}", MetaDataVersionOID=mdv_oid)
        rows = project.export_rows(records=records)
        by_record: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_record.setdefault(row[m.record_id_field], []).append(row)
        for record, rrows in by_record.items():
            sd = etree.SubElement(cd, o + "SubjectData", {"SubjectKey": record, r + "RecordIdField": m.record_id_field})
            events: dict[str, etree._Element] = {}
            for row in rrows:
                event = row["redcap_event_name"]
                se = events.get(event)
                if se is None:
                    se = events[event] = etree.SubElement(sd, o + "StudyEventData", {
                        "StudyEventOID": f"Event.{event}", "StudyEventRepeatKey": "1", r + "UniqueEventName": event})
                by_instrument: dict[str, list[tuple[str, str]]] = {}
                for name, value in row.items():
                    if name in REPEAT_FIELDS or value == "" or name == m.record_id_field:
                        continue
                    by_instrument.setdefault(project.instrument_of(name) or "", []).append((name, value))
                for instrument, values in by_instrument.items():
                    fd = etree.SubElement(se, o + "FormData", FormOID=f"Form.{instrument}",
                                          FormRepeatKey=str(row["redcap_repeat_instance"] or 1))
                    complete = m.naming.complete_field(instrument)
                    for group, members in zip(groups[instrument], ([v for v in values if v[0] != complete],
                                                                   [v for v in values if v[0] == complete])):
                        if not members:
                            continue
                        ig = etree.SubElement(fd, o + "ItemGroupData", ItemGroupOID=group, ItemGroupRepeatKey="1")
                        for name, value in members:
                            etree.SubElement(ig, o + "ItemData", ItemOID=name, Value=str(value))
    return '<?xml version="1.0" encoding="UTF-8" ?>\n' + etree.tostring(root, encoding="unicode", pretty_print=True)


def _project_groups(m: RedcapMapping) -> dict[str, tuple[str, str]]:
    """instrument -> (its data ItemGroupOID, its Form Status ItemGroupOID), as REDCap names them."""
    out = {}
    for instrument in m.instruments.values():
        first = next((d.name for d in m.field_defs.values() if d.instrument == instrument), instrument)
        out[instrument] = (f"{instrument}.{first}", f"{instrument}.{m.naming.complete_field(instrument)}")
    return out


# --------------------------------------------------------------------------------------------------
# fault injection


class FaultRequest(FaultRequestBase):
    """`POST /_faults`. `mode` (or `modes`, one picked at random per fault) fails the next `count`
    record imports (`scope`: "import", "export" or "any" API request; `count` null: until cleared).
    `rate` < 1 faults each with that probability (`seed` for reproducibility). `after_commit` (true, or a
    probability) applies the import first, then fails. `retry_after` for 429/503, `delay` for
    timeout/slow, `message` for reject."""

    mode: FaultMode | None = None
    modes: list[FaultMode] | None = None
    scope: Literal["import", "export", "any"] = "import"


def _fault_error(fault: Fault, applied: bool, first: tuple[str, str, str] | None) -> RedcapApiError:
    note = " (injected fault; the import WAS applied)" if applied else " (injected fault)"
    plan = fault.plan
    if fault.mode == "500":
        return RedcapApiError(500, "A database error occurred while processing the request" + note)
    if fault.mode == "503":
        return RedcapApiError(503, "REDCap is offline for maintenance" + note,
                              {"Retry-After": _fmt_seconds(plan.retry_after)})
    if fault.mode == "429":
        return RedcapApiError(429, "You have exceeded the maximum number of API requests per minute for this "
                                   "project" + note, {"Retry-After": _fmt_seconds(plan.retry_after)})
    if fault.mode == "auth":
        return RedcapApiError(403, NO_PERMISSION)
    if fault.mode == "timeout":
        return RedcapApiError(504, "Gateway Timeout" + note)
    record, field, value = first or ("", "", "")
    message = plan.message or ("This field is located on a form that is locked. You must first unlock this form for "
                               "this record.")
    return RedcapApiError(400, _line(record, field, value, message + note))


def _fmt_seconds(s: float) -> str:
    return str(int(s)) if float(s).is_integer() else f"{s:g}"


# --------------------------------------------------------------------------------------------------
# the app


class SiteEdit(BaseModel):
    """`POST /_test/site_edit`: one value entered or changed on a data entry form by site staff."""

    model_config = ConfigDict(extra="forbid")
    record: str
    redcap_event_name: str
    redcap_repeat_instrument: str = ""
    redcap_repeat_instance: int | None = None
    field_name: str
    value: str | None
    user: str = SITE_USER


def _mapping_from(source: Any) -> RedcapMapping:
    if source is None:
        source = default_metadata_path()
    if isinstance(source, RedcapMapping):
        return source
    if isinstance(source, StudyMetadata):
        return RedcapMapping.from_metadata(source)
    if isinstance(source, (str, Path)):
        return RedcapMapping.from_metadata(load_metadata(source))
    raise TypeError("project_xml_metadata: a study's ODM metadata file, a StudyMetadata or a RedcapMapping")


class _Params:
    """Form-encoded API parameters (`name`, `name[]`, `name[0]` ...)."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs
        self.first: dict[str, str] = {}
        for k, v in pairs:
            self.first.setdefault(k, v)

    def get(self, name: str, default: str = "") -> str:
        return self.first.get(name, default)

    def many(self, name: str) -> list[str]:
        indexed: list[tuple[int, int, str]] = []
        for n, (k, v) in enumerate(self.pairs):
            if k == f"{name}[]":
                indexed.append((1 << 30, n, v))
            elif k.startswith(f"{name}[") and k.endswith("]") and k[len(name) + 1:-1].isdigit():
                indexed.append((int(k[len(name) + 1:-1]), n, v))
            elif k == name:
                indexed += [(1 << 30, n, part.strip()) for part in v.split(",") if part.strip()]
        return [v for _, _, v in sorted(indexed)]

    def flag(self, name: str) -> bool:
        return self.get(name).strip().lower() in ("1", "true", "yes", "y")


def create_redcap_app(db_path: Path | str | None = None, *, tokens: Mapping[str, str] | None = None,
                      project_xml_metadata: Any = None, faults: bool = True,
                      max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, project_title: str | None = None) -> FastAPI:
    """The REDCap API emulator as an ASGI app. `tokens`: {API token: study OID} (the project's study
    only); `project_xml_metadata`: the study's ODM metadata (a file path, a StudyMetadata or a
    RedcapMapping; CV01's by default) the project mirrors; `db_path` None keeps data in memory.
    `faults=False` removes the fault-injection and test endpoints."""
    mapping = _mapping_from(project_xml_metadata)
    tokens = dict(tokens) if tokens is not None else {DEFAULT_TOKEN: mapping.study_oid}
    for study in tokens.values():
        if study != mapping.study_oid:
            raise ValueError(f"a token names study {study!r}; this emulator's project holds {mapping.study_oid!r}")
    project = RedcapProject(mapping, db_path)
    plan = FaultPlan()
    app = FastAPI(title="REDCap API emulator", version=REDCAP_VERSION, docs_url="/docs", openapi_url="/openapi.json")
    app.state.redcap = project
    app.state.faults = plan
    app.state.mapping = mapping
    title = project_title or f"{mapping.study_name} (esource REDCap emulator)"
    created = _now()

    @app.exception_handler(RedcapApiError)
    async def _api_error(_request: Request, exc: RedcapApiError) -> Response:
        return _error(exc.status, exc.message, "json", exc.headers)

    def _too_large(_size: int | None) -> RedcapApiError:
        return RedcapApiError(413, f"The request body is over the limit of {max_body_bytes} bytes")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "imports": project.import_count(), "persistent": project.db_path is not None}

    @app.post("/api/")
    @app.post("/api")
    async def api(request: Request) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await read_limited_body(request, max_body_bytes, _too_large)
        if ctype.startswith("multipart/"):
            return _error(400, "This REDCap emulator takes form-encoded parameters only (no file uploads)", "json")
        try:
            params = _Params(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        except UnicodeDecodeError:
            return _error(400, "The request is not UTF-8 form-encoded", "json")
        fmt = params.get("format", "xml").lower()
        ret = params.get("returnFormat", "").lower()
        err_fmt = ret if ret in ("json", "csv", "xml") else (fmt if fmt in ("json", "csv", "xml") else "xml")
        try:
            if tokens.get(params.get("token")) is None:
                raise RedcapApiError(403, NO_PERMISSION)
            content = params.get("content")
            if content == "record":
                return await _record(request, params, fmt, ret or fmt, err_fmt)
            fault = plan.take("other", commit_kind="import") if faults else None
            if fault is not None:
                answer = await _before(request, fault, None)
                if answer is not None:
                    return answer
            return _metadata_content(content, params, fmt)
        except RedcapApiError as exc:
            return _error(exc.status, exc.message, err_fmt, exc.headers)

    async def _before(request: Request, fault: Fault, first: tuple[str, str, str] | None) -> Response | None:
        """A fault before anything is applied: an answer, or None to go on (slow)."""
        if fault.mode == "reset":
            return await drop_connection(request, "REDCap emulator")
        if fault.mode == "slow":
            await asyncio.sleep(fault.plan.delay)
            return None
        if fault.mode == "timeout":
            await asyncio.sleep(fault.plan.delay)
        raise _fault_error(fault, False, first)

    async def _record(request: Request, params: _Params, fmt: str, ret: str, err_fmt: str) -> Response:
        action = params.get("action") or ("import" if "data" in params.first else "export")
        if action == "export":
            fault = plan.take("export", commit_kind="import") if faults else None
            if fault is not None:
                answer = await _before(request, fault, None)
                if answer is not None:
                    return answer
            return await run_in_threadpool(_export_records, params, fmt)
        if action == "delete":
            count = await run_in_threadpool(project.delete_records, params.many("records"))
            return JSONResponse(count) if ret == "json" else Response(str(count), media_type="text/plain")
        if action != "import":
            raise RedcapApiError(400, f"The value of the parameter \"action\" ({action}) is not valid")
        overwrite = params.get("overwriteBehavior", "normal")
        if overwrite not in ("normal", "overwrite"):
            raise RedcapApiError(400, f"The value of the parameter \"overwriteBehavior\" ({overwrite}) is not valid")
        return_content = params.get("returnContent", "count")
        if return_content not in ("count", "ids", "auto_ids", "nothing"):
            raise RedcapApiError(400, f"The value of the parameter \"returnContent\" ({return_content}) is not valid")
        date_format = params.get("dateFormat", "YMD").upper()
        if date_format not in ("YMD", "MDY", "DMY"):
            raise RedcapApiError(400, f"The value of the parameter \"dateFormat\" ({date_format}) is not valid")
        if params.flag("forceAutoNumber"):
            raise RedcapApiError(400, "Record auto-numbering is not enabled in this project: forceAutoNumber "
                                      "cannot be used")
        if "data" not in params.first:
            raise RedcapApiError(400, "The parameter \"data\" is missing")
        type_ = params.get("type", "flat")
        rows = parse_records(params.get("data"), fmt, type_, mapping)
        fault = plan.take("import", commit_kind="import") if faults else None
        if fault is not None and not fault.after_commit:
            answer = await _before(request, fault, _first_value(rows, mapping))
            if answer is not None:
                return answer
        records = await run_in_threadpool(project.import_rows, rows, overwrite=overwrite == "overwrite",
                                          date_format=date_format, fmt=fmt, type_=type_)
        if fault is not None and fault.after_commit:
            if fault.mode == "reset":
                return await drop_connection(request, "REDCap emulator")
            if fault.mode in ("timeout", "slow"):
                await asyncio.sleep(fault.plan.delay)  # the answer comes after the client gave up
            else:
                raise _fault_error(fault, True, _first_value(rows, mapping))
        if return_content == "nothing":
            return Response(b"", media_type="text/plain")
        if return_content == "ids":
            return _answer(records, ret) if ret != "csv" else Response("id\n" + "\n".join(records) + "\n",
                                                                        media_type="text/csv")
        if return_content == "auto_ids":
            pairs = [f"{r},{r}" for r in records]
            return JSONResponse(pairs) if ret == "json" else Response("\n".join(pairs), media_type="text/csv")
        if ret == "csv":
            return Response(f"count\n{len(records)}\n", media_type="text/csv")
        if ret == "xml":
            return Response(f'<?xml version="1.0" encoding="UTF-8" ?>\n<count>{len(records)}</count>',
                            media_type="text/xml")
        return JSONResponse({"count": len(records)})

    def _export_records(params: _Params, fmt: str) -> Response:
        type_ = params.get("type", "flat")
        args = dict(records=params.many("records"), fields=params.many("fields"), forms=params.many("forms"),
                    events=params.many("events"))
        if type_ not in ("flat", "eav"):
            raise RedcapApiError(400, f"The value of the parameter \"type\" ({type_}) is not valid")
        if fmt not in ("json", "csv", "xml"):
            raise RedcapApiError(400, f"The value of the parameter \"format\" ({fmt}) is not valid for a record export "
                                      "(this emulator exports json, csv and xml)")
        if type_ == "eav":
            rows = project.export_eav(**args)
            columns = ["record", "field_name", "value", "redcap_event_name", "redcap_repeat_instrument",
                       "redcap_repeat_instance"]
        else:
            rows = project.export_rows(**args)
            columns = [mapping.record_id_field, *REPEAT_FIELDS, *project.columns(args["fields"], args["forms"])[1:]]
        if params.get("rawOrLabel") == "label":
            rows = [_labelled(r, project) for r in rows]
        return _answer(rows, fmt, columns)

    def _metadata_content(content: str, params: _Params, fmt: str) -> Response:
        if content == "version":
            return Response(REDCAP_VERSION, media_type="text/plain")
        if content == "project":
            info = {"project_id": 1000 + sum(map(ord, mapping.study_oid)), "project_title": title,
                    "creation_time": created, "production_time": created, "in_production": 1,
                    "project_language": "English", "purpose": 2, "purpose_other": "", "project_notes":
                    f"Mirrors study {mapping.study_oid} (MetaDataVersion {mapping.metadata_version_oid}).",
                    "custom_record_label": "", "secondary_unique_field": "", "is_longitudinal": 1,
                    "has_repeating_instruments_or_events": 1 if mapping.repeating_rows() else 0,
                    "surveys_enabled": 0, "scheduling_enabled": 0, "record_autonumbering_enabled": 0,
                    "randomization_enabled": 0, "ddp_enabled": 0, "project_irb_number": "",
                    "project_grant_number": "", "project_pi_firstname": "", "project_pi_lastname": "",
                    "display_today_now_button": 1, "missing_data_codes": "", "external_modules": "",
                    "bypass_branching_erase_field_prompt": 0}
            return _answer(info, fmt)
        if content == "metadata":
            fields, forms = params.many("fields"), params.many("forms")
            rows = [r for r in mapping.data_dictionary()
                    if (not fields and not forms) or r["field_name"] in fields or r["form_name"] in forms]
            return _answer(rows, fmt)
        if content == "instrument":
            return _answer(mapping.instrument_rows(), fmt)
        if content == "arm":
            return _answer([{"arm_num": mapping.naming.arm, "name": f"Arm {mapping.naming.arm}"}], fmt)
        if content == "event":
            arms = params.many("arms")
            rows = [r for r in mapping.event_rows() if not arms or str(r["arm_num"]) in arms]
            return _answer(rows, fmt)
        if content == "formEventMapping":
            arms = params.many("arms")
            rows = [r for r in mapping.form_event_rows() if not arms or str(r["arm_num"]) in arms]
            return _answer(rows, fmt)
        if content == "repeatingFormsEvents":
            return _answer(mapping.repeating_rows(), fmt)
        if content == "exportFieldNames":
            wanted = params.get("field")
            names = [n for n in [*mapping.field_defs, *(mapping.naming.complete_field(i)
                                                        for i in mapping.instruments.values())]
                     if not wanted or n == wanted]
            if wanted and not names:
                raise RedcapApiError(400, f"The field \"{wanted}\" does not exist in the project")
            return _answer([{"original_field_name": n, "choice_value": "", "export_field_name": n} for n in names], fmt)
        if content == "project_xml":
            xml = project_xml(project, metadata_only=params.flag("returnMetadataOnly"), records=params.many("records"))
            return Response(xml, media_type="text/xml; charset=utf-8")
        raise RedcapApiError(400, f"The value of the parameter \"content\" ({content}) is not valid")

    if faults:
        add_fault_routes(app, plan, FaultRequest)

        @app.get("/_test/items")
        def test_items(record: str | None = None) -> list[dict[str, Any]]:
            return project.items(record)

        @app.post("/_test/site_edit")
        def test_site_edit(edit: SiteEdit) -> dict[str, Any]:
            return project.site_edit(edit.record, edit.redcap_event_name, edit.redcap_repeat_instrument,
                                     edit.redcap_repeat_instance, edit.field_name, edit.value, user=edit.user)

        @app.get("/_test/imports")
        def test_imports() -> list[dict[str, Any]]:
            return project.imports()

        @app.get("/_test/log")
        def test_log(record: str | None = None) -> list[dict[str, Any]]:
            return project.log(record)

    return app


def _first_value(rows: list[dict[str, Any]], mapping: RedcapMapping) -> tuple[str, str, str] | None:
    rid = mapping.record_id_field
    for row in rows:
        if not isinstance(row, dict):
            continue
        for name, value in row.items():
            if name != rid and name not in REPEAT_FIELDS and _text(value) != "":
                return (_text(row.get(rid)), name, _text(value))
    return None


def _labelled(row: dict[str, Any], project: RedcapProject) -> dict[str, Any]:
    out = dict(row)
    for name, value in row.items():
        d = project.mapping.field_defs.get(name)
        if d is not None and d.choices and value not in ("", None):
            out[name] = dict(d.choices).get(str(value), value)
    return out


# --------------------------------------------------------------------------------------------------
# standalone


def run_redcap(host: str = "127.0.0.1", port: int = 8092, db_path: Path | None = None, *,
               tokens: Mapping[str, str] | None = None, metadata: Any = None, log_level: str = "info") -> None:
    """Serve the emulator with uvicorn until interrupted."""
    app = create_redcap_app(db_path, tokens=tokens, project_xml_metadata=metadata)
    serve_standalone(app, host, port, app.state.redcap.close, log_level=log_level)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="redcap-emulator", description="REDCap API emulator (one project)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8092)
    parser.add_argument("--db", type=Path, default=None, help="SQLite file (default: in memory)")
    parser.add_argument("--metadata", type=Path, default=None, help="the study's ODM metadata (default: CV01)")
    parser.add_argument("--token", default=DEFAULT_TOKEN, help="the API token (32 hex characters)")
    args = parser.parse_args(argv)
    mapping = _mapping_from(args.metadata)
    run_redcap(args.host, args.port, args.db, tokens={args.token: mapping.study_oid}, metadata=mapping)


if __name__ == "__main__":
    main()
