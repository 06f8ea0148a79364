"""parse_fhir: sample data parses cleanly, fatal inputs raise one-line IntakeErrors, entry problems are
collected while the rest parses."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esource.errors import IntakeError
from esource.intake.parse import R4_RESOURCE_TYPES, json_depth, parse_fhir

DATA = Path(__file__).resolve().parents[1] / "data"
IPS_FILES = sorted((DATA / "ips").glob("*.json"))
SYNTHEA_FILES = sorted((DATA / "synthea").glob("*.json"))
ARLA = next(p for p in SYNTHEA_FILES if p.name.startswith("Arla_Lang_"))


def parse_file(path: Path):
    return parse_fhir(path.read_bytes(), path.name)


def dumps(obj) -> bytes:
    return orjson.dumps(obj)


# ------------------------------------------------------------------------------------ sample data


def test_sample_data_is_present():
    assert len(IPS_FILES) == 20
    assert len(SYNTHEA_FILES) == 8


@pytest.mark.parametrize("path", IPS_FILES + SYNTHEA_FILES, ids=lambda p: p.name[:40])
def test_every_sample_parses_with_zero_problems(path: Path):
    parsed = parse_file(path)
    assert parsed.problems == []
    assert parsed.deletions == []
    raw = orjson.loads(path.read_bytes())
    assert len(parsed.resources) == len(raw["entry"])
    assert parsed.bundle_type == raw["type"]
    for i, res in enumerate(parsed.resources):
        assert res.index == i
        assert res.origin == path.name
        assert res.resource is raw["entry"][i]["resource"] or res.resource == raw["entry"][i]["resource"]
        assert res.full_url == raw["entry"][i].get("fullUrl")
        assert res.ref.resource_type == res.resource_type
        assert res.ref.version


@pytest.mark.parametrize(
    ("name", "bundle_type", "counts"),
    [
        (
            "CH_HL7CH_Examples_01.json",
            "document",
            {"Composition": 1, "Patient": 1, "Practitioner": 1, "Organization": 1, "Condition": 2,
             "MedicationStatement": 2, "AllergyIntolerance": 1, "Immunization": 1},
        ),
        (
            "DK_Jens_Villadsen_01.json",
            "document",
            {"Composition": 1, "Patient": 1, "Practitioner": 1, "AllergyIntolerance": 1, "Condition": 3,
             "MedicationStatement": 3, "Medication": 3},
        ),
        (
            "US_MEDITECH_ips_1.json",
            "searchset",
            {"Composition": 1, "AllergyIntolerance": 1, "Condition": 3, "DiagnosticReport": 7, "Immunization": 11,
             "MedicationRequest": 3, "MedicationStatement": 1, "Patient": 1, "Procedure": 26, "Medication": 2,
             "Practitioner": 2, "Organization": 2},
        ),
        (
            "UK_NHSx_IPS_Example_01-modified.json",
            "document",
            {"Composition": 1, "Patient": 1, "Practitioner": 1, "Organization": 1, "Condition": 4,
             "MedicationStatement": 2, "Medication": 2, "MedicationRequest": 2, "AllergyIntolerance": 1, "Encounter": 1},
        ),
    ],
)
def test_ips_counts_by_type(name, bundle_type, counts):
    parsed = parse_file(DATA / "ips" / name)
    assert parsed.bundle_type == bundle_type
    assert parsed.types() == counts
    for rt, n in counts.items():
        assert len(parsed.by_type(rt)) == n


def test_synthea_arla_lang_counts():
    parsed = parse_file(ARLA)
    assert parsed.bundle_type == "transaction"
    assert parsed.types() == {
        "Patient": 1, "Organization": 2, "Practitioner": 2, "Encounter": 21, "Condition": 10, "Claim": 27,
        "ExplanationOfBenefit": 21, "Goal": 5, "CarePlan": 3, "MedicationRequest": 6, "Observation": 187,
        "Procedure": 8, "Immunization": 11, "DiagnosticReport": 15,
    }
    patient = parsed.by_type("Patient")[0]
    assert patient.id == "190524df-4de5-4c01-8560-8b41e23c3b84"
    assert patient.full_url == "urn:uuid:190524df-4de5-4c01-8560-8b41e23c3b84"


def test_single_resource():
    obs = {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"}}
    parsed = parse_fhir(dumps(obs), "msg-1")
    assert parsed.bundle_type is None
    assert parsed.problems == [] and parsed.deletions == []
    [res] = parsed.resources
    assert res.index == -1 and res.full_url is None and res.id == "o1"
    assert res.resource == obs
    assert res.label == "Observation/o1"


def test_bom_is_tolerated():
    data = b"\xef\xbb\xbf" + dumps({"resourceType": "Patient", "id": "p"})
    assert parse_fhir(data, "bom.json").resources[0].id == "p"


def test_accepts_str_and_memoryview():
    data = dumps({"resourceType": "Patient", "id": "p"})
    assert parse_fhir(data.decode(), "s").resources[0].id == "p"
    assert parse_fhir(memoryview(data), "m").resources[0].id == "p"


@pytest.mark.parametrize(
    "btype",
    ["document", "transaction", "transaction-response", "collection", "searchset", "batch", "history", "message"],
)
def test_bundle_types_accepted(btype):
    bundle = {
        "resourceType": "Bundle",
        "type": btype,
        "entry": [{"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Patient", "id": "p"}}],
    }
    parsed = parse_fhir(dumps(bundle), "b")
    assert parsed.bundle_type == btype
    assert parsed.problems == []
    assert [r.resource_type for r in parsed.resources] == ["Patient"]


def test_empty_bundle_and_bundle_without_entry():
    assert parse_fhir(dumps({"resourceType": "Bundle", "type": "collection"}), "b").resources == []
    assert parse_fhir(dumps({"resourceType": "Bundle", "type": "collection", "entry": []}), "b").resources == []


def test_unknown_or_missing_bundle_type_is_a_problem_not_fatal():
    parsed = parse_fhir(dumps({"resourceType": "Bundle", "type": "weird", "entry": []}), "b")
    assert [p.element for p in parsed.problems] == ["type"]
    parsed = parse_fhir(dumps({"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Patient"}}]}), "b")
    assert [p.element for p in parsed.problems] == ["type"]
    assert len(parsed.resources) == 1


# ------------------------------------------------------------------------------------ message, nested, DELETE


def test_message_bundle_with_nested_document_is_flattened():
    document = {
        "resourceType": "Bundle",
        "type": "document",
        "entry": [
            {"fullUrl": "urn:uuid:c", "resource": {"resourceType": "Composition", "id": "c"}},
            {"fullUrl": "urn:uuid:p", "resource": {"resourceType": "Patient", "id": "p"}},
            {"fullUrl": "urn:uuid:o", "resource": {"resourceType": "Observation", "id": "o"}},
        ],
    }
    message = {
        "resourceType": "Bundle",
        "type": "message",
        "entry": [
            {"fullUrl": "urn:uuid:mh", "resource": {"resourceType": "MessageHeader", "id": "mh", "focus": [{"reference": "urn:uuid:doc"}]}},
            {"fullUrl": "urn:uuid:doc", "resource": document},
            {"fullUrl": "urn:uuid:x", "resource": {"resourceType": "Observation", "id": "after"}},
        ],
    }
    parsed = parse_fhir(dumps(message), "mq-42")
    assert parsed.bundle_type == "message"
    assert parsed.problems == []
    assert [(r.resource_type, r.id, r.index) for r in parsed.resources] == [
        ("MessageHeader", "mh", 0),
        ("Composition", "c", 1),
        ("Patient", "p", 1),
        ("Observation", "o", 1),
        ("Observation", "after", 2),
    ]
    assert parsed.resources[2].full_url == "urn:uuid:p"
    assert parsed.by_type("Bundle") == []


def test_deeply_nested_bundles_are_flattened_without_recursion():
    inner: dict = {"resourceType": "Patient", "id": "deep"}
    for _ in range(20):
        inner = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": inner}]}
    parsed = parse_fhir(dumps(inner), "nested", max_depth=200)
    assert [(r.id, r.index) for r in parsed.resources] == [("deep", 0)]


def test_nested_bundle_entry_problems_have_a_path_label():
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"resource": {"resourceType": "Patient", "id": "p"}},
            {"resource": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": 5}, {"resource": {"resourceType": "Observation"}}]}},
        ],
    }
    parsed = parse_fhir(dumps(bundle), "b")
    [problem] = parsed.problems
    assert problem.index == 1
    assert problem.resource_label == "Bundle.entry[1].resource.entry[0]"
    assert [r.resource_type for r in parsed.resources] == ["Patient", "Observation"]


def test_nested_bundle_with_bad_entry_is_a_problem():
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": {"resourceType": "Bundle", "entry": {"oops": 1}}}, {"resource": {"resourceType": "Patient"}}],
    }
    parsed = parse_fhir(dumps(bundle), "b")
    assert len(parsed.problems) == 1 and "expected an array" in parsed.problems[0].message
    assert [r.resource_type for r in parsed.resources] == ["Patient"]


def test_transaction_delete_entries_are_deletions():
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Observation", "id": "1"}, "request": {"method": "PUT", "url": "Observation/1"}},
            {"request": {"method": "DELETE", "url": "Observation/123"}},
            {"request": {"method": "DELETE", "url": "Condition?identifier=http://x|9"}},
            {"request": {"method": "DELETE"}},
        ],
    }
    parsed = parse_fhir(dumps(bundle), "tx")
    assert parsed.deletions == ["Observation/123", "Condition?identifier=http://x|9"]
    assert [r.id for r in parsed.resources] == ["1"]
    assert [(p.index, p.element) for p in parsed.problems] == [(3, "request.url")]


def test_history_bundle_delete():
    bundle = {
        "resourceType": "Bundle",
        "type": "history",
        "entry": [
            {"fullUrl": "http://s/fhir/Observation/9", "resource": {"resourceType": "Observation", "id": "9", "meta": {"versionId": "2"}},
             "request": {"method": "PUT", "url": "Observation/9"}},
            {"fullUrl": "http://s/fhir/Observation/8", "request": {"method": "DELETE", "url": "Observation/8"}, "response": {"status": "204"}},
        ],
    }
    parsed = parse_fhir(dumps(bundle), "h")
    assert parsed.deletions == ["Observation/8"]
    assert parsed.problems == []
    assert parsed.resources[0].ref.version == "2"


def test_transaction_response_entries_without_resource_are_normal():
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": [{"response": {"status": "201 Created", "location": "Observation/1/_history/1"}}],
    }
    parsed = parse_fhir(dumps(bundle), "r")
    assert parsed.problems == [] and parsed.resources == []


# ------------------------------------------------------------------------------------ non-fatal entry problems


def test_entry_problems_are_collected_and_the_rest_parses():
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": "urn:uuid:a", "resource": {"resourceType": "Patient", "id": "a"}},
            {"fullUrl": "urn:uuid:b"},  # no resource
            {"resource": ["not", "an", "object"]},
            {"resource": {"id": "no-type"}},
            {"resource": {"resourceType": 7}},
            {"resource": {"resourceType": "NotAType"}},
            "not an entry",
            {"resource": None},
            {"fullUrl": 12, "resource": {"resourceType": "Observation", "id": "o"}},
            {"resource": {"resourceType": "Observation", "id": "last"}},
        ],
    }
    parsed = parse_fhir(dumps(bundle), "mixed.json")
    assert [r.id for r in parsed.resources] == ["a", "o", "last"]
    assert [r.index for r in parsed.resources] == [0, 8, 9]
    got = [(p.index, p.element) for p in parsed.problems]
    assert got == [
        (1, "resource"),
        (2, "resource"),
        (3, "resource.resourceType"),
        (4, "resource.resourceType"),
        (5, "resource.resourceType"),
        (6, None),
        (7, "resource"),
        (8, "fullUrl"),
    ]
    for p in parsed.problems:
        assert p.origin == "mixed.json"
        assert p.resource_label == f"Bundle.entry[{p.index}]"
        assert "mixed.json" in str(p) and "\n" not in str(p)
    assert "NotAType" in parsed.problems[4].message
    assert parsed.resources[1].full_url is None


# ------------------------------------------------------------------------------------ fatal inputs


def _fatal(data, origin="bad-input.json", **kw) -> IntakeError:
    with pytest.raises(IntakeError) as info:
        parse_fhir(data, origin, **kw)
    err = info.value
    assert err.origin == origin
    text = str(err)
    assert text.startswith(origin)
    assert "\n" not in text and "Traceback" not in text
    return err


def test_not_utf8_names_the_byte_offset():
    data = b'{"resourceType": "Patient", "name": [{"text": "caf\xe9"}]}'
    err = _fatal(data)
    offset = data.index(b"\xe9")
    assert "not valid UTF-8" in err.problem
    assert f"byte offset {offset}" in err.problem


def test_not_utf8_offset_counts_the_bom():
    data = b'\xef\xbb\xbf{"a": "\xff"}'
    err = _fatal(data)
    offset = data.index(b"\xff")
    assert f"byte offset {offset}" in err.problem


def test_not_json_gives_orjson_message_with_position():
    err = _fatal(b'{"resourceType": "Patient",}')
    assert err.problem.startswith("not valid JSON:")
    assert "line 1 column" in err.problem


def test_empty_input():
    assert "empty" in _fatal(b"").problem
    assert "empty" in _fatal(b"   \n").problem


@pytest.mark.parametrize(
    ("data", "word"),
    [(b"[]", "an array"), (b'[{"resourceType": "Patient"}]', "an array"), (b'"Patient"', "a string"), (b"42", "a number"), (b"null", "null")],
)
def test_top_level_not_an_object(data, word):
    err = _fatal(data)
    assert f"top level is {word}" in err.problem


def test_no_resource_type():
    assert "no resourceType" in _fatal(dumps({"id": "x"})).problem


def test_resource_type_not_a_string():
    assert "resourceType is a number" in _fatal(dumps({"resourceType": 3})).problem


@pytest.mark.parametrize("rt", ["Patients", "patient", "FooBar", "DomainResource", "Resource", "", "SubscriptionTopic"])
def test_unknown_resource_type(rt):
    err = _fatal(dumps({"resourceType": rt}))
    assert "is not a FHIR R4 resource type" in err.problem
    assert repr(rt) in err.problem


def test_too_deep():
    deep: dict = {"resourceType": "Patient", "extension": []}
    node = deep
    for _ in range(100):
        child: dict = {"url": "http://x", "extension": []}
        node["extension"].append(child)
        node = child
    err = _fatal(dumps(deep))
    assert "nested deeper than the limit of 64 levels" in err.problem
    # a larger limit accepts it
    assert parse_fhir(dumps(deep), "x", max_depth=500).resources[0].resource_type == "Patient"


def test_beyond_orjson_depth_is_reported_as_too_deep():
    data = b'{"resourceType": "Patient", "a": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    assert "nested deeper" in _fatal(data).problem


def test_too_big():
    data = dumps({"resourceType": "Patient", "text": {"div": "x" * 5000}})
    err = _fatal(data, max_bytes=1000)
    assert err.problem == f"payload of {len(data)} bytes exceeds the limit of 1000 bytes"


@pytest.mark.parametrize("entry", [{}, "x", 5, None, True])
def test_bundle_entry_not_a_list(entry):
    err = _fatal(dumps({"resourceType": "Bundle", "type": "collection", "entry": entry}))
    assert "Bundle.entry is" in err.problem and "expected an array" in err.problem


def test_non_bytes_input():
    assert "expected bytes" in _fatal(12345).problem


# ------------------------------------------------------------------------------------ depth function


def _structural_depth(value) -> int:
    depth = 0
    level = [value]
    while True:
        level = [v for v in level if isinstance(v, (dict, list))]
        if not level:
            return depth
        depth += 1
        nxt = []
        for v in level:
            nxt.extend(v.values() if isinstance(v, dict) else v)
        level = nxt


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.sampled_from('ab"\\[]{}/\u00e9\u20ac\n'), max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(alphabet='ab"\\[{', max_size=4), children, max_size=4),
    max_leaves=30,
)


@given(json_values)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_json_depth_matches_structure(value):
    data = orjson.dumps(value)
    assert json_depth(data) == _structural_depth(value)
    assert json_depth(orjson.dumps(value, option=orjson.OPT_INDENT_2)) == _structural_depth(value)


def test_json_depth_examples():
    assert json_depth(b"1") == 0
    assert json_depth(b"{}") == 1
    assert json_depth(rb'{"a": "[[[\"[[", "b": [[1]]}') == 3
    assert json_depth(rb'["\\\\", ["\u005c"]]') == 2
    assert json_depth(b"[" * 100 + b"]" * 100, limit=10) == 11


# ------------------------------------------------------------------------------------ robustness


@given(json_values)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_random_json_never_raises_anything_but_intake_error(value):
    try:
        parse_fhir(orjson.dumps(value), "random")
    except IntakeError:
        pass


resource_like = st.fixed_dictionaries(
    {"resourceType": st.sampled_from(["Bundle", "Patient", "Observation", "Nope", 3, None])},
    optional={
        "type": st.sampled_from(["document", "message", "transaction", 5, None]),
        "entry": st.lists(
            st.one_of(
                json_values,
                st.fixed_dictionaries(
                    {},
                    optional={
                        "fullUrl": st.one_of(st.text(max_size=10), st.integers(-(2**63), 2**63 - 1)),
                        "resource": st.one_of(json_values, st.fixed_dictionaries({"resourceType": st.sampled_from(["Patient", "Bundle", "X", 1])}, optional={"entry": json_values, "id": json_values, "identifier": json_values, "meta": json_values})),
                        "request": st.one_of(json_values, st.fixed_dictionaries({"method": st.sampled_from(["DELETE", "POST", 1]), "url": json_values})),
                    },
                ),
            ),
            max_size=6,
        ) | json_values,
        "id": json_values,
        "identifier": json_values,
    },
)


@given(resource_like)
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_random_fhir_like_input_never_raises_anything_but_intake_error(value):
    try:
        parsed = parse_fhir(orjson.dumps(value), "random")
    except IntakeError:
        return
    for res in parsed.resources:
        assert res.resource_type in R4_RESOURCE_TYPES
        assert res.ref.identity and res.ref.version


@given(st.binary(max_size=200))
@settings(max_examples=300)
def test_random_bytes_never_raise_anything_but_intake_error(data):
    try:
        parse_fhir(data, "bytes")
    except IntakeError:
        pass
