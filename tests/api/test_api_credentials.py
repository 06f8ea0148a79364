"""Credentials at rest and their life cycle: API tokens stored as SHA-256 only (found by their public
id, with expiry and revocation), passwords as salted scrypt (constant-time check, no user enumeration),
users' role rules, and a USER_CHANGED audit entry for every change — never a secret in it."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

import pytest
from api_helpers import SITE_A
from sqlalchemy import select

from esource.api.auth import (
    AuthError,
    Authenticator,
    Role,
    hash_password,
    hash_token,
    verify_password,
)
from esource.domain.audit import AuditAction
from esource.store.schema import ApiTokenRow, ApiUserRow


@pytest.fixture
def auth(store, clock):
    return Authenticator(store=store, clock=clock, token_ttl_days=90)


def _table_text(store) -> str:
    with store.uow(read_only=True) as uow:
        rows = [dict(r._mapping) for t in (ApiUserRow, ApiTokenRow) for r in uow.session.execute(select(t.__table__))]
    return json.dumps(rows, default=str)


def test_tokens_are_stored_as_their_sha256_only(store, auth):
    auth.create_user("dm1", ["data_manager"])
    issued = auth.issue_token("dm1", ttl_days=7, label="ci")
    assert issued.token.startswith(f"esk_{issued.token_id}_") and len(issued.token) == 4 + 16 + 1 + 43
    text = _table_text(store)
    secret_part = issued.token.removeprefix(f"esk_{issued.token_id}_")  # the secret may itself hold "_"
    assert issued.token not in text and secret_part not in text
    assert hash_token(issued.token) == hashlib.sha256(issued.token.encode()).hexdigest() in text
    [stored] = auth.tokens("dm1")
    assert stored.token_id == issued.token_id and stored.label == "ci"
    assert stored.expires_at == issued.expires_at == auth.clock.now() + dt.timedelta(days=7)
    p = auth.authenticate_bearer(issued.token)
    assert p is not None and p.username == "dm1" and p.roles == {Role.DATA_MANAGER} and p.via == "token"
    # two tokens never collide and each one is random
    assert auth.issue_token("dm1").token != auth.issue_token("dm1").token


def test_token_expiry_revocation_and_disabled_users(auth, clock):
    auth.create_user("cra1", ["cra"], sites=[SITE_A])
    short = auth.issue_token("cra1", ttl_days=1)
    forever = auth.issue_token("cra1", ttl_days=0)
    assert forever.expires_at is None
    clock.advance(hours=23)
    assert auth.authenticate_bearer(short.token) is not None
    clock.advance(hours=1)
    assert auth.authenticate_bearer(short.token) is None  # expires_at is exclusive
    assert auth.authenticate_bearer(forever.token) is not None
    assert auth.revoke_token(forever.token_id) is True
    assert auth.revoke_token(forever.token_id) is False  # already revoked
    assert auth.authenticate_bearer(forever.token) is None
    live = auth.issue_token("cra1")
    auth.set_active("cra1", False)
    assert auth.authenticate_bearer(live.token) is None
    auth.set_active("cra1", True)
    assert auth.authenticate_bearer(live.token) is not None
    assert auth.revoke_user_tokens("cra1") == 2  # every token not revoked yet, expired ones too
    assert auth.authenticate_bearer(live.token) is None


def test_passwords_are_salted_scrypt_and_checked_without_revealing_who_exists(store, auth):
    h1, h2 = hash_password("correct horse battery"), hash_password("correct horse battery")
    assert h1 != h2 and h1.startswith("scrypt$16384$8$1$")  # a fresh salt each time
    assert verify_password("correct horse battery", h1) and not verify_password("correct horse batterz", h1)
    assert not verify_password("x", "not-a-hash") and not verify_password("x", "bcrypt$1$2$3$4$5")
    auth.create_user("alice", ["data_manager"], password="correct horse battery")
    assert "correct horse battery" not in _table_text(store)
    p = auth.authenticate_password("alice", "correct horse battery")
    assert p is not None and p.username == "alice" and p.via == "password" and p.roles == {Role.DATA_MANAGER}
    assert auth.authenticate_password("alice", "wrong password!") is None
    assert auth.authenticate_password("nobody", "correct horse battery") is None
    auth.create_user("bob", ["admin"])  # no password: token-only account
    assert auth.authenticate_password("bob", "") is None
    auth.set_active("alice", False)
    assert auth.authenticate_password("alice", "correct horse battery") is None
    auth.set_active("alice", True)
    auth.set_password("alice", "another long passphrase")
    assert auth.authenticate_password("alice", "correct horse battery") is None
    assert auth.authenticate_password("alice", "another long passphrase") is not None
    with pytest.raises(AuthError, match="at least 12"):
        auth.set_password("alice", "short")


@pytest.mark.parametrize("name, roles, sites, studies, message", [
    ("cra9", ["cra"], [], [], "at least one assigned site"),
    ("edc9", ["edc"], [], [], "exactly one study"),
    ("edc9", ["edc"], [], ["CV01", "CV02"], "exactly one study"),
    ("edc9", ["edc", "admin"], [], ["CV01"], "edc role only"),
    ("x", ["wizard"], [], [], "unknown role"),
    ("y", [], [], [], "at least one role"),
    ("bootstrap", ["admin"], [], [], "reserved"),
    ("has space", ["admin"], [], [], "invalid"),
])
def test_invalid_users_are_refused(auth, name, roles, sites, studies, message):
    with pytest.raises(AuthError, match=message):
        auth.create_user(name, roles, sites=sites, studies=studies)


def test_users_are_created_once_unless_replaced(auth):
    auth.create_user("carol", ["cra"], sites=[SITE_A], password="a long password")
    with pytest.raises(AuthError, match="exists already"):
        auth.create_user("carol", ["data_manager"])
    auth.create_user("carol", ["data_manager"], replace=True)
    [carol] = [u for u in auth.users() if u.username == "carol"]
    assert carol.roles == {"data_manager"} and carol.sites is None
    assert auth.authenticate_password("carol", "a long password") is not None  # password kept
    with pytest.raises(AuthError, match="no user"):
        auth.issue_token("nobody")


def test_every_change_is_audited_without_a_secret(store, auth):
    auth.create_user("dave", ["cra"], sites=[SITE_A], password="dave's long password", actor="user:admin")
    issued = auth.issue_token("dave", ttl_days=3)
    auth.revoke_token(issued.token_id)
    auth.set_active("dave", False)
    with store.uow(read_only=True) as uow:
        entries, total = uow.audit_entries(actions=[AuditAction.USER_CHANGED])
    assert total == 4
    assert [e.event.reason for e in entries] == ["user created", "API token issued", "API token revoked",
                                                 "user disabled"]
    assert entries[0].event.actor == "user:admin" and entries[1].event.actor == "system"
    assert entries[0].event.detail["password"] == "set" and entries[1].event.detail["token_id"] == issued.token_id
    text = json.dumps([e.event.detail for e in entries]) + " ".join(str(e.event) for e in entries)
    assert issued.token not in text and issued.token.split("_", 2)[2] not in text
    assert "dave's long password" not in text and "scrypt$" not in text


def test_the_bootstrap_secret_is_admin_and_system(store, clock):
    a = Authenticator(store=store, clock=clock, bootstrap_secret="b" * 40)
    p = a.authenticate_bearer("b" * 40)
    assert p is not None and p.roles == {Role.ADMIN, Role.SYSTEM} and p.via == "bootstrap"
    assert a.authenticate_bearer("b" * 39) is None
    assert a.bootstrap_secret is None  # only its digest is kept


def test_esource_demo_prints_the_demo_accounts():
    from rich.console import Console

    from esource.api.auth import demo_credentials
    from esource.services.demo import DemoSummary, _print_summary

    creds = demo_credentials("CV01", SITE_A)
    console = Console(record=True, width=110)
    _print_summary(console, DemoSummary(credentials=creds, base_url="http://x"), __import__("pathlib").Path("w"), "CV01")
    text = console.export_text()
    for c in creds:
        assert c.username in text and c.password in text and f"Bearer {c.token}" in text
    assert {c.role for c in creds} == set(Role)
