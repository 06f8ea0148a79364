"""API users and tokens as the store keeps them (no secret in clear: a password hash, a token hash).

Plain data: the checks (hashing, expiry, role rules) live in `esource.api.auth`."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class User:
    """A person or service account. `roles` are `esource.api.auth.Role` values; `sites`/`studies` None
    means no restriction (a CRA has sites, an edc account exactly one study)."""

    username: str
    roles: frozenset[Any]
    sites: frozenset[str] | None = None
    studies: frozenset[str] | None = None
    password_hash: str | None = None  # scrypt$N$r$p$salt$hash, None: no password login
    active: bool = True
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class ApiToken:
    """A bearer token: `token_id` is the public part (`esk_<token_id>_<secret>`) used for lookup and
    revocation; `token_hash` the SHA-256 of the whole token."""

    token_id: str
    token_hash: str
    username: str
    created_at: dt.datetime
    expires_at: dt.datetime | None = None
    revoked_at: dt.datetime | None = None
    label: str | None = None
