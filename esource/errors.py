"""One exception root, so every entry point can turn any esource error into a clear answer
(a CLI line, an HTTP OperationOutcome, a dead-letter reason) instead of a traceback."""

from __future__ import annotations


class EsourceError(Exception):
    """Root of every error esource raises on purpose."""


class IntakeError(EsourceError):
    """Input that cannot be read as FHIR at all: names the origin (file/message), and where known the
    resource and element. The whole input is rejected (dead letter)."""

    def __init__(self, origin: str, problem: str, *, resource: str | None = None, element: str | None = None):
        self.origin = origin
        self.problem = problem
        self.resource = resource
        self.element = element
        where = origin
        if resource:
            where += f": {resource}"
        if element:
            where += f" at {element}"
        super().__init__(f"{where}: {problem}")


class StudyConfigError(EsourceError):
    """A study map, metadata file or config that is not valid: names the file, the line or key, and what is wrong."""

    def __init__(self, file: str, problem: str, *, key: str | None = None, line: int | None = None):
        self.file = file
        self.problem = problem
        self.key = key
        self.line = line
        where = file + (f":{line}" if line else "")
        if key:
            where += f" [{key}]"
        super().__init__(f"{where}: {problem}")


class EnrollmentError(EsourceError):
    """An enrollment record that is not valid (bad SubjectKey pattern, dates out of order...)."""
