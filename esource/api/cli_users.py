"""`esource users ...`: API users and tokens on the configured store (mounted by esource.cli).

Passwords only ever come from stdin (`--password-stdin`), never from an argument (shell history,
process list). A token is printed once, alone on stdout (scriptable); everything else goes to stderr."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from esource.errors import EsourceError

users_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="API users (roles cra, data_manager, admin, edc, system) and their bearer tokens.")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="settings YAML (else $ESOURCE_CONFIG)")]


def _fail(message: str, code: int = 2) -> None:
    sys.stderr.write(f"esource: {message}\n")
    raise typer.Exit(code)


class _Auth:
    """An Authenticator on the configured store, closed afterwards."""

    def __init__(self, config: Path | None) -> None:
        self.config = config

    def __enter__(self) -> Any:
        from esource.api.auth import Authenticator
        from esource.domain.ports import SystemClock
        from esource.settings import load_settings
        from esource.store.sqlalchemy_uow import Store

        settings = load_settings(self.config)
        if settings.database_url.startswith("sqlite:///"):
            Path(settings.database_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.store = Store(settings.database_url)
        return Authenticator(store=self.store, clock=SystemClock(), token_ttl_days=settings.auth.token_ttl_days)

    def __exit__(self, *exc: object) -> None:
        self.store.dispose()


def _run(config: Path | None, action: Any) -> Any:
    from esource.api.auth import AuthError

    try:
        with _Auth(config) as auth:
            return action(auth)
    except (AuthError, EsourceError) as exc:
        _fail(str(exc).replace("\n", " "))


def _read_password() -> str:
    line = sys.stdin.readline()
    password = line.rstrip("\r\n")
    if not password:
        _fail("no password on stdin")
    return password


@users_app.command("add")
def add_command(
    name: Annotated[str, typer.Argument(help="username")],
    role: Annotated[list[str], typer.Option("--role", help="cra, data_manager, admin, edc or system (repeatable)")],
    site: Annotated[Optional[list[str]], typer.Option("--site", help="assigned SiteOID (repeatable; required "
                                                                     "for a CRA)")] = None,
    study: Annotated[Optional[list[str]], typer.Option("--study", help="allowed study (repeatable; exactly one "
                                                                       "for edc; none: all studies)")] = None,
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="read a password (dashboard login) "
                                                                          "from the first line of stdin")] = False,
    replace: Annotated[bool, typer.Option("--replace", help="redefine an existing user (keeps its password "
                                                            "unless a new one is given, keeps its tokens)")] = False,
    config: ConfigOpt = None,
) -> None:
    """Create a user."""
    password = _read_password() if password_stdin else None
    user = _run(config, lambda a: a.create_user(name, role, sites=site or (), studies=study or (), password=password,
                                                 replace=replace))
    sys.stderr.write(f"user {user.username}: roles {', '.join(sorted(map(str, user.roles)))}"
                     f"{'; sites ' + ', '.join(sorted(user.sites)) if user.sites else ''}"
                     f"{'; studies ' + ', '.join(sorted(user.studies)) if user.studies else ''}"
                     f"{'; password set' if password else ''}\n")


@users_app.command("token")
def token_command(
    name: Annotated[str, typer.Argument(help="username")],
    ttl_days: Annotated[Optional[int], typer.Option("--ttl-days", help="lifetime in days (0: no expiry; default "
                                                                       "auth.token_ttl_days)")] = None,
    label: Annotated[Optional[str], typer.Option("--label", help="what the token is for")] = None,
    config: ConfigOpt = None,
) -> None:
    """Issue a bearer token and print it once (only its hash is stored)."""
    issued = _run(config, lambda a: a.issue_token(name, ttl_days=ttl_days, label=label))
    sys.stdout.write(issued.token + "\n")
    sys.stdout.flush()
    expiry = issued.expires_at.isoformat() if issued.expires_at else "never"
    sys.stderr.write(f"token {issued.token_id} for {name}, expires {expiry}: shown once, store it now\n")


@users_app.command("revoke")
def revoke_command(
    token_id: Annotated[Optional[str], typer.Argument(help="the token id (the part after esk_), or the token")] = None,
    user: Annotated[Optional[str], typer.Option("--user", help="revoke every token of this user")] = None,
    disable: Annotated[bool, typer.Option("--disable", help="with --user: also disable the user (no password "
                                                            "login, no JWT-less access)")] = False,
    config: ConfigOpt = None,
) -> None:
    """Revoke one token, or every token of a user (and optionally disable the user)."""
    if (token_id is None) == (user is None):
        _fail("give a token id, or --user NAME")
    if token_id is not None:
        tid = token_id.split("_")[1] if token_id.startswith("esk_") and token_id.count("_") >= 2 else token_id
        if not _run(config, lambda a: a.revoke_token(tid)):
            _fail(f"no live token {tid}", code=1)
        sys.stderr.write(f"token {tid} revoked\n")
        return
    assert user is not None

    def act(a: Any) -> int:
        n = a.revoke_user_tokens(user)
        if disable:
            a.set_active(user, False)
        elif not any(u.username == user for u in a.users()):
            from esource.api.auth import AuthError

            raise AuthError(f"no user {user}")
        return n

    n = _run(config, act)
    sys.stderr.write(f"{n} token(s) of {user} revoked{'; user disabled' if disable else ''}\n")


@users_app.command("list")
def list_command(
    tokens: Annotated[bool, typer.Option("--tokens", help="also list each token (id, expiry, revocation)")] = False,
    config: ConfigOpt = None,
) -> None:
    """List users (roles, sites, studies, active, password set, live tokens). Never shows a secret."""
    import datetime as dt

    from rich.console import Console
    from rich.table import Table

    def read(a: Any) -> tuple[list[Any], list[Any]]:
        return a.users(), a.tokens()

    users, all_tokens = _run(config, read)
    now = dt.datetime.now(dt.timezone.utc)

    def live(t: Any) -> bool:
        return t.revoked_at is None and (t.expires_at is None or t.expires_at > now)

    console = Console(width=140)
    table = Table(title="esource users")
    for col in ("user", "roles", "sites", "studies", "active", "password", "live tokens"):
        table.add_column(col)
    for u in users:
        table.add_row(u.username, ", ".join(sorted(map(str, u.roles))), ", ".join(sorted(u.sites or ())) or "all",
                      ", ".join(sorted(u.studies or ())) or "all", "yes" if u.active else "no",
                      "yes" if u.password_hash else "no",
                      str(sum(1 for t in all_tokens if t.username == u.username and live(t))))
    console.print(table)
    if tokens:
        tt = Table(title="tokens")
        for col in ("id", "user", "label", "created", "expires", "revoked"):
            tt.add_column(col)
        for t in all_tokens:
            tt.add_row(t.token_id, t.username, t.label or "", t.created_at.isoformat(timespec="seconds"),
                       t.expires_at.isoformat(timespec="seconds") if t.expires_at else "never",
                       t.revoked_at.isoformat(timespec="seconds") if t.revoked_at else "")
        console.print(tt)
