"""The API over real HTTP: uvicorn in a thread on a free loopback port, httpx as the client — a real
chunked body refused while it streams in, and the service serving on afterwards."""

from __future__ import annotations

import uuid

import httpx
from http_helpers import CY_FILE, FHIR, assert_outcome, dead_letters, outbox

from esource.adapters.http import create_app
from esource.services.server import ThreadedServer, free_port

LIMIT = 256 * 1024


def test_over_real_http(make_container):
    c = make_container(max_body_bytes=LIMIT)
    port = free_port()
    server = ThreadedServer(create_app(c), "127.0.0.1", port)
    server.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            rid = str(uuid.uuid4())
            r = http.post("/fhir", content=CY_FILE.read_bytes(), headers={**FHIR, "X-Request-ID": rid})
            body = assert_outcome(r, 202)
            assert r.headers["X-Request-ID"] == rid and r.headers["X-Intake-Key"] == f"http:{rid}"
            assert len([i for i in body["issue"] if i["diagnostics"].startswith("accepted ")]) == 62
            assert len(outbox(c)) == 1

            streamed = []

            def chunks():  # 8 MiB in 16 KiB chunks, Transfer-Encoding: chunked
                for _ in range(512):
                    streamed.append(1)
                    yield b" " * 16384

            r = http.post("/fhir", content=chunks(), headers={**FHIR, "X-Request-ID": "chunked-big"})
            assert r.request.headers.get("transfer-encoding") == "chunked"
            assert_outcome(r, 413, code="too-long", contains=f"more than {LIMIT} bytes received")
            r = http.post("/fhir", content=b" " * (LIMIT + 1), headers={**FHIR, "X-Request-ID": "declared-big"})
            assert_outcome(r, 413, code="too-long", contains=f"Content-Length {LIMIT + 1}")
            dls = {d.intake_key: d for d in dead_letters(c)}
            assert set(dls) == {"http:chunked-big", "http:declared-big"}
            assert all(d.payload == b"" and "exceeds the limit" in d.reason for d in dls.values())

            assert_outcome(http.post("/fhir", content=b"<Bundle/>", headers={"Content-Type": "application/fhir+xml"}), 415)
            assert_outcome(http.post("/fhir", content=b"{oops", headers=FHIR), 400, contains="not valid JSON")
            # still serving: the same summary again under its request id is a duplicate, nothing new queued
            again = http.post("/fhir", content=CY_FILE.read_bytes(), headers={**FHIR, "X-Request-ID": rid})
            assert_outcome(again, 202, code="duplicate")
            assert len(outbox(c)) == 1
            assert http.get("/health").json() == {"status": "ok"}
            assert http.get("/ready").status_code == 200
    finally:
        server.stop()
