"""Errors the store raises on purpose (all under `esource.errors.EsourceError`).

Messages never carry a patient identifier value: they may end up in logs and dead-letter reasons.
"""

from __future__ import annotations

from esource.errors import EnrollmentError, EsourceError


class StoreError(EsourceError):
    """The store cannot do what was asked (unsupported database, unknown row, bad argument)."""


class StoreConflictError(StoreError):
    """A concurrent unit of work won a race the store cannot settle on its own (e.g. two writers
    took the same outbox sequence for a subject). Roll back and re-run the whole unit of work."""


class AmbiguousEnrollmentError(EnrollmentError):
    """A patient's identifiers match more than one enrolled subject of the study. Nothing is sent
    rather than sending one subject's data to another; a data manager must fix the enrollment."""

    def __init__(self, study_oid: str, subject_keys: list[str]):
        self.study_oid = study_oid
        self.subject_keys = subject_keys
        super().__init__(
            f"study {study_oid}: the patient's identifiers match {len(subject_keys)} enrolled subjects "
            f"({', '.join(subject_keys)}); fix the enrollment records so each identifier names one subject"
        )
