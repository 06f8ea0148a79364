"""End to end through the service's own wiring: `esource.bootstrap.build(settings)` with the EDC
connector chosen and given its credentials by environment variables only (the default endpoint for
Rave, a per-study entry for REDCap and OpenClinica), pointed at the vendor emulator on loopback; CV01
demo data ingested through the use case, the dispatcher drained, and what the EDC holds read back and
compared with what esource sent. Rave and REDCap use the store's persistent EDC key map: a second
`build` on the same database (a restart) maps the EDC's integer keys back to the same repeat keys.
A wrong password stops the endpoint without losing anything; a restart with the right one delivers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from esource.bootstrap import Container, build
from esource.connectors.emulators.openclinica_odm import StudyDesign, create_openclinica_app
from esource.connectors.emulators.rave_rws import create_rave_app
from esource.connectors.emulators.redcap_api import DEFAULT_TOKEN, create_redcap_app
from esource.connectors.redcap import RedcapMapping, RedcapNaming
from esource.domain.model import DiscrepancyKind
from esource.services.conflicts import edc_values, key_path
from esource.services.ingest import Envelope
from esource.services.process import content_key
from esource.services.server import ThreadedServer, free_port
from esource.settings import load_settings
from esource.store.edc_key_map import SqlEdcKeyMap
from esource.study.study import load_study

CONFIG = Path(__file__).resolve().parents[2] / "config"
STUDY = "CV01"
ARLA = "002-0001"  # Arla Lang (config/demo_enrollment.yaml): vitals, labs, history, medication
FEED = [CONFIG / "demo_data" / "Arla_Lang_0c89b627-646b-40ff-a620-c8509a10912c.json",
        CONFIG / "demo_data" / "CY_249867.json",  # 001-0001
        CONFIG / "demo_data" / "updates" / "01_arla_week4_vitals.json",
        CONFIG / "demo_data" / "updates" / "02_arla_baseline_weight_amended.json"]
RAVE_USER, RAVE_PASSWORD = "esource.rws", "Rws-e2e-Pa55word!"
OC_TOKEN = "oc-e2e-bearer-token-91f0"


@dataclass
class Emulated:
    name: str
    url: str
    env: dict[str, str]
    secrets: tuple[str, ...]
    holds: Any  # () -> number of values the EDC holds (its own test view)


@contextmanager
def rave() -> Iterator[Emulated]:
    app = create_rave_app(None, users={RAVE_USER: RAVE_PASSWORD}, studies={"CV01(PROD)": ["SITE.001", "SITE.002"]},
                          metadata={STUDY: load_study(STUDY).metadata})
    try:
        with ThreadedServer(app, "127.0.0.1", free_port(), log_level="critical", graceful_shutdown_s=1) as served:
            def holds() -> int:
                return len(httpx.get(f"{served.url}/_test/items", params={"study": "CV01(PROD)"}).json())

            # the default endpoint, with the flat names compose uses and a nested one
            yield Emulated("rave", served.url, {"ESOURCE_EDC_CONNECTOR": "rave", "ESOURCE_EDC_URL": served.url,
                                                "ESOURCE_EDC__USERNAME": RAVE_USER,
                                                "ESOURCE_EDC_PASSWORD": RAVE_PASSWORD},
                           (RAVE_PASSWORD,), holds)
    finally:
        app.state.rave.close()


@contextmanager
def redcap() -> Iterator[Emulated]:
    # the project was built with arm 2: the study's entry says so (ESOURCE_EDC__STUDIES__CV01__REDCAP__ARM)
    mapping = RedcapMapping.from_metadata(load_study(STUDY).metadata, naming=RedcapNaming(arm=2))
    app = create_redcap_app(None, tokens={DEFAULT_TOKEN: STUDY}, project_xml_metadata=mapping)
    try:
        with ThreadedServer(app, "127.0.0.1", free_port(), log_level="critical", graceful_shutdown_s=1) as served:
            def holds() -> int:
                items = app.state.redcap.items(None)
                return sum(1 for i in items if not i["field_name"].endswith("_complete"))

            prefix = "ESOURCE_EDC__STUDIES__CV01__"
            yield Emulated("redcap", served.url, {prefix + "CONNECTOR": "redcap", prefix + "URL": f"{served.url}/api/",
                                                  prefix + "TOKEN": DEFAULT_TOKEN, prefix + "REDCAP__ARM": "2",
                                                  "ESOURCE_EDC_URL": "http://127.0.0.1:9"},  # the unused default
                           (DEFAULT_TOKEN,), holds)
    finally:
        app.state.redcap.close()


@contextmanager
def openclinica() -> Iterator[Emulated]:
    app = create_openclinica_app(None, token=OC_TOKEN, metadata=StudyDesign.from_metadata(load_study(STUDY).metadata))
    try:
        with ThreadedServer(app, "127.0.0.1", free_port(), log_level="critical", graceful_shutdown_s=1) as served:
            def holds() -> int:
                app.state.openclinica.wait_idle(5)
                return len(app.state.openclinica.items(STUDY, None))

            prefix = "ESOURCE_EDC__STUDIES__CV01__"
            yield Emulated("openclinica", served.url, {prefix + "CONNECTOR": "openclinica",
                                                       prefix + "URL": f"{served.url}/OpenClinica",
                                                       prefix + "TOKEN": OC_TOKEN, prefix + "POLL_INITIAL_S": "0.01",
                                                       prefix + "POLL_MAX_S": "0.05", "ESOURCE_EDC_URL": "http://x"},
                           (OC_TOKEN,), holds)
    finally:
        app.state.openclinica.close()


EMULATORS = {"rave": rave, "redcap": redcap, "openclinica": openclinica}


@pytest.fixture
def environment(monkeypatch) -> Any:
    """A clean ESOURCE_* environment with the service's two secrets; `set(env)` adds the EDC's."""
    import os

    for key in list(os.environ):
        if key.startswith("ESOURCE_") and key != "ESOURCE_TEST_POSTGRES_DSN":
            monkeypatch.delenv(key)
    monkeypatch.setenv("ESOURCE_AUTH_SECRET", "e2e-auth-secret-0123456789abcdef-xyz")
    monkeypatch.setenv("ESOURCE_PSEUDONYM_KEY", "e2e-pseudonym-key-0123")

    def set_env(env: dict[str, str]) -> None:
        for k, v in env.items():
            monkeypatch.setenv(k, v)

    return set_env


def start(store_url: str, tmp_path: Path) -> Container:
    settings = load_settings(database_url=store_url, enrollment_file=CONFIG / "demo_enrollment.yaml",
                             edc={"timeout_s": 5, "max_attempts": 3, "auth_recheck_s": 600})
    return build(settings)


def feed(container: Container, files: list[Path]) -> None:
    for path in files:
        data = path.read_bytes()
        result = container.ingest.ingest_bytes(data, Envelope("file", f"file:{path.name}:{content_key(data)}",
                                                              path.name))
        assert result.accepted, result.error


def expected(container: Container, subject: str) -> dict[str, str]:
    with container.store.uow(read_only=True) as uow:
        return {key_path(k): s.value for k, s in uow.sent_items(STUDY, subject).items() if not s.frozen}


def outbox(container: Container) -> list[Any]:
    with container.store.uow(read_only=True) as uow:
        return uow.outbox_entries(statuses=None)


@pytest.mark.parametrize("edc_name", list(EMULATORS))
def test_build_from_the_environment_delivers_demo_data_to_the_emulator(edc_name, environment, store_url, tmp_path,
                                                                      caplog):
    with EMULATORS[edc_name]() as emulated:
        environment(emulated.env)
        container = start(store_url, tmp_path)
        try:
            connector = container.connectors[STUDY]
            assert connector.capabilities().name == edc_name
            feed(container, FEED)
            report = container.dispatcher.drain()
            rows = outbox(container)
            assert len(rows) >= 4 and {e.status for e in rows} <= {"sent", "acked"}, \
                [(e.subject_key, e.sequence, e.status, e.last_error) for e in rows]
            assert report.sent == len(rows) and report.rejected == 0 and report.auth_failed == 0
            assert any(e.previous_values for e in rows)  # the amended weight: an Update, read back first
            total = 0
            for subject in {e.subject_key for e in rows}:
                want = expected(container, subject)
                assert edc_values(connector.read_back(STUDY, subject), subject) == want, subject
                total += len(want)
            assert emulated.holds() == total
            assert container.dispatcher.endpoint_states()[0]["state"] == "closed"
            shown = caplog.text + repr(container.settings) + repr(connector)
            assert not any(secret in shown for secret in emulated.secrets)
        finally:
            container.close()

        if edc_name in ("rave", "redcap"):  # integer repeat keys: kept in the store, not in the connector
            with container.store.uow(read_only=True) as uow:  # Arla's baseline weight log line / instance
                assert uow.find_edc_key(edc_name, STUDY, ARLA, _scope(edc_name), "WEIGHT") is not None
            restarted = start(store_url, tmp_path)  # same database: the same keys come back
            try:
                assert isinstance(restarted.connectors[STUDY].key_map, SqlEdcKeyMap)
                snapshot = restarted.connectors[STUDY].read_back(STUDY, ARLA)
                assert edc_values(snapshot, ARLA) == expected(restarted, ARLA)
            finally:
                restarted.close()


def _scope(edc_name: str) -> str:
    return "IG.VS" if edc_name == "rave" else "SE.BASELINE/F.VS"


def test_a_wrong_password_stops_rave_and_a_restart_with_the_right_one_delivers(environment, store_url, tmp_path):
    with rave() as emulated:
        environment({**emulated.env, "ESOURCE_EDC_PASSWORD": "an-old-password"})
        container = start(store_url, tmp_path)
        try:
            feed(container, FEED[:2])
            report = container.dispatcher.drain()
            # chains already running when the first refusal came in may meet one too (at most one per worker)
            assert 1 <= report.auth_failed <= 2 and report.sent == 0 and report.rejected == 0
            assert {e.status for e in outbox(container)} == {"pending"}
            [state] = container.dispatcher.endpoint_states()
            assert state["state"] == "auth_failed" and "RWS00008" in state["reason"]
            assert "an-old-password" not in repr(state) and emulated.holds() == 0
            with container.store.uow(read_only=True) as uow:
                assert not [d for d in uow.open_discrepancies(STUDY) if d.kind is DiscrepancyKind.EDC_REJECTED]
        finally:
            container.close()
        environment(emulated.env)  # the operator fixes the password and restarts the service
        restarted = start(store_url, tmp_path)
        try:
            report = restarted.dispatcher.drain()
            rows = outbox(restarted)
            assert report.sent == len(rows) and {e.status for e in rows} <= {"sent", "acked"}
            assert edc_values(restarted.connectors[STUDY].read_back(STUDY, ARLA), ARLA) == expected(restarted, ARLA)
        finally:
            restarted.close()
