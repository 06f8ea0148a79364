"""SandboxConnector against the sandbox EDC over real HTTP on loopback: how every answer and every
injected fault maps onto the EdcConnector port, read-back, and credentials kept out of messages."""

from __future__ import annotations

import datetime as dt
import time

import httpx
import pytest

from delivery_helpers import STUDY, Feeder, SandboxServer, free_port, snapshot_state, expected_state
from esource.connectors.sandbox import SandboxConnector, parse_retry_after, transaction_key
from esource.connectors.sandbox_edc import create_sandbox_app
from esource.domain.model import SubjectTransaction
from esource.odm.xsd import validate_odm
from esource.services.dispatch import EdcAuthenticationError, TransientDeliveryError
from esource.store import Store

A, B = "001-0001", "001-0002"


class _Clock:
    def now(self) -> dt.datetime:
        return dt.datetime(2025, 3, 1, 9, 0, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def rows(tmp_path_factory, cv01):
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('odm') / 'esource.db'}", clock=_Clock())
    try:
        f = Feeder(cv01, store, _Clock(), [A, B])
        f.weight(A, 1)
        f.weight(B, 1)
        f.weight(A, 2)
        f.height(A)
        return {(e.subject_key, e.sequence): e for e in f.outbox()}
    finally:
        store.dispose()


def tx(row) -> SubjectTransaction:
    return SubjectTransaction(row.study_oid, "MDV.CV01.1", row.subject_key, row.site_oid, None, [], row.sequence)


@pytest.fixture
def connector(sandbox):
    c = SandboxConnector(sandbox.url, timeout=0.3)
    yield c
    c.close()


def send(connector, row):
    return connector.send(tx(row), row.odm)


def test_capabilities_and_key(connector, rows):
    caps = connector.capabilities()
    assert (caps.name, caps.read_back, caps.idempotency_key, caps.integer_repeat_keys) == ("sandbox", True, True, False)
    assert transaction_key(tx(rows[(A, 2)])) == f"{STUDY}/{A}/2"


def test_delivery_duplicate_and_read_back(connector, sandbox, rows):
    r1 = send(connector, rows[(A, 1)])
    assert r1.accepted and r1.reference == "SBX-1" and not r1.permanent and r1.code == "201"
    again = send(connector, rows[(A, 1)])
    assert again.accepted and again.reference == "SBX-1" and again.code == "duplicate"
    send(connector, rows[(A, 2)])
    odm = connector.read_back(STUDY, A)
    assert odm is not None and validate_odm(odm) == []
    assert snapshot_state(odm) == expected_state([rows[(A, 1)], rows[(A, 2)]])
    assert connector.read_back(STUDY, B) is None
    assert sandbox.transactions()[0]["duplicates_seen"] == 1


@pytest.mark.parametrize("mode, retry_after, ambiguous", [
    ("500", None, False), ("503", 2.0, False), ("429", 2.0, False), ("timeout", None, True), ("reset", None, True),
])
def test_transient_faults_raise_with_retry_after(connector, sandbox, rows, mode, retry_after, ambiguous):
    sandbox.faults(mode=mode, retry_after=2, delay=1.0)
    with pytest.raises(TransientDeliveryError) as info:
        send(connector, rows[(A, 1)])
    err = info.value
    assert err.retry_after == retry_after and err.ambiguous is ambiguous
    assert f"{STUDY}/{A}/1" in str(err)
    if mode == "timeout":
        assert "no answer within 0.3s" in str(err)  # the connector's timeout, not the EDC's late answer
    assert sandbox.items() == []  # nothing was applied
    assert send(connector, rows[(A, 1)]).reference == "SBX-1"


@pytest.mark.parametrize("mode", ["500", "503", "429", "timeout", "reset"])
def test_after_commit_faults_are_resolved_by_the_key(connector, sandbox, rows, mode):
    sandbox.faults(mode=mode, after_commit=True, retry_after=0, delay=0.6)
    with pytest.raises(TransientDeliveryError):
        send(connector, rows[(A, 1)])
    assert len(sandbox.items()) == 7  # applied although the answer was lost
    receipt = send(connector, rows[(A, 1)])
    assert receipt.accepted and receipt.code == "duplicate" and receipt.reference == "SBX-1"
    [t] = sandbox.transactions()
    assert t["duplicates_seen"] == 1


def test_slow_but_in_time_is_a_success(sandbox, rows):
    with SandboxConnector(sandbox.url, timeout=2) as c:
        sandbox.faults(mode="slow", delay=0.3)
        assert send(c, rows[(A, 1)]).accepted


@pytest.mark.parametrize("status", [422, 404, 400])
def test_permanent_answers_become_rejections_with_the_edc_message(connector, sandbox, rows, status):
    sandbox.faults(mode="reject", status=status)
    receipt = send(connector, rows[(A, 1)])
    assert not receipt.accepted and receipt.permanent and receipt.code == str(status)
    assert "transaction rejected by the EDC" in receipt.message


@pytest.mark.parametrize("status", [401, 403])
def test_401_and_403_are_authentication_failures_not_rejections(connector, sandbox, rows, status):
    sandbox.faults(mode="auth" if status == 401 else "reject", status=403, message="API key revoked")
    with pytest.raises(EdcAuthenticationError) as caught:
        send(connector, rows[(A, 1)])
    assert caught.value.status == status and f"HTTP {status}" in str(caught.value)
    assert sandbox.transactions() == []


def test_conflicts_are_permanent_but_out_of_order_is_transient(connector, sandbox, rows):
    with pytest.raises(TransientDeliveryError, match="out of order"):
        send(connector, rows[(A, 2)])
    send(connector, rows[(A, 1)])
    httpx.put(f"{sandbox.url}/studies/{STUDY}/subjects/{A}/items",
              json={"path": "SE.BASELINE/F.VS/IG.VS[HEIGHT]/IT.VS.VSORRES", "value": "171"}).raise_for_status()
    send(connector, rows[(A, 2)])
    receipt = send(connector, rows[(A, 3)])
    assert not receipt.accepted and receipt.permanent and receipt.code == "409"
    assert "Insert of subject 001-0001, SE.BASELINE/F.VS/IG.VS[HEIGHT]/IT.VS.VSORRES" in receipt.message
    bad = rows[(B, 1)].odm.replace(b'ItemOID="IT.DM.SEX" ', b"")
    receipt = connector.send(tx(rows[(B, 1)]), bad)
    assert receipt.permanent and receipt.code == "422" and "ItemOID" in receipt.message


def test_connection_errors_are_transient_and_credentials_never_show(rows):
    port = free_port()  # nothing listens there
    c = SandboxConnector(f"http://edc-user:pa55word@127.0.0.1:{port}", timeout=1, api_key="k3y-s3cret")
    with pytest.raises(TransientDeliveryError) as info:
        send(c, rows[(A, 1)])
    text = str(info.value)
    assert "ConnectError" in text and "pa55word" not in text and "k3y-s3cret" not in text and "edc-user" not in text
    assert "pa55word" not in repr(c)
    c.close()


def test_wrong_credentials_are_an_authentication_failure_without_the_key(rows):
    server = SandboxServer(create_sandbox_app(None, api_key="right-key")).start()
    try:
        with SandboxConnector(server.url, api_key="wrong-key") as c:
            with pytest.raises(EdcAuthenticationError) as caught:
                send(c, rows[(A, 1)])
            assert caught.value.status == 401 and "wrong-key" not in str(caught.value)
            with pytest.raises(EdcAuthenticationError) as caught:
                c.read_back(STUDY, A)
            assert "wrong-key" not in str(caught.value)
        with SandboxConnector(server.url, api_key="right-key") as c:
            assert send(c, rows[(A, 1)]).accepted
            assert c.read_back(STUDY, A) is not None
    finally:
        server.stop()
        server.app.state.sandbox.close()


def test_a_mounted_sandbox_works_under_a_path(rows):
    from fastapi import FastAPI

    outer = FastAPI()
    inner = create_sandbox_app(None)
    outer.mount("/edc", inner)
    server = SandboxServer(outer).start()
    try:
        with SandboxConnector(server.url + "/edc/", timeout=0.3) as c:
            assert send(c, rows[(A, 1)]).accepted
            httpx.post(server.url + "/edc/_faults", json={"mode": "reset"}).raise_for_status()
            with pytest.raises(TransientDeliveryError):
                send(c, rows[(A, 2)])
            assert send(c, rows[(A, 2)]).accepted
            assert c.read_back(STUDY, A) is not None
    finally:
        server.stop()
        inner.state.sandbox.close()


def test_retry_after_parsing():
    now = dt.datetime(2025, 3, 1, 9, 0, tzinfo=dt.timezone.utc)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after("Sat, 01 Mar 2025 09:01:00 GMT", now=now) == 60.0
    assert parse_retry_after("Sat, 01 Mar 2025 08:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None and parse_retry_after("nan") is None


def test_a_standalone_sandbox_process_keeps_its_state_across_a_kill(tmp_path, rows):
    """`python -m esource.connectors.sandbox_edc --db FILE` (what `esource sandbox-edc` runs): an
    acknowledged transaction survives the EDC being killed, and is recognised after the restart."""
    import subprocess
    import sys

    db = tmp_path / "edc.sqlite"
    port = free_port()

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "esource.connectors.sandbox_edc", "--port", str(port),
                                 "--db", str(db)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError("the sandbox process did not start")
            time.sleep(0.05)

    proc = start()
    try:
        with SandboxConnector(f"http://127.0.0.1:{port}", timeout=5) as c:
            first = send(c, rows[(A, 1)])
            assert first.accepted
            proc.kill()  # SIGKILL: no shutdown, no flush beyond what the commit made durable
            proc.wait(10)
            with pytest.raises(TransientDeliveryError):
                send(c, rows[(A, 2)])
            proc = start()
            again = send(c, rows[(A, 1)])
            assert again.code == "duplicate" and again.reference == first.reference
            assert send(c, rows[(A, 2)]).accepted
            assert snapshot_state(c.read_back(STUDY, A)) == expected_state([rows[(A, 1)], rows[(A, 2)]])
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
