"""`esource ingest` (backfill) and `esource serve` + `esource sandbox-edc` as real processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

DATA = Path(__file__).resolve().parents[1] / "data"
ESOURCE = str(Path(sys.executable).parent / "esource")
CY = {"system": "urn:oid:2.16.840.1.113883.3.9143.2.1.5", "value": "CY/GHS-MI-1111"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer")


def config(tmp_path: Path, **extra) -> Path:
    (tmp_path / "enrollment.yaml").write_text(yaml.safe_dump({"study": "CV01", "subjects": [
        {"subject_key": "001-0001", "site_oid": "SITE.001", "identifiers": [CY], "consent": "2020-03-10",
         "day1": "2020-04-06"}]}))
    cfg = {"mode": "demo", "database_url": f"sqlite:///{tmp_path / 'esource.sqlite'}",
           "enrollment_file": str(tmp_path / "enrollment.yaml"),
           "edc": {"connector": "odm_file", "folder": str(tmp_path / "drop")}, "log": {"level": "WARNING"}, **extra}
    path = tmp_path / "esource.yaml"
    path.write_text(json.dumps(cfg))
    return path


def test_ingest_backfill_with_summary_and_dead_letters(tmp_path):
    feed = tmp_path / "feed"
    feed.mkdir()
    shutil.copy(DATA / "ips" / "CY_249867.json", feed)
    shutil.copy(DATA / "ips" / "HL7-IPS-IG-bundle-minimal.json", feed)  # not enrolled
    (feed / "broken.json").write_bytes(b'{"resourceType": ')
    env = {**os.environ, "ESOURCE_CONFIG": str(config(tmp_path))}
    r = subprocess.run([ESOURCE, "ingest", str(feed)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1, r.stderr  # one file went to the dead letters
    assert "dead letter" in r.stderr and "broken.json" in r.stderr and "not valid JSON" in r.stderr
    assert "files" in r.stdout and "transactions delivered" in r.stdout
    drops = list((tmp_path / "drop" / "CV01").glob("*.xml"))
    assert len(drops) == 1 and b'SubjectKey="001-0001"' in drops[0].read_bytes()
    # a second run of the same files creates no new transaction and only the same dead letter again
    r2 = subprocess.run([ESOURCE, "ingest", str(feed / "CY_249867.json")], capture_output=True, text=True,
                        env=env, timeout=120)
    assert r2.returncode == 0, r2.stderr
    assert len(list((tmp_path / "drop" / "CV01").glob("*.xml"))) == 1


def test_serve_delivers_to_the_sandbox_edc_process(tmp_path):
    edc_port, http_port = free_port(), free_port()
    edc = subprocess.Popen([ESOURCE, "sandbox-edc", "--port", str(edc_port), "--db", str(tmp_path / "edc.sqlite")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cfg = config(tmp_path, edc={"connector": "sandbox", "url": f"http://127.0.0.1:{edc_port}"},
                 http={"host": "127.0.0.1", "port": http_port})
    svc = subprocess.Popen([ESOURCE, "serve", "--config", str(cfg)], stdout=subprocess.DEVNULL,
                           stderr=open(tmp_path / "serve.log", "wb"))
    try:
        wait_http(f"http://127.0.0.1:{edc_port}/health")
        wait_http(f"http://127.0.0.1:{http_port}/health")
        assert httpx.get(f"http://127.0.0.1:{http_port}/ready").json()["status"] == "ready"
        r = httpx.post(f"http://127.0.0.1:{http_port}/fhir", content=(DATA / "ips" / "CY_249867.json").read_bytes(),
                       headers={"Content-Type": "application/fhir+json"}, timeout=60)
        assert r.status_code == 202
        deadline = time.monotonic() + 30
        items: list = []
        while time.monotonic() < deadline:
            items = httpx.get(f"http://127.0.0.1:{edc_port}/studies/CV01/items").json()
            if items:
                break
            time.sleep(0.2)
        values = {(i["event"], i["group_repeat"], i["item"]): i["value"] for i in items} \
            if isinstance(items, list) else {}
        assert values[("SE.BASELINE", "HR", "IT.VS.VSORRES")] == "78"
        assert values[("SE.WEEK4", "HR", "IT.VS.VSORRES")] == "74"
        # structured JSON logs, no patient data
        svc.terminate()
        svc.wait(20)
        log = (tmp_path / "serve.log").read_text()
        assert "CY/GHS-MI-1111" not in log and "249867" not in log
    finally:
        for p in (svc, edc):
            if p.poll() is None:
                p.kill()


def test_prune_intake_command(tmp_path, monkeypatch):
    """`esource prune-intake --older-than-days N` on the configured store: counts, and audits itself."""
    import datetime as dt

    from typer.testing import CliRunner

    from esource.cli import app
    from esource.store.sqlalchemy_uow import Store

    url = f"sqlite:///{tmp_path / 'p.sqlite'}"
    store = Store(url)
    with store.uow() as uow:
        uow.mark_intakes(["file:a", "file:b"])
        uow.commit()
    store.dispose()
    monkeypatch.setenv("ESOURCE_MODE", "demo")
    monkeypatch.setenv("ESOURCE_DATABASE_URL", url)
    kept = CliRunner().invoke(app, ["prune-intake", "--older-than-days", "1"])
    assert kept.exit_code == 0 and kept.output.startswith("0 intake key(s)")
    store = Store(url)
    with store.uow() as uow:  # age them: received three days ago
        from sqlalchemy import update

        from esource.store.schema import IntakeRow

        uow.session.execute(update(IntakeRow.__table__).values(
            received_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)))
        uow.commit()
    store.dispose()
    done = CliRunner().invoke(app, ["prune-intake", "--older-than-days", "2"])
    assert done.exit_code == 0 and done.output.startswith("2 intake key(s)")
    store = Store(url)
    with store.uow(read_only=True) as uow:
        assert uow.seen_intakes(["file:a", "file:b"]) == set()
        entries, _ = uow.audit_entries(actions=["config.changed"])
    store.dispose()
    assert entries and entries[-1].event.detail["pruned"] == 2
    assert CliRunner().invoke(app, ["prune-intake", "--older-than-days", "0"]).exit_code == 2
