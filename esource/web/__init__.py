"""The web dashboard for CRAs, data managers and admins, served under `/ui` by the service's app.

    app = create_app(container)      # adapters/http.py calls mount_web(app, container)

Server-rendered pages (Jinja2, a little vanilla JavaScript, SVG charts drawn on the server: no build
step, nothing fetched at run time) over the services of esource.audit and esource.reconciliation:
study overview, subject view with lineage, reconciliation queue with its actions, audit trail and SDV
report with CSV export, mapping coverage; in French and English.

Authentication is a signed session cookie (esource.web.session) that yields the same Principal the API
works with; the role model is the API's (`esource.api.auth.require`). Paths under `/ui` are therefore
exempt from the API's bearer check at the app's edge (adapters/http.py) and never act as the demo
admin: every page needs a login, in demo mode too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

WEB_PREFIX = "/ui"

__all__ = ["WEB_PREFIX", "WebContext", "mount_web"]


@dataclass
class WebContext:
    """What the pages share (app.state.web)."""

    container: Any
    signer: Any
    env: Any
    extras: dict[str, Any] = field(default_factory=dict)

    def visible_studies(self, who: Any) -> list[Any]:
        if who is None:
            return []
        return [s for oid, s in sorted(self.container.studies.items()) if who.can_see_study(oid)]

    def endpoint_states(self) -> list[dict[str, Any]]:
        """The dispatcher's view of each EDC connection (circuit breaker, credentials stop)."""
        dispatcher = getattr(self.container, "dispatcher", None)
        states = getattr(dispatcher, "endpoint_states", None)
        if not callable(states):
            return []
        try:
            return list(states())
        except Exception:  # noqa: BLE001 - never let the status panel take the page down
            return []


def mount_web(app: Any, container: Any) -> None:
    """Add the dashboard's routes, static files and error pages to the service's FastAPI app."""
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.staticfiles import StaticFiles

    from esource.web.pages import LoginRequired, PageError, build_router
    from esource.web.session import Signer, session_key
    from esource.web.templating import STATIC, make_env, redirect, render

    web = WebContext(container, Signer(session_key(container)), make_env())
    app.state.web = web
    app.mount(f"{WEB_PREFIX}/static", StaticFiles(directory=str(STATIC)), name="web-static")
    app.include_router(build_router(web))

    async def login_required(request: Request, exc: Exception) -> Response:
        from urllib.parse import quote

        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return redirect(request, f"{WEB_PREFIX}/login?next={quote(target, safe='')}")

    async def page_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, PageError)
        from starlette.concurrency import run_in_threadpool

        if getattr(request.state, "web_session", None) is None:  # e.g. raised before the session was read
            from esource.web.pages import load_principal

            await run_in_threadpool(load_principal, request)
        study = container.studies.get(request.path_params.get("study") or "")  # keep the navigation when known
        who = getattr(request.state, "principal", None)
        if study is not None and (who is None or not who.can_see_study(study.oid)):
            study = None
        return render(request, "error.html", {"status": exc.status, "detail": exc.detail, "study": study},
                      status=exc.status)

    app.add_exception_handler(LoginRequired, login_required)
    app.add_exception_handler(PageError, page_error)
