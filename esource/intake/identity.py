"""Source identity and version of a FHIR resource (CV01 protocol, "Forms, item groups, items").

A resource is the same record across messages when it has the same first identifier (system|value),
else the same resource id, else the same fullUrl. Its version is `meta.versionId`, else a SHA-256 of
its canonical JSON.

Identity strings (stable: they key log repeat keys and updates in the store, do not change them):

* ``"<ResourceType>|<system>|<value>"`` from the first `identifier` that carries a value. An
  identifier without a `system` gives an empty system (``"Patient||U6547890"``). Identifiers whose
  `value` is absent (e.g. only a data-absent-reason extension on `_value`) are skipped. R4 Composition
  has a single `identifier` object instead of a list: it is read as a one-element list.
* ``"<ResourceType>/<id>"`` from the logical id.
* ``"fullUrl|<fullUrl>"`` from the Bundle entry's fullUrl.
* ``"content|<ResourceType>|sha256:<hex>"`` when there is none of the above: the content is the
  identity, so any change to the resource makes it a new record.

Version: ``meta.versionId`` when present, else ``"sha256:<hex>"`` of the canonical JSON of the *whole*
resource: orjson with sorted keys (at every level), no whitespace, no key excluded. We deliberately do
not drop `meta.lastUpdated` or any other element: two copies that differ in any byte of meaning are
two versions, and the mapping engine decides whether the values it reads changed. Key order and
whitespace of the input do not affect the hash. Numbers are hashed as orjson re-serialises them
(`1.0` and `1.00` are the same number), which is what JSON means.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

import orjson

from esource.intake.jsonvalues import as_str
from esource.domain.model import SourceRef

__all__ = [
    "canonical_json",
    "content_hash",
    "make_source_ref",
    "source_identity",
    "source_version",
]

_SORT = orjson.OPT_SORT_KEYS


def canonical_json(resource: Any) -> bytes:
    """Canonical JSON bytes: keys sorted at every level, compact. Raises TypeError for non-JSON values."""
    return orjson.dumps(resource, option=_SORT)


def content_hash(resource: Any) -> str:
    """Hex SHA-256 of the canonical JSON."""
    return hashlib.sha256(orjson.dumps(resource, option=_SORT)).hexdigest()


def _first_identifier(resource: dict[str, Any]) -> tuple[str, str] | None:
    identifiers = resource.get("identifier")
    if identifiers is None:
        return None
    if type(identifiers) is dict:
        identifiers = (identifiers,)
    elif type(identifiers) is not list:
        return None
    for ident in identifiers:
        if type(ident) is not dict:
            continue
        value = as_str(ident.get("value"))
        if value is None:
            continue
        system = ident.get("system")
        return (system if type(system) is str else "", value)
    return None


def _identity(resource: dict[str, Any], resource_type: str, rid: str | None, full_url: str | None) -> str | None:
    ident = _first_identifier(resource)
    if ident is not None:
        return f"{resource_type}|{ident[0]}|{ident[1]}"
    if rid is not None:
        return f"{resource_type}/{rid}"
    if full_url:
        return f"fullUrl|{full_url}"
    return None


def _version_id(resource: dict[str, Any]) -> str | None:
    meta = resource.get("meta")
    if type(meta) is dict:
        return as_str(meta.get("versionId"))
    return None


def source_identity(resource: dict[str, Any], full_url: str | None = None) -> str:
    """The protocol's source identity of `resource` (see the module docstring for the forms)."""
    rt = resource.get("resourceType")
    rt = rt if type(rt) is str else "Resource"
    identity = _identity(resource, rt, as_str(resource.get("id")), full_url)
    if identity is None:
        identity = f"content|{rt}|sha256:{content_hash(resource)}"
    return identity


def source_version(resource: dict[str, Any]) -> str:
    """`meta.versionId`, else ``"sha256:<hex>"`` of the canonical JSON of the whole resource."""
    version = _version_id(resource)
    if version is None:
        version = "sha256:" + content_hash(resource)
    return version


def make_source_ref(resource: dict[str, Any], full_url: str | None = None, element: str | None = None) -> SourceRef:
    """Build the SourceRef of a resource. The canonical dump is made at most once, and only when
    there is no meta.versionId (or no identity at all)."""
    rt = resource.get("resourceType")
    rt = rt if type(rt) is str else "Resource"
    rid = as_str(resource.get("id"))
    identity = _identity(resource, rt, rid, full_url)
    version = _version_id(resource)
    if version is None or identity is None:
        digest = content_hash(resource)
        if version is None:
            version = "sha256:" + digest
        if identity is None:
            identity = f"content|{rt}|sha256:{digest}"
    return SourceRef(
        resource_type=rt, id=rid, version=version, identity=identity, full_url=full_url, element=element
    )


def _last_updated(resource: dict[str, Any]) -> dt.datetime | None:
    meta = resource.get("meta")
    value = meta.get("lastUpdated") if isinstance(meta, dict) else None
    if not isinstance(value, str):
        return None
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def is_stale(incoming: dict[str, Any], incoming_version: str, stored: dict[str, Any], stored_version: str) -> bool:
    """Whether an incoming version of a record is older than the one kept, so it must not replace it
    (messages can arrive out of order: a replayed backlog, two channels). Older means an earlier
    `meta.lastUpdated` when both carry one, else a smaller numeric `meta.versionId` when both are
    numbers; otherwise nothing tells, and the later arrival wins."""
    new_time, old_time = _last_updated(incoming), _last_updated(stored)
    if new_time is not None and old_time is not None:
        return new_time < old_time
    if incoming_version.isdigit() and stored_version.isdigit():
        return int(incoming_version) < int(stored_version)
    return False
