"""Browser sessions of the dashboard: a signed cookie instead of a bearer token, resolved to the same
`Principal` the API uses, so `esource.api.auth.require` decides for pages exactly as for the API.

- The cookie (`esource_session`, path `/ui`) is HttpOnly, SameSite=Strict, Secure when served over
  HTTPS. Its value is `base64url(JSON) "." base64url(HMAC-SHA256)`; the JSON holds the username, the
  issue time and the session's CSRF token - never a role: the user's roles, sites and studies are read
  from the store on every request, so a disabled user or a changed role takes effect at once.
- The key is derived from the settings' `auth_secret` (HMAC with a fixed label, so the secret itself
  never signs anything a browser holds); in demo mode without a secret a fixed, public demo key is used
  (demo sessions are worth nothing outside the demo, like the demo accounts themselves).
- CSRF: every form post carries the session's token (synchronizer token); the login form, which has
  no session yet, carries a nonce that a short-lived signed cookie also holds. A post whose Origin
  header names another host is refused as well. SameSite=Strict is a second line, not the only one.
- Sessions end after `SESSION_MAX_AGE` (no sliding renewal) or at logout (the cookie is deleted;
  cookies are not server-side state, so a copied cookie stays valid until it expires - see the report).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from esource.api.auth import Principal, Role

SESSION_COOKIE = "esource_session"
LOGIN_COOKIE = "esource_login"
LANG_COOKIE = "esource_lang"
COOKIE_PATH = "/ui"
SESSION_MAX_AGE = 8 * 3600  # a working day; then log in again
LOGIN_MAX_AGE = 30 * 60  # the login form's nonce
_LABEL = b"esource.web.session.v1"
#: Demo mode only (Settings refuses to run without an auth secret outside it): public on purpose.
DEMO_SESSION_KEY = hashlib.sha256(b"esource demo dashboard sessions - not a secret").digest()


def session_key(container: Any) -> bytes:
    """The signing key of this installation's sessions (see the module docstring)."""
    settings = container.settings
    secret = settings.auth_secret.get_secret_value() if settings.auth_secret is not None else None
    if not secret:
        if settings.mode != "demo":  # Settings refuses this already; never sign with a public key in production
            raise ValueError("the dashboard needs settings.auth_secret outside demo mode")
        return DEMO_SESSION_KEY
    return hmac.new(secret.encode("utf-8"), _LABEL, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """Signs small JSON payloads with HMAC-SHA256 (a purpose string keeps cookie kinds apart)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, purpose: str, body: str) -> str:
        return _b64(hmac.new(self._key, f"{purpose}|{body}".encode("ascii"), hashlib.sha256).digest())

    def dumps(self, purpose: str, payload: dict[str, Any]) -> str:
        body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode("utf-8"))
        return f"{body}.{self._mac(purpose, body)}"

    def loads(self, purpose: str, token: str | None, *, max_age: int, now: float | None = None) -> dict[str, Any] | None:
        """The payload, or None when the token is absent, altered, malformed or older than max_age."""
        if not token or token.count(".") != 1 or len(token) > 4096:
            return None
        body, mac = token.split(".")
        try:
            if not hmac.compare_digest(mac, self._mac(purpose, body)):
                return None
            payload = json.loads(_unb64(body))
        except (ValueError, UnicodeError):
            return None
        if not isinstance(payload, dict) or not isinstance(payload.get("iat"), (int, float)):
            return None
        age = (time.time() if now is None else now) - payload["iat"]
        if age < -60 or age > max_age:  # a little clock skew tolerated, nothing from the future
            return None
        return payload


@dataclass(frozen=True, slots=True)
class WebSession:
    """A verified session cookie."""

    username: str
    issued_at: float
    csrf: str


def new_session(username: str) -> dict[str, Any]:
    return {"u": username, "iat": int(time.time()), "csrf": secrets.token_urlsafe(32)}


def read_session(signer: Signer, cookie: str | None) -> WebSession | None:
    payload = signer.loads("session", cookie, max_age=SESSION_MAX_AGE)
    if payload is None or not isinstance(payload.get("u"), str) or not isinstance(payload.get("csrf"), str):
        return None
    return WebSession(payload["u"], float(payload["iat"]), payload["csrf"])


def principal_of_user(user: Any) -> Principal | None:
    """The Principal of a stored API user (as the API's password login builds it), None when inactive."""
    if user is None or not user.active:
        return None
    roles = frozenset(Role(r) for r in user.roles if r in Role._value2member_map_)
    return Principal(username=user.username, roles=roles, sites=user.sites, studies=user.studies, via="session")


def same_token(given: str | None, expected: str | None) -> bool:
    """Constant-time comparison of two CSRF tokens (False when either is missing)."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))
