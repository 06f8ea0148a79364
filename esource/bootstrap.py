"""One place that wires settings -> store -> studies -> engine -> use cases -> connectors -> dispatcher.
Entry points (`esource serve`, `esource ingest`, the demo, tests) build a Container and only translate
input into calls and errors into answers."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esource.domain.ports import Clock, EdcConnector, EdcKeyMap, SystemClock
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
        for c in {id(c): c for c in self.connectors.values()}.values():  # a shared connector closes once
            close = getattr(c, "close", None)
            if close:
                close()
        self.store.dispose()


def make_connector(settings: Settings, study_oid: str, *, key_map: EdcKeyMap | None = None,
                   study: Study | None = None) -> EdcConnector:
    """The EDC connector of one study, from its endpoint (`settings.edc.for_study`: the default endpoint
    with the study's `edc.studies.<oid>` entry over it). Connectors whose EDC needs integer repeat keys
    (rave, redcap) need a persistent `key_map` (`SqlEdcKeyMap` in the service); redcap names its
    project from the study's ODM metadata (`study`, loaded when not given) and the endpoint's naming."""
    endpoint = settings.edc.for_study(study_oid)
    kind = endpoint.connector
    if kind == "odm_file":
        from esource.connectors.odm_file import OdmFileConnector

        if endpoint.folder is None:
            raise ValueError(f"edc.folder is required for the odm_file connector (study {study_oid})")
        return OdmFileConnector(Path(endpoint.folder) / study_oid)
    if not endpoint.url:
        raise ValueError(f"edc.url is required for the {kind} connector (study {study_oid})")
    if kind == "sandbox":
        from esource.connectors.sandbox import SandboxConnector

        return SandboxConnector(endpoint.url, timeout=endpoint.timeout_s, api_key=_secret(endpoint.api_key) or None)
    if kind == "openclinica":
        from esource.connectors.openclinica import OpenClinicaConnector

        return OpenClinicaConnector(endpoint.url, _secret(endpoint.token), timeout=endpoint.timeout_s,
                                    poll_initial=endpoint.poll_initial_s, poll_max=endpoint.poll_max_s,
                                    poll_timeout=endpoint.poll_timeout_s)
    if key_map is None:
        raise ValueError(f"the {kind} connector needs a persistent EDC key map (SqlEdcKeyMap) for study {study_oid}")
    if kind == "rave":
        from esource.connectors.rave import RaveConnector

        return RaveConnector(endpoint.url, _secret(endpoint.username), _secret(endpoint.password),
                             environment=endpoint.environment, key_map=key_map, timeout=endpoint.timeout_s,
                             verify_before_send=endpoint.verify_before_send)
    if kind == "redcap":
        from esource.connectors.redcap import RedcapConnector, RedcapMapping, RedcapNaming

        study = study if study is not None else load_study(study_oid)
        mapping = RedcapMapping.from_metadata(study.metadata, naming=RedcapNaming(**endpoint.redcap.model_dump()))
        return RedcapConnector(endpoint.url, _secret(endpoint.token), key_map=key_map, mapping=mapping,
                               timeout=endpoint.timeout_s, verify_before_write=endpoint.verify_before_send)
    raise ValueError(f"unknown EDC connector {kind!r} (study {study_oid})")


_SHAREABLE = ("sandbox", "rave", "openclinica")  # connectors that serve any study of their endpoint


def make_connectors(settings: Settings, studies: dict[str, Study], *, key_map: EdcKeyMap | None = None
                    ) -> dict[str, EdcConnector]:
    """One connector per study; studies whose endpoints are identical (same connector, URL and
    credentials) share one instance, so the dispatcher stops that endpoint once when the EDC refuses
    the credentials."""
    made: list[tuple[Any, EdcConnector]] = []
    out: dict[str, EdcConnector] = {}
    for oid, study in studies.items():
        endpoint = settings.edc.for_study(oid)
        shape = endpoint.model_dump() if endpoint.connector in _SHAREABLE else None
        found = next((c for s, c in made if shape is not None and s == shape), None)
        if found is None:
            found = make_connector(settings, oid, key_map=key_map, study=study)
            made.append((shape, found))
        out[oid] = found
    return out


def _secret(value: Any) -> str:
    return value.get_secret_value() if value is not None else ""


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
    from esource.reconciliation.policy import ReviewPolicies

    # review-before-send: the map's per-form policy plus a data manager's stored overrides
    policies = ReviewPolicies(store.uow)
    processors = {oid: Processor(s, MappingEngine(s), store.uow, pseudonymizer, clock,
                                 hold_for_review=policies.hold_for_review) for oid, s in studies.items()}
    ingest = IngestService(processors, store.uow, metrics,
                           Limits(max_bytes=settings.http.max_body_bytes, max_depth=settings.http.max_depth),
                           pseudonymizer)
    if connectors is None:
        from esource.store.edc_key_map import SqlEdcKeyMap

        connectors = make_connectors(settings, studies, key_map=SqlEdcKeyMap(store))
    dispatcher = Dispatcher(store.uow, connectors, {oid: s.metadata_version_oid for oid, s in studies.items()},
                            metrics, max_attempts=settings.edc.max_attempts, auth_recheck=settings.edc.auth_recheck_s)
    ingest.on_outbox = dispatcher.wake
    container = Container(settings, store, studies, processors, ingest, metrics, pseudonymizer, connectors, dispatcher)
    container.extras["review_policies"] = policies
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
