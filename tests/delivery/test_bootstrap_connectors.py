"""`esource.bootstrap.make_connector` / `make_connectors`: the connector each study's endpoint settings
describe, with its credentials, knobs and (rave, redcap) a persistent key map; identical endpoints
share one connector (one authentication stop for all their studies)."""

from __future__ import annotations

from pathlib import Path

import pytest

from esource.bootstrap import build, make_connector, make_connectors
from esource.connectors.odm_file import OdmFileConnector
from esource.connectors.openclinica import OpenClinicaConnector
from esource.connectors.rave import RaveConnector
from esource.connectors.redcap import RedcapConnector
from esource.connectors.sandbox import SandboxConnector
from esource.domain.ports import InMemoryEdcKeyMap
from esource.settings import load_settings
from esource.store.edc_key_map import SqlEdcKeyMap

TOKEN32 = "0123456789ABCDEF0123456789ABCDEF"


pytestmark = pytest.mark.usefixtures("clean_esource_env")


def settings(**edc):
    return load_settings(mode="demo", studies=["CV01", "CV02"], edc=edc)


def test_each_connector_kind_gets_its_settings(cv01, tmp_path):
    keys = InMemoryEdcKeyMap()
    c = make_connector(settings(url="http://sbx:8090", api_key="sbx-key", timeout_s=3), "CV01")
    assert isinstance(c, SandboxConnector) and c.timeout == 3 and "sbx-key" not in repr(c)
    c = make_connector(settings(connector="odm_file", folder=str(tmp_path)), "CV01")
    assert isinstance(c, OdmFileConnector) and c.folder == tmp_path / "CV01"
    c = make_connector(settings(connector="rave", url="https://rave.example", username="u", password="rave-pw",
                                environment="UAT", verify_before_send=False), "CV01", key_map=keys)
    assert isinstance(c, RaveConnector) and c.rave_study_oid("CV01") == "CV01(UAT)" and c.key_map is keys
    assert c.verify_before_send is False and "rave-pw" not in repr(c)
    c = make_connector(settings(connector="openclinica", url="https://oc.example/OpenClinica", token="oc-tok",
                                poll_initial_s=0.2, poll_max_s=2, poll_timeout_s=30), "CV01")
    assert isinstance(c, OpenClinicaConnector) and (c.poll_initial, c.poll_max, c.poll_timeout) == (0.2, 2, 30)
    c = make_connector(settings(connector="redcap", url="https://redcap.example/api/", token=TOKEN32,
                                redcap={"arm": 3, "event_names": {"SE.BASELINE": "baseline_visit_arm_3"},
                                        "instrument_names": {"F.VS": "vital_signs"}}),
                       "CV01", key_map=keys, study=cv01)
    assert isinstance(c, RedcapConnector) and c.key_map is keys and TOKEN32 not in repr(c)
    assert c.mapping.events["SE.BASELINE"] == "baseline_visit_arm_3" and c.mapping.events["SE.WEEK4"].endswith("_arm_3")
    assert c.mapping.instruments["F.VS"] == "vital_signs" and c.mapping.fields["IT.VS.VSORRES"] == "vs_vsorres"


def test_connectors_with_integer_repeat_keys_need_a_key_map(cv01):
    with pytest.raises(ValueError, match="persistent EDC key map"):
        make_connector(settings(connector="rave", url="https://r", username="u", password="p"), "CV01")
    with pytest.raises(ValueError, match="persistent EDC key map"):
        make_connector(settings(connector="redcap", url="https://r/api/", token=TOKEN32), "CV01", study=cv01)


def test_redcap_names_for_oids_the_study_does_not_have_are_refused(cv01):
    with pytest.raises(ValueError, match="StudyEventOIDs the study CV01 does not have: SE.NOPE"):
        make_connector(settings(connector="redcap", url="https://r/api/", token=TOKEN32,
                                redcap={"event_names": {"SE.NOPE": "nope_arm_1"}}),
                       "CV01", key_map=InMemoryEdcKeyMap(), study=cv01)
    with pytest.raises(ValueError, match="not a valid REDCap instrument name"):
        make_connector(settings(connector="redcap", url="https://r/api/", token=TOKEN32,
                                redcap={"instrument_names": {"F.VS": "Vital Signs"}}),
                       "CV01", key_map=InMemoryEdcKeyMap(), study=cv01)


def test_studies_on_the_same_endpoint_share_one_connector(cv01):
    same = make_connectors(settings(connector="rave", url="https://r", username="u", password="p"),
                           {"CV01": cv01, "CV02": cv01}, key_map=InMemoryEdcKeyMap())
    assert same["CV01"] is same["CV02"]
    apart = make_connectors(settings(connector="rave", url="https://r", username="u", password="p",
                                     studies={"CV02": {"environment": "DEV"}}),
                            {"CV01": cv01, "CV02": cv01}, key_map=InMemoryEdcKeyMap())
    assert apart["CV01"] is not apart["CV02"]
    redcap = make_connectors(settings(connector="redcap", url="https://r/api/", token=TOKEN32),
                             {"CV01": cv01, "CV02": cv01}, key_map=InMemoryEdcKeyMap())
    assert redcap["CV01"] is not redcap["CV02"]  # one REDCap project per study


def test_build_gives_rave_the_stores_key_map_and_the_dispatcher_the_re_check(tmp_path: Path, store_url):
    s = load_settings(mode="demo", database_url=store_url,
                      edc={"connector": "rave", "url": "https://rave.example", "username": "u", "password": "p",
                           "auth_recheck_s": 120})
    container = build(s)
    try:
        connector = container.connectors["CV01"]
        assert isinstance(connector, RaveConnector) and isinstance(connector.key_map, SqlEdcKeyMap)
        assert container.dispatcher.auth_recheck == 120
        assert connector.key_map.edc_key("rave", "CV01", "001-0001", "IG.VS", "WEIGHT") == 1
        with container.store.uow(read_only=True) as uow:  # persisted, not only in memory
            assert uow.find_edc_key("rave", "CV01", "001-0001", "IG.VS", "WEIGHT") == 1
    finally:
        container.close()
