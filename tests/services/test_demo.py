"""`esource demo` (the README's first command) runs the main job end to end on embedded defaults."""

from __future__ import annotations

from lxml import etree

from esource.services.demo import run_demo


def test_demo_delivers_everything_to_the_sandbox_edc(tmp_path):
    s = run_demo(tmp_path / "demo", serve=False, port=0, quiet=True)
    assert s.subjects == 4 and s.files == 13 and not s.dead_letters
    assert s.transactions == s.delivered == len(s.odm_files) and s.transactions >= 10
    assert not s.odm_invalid
    assert s.edc_items == sum(s.items_by_form.values()) > 400
    assert set(s.items_by_form) == {"F.DM", "F.VS", "F.LB", "F.MH", "F.CM"}
    assert s.dropped_not_enrolled > 0  # the sample bundle of a patient who is not enrolled
    assert {"ambiguous_data", "comparator_value", "entered_in_error", "out_of_range",
            "possible_adverse_event"} <= set(s.discrepancies_by_kind)
    # an Update with a ReasonForChange was delivered (the amended baseline weight)
    reasons = [r.text for f in s.odm_files for r in etree.parse(str(f)).iter("{http://www.cdisc.org/ns/odm/v1.3}ReasonForChange")]
    assert any("78.4 -> 78.9" in r for r in reasons)
