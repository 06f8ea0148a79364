"""Small readers of raw JSON values shared by intake parsing, identity and validation messages."""

from __future__ import annotations

from typing import Any


def json_kind(value: Any) -> str:
    """What a JSON value is, in words, for error messages ("a string", "an array" ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def as_str(value: Any) -> str | None:
    """A string element's value; integers are tolerated (sloppy ids), anything else is not a value."""
    if type(value) is str:
        return value if value else None
    if type(value) is int:
        return str(value)
    return None
