"""The compiled fast path for plain FHIRPath paths must agree with fhirpathpy on real data."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from esource.mapping.fhirpath import _fhirpathpy_selector, compile_selector, is_simple_path, top_level_elements
from esource.study.study import load_study

DATA = Path(__file__).resolve().parents[1] / "data"


def _resources():
    for f in sorted((DATA / "ips").glob("*.json"))[:10] + sorted((DATA / "synthea").glob("*.json"))[:2]:
        doc = orjson.loads(f.read_bytes())
        for e in doc.get("entry", []):
            r = e.get("resource")
            if isinstance(r, dict):
                yield r


def _norm(values: list) -> str:
    """fhirpathpy turns numbers into Decimal and dates into its own types: compare as JSON."""
    return json.dumps(values, default=lambda o: float(o) if isinstance(o, Decimal) else str(o), sort_keys=True)


def _simple_selectors():
    study = load_study("CV01")
    out = set()
    for form in study.spec.forms.values():
        for expr in form.select.values():
            for e in [expr] if isinstance(expr, str) else expr:
                if is_simple_path(e):
                    out.add((form.resource if hasattr(form, "resource") else form.resources[0], e))
    return sorted(out)


@pytest.mark.parametrize("rtype,expr", _simple_selectors())
def test_fast_path_agrees_with_fhirpathpy(rtype, expr):
    fast, slow = compile_selector(expr), _fhirpathpy_selector(expr)
    checked = 0
    for r in _resources():
        if r.get("resourceType") != rtype:
            continue
        assert _norm(fast(r)) == _norm(slow(r)), (expr, r.get("id"))
        checked += 1
    assert checked > 0


def test_general_expressions_go_to_fhirpathpy():
    sel = compile_selector("referenceRange.where(type.empty()).first()")
    r = {"resourceType": "Observation", "referenceRange": [{"type": {"text": "x"}, "low": {"value": 1}},
                                                             {"low": {"value": 2}}]}
    assert sel(r) == [{"low": {"value": 2}}]


def test_top_level_elements_are_conservative():
    assert top_level_elements("name.family") == {"name"}
    assert "name" in top_level_elements("identifier.where(system = 'x').exists() or name.exists()")


def test_invalid_expression_raises_value_error():
    with pytest.raises(ValueError, match="invalid FHIRPath"):
        compile_selector("code.where(")
