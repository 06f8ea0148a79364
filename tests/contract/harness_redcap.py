"""Contract harness: the REDCap API emulator (connectors/emulators/redcap_api.py, in memory) served by
uvicorn in a thread on a free loopback port, and the RedcapConnector (connectors/redcap.py, PyCap
underneath) talking to it with an InMemoryEdcKeyMap and the mapping of cdisc_maps/CV01/metadata.xml.

Faults go through the emulator's own fault plan (`POST /_faults` semantics, set in-process) and hit
record imports, the only requests that write clinical data: "reject" is REDCap's 400 with an error
line naming the record, field and value (a locked form); "auth" the 403 REDCap answers for a token
without rights; "timeout" answers after `delay` seconds, longer than the connector's timeout.

`values()` reads the emulator's stored values and maps them to esource's keys through the same
mapping and key map the connector uses (instances back to repeat keys); `write_count()` counts the
record imports REDCap applied.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness import ItemPath, register

from esource.connectors.emulators.redcap_api import DEFAULT_TOKEN, FaultRequest, create_redcap_app
from esource.connectors.redcap import CONNECTOR_NAME, RedcapCell, RedcapConnector, RedcapMapping, cells_to_items
from esource.domain.ports import InMemoryEdcKeyMap
from esource.study.metadata import load_metadata
from esource.services.server import ThreadedServer, free_port

METADATA = Path(__file__).resolve().parents[2] / "cdisc_maps" / "CV01" / "metadata.xml"
CONNECTOR_TIMEOUT = 0.5  # seconds; a "timeout" fault answers later than this
TIMEOUT_DELAY = 0.9
_MAPPING: RedcapMapping | None = None


def cv01_mapping() -> RedcapMapping:
    global _MAPPING
    if _MAPPING is None:
        _MAPPING = RedcapMapping.from_metadata(load_metadata(METADATA))
    return _MAPPING


class RedcapHarness:
    name = "redcap"
    secrets = (DEFAULT_TOKEN,)

    def __init__(self, app: Any, url: str, mapping: RedcapMapping) -> None:
        self.app = app
        self.project = app.state.redcap
        self.plan = app.state.faults
        self.mapping = mapping
        self.key_map = InMemoryEdcKeyMap()
        self.connector = RedcapConnector(f"{url}/api/", DEFAULT_TOKEN, key_map=self.key_map, mapping=mapping,
                                         timeout=CONNECTOR_TIMEOUT)

    def inject(self, mode: str, count: int = 1, *, retry_after: float | None = None, delay: float | None = None,
               after_commit: bool = False) -> None:
        plan: dict[str, Any] = {"mode": mode, "count": count, "after_commit": after_commit,
                                "delay": TIMEOUT_DELAY if delay is None else delay}
        if retry_after is not None:
            plan["retry_after"] = retry_after
        self.plan.set(FaultRequest(**plan))

    def clear_faults(self) -> None:
        self.plan.clear()

    def values(self, study_oid: str, subject_key: str) -> dict[ItemPath, str]:
        if study_oid != self.mapping.study_oid:
            return {}
        cells = [(RedcapCell(i["record"], i["redcap_event_name"], i["redcap_repeat_instrument"],
                             i["redcap_repeat_instance"], i["field_name"]), i["value"])
                 for i in self.project.items(subject_key)]
        return cells_to_items(self.mapping, cells, lambda e, f, n: self.key_map.esource_key(
            CONNECTOR_NAME, study_oid, subject_key, self.mapping.instance_scope(e, f), n))

    def site_edit(self, study_oid: str, subject_key: str, path: ItemPath, value: str) -> None:
        event, event_rk, form, _group, group_rk, item = path
        m = self.mapping
        key = m.instance_key(event, form, event_rk, None, group_rk)
        instance = None if key is None else self.key_map.edc_key(CONNECTOR_NAME, study_oid, subject_key,
                                                                  m.instance_scope(event, form), key)
        self.project.site_edit(subject_key, m.events[event], m.instruments[form] if key is not None else "",
                               instance, m.fields[item], value)

    def write_count(self) -> int:
        return self.project.import_count()

    def close(self) -> None:
        self.connector.close()


@register("redcap")
@contextmanager
def redcap_harness(tmp_path: Path) -> Iterator[RedcapHarness]:
    mapping = cv01_mapping()
    app = create_redcap_app(None, tokens={DEFAULT_TOKEN: mapping.study_oid}, project_xml_metadata=mapping)
    try:
        with ThreadedServer(app, "127.0.0.1", free_port(), log_level="critical", graceful_shutdown_s=1) as served:
            harness = RedcapHarness(app, served.url, mapping)
            try:
                yield harness
            finally:
                harness.close()
    finally:
        app.state.redcap.close()
