"""RedcapConnector against the REDCap API emulator over real HTTP on loopback: esource's ODM as REDCap
flat JSON, repeat keys as stable integer instances, overwriteBehavior, REDCap's refusals as permanent
rejections, transient faults, no duplicate after an ambiguous failure, read-back in esource's keys,
and the token kept out of every message."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import orjson
import pytest
import redcap as pycap

from redcap_helpers import (
    A,
    B,
    BRTHYR,
    HEIGHT,
    HEIGHT_CD,
    MDV,
    SEX,
    STUDY,
    WEIGHT,
    WEIGHT_CD,
    change,
    free_port,
    transaction,
    unsched,
)
from esource.connectors.emulators.redcap_api import DEFAULT_TOKEN
from esource.connectors.redcap import RedcapConnector, RedcapMapping, redcap_name
from esource.domain.model import Enrollment, SubjectTransaction, TransactionType
from esource.domain.ports import InMemoryEdcKeyMap
from esource.intake.parse import parse_fhir
from esource.mapping.engine import MappingEngine
from esource.odm.xsd import validate_odm
from esource.privacy import Pseudonymizer
from esource.services.conflicts import edc_values, item_path, odm_items
from esource.services.dispatch import EdcAuthenticationError, TransientDeliveryError
from esource.services.process import Processor, content_key, enroll, intake_key_for
from esource.store import Store
from esource.study.study import load_study

INSERT, UPDATE, REMOVE = TransactionType.INSERT, TransactionType.UPDATE, TransactionType.REMOVE
WRONG_TOKEN = "ABCDEF0123456789ABCDEF0123456789"


def first_visit(subject: str = A, weight: str = "70.5") -> tuple:
    return transaction(subject, change(subject, BRTHYR, "1961"), change(subject, SEX, "F"),
                       change(subject, WEIGHT_CD, "WEIGHT"), change(subject, WEIGHT, weight), new_subject=True)


# ------------------------------------------------------------------------------------------ mapping and conversion


def test_capabilities_and_naming(connector, mapping):
    caps = connector.capabilities()
    assert (caps.name, caps.read_back, caps.idempotency_key, caps.integer_repeat_keys) == ("redcap", True, False, True)
    assert redcap_name("IT.VS.VSORRES", drop_prefix="IT.") == "vs_vsorres"
    assert redcap_name("SE.WEEK12") == "se_week12" and redcap_name("1ABC") == "v_1abc"
    assert mapping.fields["IT.VS.VSORRES"] == "vs_vsorres" and mapping.instruments["F.VS"] == "vs"
    assert mapping.events["SE.UNSCHED"] == "se_unsched_arm_1"
    assert mapping.repeat_parts("SE.BASELINE", "F.VS") == ("group",)
    assert mapping.repeat_parts("SE.UNSCHED", "F.VS") == ("event", "group")
    assert mapping.repeat_parts("SE.SCREEN", "F.DM") == ()
    key = mapping.instance_key("SE.UNSCHED", "F.VS", "2024-06-20", None, "HR")
    assert key == '["2024-06-20","HR"]'
    assert mapping.split_instance_key("SE.UNSCHED", "F.VS", key) == ("2024-06-20", None, "HR")
    assert DEFAULT_TOKEN not in repr(connector) and "RedcapConnector('http://127.0.0.1:" in repr(connector)


def test_a_design_redcap_cannot_hold_is_refused(cv01_metadata):
    # an item on two forms: a REDCap field belongs to one instrument
    groups = dict(cv01_metadata.item_groups)
    groups["IG.LB"] = dataclasses.replace(groups["IG.LB"], item_oids=groups["IG.LB"].item_oids + ("IT.VS.VSORRES",))
    with pytest.raises(ValueError, match="IT.VS.VSORRES is on F.VS/IG.VS and F.LB/IG.LB"):
        RedcapMapping.from_metadata(dataclasses.replace(cv01_metadata, item_groups=groups))
    # a repeating item group next to another group in one form
    forms = dict(cv01_metadata.forms)
    forms["F.VS"] = dataclasses.replace(forms["F.VS"], item_group_oids=("IG.VS", "IG.DM"))
    with pytest.raises(ValueError, match="repeats as a whole"):
        RedcapMapping.from_metadata(dataclasses.replace(cv01_metadata, forms=forms))


def test_esource_odm_becomes_redcap_flat_json(connector, cv01_metadata):
    tx, odm = transaction(A, change(A, BRTHYR, "1961"), change(A, SEX, "F"), change(A, WEIGHT_CD, "WEIGHT"),
                          change(A, WEIGHT, "70.5"), change(A, HEIGHT_CD, "HEIGHT"), change(A, HEIGHT, "170.0"),
                          change(A, unsched("2024-06-20", "HR", "IT.VS.VSTESTCD"), "HR"),
                          change(A, unsched("2024-06-20", "HR"), "80"), new_subject=True, metadata=cv01_metadata)
    assert validate_odm(odm) == []
    rows = connector.to_rows(connector.to_cells(odm, tx))
    assert rows == [
        {"record_id": A, "redcap_event_name": "se_screen_arm_1", "redcap_repeat_instrument": "",
         "redcap_repeat_instance": "", "dm_brthyr": "1961", "dm_sex": "F"},
        # instances in first-seen order: the writer puts IG.VS[HEIGHT] before IG.VS[WEIGHT]
        {"record_id": A, "redcap_event_name": "se_baseline_arm_1", "redcap_repeat_instrument": "vs",
         "redcap_repeat_instance": 1, "vs_vstestcd": "HEIGHT", "vs_vsorres": "170.0"},
        {"record_id": A, "redcap_event_name": "se_baseline_arm_1", "redcap_repeat_instrument": "vs",
         "redcap_repeat_instance": 2, "vs_vstestcd": "WEIGHT", "vs_vsorres": "70.5"},
        {"record_id": A, "redcap_event_name": "se_unsched_arm_1", "redcap_repeat_instrument": "vs",
         "redcap_repeat_instance": 1, "vs_vstestcd": "HR", "vs_vsorres": "80"},
    ]
    assert json.loads(json.dumps(rows)) == rows  # what PyCap posts as `data`


def test_instances_are_stable_across_transactions_and_connectors(redcap, connector, mapping, key_map):
    assert connector.send(*first_visit()).accepted
    tx2, odm2 = transaction(A, change(A, HEIGHT_CD, "HEIGHT"), change(A, HEIGHT, "170.0"),
                            change(A, unsched("2024-06-20", "HR", "IT.VS.VSTESTCD"), "HR"),
                            change(A, unsched("2024-06-20", "HR"), "80"), sequence=2)
    assert connector.send(tx2, odm2).accepted
    tx3, odm3 = transaction(A, change(A, unsched("2024-07-02", "HR", "IT.VS.VSTESTCD"), "HR"),
                            change(A, unsched("2024-07-02", "HR"), "77"),
                            change(A, WEIGHT, "71.0", UPDATE, previous="70.5"), sequence=3)
    assert connector.send(tx3, odm3).accepted
    # a later connector (a restart) with the same (persisted) key map keeps every instance
    again = RedcapConnector(redcap.api, DEFAULT_TOKEN, key_map=key_map, mapping=mapping, timeout=0.5)
    tx4, odm4 = transaction(A, change(A, HEIGHT, "171.0", UPDATE, previous="170.0"), sequence=4)
    assert again.send(tx4, odm4).accepted
    values = redcap.values(A)
    assert values[("se_baseline_arm_1", "vs", 1, "vs_vstestcd")] == "WEIGHT"
    assert values[("se_baseline_arm_1", "vs", 1, "vs_vsorres")] == "71.0"
    assert values[("se_baseline_arm_1", "vs", 2, "vs_vstestcd")] == "HEIGHT"
    assert values[("se_baseline_arm_1", "vs", 2, "vs_vsorres")] == "171.0"
    assert values[("se_unsched_arm_1", "vs", 1, "vs_vsorres")] == "80"
    assert values[("se_unsched_arm_1", "vs", 2, "vs_vsorres")] == "77"
    assert key_map.esource_key("redcap", STUDY, A, "SE.UNSCHED/F.VS", 2) == '["2024-07-02","HR"]'
    assert key_map.edc_key("redcap", STUDY, B, "SE.BASELINE/F.VS", "HEIGHT") == 1  # per subject

    snapshot = again.read_back(STUDY, A)
    assert validate_odm(snapshot) == []
    assert edc_values(snapshot, A) == {
        item_path(*BRTHYR): "1961", item_path(*SEX): "F",
        item_path(*WEIGHT_CD): "WEIGHT", item_path(*WEIGHT): "71.0",
        item_path(*HEIGHT_CD): "HEIGHT", item_path(*HEIGHT): "171.0",
        item_path(*unsched("2024-06-20", "HR", "IT.VS.VSTESTCD")): "HR", item_path(*unsched("2024-06-20", "HR")): "80",
        item_path(*unsched("2024-07-02", "HR", "IT.VS.VSTESTCD")): "HR", item_path(*unsched("2024-07-02", "HR")): "77",
    }
    assert again.read_back(STUDY, "009-9999") is None
    assert again.read_back("OTHER", A) is None


def test_an_instance_made_in_redcap_reads_back_under_a_marker(redcap, connector):
    connector.send(*first_visit())
    redcap.site_edit(record=A, redcap_event_name="se_baseline_arm_1", redcap_repeat_instrument="vs",
                     redcap_repeat_instance=7, field_name="vs_vsorres", value="120")
    values = edc_values(connector.read_back(STUDY, A), A)
    assert values["SE.BASELINE/F.VS/IG.VS[#7]/IT.VS.VSORRES"] == "120"
    assert values[item_path(*WEIGHT)] == "70.5"


# ------------------------------------------------------------------------------------------ overwriteBehavior


def test_overwrite_only_for_updates_and_removals(redcap, connector):
    assert connector.send(*first_visit()).code == "200"
    tx2, odm2 = transaction(A, change(A, HEIGHT_CD, "HEIGHT"), change(A, HEIGHT, "170.0"), sequence=2)
    connector.send(tx2, odm2)
    tx3, odm3 = transaction(A, change(A, WEIGHT, "71.0", UPDATE, previous="70.5"), sequence=3)
    receipt = connector.send(tx3, odm3)
    assert receipt.accepted and "overwriteBehavior=overwrite" in receipt.message
    tx4, odm4 = transaction(A, change(A, HEIGHT, None, REMOVE, previous="170.0"), sequence=4)
    assert connector.send(tx4, odm4).accepted
    assert [i["overwrite_behavior"] for i in redcap.imports()] == ["normal", "normal", "overwrite", "overwrite"]
    values = redcap.values(A)
    assert values[("se_baseline_arm_1", "vs", 1, "vs_vsorres")] == "71.0"
    assert ("se_baseline_arm_1", "vs", 2, "vs_vsorres") not in values  # removed (blank with overwrite)
    assert values[("se_baseline_arm_1", "vs", 2, "vs_vstestcd")] == "HEIGHT"
    # only the changed fields go: the Update's import carried one value
    assert redcap.imports()[2]["changed"] == 1


def test_an_insert_never_overwrites_a_value_redcap_holds(redcap, connector):
    redcap.site_edit(record=A, redcap_event_name="se_screen_arm_1", field_name="dm_sex", value="M")
    receipt = connector.send(*first_visit())
    assert not receipt.accepted and receipt.permanent and receipt.code == "INSERT_OVER_VALUE"
    assert "record 001-0001, event se_screen_arm_1, field dm_sex holds 'M'" in receipt.message
    assert "SE.SCREEN/F.DM/IG.DM/IT.DM.SEX" in receipt.message
    assert redcap.project.import_count() == 0 and redcap.values(A) == {("se_screen_arm_1", "", None, "dm_sex"): "M"}


# ------------------------------------------------------------------------------------------ rejections


def test_redcaps_validation_error_is_a_permanent_rejection_with_its_message(redcap, connector):
    receipt = connector.send(*first_visit(weight="seventy"))
    assert not receipt.accepted and receipt.permanent and receipt.code == "400"
    assert receipt.message.startswith('"001-0001","vs_vsorres","seventy","The value you provided could not be '
                                      "validated")
    assert redcap.project.import_count() == 0 and redcap.items() == []


def test_an_injected_rejection_and_unmapped_items(redcap, connector):
    redcap.faults(mode="reject", message="Form vs is locked for record 001-0001")
    receipt = connector.send(*first_visit())
    assert receipt.permanent and receipt.code == "400"
    assert receipt.message.startswith('"001-0001","dm_brthyr","1961","Form vs is locked for record 001-0001')
    tx, odm = first_visit()
    bad = odm.replace(b'ItemOID="IT.DM.SEX"', b'ItemOID="IT.DM.RACE"')
    receipt = connector.send(tx, bad)
    assert receipt.permanent and receipt.code == "UNMAPPED" and "ItemOID IT.DM.RACE" in receipt.message
    receipt = connector.send(tx, b"<ODM><unclosed>")
    assert receipt.permanent and receipt.code == "BAD_ODM"


def test_403_is_an_authentication_failure_and_the_token_is_never_shown(redcap, mapping):
    c = RedcapConnector(redcap.api, WRONG_TOKEN, key_map=InMemoryEdcKeyMap(), mapping=mapping, timeout=0.5)
    with pytest.raises(EdcAuthenticationError) as err:  # refused on the export before the import
        c.send(*first_visit())
    assert (err.value.status, err.value.code) == (403, "403")
    assert "You do not have permissions to use the API" in str(err.value)
    assert WRONG_TOKEN not in str(err.value) and WRONG_TOKEN not in repr(c)
    with pytest.raises(EdcAuthenticationError) as err:
        c.read_back(STUDY, A)
    assert err.value.code == "403" and WRONG_TOKEN not in str(err.value)
    # an injected 403 on the import itself (the export before it is allowed)
    good = RedcapConnector(redcap.api, DEFAULT_TOKEN, key_map=InMemoryEdcKeyMap(), mapping=mapping, timeout=0.5)
    redcap.faults(mode="auth")
    with pytest.raises(EdcAuthenticationError) as err:
        good.send(*first_visit())
    assert "import" in str(err.value) and DEFAULT_TOKEN not in str(err.value)
    assert redcap.imports() == []
    # PyCap prints a malformed token in its assertion: the connector refuses it first, without it
    with pytest.raises(ValueError) as bad:
        RedcapConnector(redcap.api, "secret-token-123", key_map=InMemoryEdcKeyMap(), mapping=mapping)
    assert "secret-token-123" not in str(bad.value)


# ------------------------------------------------------------------------------------------ transient faults


@pytest.mark.parametrize("mode, code, retry_after, ambiguous", [
    ("500", "500", None, True), ("503", "503", 2.0, True), ("429", "429", 2.0, False), ("timeout", None, None, True),
    ("reset", None, None, True),
])
def test_transient_faults_raise_with_retry_after(redcap, connector, mode, code, retry_after, ambiguous):
    redcap.faults(mode=mode, retry_after=2, delay=0.9)
    with pytest.raises(TransientDeliveryError) as err:
        connector.send(*first_visit())
    assert err.value.code == code and err.value.retry_after == retry_after and err.value.ambiguous is ambiguous
    assert DEFAULT_TOKEN not in str(err.value)
    assert redcap.project.import_count() == 0
    receipt = connector.send(*first_visit())  # the fault is spent: it goes through
    assert receipt.accepted and receipt.code == "200" and redcap.project.import_count() == 1


def test_an_unreachable_redcap_is_transient(mapping):
    c = RedcapConnector(f"http://127.0.0.1:{free_port()}/api/", DEFAULT_TOKEN, key_map=InMemoryEdcKeyMap(),
                        mapping=mapping, timeout=0.5)
    with pytest.raises(TransientDeliveryError) as err:
        c.send(*first_visit())
    assert not err.value.ambiguous and "connection refused" in str(err.value)
    with pytest.raises(TransientDeliveryError):
        c.read_back(STUDY, A)


def test_a_failing_read_back_is_transient(redcap, connector):
    connector.send(*first_visit())
    redcap.faults(mode="503", scope="export", retry_after=3)
    with pytest.raises(TransientDeliveryError) as err:
        connector.read_back(STUDY, A)
    assert err.value.code == "503"


# ------------------------------------------------------------------------------------------ no duplicates


@pytest.mark.parametrize("mode", ["timeout", "reset", "500"])
def test_no_duplicate_after_a_failure_after_the_commit(redcap, connector, mode):
    tx, odm = first_visit()
    redcap.faults(mode=mode, after_commit=True, delay=0.9)
    with pytest.raises(TransientDeliveryError) as err:
        connector.send(tx, odm)
    assert err.value.ambiguous
    assert redcap.project.import_count() == 1  # REDCap committed
    receipt = connector.send(tx, odm)  # the dispatcher's retry
    assert receipt.accepted and receipt.code == "duplicate"
    assert redcap.project.import_count() == 1
    assert redcap.values(A)[("se_baseline_arm_1", "vs", 1, "vs_vsorres")] == "70.5"


def test_after_ambiguous_mode_compares_only_after_an_ambiguous_failure(redcap, mapping):
    c = RedcapConnector(redcap.api, DEFAULT_TOKEN, key_map=InMemoryEdcKeyMap(), mapping=mapping, timeout=0.5,
                        verify_before_write=False)
    tx, odm = first_visit()
    redcap.faults(mode="timeout", after_commit=True, delay=0.9)
    with pytest.raises(TransientDeliveryError):
        c.send(tx, odm)
    assert c.send(tx, odm).code == "duplicate" and redcap.project.import_count() == 1
    # without an ambiguous failure the import goes straight (REDCap then logs a second write)
    tx2, odm2 = transaction(A, change(A, HEIGHT_CD, "HEIGHT"), change(A, HEIGHT, "170.0"), sequence=2)
    assert c.send(tx2, odm2).code == "200" and c.send(tx2, odm2).code == "200"
    assert redcap.project.import_count() == 3


def test_a_transaction_without_items_is_accepted_without_a_request(redcap, connector):
    tx, odm = transaction(A)
    assert b"SubjectData" in odm
    receipt = connector.send(tx, odm)
    assert receipt.accepted and receipt.code == "empty" and redcap.project.import_count() == 0


def test_a_pycap_project_built_elsewhere_gets_the_same_status_handling(redcap, mapping):
    project = pycap.Project(redcap.api, DEFAULT_TOKEN)
    c = RedcapConnector(redcap.api, DEFAULT_TOKEN, key_map=InMemoryEdcKeyMap(), mapping=mapping, timeout=0.5,
                        client=project)
    redcap.faults(mode="429", retry_after=4)
    with pytest.raises(TransientDeliveryError) as err:
        c.send(*first_visit())
    assert err.value.code == "429" and err.value.retry_after == 4.0
    assert c.send(*first_visit()).accepted


# ------------------------------------------------------------------------------------------ real esource output


def test_processor_transactions_are_delivered_and_read_back(redcap, connector, tmp_path):
    """FHIR in through esource's use case, the outbox's ODM out through the connector."""

    class Clock:
        def now(self) -> dt.datetime:
            return dt.datetime(2025, 3, 1, 9, 0, tzinfo=dt.timezone.utc)

    store = Store(f"sqlite:///{tmp_path / 'esource.db'}", clock=Clock())
    try:
        study = load_study(STUDY)
        processor = Processor(study, MappingEngine(study), store.uow, Pseudonymizer(b"redcap-key-0123456789abcdef"),
                              Clock())
        enroll(store.uow, [Enrollment(STUDY, A, "SITE.001", (("http://hospital.example/mrn", "MRN-1"),),
                                      dt.date(2024, 4, 15), dt.date(2024, 5, 1))])
        patient = {"resourceType": "Patient", "id": "p1", "birthDate": "1961-07-14", "gender": "female",
                   "identifier": [{"system": "http://hospital.example/mrn", "value": "MRN-1"}]}

        def obs(oid: str, code: str, value: float, unit: str, when: str, version: int = 1) -> dict:
            return {"resourceType": "Observation", "id": oid, "meta": {"versionId": str(version)}, "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                    "subject": {"reference": "Patient/p1"}, "effectiveDateTime": when,
                    "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org",
                                      "code": unit}}

        def ingest(n: int, *resources: dict) -> None:
            data = orjson.dumps({"resourceType": "Bundle", "type": "collection",
                                 "entry": [{"fullUrl": f"http://ehr.example/fhir/{r['resourceType']}/{r['id']}",
                                            "resource": r} for r in (patient, *resources)]})
            processor.ingest(parse_fhir(data, "redcap-test"), intake_key_for("redcap-test", n, content_key(data)))

        ingest(1, obs("wt", "29463-7", 70.5, "kg", "2024-05-01T09:00:00+02:00"))
        ingest(2, obs("hr", "8867-4", 80, "/min", "2024-06-20T09:00:00+02:00"),  # unscheduled
               obs("wt", "29463-7", 71.0, "kg", "2024-05-01T09:00:00+02:00", version=2))
        with store.uow(read_only=True) as uow:
            rows = uow.outbox_entries()
        assert len(rows) == 2
        expected: dict[str, str | None] = {}
        for row in rows:
            receipt = connector.send(SubjectTransaction(STUDY, MDV, A, row.site_oid, None, [], row.sequence), row.odm)
            assert receipt.accepted and receipt.code == "200", receipt
            for item in odm_items(row.odm):
                expected[item.path] = item.value
        snapshot = connector.read_back(STUDY, A)
        assert validate_odm(snapshot) == []
        assert edc_values(snapshot, A) == expected
        assert any(p.startswith("SE.UNSCHED[2024-06-20]/F.VS/IG.VS[HR]/") for p in expected)
        assert [i["overwrite_behavior"] for i in redcap.imports()] == ["normal", "overwrite"]
    finally:
        store.dispose()
