"""Shared by the role-based API tests: a locally generated RSA key and JWT builder, sample data, users
and tokens per role, and answer checks (problem details, OperationOutcome)."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from esource.domain.model import Enrollment

DATA = Path(__file__).resolve().parents[1] / "data"
CY_FILE = DATA / "ips" / "CY_249867.json"  # IPS document Bundle of the patient enrolled as 001-0001 (SITE.001)
ARLA_FILE = DATA / "synthea" / "Arla_Lang_0c89b627-646b-40ff-a620-c8509a10912c.json"  # 002-0001 (SITE.002)

SECRET = "bootstrap-" + "s" * 40
PSEUDONYM_KEY = "p" * 32
FHIR = {"Content-Type": "application/fhir+json"}
ISSUER = "https://idp.example/realms/esource"
AUDIENCE = "esource-api"
KID = "test-key-1"
MRN = "http://hospital.example/mrn"

CY_ID = ("urn:oid:2.16.840.1.113883.3.9143.2.1.5", "CY/GHS-MI-1111")
ARLA_ID = ("http://hospital.smarthealthit.org", "0c89b627-646b-40ff-a620-c8509a10912c")
ENROLLMENTS = [
    Enrollment("CV01", "001-0001", "SITE.001", (CY_ID,), dt.date(2020, 3, 10), dt.date(2020, 4, 6)),
    Enrollment("CV01", "002-0001", "SITE.002", (ARLA_ID,), dt.date(2019, 3, 1), dt.date(2019, 3, 26)),
]
SITE_A, SITE_B = "SITE.001", "SITE.002"

# username -> (roles, sites, studies): one account per role, two CRAs on different sites, and an EDC
# account bound to another study
USERS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "cra_a": (["cra"], [SITE_A], []),
    "cra_b": (["cra"], [SITE_B], []),
    "dm": (["data_manager"], [], []),
    "admin": (["admin"], [], []),
    "edc": (["edc"], [], ["CV01"]),
    "edc_other": (["edc"], [], ["CV02"]),
    "ehr": (["system"], [], []),
}


# ---------------------------------------------------------------- keys and JWTs


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def write_jwks(path: Path, key: rsa.RSAPrivateKey, kid: str = KID) -> Path:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
    path.write_text(json.dumps({"keys": [jwk]}), encoding="utf-8")
    return path


def make_jwt(key: Any, *, now: dt.datetime, roles: list[str] | None = None, sites: list[str] | None = None,
             studies: list[str] | None = None, issuer: str = ISSUER, audience: str = AUDIENCE,
             lifetime: dt.timedelta = dt.timedelta(minutes=10), kid: str | None = KID, alg: str = "RS256",
             username: str = "jwt-user", drop: tuple[str, ...] = (), **extra: Any) -> str:
    claims: dict[str, Any] = {"iss": issuer, "aud": audience, "sub": str(uuid.uuid4()), "preferred_username": username,
                              "iat": int(now.timestamp()), "exp": int((now + lifetime).timestamp()),
                              "roles": roles if roles is not None else ["data_manager"], **extra}
    if sites is not None:
        claims["sites"] = sites
    if studies is not None:
        claims["studies"] = studies
    for name in drop:
        claims.pop(name, None)
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


def unsigned_jwt(**claims: Any) -> str:
    """An `alg: none` token (no signature), as an attacker would send it."""
    import base64

    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none', 'typ': 'JWT', 'kid': KID})}.{part(claims)}."


# ---------------------------------------------------------------- the world of one test


@dataclass
class World:
    """A built app with data at two sites, one user + token per role."""

    container: Any
    client: Any
    clock: Any
    key: rsa.RSAPrivateKey
    tokens: dict[str, str] = field(default_factory=dict)

    def auth(self, who: str | None) -> dict[str, str]:
        if who is None:
            return {}
        if who == "bootstrap":
            return {"Authorization": f"Bearer {SECRET}"}
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    def get(self, path: str, who: str | None, **kw: Any) -> Any:
        return self.client.get(path, headers={**self.auth(who), **kw.pop("headers", {})}, **kw)

    def authenticator(self) -> Any:
        from esource.api.auth import get_authenticator

        return get_authenticator(self.container)

    def jwt(self, **kw: Any) -> str:
        """A JWT of the configured issuer, dated by the real clock (PyJWT checks exp against it)."""
        return make_jwt(self.key, now=dt.datetime.now(dt.timezone.utc), **kw)


def create_users(auth: Any) -> dict[str, str]:
    """The accounts of USERS, each with a fresh token (returned by username)."""
    tokens = {}
    for name, (roles, sites, studies) in USERS.items():
        auth.create_user(name, roles, sites=sites, studies=studies, password=f"{name}-password-123")
        tokens[name] = auth.issue_token(name, ttl_days=30).token
    return tokens


def transfers(world: World, who: str = "dm", **params: Any) -> dict[str, Any]:
    r = world.get("/studies/CV01/transfers", who, params={"limit": 500, **params})
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------- answers


def assert_problem(r: Any, status: int, contains: str | None = None) -> dict[str, Any]:
    """`r` is an RFC 9457 problem document with this status."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body = r.json()
    assert {"type", "title", "status", "detail", "instance"} <= set(body), body
    assert body["status"] == status and isinstance(body["title"], str) and body["title"]
    assert body["type"] == "about:blank"
    assert body["instance"] == r.request.url.path
    if contains:
        assert contains in body["detail"], body
    assert "Traceback" not in r.text
    return body


def assert_outcome(r: Any, status: int, code: str | None = None) -> dict[str, Any]:
    """`r` is a FHIR OperationOutcome with this status."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/fhir+json"), r.headers
    body = r.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"], body
    if code:
        assert any(i["code"] == code for i in body["issue"]), body
    return body
