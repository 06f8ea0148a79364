"""ODM XML schema validation and hostile-XML-safe parsing.

Every ODM document esource reads or writes goes through the parser defined here: no entity
expansion, no DTD loading, no network access, no huge trees. A document with a DOCTYPE is refused
outright (ODM never needs one, and internal entities are how "billion laughs" attacks work).

The CDISC schemas ship with the package (`schemas/odm/{1.3.2,2.0}`, see `schemas/SOURCES.md`); all
their imports resolve to local files. A compiled `XMLSchema` is expensive to build, so there is one
per ODM version per process, built on first use.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from esource.errors import EsourceError, IntakeError

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas" / "odm"

ODM_NAMESPACES: dict[str, str] = {
    "1.3.2": "http://www.cdisc.org/ns/odm/v1.3",
    "2.0": "http://www.cdisc.org/ns/odm/v2.0",
}
_ROOT_SCHEMAS: dict[str, Path] = {
    "1.3.2": SCHEMA_DIR / "1.3.2" / "ODM1-3-2.xsd",
    "2.0": SCHEMA_DIR / "2.0" / "ODM.xsd",
}
SUPPORTED_VERSIONS: tuple[str, ...] = tuple(_ROOT_SCHEMAS)

# Report at most this many schema errors: a broken generator can produce thousands.
MAX_ERRORS = 50


class OdmSchemaError(EsourceError, ValueError):
    """An ODM document that is not well-formed, is hostile, or is not valid against the ODM XSD."""

    def __init__(self, origin: str, errors: list[str]):
        self.origin = origin
        self.errors = list(errors)
        shown = "; ".join(self.errors[:5])
        more = f" (and {len(self.errors) - 5} more)" if len(self.errors) > 5 else ""
        super().__init__(f"{origin}: not valid ODM: {shown}{more}")


@dataclass(frozen=True, slots=True)
class XmlProblem:
    """One problem found in a document: a line number when known, and a readable message."""

    line: int | None
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


class _HostileXml(Exception):
    def __init__(self, problem: XmlProblem):
        super().__init__(str(problem))
        self.problem = problem


def _new_parser() -> etree.XMLParser:
    # A fresh parser per document: cheap, and nothing is shared between threads.
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        huge_tree=False,
        load_dtd=False,
        dtd_validation=False,
        remove_blank_text=False,
    )


def _parse(xml: bytes | str) -> etree._ElementTree:
    """Parse safely; raise `_HostileXml` for a DOCTYPE, `etree.XMLSyntaxError` for broken XML."""
    if isinstance(xml, str):
        xml = xml.encode("utf-8")
    if not isinstance(xml, (bytes, bytearray, memoryview)):
        raise TypeError(f"ODM must be given as bytes, not {type(xml).__name__}")
    xml = bytes(xml)
    doctype_line = _doctype_in_prolog(xml)
    if doctype_line is not None:
        raise _HostileXml(XmlProblem(doctype_line, _DOCTYPE_REFUSED))
    root = etree.fromstring(xml, parser=_new_parser())
    tree = root.getroottree()
    docinfo = tree.docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        # Backstop for encodings the byte scan cannot read (e.g. UTF-16): libxml2 saw a DTD.
        raise _HostileXml(XmlProblem(None, _DOCTYPE_REFUSED))
    return tree


_DOCTYPE_REFUSED = (
    "DOCTYPE/entity declarations are not allowed in ODM documents "
    "(refused before parsing: DTDs and entities enable entity-expansion attacks and ODM never needs them)"
)


def _doctype_in_prolog(xml: bytes) -> int | None:
    """Line of a `<!DOCTYPE` in the prolog (before the root element), else None.

    Checked on the raw bytes before libxml2 sees the document, so an entity bomb is refused with a
    clear message instead of being parsed at all. Only the prolog is scanned: a DOCTYPE cannot appear
    anywhere else.
    """
    pos = 0
    n = len(xml)
    while True:
        lt = xml.find(b"<", pos)
        if lt < 0 or lt + 1 >= n:
            return None
        if xml.startswith(b"<?", lt):  # XML declaration or processing instruction
            end = xml.find(b"?>", lt + 2)
        elif xml.startswith(b"<!--", lt):
            end = xml.find(b"-->", lt + 4)
        elif xml[lt + 1 : lt + 9].upper() == b"!DOCTYPE":
            return xml.count(b"\n", 0, lt) + 1
        else:  # the root element (or something libxml2 will reject): the prolog is over
            return None
        if end < 0:
            return None
        pos = end + 2


def _syntax_problem(exc: etree.XMLSyntaxError) -> XmlProblem:
    line = exc.lineno if getattr(exc, "lineno", None) else None
    msg = (exc.msg or str(exc)).strip()
    return XmlProblem(line, f"not well-formed XML: {msg}")


def safe_parse(xml: bytes, origin: str) -> etree._Element:
    """Parse an XML document received from outside (an EDC reply, a file) without trusting it.

    Returns the root element. Raises `IntakeError(origin, ...)` for XML that is not well-formed or that
    carries a DOCTYPE/entity declarations.
    """
    try:
        return _parse(xml).getroot()
    except _HostileXml as exc:
        raise IntakeError(origin, str(exc.problem)) from None
    except etree.XMLSyntaxError as exc:
        raise IntakeError(origin, str(_syntax_problem(exc))) from None


# --------------------------------------------------------------------------------------------------
# schemas


class _CompiledSchema:
    """One compiled XMLSchema plus a lock: an lxml validator keeps its error log on the instance."""

    def __init__(self, version: str):
        path = _ROOT_SCHEMAS[version]
        if not path.is_file():
            raise FileNotFoundError(f"ODM {version} schema missing from the package: {path}")
        # The schema documents are ours (shipped in the package) but are parsed just as carefully.
        schema_doc = etree.parse(str(path), parser=_new_parser())
        self.schema = etree.XMLSchema(schema_doc)
        self.lock = threading.Lock()


_SCHEMAS: dict[str, _CompiledSchema] = {}
_SCHEMAS_LOCK = threading.Lock()


def _schema(version: str) -> _CompiledSchema:
    if version not in _ROOT_SCHEMAS:
        raise ValueError(f"unsupported ODM version {version!r}: expected one of {', '.join(SUPPORTED_VERSIONS)}")
    compiled = _SCHEMAS.get(version)
    if compiled is None:
        with _SCHEMAS_LOCK:
            compiled = _SCHEMAS.get(version)
            if compiled is None:
                compiled = _SCHEMAS[version] = _CompiledSchema(version)
    return compiled


def _clean_message(message: str) -> str:
    # lxml prefixes every name with the namespace in braces: keep messages short and readable.
    for ns in ODM_NAMESPACES.values():
        message = message.replace("{" + ns + "}", "")
    return message.strip()


def validate_tree(tree: etree._ElementTree | etree._Element, version: str = "1.3.2") -> list[XmlProblem]:
    """Validate an already (safely) parsed document; problems in document order, empty if valid."""
    compiled = _schema(version)
    root = tree.getroot() if isinstance(tree, etree._ElementTree) else tree
    expected = f"{{{ODM_NAMESPACES[version]}}}ODM"
    if root.tag != expected:
        qname = etree.QName(root)
        return [
            XmlProblem(
                root.sourceline,
                f"root element is {qname.localname!r} in namespace {qname.namespace or '(none)'!r}; "
                f"ODM {version} needs 'ODM' in namespace {ODM_NAMESPACES[version]!r}",
            )
        ]
    with compiled.lock:
        if compiled.schema.validate(root):
            return []
        entries = list(compiled.schema.error_log)
    problems = [XmlProblem(e.line or None, _clean_message(e.message)) for e in entries[:MAX_ERRORS]]
    if len(entries) > MAX_ERRORS:
        problems.append(XmlProblem(None, f"... {len(entries) - MAX_ERRORS} more schema errors not shown"))
    return problems


def check_odm(xml: bytes, version: str = "1.3.2") -> list[XmlProblem]:
    """Parse safely and validate: structured problems (line, message), empty if valid."""
    try:
        tree = _parse(xml)
    except _HostileXml as exc:
        return [exc.problem]
    except etree.XMLSyntaxError as exc:
        return [_syntax_problem(exc)]
    return validate_tree(tree, version)


def validate_odm(xml: bytes, version: str = "1.3.2") -> list[str]:
    """Validate an ODM document against the CDISC XSD of `version` ("1.3.2" or "2.0").

    Returns error messages, each starting with its line number ("line 12: ..."); an empty list means
    valid. XML that is not well-formed or carries a DOCTYPE/entities is reported, never expanded.
    """
    return [str(p) for p in check_odm(xml, version)]


def assert_valid_odm(xml: bytes, version: str = "1.3.2", *, origin: str = "ODM document") -> None:
    """Raise `OdmSchemaError` (with `.errors`) unless `xml` is valid ODM of `version`."""
    errors = validate_odm(xml, version)
    if errors:
        raise OdmSchemaError(origin, errors)


def warm_up(*versions: str) -> None:
    """Compile the schemas now (e.g. at service start) instead of on the first validation."""
    for version in versions or SUPPORTED_VERSIONS:
        _schema(version)
