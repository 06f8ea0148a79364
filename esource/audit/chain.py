"""The audit chain's canonical form: what each entry's hash is computed over, so an auditor can
recompute it independently of esource.

Canonical form of one `audit_log` row (the exact algorithm `entry_hash` implements):

1. Take every stored column except `hash` as a JSON object with exactly these 23 members:
   `id` (integer), `at`, `actor`, `action`, `study_oid`, `subject_key`, `site_oid`, `study_event_oid`,
   `study_event_repeat_key`, `form_oid`, `item_group_oid`, `item_group_repeat_key`, `item_oid`,
   `old_value`, `new_value`, `reason`, `source_type`, `source_id`, `source_version`, `source_identity`,
   `rule` (each a string, or null when the column is NULL), `detail` (the stored JSON object) and
   `prev_hash` (the predecessor's `hash`; 64 zeros for the first entry).
2. `at` is written `YYYY-MM-DDTHH:MM:SS.ffffffZ`: UTC, always six fraction digits, a literal `Z`.
3. Serialise with object keys sorted by code point at every level, no whitespace (separators `,` and
   `:`), non-ASCII characters written as themselves, encoded UTF-8 — in Python
   `json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)`.
   `detail` never holds a JSON float (the store writes non-integer numbers as strings), and every
   key is ASCII, so this is also the RFC 8785 (JCS) serialisation of the object.
4. `hash` = SHA-256 of those bytes, as 64 lowercase hex digits.

The chain: entry n's `prev_hash` is entry n−1's `hash`, ids run 1, 2, 3 ... without gaps, and
`audit_head` holds the last id and hash. Altering any column breaks that entry's hash; deleting or
re-ordering rows breaks the ids or the links; deleting the last rows leaves the head pointing past
the table.

Privacy (the store stays inside the hospital, but the trail is exported): an event's Patient source
keeps only its type and version — a Patient id or identifier is never stored (`row_values`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from functools import lru_cache
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import orjson

from esource.domain.audit import AuditEvent, item_columns

GENESIS_HASH = "0" * 64

#: The stored columns of an entry, in table order (without id, prev_hash and hash).
ENTRY_COLUMNS: tuple[str, ...] = (
    "at",
    "actor",
    "action",
    "study_oid",
    "subject_key",
    "site_oid",
    "study_event_oid",
    "study_event_repeat_key",
    "form_oid",
    "item_group_oid",
    "item_group_repeat_key",
    "item_oid",
    "old_value",
    "new_value",
    "reason",
    "source_type",
    "source_id",
    "source_version",
    "source_identity",
    "rule",
    "detail",
)

#: Every member of the canonical object.
CANONICAL_MEMBERS: tuple[str, ...] = ("id", *ENTRY_COLUMNS, "prev_hash")


def format_at(at: dt.datetime) -> str:
    """`at` as the canonical form writes it (UTC, microseconds, `Z`)."""
    if at.tzinfo is not dt.UTC and (at.tzinfo is None or at.utcoffset() is None):
        raise ValueError(f"naive datetime {at!r}: audit timestamps are timezone-aware UTC")
    return _format_at(at)


@lru_cache(maxsize=1024)
def _format_at(at: dt.datetime) -> str:
    # a batch's events share their timestamp: formatted once (datetimes hash by instant, so two
    # equal instants in different zones give the same UTC text either way)
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_PLAIN = (str, int, bool, type(None))


def json_detail(value: Any) -> Any:
    """`detail` as stored: JSON types only, non-integer numbers as strings (no float formatting in the
    hash), tuples as lists, dates as ISO text. Raises TypeError for anything else."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, (float, Decimal)):
        if isinstance(value, float) and not math.isfinite(value):
            raise TypeError("NaN and infinity cannot be stored in an audit entry")
        return str(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {k if type(k) is str else str(k): v if type(v) in _PLAIN else json_detail(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        if isinstance(value, (list, tuple)) and all(type(v) in _PLAIN for v in value):
            return list(value)  # the common case (a mapped value's conversions): text as it is
        items = [json_detail(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    raise TypeError(f"cannot store {type(value).__name__} in an audit entry's detail")


def row_values(event: AuditEvent, at: dt.datetime) -> dict[str, Any]:
    """The stored columns of an event (without id, prev_hash, hash)."""
    item, source = event.item, event.source
    patient = source is not None and source.resource_type == "Patient"
    detail = event.detail or {}
    return {
        "at": at if at.tzinfo is dt.UTC else at.astimezone(dt.UTC),
        "actor": event.actor,
        "action": str(event.action.value if hasattr(event.action, "value") else event.action),
        "study_oid": event.study_oid,
        "subject_key": event.subject_key,
        "site_oid": event.site_oid,
        **item_columns(item),
        "old_value": event.old_value,
        "new_value": event.new_value,
        "reason": event.reason,
        "source_type": source.resource_type if source else None,
        # privacy: a Patient's id and identifier (often the MRN) never enter the trail
        "source_id": None if source is None or patient else source.id,
        "source_version": source.version if source else None,
        "source_identity": None if source is None or patient else source.identity,
        "rule": event.rule,
        "detail": json_detail(detail if isinstance(detail, Mapping) else dict(detail)),
    }


def canonical_bytes(row: Mapping[str, Any]) -> bytes:
    """The canonical serialisation of a stored row (a mapping with every member of
    CANONICAL_MEMBERS; `hash` and any other key are ignored)."""
    obj: dict[str, Any] = {name: row[name] for name in CANONICAL_MEMBERS}
    at = obj["at"]
    if isinstance(at, dt.datetime):
        obj["at"] = format_at(at)
    obj["id"] = int(obj["id"])
    # orjson with sorted keys writes exactly the bytes of the json.dumps call in the docstring (compact,
    # UTF-8, same escapes; checked against it in tests/audit), several times faster
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def entry_hash(row: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of `canonical_bytes(row)`: the entry's `hash`."""
    return hashlib.sha256(canonical_bytes(row)).hexdigest()


def chain_rows(values: list[dict[str, Any]], last_id: int, last_hash: str) -> list[dict[str, Any]]:
    """Number and hash new entries after the chain's head (last_id, last_hash): the complete rows to insert."""
    rows: list[dict[str, Any]] = []
    prev = last_hash
    for offset, v in enumerate(values, start=1):
        row = {"id": last_id + offset, **v, "prev_hash": prev}
        row["hash"] = prev = entry_hash(row)
        rows.append(row)
    return rows
