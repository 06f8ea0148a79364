"""What never leaves the hospital: no Patient id, name, identifier, address, telecom or note text in
the ODM Snapshot or the lineage JSON; SourceID is the HMAC pseudonym (protocol: "What never leaves
the hospital")."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json

import pytest
from lxml import etree

from engine_helpers import (GLUC, HR, allergy, bundle_bytes, condition, day, enrollment, med_statement, obs, patient)
from esource.odm.xsd import validate_odm
from esource.privacy import Pseudonymizer
from esource.services.dry_run import dry_run, lineage, snapshot_odm

ODM = "{http://www.cdisc.org/ns/odm/v1.3}"
KEY = b"privacy-test-key-0123456789abcdef"
MRN = "MRN-00123456"
INS = "1850775123456"
SECRETS = [MRN, INS, "Dupont", "Jean-Baptiste", "12 rue de la Paix", "Paris 75002", "+33 6 12 34 56 78",
           "jb.dupont@example.fr", "lives with daughter Claire Martin", "worried about driving", "1958-04-23",
           "Dr Alice Moreau", "Clinique du Parc"]


def _identified_patient():
    return patient(
        MRN, birth="1958-04-23", gender="male",
        identifier=[{"system": "urn:oid:1.2.250.1.213.1.4.8", "value": INS},
                    {"system": "urn:hospital:mrn", "value": MRN}],
        name=[{"family": "Dupont", "given": ["Jean-Baptiste"], "text": "Jean-Baptiste Dupont"}],
        address=[{"line": ["12 rue de la Paix"], "city": "Paris 75002"}],
        telecom=[{"system": "phone", "value": "+33 6 12 34 56 78"}, {"system": "email", "value": "jb.dupont@example.fr"}],
        generalPractitioner=[{"display": "Dr Alice Moreau"}],
        managingOrganization={"display": "Clinique du Parc"},
    )


def _resources():
    subj = {"reference": f"Patient/{MRN}", "display": "Jean-Baptiste Dupont"}
    note = [{"text": "lives with daughter Claire Martin"}]
    return [
        _identified_patient(),
        obs(HR, 70, "/min", day(1, "08:00"), subject=subj, note=note,
            performer=[{"display": "Dr Alice Moreau"}]),
        obs(GLUC, 5.5, "mmol/L", day(85), subject=subj, note=[{"text": "worried about driving"}]),
        obs(GLUC, 6, "mmol/L", day(40), subject=subj),
        condition(subject=subj, note=note, recorder={"display": "Dr Alice Moreau"}),
        condition(onset=day(20), subject=subj, text="Cough"),  # a possible AE: a discrepancy message
        allergy(patient=subj),
        med_statement(subject=subj, dose=500, note=note, informationSource={"display": "Clinique du Parc"}),
    ]


@pytest.fixture
def outputs(study, engine, tmp_path):
    f = tmp_path / "patient.json"
    f.write_bytes(bundle_bytes(_resources()))
    run = dry_run(study, engine, enrollment(), [f], today=dt.date(2024, 9, 1))
    pseudo = Pseudonymizer(KEY)
    odm = snapshot_odm(study, run, pseudo, creation=dt.datetime(2024, 9, 1, tzinfo=dt.timezone.utc))
    lin = json.dumps(lineage(run, pseudo), ensure_ascii=False)
    return run, odm, lin, pseudo


def test_outputs_are_not_empty(outputs):
    run, odm, lin, _ = outputs
    forms = {iv.key.form_oid for iv in run.result.items}
    assert forms == {"F.DM", "F.VS", "F.LB", "F.MH", "F.CM"}
    assert validate_odm(odm) == []


@pytest.mark.parametrize("secret", SECRETS)
def test_no_identifying_text_in_the_odm_or_the_lineage(outputs, secret):
    _, odm, lin, _ = outputs
    assert secret.encode() not in odm
    assert secret.lower().encode() not in odm.lower()
    assert secret not in lin
    assert secret.lower() not in lin.lower()


def test_source_id_is_the_hmac_pseudonym(outputs):
    run, odm, lin, pseudo = outputs
    root = etree.fromstring(odm)
    sids = [e.text for e in root.iter(f"{ODM}SourceID")]
    assert len(sids) == len(run.result.items)
    expected = {pseudo.source_id(iv.source) for iv in run.result.items}
    assert set(sids) == expected
    # the Patient's SourceID is HMAC-SHA-256 of "Patient/<id>" with the hospital's key
    digest = hmac.new(KEY, f"Patient/{MRN}".encode(), hashlib.sha256).hexdigest()[:32]
    assert any(s.startswith(f"Patient:{digest}|v=") for s in sids)
    for s in sids:
        rtype, _, rest = s.partition(":")
        assert rtype in {"Patient", "Observation", "Condition", "AllergyIntolerance", "MedicationStatement"}
        assert len(rest.split("|")[0]) == 32
    # with another key, another pseudonym
    other = Pseudonymizer(b"another-key-0123456789abcdefghij")
    assert not (set(sids) & {other.source_id(iv.source) for iv in run.result.items})


def test_lineage_never_shows_the_patient_id(outputs):
    run, _, lin, _ = outputs
    data = json.loads(lin)
    patient_sources = [i["source"] for i in data["items"] if i["source"]["resourceType"] == "Patient"]
    assert patient_sources and all("id" not in s for s in patient_sources)
    assert all(set(s) == {"resourceType", "versionId"} for s in patient_sources)


def test_odm_carries_subject_key_and_site_only(outputs):
    _, odm, _, _ = outputs
    root = etree.fromstring(odm)
    (sd,) = root.iter(f"{ODM}SubjectData")
    assert sd.get("SubjectKey") == "001-0007"
    assert sd.find(f"{ODM}SiteRef").get("LocationOID") == "SITE.001"
    dm = {e.get("ItemOID"): e.get("Value") for e in root.iter(f"{ODM}ItemData") if e.get("ItemOID").startswith("IT.DM")}
    assert dm == {"IT.DM.BRTHYR": "1958", "IT.DM.SEX": "M"}


def test_a_value_equal_to_a_patient_identifier_or_name_is_blocked(run):
    res = run([_identified_patient(), condition(text=MRN), condition(text="Jean-Baptiste Dupont"),
               condition(text="Asthma")])
    terms = sorted(iv.value for iv in res.items if iv.key.item_oid == "IT.MH.MHTERM")
    assert terms == ["Asthma"]
    assert [d.kind.value for d in res.discrepancies] == ["privacy_blocked", "privacy_blocked"]
    for d in res.discrepancies:
        assert MRN not in d.message and "Dupont" not in d.message
