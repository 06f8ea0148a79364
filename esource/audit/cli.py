"""`esource audit verify|export` (mounted by esource.cli): the chain's check and the exports, on the
configured store. Results go to stdout (or -o FILE); a problem with the input is one line on stderr
and exit 2; a broken chain is exit 1."""

from __future__ import annotations

import getpass
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from esource.errors import EsourceError

audit_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="The audit trail: check the hash chain, export it (CSV, ODM AuditRecords).")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="settings YAML (else $ESOURCE_CONFIG)")]


class ExportFormat(str, Enum):
    csv = "csv"
    odm = "odm"


def _fail(message: str, code: int = 2) -> None:
    sys.stderr.write(f"esource: {message}\n")
    raise typer.Exit(code)


def _open(config: Path | None) -> tuple[Any, Any]:
    """(settings, store) from the configuration, as the service opens them."""
    from esource.settings import load_settings
    from esource.store.sqlalchemy_uow import Store

    settings = load_settings(config)
    if settings.database_url.startswith("sqlite:///"):
        db = Path(settings.database_url.removeprefix("sqlite:///"))
        if not db.exists():
            raise EsourceError(f"no database at {db}: nothing to audit (check database_url)")
    return settings, Store(settings.database_url)


@audit_app.command("verify")
def verify_command(config: ConfigOpt = None) -> None:
    """Recompute the hash chain: exit 0 "chain intact: N entries", exit 1 naming the first broken entry."""
    from esource.audit.verify import verify_chain

    try:
        _, store = _open(config)
    except EsourceError as exc:
        _fail(str(exc).replace("\n", " "))
        return
    try:
        result = verify_chain(store)
    finally:
        store.dispose()
    if result.broken is None:
        sys.stdout.write(f"chain intact: {result.entries} entries\n")
        return
    b = result.broken
    sys.stdout.write(f"chain broken at entry {b.entry_id} ({b.kind}): {b.message}; "
                     f"{result.entries} entries verified before it\n")
    raise typer.Exit(1)


@audit_app.command("export")
def export_command(
    study: Annotated[str, typer.Option("--study", help="study OID")],
    subject: Annotated[str | None, typer.Option("--subject", help="one subject (SubjectKey)")] = None,
    output_format: Annotated[ExportFormat, typer.Option("--format", help="csv, or odm (ODM 1.3.2 AuditRecords)")] = ExportFormat.csv,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="file to write (default: stdout)")] = None,
    config: ConfigOpt = None,
) -> None:
    """Export the audit trail of a study or subject; sources are pseudonymised (the export leaves the
    hospital). The export is recorded in the trail (DATA_READ)."""
    from esource.audit.export import export_study
    from esource.domain.audit import user_actor
    from esource.privacy import DEMO_PSEUDONYM_KEY, Pseudonymizer

    try:
        settings, store = _open(config)
    except EsourceError as exc:
        _fail(str(exc).replace("\n", " "))
        return
    try:
        key = settings.pseudonym_key.get_secret_value().encode() if settings.pseudonym_key else DEMO_PSEUDONYM_KEY
        mdv = None
        if output_format is ExportFormat.odm:
            mdv = _metadata_version(settings, study)
        data = export_study(store, study, output_format.value, Pseudonymizer(key), metadata_version_oid=mdv,
                            subject_key=subject, actor=user_actor(f"cli:{getpass.getuser()}"), via="cli")
    except EsourceError as exc:
        _fail(str(exc).replace("\n", " "))
        return
    finally:
        store.dispose()
    if output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        output.write_bytes(data)
        sys.stderr.write(f"esource: wrote {output} ({len(data)} bytes)\n")


def _metadata_version(settings: Any, study: str) -> str:
    import os

    from esource.study.study import load_study

    if settings.maps_dir is not None:
        os.environ.setdefault("ESOURCE_MAPS_DIR", str(settings.maps_dir))
    return load_study(study).metadata_version_oid
