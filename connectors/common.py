"""What the EDC connectors share, so each vendor module holds only its protocol: the transaction key
they name transactions by, Retry-After parsing, keeping credentials out of every text that leaves a
connector, and the pooled HTTP client a connector owns (closed with it, unless it was handed one)."""

from __future__ import annotations

import datetime as dt
import email.utils
import re
from collections.abc import Iterable
from typing import Self
from urllib.parse import urlsplit, urlunsplit

import httpx

from esource.domain.model import SubjectTransaction

__all__ = ["transaction_key", "parse_retry_after", "redact", "without_userinfo", "userinfo_secrets", "Closing",
           "OwnsHttpClient"]

_USERINFO = re.compile(r"(\w+://)[^/@\s]+@")


def transaction_key(tx: SubjectTransaction) -> str:
    """`<study>/<subject>/<sequence>`: how a transaction is named in messages (and what the sandbox
    de-duplicates on and orders by)."""
    return f"{tx.study_oid}/{tx.subject_key}/{tx.sequence}"


def parse_retry_after(value: str | None, *, now: dt.datetime | None = None) -> float | None:
    """Retry-After as seconds: a number (fractions accepted) or an HTTP date; None when absent/unreadable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        seconds = (when - (now or dt.datetime.now(dt.timezone.utc))).total_seconds()
    return max(0.0, seconds) if seconds == seconds else None  # NaN guard


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` without any of the secrets, nor the user:password@ of a URL in it."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _USERINFO.sub(r"\1***@", text)


def without_userinfo(url: str) -> str:
    """The URL as it may be shown: without user:password@."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def userinfo_secrets(url: str) -> list[str]:
    """The password of a URL's user:password@, to redact wherever it might show."""
    parts = urlsplit(url)
    return [s for s in (parts.password,) if s]


class Closing:
    """A connector as a context manager: `with Connector(...) as c:` closes it at the end."""

    def close(self) -> None:
        """Nothing to release by default."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OwnsHttpClient(Closing):
    """A connector holding one pooled, thread-safe httpx.Client: made here (and closed with the
    connector) unless one is handed in (then it stays the caller's)."""

    _client: httpx.Client
    _owns_client: bool

    def _use_client(self, client: httpx.Client | None, timeout: float) -> None:
        self._owns_client = client is None
        self._client = client if client is not None else httpx.Client(timeout=timeout, follow_redirects=False)

    def close(self) -> None:
        if self._owns_client:
            self._client.close()
