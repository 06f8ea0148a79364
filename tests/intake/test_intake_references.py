"""ReferenceResolver on the sample data and on crafted Bundles."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from esource.domain.model import SourceResource
from esource.intake.parse import parse_fhir
from esource.intake.references import ReferenceResolver, split_reference

DATA = Path(__file__).resolve().parents[1] / "data"


def load(name: str):
    path = DATA / "ips" / name
    parsed = parse_fhir(path.read_bytes(), name)
    return parsed, ReferenceResolver(parsed)


def by_id(parsed, rt, rid) -> SourceResource:
    [res] = [r for r in parsed.by_type(rt) if r.id == rid]
    return res


def test_split_reference():
    assert split_reference("Patient/2") == (None, "Patient", "2", None)
    assert split_reference("https://s/fhir/Observation/a.b-1/_history/3") == ("https://s/fhir", "Observation", "a.b-1", "3")
    assert split_reference("urn:uuid:1234") is None
    assert split_reference("Foo/1") is None


# ------------------------------------------------------------------------------------ urn:uuid


def test_urn_uuid_medication_statement_to_medication_and_patient():
    parsed, resolver = load("HL7-IPS-IG-bundle-minimal.json")
    [statement] = parsed.by_type("MedicationStatement")
    med = resolver.resolve(statement.resource["medicationReference"], statement)
    assert isinstance(med, SourceResource) and med.resource_type == "Medication"
    assert med.full_url == "urn:uuid:6369a973-afc7-4617-8877-3e9811e05a5b"
    assert resolver.medication_of(statement)["coding"][0]["code"] == "108774000"
    assert resolver.patient_of(statement).full_url == "urn:uuid:7685713c-e29e-4a75-8a90-45be7ba3be94"


def test_dk_jens_villadsen_medication_statements():
    parsed, resolver = load("DK_Jens_Villadsen_01.json")
    got = {s.id: resolver.medication_of(s)["coding"][0]["code"] for s in parsed.by_type("MedicationStatement")}
    assert got == {
        "gravitate-maria-medicationStatement-1": "EU/1/17/1201/001",
        "gravitate-maria-medicationStatement-2": "EMEA/H/C/000142",
        "gravitate-maria-medicationStatement-3": "16028/0049",
    }
    for s in parsed.by_type("MedicationStatement"):
        assert resolver.patient_of(s).id == "Inline-Instance-for-gravitate-maria-2"


def test_eu_giorgio_cangioli_medication_statements():
    parsed, resolver = load("EU_Giorgio_Cangioli_03.json")
    statements = parsed.by_type("MedicationStatement")
    assert len(statements) == 12
    codes = {}
    for s in statements:
        med = resolver.resolve(s.resource["medicationReference"], s)
        assert isinstance(med, SourceResource) and med.resource_type == "Medication"
        concept = resolver.medication_of(s)
        assert concept is med.resource["code"]
        codes[s.id] = (concept["coding"][0]["system"], concept["coding"][0]["code"])
    assert codes["eumfh-39-02-1-1"] == ("http://www.whocc.no/atc", "A10BB09")  # gliclazide
    assert codes["eumfh-39-02-1-3"] == ("http://www.whocc.no/atc", "A10BA02")  # metformin
    assert codes["eumfh-39-02-1-11"] == ("http://www.whocc.no/atc", "C09AA03")  # lisinopril


# ------------------------------------------------------------------------------------ relative / absolute


def test_relative_full_urls_uk_nhsx():
    parsed, resolver = load("UK_NHSx_IPS_Example_01-modified.json")
    patient = parsed.by_type("Patient")[0]
    assert patient.full_url == "Patient/2"
    for rt in ("Condition", "MedicationStatement", "MedicationRequest", "AllergyIntolerance"):
        for res in parsed.by_type(rt):
            assert resolver.patient_of(res) is patient, res.label
    statement = by_id(parsed, "MedicationStatement", "1")
    assert resolver.resolve("Medication/20", statement).id == "20"
    assert resolver.medication_of(statement)["coding"][0]["code"] == "9751511000001104"
    # dangling references in the sample: Encounter/Encounter2 and Organization/1 are not in the Bundle
    assert resolver.resolve("Encounter/Encounter2", statement) is None
    assert resolver.resolve("Organization/1", statement) is None


def test_relative_type_id_with_urn_full_urls():
    parsed, resolver = load("Bundle-IosefaFuimaono-Bundle.json")
    patient = parsed.by_type("Patient")[0]
    assert patient.full_url.startswith("urn:uuid:")
    observations = parsed.by_type("Observation")
    assert observations and all(resolver.patient_of(o) is patient for o in observations)


def test_absolute_full_urls_hk():
    parsed, resolver = load("HK_IPS_Sample_with_medication.json")
    patient = parsed.by_type("Patient")[0]
    assert patient.full_url == "https://www.ehealth.gov.hk/Patient/00001"
    composition = parsed.by_type("Composition")[0]
    # absolute reference, exact fullUrl
    assert resolver.resolve("https://www.ehealth.gov.hk/Patient/00001", composition) is patient
    assert resolver.patient_of(composition) is patient
    # relative reference resolved against the context entry's server base
    org = resolver.resolve({"reference": "Organization/HKG-EHR"}, composition)
    assert org.full_url == "https://www.ehealth.gov.hk/Organization/HKG-EHR"
    for rt in ("AllergyIntolerance", "Condition", "MedicationStatement"):
        for res in parsed.by_type(rt):
            assert resolver.patient_of(res) is patient
    # the same Type/id on another server is another resource
    assert resolver.resolve("https://other.example.org/fhir/Patient/00001", composition) is None
    # version-specific references must name the version the Bundle holds (meta.versionId "00001")
    assert resolver.resolve("https://www.ehealth.gov.hk/Patient/00001/_history/00001", composition) is patient
    assert resolver.resolve("Patient/00001/_history/00001", composition) is patient
    assert resolver.resolve("Patient/00001/_history/2", composition) is None


def test_absolute_reference_to_resource_with_urn_full_url_by_type_and_id():
    bundle = {
        "resourceType": "Bundle", "type": "collection",
        "entry": [
            {"fullUrl": "urn:uuid:p", "resource": {"resourceType": "Patient", "id": "123"}},
            {"fullUrl": "urn:uuid:o", "resource": {"resourceType": "Observation", "id": "o", "subject": {"reference": "http://ehr.example/fhir/Patient/123"}}},
        ],
    }
    parsed = parse_fhir(orjson.dumps(bundle), "b")
    resolver = ReferenceResolver(parsed)
    assert resolver.patient_of(parsed.by_type("Observation")[0]).id == "123"


def test_history_versions():
    bundle = {
        "resourceType": "Bundle", "type": "collection",
        "entry": [
            {"fullUrl": "http://s/fhir/Patient/1", "resource": {"resourceType": "Patient", "id": "1", "meta": {"versionId": "3"}}},
            {"fullUrl": "http://s/fhir/Observation/o", "resource": {"resourceType": "Observation", "id": "o"}},
        ],
    }
    parsed = parse_fhir(orjson.dumps(bundle), "b")
    resolver = ReferenceResolver(parsed)
    obs = parsed.by_type("Observation")[0]
    assert resolver.resolve("Patient/1/_history/3", obs).id == "1"
    assert resolver.resolve("Patient/1/_history/2", obs) is None  # another version is not this resource
    assert resolver.resolve("http://s/fhir/Patient/1/_history/3", obs).id == "1"
    assert resolver.resolve("http://s/fhir/Patient/1", obs).id == "1"
    assert resolver.resolve("Patient/1", obs).id == "1"
    # a target without meta.versionId cannot contradict the version asked for
    assert resolver.resolve("Observation/o/_history/9", obs) is obs


def test_relative_reference_prefers_the_context_server():
    bundle = {
        "resourceType": "Bundle", "type": "collection",
        "entry": [
            {"fullUrl": "http://a/fhir/Patient/1", "resource": {"resourceType": "Patient", "id": "1", "gender": "male"}},
            {"fullUrl": "http://b/fhir/Patient/1", "resource": {"resourceType": "Patient", "id": "1", "gender": "female"}},
            {"fullUrl": "http://b/fhir/Observation/o", "resource": {"resourceType": "Observation", "id": "o", "subject": {"reference": "Patient/1"}}},
        ],
    }
    parsed = parse_fhir(orjson.dumps(bundle), "b")
    resolver = ReferenceResolver(parsed)
    assert resolver.patient_of(parsed.by_type("Observation")[0]).resource["gender"] == "female"


# ------------------------------------------------------------------------------------ contained, identifier


def test_contained_medication_ch():
    parsed, resolver = load("CH_HL7CH_Examples_01.json")
    for statement in parsed.by_type("MedicationStatement"):
        ref = statement.resource["medicationReference"]["reference"]
        contained = resolver.resolve(ref, statement)
        assert isinstance(contained, dict) and contained["resourceType"] == "Medication"
        assert contained["id"] == ref[1:]
        assert resolver.medication_of(statement) is contained["code"]
        assert resolver.resolve_resource(ref, statement) is None
    statement = parsed.by_type("MedicationStatement")[0]
    assert resolver.resolve("#", statement) is statement
    assert resolver.resolve("#nope", statement) is None
    assert resolver.resolve("#med", None) is None


def test_contained_in_synthea_eob():
    path = next((DATA / "synthea").glob("Arla_Lang_*.json"))
    parsed = parse_fhir(path.read_bytes(), path.name)
    resolver = ReferenceResolver(parsed)
    eob = parsed.by_type("ExplanationOfBenefit")[0]
    refs = [c["id"] for c in eob.resource["contained"]]
    for local in refs:
        assert resolver.resolve("#" + local, eob)["id"] == local


def test_logical_reference_by_identifier():
    bundle = {
        "resourceType": "Bundle", "type": "collection",
        "entry": [
            {"fullUrl": "urn:uuid:p", "resource": {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.250.1.213.1.4.8", "value": "1234567890123"}]}},
            {"fullUrl": "urn:uuid:o", "resource": {"resourceType": "Observation", "subject": {"identifier": {"system": "urn:oid:1.2.250.1.213.1.4.8", "value": "1234567890123"}}}},
            {"fullUrl": "urn:uuid:o2", "resource": {"resourceType": "Observation", "subject": {"reference": "Patient/missing", "type": "Patient", "identifier": {"system": "urn:oid:1.2.250.1.213.1.4.8", "value": "1234567890123"}}}},
            {"fullUrl": "urn:uuid:o3", "resource": {"resourceType": "Observation", "subject": {"identifier": {"system": "other", "value": "1234567890123"}}}},
            {"fullUrl": "urn:uuid:o4", "resource": {"resourceType": "Observation", "subject": {"reference": "Patient?identifier=urn:oid:1.2.250.1.213.1.4.8|1234567890123"}}},
            {"fullUrl": "urn:uuid:o5", "resource": {"resourceType": "Observation", "subject": {"reference": "Patient?identifier=1234567890123"}}},
        ],
    }
    parsed = parse_fhir(orjson.dumps(bundle), "b")
    resolver = ReferenceResolver(parsed)
    patient = parsed.by_type("Patient")[0]
    o1, o2, o3, o4, o5 = parsed.by_type("Observation")
    assert resolver.patient_of(o1) is patient
    assert resolver.patient_of(o2) is patient  # dangling literal reference, identifier rescues it
    assert resolver.patient_of(o3) is None  # another system
    assert resolver.patient_of(o4) is patient  # conditional reference
    assert resolver.patient_of(o5) is patient  # conditional, any system
    assert resolver.by_identifier("urn:oid:1.2.250.1.213.1.4.8", "1234567890123", "Observation") is None


# ------------------------------------------------------------------------------------ patient_of, medication_of


def test_synthea_observation_to_patient():
    path = next((DATA / "synthea").glob("Arla_Lang_*.json"))
    parsed = parse_fhir(path.read_bytes(), path.name)
    resolver = ReferenceResolver(parsed)
    patient = parsed.by_type("Patient")[0]
    observations = parsed.by_type("Observation")
    assert len(observations) == 187
    assert all(resolver.patient_of(o) is patient for o in observations)
    assert resolver.patient_of(patient) is patient
    for request in parsed.by_type("MedicationRequest"):
        concept = resolver.medication_of(request)
        assert concept["coding"][0]["system"] == "http://www.nlm.nih.gov/research/umls/rxnorm"


@pytest.mark.parametrize("path", sorted((DATA / "ips").glob("*.json")), ids=lambda p: p.name[:40])
def test_every_ips_clinical_resource_finds_its_patient(path):
    parsed = parse_fhir(path.read_bytes(), path.name)
    resolver = ReferenceResolver(parsed)
    for rt in ("Observation", "Condition", "AllergyIntolerance", "MedicationStatement", "MedicationRequest", "Composition"):
        for res in parsed.by_type(rt):
            assert resolver.patient_of(res) is not None, res.label


def test_patient_of_dangling_and_non_patient():
    parsed, resolver = load("DE_no_info_with_Advance_Directive.json")
    consent = parsed.by_type("Consent")[0]
    assert consent.resource["patient"]["reference"] == "Patient/gecco-patient"
    assert resolver.patient_of(consent) is None  # dangling in the sample
    bundle = {
        "resourceType": "Bundle", "type": "collection",
        "entry": [
            {"fullUrl": "urn:uuid:g", "resource": {"resourceType": "Group", "id": "g"}},
            {"fullUrl": "urn:uuid:o", "resource": {"resourceType": "Observation", "subject": {"reference": "urn:uuid:g"}}},
            {"fullUrl": "urn:uuid:o2", "resource": {"resourceType": "Observation"}},
        ],
    }
    parsed = parse_fhir(orjson.dumps(bundle), "b")
    resolver = ReferenceResolver(parsed)
    assert [resolver.patient_of(o) for o in parsed.by_type("Observation")] == [None, None]


def test_medication_of_variants():
    bundle = {
        "resourceType": "Bundle", "type": "collection",
        "entry": [
            {"fullUrl": "urn:uuid:m", "resource": {"resourceType": "Medication", "code": {"text": "M"}}},
            {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "MedicationStatement", "medicationCodeableConcept": {"text": "CC"}}},
            {"fullUrl": "urn:uuid:2", "resource": {"resourceType": "MedicationStatement", "medicationReference": {"reference": "urn:uuid:m"}}},
            {"fullUrl": "urn:uuid:3", "resource": {"resourceType": "MedicationStatement", "medicationReference": {"reference": "urn:uuid:nope"}}},
            {"fullUrl": "urn:uuid:4", "resource": {"resourceType": "MedicationStatement"}},
            {"fullUrl": "urn:uuid:5", "resource": {"resourceType": "MedicationStatement", "medicationReference": {"reference": "urn:uuid:1"}}},
        ],
    }
    parsed = parse_fhir(orjson.dumps(bundle), "b")
    resolver = ReferenceResolver(parsed)
    got = [resolver.medication_of(s) for s in parsed.by_type("MedicationStatement")]
    assert got == [{"text": "CC"}, {"text": "M"}, None, None, None]


def test_resolve_junk_is_none():
    parsed, resolver = load("HL7-IPS-IG-bundle-minimal.json")
    ctx = parsed.resources[0]
    for junk in (None, "", 5, [], {}, {"reference": 5}, {"identifier": "x"}, "urn:uuid:nope", "not a reference", "Foo/1", "Patient?name=x"):
        assert resolver.resolve(junk, ctx) is None
