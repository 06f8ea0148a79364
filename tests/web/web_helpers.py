"""Shared by the dashboard tests: a demo-like world (the CV01 demo enrollment and data, the demo users,
the sandbox EDC on the same loopback server, every transaction delivered), browser launch options for
the system Chromium, and small page helpers."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
#: Without the background-networking flags Chromium stalls on a machine without internet access.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STUDY = "CV01"
CRA_SITE, OTHER_SITE = "SITE.001", "SITE.002"
PASSWORDS = {"cra": ("demo-cra", "demo-cra-password"), "data_manager": ("demo-dm", "demo-dm-password"),
             "admin": ("demo-admin", "demo-admin-password")}
# Words that must never appear on a page: the demo patients' names and hospital identifiers
# (config/demo_data, config/demo_enrollment.yaml).
PATIENT_WORDS = ("Arla", "Lang", "Derek", "Becker", "Iosefa", "Fuimaono", "CY/GHS-MI-1111", "ZZZ0016",
                 "0c89b627-646b-40ff-a620-c8509a10912c", "3c7d3369-55b5-420b-83d3-c5dda319b9c9")


def artifacts_dir() -> Path:
    """Where screenshots go: $ESOURCE_ARTIFACTS_DIR, else artifacts/ at the repository root."""
    root = os.environ.get("ESOURCE_ARTIFACTS_DIR")
    base = Path(root) if root else Path(__file__).resolve().parents[2] / "artifacts"
    out = base / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    return out


@dataclass
class World:
    container: Any
    app: Any
    server: Any
    base_url: str
    workdir: Path
    credentials: list[Any] = field(default_factory=list)

    def drain(self) -> None:
        """Deliver every pending transaction to the sandbox EDC (what the service's dispatcher thread does)."""
        for _ in range(10):
            self.container.dispatcher.drain()
            with self.container.store.uow(read_only=True) as uow:
                if not uow.outbox_entries(statuses=("pending",)):
                    return

    def discrepancies(self, **where: Any) -> list[Any]:
        """Open discrepancy records of the study matching the given attributes of the Discrepancy."""
        from esource.reconciliation.actions import Reconciliation
        from esource.reconciliation.model import OPEN_STATUSES, DiscrepancyFilter

        records, _ = Reconciliation.from_container(self.container).query(
            DiscrepancyFilter(STUDY, statuses=OPEN_STATUSES), limit=None)
        out = []
        for r in records:
            d = r.discrepancy
            if all((d.kind.value if k == "kind" else getattr(d, k)) == v for k, v in where.items()):
                out.append(r)
        return out

    def close(self) -> None:
        self.server.stop()
        self.container.close()


def build_world(workdir: Path) -> World:
    """Start esource in demo mode on a free loopback port with the sandbox EDC mounted at /edc, enroll the
    demo subjects, create the demo users, feed the demo data as `esource demo` does (the patient summaries
    first, then each later update) and deliver every transaction."""
    from esource.adapters.files import iter_input_files, read_input_file
    from esource.adapters.http import create_app
    from esource.connectors.sandbox_edc import create_sandbox_app

    from esource.api.auth import get_authenticator, seed_demo_users
    from esource.bootstrap import build
    from esource.services.demo import builtin_config_dir, load_enrollment_file
    from esource.services.ingest import Envelope
    from esource.services.process import content_key, enroll
    from esource.services.server import ThreadedServer, free_port
    from esource.settings import load_settings

    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port(0)
    base = f"http://127.0.0.1:{port}"
    settings = load_settings(mode="demo", database_url=f"sqlite:///{(workdir / 'esource.sqlite').resolve()}",
                             studies=[STUDY], http={"host": "127.0.0.1", "port": port},
                             edc={"connector": "sandbox", "url": f"{base}/edc", "timeout_s": 10},
                             log={"level": "WARNING", "json": True})
    container = build(settings)
    app = create_app(container)
    app.mount("/edc", create_sandbox_app(workdir / "sandbox-edc.sqlite"))
    server = ThreadedServer(app, "127.0.0.1", port)
    server.start()
    world = World(container, app, server, base, workdir)
    try:
        enrollment_file = builtin_config_dir() / "demo_enrollment.yaml"
        study_oid, enrollments, feed = load_enrollment_file(enrollment_file)
        enroll(container.store.uow, enrollments)
        world.credentials = seed_demo_users(get_authenticator(container), study_oid, CRA_SITE)
        for folder in feed:
            for path in iter_input_files([folder]):
                data = read_input_file(path, max_bytes=settings.http.max_body_bytes)
                rel = path.relative_to(enrollment_file.parent)
                result = container.ingest.ingest_bytes(data, Envelope("file", f"{rel}:{content_key(data)}", str(rel)))
                assert result.accepted, result.error
                world.drain()
    except BaseException:
        world.close()
        raise
    return world


def visible_text_has_no_patient_data(text: str) -> list[str]:
    """The patient names and identifiers found in `text` (should be none)."""
    return [w for w in PATIENT_WORDS if re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", text)]


# ---------------------------------------------------------------- plain HTTP (TestClient) helpers

_NONCE = re.compile(r'name="nonce" value="([^"]+)"')
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def http_login(client: Any, role: str | None = None, *, username: str | None = None, password: str | None = None,
               next_url: str = "/ui/") -> Any:
    """Log a TestClient in through the login form; returns the POST's answer."""
    if role is not None:
        username, password = PASSWORDS[role]
    client.cookies.clear()  # a new login, whoever was logged in
    page = client.get("/ui/login")
    assert page.status_code == 200, page.text
    nonce = _NONCE.search(page.text)
    assert nonce, "the login form carries a nonce"
    return client.post("/ui/login", data={"username": username, "password": password, "nonce": nonce.group(1),
                                          "next": next_url})


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found, "the page carries the session's CSRF token"
    return found.group(1)


# ---------------------------------------------------------------- accessibility checks (in the browser)

A11Y_SCRIPT = """() => {
  const problems = [];
  if (!document.documentElement.lang) problems.push('html without lang');
  if (document.querySelectorAll('main').length !== 1) problems.push('not exactly one main landmark');
  if (!document.querySelector('header') || !document.querySelector('footer')) problems.push('no banner or footer');
  if (document.querySelectorAll('h1').length !== 1) problems.push('not exactly one h1');
  for (const el of document.querySelectorAll('input:not([type=hidden]), select, textarea')) {
    const named = (el.labels && el.labels.length) || el.getAttribute('aria-label') || el.getAttribute('aria-labelledby');
    if (!named) problems.push('unlabelled ' + el.tagName + ' ' + (el.name || el.id));
  }
  for (const t of document.querySelectorAll('table')) {
    if (!t.querySelector('th')) problems.push('table without header cells');
    if (!t.querySelector('caption')) problems.push('table without caption');
  }
  for (const a of document.querySelectorAll('a, button')) {
    if (!(a.innerText || a.getAttribute('aria-label') || '').trim()) problems.push('link or button without a name');
  }
  for (const s of document.querySelectorAll('svg[role=img]')) {
    if (!s.querySelector('title')) problems.push('chart without a title');
  }
  return problems;
}"""


def accessibility_problems(page: Any) -> list[str]:
    """Structural checks every dashboard page passes: lang, landmarks, one h1, labelled fields, tables
    with header cells and captions, named links and buttons, titled charts."""
    return page.evaluate(A11Y_SCRIPT)
