"""Who may call what: roles, principals, credential checks and the FastAPI dependency that enforces them.

Roles (issue 5):
- `cra`: read transfers, lineage, audit, SDV report, for assigned sites only
- `data_manager`: cra rights on all sites of the study + resolve discrepancies, review policies
- `admin`: data_manager rights + enrollment, study configuration, users
- `edc`: service account for one study: may pull ODM ClinicalData of that study, nothing else
- `system`: the EHR integration (FHIR intake)

Inclusion: admin ⊃ data_manager ⊃ cra. `require(Role.CRA)` admits cra, data_manager and admin;
`require(Role.DATA_MANAGER)` admits data_manager and admin; `require(Role.ADMIN)` only admin. `edc` and
`system` imply nothing and are implied by nothing: list them explicitly.

    endpoint                                   cra        data_manager  admin  edc          system
    GET  /me                                   yes        yes           yes    yes          yes
    POST /fhir, /fhir/$process-message         -          -             yes    -            yes
    GET  /studies/{s}/subjects[/{key}]         own sites  yes           yes    -            -
    POST/PUT /studies/{s}/subjects...          -          -             yes    -            -
    GET  /studies/{s}/transfers[/{id}]         own sites  yes (+ ODM)   yes    -            -
    GET  /studies/{s}/odm/clinicaldata         -          yes           yes    its study    -
    audit, lineage, SDV report (read)          own sites  yes           yes    -            -
    discrepancy actions, review policies       -          yes           yes    -            -
    /health /ready /metrics                    public

Study scoping: a principal with `studies` set may only use paths whose `{study}` is among them (an
`edc` account always has exactly one). Site scoping: a principal with `sites` set (a CRA) sees only
rows of those sites; routes filter with `Principal.site_filter()` and refuse with `ensure_site(...)`.

Credentials, tried in this order for `Authorization: Bearer <x>`:
1. the bootstrap secret (`settings.auth_secret`) — principal `bootstrap` with roles admin + system; how
   a fresh installation creates its first users over the API and how the EHR integration of a
   single-secret deployment keeps working;
2. an API token `esk_<id>_<secret>`: looked up by its public `id`, checked against the stored
   SHA-256 of the whole token (constant-time), expiry and revocation. A plain, fast hash is right
   here: the token carries 256 random bits, so there is nothing to brute-force or look up in a
   dictionary (unlike a password), and a slow KDF would only make every request slow;
3. an OIDC JWT (three dot-separated parts): validated with PyJWT against the configured keys (a JWKS
   file or PEM keys), issuer, audience and an algorithm allow-list that never contains `none` (nor
   an HMAC algorithm: keys are public keys); roles, sites and studies come from configurable claims.
User passwords (the dashboard login) are hashed with scrypt and a random salt and compared in
constant time (`authenticate_password`). Tokens, passwords and JWTs never go into logs, errors or
the audit trail.

Interfaces for other modules:

    from esource.api.auth import Role, Principal, require
    @router.get("/studies/{study}/x")
    def x(study: str, who: Principal = Depends(require(Role.CRA))): ...

    auth = get_authenticator(container)           # cached per container
    auth.authenticate_password("alice", "pw")     # -> Principal | None
    auth.create_user(...); auth.issue_token("alice", ttl_days=30)  # -> the token, shown once

A middleware (e.g. the dashboard's session) may put an authenticated Principal in
`request.state.principal`; `require` then uses it instead of the Authorization header.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from esource.domain.audit import SYSTEM_ACTOR, AuditAction, AuditEvent, user_actor
from esource.domain.users import ApiToken, User

if TYPE_CHECKING:
    from esource.settings import AuthSettings, Settings

__all__ = [
    "AuthError",
    "Authenticator",
    "BEARER",
    "BOOTSTRAP_USERNAME",
    "DemoCredential",
    "IssuedToken",
    "MIN_PASSWORD_LENGTH",
    "Principal",
    "Role",
    "TOKEN_PREFIX",
    "authenticate_request",
    "demo_credentials",
    "ensure_site",
    "get_authenticator",
    "hash_password",
    "hash_token",
    "implied_roles",
    "require",
    "seed_demo_users",
    "verify_password",
]

BOOTSTRAP_USERNAME = "bootstrap"
TOKEN_PREFIX = "esk"
_TOKEN_RE = re.compile(rf"{TOKEN_PREFIX}_([0-9a-f]{{16}})_([A-Za-z0-9_-]{{43}})")
_USERNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,99}")
_CHALLENGE = 'Bearer realm="esource"'


class Role(StrEnum):
    CRA = "cra"
    DATA_MANAGER = "data_manager"
    ADMIN = "admin"
    EDC = "edc"
    SYSTEM = "system"


_IMPLIES: dict[Role, frozenset[Role]] = {
    Role.ADMIN: frozenset({Role.ADMIN, Role.DATA_MANAGER, Role.CRA}),
    Role.DATA_MANAGER: frozenset({Role.DATA_MANAGER, Role.CRA}),
    Role.CRA: frozenset({Role.CRA}),
    Role.EDC: frozenset({Role.EDC}),
    Role.SYSTEM: frozenset({Role.SYSTEM}),
}


def implied_roles(roles: Iterable[Role]) -> frozenset[Role]:
    """The roles held plus every role they include (admin ⊃ data_manager ⊃ cra)."""
    out: set[Role] = set()
    for r in roles:
        out |= _IMPLIES[Role(r)]
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. `sites`/`studies` None means no restriction. `via` says how it
    authenticated (bootstrap, token, jwt, password, demo) — for /me and the logs, never the credential."""

    username: str
    roles: frozenset[Role]
    sites: frozenset[str] | None = None
    studies: frozenset[str] | None = None
    via: str = "token"

    @property
    def actor(self) -> str:
        return user_actor(self.username)

    @property
    def effective_roles(self) -> frozenset[Role]:
        return implied_roles(self.roles)

    def has(self, *roles: Role) -> bool:
        """True when the principal holds one of `roles`, directly or by inclusion."""
        return bool(self.effective_roles & set(roles))

    def can_see_site(self, site_oid: str | None) -> bool:
        return self.sites is None or (site_oid is not None and site_oid in self.sites)

    def can_see_study(self, study_oid: str) -> bool:
        return self.studies is None or study_oid in self.studies

    def site_filter(self) -> frozenset[str] | None:
        """The sites a query must be restricted to (None: all). A CRA without sites sees nothing."""
        return self.sites


class AuthError(ValueError):
    """A user/token operation that cannot be done (unknown user, bad role combination ...)."""


#: The OpenAPI security scheme of every route using `require` (the header is read by `authenticate_request`).
BEARER = HTTPBearer(auto_error=False, scheme_name="bearer",
                    description="An API token (`esk_...`, from `esource users token`), an OIDC access token (JWT) "
                                "of the configured issuer, or the bootstrap secret (ESOURCE_AUTH_SECRET).")


def _unauthorized(detail: str, *, invalid: bool) -> HTTPException:
    challenge = _CHALLENGE + (', error="invalid_token"' if invalid else "")
    return HTTPException(401, detail, headers={"WWW-Authenticate": challenge})


def ensure_site(principal: Principal, site_oid: str | None) -> None:
    """403 unless the principal may see rows of `site_oid` (CRAs: their assigned sites)."""
    if not principal.can_see_site(site_oid):
        raise HTTPException(403, f"{principal.username} is not assigned to site {site_oid}")


def require(*roles: Role, study_param: str = "study") -> Callable[[Request], Principal]:
    """A FastAPI dependency admitting callers holding one of `roles` (by inclusion, see the module
    docstring) and, when the path has a `{study_param}` parameter, allowed on that study. Returns the
    Principal. 401 (with WWW-Authenticate: Bearer) without valid credentials, 403 otherwise.

        who: Principal = Depends(require(Role.CRA))
    """
    if not roles:
        raise ValueError("require() needs at least one role")
    wanted = frozenset(Role(r) for r in roles)

    def dependency(request: Request, _credentials: HTTPAuthorizationCredentials | None = Depends(BEARER)) -> Principal:
        principal = authenticate_request(request)
        if not (principal.effective_roles & wanted):
            raise HTTPException(403, f"{principal.username} lacks the role for this endpoint "
                                     f"(needs one of: {', '.join(sorted(wanted))})")
        study = request.path_params.get(study_param)
        if study is not None and not principal.can_see_study(study):
            raise HTTPException(403, f"{principal.username} is not allowed on study {study}")
        return principal

    dependency.__name__ = f"require_{'_'.join(sorted(wanted))}"
    return dependency


def authenticate_request(request: Request) -> Principal:
    """The caller of `request` (cached on request.state), or 401."""
    cached = getattr(request.state, "principal", None)
    if isinstance(cached, Principal):
        return cached
    auth = _authenticator_of(request)
    header = request.headers.get("authorization")
    if auth.open_access and not header:  # demo mode without credentials: the demo admin, as before roles
        principal = auth.demo_principal()
        request.state.principal = principal
        return principal
    if not header:
        raise _unauthorized("authentication required: send Authorization: Bearer <token>", invalid=False)
    scheme, _, credential = header.partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        raise _unauthorized("the Authorization header must be: Bearer <token>", invalid=True)
    principal = auth.authenticate_bearer(credential)
    if principal is None:
        raise _unauthorized("the bearer token is not valid (unknown, expired or revoked)", invalid=True)
    request.state.principal = principal
    return principal


def _authenticator_of(request: Request) -> Authenticator:
    found = getattr(request.app.state, "authenticator", None)
    if found is None:
        container = getattr(request.app.state, "container", None)
        if container is None:
            raise RuntimeError("no authenticator: build the app with create_app(container)")
        found = get_authenticator(container)
        request.app.state.authenticator = found
    return found


# ----------------------------------------------------------------------------------------- hashing


_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1  # ~16 MiB, tens of ms: costly for a guesser, fine for a login
_SCRYPT_DKLEN = 32


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """`scrypt$N$r$p$salt$hash` (URL-safe base64): a memory-hard KDF with a per-user random salt, so
    a leaked table cannot be attacked with precomputed tables or cheaply on GPUs."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P,
                            dklen=_SCRYPT_DKLEN, maxmem=64 * 1024 * 1024)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


_DUMMY_HASH = hash_password("not a password", salt=b"\0" * 16)


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of `password` against a `hash_password` string (False if malformed)."""
    try:
        scheme, n, r, p, salt, expected = stored.split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(password.encode("utf-8"), salt=_unb64(salt), n=int(n), r=int(r), p=int(p),
                                dklen=len(_unb64(expected)), maxmem=64 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, _unb64(expected))


def hash_token(token: str) -> str:
    """SHA-256 (hex) of a whole API token, as stored. See the module docstring for why not a KDF."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A new API token: `token` is shown once and never stored (only its hash)."""

    token: str
    token_id: str
    username: str
    expires_at: dt.datetime | None


# ----------------------------------------------------------------------------------------- OIDC


@dataclass
class _JwtVerifier:
    """PyJWT against fixed keys (by `kid` when the JWKS has several)."""

    issuer: str
    audience: str
    algorithms: tuple[str, ...]
    keys: dict[str | None, Any]  # JWKS kid (None: a JWK without one) or "pem-<i>" -> public key object
    role_claim: str
    site_claim: str
    study_claim: str
    username_claim: str
    leeway_s: int = 30

    def verify(self, token: str) -> Principal | None:
        import jwt

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:  # never 'none', never an unlisted alg
            return None
        kid = header.get("kid")
        claims = None
        for key in self._candidates(kid if isinstance(kid, str) else None):
            try:
                claims = jwt.decode(token, key=key, algorithms=list(self.algorithms), audience=self.audience,
                                    issuer=self.issuer, leeway=self.leeway_s,
                                    options={"require": ["exp", "iss", "aud", "sub"]})
                break
            except jwt.PyJWTError:
                continue
        if claims is None:
            return None
        roles = frozenset(Role(r) for r in _claim_list(claims, self.role_claim) if r in Role._value2member_map_)
        if not roles:
            return None
        username = claims.get(self.username_claim) or claims.get("sub")
        if not isinstance(username, str) or not username:
            return None
        sites = _claim_list(claims, self.site_claim)
        studies = _claim_list(claims, self.study_claim)
        # a sites claim restricts any role; a CRA-only token without one sees no site (not every site)
        cra_only = not (roles & {Role.DATA_MANAGER, Role.ADMIN, Role.EDC, Role.SYSTEM})
        principal = Principal(username=username, roles=roles,
                              sites=frozenset(sites) if sites or cra_only else None,
                              studies=frozenset(studies) if studies else None, via="jwt")
        return principal if _scopes_consistent(principal) else None

    def _candidates(self, kid: str | None) -> list[Any]:
        """The key a `kid` names (JWKS); else the keys without one (PEM), and a JWKS's only key when the
        token names none. An unknown `kid` never falls back to another JWKS key."""
        if kid is not None and kid in self.keys:
            return [self.keys[kid]]
        kidless = [k for name, k in self.keys.items() if name is None or name.startswith("pem-")]
        named = [k for name, k in self.keys.items() if not (name is None or name.startswith("pem-"))]
        return kidless + (named if kid is None and len(named) == 1 else [])


def _claim_list(claims: dict[str, Any], path: str) -> list[str]:
    """A claim by dotted path (`realm_access.roles`), as a list of strings (a string is split on spaces)."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return []
        value = value.get(part)
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _scopes_consistent(p: Principal) -> bool:
    """An edc account must be bound to exactly one study."""
    return not (Role.EDC in p.roles and (p.studies is None or len(p.studies) != 1))


_ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


def build_jwt_verifier(auth: AuthSettings) -> _JwtVerifier | None:
    """The OIDC verifier from settings, or None when OIDC is not configured."""
    if not auth.oidc_issuer:
        return None
    import jwt

    bad = [a for a in auth.oidc_algorithms if a not in _ASYMMETRIC]
    if bad:
        raise ValueError(f"auth.oidc_algorithms: {', '.join(bad)} not allowed (asymmetric algorithms only)")
    if not auth.oidc_audience:
        raise ValueError("auth.oidc_audience is required with auth.oidc_issuer")
    keys: dict[str | None, Any] = {}
    if auth.oidc_jwks_file is not None:
        data = json.loads(Path(auth.oidc_jwks_file).read_text(encoding="utf-8"))
        for jwk in data.get("keys", [data] if "kty" in data else []):
            if jwk.get("use", "sig") != "sig":
                continue
            keys[jwk.get("kid")] = jwt.PyJWK(jwk).key
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    for i, pem in enumerate(auth.oidc_public_keys):
        text = Path(pem).read_text(encoding="utf-8") if not pem.lstrip().startswith("-----") else pem
        keys[f"pem-{i}"] = load_pem_public_key(text.encode())
    if not keys:
        raise ValueError("auth.oidc_issuer is set but no key is configured (auth.oidc_jwks_file or "
                         "auth.oidc_public_keys)")
    return _JwtVerifier(issuer=auth.oidc_issuer, audience=auth.oidc_audience,
                        algorithms=tuple(auth.oidc_algorithms), keys=keys, role_claim=auth.oidc_role_claim,
                        site_claim=auth.oidc_site_claim, study_claim=auth.oidc_study_claim,
                        username_claim=auth.oidc_username_claim, leeway_s=auth.oidc_leeway_s)


# ----------------------------------------------------------------------------------------- the authenticator


@dataclass
class Authenticator:
    """Checks credentials against settings and the store; manages users and tokens (CLI, demo, tests).

    `store` is an esource Store (`.uow()`), `clock` the container's clock (token expiry)."""

    store: Any
    clock: Any
    bootstrap_secret: str | None = None
    jwt: _JwtVerifier | None = None
    token_ttl_days: int = 90
    open_access: bool = False  # demo mode: a request without Authorization acts as the demo admin
    _bootstrap_digest: bytes | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.bootstrap_secret is not None:
            self._bootstrap_digest = hashlib.sha256(self.bootstrap_secret.encode("utf-8")).digest()
            self.bootstrap_secret = None  # keep only the digest

    @classmethod
    def from_settings(cls, settings: Settings, store: Any, clock: Any) -> Authenticator:
        secret = settings.auth_secret.get_secret_value() if settings.auth_secret is not None else None
        return cls(store=store, clock=clock, bootstrap_secret=secret, jwt=build_jwt_verifier(settings.auth),
                   token_ttl_days=settings.auth.token_ttl_days, open_access=settings.mode == "demo")

    def _now(self) -> dt.datetime:
        now = self.clock.now()
        return now if now.tzinfo is not None else now.replace(tzinfo=dt.timezone.utc)

    # ------------------------------------------------------------------ credential checks

    def demo_principal(self) -> Principal:
        return Principal(username="demo", roles=frozenset({Role.ADMIN, Role.SYSTEM}), via="demo")

    def authenticate_bearer(self, credential: str) -> Principal | None:
        """The principal of a bearer credential (bootstrap secret, API token or OIDC JWT), or None."""
        if self._bootstrap_digest is not None and hmac.compare_digest(
                hashlib.sha256(credential.encode("utf-8", "surrogateescape")).digest(), self._bootstrap_digest):
            return Principal(username=BOOTSTRAP_USERNAME, roles=frozenset({Role.ADMIN, Role.SYSTEM}), via="bootstrap")
        if credential.startswith(TOKEN_PREFIX + "_"):
            return self.authenticate_token(credential)
        if credential.count(".") == 2 and self.jwt is not None:
            return self.jwt.verify(credential)
        return None

    def authenticate_token(self, token: str) -> Principal | None:
        m = _TOKEN_RE.fullmatch(token)
        if m is None:
            return None
        with self.store.uow(read_only=True) as uow:
            stored = uow.api_token(m.group(1))
            user = uow.user(stored.username) if stored is not None else None
        if stored is None or user is None:
            return None
        if not hmac.compare_digest(hash_token(token), stored.token_hash):
            return None
        if stored.revoked_at is not None or (stored.expires_at is not None and stored.expires_at <= self._now()):
            return None
        if not user.active:
            return None
        return _principal_of(user, via="token")

    def authenticate_password(self, username: str, password: str) -> Principal | None:
        """The principal of an active user whose password matches, else None. Takes the same time for an
        unknown user as for a wrong password (no user enumeration by timing)."""
        with self.store.uow(read_only=True) as uow:
            user = uow.user(username)
        stored = user.password_hash if user is not None and user.password_hash else _DUMMY_HASH
        ok = verify_password(password, stored)
        if not ok or user is None or not user.password_hash or not user.active:
            return None
        return _principal_of(user, via="password")

    # ------------------------------------------------------------------ management (CLI, demo, tests)

    # Every change below records a USER_CHANGED audit entry in the same transaction (`actor`: who did
    # it; the CLI and the demo act as "system"). Never a password, hash or token in it: the token id only.

    def create_user(self, username: str, roles: Sequence[Role | str], *, sites: Sequence[str] = (),
                    studies: Sequence[str] = (), password: str | None = None, active: bool = True,
                    replace: bool = False, actor: str = SYSTEM_ACTOR) -> User:
        """Create (or with `replace`, redefine) a user. Raises AuthError on an invalid combination."""
        user = _checked_user(username, roles, sites, studies)
        if password is not None:
            _check_password(password)
        now = self._now()
        with self.store.uow() as uow:
            existing = uow.user(username)
            if existing is not None and not replace:
                raise AuthError(f"user {username} exists already")
            user = User(username=user.username, roles=user.roles, sites=user.sites, studies=user.studies,
                        password_hash=hash_password(password) if password is not None
                        else (existing.password_hash if existing else None),
                        active=active, created_at=existing.created_at if existing else now, updated_at=now)
            uow.put_user(user)
            uow.audit(_user_event(actor, "user redefined" if existing else "user created", user,
                                  password_set=password is not None))
            uow.commit()
        return user

    def set_password(self, username: str, password: str, *, actor: str = SYSTEM_ACTOR) -> None:
        _check_password(password)
        with self.store.uow() as uow:
            user = uow.user(username)
            if user is None:
                raise AuthError(f"no user {username}")
            uow.put_user(_replace(user, password_hash=hash_password(password), updated_at=self._now()))
            uow.audit(_user_event(actor, "password changed", user, password_set=True))
            uow.commit()

    def set_active(self, username: str, active: bool, *, actor: str = SYSTEM_ACTOR) -> None:
        with self.store.uow() as uow:
            user = uow.user(username)
            if user is None:
                raise AuthError(f"no user {username}")
            user = _replace(user, active=active, updated_at=self._now())
            uow.put_user(user)
            uow.audit(_user_event(actor, "user enabled" if active else "user disabled", user))
            uow.commit()

    def issue_token(self, username: str, *, ttl_days: int | None = None, label: str | None = None,
                    token: str | None = None, actor: str = SYSTEM_ACTOR) -> IssuedToken:
        """A new API token for `username` (default TTL from settings; 0 = no expiry). The token is
        returned once; only its SHA-256 is stored. `token` fixes the value (demo only)."""
        ttl = self.token_ttl_days if ttl_days is None else ttl_days
        if ttl < 0:
            raise AuthError("ttl_days must be 0 (no expiry) or more")
        if token is None:
            token = f"{TOKEN_PREFIX}_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"
        m = _TOKEN_RE.fullmatch(token)
        if m is None:
            raise AuthError("malformed token")
        now = self._now()
        expires = now + dt.timedelta(days=ttl) if ttl else None
        with self.store.uow() as uow:
            if uow.user(username) is None:
                raise AuthError(f"no user {username}")
            uow.add_api_token(ApiToken(token_id=m.group(1), token_hash=hash_token(token), username=username,
                                       created_at=now, expires_at=expires, revoked_at=None, label=label))
            uow.audit(AuditEvent(AuditAction.USER_CHANGED, actor=actor, reason="API token issued",
                                 detail={"username": username, "token_id": m.group(1), "label": label,
                                         "expires_at": expires.isoformat() if expires else None}))
            uow.commit()
        return IssuedToken(token=token, token_id=m.group(1), username=username, expires_at=expires)

    def revoke_token(self, token_id: str, *, actor: str = SYSTEM_ACTOR) -> bool:
        """Revoke one token by its public id (`esk_<id>_...`). False when unknown or already revoked."""
        with self.store.uow() as uow:
            stored = uow.api_token(token_id)
            done = uow.revoke_api_token(token_id, self._now())
            if done and stored is not None:
                uow.audit(AuditEvent(AuditAction.USER_CHANGED, actor=actor, reason="API token revoked",
                                     detail={"username": stored.username, "token_id": token_id}))
            uow.commit()
        return done

    def revoke_user_tokens(self, username: str, *, actor: str = SYSTEM_ACTOR) -> int:
        with self.store.uow() as uow:
            n = uow.revoke_user_tokens(username, self._now())
            if n:
                uow.audit(AuditEvent(AuditAction.USER_CHANGED, actor=actor, reason="every API token revoked",
                                     detail={"username": username, "tokens": n}))
            uow.commit()
        return n

    def users(self) -> list[User]:
        with self.store.uow(read_only=True) as uow:
            return uow.users()

    def tokens(self, username: str | None = None) -> list[ApiToken]:
        with self.store.uow(read_only=True) as uow:
            return uow.api_tokens(username)


def _user_event(actor: str, reason: str, user: User, *, password_set: bool = False) -> AuditEvent:
    detail: dict[str, Any] = {"username": user.username, "roles": sorted(map(str, user.roles)),
                              "sites": sorted(user.sites) if user.sites is not None else None,
                              "studies": sorted(user.studies) if user.studies is not None else None,
                              "active": user.active}
    if password_set:
        detail["password"] = "set"  # that it changed, never the value or its hash
    return AuditEvent(AuditAction.USER_CHANGED, actor=actor, reason=reason, detail=detail)


def _replace(user: User, **changes: Any) -> User:
    import dataclasses

    return dataclasses.replace(user, **changes)


def _checked_user(username: str, roles: Sequence[Role | str], sites: Sequence[str], studies: Sequence[str]) -> User:
    if not _USERNAME_RE.fullmatch(username) or username in (BOOTSTRAP_USERNAME, "demo", "system"):
        raise AuthError(f"invalid or reserved username {username!r} (letters, digits, ._@+-; at most 100)")
    try:
        rs = frozenset(Role(r) for r in roles)
    except ValueError:
        raise AuthError(f"unknown role among {', '.join(map(str, roles))} "
                        f"(roles: {', '.join(r.value for r in Role)})") from None
    if not rs:
        raise AuthError("a user needs at least one role")
    if Role.EDC in rs and (len(set(studies)) != 1 or rs != {Role.EDC}):
        raise AuthError("an edc account has the edc role only and exactly one study (--study)")
    if Role.CRA in rs and not (rs & {Role.DATA_MANAGER, Role.ADMIN}) and not sites:
        raise AuthError("a CRA needs at least one assigned site (--site)")
    return User(username=username, roles=rs, sites=frozenset(sites) if sites else None,
                studies=frozenset(studies) if studies else None, password_hash=None, active=True,
                created_at=None, updated_at=None)


MIN_PASSWORD_LENGTH = 12


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AuthError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")


@dataclass(frozen=True, slots=True)
class DemoCredential:
    """A demo account: known password and token, printed by `esource demo` (demo mode only)."""

    username: str
    role: Role
    password: str
    token: str
    sites: tuple[str, ...] = ()
    studies: tuple[str, ...] = ()


def demo_credentials(study_oid: str, cra_site: str) -> list[DemoCredential]:
    """The demo accounts, one per role: fixed, public values — never valid outside demo mode, because
    `seed_demo_users` refuses to run there and no other code creates them."""
    def token(n: int, role: str) -> str:
        return f"{TOKEN_PREFIX}_{n:016x}_" + f"demo-{role}-token".replace("_", "-").ljust(43, "0")

    return [
        DemoCredential("demo-cra", Role.CRA, "demo-cra-password", token(0xDE01, "cra"), sites=(cra_site,)),
        DemoCredential("demo-dm", Role.DATA_MANAGER, "demo-dm-password", token(0xDE02, "data_manager")),
        DemoCredential("demo-admin", Role.ADMIN, "demo-admin-password", token(0xDE03, "admin")),
        DemoCredential("demo-edc", Role.EDC, "demo-edc-password", token(0xDE04, "edc"), studies=(study_oid,)),
        DemoCredential("demo-system", Role.SYSTEM, "demo-system-password", token(0xDE05, "system")),
    ]


def seed_demo_users(auth: Authenticator, study_oid: str, cra_site: str) -> list[DemoCredential]:
    """Create (or reset) the demo accounts with their known passwords and tokens. Demo mode only."""
    if not auth.open_access:
        raise AuthError("demo users exist in demo mode only")
    creds = demo_credentials(study_oid, cra_site)
    known = {t.token_id for t in auth.tokens()}
    for c in creds:
        auth.create_user(c.username, [c.role], sites=c.sites, studies=c.studies, password=c.password, replace=True)
        m = _TOKEN_RE.fullmatch(c.token)
        assert m is not None
        if m.group(1) not in known:
            auth.issue_token(c.username, ttl_days=0, label="demo", token=c.token)
    return creds


def _principal_of(user: User, *, via: str) -> Principal:
    roles = frozenset(Role(r) for r in user.roles if r in Role._value2member_map_)
    return Principal(username=user.username, roles=roles, sites=user.sites, studies=user.studies, via=via)


def get_authenticator(container: Any) -> Authenticator:
    """The container's Authenticator (built once from its settings, store and clock)."""
    found = container.extras.get("authenticator")
    if found is None:
        clock = getattr(container.store, "clock", None) or getattr(container.store, "_clock", None) or _utc_clock()
        found = Authenticator.from_settings(container.settings, container.store, clock)
        container.extras["authenticator"] = found
    return found


def _utc_clock() -> Any:
    from esource.domain.ports import SystemClock

    return SystemClock()
