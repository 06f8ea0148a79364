"""Jinja2 environment and the one `render` every page goes through: language, translations, the
caller, the CSRF token, navigation and the security headers of every dashboard response."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from esource.web import i18n
from esource.web.session import COOKIE_PATH, LANG_COOKIE

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"

#: Every dashboard answer: no inline script or style (CSP), never framed, never cached (clinical data).
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def make_env() -> Environment:
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html", "xml"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["when"] = fmt_when
    env.filters["day"] = fmt_day
    env.filters["ucfirst"] = lambda s: s[:1].upper() + s[1:] if isinstance(s, str) else s
    env.globals["qs"] = query_string
    return env


def fmt_when(value: dt.datetime | str | None) -> str:
    """UTC, to the minute: `2025-03-01 09:00 UTC` (the same in both languages)."""
    if value is None or value == "":
        return "–"
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def fmt_day(value: dt.date | None) -> str:
    return "–" if value is None else value.isoformat()


def query_string(base: dict[str, Any] | None = None, **changes: Any) -> str:
    """`?a=1&b=2` from the current filters with `changes` applied (None removes a key)."""
    params: dict[str, Any] = dict(base or {})
    params.update(changes)
    flat: list[tuple[str, str]] = []
    for k, v in params.items():
        if v is None or v == "" or v == []:
            continue
        for x in v if isinstance(v, (list, tuple)) else [v]:
            flat.append((k, str(x)))
    return "?" + urlencode(flat) if flat else "?"


def language(request: Request) -> str:
    """?lang= (also remembered in a cookie), else the cookie, else Accept-Language, else English."""
    asked = request.query_params.get("lang")
    if asked in i18n.LANGUAGES:
        return asked
    cookie = request.cookies.get(LANG_COOKIE)
    if cookie in i18n.LANGUAGES:
        return cookie
    return i18n.negotiate(request.headers.get("accept-language"))


def with_headers(response: Response) -> Response:
    for k, v in SECURITY_HEADERS.items():
        response.headers.setdefault(k, v)
    return response


def remember_language(request: Request, response: Response) -> None:
    asked = request.query_params.get("lang")
    if asked in i18n.LANGUAGES and request.cookies.get(LANG_COOKIE) != asked:
        response.set_cookie(LANG_COOKIE, asked, max_age=365 * 24 * 3600, path=COOKIE_PATH, httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")


def render(request: Request, name: str, context: dict[str, Any], *, status: int = 200) -> HTMLResponse:
    web = request.app.state.web
    lang = language(request)
    t = i18n.Translator(lang)
    session = getattr(request.state, "web_session", None)
    who = getattr(request.state, "principal", None)
    here = {k: v for k, v in request.query_params.multi_items() if k != "lang"}
    ctx = {
        "request": request, "t": t, "lang": lang, "other_langs": [x for x in i18n.LANGUAGES if x != lang],
        "who": who if session is not None else None, "csrf": session.csrf if session is not None else "",
        "path": request.url.path, "here": here, "studies": web.visible_studies(who) if session is not None else [],
        "demo": web.container.settings.mode == "demo", "static": "/ui/static",
    }
    ctx.update(context)
    html = web.env.get_template(name).render(**ctx)
    response = HTMLResponse(html, status_code=status)
    remember_language(request, response)
    return with_headers(response)  # type: ignore[return-value]


def redirect(request: Request, url: str) -> Response:
    response = RedirectResponse(url, status_code=303)
    remember_language(request, response)
    return with_headers(response)
