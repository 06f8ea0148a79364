"""The connector for esource's sandbox EDC (connectors/sandbox_edc.py): ODM over HTTP, de-duplicated
on the transaction key the sandbox receives in `X-Esource-Transaction`.

    connector = SandboxConnector("http://127.0.0.1:8090", timeout=10)
    receipt = connector.send(tx, odm)            # DeliveryReceipt, or raises TransientDeliveryError
    odm = connector.read_back("CV01", "001-0001")  # the subject's Snapshot, None when unknown

How answers map to the EdcConnector port:
- 201 (applied) and 200 (a duplicate: the original receipt, nothing applied) -> accepted, with the
  EDC's reference (a duplicate has code "duplicate").
- 400, 401, 403, 404, 409 (other than "out of order"), 413, 415, 422 and other 4xx -> a permanent
  rejection carrying the HTTP status as code and the EDC's own message.
- 409 "out of order", 408, 429 (Retry-After honoured), 5xx (Retry-After honoured), timeouts,
  connection errors, unexpected statuses -> `TransientDeliveryError` (retried by the dispatcher).
Credentials (the API key, user:password in the URL) never appear in a message.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import re
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from esource.domain.model import SubjectTransaction
from esource.domain.ports import ConnectorCapabilities, DeliveryReceipt
from esource.services.dispatch import TransientDeliveryError

TRANSACTION_HEADER = "X-Esource-Transaction"
_MAX_MESSAGE = 2000
_TRANSIENT_4XX = {408, 425, 429}


def transaction_key(tx: SubjectTransaction) -> str:
    """`<study>/<subject>/<sequence>`: what the sandbox de-duplicates on and orders by."""
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


class SandboxConnector:
    """`EdcConnector` for the sandbox EDC. Thread-safe (one pooled httpx.Client)."""

    name = "sandbox"

    def __init__(self, base_url: str, *, timeout: float = 10.0, client: httpx.Client | None = None,
                 api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._owns_client = client is None
        self._client = client if client is not None else httpx.Client(timeout=timeout, follow_redirects=False)
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._secrets = [s for s in (api_key, *_userinfo_secrets(self.base_url)) if s]
        self._shown_url = _without_userinfo(self.base_url)

    def capabilities(self) -> ConnectorCapabilities:
        return ConnectorCapabilities("sandbox", read_back=True, idempotency_key=True, integer_repeat_keys=False)

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> SandboxConnector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SandboxConnector({self._shown_url!r})"

    # ------------------------------------------------------------------------------------ port

    def send(self, transaction: SubjectTransaction, odm: bytes) -> DeliveryReceipt:
        key = transaction_key(transaction)
        url = f"{self.base_url}/studies/{quote(transaction.study_oid, safe='')}/odm"
        headers = {"Content-Type": "application/xml", "Accept": "application/json", TRANSACTION_HEADER: key,
                   **self._auth}
        try:
            r = self._client.post(url, content=odm, headers=headers, timeout=self.timeout)
        except httpx.TimeoutException as exc:
            raise TransientDeliveryError(
                f"sandbox EDC at {self._shown_url}: no answer within {self.timeout:g}s for {key} "
                f"({type(exc).__name__}); it may have been applied, re-sending is safe", ambiguous=True) from None
        except (httpx.TransportError, OSError) as exc:
            raise TransientDeliveryError(
                f"sandbox EDC at {self._shown_url}: {type(exc).__name__}: {self._redact(str(exc)) or 'connection failed'} "
                f"for {key}", ambiguous=True) from None
        status = r.status_code
        body = _json(r)
        if status in (200, 201):
            reference = body.get("reference") if isinstance(body, dict) else None
            duplicate = status == 200 and isinstance(body, dict) and bool(body.get("duplicate"))
            return DeliveryReceipt(accepted=True, reference=str(reference) if reference else None,
                                   code="duplicate" if duplicate else str(status),
                                   message="already received: nothing applied again" if duplicate else None)
        message = self._message(r, body)
        vendor_code = body.get("code") if isinstance(body, dict) else None
        retry_after = parse_retry_after(r.headers.get("retry-after"))
        if status == 409 and (vendor_code == "OUT_OF_ORDER" or "out of order" in message.lower()):
            raise TransientDeliveryError(f"sandbox EDC: HTTP 409 for {key}: {message}", code="409")
        if status in _TRANSIENT_4XX or status >= 500 or status < 400:
            raise TransientDeliveryError(f"sandbox EDC: HTTP {status} for {key}: {message}", code=str(status),
                                         retry_after=retry_after)
        return DeliveryReceipt(accepted=False, permanent=True, code=str(status), message=message)

    def read_back(self, study_oid: str, subject_key: str) -> bytes | None:
        url = f"{self.base_url}/studies/{quote(study_oid, safe='')}/subjects/{quote(subject_key, safe='')}/clinicaldata"
        try:
            r = self._client.get(url, headers={"Accept": "application/xml", **self._auth}, timeout=self.timeout)
        except (httpx.HTTPError, OSError) as exc:
            raise TransientDeliveryError(
                f"sandbox EDC at {self._shown_url}: read-back of {study_oid}/{subject_key} failed: "
                f"{type(exc).__name__}", ambiguous=False) from None
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise TransientDeliveryError(
                f"sandbox EDC: read-back of {study_oid}/{subject_key}: HTTP {r.status_code}: {self._message(r, _json(r))}",
                code=str(r.status_code), retry_after=parse_retry_after(r.headers.get("retry-after")))
        return r.content

    # ------------------------------------------------------------------------------------ helpers

    def _message(self, r: httpx.Response, body: Any) -> str:
        """The EDC's own message (its JSON `message`, or FastAPI's `detail`, else the text)."""
        if isinstance(body, dict):
            text = body.get("message") or body.get("detail")
            if not isinstance(text, str):
                text = str(text) if text is not None else ""
        else:
            text = r.text
        text = " ".join(text.split()) or f"HTTP {r.status_code} {r.reason_phrase}".strip()
        return self._redact(text)[:_MAX_MESSAGE]

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return _USERINFO.sub(r"\1***@", text)


_USERINFO = re.compile(r"(\w+://)[^/@\s]+@")


def _json(r: httpx.Response) -> Any:
    if "json" not in r.headers.get("content-type", ""):
        return None
    try:
        return r.json()
    except ValueError:
        return None


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _userinfo_secrets(url: str) -> list[str]:
    parts = urlsplit(url)
    return [s for s in (parts.password,) if s]
