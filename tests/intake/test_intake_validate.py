"""Selective validation with fhir.resources R4B: element paths, short messages, restriction, memo."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from esource.intake import validate as V
from esource.intake.parse import parse_fhir
from esource.intake.validate import ValidationIssue, clear_validation_cache, validate_resource, validation_cache_info

DATA = Path(__file__).resolve().parents[1] / "data"
OBS_ELEMENTS = frozenset({"status", "code", "effectiveDateTime", "valueQuantity", "component", "referenceRange", "interpretation", "subject"})

BASE = {
    "resourceType": "Observation",
    "id": "bp-1",
    "status": "final",
    "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
    "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}], "text": "Systolic blood pressure"},
    "subject": {"reference": "urn:uuid:p"},
    "effectiveDateTime": "2024-05-10T08:30:00+02:00",
    "valueQuantity": {"value": 120, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"},
    "note": [{"text": "seated"}],
}


def obs(**changes):
    res = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is None:
            res.pop(key, None)
        else:
            res[key] = value
    return res


def synthea_observations():
    out = []
    for path in sorted((DATA / "synthea").glob("*.json")):
        out += [r.resource for r in parse_fhir(path.read_bytes(), path.name).by_type("Observation")]
    return out


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_validation_cache()
    yield
    clear_validation_cache()


@pytest.mark.parametrize("elements", [None, OBS_ELEMENTS], ids=["full", "restricted"])
def test_valid_observation(elements):
    assert validate_resource(obs(), elements=elements) == []


@pytest.mark.parametrize("elements", [None, OBS_ELEMENTS], ids=["full", "restricted"])
@pytest.mark.parametrize(
    ("changes", "element", "message"),
    [
        ({"valueQuantity": {"value": "abc", "unit": "mmHg"}}, "Observation.valueQuantity.value", "value is not a decimal: 'abc'"),
        ({"status": "bogus"}, "Observation.status", "code 'bogus' is not in the required value set"),
        ({"effectiveDateTime": "2020-13-45"}, "Observation.effectiveDateTime", "value is not a dateTime: '2020-13-45'"),
        ({"effectiveDateTime": "2020-02-30"}, "Observation.effectiveDateTime", "'2020-02-30'"),
        ({"status": None}, "Observation.status", "required element is missing"),
        ({"code": None}, "Observation.code", "required element is missing"),
        ({"code": [{"text": "x"}]}, "Observation.code", "expected an object, got an array"),
        ({"subject": "Patient/1"}, "Observation.subject", "expected an object, got a string"),
        ({"interpretation": {"text": "H"}}, "Observation.interpretation", "expected an array, got an object"),
        ({"valueString": "120"}, "Observation.value[x]", "more than one choice given: valueQuantity, valueString"),
        ({"valueQuantity": {"value": 5, "comparator": "~"}}, "Observation.valueQuantity.comparator", "code '~' is not in the required value set"),
        ({"valueQuantity": {"value": 5, "unit": "mmHg", "foo": 1}}, "Observation.valueQuantity.foo", "unknown element"),
        (
            {"component": [{"code": {"text": "a"}}, {"code": {"text": "b"}, "valueQuantity": {"value": "1,5"}}]},
            "Observation.component[1].valueQuantity.value",
            "value is not a decimal: '1,5'",
        ),
        ({"referenceRange": [{"low": {"value": "x"}}]}, "Observation.referenceRange[0].low.value", "value is not a decimal: 'x'"),
        ({"id": "bad id!"}, "Observation.id", "invalid format"),
        ({"component": [None]}, "Observation.component", "null is not allowed"),
    ],
)
def test_invalid_observation_element_paths(elements, changes, element, message):
    issues = validate_resource(obs(**changes), elements=elements)
    assert any(i.element == element and message in i.message for i in issues), issues
    for issue in issues:
        assert "\n" not in issue.message and len(issue.message) < 200


def test_restriction_ignores_what_the_study_does_not_read():
    bad_note = obs(note=[{"text": 5}], foo=1)
    full = validate_resource(bad_note)
    assert {i.element for i in full} >= {"Observation.note[0].text"}
    assert validate_resource(bad_note, elements=OBS_ELEMENTS) == []


def test_restriction_keeps_required_elements():
    # status and code are required: even when the map does not list them they are validated, and a
    # resource restricted to other elements does not fail for their absence in the copy
    assert validate_resource(obs(), elements={"valueQuantity"}) == []
    assert [i.element for i in validate_resource(obs(code=None), elements={"valueQuantity"})] == ["Observation.code"]
    statement = {"resourceType": "MedicationStatement", "status": "active", "medicationCodeableConcept": {"text": "x"}, "subject": {"reference": "P/1"}}
    assert validate_resource(statement, elements={"effectivePeriod"}) == []
    del statement["medicationCodeableConcept"]
    assert validate_resource(statement, elements={"effectivePeriod"}) == [
        ValidationIssue("MedicationStatement.medication[x]", "required element is missing")
    ]


def test_choice_element_names():
    two = obs(valueString="x")
    assert validate_resource(two, elements={"value[x]"})
    assert validate_resource(two, elements={"valueQuantity"})  # a member brings its whole group
    assert validate_resource(obs(), elements={"value[x]", "effective[x]"}) == []


def test_element_names_may_be_paths():
    bad = obs(valueQuantity={"value": "abc"})
    for elements in ({"valueQuantity.value"}, {"Observation.valueQuantity"}, {"value[x]"}, {"component[0].code", "valueQuantity.unit"}):
        assert [i.element for i in validate_resource(bad, elements=elements)] == ["Observation.valueQuantity.value"], elements
    assert validate_resource(bad, elements={"effectiveDateTime"}) == []


def test_primitive_extension_satisfies_required_status():
    res = obs(status=None, _status={"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}]})
    assert validate_resource(res) == []
    assert validate_resource(res, elements=OBS_ELEMENTS) == []


def test_other_resource_types():
    patient = {"resourceType": "Patient", "gender": "xx", "birthDate": "1970-1-1"}
    issues = {i.element: i.message for i in validate_resource(patient, elements={"gender", "birthDate"})}
    assert issues["Patient.birthDate"] == "value is not a date: '1970-1-1'"
    assert "code 'xx'" in issues["Patient.gender"]
    assert validate_resource({"resourceType": "Nope"}) == [ValidationIssue("resourceType", "'Nope' is not a FHIR R4 resource type")]
    assert validate_resource({"id": "x"})[0].message == "resource has no resourceType"
    assert validate_resource([]) == [ValidationIssue("resource", "resource is not a JSON object")]  # type: ignore[arg-type]


def test_valid_synthea_observations_pass():
    observations = synthea_observations()
    assert len(observations) == 669
    for res in observations:
        assert validate_resource(res, elements=OBS_ELEMENTS) == [], res["id"]
    for res in observations[:150]:
        assert validate_resource(res) == [], res["id"]


def test_restricted_agrees_with_the_model_on_sample_data():
    """The element-wise path (restricted) and the fhir.resources model (full) agree on every sample
    resource of the types a study reads, when the restriction keeps every element."""
    for folder in ("ips", "synthea"):
        for path in sorted((DATA / folder).glob("*.json"))[:4]:
            for res in parse_fhir(path.read_bytes(), path.name).resources:
                if res.resource_type not in {"Observation", "Condition", "AllergyIntolerance", "MedicationStatement", "MedicationRequest", "Medication", "Patient"}:
                    continue
                everything = frozenset(res.resource)
                full = {i.element for i in validate_resource(res.resource)}
                restricted = {i.element for i in validate_resource(res.resource, elements=everything)}
                assert full == restricted, res.label


def test_known_invalid_sample_resource():
    """HK: MedicationStatement.dosage[0].doseAndRate[0].rate is not an R4 element (rate[x] is)."""
    parsed = parse_fhir((DATA / "ips" / "HK_IPS_Sample_with_medication.json").read_bytes(), "hk")
    statement = parsed.by_type("MedicationStatement")[0]
    assert validate_resource(statement.resource, elements={"status", "dosage"}) == [
        ValidationIssue("MedicationStatement.dosage[0].doseAndRate[0].rate", "unknown element")
    ]
    assert validate_resource(statement.resource, elements={"status", "medicationCodeableConcept", "effectivePeriod"}) == []


def test_memoization():
    res = obs(valueQuantity={"value": "abc"})
    first = validate_resource(res, elements=OBS_ELEMENTS)
    info = validation_cache_info()
    assert info["misses"] == 1 and info["size"] == 1
    second = validate_resource(copy.deepcopy(res), elements=OBS_ELEMENTS)
    assert second == first
    assert validation_cache_info()["hits"] == 1
    second.clear()  # callers get their own list
    assert validate_resource(res, elements=OBS_ELEMENTS) == first
    # element-level memo: another Observation with the same code and subject re-uses them
    validate_resource(obs(valueQuantity={"value": 121, "unit": "mmHg"}), elements=OBS_ELEMENTS)
    assert validation_cache_info()["element_hits"] >= 3
    clear_validation_cache()
    assert validation_cache_info()["size"] == 0


def test_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(V._RESULTS, "size", 10)
    for i in range(30):
        validate_resource(obs(id=f"o{i}"), elements={"status"})
    assert validation_cache_info()["size"] == 10


def test_non_json_values_are_validated_without_memo():
    import decimal

    res = obs(valueQuantity={"value": decimal.Decimal("1.5"), "unit": "mmHg"})
    assert validate_resource(res, elements=OBS_ELEMENTS) == []
    assert validation_cache_info()["size"] == 0


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(["value", "code", "text", "coding", "system", "reference", "x"]), children, max_size=3),
    max_leaves=12,
)


@given(st.dictionaries(st.sampled_from(sorted(OBS_ELEMENTS | {"id", "note", "_status", "valueString", "meta"})), _json, max_size=6))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_observations_never_raise(body):
    res = {"resourceType": "Observation", **body}
    for elements in (None, OBS_ELEMENTS):
        issues = validate_resource(res, elements=elements)
        assert all(isinstance(i, ValidationIssue) and i.element.startswith(("Observation", "resource")) for i in issues)
