"""One place that wires settings -> store -> studies -> engine -> use cases -> connectors -> dispatcher.
Entry points (`esource serve`, `esource ingest`, the demo, tests) build a Container and only translate
input into calls and errors into answers."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esource.domain.ports import Clock, EdcConnector, SystemClock
from esource.mapping.engine import MappingEngine
from esource.observability import Metrics
from esource.privacy import DEMO_PSEUDONYM_KEY, Pseudonymizer
from esource.services.ingest import IngestService, Limits
from esource.services.process import Processor, enroll
from esource.settings import Settings
from esource.store.sqlalchemy_uow import Store
from esource.study.study import Study, load_study

log = logging.getLogger("esource.bootstrap")


@dataclass
class Container:
    settings: Settings
    store: Store
    studies: dict[str, Study]
    processors: dict[str, Processor]
    ingest: IngestService
    metrics: Metrics
    pseudonymizer: Pseudonymizer
    connectors: dict[str, EdcConnector]
    dispatcher: Any  # esource.services.dispatch.Dispatcher
    extras: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        for c in self.connectors.values():
            close = getattr(c, "close", None)
            if close:
                close()
        self.store.dispose()


def make_connector(settings: Settings, study_oid: str) -> EdcConnector:
    edc = settings.edc
    if edc.connector == "odm_file":
        from esource.connectors.odm_file import OdmFileConnector

        assert edc.folder is not None
        return OdmFileConnector(Path(edc.folder) / study_oid)
    from esource.connectors.sandbox import SandboxConnector

    if not edc.url:
        raise ValueError("edc.url is required for the sandbox connector")
    return SandboxConnector(edc.url, timeout=edc.timeout_s)


def build(settings: Settings, *, clock: Clock | None = None, connectors: dict[str, EdcConnector] | None = None,
          metrics: Metrics | None = None) -> Container:
    import os

    from esource.services.dispatch import Dispatcher

    if settings.maps_dir is not None:
        os.environ.setdefault("ESOURCE_MAPS_DIR", str(settings.maps_dir))
    if settings.database_url.startswith("sqlite:///"):
        Path(settings.database_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    clock = clock or SystemClock()
    metrics = metrics or Metrics()
    store = Store(settings.database_url, clock=clock)
    key = settings.pseudonym_key.get_secret_value().encode() if settings.pseudonym_key else DEMO_PSEUDONYM_KEY
    pseudonymizer = Pseudonymizer(key)
    studies = {oid: load_study(oid) for oid in settings.studies}
    processors = {oid: Processor(s, MappingEngine(s), store.uow, pseudonymizer, clock) for oid, s in studies.items()}
    ingest = IngestService(processors, store.uow, metrics,
                           Limits(max_bytes=settings.http.max_body_bytes, max_depth=settings.http.max_depth))
    if connectors is None:
        connectors = {oid: make_connector(settings, oid) for oid in studies}
    dispatcher = Dispatcher(store.uow, connectors, {oid: s.metadata_version_oid for oid, s in studies.items()},
                            metrics, max_attempts=settings.edc.max_attempts)
    container = Container(settings, store, studies, processors, ingest, metrics, pseudonymizer, connectors, dispatcher)
    if settings.enrollment_file is not None:
        load_enrollments(container, settings.enrollment_file)
    return container


def load_enrollments(container: Container, path: Path) -> int:
    from esource.services.demo import load_enrollment_file

    study_oid, enrollments, _ = load_enrollment_file(Path(path))
    if study_oid not in container.studies:
        raise ValueError(f"{path}: study {study_oid} is not configured (settings.studies)")
    n = enroll(container.store.uow, enrollments)
    log.info("enrollments loaded", extra={"study": study_oid, "count": n})
    return n
