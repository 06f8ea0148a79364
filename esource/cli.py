"""`esource` command line. Entry points only translate input into use cases and errors into answers:
a one-line message on stderr and exit code 2 for input that cannot be used, never a traceback."""

from __future__ import annotations

import datetime as dt
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from esource.errors import EsourceError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="esource: FHIR patient summaries to CDISC ODM eCRFs, with lineage and discrepancies.")


class OutputFormat(str, Enum):
    odm = "odm"
    lineage = "lineage"


def _fail(message: str, code: int = 2) -> None:
    sys.stderr.write(f"esource: {message}\n")
    raise typer.Exit(code)


def _date(value: str | None, name: str) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        _fail(f"{name} must be a date YYYY-MM-DD, got {value!r}")
    return None


@app.command("map")
def map_command(
    files: Annotated[list[Path], typer.Argument(help="FHIR JSON files (Bundles or single resources) of one patient")],
    study: Annotated[str, typer.Option("--study", help="study OID (a folder in cdisc_maps/)")],
    subject_key: Annotated[str, typer.Option("--subject-key", help="the study SubjectKey, e.g. 001-0007")],
    site: Annotated[str, typer.Option("--site", help="the SiteOID, e.g. SITE.001")],
    day1: Annotated[str, typer.Option("--day1", help="Day 1 (randomisation), YYYY-MM-DD")],
    consent: Annotated[Optional[str], typer.Option("--consent", help="consent date (default: Day 1 - 28 days)")] = None,
    withdrawn: Annotated[Optional[str], typer.Option("--withdrawn", help="withdrawal date")] = None,
    output_format: Annotated[OutputFormat, typer.Option("--format", help="odm (ODM 1.3.2 Snapshot) or lineage (JSON)")] = OutputFormat.odm,
) -> None:
    """Dry run for one patient: map FILE... and write ODM (or lineage JSON) to stdout. Keeps no state."""
    from esource.mapping.engine import MappingEngine
    from esource.privacy import Pseudonymizer
    from esource.services.dry_run import adhoc_enrollment, dry_run, lineage, snapshot_odm
    from esource.study.study import load_study

    d1 = _date(day1, "--day1")
    assert d1 is not None
    try:
        st = load_study(study)
        enrollment = adhoc_enrollment(st, subject_key, site, d1, _date(consent, "--consent"),
                                      _date(withdrawn, "--withdrawn"))
        engine = MappingEngine(st)
        run = dry_run(st, engine, enrollment, files)
        pseudonymizer = Pseudonymizer.from_env(allow_demo_key=True)
        if output_format is OutputFormat.lineage:
            sys.stdout.write(json.dumps(lineage(run, pseudonymizer), indent=2, ensure_ascii=False) + "\n")
        else:
            sys.stdout.buffer.write(snapshot_odm(st, run, pseudonymizer))
            sys.stdout.buffer.write(b"\n")
        sys.stdout.flush()
    except EsourceError as exc:
        _fail(str(exc).replace("\n", " "))


@app.command("demo")
def demo_command(
    workdir: Annotated[Path, typer.Option("--workdir", help="where the demo keeps its SQLite store and ODM files")] = Path("var/demo"),
    reset: Annotated[bool, typer.Option("--reset/--keep", help="start from an empty store")] = True,
    serve: Annotated[Optional[bool], typer.Option("--serve/--no-serve", help="keep serving after the summary "
                     "(default: when run in a terminal)")] = None,
    port: Annotated[int, typer.Option("--port", help="HTTP port of the demo service (0 = any free port)")] = 8080,
) -> None:
    """Run the main job on embedded defaults: the service (SQLite, HTTP and file intake, sandbox EDC),
    the demo enrollment and sample data fed in, the ODM delivered to the sandbox EDC and written to
    files, a summary, and the URLs to look at."""
    from esource.services.demo import run_demo

    if serve is None:
        serve = sys.stdin.isatty() and sys.stdout.isatty()
    try:
        run_demo(workdir, reset=reset, serve=serve, port=port)
    except EsourceError as exc:
        _fail(str(exc).replace("\n", " "))


@app.command("serve")
def serve_command(
    config: Annotated[Optional[Path], typer.Option("--config", help="settings YAML (else $ESOURCE_CONFIG)")] = None,
    host: Annotated[Optional[str], typer.Option("--host", help="HTTP host (overrides settings)")] = None,
    port: Annotated[Optional[int], typer.Option("--port", help="HTTP port (overrides settings)")] = None,
) -> None:
    """Run the service: FHIR HTTP intake, Kafka intake (when kafka.bootstrap is set) and the outbox
    dispatcher to the study's EDC connector."""
    from esource.services.server import serve

    try:
        serve(config, host=host, port=port)
    except EsourceError as exc:
        _fail(str(exc).replace("\n", " "))


@app.command("ingest")
def ingest_command(
    paths: Annotated[list[Path], typer.Argument(help="FHIR JSON files or folders (backfill)")],
    config: Annotated[Optional[Path], typer.Option("--config", help="settings YAML (else $ESOURCE_CONFIG)")] = None,
    dispatch: Annotated[bool, typer.Option("--dispatch/--no-dispatch", help="deliver the outbox afterwards")] = True,
) -> None:
    """Backfill: feed files through the same path as events, with a progress bar and a summary.
    Exit 0 when every file was processed, 1 when some went to the dead letters (listed)."""
    from esource.services.backfill import run_ingest

    try:
        code = run_ingest(paths, config, dispatch=dispatch)
    except EsourceError as exc:
        _fail(str(exc).replace("\n", " "))
        return
    raise typer.Exit(code)


@app.command("sandbox-edc")
def sandbox_edc_command(
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8090,
    db: Annotated[Optional[Path], typer.Option("--db", help="SQLite file (default: in memory)")] = None,
) -> None:
    """Run esource's sandbox EDC (an ODM receiver that stores ClinicalData and can be read back)."""
    from esource.connectors.sandbox_edc import run_sandbox

    run_sandbox(host, port, db)


@app.command("prune-intake")
def prune_intake_command(
    older_than_days: Annotated[int, typer.Option("--older-than-days", min=1,
                                                 help="forget intake keys received more than N days ago")],
    config: Annotated[Optional[Path], typer.Option("--config", help="settings YAML (else $ESOURCE_CONFIG)")] = None,
) -> None:
    """Retention of the de-duplication keys (topic/partition/offset, request ids, file hashes): choose N
    above the Kafka topic's retention and any sender's retry window. Audited."""
    from esource.domain.audit import AuditAction, AuditEvent
    from esource.settings import load_settings
    from esource.store.sqlalchemy_uow import Store

    try:
        settings = load_settings(config)
    except EsourceError as exc:
        _fail(str(exc).replace("\n", " "))
        return
    store = Store(settings.database_url)
    try:
        before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=older_than_days)
        with store.uow() as uow:
            n = uow.prune_intake(before)
            uow.audit(AuditEvent(AuditAction.CONFIG_CHANGED, reason=f"intake keys older than {older_than_days} "
                                 f"days forgotten (retention)", detail={"pruned": n, "before": before.isoformat()}))
            uow.commit()
    finally:
        store.dispose()
    typer.echo(f"{n} intake key(s) received before {before:%Y-%m-%d %H:%M} UTC forgotten")


from esource.api.cli_users import users_app  # noqa: E402  (esource users add|token|revoke|list)

app.add_typer(users_app, name="users")

from esource.audit.cli import audit_app  # noqa: E402  (esource audit verify|export)

app.add_typer(audit_app, name="audit")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
