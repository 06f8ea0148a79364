"""Contract harness: esource's sandbox EDC (connectors/sandbox_edc.py, in memory) served by uvicorn in
a thread on a free loopback port, and the SandboxConnector (connectors/sandbox.py) talking to it.

Faults go through the sandbox's own fault plan (`POST /_faults` semantics, set in-process): every
mode of the harness interface is native. "reject" is a 422 with the sandbox's code and message;
"auth" a 401 (EdcAuthenticationError for the connector), as for a wrong API key (the harness uses
one); "timeout" answers after `delay` seconds, longer than the connector's timeout.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness import ItemPath, register

from esource.connectors.sandbox import SandboxConnector
from esource.connectors.sandbox_edc import FaultRequest
from esource.connectors.sandbox_edc import ItemPath as SandboxPath
from esource.connectors.sandbox_edc import create_sandbox_app
from esource.services.server import ThreadedServer, free_port

CONNECTOR_TIMEOUT = 0.5  # seconds; a "timeout" fault answers later than this
TIMEOUT_DELAY = 0.9


API_KEY = "contract-sandbox-key-7781"


class SandboxHarness:
    name = "sandbox"
    secrets = (API_KEY,)

    def __init__(self, app: Any, url: str) -> None:
        self.app = app
        self.edc = app.state.sandbox
        self.plan = app.state.faults
        self.connector = SandboxConnector(url, timeout=CONNECTOR_TIMEOUT, api_key=API_KEY)

    def inject(self, mode: str, count: int = 1, *, retry_after: float | None = None, delay: float | None = None,
               after_commit: bool = False) -> None:
        plan: dict[str, Any] = {"mode": mode, "count": count, "after_commit": after_commit,
                                "delay": TIMEOUT_DELAY if delay is None else delay}
        if retry_after is not None:
            plan["retry_after"] = retry_after
        if mode == "reject":
            plan["message"] = "form F.VS is locked for subject entry"
        self.plan.set(FaultRequest(**plan))

    def clear_faults(self) -> None:
        self.plan.clear()

    def values(self, study_oid: str, subject_key: str) -> dict[ItemPath, str]:
        return {(i["event"], i["event_repeat"], i["form"], i["group"], i["group_repeat"], i["item"]): i["value"]
                for i in self.edc.items(study_oid, subject_key)}

    def site_edit(self, study_oid: str, subject_key: str, path: ItemPath, value: str) -> None:
        event, event_repeat, form, group, group_repeat, item = path
        self.edc.site_edit(study_oid, subject_key,
                           SandboxPath(event, event_repeat or "", form, group, group_repeat or "", item), value,
                           user_oid="USR.SITE.CRA", reason="corrected from the source document at the site")

    def write_count(self) -> int:
        return self.edc.transaction_count()

    def close(self) -> None:
        self.connector.close()


@register("sandbox")
@contextmanager
def sandbox_harness(tmp_path: Path) -> Iterator[SandboxHarness]:
    app = create_sandbox_app(None, api_key=API_KEY)
    try:
        with ThreadedServer(app, "127.0.0.1", free_port(), log_level="critical", graceful_shutdown_s=1) as served:
            harness = SandboxHarness(app, served.url)
            try:
                yield harness
            finally:
                harness.close()
    finally:
        app.state.sandbox.close()
