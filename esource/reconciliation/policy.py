"""Review-before-send: per form, `auto` (the default) sends mapped values at once; `adjudicate` holds
them in the reconciliation queue until an authorised user approves (accept), corrects (override) or
refuses (dismiss) each one.

The setting lives in the study map (`forms.<FormOID>.review: auto | adjudicate`); a data manager may
override it per form at run time (stored in `review_policy`, audited as CONFIG_CHANGED). Wiring, in the
ingest use case (esource/services/process.py) after the state diff:

    policies = ReviewPolicies(store.uow)                      # one per process (a small cache)
    Processor(..., hold_for_review=policies.hold_for_review)  # or `hold_for_review` for the map only

`hold_for_review(study, changes)` is pure: the changes of `auto` forms come back to be sent; each
change of an `adjudicate` form becomes a REVIEW_REQUIRED discrepancy that carries the full ItemKey, the
value and the source, which is what `accept` sends later. One discrepancy per eCRF cell: while it is
open, a newer value for the same cell refreshes it; once closed, the same value coming back (every
message re-runs the map) leaves it closed, a different one re-opens it (see upsert_discrepancy).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from esource.domain.model import Discrepancy, DiscrepancyKind, ItemChange, Severity, TransactionType
from esource.reconciliation.model import ReviewMode
from esource.study.study import Study


def review_mode(study: Study, form_oid: str, overrides: Mapping[str, str] | None = None) -> ReviewMode:
    """The policy in force for a form: a stored override, else the map's `review:` (default auto)."""
    if overrides and form_oid in overrides:
        return ReviewMode(overrides[form_oid])
    return ReviewMode(study.review_mode(form_oid))


def hold_for_review(study: Study, changes: list[ItemChange],
                    overrides: Mapping[str, str] | None = None) -> tuple[list[ItemChange], list[Discrepancy]]:
    """(changes to send now, REVIEW_REQUIRED discrepancies holding the rest). Pure: no I/O."""
    send: list[ItemChange] = []
    held: list[Discrepancy] = []
    modes: dict[str, ReviewMode] = {}
    for change in changes:
        form = change.item.key.form_oid
        mode = modes.get(form)
        if mode is None:
            mode = modes[form] = review_mode(study, form, overrides)
        if mode is ReviewMode.AUTO:
            send.append(change)
        else:
            held.append(review_discrepancy(change))
    return send, held


def review_discrepancy(change: ItemChange) -> Discrepancy:
    """The REVIEW_REQUIRED discrepancy holding one change (full ItemKey, value, source, lineage)."""
    iv, k = change.item, change.item.key
    where = k.study_event_oid + (f"[{k.study_event_repeat_key}]" if k.study_event_repeat_key else "")
    group = k.item_group_oid + (f"[{k.item_group_repeat_key}]" if k.item_group_repeat_key else "")
    what = (f"new value {iv.value!r}" if change.transaction_type is TransactionType.INSERT or change.previous_value is None
            else f"change {change.previous_value!r} -> {iv.value!r}")
    return Discrepancy(
        kind=DiscrepancyKind.REVIEW_REQUIRED,
        severity=Severity.INFO,
        message=(f"{k.item_oid} at {where}/{k.form_oid}/{group}: {what} is held for review before it is sent "
                 f"(form {k.form_oid} is adjudicated); an authorised user accepts, overrides or dismisses it"),
        study_oid=k.study_oid,
        subject_key=k.subject_key,
        source=iv.source,
        item_oid=k.item_oid,
        study_event_oid=k.study_event_oid,
        form_oid=k.form_oid,
        item_group_repeat_key=k.item_group_repeat_key,
        held_value=iv.value,
        candidates=({"transaction_type": change.transaction_type.value, "previous_value": change.previous_value,
                     "conversions": list(iv.conversions)},),
        rule=iv.rule,
        item_group_oid=k.item_group_oid,
        study_event_repeat_key=k.study_event_repeat_key,
    )


class ReviewPolicies:
    """The run-time overrides, read from the store and cached per study, for the ingest hot path.
    `set` (through this object) takes effect at once in this process; other processes see a change
    within `max_age` seconds (they re-read then)."""

    def __init__(self, uow_factory: Callable[..., Any], *, max_age: float = 10.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.uow_factory = uow_factory
        self.max_age = max_age
        self._monotonic = monotonic
        self._cache: dict[str, tuple[float, dict[str, str]]] = {}
        self._lock = threading.Lock()

    def overrides(self, study_oid: str) -> dict[str, str]:
        """{FormOID: mode} stored for the study (cached)."""
        now = self._monotonic()
        with self._lock:
            cached = self._cache.get(study_oid)
            if cached is not None and now - cached[0] < self.max_age:
                return cached[1]
        with self._reader() as uow:
            stored = {form: mode for form, (mode, _by, _at) in uow.review_policies(study_oid).items()}
        with self._lock:
            self._cache[study_oid] = (now, stored)
        return stored

    def invalidate(self, study_oid: str | None = None) -> None:
        with self._lock:
            if study_oid is None:
                self._cache.clear()
            else:
                self._cache.pop(study_oid, None)

    def mode(self, study: Study, form_oid: str) -> ReviewMode:
        return review_mode(study, form_oid, self.overrides(study.oid))

    def hold_for_review(self, study: Study, changes: list[ItemChange]) -> tuple[list[ItemChange], list[Discrepancy]]:
        """`Processor(hold_for_review=...)`: the pure policy with this study's stored overrides."""
        if not changes:
            return changes, []
        return hold_for_review(study, changes, self.overrides(study.oid))

    def _reader(self) -> Any:
        try:
            return self.uow_factory(read_only=True)
        except TypeError:
            return self.uow_factory()


def get_review_policies(container: Any) -> ReviewPolicies:
    """The container's ReviewPolicies (`container.extras["review_policies"]`), created on first use:
    bootstrap should create it before the processors and pass its `hold_for_review` to them."""
    found = container.extras.get("review_policies")
    if found is None:
        found = container.extras["review_policies"] = ReviewPolicies(container.store.uow)
    return found
