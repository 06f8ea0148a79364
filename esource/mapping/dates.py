"""FHIR dates as the protocol reads them, and study days.

Protocol ("Study days and visit windows"): dates and times are taken as written in the source
(the hospital's local date), with no time-zone shift. ``2024-03-01T23:30:00-05:00`` is the
1st of March at 23:30, whatever the offset says; the offset is only remembered (``has_tz``).

Accepted input: FHIR ``date`` (``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD``), ``dateTime`` and
``instant`` (``YYYY-MM-DDThh:mm:ss[.fff…]`` followed by ``Z`` or ``±hh:mm``). Leniency, on
purpose: a time without a zone is accepted (FHIR R4 requires one, but local EHR feeds often
omit it; it changes nothing here since no shift is applied). A leap second ``:60`` is read as
``:59.999999``. Fractions of a second beyond microseconds are truncated. Everything else that
does not match FHIR's grammar is rejected (``20200101``, ``2020-1-5``, ``2020-01-01T10:30``,
a zone without a time), as are impossible calendar dates (``2020-13-45``, ``2020-02-30``).

Study day: ``d − Day1 + 1`` when ``d ≥ Day1``, else ``d − Day1``: there is no Day 0.

Pure domain code: no I/O.
"""

from __future__ import annotations

import calendar
import datetime as _dt
import re
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "FhirDateTime",
    "date_of_study_day",
    "parse_fhir_datetime",
    "study_day",
]

_FHIR_DATETIME = re.compile(
    r"(?P<year>[0-9]{4})"
    r"(?:-(?P<month>[0-9]{2})"
    r"(?:-(?P<day>[0-9]{2})"
    r"(?:T(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2})(?:\.(?P<frac>[0-9]{1,9}))?"
    r"(?P<tz>Z|[+-][0-9]{2}:[0-9]{2})?"
    r")?)?)?"
)

_PRECISION_RANK = {"time": 0, "day": 1, "month": 2, "year": 3}


@dataclass(frozen=True, slots=True)
class FhirDateTime:
    """A FHIR date/dateTime/instant as written: partial dates stay partial, no zone shift.

    ``time`` is the local time as written (seconds and fractions kept, no tzinfo). ``has_tz``
    says whether a zone (``Z`` or an offset) was written; ``tz`` keeps its text.
    """

    year: int
    month: int | None = None
    day: int | None = None
    time: _dt.time | None = None
    has_tz: bool = False
    tz: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.year <= 9999:
            raise ValueError(f"year {self.year} is out of range 1…9999")
        if self.month is None and self.day is not None:
            raise ValueError("a day needs a month")
        if self.day is None and self.time is not None:
            raise ValueError("a time needs a full date")
        if self.month is not None and not 1 <= self.month <= 12:
            raise ValueError(f"month {self.month} does not exist")
        if self.day is not None and not 1 <= self.day <= 28:
            last = calendar.monthrange(self.year, self.month)[1]
            if not 1 <= self.day <= last:
                raise ValueError(
                    f"{self.year:04d}-{self.month:02d} has no day {self.day} (it has {last} days)"
                )
        if self.time is not None and self.time.tzinfo is not None:
            raise ValueError("time must be the local time as written, without tzinfo")
        if (self.tz is not None or self.has_tz) and self.time is None:
            raise ValueError("a time zone needs a time")
        if self.tz is not None and not self.has_tz:
            raise ValueError("tz given but has_tz is False")

    # -- precision and dates -----------------------------------------------------------------

    @property
    def precision(self) -> str:
        """``'year'``, ``'month'``, ``'day'`` or ``'time'``."""
        if self.time is not None:
            return "time"
        if self.day is not None:
            return "day"
        if self.month is not None:
            return "month"
        return "year"

    def date(self) -> _dt.date | None:
        """The calendar date when known to the day (day or time precision), else ``None``."""
        if self.day is None:
            return None
        return _dt.date(self.year, self.month, self.day)

    def earliest(self) -> _dt.date:
        """The first day this value can mean (``2019-04`` → 2019-04-01, ``2019`` → 2019-01-01)."""
        return _dt.date(self.year, self.month or 1, self.day or 1)

    def latest(self) -> _dt.date:
        """The last day this value can mean (``2019-02`` → 2019-02-28, ``2019`` → 2019-12-31)."""
        if self.day is not None:
            return _dt.date(self.year, self.month, self.day)
        month = self.month or 12
        return _dt.date(self.year, month, calendar.monthrange(self.year, month)[1])

    # -- text --------------------------------------------------------------------------------

    def iso_date(self) -> str:
        """The date part as ISO 8601, partial kept partial: ``2019``, ``2019-04``, ``2019-04-12``."""
        text = f"{self.year:04d}"
        if self.month is not None:
            text += f"-{self.month:02d}"
        if self.day is not None:
            text += f"-{self.day:02d}"
        return text

    def hhmm(self) -> str | None:
        """``HH:MM`` of the local time as written (ODM ``partialTime``), or ``None``."""
        if self.time is None:
            return None
        return f"{self.time.hour:02d}:{self.time.minute:02d}"

    def isoformat(self) -> str:
        """The value back as FHIR text (time zone text kept as written)."""
        text = self.iso_date()
        if self.time is not None:
            text += "T" + self.time.isoformat()
            if self.tz is not None:
                text += self.tz
        return text

    def __str__(self) -> str:
        return self.isoformat()

    # -- ordering ----------------------------------------------------------------------------

    def sort_key(self) -> tuple[int, int, _dt.time, int]:
        """Chronological order for selection: by (earliest) day; on one day readings with a
        time first, by time; then readings known to the day only; then coarser partial dates.

        This is the protocol's selection rule 3 ("readings with a time come before readings
        with a date only"). Two readings with the same key are tied (rule 4 decides).
        """
        return (
            self.earliest().toordinal(),
            0 if self.time is not None else 1,
            self.time if self.time is not None else _dt.time.min,
            _PRECISION_RANK[self.precision],
        )


def parse_fhir_datetime(s: str) -> FhirDateTime:
    """Parse a FHIR ``date``, ``dateTime`` or ``instant`` as written (no time-zone shift).

    Raises ``ValueError`` naming the problem for anything else.
    """
    if not isinstance(s, str):
        raise ValueError(f"a FHIR date must be text, got {type(s).__name__}")
    return _parse_fhir_datetime(s)


@lru_cache(maxsize=16384)
def _parse_fhir_datetime(s: str) -> FhirDateTime:
    # memoised: the readings of one message share their time, and every mapping run re-reads them
    # (FhirDateTime is immutable; an invalid text raises each time, exceptions are not cached)
    m = _FHIR_DATETIME.fullmatch(s)
    if m is None:
        raise ValueError(
            f"{s!r} is not a FHIR date/dateTime "
            "(expected YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss[.sss][Z|±hh:mm])"
        )
    year = int(m["year"])
    if year == 0:
        raise ValueError(f"{s!r}: year 0000 does not exist")
    month = int(m["month"]) if m["month"] else None
    if month is not None and not 1 <= month <= 12:
        raise ValueError(f"{s!r}: month {month:02d} does not exist")
    day = int(m["day"]) if m["day"] else None
    if day is not None:
        last = calendar.monthrange(year, month)[1]
        if not 1 <= day <= last:
            raise ValueError(f"{s!r}: {year:04d}-{month:02d} has no day {day:02d}")
    time = None
    tz = m["tz"]
    if m["hour"] is not None:
        hour, minute, second = int(m["hour"]), int(m["minute"]), int(m["second"])
        if hour > 23 or minute > 59 or second > 60:
            raise ValueError(f"{s!r}: time {m['hour']}:{m['minute']}:{m['second']} does not exist")
        micro = int((m["frac"] or "").ljust(6, "0")[:6]) if m["frac"] else 0
        if second == 60:  # leap second: keep it on the same minute
            second, micro = 59, 999_999
        time = _dt.time(hour, minute, second, micro)
    if tz is not None and tz != "Z":
        tz_hour, tz_minute = int(tz[1:3]), int(tz[4:6])
        if tz_hour > 14 or tz_minute > 59 or (tz_hour == 14 and tz_minute != 0):
            raise ValueError(f"{s!r}: time-zone offset {tz} does not exist")
    return FhirDateTime(year, month, day, time, tz is not None, tz)


def study_day(d: _dt.date, day1: _dt.date) -> int:
    """Study day of ``d``: ``d − Day1 + 1`` when ``d ≥ Day1``, else ``d − Day1`` (no Day 0)."""
    d, day1 = _as_date(d), _as_date(day1)
    delta = (d - day1).days
    return delta + 1 if delta >= 0 else delta


def date_of_study_day(n: int, day1: _dt.date) -> _dt.date:
    """The date of study day ``n`` (inverse of :func:`study_day`); there is no day 0."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError("a study day is an int")
    if n == 0:
        raise ValueError("there is no study day 0")
    day1 = _as_date(day1)
    return day1 + _dt.timedelta(days=n - 1 if n > 0 else n)


def _as_date(d: _dt.date) -> _dt.date:
    if isinstance(d, _dt.datetime):
        return d.date()
    if isinstance(d, _dt.date):
        return d
    raise TypeError(f"expected a date, got {type(d).__name__}")
