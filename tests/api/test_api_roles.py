"""The role × endpoint matrix: every role against every protected endpoint (200/201/202 or 403), site
scoping of CRAs, study scoping of EDC accounts, and 401 (with WWW-Authenticate: Bearer) for missing,
malformed, unknown, expired, revoked and disabled credentials — each in the error shape of its path
(OperationOutcome for /fhir and enrollment, problem details for the role-based API)."""

from __future__ import annotations

from typing import Any

import pytest
from api_helpers import FHIR, MRN, SECRET, SITE_A, SITE_B, World, assert_outcome, assert_problem, transfers

WHO = ("cra_a", "cra_b", "dm", "admin", "edc", "edc_other", "ehr", "bootstrap")

# endpoint -> expected status per WHO (same order)
MATRIX: dict[str, tuple[int, ...]] = {
    "me":              (200, 200, 200, 200, 200, 200, 200, 200),
    "fhir_post":       (403, 403, 403, 202, 403, 403, 202, 202),
    "fhir_message":    (403, 403, 403, 202, 403, 403, 202, 202),
    "subjects_list":   (200, 200, 200, 200, 403, 403, 403, 200),
    "subject_site_b":  (403, 200, 200, 200, 403, 403, 403, 200),
    "subject_create":  (403, 403, 403, 201, 403, 403, 403, 201),
    "subject_update":  (403, 403, 403, 200, 403, 403, 403, 200),
    "transfers":       (200, 200, 200, 200, 403, 403, 403, 200),
    "transfers_site_b": (403, 200, 200, 200, 403, 403, 403, 200),
    "transfer_site_a": (200, 403, 200, 200, 403, 403, 403, 200),
    "transfer_site_b": (403, 200, 200, 200, 403, 403, 403, 200),
    "odm_pull":        (403, 403, 200, 200, 200, 403, 403, 200),
}
FHIR_STYLE = {"fhir_post", "fhir_message", "subjects_list", "subject_site_b", "subject_create", "subject_update"}


def _ids_by_site(world: World) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in transfers(world, "admin")["items"]:
        out.setdefault(row["site_oid"], row["id"])
    assert set(out) == {SITE_A, SITE_B}
    return out


def call(world: World, endpoint: str, who: str | None, n: int = 0, headers: dict[str, str] | None = None) -> Any:
    """One request of `endpoint` as `who` (or with `headers` instead); `n` makes bodies unique."""
    h = headers if headers is not None else world.auth(who)
    c = world.client
    patient = {"resourceType": "Patient", "id": f"p{n}", "identifier": [{"system": MRN, "value": f"nobody-{n}"}]}
    if endpoint == "me":
        return c.get("/me", headers=h)
    if endpoint == "fhir_post":
        import json

        return c.post("/fhir", content=json.dumps(patient), headers={**FHIR, **h, "X-Request-ID": f"m-{n}"})
    if endpoint == "fhir_message":
        import json

        msg = {"resourceType": "Bundle", "type": "message", "entry": [
            {"fullUrl": "urn:uuid:h", "resource": {"resourceType": "MessageHeader", "id": "h",
                                                    "eventCoding": {"system": "urn:x", "code": "u"},
                                                    "source": {"endpoint": "urn:ehr"}}},
            {"fullUrl": f"urn:uuid:p{n}", "resource": patient}]}
        return c.post("/fhir/$process-message", content=json.dumps(msg), headers={**FHIR, **h, "X-Request-ID": f"x-{n}"})
    if endpoint == "subjects_list":
        return c.get("/studies/CV01/subjects", headers=h)
    if endpoint == "subject_site_b":
        return c.get("/studies/CV01/subjects/002-0001", headers=h)
    if endpoint == "subject_create":
        body = {"subject_key": f"002-{500 + n:04d}", "site_oid": SITE_B,
                "identifiers": [{"system": MRN, "value": f"new-{n}"}], "consent": "2024-04-10", "day1": "2024-05-01"}
        return c.post("/studies/CV01/subjects", json=body, headers=h)
    if endpoint == "subject_update":
        return c.put("/studies/CV01/subjects/002-0001", json={"withdrawn": None}, headers=h)
    if endpoint == "transfers":
        return c.get("/studies/CV01/transfers", headers=h)
    if endpoint == "transfers_site_b":
        return c.get("/studies/CV01/transfers", params={"site": SITE_B}, headers=h)
    if endpoint in ("transfer_site_a", "transfer_site_b"):
        tid = _ids_by_site(world)[SITE_A if endpoint.endswith("_a") else SITE_B]
        return c.get(f"/studies/CV01/transfers/{tid}", headers=h)
    if endpoint == "odm_pull":
        return c.get("/studies/CV01/odm/clinicaldata", headers=h)
    raise AssertionError(endpoint)


def test_the_role_by_endpoint_matrix(world):
    n = 0
    failures = []
    for endpoint, expected in MATRIX.items():
        for who, status in zip(WHO, expected):
            n += 1
            r = call(world, endpoint, who, n)
            if r.status_code != status:
                failures.append(f"{endpoint} as {who}: {r.status_code} (expected {status}) {r.text[:200]}")
                continue
            if status == 403:
                if endpoint in FHIR_STYLE:
                    assert_outcome(r, 403, code="forbidden")
                else:
                    assert_problem(r, 403)
    assert not failures, "\n".join(failures)


def test_a_cra_sees_only_the_subjects_and_transfers_of_their_sites(world):
    subjects = {s["subject_key"]: s["site_oid"] for s in world.get("/studies/CV01/subjects", "cra_a").json()}
    assert subjects == {"001-0001": SITE_A}
    assert {s["subject_key"] for s in world.get("/studies/CV01/subjects", "cra_b").json()} == {"002-0001"}
    assert {s["subject_key"] for s in world.get("/studies/CV01/subjects", "dm").json()} == {"001-0001", "002-0001"}
    mine = transfers(world, "cra_a")
    assert mine["total"] >= 1 and {t["site_oid"] for t in mine["items"]} == {SITE_A}
    theirs = transfers(world, "cra_b")
    assert theirs["total"] >= 1 and {t["site_oid"] for t in theirs["items"]} == {SITE_B}
    everything = transfers(world, "dm")
    assert everything["total"] == mine["total"] + theirs["total"]
    # filtering on the other site's subject finds nothing (never the other site's rows)
    assert transfers(world, "cra_a", subject="002-0001") == {"items": [], "total": 0, "limit": 500, "offset": 0}
    assert_problem(world.get("/studies/CV01/transfers", "cra_a", params={"site": SITE_B}), 403, contains=SITE_B)
    tid_b = next(t["id"] for t in everything["items"] if t["site_oid"] == SITE_B)
    assert_problem(world.get(f"/studies/CV01/transfers/{tid_b}", "cra_a"), 403)
    assert_outcome(world.get("/studies/CV01/subjects/002-0001", "cra_a"), 403)


def test_an_edc_account_pulls_only_its_own_study(world):
    assert world.get("/studies/CV01/odm/clinicaldata", "edc").status_code == 200
    assert_problem(world.get("/studies/CV01/odm/clinicaldata", "edc_other"), 403, contains="CV01")
    # nothing else, not even reads of its own study
    for path in ("/studies/CV01/transfers", "/studies/CV01/subjects"):
        assert world.get(path, "edc").status_code == 403


def test_an_unknown_study_is_404_for_those_allowed_on_every_study(world):
    assert_problem(world.get("/studies/XX99/transfers", "dm"), 404, contains="XX99")
    assert_problem(world.get("/studies/XX99/odm/clinicaldata", "admin"), 404)
    assert_problem(world.get("/studies/XX99/odm/clinicaldata", "edc"), 403)  # bound to CV01: not even told


def _bad_credentials(world: World) -> dict[str, dict[str, str]]:
    auth = world.authenticator()
    expired = auth.issue_token("dm", ttl_days=1).token
    revoked = auth.issue_token("dm", ttl_days=30)
    auth.revoke_token(revoked.token_id)
    auth.create_user("gone", ["data_manager"])
    disabled = auth.issue_token("gone", ttl_days=30).token
    auth.set_active("gone", False)
    world.clock.advance(days=2)  # `expired` is now past its day
    good = world.tokens["dm"]
    tid = good.split("_")[1]
    return {
        "none": {},
        "empty bearer": {"Authorization": "Bearer"},
        "not bearer": {"Authorization": f"Basic {good}"},
        "no scheme": {"Authorization": good},
        "garbage": {"Authorization": "Bearer nope"},
        "unknown token": {"Authorization": f"Bearer esk_{'0' * 16}_{'A' * 43}"},
        "right id, wrong secret": {"Authorization": f"Bearer esk_{tid}_{'B' * 43}"},
        "token with a character more": {"Authorization": f"Bearer {good}x"},
        "expired": {"Authorization": f"Bearer {expired}"},
        "revoked": {"Authorization": f"Bearer {revoked.token}"},
        "disabled user": {"Authorization": f"Bearer {disabled}"},
        "bootstrap secret truncated": {"Authorization": f"Bearer {SECRET[:-1]}"},
        "a JWT of another key": {"Authorization": "Bearer " + _foreign_jwt(world)},
    }


def _foreign_jwt(world: World) -> str:
    from api_helpers import make_jwt, new_rsa_key

    import datetime as dt

    return make_jwt(new_rsa_key(), now=dt.datetime.now(dt.timezone.utc))


def test_missing_or_invalid_credentials_are_401_everywhere_in_the_shape_of_the_path(world):
    bad = _bad_credentials(world)
    for name, headers in bad.items():
        for i, endpoint in enumerate(MATRIX):
            r = call(world, endpoint, None, 1000 + i, headers=headers)
            assert r.status_code == 401, f"{endpoint} with {name}: {r.status_code} {r.text[:200]}"
            assert r.headers["WWW-Authenticate"].startswith("Bearer"), (endpoint, name)
            if endpoint in FHIR_STYLE:
                assert_outcome(r, 401, code="login")
            else:
                assert_problem(r, 401)
            for secret in (world.tokens["dm"], SECRET):
                assert secret not in r.text
    # nothing was processed or enrolled by all these refused requests
    with world.container.store.uow(read_only=True) as uow:
        assert {e.subject_key for e in uow.enrollments("CV01")} == {"001-0001", "002-0001"}


def test_operations_endpoints_stay_public(world):
    for path in ("/health", "/ready", "/metrics"):
        assert world.client.get(path).status_code == 200, path


@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/nope"])
def test_everything_else_needs_a_credential_of_any_role(world, path):
    assert world.client.get(path).status_code == 401
    assert world.get(path, "cra_a").status_code in (200, 404)


def test_demo_mode_without_credentials_acts_as_the_demo_admin_and_demo_tokens_carry_their_roles(make_world):
    from esource.api.auth import get_authenticator, seed_demo_users

    w = make_world(mode="demo", users=False)
    me = w.client.get("/me").json()
    assert me["username"] == "demo" and "admin" in me["roles"] and me["authenticated_by"] == "demo"
    creds = {c.role.value: c for c in seed_demo_users(get_authenticator(w.container), "CV01", SITE_A)}
    assert set(creds) == {"cra", "data_manager", "admin", "edc", "system"}
    cra = {"Authorization": f"Bearer {creds['cra'].token}"}
    assert w.client.get("/me", headers=cra).json()["sites"] == [SITE_A]
    rows = w.client.get("/studies/CV01/transfers", headers=cra).json()["items"]
    assert rows and {t["site_oid"] for t in rows} == {SITE_A}
    assert w.client.get("/studies/CV01/odm/clinicaldata", headers=cra).status_code == 403
    edc = {"Authorization": f"Bearer {creds['edc'].token}"}
    assert w.client.get("/studies/CV01/odm/clinicaldata", headers=edc).status_code == 200
    # a wrong credential is refused in demo mode too (it is not "no credential")
    assert w.client.get("/me", headers={"Authorization": "Bearer nope"}).status_code == 401
    # passwords work for the dashboard login
    auth = get_authenticator(w.container)
    assert auth.authenticate_password("demo-dm", creds["data_manager"].password).roles == {"data_manager"}
    # seeding again (a demo restarted on the same store) changes nothing
    assert [c.token for c in seed_demo_users(auth, "CV01", SITE_A)] == [c.token for c in creds.values()]


def test_demo_users_exist_in_demo_mode_only(world):
    from esource.api.auth import AuthError, seed_demo_users

    with pytest.raises(AuthError, match="demo mode only"):
        seed_demo_users(world.authenticator(), "CV01", SITE_A)
    assert {u.username for u in world.authenticator().users()} == set(
        ["cra_a", "cra_b", "dm", "admin", "edc", "edc_other", "ehr"])
