"""FHIRPath selectors from the study maps, compiled once.

Most selectors are plain element paths (`effectivePeriod.start`, `code.coding`, `value.ofType(Quantity)`).
Those compile to a small dict walker with FHIRPath's semantics for paths (lists flatten, missing
elements give an empty collection, choice types resolve by name), which is ~50× faster than the general
evaluator. Everything else (where(), exists(), first(), operators...) goes to fhirpathpy, compiled once
with the R4 model so choice types work. Tests check both paths agree on the sample data.
"""

from __future__ import annotations

import re
from typing import Any, Callable

Selector = Callable[[Any], list[Any]]

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_SIMPLE = re.compile(rf"^{_IDENT}(\.{_IDENT}|\.ofType\({_IDENT}\))*$")
_OFTYPE = re.compile(rf"^ofType\(({_IDENT})\)$")

_r4_model: Any = None


def _fhirpathpy_selector(expression: str) -> Selector:
    global _r4_model
    import fhirpathpy
    from fhirpathpy.models import models

    if _r4_model is None:
        _r4_model = models["r4"]
    compiled = fhirpathpy.compile(expression, _r4_model)
    try:  # some syntax errors (unclosed calls, wrong arity) only surface on evaluation
        compiled({})
    except Exception as exc:
        raise ValueError(str(exc)) from None

    def run(node: Any) -> list[Any]:
        return list(compiled(node))

    return run


def _compile_simple(expression: str) -> Selector:
    parts = expression.split(".")
    keys: list[str] = []
    i = 0
    while i < len(parts):
        part = parts[i]
        if i + 1 < len(parts) and (m := _OFTYPE.match(parts[i + 1])):
            type_name = m.group(1)
            keys.append(part + type_name[0].upper() + type_name[1:])
            i += 2
            continue
        if _OFTYPE.match(part):
            raise ValueError(f"ofType() must follow a choice element in {expression!r}")
        keys.append(part)
        i += 1

    def run(node: Any) -> list[Any]:
        current: list[Any] = [node]
        for key in keys:
            nxt: list[Any] = []
            for item in current:
                if not isinstance(item, dict):
                    continue
                value = item.get(key)
                if value is None:
                    continue
                if isinstance(value, list):
                    nxt.extend(v for v in value if v is not None)
                else:
                    nxt.append(value)
            if not nxt:
                return []
            current = nxt
        return current

    return run


def compile_selector(expression: str) -> Selector:
    """Compile one FHIRPath expression. Raises ValueError with fhirpathpy's message when it is invalid."""
    expression = expression.strip()
    if not expression:
        raise ValueError("empty FHIRPath expression")
    if _SIMPLE.match(expression):
        return _compile_simple(expression)
    try:
        return _fhirpathpy_selector(expression)
    except Exception as exc:  # fhirpathpy raises bare Exceptions from its ANTLR parser
        raise ValueError(f"invalid FHIRPath {expression!r}: {exc}") from None


def compile_first_of(expressions: list[str] | str) -> Callable[[Any], Any]:
    """A list of alternatives: the first non-empty result's first item (e.g. effective[x] in order)."""
    exprs = [expressions] if isinstance(expressions, str) else list(expressions)
    selectors = [compile_selector(e) for e in exprs]

    def run(node: Any) -> Any:
        for sel in selectors:
            out = sel(node)
            if out:
                return out[0]
        return None

    return run


def compile_first_of_with_path(expressions: list[str] | str) -> Callable[[Any], tuple[Any, str | None]]:
    """Like compile_first_of, also saying which alternative matched (for lineage)."""
    exprs = [expressions] if isinstance(expressions, str) else list(expressions)
    selectors = [(e, compile_selector(e)) for e in exprs]

    def run(node: Any) -> tuple[Any, str | None]:
        for expr, sel in selectors:
            out = sel(node)
            if out:
                return out[0], expr
        return None, None

    return run


def is_simple_path(expression: str) -> bool:
    return bool(_SIMPLE.match(expression.strip()))


def top_level_elements(expression: str) -> set[str]:
    """The top-level element names an expression may read (for the privacy check at load time).

    Plain paths: the first segment. General expressions: every identifier that starts the
    expression or a sub-expression (not after a '.'), and is not a function call - conservative."""
    expression = expression.strip()
    if _SIMPLE.match(expression):
        return {expression.split(".")[0]}
    names = set()
    for m in re.finditer(rf"(?<![.A-Za-z0-9_'])({_IDENT})\b(?!\s*\()", expression):
        names.add(m.group(1))
    return names - {"and", "or", "xor", "implies", "true", "false", "is", "as", "in", "contains", "div", "mod"}
