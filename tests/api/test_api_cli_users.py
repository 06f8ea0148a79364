"""`esource users add|token|revoke|list` on the configured store: the token printed once (alone on
stdout) works and is stored hashed; passwords only from stdin; bad input is one line on stderr, exit 2."""

from __future__ import annotations

import pytest
from api_helpers import PSEUDONYM_KEY, SECRET, SITE_A
from typer.testing import CliRunner

from esource.api.auth import Authenticator, Role
from esource.cli import app
from esource.store.sqlalchemy_uow import Store


@pytest.fixture
def cli(store_url, tmp_path, monkeypatch, clock):
    for name, value in {"ESOURCE_DATABASE_URL": store_url, "ESOURCE_AUTH_SECRET": SECRET,
                        "ESOURCE_PSEUDONYM_KEY": PSEUDONYM_KEY, "ESOURCE_EDC__CONNECTOR": "odm_file",
                        "ESOURCE_EDC__FOLDER": str(tmp_path / "edc")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("ESOURCE_CONFIG", raising=False)
    store = Store(store_url)
    runner = CliRunner()

    def run(*args: str, stdin: str | None = None):
        return runner.invoke(app, ["users", *args], input=stdin)

    run.auth = Authenticator(store=store, clock=clock)  # type: ignore[attr-defined]
    yield run
    store.dispose()


def test_add_token_list_revoke(cli):
    r = cli("add", "alice", "--role", "cra", "--site", SITE_A, "--password-stdin", stdin="a long passphrase\n")
    assert r.exit_code == 0, r.output
    r = cli("token", "alice", "--ttl-days", "5", "--label", "laptop")
    assert r.exit_code == 0, r.output
    token = r.stdout.strip()
    assert token.startswith("esk_") and "\n" not in token
    assert "shown once" in r.stderr
    p = cli.auth.authenticate_bearer(token)
    assert p is not None and p.username == "alice" and p.roles == {Role.CRA} and p.sites == {SITE_A}
    assert cli.auth.authenticate_password("alice", "a long passphrase") is not None
    r = cli("list", "--tokens")
    assert r.exit_code == 0, r.output
    assert "alice" in r.stdout and "cra" in r.stdout and SITE_A in r.stdout and "laptop" in r.stdout
    assert token not in r.output and token.split("_", 2)[2] not in r.output
    tid = token.split("_")[1]
    assert cli("revoke", tid).exit_code == 0
    assert cli.auth.authenticate_bearer(token) is None
    assert cli("revoke", tid).exit_code == 1  # already revoked


def test_revoke_a_user_and_disable_it(cli):
    assert cli("add", "bob", "--role", "data_manager").exit_code == 0
    t1, t2 = cli("token", "bob").stdout.strip(), cli("token", "bob").stdout.strip()
    r = cli("revoke", "--user", "bob", "--disable")
    assert r.exit_code == 0 and "2 token(s)" in r.stderr
    assert cli.auth.authenticate_bearer(t1) is None and cli.auth.authenticate_bearer(t2) is None
    assert [u.active for u in cli.auth.users() if u.username == "bob"] == [False]
    assert cli("revoke", "full-token-accepted-too").exit_code == 1
    t3 = cli("token", "bob").stdout.strip()
    assert cli("revoke", t3).exit_code == 0  # the whole token names its id too


def test_edc_accounts_and_bad_input(cli):
    assert cli("add", "rave", "--role", "edc", "--study", "CV01").exit_code == 0
    for args, message in [(("add", "c", "--role", "cra"), "assigned site"),
                          (("add", "e", "--role", "edc"), "exactly one study"),
                          (("add", "w", "--role", "wizard"), "unknown role"),
                          (("add", "rave", "--role", "edc", "--study", "CV01"), "exists already"),
                          (("token", "nobody"), "no user"),
                          (("revoke",), "give a token id"),
                          (("revoke", "--user", "nobody"), "no user")]:
        r = cli(*args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.stderr and "Traceback" not in r.output, (args, r.stderr)
    r = cli("add", "p", "--role", "admin", "--password-stdin", stdin="short\n")
    assert r.exit_code == 2 and "at least 12" in r.stderr
    r = cli("add", "q", "--role", "admin", "--password-stdin", stdin="")
    assert r.exit_code == 2 and "no password" in r.stderr
