"""Contract harness: the Rave Web Services emulator (connectors/emulators/rave_rws.py, in memory, with
the CV01 metadata so OIDs and values are checked like a CRF version) served by uvicorn in a thread on
a free loopback port, and the RaveConnector (connectors/rave.py) talking to it with Basic auth and an
in-memory EdcKeyMap.

Everything goes over HTTP, as a test client of the emulator would: faults through `POST /_faults`,
values through `GET /_test/items` (Rave's integer repeat keys mapped back to esource's through the
connector's key map), site edits through `POST /_test/site_edit` (esource's keys mapped to Rave's),
the write count through `GET /_test/stats` (every POST Rave accepted is a write: Rave has no
idempotency key, so a duplicate would show). Every fault mode is native: "reject" is a 403 RWS00042
"Field not authorised." refusal, "auth" a 401 with RWS's ODM error document (RWS00008), "timeout"
answers after `delay` seconds, longer than the connector's timeout.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from harness import ItemPath, register

from esource.connectors.emulators.rave_rws import create_rave_app
from esource.connectors.rave import RaveConnector
from esource.domain.ports import InMemoryEdcKeyMap
from esource.services.server import ThreadedServer, free_port

CONNECTOR_TIMEOUT = 0.5  # seconds; a "timeout" fault answers later than this
TIMEOUT_DELAY = 0.9
USER, PASSWORD = "rwsuser", "rws-Pa55w0rd-contract"
ENVIRONMENT = "PROD"


class RaveHarness:
    name = "rave"
    secrets = (PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())

    def __init__(self, url: str) -> None:
        self.url = url
        self.key_map = InMemoryEdcKeyMap()
        self.connector = RaveConnector(url, USER, PASSWORD, environment=ENVIRONMENT, key_map=self.key_map,
                                       timeout=CONNECTOR_TIMEOUT)
        self.http = httpx.Client(base_url=url, timeout=10)

    def _study(self, study_oid: str) -> str:
        return self.connector.rave_study_oid(study_oid)

    def inject(self, mode: str, count: int = 1, *, retry_after: float | None = None, delay: float | None = None,
               after_commit: bool = False) -> None:
        plan: dict[str, Any] = {"mode": mode, "count": count, "after_commit": after_commit,
                                "delay": TIMEOUT_DELAY if delay is None else delay}
        if retry_after is not None:
            plan["retry_after"] = retry_after
        if mode == "reject":
            plan["message"] = "Field not authorised. Form F.VS is locked for data entry."
        self.http.post("/_faults", json=plan).raise_for_status()

    def clear_faults(self) -> None:
        self.http.delete("/_faults").raise_for_status()

    def values(self, study_oid: str, subject_key: str) -> dict[ItemPath, str]:
        r = self.http.get("/_test/items", params={"study": self._study(study_oid), "subject": subject_key})
        r.raise_for_status()
        out: dict[ItemPath, str] = {}
        for i in r.json():
            event_repeat = self._esource_key(study_oid, subject_key, i["event"], i["event_repeat"])
            group_repeat = self._esource_key(study_oid, subject_key, i["group"], i["group_repeat"])
            out[(i["event"], event_repeat, i["form"], i["group"], group_repeat, i["item"])] = i["value"]
        return out

    def _esource_key(self, study: str, subject: str, scope: str, rave_key: int | None) -> str | None:
        if rave_key is None:
            return None
        found = self.key_map.esource_key(self.connector.name, study, subject, scope, int(rave_key))
        return found if found is not None else f"rave:{rave_key}"

    def site_edit(self, study_oid: str, subject_key: str, path: ItemPath, value: str) -> None:
        event, event_repeat, form, group, group_repeat, item = path
        name = self.connector.name
        body = {"study": self._study(study_oid), "subject": subject_key, "event": event, "form": form,
                "group": group, "item": item, "value": value, "user": "rave.site.cra",
                "reason": "corrected from the source document at the site",
                "event_repeat": None if event_repeat is None else self.key_map.edc_key(
                    name, study_oid, subject_key, event, event_repeat),
                "group_repeat": None if group_repeat is None else self.key_map.edc_key(
                    name, study_oid, subject_key, group, group_repeat)}
        self.http.post("/_test/site_edit", json=body).raise_for_status()

    def write_count(self) -> int:
        r = self.http.get("/_test/stats")
        r.raise_for_status()
        return int(r.json()["writes"])

    def close(self) -> None:
        self.connector.close()
        self.http.close()


@register("rave")
@contextmanager
def rave_harness(tmp_path: Path) -> Iterator[RaveHarness]:
    from esource.study.study import load_study

    app = create_rave_app(None, users={USER: PASSWORD}, studies={"CV01(PROD)": ["SITE.001", "SITE.002"]},
                          metadata={"CV01": load_study("CV01").metadata})
    try:
        with ThreadedServer(app, "127.0.0.1", free_port(), log_level="critical", graceful_shutdown_s=1) as served:
            harness = RaveHarness(served.url)
            try:
                yield harness
            finally:
                harness.close()
    finally:
        app.state.rave.close()
