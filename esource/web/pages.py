"""The dashboard's pages: thin handlers over the services of the other packages.

- Who may see what is `esource.api.auth.require` on the session's Principal (`page(...)`), the same
  dependency the API uses; CRAs are scoped to their sites with `Principal.site_filter()` and refused
  another site's subject with `ensure_site`, exactly as in the API.
- The data come from esource.audit (lineage, subject items, exports), esource.reconciliation (the
  queue, its actions, the SDV report) and the dispatcher; only counts the store's port lacks come from
  esource.web.queries.
- Pages that show clinical values record a DATA_READ audit entry for the user, as the API does.
- Form posts need the session's CSRF token; handlers are plain `def` (run in a worker thread: they
  talk to the database and, for the SDV report, to the EDC).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from esource.api.auth import Principal, Role, ensure_site, get_authenticator, require
from esource.domain.audit import AuditAction, AuditEvent
from esource.domain.model import DiscrepancyKind, ItemKey
from esource.errors import EsourceError
from esource.web import i18n, queries
from esource.web.charts import grouped_bars
from esource.web.grid import (
    build_grid,
    cell_detail,
    conflict_paths,
    item_path,
    item_state,
)
from esource.web.session import (
    COOKIE_PATH,
    LOGIN_COOKIE,
    LOGIN_MAX_AGE,
    SESSION_COOKIE,
    SESSION_MAX_AGE,
    new_session,
    principal_of_user,
    read_session,
    same_token,
)
from esource.web.templating import language, redirect, render, with_headers

log = logging.getLogger("esource.web")

PAGE_SIZE = 50
FORM_ACTIONS: tuple[str, ...] = ("accept", "override", "dismiss", "repush")  # what the pages offer
STATUS_CHOICES: tuple[str, ...] = ("open_all", "open", "in_review", "resolved", "dismissed", "all")
_STATUS_FILTER: dict[str, tuple[str, ...] | None] = {
    "open_all": ("open", "in_review"), "open": ("open",), "in_review": ("in_review",), "resolved": ("resolved",),
    "dismissed": ("dismissed",), "all": None,
}


class LoginRequired(Exception):
    """No valid session: the handler answers with a redirect to the login page."""


class PageError(Exception):
    """An HTML error page (403 when the role model refuses, 404, 409 ...)."""

    def __init__(self, status: int, detail: str | None = None) -> None:
        super().__init__(detail or str(status))
        self.status = status
        self.detail = detail


# ------------------------------------------------------------------------------------------- sessions


def load_principal(request: Request) -> Principal | None:
    """The session's Principal, put where the API's dependencies look for it (request.state.principal),
    or None. The user's roles and sites are read from the store on each request."""
    web = request.app.state.web
    session = read_session(web.signer, request.cookies.get(SESSION_COOKIE))
    if session is None:
        return None
    with web.container.store.uow(read_only=True) as uow:
        principal = principal_of_user(uow.user(session.username))
    if principal is None:
        return None
    request.state.principal = principal
    request.state.web_session = session
    return principal


def page(*roles: Role) -> Callable[[Request], Principal]:
    """A page dependency: a logged-in user admitted by the API's `require(*roles)` (role inclusion and the
    `{study}` scope). No session -> the login page; refused -> a 403 page."""
    api_rule = require(*roles)

    def dependency(request: Request) -> Principal:
        if load_principal(request) is None:
            raise LoginRequired()
        try:
            return api_rule(request, None)
        except HTTPException as exc:
            raise PageError(exc.status_code, str(exc.detail)) from None

    dependency.__name__ = f"page_{'_'.join(sorted(r.value for r in roles))}"
    return dependency


def check_post(request: Request, token: str | None) -> None:
    """CSRF: the session's token must come back with the form, and a cross-site Origin is refused."""
    origin = request.headers.get("origin")
    if origin and origin != "null":
        host = request.headers.get("host", "")
        if origin.split("://", 1)[-1].rstrip("/") != host:
            raise PageError(403, "cross-site form post refused (Origin)")
    session = getattr(request.state, "web_session", None)
    if session is None or not same_token(token, session.csrf):
        raise PageError(403, "the form's security token is missing or expired: reload the page and try again")


def _form_value(form: Any, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


def _safe_next(target: str | None) -> str:
    """Only our own pages after login (no open redirect)."""
    if target and target.startswith("/ui/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui/"


# ------------------------------------------------------------------------------------------- helpers


def _study(request: Request, study: str) -> Any:
    found = request.app.state.web.container.studies.get(study)
    if found is None:
        raise PageError(404, f"no study {study!r} is configured")
    return found


def _now(container: Any) -> dt.datetime:
    clock = getattr(container.store, "_clock", None) or getattr(container.store, "clock", None)
    now = clock.now() if clock is not None else dt.datetime.now(dt.timezone.utc)
    return now if now.tzinfo is not None else now.replace(tzinfo=dt.timezone.utc)


def _site_choices(study: Any, who: Principal) -> list[str]:
    return [s for s in study.spec.study.sites if who.can_see_site(s)]


def _checked_site(who: Principal, site: str | None) -> str | None:
    if not site:
        return None
    try:
        ensure_site(who, site)
    except HTTPException as exc:
        raise PageError(403, str(exc.detail)) from None
    return site


def _enrollment(uow: Any, study_oid: str, subject_key: str, who: Principal) -> Any:
    found = next((e for e in uow.enrollments(study_oid) if e.subject_key == subject_key), None)
    if found is None:
        raise PageError(404, f"no subject {subject_key} in {study_oid}")
    try:
        ensure_site(who, found.site_oid)
    except HTTPException as exc:
        raise PageError(403, str(exc.detail)) from None
    return found


def _read(who: Principal, study_oid: str, what: str, *, subject_key: str | None = None, site_oid: str | None = None,
          item: ItemKey | None = None, **detail: Any) -> AuditEvent:
    """The DATA_READ entry of a page showing clinical data (who read what; never the values)."""
    return AuditEvent(AuditAction.DATA_READ, actor=who.actor, study_oid=study_oid, subject_key=subject_key,
                      site_oid=site_oid, item=item, reason=f"read through the dashboard: {what}",
                      detail={"what": what, "via": "web", **{k: v for k, v in detail.items() if v is not None}})


def _int(value: str | None, default: int = 0, *, lo: int = 0, hi: int = 10**9) -> int:
    try:
        return max(lo, min(hi, int(value))) if value not in (None, "") else default
    except ValueError:
        return default


def _float(value: str | None) -> float | None:
    try:
        x = float(value) if value not in (None, "") else None
    except ValueError:
        return None
    return x if x is None or x >= 0 else None


def _date(value: str | None) -> dt.date | None:
    try:
        return dt.date.fromisoformat(value) if value else None
    except ValueError:
        return None


def _names(study: Any) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    md = study.metadata
    return ({k: v.name for k, v in md.forms.items()}, {k: v.name for k, v in md.study_events.items()},
            {k: v.name for k, v in md.items.items()})


def _recon(container: Any) -> Any:
    from esource.reconciliation.actions import Reconciliation

    return Reconciliation.from_container(container)


# ------------------------------------------------------------------------------------------- router


def build_router(web: Any) -> APIRouter:
    container = web.container
    router = APIRouter(prefix="/ui", include_in_schema=False)
    viewer = page(Role.CRA)  # cra (own sites), data_manager, admin: as the API's read endpoints
    decider = page(Role.DATA_MANAGER)  # as the API's discrepancy actions

    # ---------------------------------------------------------------- login / logout / home

    @router.get("/")
    def home(request: Request) -> Response:
        who = load_principal(request)
        if who is None:
            return redirect(request, "/ui/login")
        studies = web.visible_studies(who)
        if len(studies) == 1:
            return redirect(request, f"/ui/studies/{studies[0].oid}/")
        return render(request, "studies.html", {})

    @router.get("/login")
    def login_form(request: Request, next: str | None = None) -> Response:
        if load_principal(request) is not None:
            return redirect(request, _safe_next(next))
        return _login_page(request, next, error=None)

    def _login_page(request: Request, next_url: str | None, *, error: str | None, username: str = "",
                    status: int = 200) -> Response:
        import secrets

        nonce = secrets.token_urlsafe(24)
        response = render(request, "login.html", {"nonce": nonce, "next": _safe_next(next_url), "error": error,
                                                   "username": username, "demo_accounts": _demo_accounts(container)},
                          status=status)
        response.set_cookie(LOGIN_COOKIE, web.signer.dumps("login", {"n": nonce, "iat": int(_epoch())}),
                            max_age=LOGIN_MAX_AGE, path=COOKIE_PATH, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        return response

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = await request.form()
        t = i18n.Translator(language(request))
        username = (_form_value(form, "username") or "").strip()[:100]
        password = _form_value(form, "password") or ""
        next_url = _form_value(form, "next")
        cookie = web.signer.loads("login", request.cookies.get(LOGIN_COOKIE), max_age=LOGIN_MAX_AGE)
        origin = request.headers.get("origin")
        cross = bool(origin and origin != "null" and origin.split("://", 1)[-1].rstrip("/") != request.headers.get("host"))
        if cookie is None or cross or not same_token(_form_value(form, "nonce"), cookie.get("n")):
            return _login_page(request, next_url, error=t("login.expired"), username=username, status=400)
        if not username or not password:
            return _login_page(request, next_url, error=t("login.failed"), username=username, status=401)
        principal = await run_in_threadpool(get_authenticator(container).authenticate_password, username, password)
        if principal is None:
            log.info("dashboard login refused", extra={"channel": "web", "reason": "bad credentials"})
            return _login_page(request, next_url, error=t("login.failed"), username=username, status=401)
        if not principal.has(Role.CRA):
            return _login_page(request, next_url, error=t("login.no_access"), username=username, status=403)
        response = redirect(request, _safe_next(next_url))
        response.set_cookie(SESSION_COOKIE, web.signer.dumps("session", new_session(principal.username)),
                            max_age=SESSION_MAX_AGE, path=COOKIE_PATH, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        response.delete_cookie(LOGIN_COOKIE, path=COOKIE_PATH)
        log.info("dashboard login", extra={"channel": "web", "kind": "login"})
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        form = await request.form()
        if await run_in_threadpool(load_principal, request) is not None:
            check_post(request, _form_value(form, "csrf_token"))
        response = redirect(request, "/ui/login")
        response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
        return response

    # ---------------------------------------------------------------- overview

    @router.get("/studies/{study}/")
    def overview(request: Request, study: str, who: Principal = Depends(viewer)) -> Response:
        s = _study(request, study)
        now = _now(container)
        sites = who.site_filter()
        with container.store.uow(read_only=True) as uow:
            site_stats = queries.site_overview(uow, s.oid, s.spec.study.sites, sites, now)
            series = queries.daily_series(uow, s.oid, sites, now)
            activity = queries.edc_activity(uow, s.oid)
            cov = queries.coverage(uow, s, sites, now.date())
        t = i18n.Translator(language(request))
        chart = grouped_bars([d.day.strftime("%m-%d") for d in series], [t("chart.transfers"), t("chart.discrepancies")],
                             [[d.transfers for d in series], [d.discrepancies for d in series]], label_every=2)
        endpoints = [e for e in web.endpoint_states() if s.oid in e.get("studies", []) or "*" in e.get("studies", [])]
        kinds = sorted({k for st in site_stats for k in st.by_kind})
        totals = {k: sum(st.by_kind.get(k, 0) for st in site_stats) for k in kinds}
        form_names, _, _ = _names(s)
        return render(request, "overview.html", {
            "study": s, "section": "nav.overview", "now": now, "sites": site_stats, "series": series, "chart": chart,
            "activity": activity, "endpoints": endpoints, "coverage": cov, "kinds": kinds, "kind_totals": totals,
            "form_names": form_names})

    # ---------------------------------------------------------------- subjects

    @router.get("/studies/{study}/subjects")
    def subjects(request: Request, study: str, site: str | None = None, who: Principal = Depends(viewer)) -> Response:
        s = _study(request, study)
        site = _checked_site(who, site)
        sites = frozenset({site}) if site else who.site_filter()
        with container.store.uow(read_only=True) as uow:
            lines = queries.subject_lines(uow, s.oid, sites)
        return render(request, "subjects.html", {"study": s, "section": "nav.subjects", "lines": lines,
                                                 "site": site or "", "site_choices": _site_choices(s, who)})

    @router.get("/studies/{study}/subjects/{subject}")
    def subject(request: Request, study: str, subject: str, event: str | None = None, erk: str | None = None,
                form: str | None = None, who: Principal = Depends(viewer)) -> Response:
        from esource.audit.lineage import subject_items
        from esource.reconciliation.model import OPEN_STATUSES, DiscrepancyFilter

        s = _study(request, study)
        with container.store.uow(read_only=True) as uow:
            enrollment = _enrollment(uow, s.oid, subject, who)
            items = subject_items(uow, s.oid, subject, container.pseudonymizer)
            uow.audit(_read(who, s.oid, "subject items", subject_key=subject, site_oid=enrollment.site_oid,
                            items=len(items), cell=f"{event}/{form}" if event and form else None))
        records, _total = _recon(container).query(
            DiscrepancyFilter(s.oid, subject_keys=(subject,), statuses=OPEN_STATUSES), limit=None)
        grid = build_grid(s, items, records)
        conflicts = conflict_paths(records)
        states = {i.key: item_state(i.transfer_status, item_path(i.key) in conflicts) for i in items}
        detail = cell_detail(s, items, records, event, erk or None, form) if event and form else None
        form_names, event_names, item_names = _names(s)
        return render(request, "subject.html", {
            "study": s, "section": "nav.subjects", "subject": enrollment, "grid": grid, "detail": detail,
            "item_states": states, "item_count": len(items), "open_count": len(records), "sel_event": event or "",
            "sel_erk": erk or "", "sel_form": form or "", "form_names": form_names, "event_names": event_names,
            "item_names": item_names})

    @router.get("/studies/{study}/subjects/{subject}/lineage")
    def lineage(request: Request, study: str, subject: str, event: str = "", form: str = "", group: str = "",
                item: str = "", erk: str | None = None, repeat: str | None = None,
                who: Principal = Depends(viewer)) -> Response:
        from esource.audit.lineage import item_lineage

        s = _study(request, study)
        if not (event and form and group and item):
            raise PageError(422, "a value is named by event, form, group and item (and erk, repeat when repeated)")
        key = ItemKey(s.oid, subject, event, erk or None, form, group, repeat or None, item)
        with container.store.uow(read_only=True) as uow:
            enrollment = _enrollment(uow, s.oid, subject, who)
            found = item_lineage(uow, key, container.pseudonymizer)
            if found is None:
                raise PageError(404, f"subject {subject} has no value and no history for {item_path(key)}")
            uow.audit(_read(who, s.oid, "lineage", subject_key=subject, site_oid=enrollment.site_oid, item=key,
                            entries=len(found.history)))
        return render(request, "lineage.html", {"study": s, "section": "nav.subjects", "key": key, "lin": found})

    # ---------------------------------------------------------------- reconciliation queue

    def queue_filter(s: Any, who: Principal, f: dict[str, Any], now: dt.datetime) -> Any:
        from esource.reconciliation.actions import age_range
        from esource.reconciliation.model import DiscrepancyFilter

        site = _checked_site(who, f["site"])
        sites = who.site_filter()
        site_oids = (site,) if site else (None if sites is None else tuple(sorted(sites)))
        created_from, created_to = age_range(now, min_age_days=_float(f["min_age"]), max_age_days=_float(f["max_age"]))
        return DiscrepancyFilter(
            s.oid, site_oids=site_oids, subject_keys=(f["subject"],) if f["subject"] else None,
            kinds=(f["kind"],) if f["kind"] else None, statuses=_STATUS_FILTER.get(f["status"], ("open", "in_review")),
            form_oid=f["form"] or None, created_from=created_from, created_to=created_to)

    @router.get("/studies/{study}/discrepancies")
    def queue(request: Request, study: str, who: Principal = Depends(viewer)) -> Response:
        s = _study(request, study)
        q = request.query_params
        f = {"kind": q.get("kind") or "", "site": q.get("site") or "", "status": q.get("status") or "open_all",
             "subject": (q.get("subject") or "").strip(), "min_age": q.get("min_age") or "",
             "max_age": q.get("max_age") or "", "form": q.get("form") or ""}
        if f["status"] not in _STATUS_FILTER:
            f["status"] = "open_all"
        if f["kind"] and f["kind"] not in DiscrepancyKind._value2member_map_:
            f["kind"] = ""
        now = _now(container)
        offset = _int(q.get("offset"))
        rec = _recon(container)
        records, total = rec.query(queue_filter(s, who, f, now), limit=PAGE_SIZE, offset=offset)
        rec.record_read(actor=who.actor, study_oid=s.oid, site_oid=f["site"] or None, subject_key=f["subject"] or None,
                        what="discrepancies", detail={"count": len(records), "offset": offset, "via": "web"})
        return render(request, "queue.html", {
            "study": s, "section": "nav.queue", "records": records, "total": total, "limit": PAGE_SIZE,
            "offset": offset, "f": f, "now": now, "can_act": who.has(Role.DATA_MANAGER),
            "kind_choices": [k.value for k in DiscrepancyKind], "site_choices": _site_choices(s, who),
            "status_choices": STATUS_CHOICES, "bulk_actions": FORM_ACTIONS, "error": None})

    def discrepancy_page(request: Request, s: Any, discrepancy_id: int, who: Principal, *, notice: str | None = None,
                         error: str | None = None, status: int = 200) -> Response:
        from esource.reconciliation.model import ReconciliationError

        rec_svc = _recon(container)
        try:
            rec = rec_svc.get(s.oid, discrepancy_id)
        except ReconciliationError as exc:
            raise PageError(getattr(exc, "status_code", 404), str(exc)) from None
        _checked_site(who, rec.site_oid) if rec.site_oid else _require_all_sites(who)
        detail = rec_svc.detail(s.oid, discrepancy_id)
        rec_svc.record_read(actor=who.actor, study_oid=s.oid, site_oid=rec.site_oid,
                            subject_key=rec.discrepancy.subject_key, what="discrepancy",
                            detail={"discrepancy_id": discrepancy_id, "via": "web"})
        with container.store.uow(read_only=True) as uow:
            entries, _ = uow.audit_entries(study_oid=s.oid, subject_key=rec.discrepancy.subject_key,
                                           actions=[a.value for a in (
                                               AuditAction.DISCREPANCY_OPENED, AuditAction.DISCREPANCY_CHANGED,
                                               AuditAction.DISCREPANCY_RESOLVED, AuditAction.DISCREPANCY_DISMISSED,
                                               AuditAction.VALUE_HELD, AuditAction.VALUE_MAPPED,
                                               AuditAction.TRANSFER_REPUSHED)])
        history = [e for e in entries if _about(e, discrepancy_id, rec)]
        actions = [a for a in FORM_ACTIONS if a in detail.get("actions", [])]
        return render(request, "discrepancy.html", {
            "study": s, "section": "nav.queue", "rec": rec, "now": _now(container), "item": detail.get("item"),
            "source": detail.get("source") or {}, "proposed": detail.get("proposed") or {}, "sent": detail.get("sent"),
            "edc": detail.get("edc"), "actions": actions, "can_act": who.has(Role.DATA_MANAGER), "history": history,
            "notice": notice, "error": error}, status=status)

    @router.get("/studies/{study}/discrepancies/{discrepancy_id}")
    def discrepancy(request: Request, study: str, discrepancy_id: str, who: Principal = Depends(viewer)) -> Response:
        s = _study(request, study)
        t = i18n.Translator(language(request))
        q = request.query_params
        notice = None
        if q.get("done") in FORM_ACTIONS:
            notice = t("act.done", action=t.v("act", q["done"]))
            if q.get("outbox"):
                notice += " " + t("act.queued", n=_int(q.get("n")), outbox=_int(q.get("outbox")))
        return discrepancy_page(request, s, _id(discrepancy_id), who, notice=notice)

    @router.post("/studies/{study}/discrepancies/{discrepancy_id}/act")
    async def act(request: Request, study: str, discrepancy_id: str, who: Principal = Depends(decider)) -> Response:
        form = await request.form()
        return await run_in_threadpool(act_sync, request, study, _id(discrepancy_id), who, form)

    def act_sync(request: Request, study: str, discrepancy_id: int, who: Principal, form: Any) -> Response:
        s = _study(request, study)
        check_post(request, _form_value(form, "csrf_token"))
        action = _form_value(form, "action") or ""
        reason = (_form_value(form, "reason") or "").strip()
        value = _form_value(form, "value")
        t = i18n.Translator(language(request))
        if action not in FORM_ACTIONS:
            raise PageError(422, f"unknown action {action!r}")
        rec_svc = _recon(container)
        try:
            rec = rec_svc.get(s.oid, discrepancy_id)
            _checked_site(who, rec.site_oid) if rec.site_oid else _require_all_sites(who)
            if not reason:
                raise _Invalid("a reason is required")
            result = rec_svc.act(s.oid, discrepancy_id, action, actor=who.actor, reason=reason,
                                 value=value if action == "override" else None)
        except (EsourceError, _Invalid) as exc:
            code = getattr(exc, "status_code", 422)
            return discrepancy_page(request, s, discrepancy_id, who, error=t("act.failed", reason=str(exc)),
                                    status=code if code in (404, 409, 422) else 409)
        url = f"/ui/studies/{quote(s.oid)}/discrepancies/{discrepancy_id}?done={action}"
        if result.outbox_id:
            url += f"&outbox={result.outbox_id}&n={len(result.items)}"
        return redirect(request, url)

    @router.post("/studies/{study}/discrepancies/bulk")
    async def bulk(request: Request, study: str, who: Principal = Depends(decider)) -> Response:
        form = await request.form()
        return await run_in_threadpool(bulk_sync, request, study, who, form)

    def bulk_sync(request: Request, study: str, who: Principal, form: Any) -> Response:
        from esource.reconciliation.model import OPEN_STATUSES, DiscrepancyFilter

        s = _study(request, study)
        check_post(request, _form_value(form, "csrf_token"))
        action = _form_value(form, "action") or ""
        reason = (_form_value(form, "reason") or "").strip()
        value = _form_value(form, "value") or None
        ids = tuple(sorted({_int(x, -1) for x in form.getlist("ids") if isinstance(x, str)} - {-1}))
        if action not in FORM_ACTIONS:
            raise PageError(422, f"unknown action {action!r}")
        t = i18n.Translator(language(request))
        if not ids or not reason or (action == "override" and not value):
            why = t("bulk.need_ids") if not ids else t("bulk.need_value") if reason else t("bulk.need_reason")
            return _queue_error(request, s, who, why)
        sites = who.site_filter()
        flt = DiscrepancyFilter(s.oid, site_oids=None if sites is None else tuple(sorted(sites)), ids=ids,
                                statuses=OPEN_STATUSES)
        try:
            result = _recon(container).bulk(flt, action, actor=who.actor, reason=reason,
                                            value=value if action == "override" else None)
        except EsourceError as exc:
            return _queue_error(request, s, who, t("act.failed", reason=str(exc)))
        return render(request, "bulk_result.html", {"study": s, "section": "nav.queue", "result": result})

    def _queue_error(request: Request, s: Any, who: Principal, message: str) -> Response:
        rec = _recon(container)
        f = {"kind": "", "site": "", "status": "open_all", "subject": "", "min_age": "", "max_age": "", "form": ""}
        now = _now(container)
        records, total = rec.query(queue_filter(s, who, f, now), limit=PAGE_SIZE, offset=0)
        return render(request, "queue.html", {
            "study": s, "section": "nav.queue", "records": records, "total": total, "limit": PAGE_SIZE, "offset": 0,
            "f": f, "now": now, "can_act": True, "kind_choices": [k.value for k in DiscrepancyKind],
            "site_choices": _site_choices(s, who), "status_choices": STATUS_CHOICES, "bulk_actions": FORM_ACTIONS,
            "error": message}, status=422)

    # ---------------------------------------------------------------- audit trail

    @router.get("/studies/{study}/audit")
    def audit(request: Request, study: str, who: Principal = Depends(viewer)) -> Response:
        from esource.audit.export import export_source_id

        s = _study(request, study)
        q = request.query_params
        f = {"subject": (q.get("subject") or "").strip(), "item": (q.get("item") or "").strip(),
             "action": q.get("action") or "", "actor": (q.get("actor") or "").strip(), "since": q.get("since") or "",
             "until": q.get("until") or "", "reads": q.get("reads") == "1"}
        known = [a.value for a in AuditAction]
        if f["action"] and f["action"] not in known:
            f["action"] = ""
        actions = [f["action"]] if f["action"] else (None if f["reads"] else [a for a in known if a != "data.read"])
        since, until = _date(f["since"]), _date(f["until"])
        offset = _int(q.get("offset"))
        with container.store.uow(read_only=True) as uow:
            site = _enrollment(uow, s.oid, f["subject"], who).site_oid if f["subject"] else None
            entries, total = uow.audit_entries(
                study_oid=s.oid, subject_key=f["subject"] or None, item_oid=f["item"] or None, actions=actions,
                actor=f["actor"] or None,
                since=dt.datetime.combine(since, dt.time(), dt.timezone.utc) if since else None,
                until=dt.datetime.combine(until + dt.timedelta(days=1), dt.time(), dt.timezone.utc) if until else None,
                sites=who.site_filter(), limit=PAGE_SIZE, offset=offset, newest_first=True)
            uow.audit(_read(who, s.oid, "audit trail", subject_key=f["subject"] or None, site_oid=site,
                            returned=len(entries), total=total, offset=offset))
        sources = {}
        for e in entries:
            src = e.event.source
            if src is not None:
                sources[e.id] = {"resource_type": src.resource_type,
                                 "id": None if src.resource_type == "Patient" else src.id, "version": src.version,
                                 "source_id": export_source_id(src, container.pseudonymizer)}
        return render(request, "audit.html", {
            "study": s, "section": "nav.audit", "entries": entries, "total": total, "limit": PAGE_SIZE,
            "offset": offset, "f": f, "action_choices": known, "sources": sources})

    @router.get("/studies/{study}/audit/export")
    def audit_export(request: Request, study: str, format: str = "csv", subject: str | None = None,
                     who: Principal = Depends(viewer)) -> Response:
        from esource.audit.export import export_study

        s = _study(request, study)
        if format not in ("csv", "odm"):
            raise PageError(422, "format must be csv or odm")
        if subject:
            with container.store.uow(read_only=True) as uow:
                _enrollment(uow, s.oid, subject, who)
        data = export_study(container.store, s.oid, format, container.pseudonymizer,
                            metadata_version_oid=s.metadata_version_oid, subject_key=subject or None,
                            sites=who.site_filter(), actor=who.actor, via="web")
        name = f"audit-{s.oid}{'-' + subject if subject else ''}.{'csv' if format == 'csv' else 'xml'}"
        return with_headers(Response(data, media_type="text/csv; charset=utf-8" if format == "csv" else "application/xml",
                                     headers={"Content-Disposition": f'attachment; filename="{name}"'}))

    # ---------------------------------------------------------------- SDV report

    def sdv_report(s: Any, who: Principal, site: str | None, subject: str | None) -> tuple[Any, str | None]:
        from esource.reconciliation.report import reconcile

        connector = container.connectors.get(s.oid) or container.connectors.get("*")
        if connector is None:
            return None, "no_connector"
        try:
            can = bool(connector.capabilities().read_back)
        except Exception:  # noqa: BLE001 - a connector that cannot say: no read-back
            can = False
        if not can:
            return None, "no_read_back"
        if subject:
            with container.store.uow(read_only=True) as uow:
                _enrollment(uow, s.oid, subject, who)
        report = reconcile(container.store.uow, connector, s.oid, site=site, subject=subject,
                           sites_allowed=who.site_filter(), clock=_recon(container).clock)
        _recon(container).record_read(actor=who.actor, study_oid=s.oid, site_oid=site, subject_key=subject,
                                      what="reconciliation_report", detail={"counts": report.counts, "via": "web"})
        return report, None

    @router.get("/studies/{study}/sdv")
    def sdv(request: Request, study: str, site: str | None = None, subject: str | None = None, all: str | None = None,
            who: Principal = Depends(viewer)) -> Response:
        from esource.reconciliation.report import CATEGORIES

        s = _study(request, study)
        site = _checked_site(who, site)
        subject = (subject or "").strip() or None
        report, problem = sdv_report(s, who, site, subject)
        t = i18n.Translator(language(request))
        return render(request, "sdv.html", {
            "study": s, "section": "nav.sdv", "report": report, "error": t(f"sdv.{problem}") if problem else None,
            "categories": CATEGORIES, "site_choices": _site_choices(s, who),
            "f": {"site": site or "", "subject": subject or "", "all": all == "1"}})

    @router.get("/studies/{study}/sdv/export")
    def sdv_export(request: Request, study: str, site: str | None = None, subject: str | None = None,
                   who: Principal = Depends(viewer)) -> Response:
        s = _study(request, study)
        site = _checked_site(who, site)
        subject = (subject or "").strip() or None
        report, problem = sdv_report(s, who, site, subject)
        if report is None:
            raise PageError(409, problem)
        name = f"reconciliation-{s.oid}{'-' + site if site else ''}{'-' + subject if subject else ''}.csv"
        return with_headers(Response(report.to_csv(), media_type="text/csv; charset=utf-8",
                                     headers={"Content-Disposition": f'attachment; filename="{name}"'}))

    # ---------------------------------------------------------------- mapping coverage

    @router.get("/studies/{study}/mapping")
    def mapping(request: Request, study: str, who: Principal = Depends(viewer)) -> Response:
        s = _study(request, study)
        with container.store.uow(read_only=True) as uow:
            stats = queries.rule_stats(uow, s.oid, who.site_filter())
            uow.audit(_read(who, s.oid, "mapping coverage", rules=len(stats)))  # last errors quote values
        by_form: dict[str, list[Any]] = {}
        for r in stats:
            by_form.setdefault(r.form_oid, []).append(r)
        order = {f: i for i, f in enumerate(s.spec.forms)}
        form_names, _, _ = _names(s)
        return render(request, "mapping.html", {
            "study": s, "section": "nav.mapping", "form_names": form_names,
            "by_form": sorted(by_form.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))})

    @router.get("/studies/{study}")
    def study_home(request: Request, study: str, who: Principal = Depends(viewer)) -> Response:
        return redirect(request, f"/ui/studies/{quote(_study(request, study).oid)}/")

    # ---------------------------------------------------------------- anything else under /ui

    @router.get("/{rest:path}")
    def not_found(request: Request, rest: str) -> Response:
        raise PageError(404, f"no page /ui/{rest}")

    return router


def _id(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise PageError(404, f"no discrepancy {text!r}")
    return int(text)


class _Invalid(Exception):
    status_code = 422


def _require_all_sites(who: Principal) -> None:
    """A discrepancy whose subject has no enrollment site: only callers without a site restriction."""
    if who.site_filter() is not None:
        raise PageError(403, f"{who.username} may only see the sites they are assigned to")


def _about(entry: Any, discrepancy_id: int, rec: Any) -> bool:
    """An audit entry about this discrepancy: its id in the entry's detail, or - for the entry that opened
    it, which predates the id - the same kind and cell (and message, for one not about an item)."""
    d = entry.event.detail or {}
    if d.get("discrepancy_id") == discrepancy_id or discrepancy_id in (d.get("discrepancy_ids") or []):
        return True
    if entry.event.action in (AuditAction.DISCREPANCY_OPENED, AuditAction.VALUE_HELD):
        disc = rec.discrepancy
        same = (d.get("kind") == disc.kind.value and d.get("item_oid") == disc.item_oid
                and d.get("study_event_oid") == disc.study_event_oid and d.get("form_oid") == disc.form_oid
                and d.get("item_group_repeat_key") == disc.item_group_repeat_key)
        return same and (disc.item_oid is not None or entry.event.reason == disc.message)
    return False


def _demo_accounts(container: Any) -> list[Any]:
    """Demo mode: the demo accounts of the dashboard's roles, as `esource demo` creates them (public values)."""
    if container.settings.mode != "demo" or not container.studies:
        return []
    from esource.api.auth import demo_credentials

    study = container.studies[min(container.studies)]
    wanted = (Role.CRA, Role.DATA_MANAGER, Role.ADMIN)
    return [c for c in demo_credentials(study.oid, study.spec.study.sites[0]) if c.role in wanted]


def _epoch() -> float:
    import time

    return time.time()


__all__ = ["LoginRequired", "PageError", "build_router", "page"]
