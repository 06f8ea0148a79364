"""FHIR dates as written (no time-zone shift) and study days (no Day 0)."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from esource.mapping.dates import FhirDateTime, date_of_study_day, parse_fhir_datetime, study_day

# ------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("text", "fields", "precision"),
    [
        ("2019", (2019, None, None, None, False), "year"),
        ("2019-04", (2019, 4, None, None, False), "month"),
        ("2019-04-12", (2019, 4, 12, None, False), "day"),
        ("2020-02-29", (2020, 2, 29, None, False), "day"),
        ("2000-02-29", (2000, 2, 29, None, False), "day"),
        ("2024-03-01T08:05:09Z", (2024, 3, 1, dt.time(8, 5, 9), True), "time"),
        ("2024-03-01T23:30:00-05:00", (2024, 3, 1, dt.time(23, 30), True), "time"),
        ("2024-03-01T00:15:00+14:00", (2024, 3, 1, dt.time(0, 15), True), "time"),
        ("2024-03-01T10:30:45.123Z", (2024, 3, 1, dt.time(10, 30, 45, 123000), True), "time"),
        ("2024-03-01T10:30:45.123456789+01:00", (2024, 3, 1, dt.time(10, 30, 45, 123456), True), "time"),
        ("2024-03-01T10:30:45", (2024, 3, 1, dt.time(10, 30, 45), False), "time"),  # lenient: no zone
        ("2016-12-31T23:59:60Z", (2016, 12, 31, dt.time(23, 59, 59, 999999), True), "time"),
    ],
)
def test_parse(text, fields, precision):
    v = parse_fhir_datetime(text)
    assert (v.year, v.month, v.day, v.time, v.has_tz) == fields
    assert v.precision == precision


def test_no_time_zone_shift():
    # 23:30 at UTC-5 is already the 2nd in UTC: the protocol keeps the hospital's local date.
    v = parse_fhir_datetime("2024-03-01T23:30:00-05:00")
    assert v.date() == dt.date(2024, 3, 1)
    assert v.hhmm() == "23:30"
    assert v.tz == "-05:00"
    w = parse_fhir_datetime("2024-03-01T00:30:00+02:00")
    assert w.date() == dt.date(2024, 3, 1) and w.hhmm() == "00:30"
    assert w.time.tzinfo is None


@pytest.mark.parametrize(
    "bad",
    [
        "2020-13-45", "2020-02-30", "2019-02-29", "1900-02-29", "2020-04-31", "20200101",
        "2020-1-5", "2020-01-1", "2020-00", "2020-01-00", "0000", "202", "20201",
        "2020-01-01T25:00:00Z", "2020-01-01T24:00:00Z", "2020-01-01T10:60:00Z",
        "2020-01-01T10:30:61Z", "2020-01-01T10:30", "2020-01-01T10Z", "2020-01-01 10:30:00",
        "2020-01-01Z", "2020Z", "2020-01-01T10:30:00+15:00", "2020-01-01T10:30:00+14:30",
        "2020-01-01T10:30:00+0100", "2020-01-01T10:30:00.Z", "", " 2020", "2020 ", "2020-01-01T",
        "-2020", "2020/01/01", "01/02/2020", "2020-W01",
    ],
)
def test_invalid_dates_raise(bad):
    with pytest.raises(ValueError):
        parse_fhir_datetime(bad)


def test_invalid_date_message_is_clear():
    with pytest.raises(ValueError, match="month 13"):
        parse_fhir_datetime("2020-13-45")
    with pytest.raises(ValueError, match="no day 30"):
        parse_fhir_datetime("2020-02-30")
    with pytest.raises(ValueError, match="not a FHIR date"):
        parse_fhir_datetime("20200101")


@pytest.mark.parametrize("bad", [None, 20200101, dt.date(2020, 1, 1)])
def test_non_text_raises(bad):
    with pytest.raises(ValueError):
        parse_fhir_datetime(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- dates, text, ordering


@pytest.mark.parametrize(
    ("text", "date", "earliest", "latest", "iso", "hhmm"),
    [
        ("2019", None, dt.date(2019, 1, 1), dt.date(2019, 12, 31), "2019", None),
        ("2019-02", None, dt.date(2019, 2, 1), dt.date(2019, 2, 28), "2019-02", None),
        ("2020-02", None, dt.date(2020, 2, 1), dt.date(2020, 2, 29), "2020-02", None),
        ("2019-04", None, dt.date(2019, 4, 1), dt.date(2019, 4, 30), "2019-04", None),
        ("2019-04-12", dt.date(2019, 4, 12), dt.date(2019, 4, 12), dt.date(2019, 4, 12), "2019-04-12", None),
        ("2019-04-12T07:03:59+02:00", dt.date(2019, 4, 12), dt.date(2019, 4, 12), dt.date(2019, 4, 12),
         "2019-04-12", "07:03"),
    ],
)
def test_dates_and_text(text, date, earliest, latest, iso, hhmm):
    v = parse_fhir_datetime(text)
    assert v.date() == date
    assert v.earliest() == earliest
    assert v.latest() == latest
    assert v.iso_date() == iso
    assert v.hhmm() == hhmm
    assert str(v) == text


def test_sort_key_puts_timed_readings_first_on_a_day():
    texts = [
        "2024-01-06T00:00:00Z",
        "2024-01-05",
        "2024-01-05T09:00:00+01:00",
        "2024-01-04",
        "2024-01-05T08:00:00Z",
        "2024-01",
    ]
    ordered = sorted((parse_fhir_datetime(t) for t in texts), key=FhirDateTime.sort_key)
    assert [str(v) for v in ordered] == [
        "2024-01",  # earliest possible day is 2024-01-01
        "2024-01-04",
        "2024-01-05T08:00:00Z",
        "2024-01-05T09:00:00+01:00",  # local times compared as written
        "2024-01-05",  # date-only after every timed reading of the same day
        "2024-01-06T00:00:00Z",
    ]


def test_sort_key_ties():
    a, b = parse_fhir_datetime("2024-01-05"), parse_fhir_datetime("2024-01-05")
    assert a.sort_key() == b.sort_key()
    c, d = parse_fhir_datetime("2024-01-05T08:00:00Z"), parse_fhir_datetime("2024-01-05T08:00:00+02:00")
    assert c.sort_key() == d.sort_key()  # same local time: tied, rule 4 decides
    assert parse_fhir_datetime("2024-01-05T23:59:59Z").sort_key() < a.sort_key()


def test_direct_construction_is_validated():
    assert FhirDateTime(2024, 2, 29).date() == dt.date(2024, 2, 29)
    for kwargs in [
        dict(year=2023, month=2, day=29),
        dict(year=2024, month=13),
        dict(year=2024, day=3),
        dict(year=2024, month=1, time=dt.time(8)),
        dict(year=2024, month=1, day=1, has_tz=True),
        dict(year=0),
        dict(year=2024, month=1, day=1, time=dt.time(8, tzinfo=dt.timezone.utc)),
    ]:
        with pytest.raises(ValueError):
            FhirDateTime(**kwargs)


def test_frozen():
    v = parse_fhir_datetime("2024-01-05")
    with pytest.raises(AttributeError):
        v.year = 2025  # type: ignore[misc]


_zones = st.sampled_from([None, "Z", "+00:00", "-05:00", "+14:00", "+05:30", "-12:00"])


@given(st.dates(min_value=dt.date(1, 1, 1)), st.times(), _zones, st.sampled_from(["year", "month", "day", "time"]))
def test_text_round_trip(d, t, tz, precision):
    if precision == "year":
        text = f"{d.year:04d}"
    elif precision == "month":
        text = f"{d.year:04d}-{d.month:02d}"
    elif precision == "day":
        text = d.isoformat()
    else:
        text = f"{d.isoformat()}T{t.isoformat()}" + (tz or "")
    v = parse_fhir_datetime(text)
    assert v.precision == precision
    assert str(v) == text
    assert parse_fhir_datetime(str(v)) == v
    assert v.earliest() <= d if precision != "time" else v.date() == d
    assert v.earliest() <= v.latest()
    if precision == "time":
        assert v.time == t and v.has_tz is (tz is not None)
        assert v.hhmm() == f"{t.hour:02d}:{t.minute:02d}"


# --------------------------------------------------------------------------------- study days

DAY1 = dt.date(2024, 3, 10)


@pytest.mark.parametrize(
    ("d", "n"),
    [
        (dt.date(2024, 3, 10), 1),
        (dt.date(2024, 3, 11), 2),
        (dt.date(2024, 3, 9), -1),
        (dt.date(2024, 2, 11), -28),
        (dt.date(2024, 4, 7), 29),
        (dt.date(2024, 6, 2), 85),
        (dt.date(2025, 3, 10), 366),  # through 2024-02-29? no: 2024-03-10 + 365 days
    ],
)
def test_study_day(d, n):
    assert study_day(d, DAY1) == n
    assert date_of_study_day(n, DAY1) == d


def test_there_is_no_day_zero():
    assert study_day(DAY1 - dt.timedelta(days=1), DAY1) == -1
    assert study_day(DAY1, DAY1) == 1
    with pytest.raises(ValueError):
        date_of_study_day(0, DAY1)


def test_study_day_takes_the_date_of_a_datetime():
    assert study_day(dt.datetime(2024, 3, 10, 23, 59), DAY1) == 1
    with pytest.raises(TypeError):
        study_day("2024-03-10", DAY1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        date_of_study_day(1.0, DAY1)  # type: ignore[arg-type]


@given(st.dates(min_value=dt.date(1900, 1, 1), max_value=dt.date(2100, 12, 31)),
       st.dates(min_value=dt.date(1950, 1, 1), max_value=dt.date(2050, 12, 31)))
def test_study_day_inverse_and_never_zero(d, day1):
    n = study_day(d, day1)
    assert n != 0
    assert (n > 0) == (d >= day1)
    assert date_of_study_day(n, day1) == d


@given(st.integers(min_value=-10000, max_value=10000).filter(lambda n: n != 0),
       st.dates(min_value=dt.date(1950, 1, 1), max_value=dt.date(2050, 12, 31)))
def test_date_of_study_day_inverse(n, day1):
    assert study_day(date_of_study_day(n, day1), day1) == n


@given(st.dates(min_value=dt.date(1990, 1, 1), max_value=dt.date(2060, 1, 1)))
def test_study_day_is_monotone_and_skips_zero(d):
    a, b = study_day(d, DAY1), study_day(d + dt.timedelta(days=1), DAY1)
    assert b == a + 1 or (a == -1 and b == 1)
