"""The web console at `/console`: server-rendered pages for the people who run, pay for and
audit Bastion.

Pages are Jinja2 templates rendered here; the only scripts are vendored files served from
`/console/static/` (htmx, uPlot, and the console's own charts.js), so the Content-Security-
Policy allows no inline code at all. Sign-in is the directory's (`POST /auth/login`'s own
throttled, audited path) or the IdP's (OIDC authorization code + PKCE, console/oidc.py); the
session is the same `bss-` token the CLI gets, in a cookie.
Every change (minting or revoking a key, signing out) calls the very handler the API uses, so
it is checked and audit-recorded in one place.

Roles decide pages (PAGES); a page a role may not see answers 404, as the admin API does for
objects outside a caller's reach.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import jinja2
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from bastion.admin import api as admin_api
from bastion.audit import api as audit_api
from bastion.audit.api import Key as AuditKey
from bastion.console import finance, oidc, queries
from bastion.console.security import (
    NONCE_COOKIE,
    SESSION_COOKIE,
    SecurityHeaders,
    check_csrf,
    clear_cookie,
    csrf_token,
    nonce,
    set_cookie,
    viewer,
)
from bastion.core.bounds import Label, Name, TimeSpec, UserName
from bastion.core.errors import BastionError, NotFound
from bastion.identity import api as identity_api
from bastion.identity.access import Access
from bastion.identity.keys import list_keys
from bastion.identity.principal import Principal
from bastion.identity.roles import Actor

HERE = Path(__file__).parent
#: A limit used to this share or more is shown as near.
NEAR = Decimal("0.8")
#: Audit entries one search shows.
AUDIT_PAGE = 100
#: Page → the roles that see it (and find it in the navigation). Anyone else gets 404.
PAGES: dict[str, frozenset[str]] = {
    "overview": frozenset({"admin", "auditor", "team-admin", "member"}),
    "usage": frozenset({"admin", "auditor", "team-admin"}),
    "keys": frozenset({"admin", "team-admin", "member"}),
    "models": frozenset({"admin", "team-admin"}),
    "limits": frozenset({"admin", "team-admin"}),
    # Reading the trail is the auditor's alone, as on /audit (admins administer it, unread).
    "audit": frozenset({"auditor"}),
}
TITLES = {
    "overview": "Overview",
    "usage": "Usage and spend",
    "keys": "Keys",
    "models": "Models",
    "limits": "Limits",
    "audit": "Audit",
}
# The finance pages (Chargeback, Cost case): admins and auditors (console/finance.py).
PAGES.update(finance.FINANCE_PAGES)
TITLES.update(finance.FINANCE_TITLES)

templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)

Handler = Callable[[Request, Principal], Awaitable[Response]]


def scope_of(who: Principal) -> queries.Scope:
    """Whose usage a viewer reads: admins and auditors everyone's, a team-admin the team's, a
    member their own."""
    if who.role in ("admin", "auditor"):
        return queries.Scope()
    if who.role == "team-admin":
        return queries.Scope(team=who.team)
    return queries.Scope(team=who.team, user=who.user)


def render(
    request: Request, template: str, who: Principal | None, status: int = 200, **context: Any
) -> HTMLResponse:
    browser_nonce, new = nonce(request)
    page = templates.get_template(template).render(
        who=who,
        nav=[(p, TITLES[p]) for p, roles in PAGES.items() if who and who.role in roles],
        csrf=csrf_token(request, browser_nonce),
        **context,
    )
    response = HTMLResponse(page, status_code=status)
    if new:
        set_cookie(response, NONCE_COOKIE, browser_nonce)
    return response


def not_found(request: Request, who: Principal | None) -> HTMLResponse:
    return render(request, "error.html", who, 404, message="There is no such page.")


def page(name: str) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """A route for signed-in viewers whose role sees page `name` (others: 404)."""

    def wrap(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            who = await viewer(request)
            if who is None:
                if request.url.path.startswith("/console/api/"):
                    return JSONResponse({"error": "sign in first"}, status_code=401)
                return RedirectResponse("/console/login", status_code=303)
            if who.role not in PAGES[name]:
                return not_found(request, who)
            try:
                return await handler(request, who)
            except BastionError as exc:
                if request.url.path.startswith("/console/api/"):
                    return JSONResponse(exc.body(), status_code=exc.status)
                return render(request, "error.html", who, exc.status, message=exc.message)

        return endpoint

    return wrap


# -- signing in and out ---------------------------------------------------------------------------
def login_page(
    request: Request, status: int = 200, error: str | None = None, username: str = ""
) -> HTMLResponse:
    """The sign-in page: the directory's form and a button per IdP, whichever are configured."""
    directory = request.app.state.keys.login is not None
    return render(request, "login.html", None, status, directory=directory, error=error,
                  username=username, idps=oidc.providers(request))  # fmt: skip


async def login_form(request: Request) -> Response:
    if await viewer(request) is not None:
        return RedirectResponse("/console/", status_code=303)
    return login_page(request)


async def login_submit(request: Request) -> Response:
    form: dict[str, str] = {}
    try:
        form = await check_csrf(request)
        body = identity_api.LoginIn(
            username=form.get("username", ""), password=form.get("password", "")
        )
        result = await identity_api.sign_in(request, body)
    except ValidationError:
        return login_page(request, 400, "Enter your user name and password.")
    except BastionError as exc:  # wrong password, throttled, not mapped, directory down
        response = login_page(request, exc.status, exc.message, form.get("username", ""))
        response.headers.update(exc.headers)
        return response
    response = RedirectResponse("/console/", status_code=303)
    max_age = max(1, int(result["expires_at"]) - int(datetime.now(UTC).timestamp()))
    set_cookie(response, SESSION_COOKIE, result["token"], max_age)
    return response


async def oidc_start(request: Request) -> Response:
    try:
        return await oidc.begin(request)
    except BastionError as exc:  # unknown IdP, IdP unreachable
        return login_page(request, exc.status, exc.message)


async def oidc_callback(request: Request) -> Response:
    try:
        result = await oidc.complete(request)
    except BastionError as exc:  # IdP error, state/nonce mismatch, expired flow, not mapped
        response = login_page(request, exc.status, exc.message)
        oidc.set_flow(response, "", 0)  # a flow is finished once, whatever the outcome
        return response
    # A page that moves on by itself, not a redirect: see console/oidc.py on SameSite.
    return oidc.signed_in(render(request, "signed_in.html", None, user=result["user"]), result)


async def logout(request: Request) -> Response:
    try:
        await check_csrf(request)
    except BastionError as exc:
        return render(request, "error.html", None, exc.status, message=exc.message)
    token = request.cookies.get(SESSION_COOKIE)
    if token and await viewer(request) is not None:
        await identity_api.logout(request, None, f"Bearer {token}")
    response = RedirectResponse("/console/login", status_code=303)
    clear_cookie(response, SESSION_COOKIE)
    return response


# -- pages ----------------------------------------------------------------------------------------
@page("overview")
async def overview(request: Request, who: Principal) -> Response:
    window = request.query_params.get("window", "24h")
    if window not in queries.WINDOWS:
        raise NotFound(f"No window '{window}'.", code="window_not_found")
    return render(request, "overview.html", who, window=window, windows=list(queries.WINDOWS))


@page("overview")
async def api_overview(request: Request, who: Principal) -> Response:
    window = request.query_params.get("window", "24h")
    if window not in queries.WINDOWS:
        return JSONResponse({"error": f"unknown window {window!r}"}, status_code=400)
    data = await asyncio.to_thread(queries.timeseries, request.app.state.db, window, scope_of(who))
    return JSONResponse(data)


@page("usage")
async def usage(request: Request, who: Principal) -> Response:
    by = request.query_params.get("by", "team")
    if by not in queries.GROUPS:
        raise NotFound(f"No grouping '{by}'.", code="grouping_not_found")
    now = datetime.now(UTC)
    since = queries.month_start(now)
    db, scope = request.app.state.db, scope_of(who)
    rows = await asyncio.to_thread(queries.breakdown, db, by, since, scope)
    burn = await asyncio.to_thread(queries.burn_down, db, scope, now)
    budget = _month_budget(request, who)
    return render(request, "usage.html", who, rows=rows, by=by, groups=list(queries.GROUPS),
                  since=since, burn=burn, budget=budget)  # fmt: skip


def _month_budget(request: Request, who: Principal) -> Any:
    """The team's monthly budget (its own, else the default team limit); None if none."""
    if who.role not in ("team-admin", "member"):
        return None
    settings = request.app.state.settings
    team = settings.teams.get(who.team)
    own = team.limits if team is not None else None
    if own is not None and own.budget_month is not None:
        return own.budget_month
    return settings.limits.defaults.team.budget_month


@page("usage")
async def api_burn_down(request: Request, who: Principal) -> Response:
    burn = await asyncio.to_thread(queries.burn_down, request.app.state.db, scope_of(who))
    budget = _month_budget(request, who)
    return JSONResponse({"x": burn["x"], "spent": burn["spent"],
                         "budget": float(budget) if budget is not None else None})  # fmt: skip


async def _keys_view(request: Request, who: Principal, **extra: Any) -> Response:
    db = request.app.state.db
    everyone = await asyncio.to_thread(list_keys, db, who.team)
    now = datetime.now(UTC)
    mine = [k.public(now) for k in everyone if k.user == who.user]
    actor = _actor(who)
    managed = [
        k.public(now)
        for k in everyone
        if k.user != who.user and who.role != "member" and actor.may_manage(k.team, k.role)
    ]
    max_days = request.app.state.settings.identity.self_service_key_max_days
    status = extra.pop("status", 200)
    context = {"mine": mine, "managed": managed, "max_days": max_days, "new_key": None,
               "error": None, **extra}  # fmt: skip
    return render(request, "keys.html", who, status, **context)


keys_page = page("keys")(_keys_view)


def _actor(who: Principal) -> Actor:
    return Actor(who.role, who.team, who.name, person=True)


@page("keys")
async def mint(request: Request, who: Principal) -> Response:
    form = await check_csrf(request)
    days = form.get("days", "").strip()
    try:
        body = identity_api.SelfKeyIn(
            name=form.get("name", ""), expires_in=f"{days}d" if days else None
        )
    except ValidationError as exc:
        message = "; ".join(str(e["msg"]) for e in exc.errors())
        return await _keys_view(request, who, error=message, status=400)
    made = await identity_api.mint_key(body, request, who)
    return await _keys_view(request, who, new_key=made, status=201)


@page("keys")
async def mint_team(request: Request, who: Principal) -> Response:
    """A team-admin's (or admin's) key for the team: `POST /admin/keys`' own handler, so its
    checks (a team-admin attributes keys to themselves or to no one) and audit record."""
    if who.role == "member":
        return not_found(request, who)
    form = await check_csrf(request)
    days, user = form.get("days", "").strip(), form.get("user", "").strip() or None
    team = form.get("team", "").strip() if who.role == "admin" else who.team
    try:
        body = admin_api.KeyIn(
            team=team, user=user, name=form.get("name", ""), expires_in=f"{days}d" if days else None
        )
    except ValidationError as exc:
        message = "; ".join(str(e["msg"]) for e in exc.errors())
        return await _keys_view(request, who, error=message, status=400)
    try:
        made = await admin_api.post_key(body, Access(_actor(who), request))
    except BastionError as exc:  # the handler's refusal, shown on the page it came from
        return await _keys_view(request, who, error=exc.message, status=exc.status)
    return await _keys_view(request, who, new_key=made.model_dump(), status=201)


@page("keys")
async def revoke(request: Request, who: Principal) -> Response:
    await check_csrf(request)
    key_id = request.path_params["key_id"]
    mine = await asyncio.to_thread(list_keys, request.app.state.db, who.team)
    if any(k.id == key_id and k.user == who.user for k in mine):
        await identity_api.revoke_my_key(key_id, request, who)
    elif who.role == "member":
        raise NotFound(f"No key with id '{key_id}'.", code="key_not_found")
    else:  # a team-admin's or admin's: the admin API's own checks, 404s and audit record
        await admin_api.post_revoke(key_id, Access(_actor(who), request))
    return RedirectResponse("/console/keys", status_code=303)


@page("models")
async def models(request: Request, who: Principal) -> Response:
    return render(request, "models.html", who, rows=_routing_rows(request))


@page("models")
async def models_table(request: Request, who: Principal) -> Response:
    """The table alone, which the page's htmx re-fetches every few seconds."""
    page_html = templates.get_template("models_table.html").render(rows=_routing_rows(request))
    return HTMLResponse(page_html)


def _routing_rows(request: Request) -> list[dict[str, Any]]:
    rows = []
    extras = getattr(request.app.state, "routing_extras", ())
    for route in request.app.state.routes.values():
        for dep, row in zip(route.deployments, route.status(), strict=True):
            for extra in extras:
                row.update(extra(dep))
            rows.append(row)
    return rows


@page("limits")
async def limits(request: Request, who: Principal) -> Response:
    """Usage against every configured limit in the viewer's reach, the closest to its limit
    first: `GET /admin/limits`' own handler, so the same scope (a team-admin's own team)."""
    rows = await admin_api.get_limits(Access(_actor(who), request), None)
    for row in rows:
        limit, used = Decimal(str(row["limit"])), Decimal(str(row["used"]))
        row["share"] = used / limit if limit else Decimal(1 if used else 0)
        row["state"] = "over" if row["share"] >= 1 else "near" if row["share"] >= NEAR else "ok"
    rows.sort(key=lambda r: r["share"], reverse=True)
    return render(request, "limits.html", who, rows=rows, near=int(NEAR * 100))


class AuditSearch(BaseModel):
    """The audit page's filters, bounded as `GET /audit/entries` bounds its query."""

    since: TimeSpec | None = None
    team: Name | None = None
    user: UserName | None = None
    kind: AuditKey | None = None
    request_id: AuditKey | None = None
    q: Label | None = None


@page("audit")
async def audit(request: Request, who: Principal) -> Response:
    """Audit search: every search is itself recorded before anything is shown, by the very
    handler `GET /audit/entries` runs."""
    given = {k: v for k, v in request.query_params.items() if k in AuditSearch.model_fields}
    given = {k: v for k, v in given.items() if v.strip()}
    try:
        filters = AuditSearch(**given)
    except ValidationError as exc:
        problems = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors())
        return render(request, "audit.html", who, 400, filters=given, found=None, error=problems)
    found = None
    if given:  # an empty form shows the form; a search is a recorded read
        trail = audit_api._trail(request)
        found = await audit_api.search_entries(
            (trail, who), since=filters.since, until=None, team=filters.team,
            user=filters.user, key_id=None, model=None, status=None, kind=filters.kind,
            request_id=filters.request_id, q=filters.q, limit=AUDIT_PAGE,
        )  # fmt: skip
    return render(request, "audit.html", who, filters=given, found=found, error=None)


async def unknown(request: Request) -> Response:
    return not_found(request, await viewer(request))


def console_app() -> Starlette:
    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return not_found(request, await viewer(request))
        return render(request, "error.html", None, exc.status_code, message=str(exc.detail))

    async def bastion_error(request: Request, exc: Exception) -> Response:
        # What a page did not handle itself, e.g. the directory down while re-checking the
        # viewer's groups (503): said plainly, in the console's own page or JSON.
        assert isinstance(exc, BastionError)
        if request.url.path.startswith("/console/api/"):
            return JSONResponse(exc.body(), status_code=exc.status)
        return render(request, "error.html", None, exc.status, message=exc.message)

    app = Starlette(
        routes=[
            Route("/", overview),
            Route("/login", login_form, methods=["GET"]),
            Route("/login", login_submit, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            # Sign-in at the IdP (OIDC authorization code + PKCE): console/oidc.py; team keys.
            Route("/oidc/start", oidc_start, methods=["GET"]),
            Route("/oidc/callback", oidc_callback, methods=["GET"], name="oidc_callback"),
            Route("/keys/team", mint_team, methods=["POST"]),
            Route("/usage", usage),
            Route("/keys", keys_page, methods=["GET"]),
            Route("/keys", mint, methods=["POST"]),
            Route("/keys/{key_id}/revoke", revoke, methods=["POST"]),
            Route("/models", models),
            Route("/audit", audit),
            Route("/limits", limits),
            Route("/models/table", models_table),
            Route("/api/overview", api_overview),
            Route("/api/burn-down", api_burn_down),
            # -- finance (console/finance.py) --
            Route("/chargeback", page("chargeback")(finance.chargeback_page)),
            Route("/chargeback/download", page("chargeback")(finance.chargeback_download)),
            Route("/cost-case", page("cost-case")(finance.cost_case_page)),
            Route("/api/cost-case", page("cost-case")(finance.api_cost_case)),
            Mount("/static", app=StaticFiles(directory=HERE / "static")),
        ],
        exception_handlers={HTTPException: http_error, BastionError: bastion_error},
    )
    app.add_middleware(SecurityHeaders)
    return app
