"""OIDC JWTs: validated with PyJWT against the configured keys (a JWKS file or PEM keys), issuer,
audience, expiry and an algorithm allow-list; roles, sites and studies from configurable claims. Every
invalid token is a plain 401 (no hint which check failed beyond "not valid")."""

from __future__ import annotations

import datetime as dt

import jwt
import pytest
from api_helpers import AUDIENCE, ISSUER, KID, SITE_A, SITE_B, assert_problem, make_jwt, new_rsa_key, public_pem, \
    transfers, unsigned_jwt
from cryptography.hazmat.primitives import serialization

from esource.errors import StudyConfigError
from esource.settings import load_settings

NOW = dt.datetime.now(dt.timezone.utc)  # PyJWT checks exp/iat against the real clock


def me(world, token: str):
    return world.client.get("/me", headers={"Authorization": f"Bearer {token}"})


def test_a_valid_jwt_gives_its_roles_sites_and_name(world):
    r = me(world, world.jwt(roles=["cra"], sites=[SITE_B], username="claire"))
    assert r.status_code == 200, r.text
    assert r.json() == {"username": "claire", "roles": ["cra"], "effective_roles": ["cra"], "sites": [SITE_B],
                        "studies": None, "authenticated_by": "jwt"}
    token = world.jwt(roles=["cra"], sites=[SITE_B])
    rows = world.client.get("/studies/CV01/transfers", headers={"Authorization": f"Bearer {token}"}).json()["items"]
    assert rows and {t["site_oid"] for t in rows} == {SITE_B}
    dm = world.jwt(roles=["data_manager", "unknown-role"])
    assert me(world, dm).json()["roles"] == ["data_manager"]  # unknown roles are ignored
    edc = world.jwt(roles=["edc"], studies=["CV01"])
    assert world.client.get("/studies/CV01/odm/clinicaldata", headers={"Authorization": f"Bearer {edc}"}).status_code == 200


def _tokens(world) -> dict[str, str]:
    other = new_rsa_key()
    public = world.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "roles": ["admin"],
              "exp": int((NOW + dt.timedelta(minutes=5)).timestamp())}
    return {
        "wrong issuer": make_jwt(world.key, now=NOW, issuer="https://evil.example"),
        "wrong audience": make_jwt(world.key, now=NOW, audience="another-api"),
        "expired": make_jwt(world.key, now=NOW - dt.timedelta(hours=2), lifetime=dt.timedelta(minutes=5)),
        "no exp": make_jwt(world.key, now=NOW, drop=("exp",)),
        "no aud": make_jwt(world.key, now=NOW, drop=("aud",)),
        "alg none": unsigned_jwt(**claims),
        "alg none, no signature dot": unsigned_jwt(**claims).rstrip("."),
        "unknown kid": make_jwt(world.key, now=NOW, kid="other-key"),
        "signed by an unknown key": make_jwt(other, now=NOW),
        "signed by an unknown key, no kid": make_jwt(other, now=NOW, kid=None),
        "HS256 with the public key as secret (alg confusion)": _hs256(claims, public),
        "RS512 (not in the allow-list)": make_jwt(world.key, now=NOW, alg="RS512"),
        "no known role": make_jwt(world.key, now=NOW, roles=["superuser"]),
        "edc without a study": make_jwt(world.key, now=NOW, roles=["edc"]),
        "tampered payload": _tampered(make_jwt(world.key, now=NOW, roles=["cra"], sites=[SITE_A])),
        "not a JWT": "a.b.c",
    }


def _hs256(claims: dict, secret: bytes) -> str:
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": KID}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def _tampered(token: str) -> str:
    import base64
    import json

    head, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["roles"] = ["admin"]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"{head}.{forged}.{sig}"


def test_invalid_jwts_are_401(world):
    for name, token in _tokens(world).items():
        r = me(world, token)
        assert r.status_code == 401, f"{name}: {r.status_code} {r.text}"
        assert_problem(r, 401)
        assert 'error="invalid_token"' in r.headers["WWW-Authenticate"], name
        assert token not in r.text


def test_jwts_are_refused_when_oidc_is_not_configured(make_world):
    w = make_world(data=False, users=False, auth={})
    assert me(w, w.jwt(roles=["admin"])).status_code == 401


def test_pem_keys_and_dotted_claim_paths(make_world, tmp_path):
    pem = tmp_path / "idp.pem"
    w0 = make_world(data=False, users=False)
    pem.write_text(public_pem(w0.key))
    w = make_world(data=False, users=False, auth={
        "oidc_issuer": ISSUER, "oidc_audience": AUDIENCE, "oidc_public_keys": [str(pem)],
        "oidc_role_claim": "realm_access.roles", "oidc_site_claim": "esource.sites", "oidc_username_claim": "email"})
    token = make_jwt(w.key, now=NOW, kid=None, roles=[], realm_access={"roles": ["cra"]},
                     esource={"sites": [SITE_A]}, email="cra@site-a.example")
    r = me(w, token)
    assert r.status_code == 200, r.text
    assert r.json()["username"] == "cra@site-a.example" and r.json()["sites"] == [SITE_A]
    # the top-level "roles" claim is not the configured one any more
    assert me(w, make_jwt(w.key, now=NOW, kid=None, roles=["admin"])).status_code == 401


@pytest.mark.parametrize("auth, message", [
    ({"oidc_issuer": ISSUER, "oidc_audience": AUDIENCE, "oidc_public_keys": ["x"], "oidc_algorithms": ["none"]},
     "never none"),
    ({"oidc_issuer": ISSUER, "oidc_audience": AUDIENCE, "oidc_public_keys": ["x"], "oidc_algorithms": ["HS256"]},
     "asymmetric"),
    ({"oidc_issuer": ISSUER, "oidc_public_keys": ["x"]}, "oidc_audience"),
    ({"oidc_issuer": ISSUER, "oidc_audience": AUDIENCE}, "needs keys"),
])
def test_unsafe_oidc_settings_are_refused_at_start(auth, message):
    with pytest.raises(StudyConfigError, match=message):
        load_settings(mode="demo", auth=auth)


def test_a_jwt_cra_without_sites_sees_nothing_not_everything(world):
    token = world.jwt(roles=["cra"])  # no sites claim
    assert me(world, token).json()["sites"] == []
    r = world.client.get("/studies/CV01/transfers", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.json()["total"] == 0
    assert transfers(world, "dm")["total"] > 0


def test_pyjwt_is_what_verifies(world):
    # sanity: the token the tests build is a real RS256 JWT of the configured issuer and audience
    token = world.jwt(roles=["admin"])
    claims = jwt.decode(token, world.key.public_key(), algorithms=["RS256"], audience=AUDIENCE, issuer=ISSUER)
    assert claims["roles"] == ["admin"] and jwt.get_unverified_header(token)["kid"] == KID
