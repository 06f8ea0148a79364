"""`esource audit verify` and `esource audit export` on a configured store (SQLite and PostgreSQL)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from audit_helpers import mapped, record, sql
from typer.testing import CliRunner

from esource.cli import app
from esource.odm.xsd import validate_odm


@pytest.fixture
def config(store, store_url: str, tmp_path: Path) -> Path:
    record(store, mapped("120", subject="001-0001"), mapped("77", subject="002-0001", site="SITE.002"))
    record(store, mapped("121", old="120", subject="001-0001"))
    path = tmp_path / "esource.yaml"
    path.write_text(json.dumps({"mode": "demo", "database_url": store_url, "log": {"level": "WARNING"}}))
    return path


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_verify_reports_an_intact_chain(config):
    r = run("audit", "verify", "--config", str(config))
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "chain intact: 3 entries"


def test_verify_names_the_first_broken_entry(config, store):
    sql(store, "UPDATE audit_log SET new_value = '999' WHERE id = 2")
    r = run("audit", "verify", "--config", str(config))
    assert r.exit_code == 1
    assert r.stdout.startswith("chain broken at entry 2 (altered)")


def test_verify_names_a_deleted_entry(config, store):
    sql(store, "DELETE FROM audit_log WHERE id = 1")
    r = run("audit", "verify", "--config", str(config))
    assert r.exit_code == 1
    assert "entry 1 (missing)" in r.stdout


def test_export_csv_to_a_file(config, tmp_path):
    out = tmp_path / "audit.csv"
    r = run("audit", "export", "--study", "CV01", "--subject", "001-0001", "--format", "csv", "-o", str(out),
            "--config", str(config))
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert [(r["id"], r["new_value"]) for r in rows] == [("1", "120"), ("3", "121")]
    assert "obs-1" not in out.read_text(encoding="utf-8")


def test_export_odm_to_stdout_is_valid_and_the_export_is_audited(config):
    r = run("audit", "export", "--study", "CV01", "--format", "odm", "--config", str(config))
    assert r.exit_code == 0, r.output
    odm = r.stdout_bytes
    assert validate_odm(odm) == []
    assert odm.count(b"<ItemData ") == 3
    again = run("audit", "verify", "--config", str(config))
    assert again.stdout.strip() == "chain intact: 4 entries"  # the export was recorded as a read


def test_a_missing_database_is_an_input_error(tmp_path):
    path = tmp_path / "esource.yaml"
    path.write_text(json.dumps({"mode": "demo", "database_url": f"sqlite:///{tmp_path / 'none.sqlite'}"}))
    r = run("audit", "verify", "--config", str(path))
    assert r.exit_code == 2
    assert "no database" in r.stderr


def test_export_needs_a_known_format(config):
    r = run("audit", "export", "--study", "CV01", "--format", "xlsx", "--config", str(config))
    assert r.exit_code == 2
