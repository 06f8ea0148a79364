"""One error shape per path: RFC 9457 problem details on the role-based API, FHIR OperationOutcome on
/fhir and enrollment; and the OpenAPI document: every route tagged, summarised, with a response model,
protected routes under the bearer security scheme, problem responses documented."""

from __future__ import annotations

import pytest
from api_helpers import assert_outcome, assert_problem
from fastapi import APIRouter, HTTPException

from esource.api.problems import PROBLEM_JSON, uses_problem_details


def test_problem_details_shape(world):
    r = world.get("/studies/CV01/transfers", None)
    body = assert_problem(r, 401)
    assert body["title"] == "Unauthorized" and "Bearer" in body["detail"] and body["request_id"]
    assert r.headers["X-Request-ID"] == body["request_id"]
    body = assert_problem(world.get("/studies/CV01/transfers", "edc"), 403)
    assert body["title"] == "Forbidden" and "edc" in body["detail"]
    body = assert_problem(world.get("/studies/XX99/transfers", "dm"), 404)
    assert body["title"] == "Not Found"
    body = assert_problem(world.get("/studies/CV01/transfers", "dm", params={"limit": "many"}), 422)
    assert body["errors"] and body["errors"][0]["loc"] == "query.limit" and "many" not in r.text


def test_the_fhir_and_enrollment_paths_keep_their_operation_outcomes(world):
    assert_outcome(world.get("/studies/CV01/subjects", None), 401, code="login")
    assert_outcome(world.get("/studies/CV01/subjects", "edc"), 403, code="forbidden")
    assert_outcome(world.get("/studies/XX99/subjects", "dm"), 404, code="not-found")
    assert_outcome(world.client.post("/fhir", content=b"{}", headers=world.auth("dm")), 403, code="forbidden")
    assert_outcome(world.get("/nope", "dm"), 404)


def test_an_httpexception_of_any_mounted_router_renders_by_path(world):
    """A colleague's router raising HTTPException gets problem details once mounted the same way."""
    from esource.api.problems import install_problem_details, register_problem_paths

    app = world.client.app
    router = APIRouter()

    @router.get("/studies/{study}/things/{thing}")
    def thing(study: str, thing: str) -> dict:
        raise HTTPException(409, f"thing {thing} is busy")

    app.include_router(router)
    register_problem_paths(app, ["/studies/{study}/things/{thing}"])
    install_problem_details(app)  # idempotent
    body = assert_problem(world.get("/studies/CV01/things/t1", "dm"), 409, contains="t1 is busy")
    assert body["title"] == "Conflict"
    assert uses_problem_details(app, "/studies/CV01/things/t1")
    assert not uses_problem_details(app, "/studies/CV01/subjects/001-0001")
    assert not uses_problem_details(app, "/fhir")


def test_an_unexpected_error_is_a_problem_without_a_traceback(world, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("secret detail from deep inside")

    monkeypatch.setattr(type(world.container.store), "uow", boom)
    r = world.client.get("/studies/CV01/transfers", headers=world.auth("bootstrap"))
    assert r.status_code == 500 and r.headers["content-type"].startswith(PROBLEM_JSON)
    assert "secret detail" not in r.text and "Traceback" not in r.text and r.json()["status"] == 500


def test_the_store_down_is_503_problem(world, monkeypatch):
    from esource.store.errors import StoreError

    def down(*a, **k):
        raise StoreError("database is locked")

    monkeypatch.setattr(type(world.container.store), "uow", down)
    r = world.client.get("/studies/CV01/transfers", headers=world.auth("bootstrap"))
    body = assert_problem(r, 503)
    assert r.headers["Retry-After"] == "5" and "locked" not in body["detail"]
    # a token cannot be checked either: 503, not 401
    r = world.get("/me", "dm")
    assert r.status_code == 503 and r.headers["content-type"].startswith(PROBLEM_JSON)


def test_openapi_documents_every_route(world):
    doc = world.get("/openapi.json", "dm").json()
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]["bearer"]["description"]}
    assert "Problem" in doc["components"]["schemas"]
    public = {"/health", "/ready", "/metrics"}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            where = f"{method.upper()} {path}"
            assert op.get("tags") and op.get("summary"), where
            assert "200" in op["responses"] or "201" in op["responses"] or "202" in op["responses"], where
            if path not in public:
                assert op.get("security") == [{"bearer": []}], where
    mine = {"/me": "get", "/studies/{study}/transfers": "get", "/studies/{study}/transfers/{transfer_id}": "get",
            "/studies/{study}/odm/clinicaldata": "get"}
    for path, method in mine.items():
        op = doc["paths"][path][method]
        assert "401" in op["responses"], path
        assert PROBLEM_JSON in op["responses"]["401"]["content"], path
    listing = doc["paths"]["/studies/{study}/transfers"]["get"]
    assert {p["name"] for p in listing["parameters"]} >= {"site", "subject", "visit", "status", "since", "until",
                                                           "limit", "offset"}
    assert "application/xml" in doc["paths"]["/studies/{study}/odm/clinicaldata"]["get"]["responses"]["200"]["content"]


@pytest.mark.parametrize("path", ["/me", "/studies/CV01/transfers", "/studies/CV01/odm/clinicaldata"])
def test_problem_paths(world, path):
    assert uses_problem_details(world.client.app, path)
