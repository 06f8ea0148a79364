"""Pure parts of the dashboard: session signing, the subject grid's cell states, expected eCRF cells
(coverage), chart scales and rule grouping."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import pytest

from esource.domain.model import Discrepancy, DiscrepancyKind, Enrollment, ItemKey

# ---------------------------------------------------------------- sessions


def test_signed_payloads_resist_tampering_other_purposes_other_keys_and_age() -> None:
    from esource.web.session import Signer

    signer = Signer(b"k" * 32)
    token = signer.dumps("session", {"u": "alice", "iat": 1_000_000, "csrf": "x"})
    assert signer.loads("session", token, max_age=60, now=1_000_030) == {"u": "alice", "iat": 1_000_000, "csrf": "x"}
    assert signer.loads("session", token, max_age=60, now=1_000_061) is None  # too old
    assert signer.loads("session", token, max_age=60, now=999_000) is None  # from the future
    assert signer.loads("login", token, max_age=60, now=1_000_030) is None  # another kind of cookie
    assert Signer(b"j" * 32).loads("session", token, max_age=60, now=1_000_030) is None  # another key
    body, mac = token.split(".")
    assert signer.loads("session", body[:-2] + "AA." + mac, max_age=60, now=1_000_030) is None
    for junk in ("", "a.b.c", "no-dot", "x" * 5000, None):
        assert signer.loads("session", junk, max_age=60) is None


def test_the_session_key_is_derived_from_the_auth_secret_and_public_only_in_demo_mode() -> None:
    from pydantic import SecretStr

    from esource.web.session import DEMO_SESSION_KEY, session_key

    @dataclass
    class S:
        mode: str
        auth_secret: Any

    @dataclass
    class C:
        settings: S

    secret = "s" * 40
    key = session_key(C(S("production", SecretStr(secret))))
    assert key != secret.encode() and len(key) == 32 and key != DEMO_SESSION_KEY
    assert session_key(C(S("demo", None))) == DEMO_SESSION_KEY
    with pytest.raises(ValueError):
        session_key(C(S("production", None)))


# ---------------------------------------------------------------- the grid


@dataclass
class FakeItem:
    key: ItemKey
    transfer_status: str | None
    value: str = "1"
    frozen: bool = False


@dataclass
class FakeRecord:
    discrepancy: Discrepancy
    id: int = 1
    status: str = "open"


def key(event: str, form: str, item: str, igrk: str | None = None, erk: str | None = None) -> ItemKey:
    group = {"F.VS": "IG.VS", "F.DM": "IG.DM", "F.LB": "IG.LB", "F.MH": "IG.MH", "F.CM": "IG.CM"}[form]
    return ItemKey("CV01", "001-0001", event, erk, form, group, igrk, item)


@pytest.fixture(scope="module")
def study() -> Any:
    from esource.study.study import load_study

    return load_study("CV01")


def test_a_cell_takes_its_most_urgent_state_and_counts_every_state(study: Any) -> None:
    from esource.web.grid import build_grid

    items = [FakeItem(key("SE.WEEK4", "F.VS", "IT.VS.VSORRES", "HR"), "acked"),
             FakeItem(key("SE.WEEK4", "F.VS", "IT.VS.VSORRES", "SYSBP"), "pending"),
             FakeItem(key("SE.BASELINE", "F.VS", "IT.VS.VSORRES", "HR"), "rejected"),
             FakeItem(key("SE.BASELINE", "F.LB", "IT.LB.LBORRES", "GLUC"), "acked"),
             FakeItem(key("SE.UNSCHED", "F.VS", "IT.VS.VSORRES", "HR", erk="2024-05-02"), "acked")]
    conflict = Discrepancy(DiscrepancyKind.EDC_CONFLICT, "site changed it", "CV01", "001-0001",
                           study_event_oid="SE.BASELINE", form_oid="F.LB", item_oid="IT.LB.LBORRES",
                           candidates=({"item": "SE.BASELINE/F.LB/IG.LB[GLUC]/IT.LB.LBORRES"},))
    held = Discrepancy(DiscrepancyKind.OUT_OF_RANGE, "too high", "CV01", "001-0001", study_event_oid="SE.WEEK4",
                       form_oid="F.VS", item_oid="IT.VS.VSORRES", item_group_repeat_key="TEMP", held_value="45.0")
    grid = build_grid(study, items, [FakeRecord(conflict), FakeRecord(held, id=2)])
    cells = {(c.event_oid, c.event_repeat_key, c.form_oid): c for row in grid.rows for c in row.cells}
    week4 = cells[("SE.WEEK4", None, "F.VS")]
    assert week4.state == "held" and week4.counts == {"filled": 1, "pending": 1, "held": 1}
    assert cells[("SE.BASELINE", None, "F.VS")].state == "rejected"
    assert cells[("SE.BASELINE", None, "F.LB")].state == "conflict"  # the conflict names its item path
    assert cells[("SE.UNSCHED", "2024-05-02", "F.VS")].state == "filled"  # one row per unscheduled date
    assert cells[("SE.SCREEN", None, "F.VS")].state == "empty"
    assert cells[("SE.WEEK4", None, "F.LB")].state == "na"  # week 4 collects no labs
    assert grid.forms == list(study.spec.forms)


def test_a_cell_detail_is_a_table_of_repeats_by_items_in_metadata_order(study: Any) -> None:
    from esource.web.grid import cell_detail

    items = [FakeItem(key("SE.WEEK4", "F.VS", item, test), "acked", value=v)
             for test in ("SYSBP", "HR") for item, v in (("IT.VS.VSORRES", "120"), ("IT.VS.VSTESTCD", test))]
    detail = cell_detail(study, items, [], "SE.WEEK4", None, "F.VS")
    assert detail.item_group_oid == "IG.VS"
    assert detail.columns == ["IT.VS.VSTESTCD", "IT.VS.VSORRES"]  # as the ItemGroupDef orders them
    assert [r.repeat_key for r in detail.rows] == ["HR", "SYSBP"]
    assert detail.rows[0].values["IT.VS.VSTESTCD"].value == "HR"


# ---------------------------------------------------------------- coverage


def test_expected_cells_follow_the_map_the_visit_windows_and_the_withdrawal(study: Any) -> None:
    from esource.web.queries import expected_cells

    e = Enrollment("CV01", "001-0001", "SITE.001", (), dt.date(2024, 4, 4), dt.date(2024, 5, 2))
    vs_tests, lb_tests = len(study.spec.forms["F.VS"].tests), len(study.spec.forms["F.LB"].tests)
    dm = len(study.spec.forms["F.DM"].items)

    def count(today: dt.date, enrollment: Enrollment = e) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for _s, event, form, _g, _i in expected_cells(study, enrollment, today):
            out[(event, form)] = out.get((event, form), 0) + 1
        return out

    before = count(dt.date(2024, 4, 10))  # screening window open, Day 1 not reached
    assert before == {("SE.SCREEN", "F.DM"): dm, ("SE.SCREEN", "F.VS"): vs_tests, ("SE.SCREEN", "F.LB"): lb_tests}
    week4 = count(dt.date(2024, 5, 2) + dt.timedelta(days=26))  # study day 27: the week 4 window is open
    assert week4[("SE.WEEK4", "F.VS")] == vs_tests and ("SE.WEEK12", "F.VS") not in week4
    assert ("SE.WEEK4", "F.LB") not in week4  # week 4 collects no labs
    withdrawn = Enrollment("CV01", "001-0001", "SITE.001", (), dt.date(2024, 4, 4), dt.date(2024, 5, 2),
                           withdrawal_date=dt.date(2024, 5, 10))
    late = count(dt.date(2025, 1, 1), withdrawn)  # windows opening after the withdrawal are not expected
    assert ("SE.BASELINE", "F.VS") in late and ("SE.WEEK4", "F.VS") not in late
    assert not any(form in ("F.MH", "F.CM") for _e, form in late)  # logs: no expected count
    cells = expected_cells(study, e, dt.date(2024, 4, 10))
    assert ("001-0001", "SE.SCREEN", "F.VS", "SYSBP", "IT.VS.VSORRES") in cells


# ---------------------------------------------------------------- charts and rules


@pytest.mark.parametrize(("value", "scale"), [(0, (1, 1)), (1, (1, 1)), (3, (3, 1)), (7, (8, 2)), (10, (10, 2)),
                                              (23, (25, 5)), (480, (500, 100)), (1234, (1500, 500))])
def test_chart_axes_have_whole_round_ticks(value: int, scale: tuple[int, int]) -> None:
    from esource.web.charts import grouped_bars, nice_scale

    assert nice_scale(value) == scale
    chart = grouped_bars(["a", "b"], ["x", "y"], [[value, 0], [0, 0]])
    assert [t.value for t in chart.ticks] == list(range(0, scale[0] + 1, scale[1]))
    tallest = max(b.height for b in chart.bars)
    assert value == 0 or tallest <= chart.plot_bottom - chart.plot_top + 0.1


def test_rules_group_at_the_level_the_map_names_them() -> None:
    from esource.web.queries import rule_group

    assert rule_group("F.VS/WEIGHT/result") == "F.VS/WEIGHT"
    assert rule_group("F.LB/SODIUM") == "F.LB/SODIUM"
    assert rule_group("F.CM/MedicationStatement/route") == "F.CM/MedicationStatement"
    assert rule_group(None, "F.MH", "Condition") == "F.MH/Condition"
    assert rule_group(None, "F.VS", "Observation", "HR") == "F.VS/HR"  # e.g. an entered-in-error reading
    assert rule_group(None, "F.MH", "Condition", "3") == "F.MH/Condition"  # a log repeat is no test
    assert rule_group("edc:sandbox:conflict") == "edc:sandbox:conflict"
    assert rule_group(None) == "-"
