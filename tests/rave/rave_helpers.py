"""Shared helpers for the Rave tests: the RWS emulator served by uvicorn on loopback, and esource's own
ODM (SubjectTransactions written by `esource.odm.writer.write_clinical_data`)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import httpx

from esource.connectors.emulators.rave_rws import create_rave_app
from esource.domain.model import ItemChange, ItemKey, ItemValue, SourceRef, SubjectTransaction, TransactionType
from esource.odm.writer import write_clinical_data
from esource.privacy import Pseudonymizer
from esource.services.server import ThreadedServer, free_port

__all__ = ["RaveServer", "free_port", "change", "vs", "transaction", "odm_of", "STUDY", "MDV", "USER", "PASSWORD",
           "STUDIES", "CONNECTOR_TIMEOUT", "FAULT_DELAY"]

STUDY, MDV = "CV01", "MDV.CV01.1"
USER, PASSWORD = "rwsuser", "s3cret-Pa55word"
STUDIES = {"CV01(PROD)": ["SITE.001", "SITE.002"], "Mediflex(DEV)": ["MDSOL"]}
PSEUDONYMIZER = Pseudonymizer(b"rave-test-key-0123456789")
CONNECTOR_TIMEOUT = 0.4  # seconds; "timeout" faults answer later (FAULT_DELAY)
FAULT_DELAY = 0.8


class RaveServer:
    """The emulator served on a free loopback port (esource's ThreadedServer); `http` talks to its test
    endpoints."""

    def __init__(self, **options: Any) -> None:
        options.setdefault("users", {USER: PASSWORD})
        options.setdefault("studies", STUDIES)
        self.app = create_rave_app(options.pop("db_path", None), **options)
        self.server = ThreadedServer(self.app, "127.0.0.1", free_port(), log_level="critical", graceful_shutdown_s=1)
        self.http = httpx.Client(base_url=self.url, timeout=10)

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> RaveServer:
        self.server.start()
        return self

    def stop(self) -> None:
        self.http.close()
        self.server.stop()
        self.app.state.rave.close()

    # -- test endpoints -------------------------------------------------------------------------------

    def fault(self, mode: str, count: int = 1, **plan: Any) -> None:
        self.http.post("/_faults", json={"mode": mode, "count": count, **plan}).raise_for_status()

    def items(self, subject: str, study: str = "CV01(PROD)") -> list[dict]:
        r = self.http.get("/_test/items", params={"study": study, "subject": subject})
        r.raise_for_status()
        return r.json()

    def values(self, subject: str, study: str = "CV01(PROD)") -> dict[tuple, str]:
        """{(event, event_repeat, form, group, group_repeat, item): value} in Rave's (integer) keys."""
        return {(i["event"], i["event_repeat"], i["form"], i["group"], i["group_repeat"], i["item"]): i["value"]
                for i in self.items(subject, study)}

    def writes(self) -> int:
        return int(self.http.get("/_test/stats").json()["writes"])

    def posts(self) -> list[dict]:
        return self.http.get("/_test/posts").json()

    def site_edit(self, subject: str, event: str, form: str, group: str, item: str, value: str | None, *,
                  event_repeat: int | None = None, group_repeat: int | None = None,
                  study: str = "CV01(PROD)") -> dict:
        r = self.http.post("/_test/site_edit", json={
            "study": study, "subject": subject, "event": event, "event_repeat": event_repeat, "form": form,
            "group": group, "group_repeat": group_repeat, "item": item, "value": value})
        r.raise_for_status()
        return r.json()


# ------------------------------------------------------------------------------------------ esource ODM


def change(subject: str, event: str, event_repeat: str | None, form: str, group: str, group_repeat: str | None,
           item: str, value: str, tt: TransactionType = TransactionType.INSERT, previous: str | None = None,
           source: str = "obs-1") -> ItemChange:
    key = ItemKey(STUDY, subject, event, event_repeat, form, group, group_repeat, item)
    ref = SourceRef("Observation", source, "1", f"http://hospital.example/obs|{source}")
    return ItemChange(ItemValue(key, value, ref, "test"), tt, previous_value=previous,
                      reason_for_change="source amended" if tt is TransactionType.UPDATE else None)


def vs(subject: str, test: str, value: str, *, event: str = "SE.BASELINE", event_repeat: str | None = None,
       unit: str | None = None, tt: TransactionType = TransactionType.INSERT,
       previous: str | None = None) -> list[ItemChange]:
    """One vital-signs log line (IG.VS, repeat key = the test code), as esource writes it."""
    out = [change(subject, event, event_repeat, "F.VS", "IG.VS", test, "IT.VS.VSORRES", value, tt, previous)]
    if tt is TransactionType.INSERT:
        out.append(change(subject, event, event_repeat, "F.VS", "IG.VS", test, "IT.VS.VSTESTCD", test))
        if unit:
            out.append(change(subject, event, event_repeat, "F.VS", "IG.VS", test, "IT.VS.VSORRESU", unit))
    return out


def transaction(subject: str, changes: list[ItemChange], *, sequence: int, new_subject: bool = False,
                site: str = "SITE.001") -> SubjectTransaction:
    return SubjectTransaction(STUDY, MDV, subject, site, TransactionType.INSERT if new_subject else None, changes,
                              sequence)


def odm_of(tx: SubjectTransaction) -> bytes:
    return write_clinical_data([tx], file_type="Transactional", file_oid=f"ESOURCE.{tx.subject_key}.{tx.sequence}",
                               creation=dt.datetime(2025, 3, 1, 9, 0, tzinfo=dt.timezone.utc),
                               pseudonymizer=PSEUDONYMIZER)
