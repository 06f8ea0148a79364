"""Helpers for the REDCap tests: the emulator served by uvicorn on a free loopback port (RedcapServer),
item paths of CV01, and esource ODM transactions written by esource's own ODM writer."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import httpx

from esource.connectors.emulators.redcap_api import DEFAULT_TOKEN
from esource.domain.model import ItemChange, ItemKey, ItemValue, SourceRef, SubjectTransaction, TransactionType
from esource.odm.writer import write_clinical_data
from esource.privacy import Pseudonymizer
from esource.services.server import ThreadedServer, free_port

__all__ = ["RedcapServer", "free_port", "change", "transaction", "unsched", "STUDY", "MDV", "METADATA_FILE", "A", "B",
           "WEIGHT", "WEIGHT_CD", "HEIGHT", "HEIGHT_CD", "SEX", "BRTHYR"]

STUDY, MDV = "CV01", "MDV.CV01.1"
METADATA_FILE = Path(__file__).resolve().parents[2] / "cdisc_maps" / "CV01" / "metadata.xml"
A, B = "001-0001", "002-0002"

WEIGHT = ("SE.BASELINE", None, "F.VS", "IG.VS", "WEIGHT", "IT.VS.VSORRES")
WEIGHT_CD = ("SE.BASELINE", None, "F.VS", "IG.VS", "WEIGHT", "IT.VS.VSTESTCD")
HEIGHT = ("SE.BASELINE", None, "F.VS", "IG.VS", "HEIGHT", "IT.VS.VSORRES")
HEIGHT_CD = ("SE.BASELINE", None, "F.VS", "IG.VS", "HEIGHT", "IT.VS.VSTESTCD")
SEX = ("SE.SCREEN", None, "F.DM", "IG.DM", None, "IT.DM.SEX")
BRTHYR = ("SE.SCREEN", None, "F.DM", "IG.DM", None, "IT.DM.BRTHYR")


def unsched(date: str, test: str, item: str = "IT.VS.VSORRES") -> tuple:
    return ("SE.UNSCHED", date, "F.VS", "IG.VS", test, item)


# ------------------------------------------------------------------------------------------ server


class RedcapServer:
    """An emulator app served on a free loopback port (esource's ThreadedServer); test conveniences over
    plain HTTP (httpx)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.project = app.state.redcap
        self.server = ThreadedServer(app, "127.0.0.1", free_port(), log_level="critical", graceful_shutdown_s=1)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def api(self) -> str:
        return f"{self.url}/api/"

    def start(self) -> RedcapServer:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def post(self, **params: Any) -> httpx.Response:
        params.setdefault("token", DEFAULT_TOKEN)
        return httpx.post(self.api, data=params, timeout=10)

    def faults(self, **plan: Any) -> dict:
        r = httpx.post(self.url + "/_faults", json=plan, timeout=10)
        r.raise_for_status()
        return r.json()

    def clear_faults(self) -> None:
        httpx.delete(self.url + "/_faults", timeout=10).raise_for_status()

    def items(self, record: str | None = None) -> list[dict]:
        r = httpx.get(self.url + "/_test/items", params={"record": record} if record else None, timeout=10)
        r.raise_for_status()
        return r.json()

    def values(self, record: str) -> dict[tuple, str]:
        """{(event, repeat instrument, instance, field): value} without the `_complete` statuses."""
        return {(i["redcap_event_name"], i["redcap_repeat_instrument"], i["redcap_repeat_instance"],
                 i["field_name"]): i["value"] for i in self.items(record) if not i["field_name"].endswith("_complete")}

    def imports(self) -> list[dict]:
        r = httpx.get(self.url + "/_test/imports", timeout=10)
        r.raise_for_status()
        return r.json()

    def site_edit(self, **edit: Any) -> dict:
        r = httpx.post(self.url + "/_test/site_edit", json=edit, timeout=10)
        r.raise_for_status()
        return r.json()


# ------------------------------------------------------------------------------------------ esource ODM


_PSEUDO = Pseudonymizer(b"redcap-test-key-0123456789abcdef")
_SOURCE = SourceRef("Observation", "obs-1", "1", "http://hospital.example/obs|1")


def change(subject: str, path: tuple, value: str | None, tt: TransactionType = TransactionType.INSERT,
           previous: str | None = None) -> ItemChange:
    key = ItemKey(STUDY, subject, *path)
    return ItemChange(ItemValue(key, value or "", _SOURCE, "test"), tt, previous_value=previous,
                      reason_for_change="source changed" if tt is TransactionType.UPDATE else None)


def transaction(subject: str, *changes: ItemChange, sequence: int = 1, new_subject: bool = False,
                metadata: Any = None) -> tuple[SubjectTransaction, bytes]:
    """One esource transaction and its ODM 1.3.2, written by esource's ODM writer."""
    tx = SubjectTransaction(STUDY, MDV, subject, "SITE.001", TransactionType.INSERT if new_subject else None,
                            list(changes), sequence)
    odm = write_clinical_data([tx], file_type="Transactional", file_oid=f"ESOURCE.{STUDY}.{subject}.{sequence:06d}",
                              creation=dt.datetime(2025, 3, 1, 9, 0, tzinfo=dt.timezone.utc), pseudonymizer=_PSEUDO,
                              metadata=metadata)
    return SubjectTransaction(STUDY, MDV, subject, "SITE.001", None, [], sequence), odm
