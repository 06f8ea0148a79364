"""esource.odm.xsd: XSD validation with line numbers, and refusal of hostile XML."""

from __future__ import annotations

import time

import pytest
from lxml import etree

from esource.errors import IntakeError
from esource.odm import xsd

VALID_13 = b"""<?xml version="1.0" encoding="UTF-8"?>
<ODM xmlns="http://www.cdisc.org/ns/odm/v1.3" FileType="Snapshot" FileOID="F.1"
     CreationDateTime="2025-01-01T00:00:00Z" ODMVersion="1.3.2">
  <ClinicalData StudyOID="CV01" MetaDataVersionOID="MDV.CV01.1">
    <SubjectData SubjectKey="001-0001">
      <SiteRef LocationOID="SITE.001"/>
    </SubjectData>
  </ClinicalData>
</ODM>
"""

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<ODM xmlns="http://www.cdisc.org/ns/odm/v1.3" FileType="Snapshot" FileOID="&lol9;"
     CreationDateTime="2025-01-01T00:00:00Z"/>
"""

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE ODM [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<ODM xmlns="http://www.cdisc.org/ns/odm/v1.3" FileType="Snapshot" FileOID="x"
     CreationDateTime="2025-01-01T00:00:00Z"><ClinicalData StudyOID="&secret;" MetaDataVersionOID="m"/></ODM>
"""


def test_valid_document_has_no_errors():
    assert xsd.validate_odm(VALID_13) == []
    xsd.assert_valid_odm(VALID_13)  # does not raise


def test_schema_errors_carry_line_numbers():
    lines = VALID_13.decode().splitlines()
    # line 6: an element ODM does not have; line 4: a required attribute removed
    lines[5] = '      <SiteReference LocationOID="SITE.001"/>'
    lines[3] = '  <ClinicalData StudyOID="CV01">'
    errors = xsd.validate_odm("\n".join(lines).encode())
    assert len(errors) == 2
    assert errors[0].startswith("line 4: ") and "MetaDataVersionOID" in errors[0]
    assert errors[1].startswith("line 6: ") and "SiteReference" in errors[1]
    # namespace noise is stripped from messages
    assert "{http://www.cdisc.org" not in errors[1]


def test_not_well_formed_xml_is_reported_with_its_line():
    broken = b'<?xml version="1.0"?>\n<ODM xmlns="http://www.cdisc.org/ns/odm/v1.3">\n  <Study>\n</ODM>\n'
    errors = xsd.validate_odm(broken)
    assert len(errors) == 1
    assert errors[0].startswith("line 4: not well-formed XML")


def test_billion_laughs_is_refused_quickly_and_clearly():
    start = time.perf_counter()
    errors = xsd.validate_odm(BILLION_LAUGHS)
    assert time.perf_counter() - start < 1.0
    assert len(errors) == 1
    assert errors[0].startswith("line 2: ")
    assert "DOCTYPE" in errors[0]
    with pytest.raises(IntakeError) as info:
        xsd.safe_parse(BILLION_LAUGHS, "edc-reply-42")
    assert info.value.origin == "edc-reply-42"
    assert "DOCTYPE" in str(info.value)


def test_external_entity_is_refused_and_never_read():
    errors = xsd.validate_odm(XXE)
    assert len(errors) == 1 and "DOCTYPE" in errors[0]
    with pytest.raises(IntakeError) as info:
        xsd.safe_parse(XXE, "reply.xml")
    assert "root:" not in str(info.value)  # /etc/passwd content never appears


def test_plain_doctype_without_entities_is_refused_too():
    doc = b'<?xml version="1.0"?>\n<!-- a comment first -->\n<!DOCTYPE ODM>\n' + VALID_13.split(b"?>", 1)[1]
    errors = xsd.validate_odm(doc)
    assert errors and errors[0].startswith("line 3: ") and "DOCTYPE" in errors[0]


def test_doctype_in_an_encoding_the_byte_scan_cannot_read_is_still_refused():
    doc = '<?xml version="1.0" encoding="UTF-16"?>\n<!DOCTYPE ODM [<!ENTITY a "b">]>\n<ODM/>\n'.encode("utf-16")
    errors = xsd.validate_odm(doc)
    assert len(errors) == 1 and "DOCTYPE" in errors[0]


def test_doctype_text_inside_the_document_is_not_a_false_alarm():
    doc = VALID_13.replace(b"<ClinicalData", b"<!-- <!DOCTYPE x> is only text here -->\n<ClinicalData", 1)
    assert xsd.validate_odm(doc) == []


def test_safe_parse_returns_the_root_and_reports_syntax_errors():
    root = xsd.safe_parse(VALID_13, "file.xml")
    assert etree.QName(root).localname == "ODM"
    with pytest.raises(IntakeError) as info:
        xsd.safe_parse(b"<ODM><a></ODM>", "broken.xml")
    assert info.value.origin == "broken.xml"
    assert "line 1" in info.value.problem


def test_wrong_version_or_namespace_is_explained():
    one_line_root = VALID_13.replace(b'F.1"\n     Creation', b'F.1" Creation')
    errors = xsd.validate_odm(one_line_root, "2.0")
    assert len(errors) == 1
    assert "http://www.cdisc.org/ns/odm/v2.0" in errors[0] and errors[0].startswith("line 2: ")
    with pytest.raises(ValueError):
        xsd.validate_odm(VALID_13, "1.2")


def test_assert_valid_odm_raises_with_all_errors():
    with pytest.raises(xsd.OdmSchemaError) as info:
        xsd.assert_valid_odm(VALID_13.replace(b'FileType="Snapshot"', b'FileType="Everything"'), origin="out.xml")
    assert info.value.origin == "out.xml"
    assert any("FileType" in e for e in info.value.errors)
    assert str(info.value).startswith("out.xml: not valid ODM")


def test_compiled_schema_is_built_once_per_version():
    assert xsd._schema("1.3.2") is xsd._schema("1.3.2")
    assert xsd._schema("2.0") is xsd._schema("2.0")
    assert xsd._schema("1.3.2") is not xsd._schema("2.0")


def test_schemas_ship_with_the_package_and_keep_their_names():
    names_132 = {p.name for p in (xsd.SCHEMA_DIR / "1.3.2").iterdir()}
    names_20 = {p.name for p in (xsd.SCHEMA_DIR / "2.0").iterdir()}
    assert {"ODM1-3-2.xsd", "ODM1-3-2-foundation.xsd", "xml.xsd", "xmldsig-core-schema.xsd", "read_me.txt"} <= names_132
    assert {"ODM.xsd", "ODM-clinicaldata.xsd", "ODM-foundation.xsd", "ODM-xhtml.xsd"} <= names_20
    assert all(n.endswith(".xsd") or n == "read_me.txt" for n in names_132 | names_20)
    assert (xsd.SCHEMA_DIR.parent / "SOURCES.md").is_file()
