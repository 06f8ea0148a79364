"""The connector for esource's sandbox EDC (connectors/sandbox_edc.py): ODM over HTTP, de-duplicated
on the transaction key the sandbox receives in `X-Esource-Transaction`.

    connector = SandboxConnector("http://127.0.0.1:8090", timeout=10)
    receipt = connector.send(tx, odm)            # DeliveryReceipt, or raises TransientDeliveryError
    odm = connector.read_back("CV01", "001-0001")  # the subject's Snapshot, None when unknown

How answers map to the EdcConnector port:
- 201 (applied) and 200 (a duplicate: the original receipt, nothing applied) -> accepted, with the
  EDC's reference (a duplicate has code "duplicate").
- 400, 404, 409 (other than "out of order"), 413, 415, 422 and other 4xx -> a permanent rejection
  carrying the HTTP status as code and the EDC's own message.
- 401, 403 (a wrong API key; to send and to read back) -> `EdcAuthenticationError`: the dispatcher
  stops sending to the sandbox and keeps every transaction pending.
- 409 "out of order", 408, 429 (Retry-After honoured), 5xx (Retry-After honoured), timeouts,
  connection errors, unexpected statuses -> `TransientDeliveryError` (retried by the dispatcher).
Credentials (the API key, user:password in the URL) never appear in a message.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from esource.connectors.common import (
    OwnsHttpClient,
    parse_retry_after,
    redact,
    transaction_key,
    userinfo_secrets,
    without_userinfo,
)
from esource.domain.model import SubjectTransaction
from esource.domain.ports import ConnectorCapabilities, DeliveryReceipt
from esource.services.dispatch import EdcAuthenticationError, TransientDeliveryError

TRANSACTION_HEADER = "X-Esource-Transaction"
_MAX_MESSAGE = 2000
_TRANSIENT_4XX = {408, 425, 429}
_AUTH_STATUSES = (401, 403)


class SandboxConnector(OwnsHttpClient):
    """`EdcConnector` for the sandbox EDC. Thread-safe (one pooled httpx.Client)."""

    name = "sandbox"

    def __init__(self, base_url: str, *, timeout: float = 10.0, client: httpx.Client | None = None,
                 api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._use_client(client, timeout)
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._secrets = [s for s in (api_key, *userinfo_secrets(self.base_url)) if s]
        self._shown_url = without_userinfo(self.base_url)

    def capabilities(self) -> ConnectorCapabilities:
        return ConnectorCapabilities("sandbox", read_back=True, idempotency_key=True, integer_repeat_keys=False)

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
        if status in _AUTH_STATUSES:
            raise EdcAuthenticationError(f"sandbox EDC at {self._shown_url}: HTTP {status}: {message}", status=status,
                                         code=str(vendor_code or status))
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
        if r.status_code in _AUTH_STATUSES:
            raise EdcAuthenticationError(f"sandbox EDC at {self._shown_url}: HTTP {r.status_code} to the read-back: "
                                         f"{self._message(r, _json(r))}", status=r.status_code, code=str(r.status_code))
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
        return redact(text, self._secrets)


def _json(r: httpx.Response) -> Any:
    if "json" not in r.headers.get("content-type", ""):
        return None
    try:
        return r.json()
    except ValueError:
        return None
