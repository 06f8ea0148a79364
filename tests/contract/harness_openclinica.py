"""Contract harness: the OpenClinica 4 emulator (connectors/emulators/openclinica_odm.py, in memory, with
the CV01 study design) served by uvicorn in a thread on a free loopback port, and the
OpenClinicaConnector (connectors/openclinica.py) talking to it.

Faults go through the emulator's own fault plan on the import request (`POST /_faults` semantics,
set in-process). "reject" is OC's own way of refusing a file: the job completes and every form of it
is `Failed` (errorCode.formAlreadyComplete, nothing applied); "auth" a 401 on the import (the connector's
EdcAuthenticationError); "timeout" answers after `delay` seconds, longer than the connector's
timeout; with after_commit the import job is created, then the failure answered.

`write_count()` counts import jobs that changed at least one value: a re-send after an ambiguous
failure is answered "No Change" for every item and does not count (OC has no idempotency key).
`values()` and `site_edit()` map OC's ordinal "1" of non-repeating events and item groups to and from
esource's keys (no repeat key).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness import ItemPath, register

from esource.connectors.emulators.openclinica_odm import FaultRequest, StudyDesign, create_openclinica_app
from esource.connectors.openclinica import OpenClinicaConnector
from esource.services.server import ThreadedServer, free_port

TOKEN = "contract-openclinica-token"
CONNECTOR_TIMEOUT = 0.5  # seconds; a "timeout" fault answers later than this
TIMEOUT_DELAY = 0.9
REJECT_MESSAGE = "errorCode.formAlreadyComplete"


@functools.lru_cache(maxsize=1)
def _cv01_design() -> StudyDesign:
    from esource.study.study import load_study

    return StudyDesign.from_metadata(load_study("CV01").metadata)


class OpenClinicaHarness:
    name = "openclinica"
    secrets = (TOKEN,)

    def __init__(self, app: Any, url: str) -> None:
        self.app = app
        self.edc = app.state.openclinica
        self.plan = app.state.faults
        self.connector = OpenClinicaConnector(f"{url}/OpenClinica", TOKEN, timeout=CONNECTOR_TIMEOUT,
                                              poll_initial=0.005, poll_max=0.05, poll_timeout=10.0)

    def inject(self, mode: str, count: int = 1, *, retry_after: float | None = None, delay: float | None = None,
               after_commit: bool = False) -> None:
        plan: dict[str, Any] = {"mode": mode, "count": count, "after_commit": after_commit,
                                "delay": TIMEOUT_DELAY if delay is None else delay}
        if retry_after is not None:
            plan["retry_after"] = retry_after
        if mode == "reject":
            plan["message"] = REJECT_MESSAGE
        self.plan.set(FaultRequest(**plan))

    def clear_faults(self) -> None:
        self.plan.clear()

    def values(self, study_oid: str, subject_key: str) -> dict[ItemPath, str]:
        self.edc.wait_idle(5)
        out: dict[ItemPath, str] = {}
        for i in self.edc.items(study_oid, subject_key):
            erk, grk = self.edc.esource_keys(i["event"], i["event_repeat"], i["group"], i["group_repeat"])
            out[(i["event"], erk, i["form"], i["group"], grk, i["item"])] = i["value"]
        return out

    def site_edit(self, study_oid: str, subject_key: str, path: ItemPath, value: str) -> None:
        event, event_repeat, form, group, group_repeat, item = path
        self.edc.site_edit(study_oid, subject_key, event, event_repeat, form, group, group_repeat, item, value,
                           user="site.cra", reason="corrected from the source document at the site")

    def write_count(self) -> int:
        self.edc.wait_idle(5)  # a job created by an ambiguous import may still be running
        return self.edc.write_count()

    def close(self) -> None:
        self.connector.close()


@register("openclinica")
@contextmanager
def openclinica_harness(tmp_path: Path) -> Iterator[OpenClinicaHarness]:
    app = create_openclinica_app(None, token=TOKEN, metadata=_cv01_design())
    try:
        with ThreadedServer(app, "127.0.0.1", free_port(), log_level="critical", graceful_shutdown_s=1) as served:
            harness = OpenClinicaHarness(app, served.url)
            try:
                yield harness
            finally:
                harness.close()
    finally:
        app.state.openclinica.close()
