"""The SRE console: a Starlette app (Jinja2 pages, htmx, server-sent events) over the console state.

Reads ``ConsoleState`` (kept live from the incident index and the audit trail by
``state.follow``); writes on-call verbs as ``ActionRecord``s through ``oncall.Oncall`` with the
authenticated user (``auth``). Pages: /incidents, /incidents/<id> (stable URL), /fleet,
/history, /silences; /events streams changes; every POST needs the session's CSRF token.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from breakfix.console import fleetview, history, verbs, views
from breakfix.console.auth import COOKIE, Auth, Refusal, Session
from breakfix.console.runbook import runbook_html
from breakfix.console.state import ConsoleState
from breakfix.schemas.catalog import Catalog

HERE = Path(__file__).resolve().parent
Publish = Callable[[str, verbs.Identity, Any], Awaitable[Any]]
INCIDENT_VERBS = ("approve", "deny", "ack", "note", "assign", "release", "cancel")


class Console:
    def __init__(self, state: ConsoleState, auth: Auth, publish: Publish, clock: Callable[[], datetime],
                 catalog: Catalog, *, heartbeat_s: float = 15.0) -> None:
        self.state, self.auth, self.publish, self.clock, self.catalog = state, auth, publish, clock, catalog
        self.heartbeat_s = heartbeat_s
        self.env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(),
                               trim_blocks=True, lstrip_blocks=True)
        self.env.globals.update(age=views.age, iso=lambda d: d.isoformat() if d else "")
        self.env.filters["links"] = views.link_urls

    # -- plumbing ----------------------------------------------------------------------------------
    def _remote(self, request: Request) -> str:
        return request.client.host if request.client else "-"

    def _session(self, request: Request) -> tuple[Session | None, bool]:
        headers = {k.lower(): v for k, v in request.headers.items()}
        return self.auth.session(request.cookies.get(COOKIE), headers, self._remote(request), request.url.path)

    def _page(self, request: Request, template: str, s: Session, new: bool, **ctx: Any) -> HTMLResponse:
        html = self.env.get_template(template).render(who=s.who, csrf=s.csrf, mode=self.auth.config.mode,
                                                      now=self.clock(), path=request.url.path, **ctx)
        resp = HTMLResponse(html)
        if new:
            self._cookie(resp, s)
        return resp

    def _cookie(self, resp: Response, s: Session) -> None:
        resp.set_cookie(COOKIE, s.sid, max_age=int(self.auth.config.session_ttl_s), httponly=True,
                        samesite="strict", path="/")

    async def _read(self, request: Request, fn: Callable[[Session, bool], Response]) -> Response:
        try:
            s, new = self._session(request)
        except Refusal as r:
            return PlainTextResponse(f"refused: {r.reason}", status_code=r.status)
        if s is None:
            return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
        return fn(s, new)

    # -- pages ---------------------------------------------------------------------------------------
    def _filters(self, request: Request) -> dict[str, str]:
        return {k: request.query_params.get(k, "")[:200] for k in views.FILTERS}

    async def incidents(self, request: Request) -> Response:
        def page(s: Session, new: bool) -> Response:
            f = self._filters(request)
            try:
                pg = max(0, int(request.query_params.get("page", "0")))
            except ValueError:
                pg = 0
            rows, total = views.rows(self.state.incidents.values(), self.state.progress, f, pg, self.state.waiting)
            template = "_rows.html" if request.headers.get("hx-request") else "incidents.html"
            return self._page(request, template, s, new, rows=rows, total=total, filters=f, page=pg,
                              page_size=views.PAGE, choices=views.choices(self.state.incidents.values()))
        return await self._read(request, page)

    async def incident(self, request: Request) -> Response:
        iid = request.path_params["iid"]

        def page(s: Session, new: bool) -> Response:
            inc = self.state.incidents.get(iid)
            if inc is None:
                return PlainTextResponse(f"no incident {iid}", status_code=404)
            records = self.state.records_of(iid)
            code = inc.codes[0] if inc.codes else ""
            entry = None
            if code.startswith("xid:"):
                entry = self.catalog.xid(code.split(":", 1)[1])
            elif code.startswith("dcgm:"):
                entry = self.catalog.dcgm_code(code.split(":", 1)[1])
            now = self.clock()
            return self._page(request, "incident.html", s, new, inc=inc, records=records,
                              ladder=views.ladder(inc, records), waiting=verbs.waiting_step(inc, records),
                              waiting_hint=self.state.waiting.get(iid, ""),
                              runbook=runbook_html(inc.category), entry=entry,
                              notifications=views.notifications(records),
                              members=views.members(inc, self.state.incidents),
                              silences=[x for x in verbs.active_silences(self.state.records, now)
                                        if verbs.matches(x.matcher, inc)])
        return await self._read(request, page)

    async def fleet(self, request: Request) -> Response:
        group = request.query_params.get("group", "rack")
        group = group if group in fleetview.TOPOLOGY_KEYS else "rack"

        def page(s: Session, new: bool) -> Response:
            incs = list(self.state.incidents.values())
            return self._page(request, "fleet.html", s, new, groups=fleetview.fleet_grid(incs, group), group=group,
                              keys=fleetview.TOPOLOGY_KEYS, breaker=fleetview.breaker_state(self.state.records),
                              budget=fleetview.budget_use(incs), switches=fleetview.kill_switches(self.state.records))
        return await self._read(request, page)

    def _history(self, request: Request) -> history.History:
        try:
            days = int(request.query_params.get("days", "7"))
        except ValueError:
            days = 7
        days = days if days in history.PERIODS else 7
        return history.history(self.state.incidents.values(), self.state.records, self.clock(), days)

    async def history_page(self, request: Request) -> Response:
        def page(s: Session, new: bool) -> Response:
            h = self._history(request)
            return self._page(request, "history.html", s, new, h=h, periods=history.PERIODS,
                              bars=history.stacked_bars_svg(h), ttr=history.ttr_svg(h), share=history.share_svg(h))
        return await self._read(request, page)

    async def rma_csv(self, request: Request) -> Response:
        def page(_s: Session, _new: bool) -> Response:
            return Response(history.rma_csv(self._history(request).rma), media_type="text/csv",
                            headers={"content-disposition": 'attachment; filename="breakfix-rma.csv"'})
        return await self._read(request, page)

    async def silences(self, request: Request) -> Response:
        def page(s: Session, new: bool) -> Response:
            return self._page(request, "silences.html", s, new,
                              silences=verbs.active_silences(self.state.records, self.clock()),
                              clusters=views.choices(self.state.incidents.values())["cluster"])
        return await self._read(request, page)

    # -- live --------------------------------------------------------------------------------------
    async def events(self, request: Request) -> Response:
        try:
            s, _new = self._session(request)
        except Refusal as r:
            return PlainTextResponse(f"refused: {r.reason}", status_code=r.status)
        if s is None:
            return PlainTextResponse("log in first", status_code=401)
        try:
            q = self.state.listen()
        except RuntimeError:
            return PlainTextResponse("too many live listeners", status_code=503)

        async def stream() -> AsyncIterator[str]:
            try:
                yield "retry: 2000\n\n"
                while True:
                    try:
                        ev = await asyncio.wait_for(q.get(), timeout=self.heartbeat_s)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    kind, _, iid = ev.partition(":")
                    yield f"event: {kind}\ndata: {iid}\n\n"
            finally:
                self.state.unlisten(q)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    # -- writes -------------------------------------------------------------------------------------
    async def _write(self, request: Request, verb: str, build: Callable[[verbs.Identity, dict[str, str]], Any],
                     back: str) -> Response:
        remote, path = self._remote(request), request.url.path
        form = {k: str(v)[:4000] for k, v in (await request.form()).items()}
        try:
            s, _new = self._session(request)
            s = self.auth.check_write(s, request.headers.get("x-csrf-token") or form.get("csrf"), verb=verb,
                                      path=path, remote=remote)
        except Refusal as r:
            return PlainTextResponse(f"refused: {r.reason}", status_code=r.status)
        try:
            rec = build(s.who, form)
            await self.publish(verb, s.who, rec)
        except verbs.VerbError as exc:
            return self._flash(request, str(exc), back, error=True)
        self.state.add_record(rec)
        return self._flash(request, f"{verb}: recorded as {rec.id}", back)

    def _flash(self, request: Request, message: str, back: str, *, error: bool = False) -> Response:
        if request.headers.get("hx-request"):
            cls = "flash error" if error else "flash"
            from html import escape
            return HTMLResponse(f'<div class="{cls}" role="status">{escape(message)}</div>',
                                status_code=400 if error else 200)
        return RedirectResponse(back, status_code=303)

    async def incident_verb(self, request: Request) -> Response:
        iid, verb = request.path_params["iid"], request.path_params["verb"]
        if verb not in INCIDENT_VERBS:
            return PlainTextResponse("unknown verb", status_code=404)

        def build(who: verbs.Identity, form: dict[str, str]) -> Any:
            inc = verbs.check_incident(self.state.incidents.get(iid), iid, form.get("cluster") or None)
            at = self.clock()
            if verb in ("approve", "deny"):
                return verbs.decide_step(verb, inc, self.state.records_of(iid), who, step=form.get("step") or None,
                                         reason=form.get("reason", ""), at=at)
            return verbs.incident_verb(verb, inc, who, reason=form.get("reason", ""), at=at,
                                       skip_validation=form.get("skip_validation") == "true",
                                       assignee=form.get("assignee", ""))
        return await self._write(request, verb, build, f"/incidents/{iid}")

    async def silence_add(self, request: Request) -> Response:
        def build(who: verbs.Identity, form: dict[str, str]) -> Any:
            try:
                hours = float(form.get("hours", "0"))
            except ValueError:
                raise verbs.VerbError("duration must be a number of hours") from None
            return verbs.silence({k: form.get(k) for k in verbs.MATCHER_FIELDS}, who,
                                 duration=timedelta(hours=hours), reason=form.get("reason", ""), at=self.clock(),
                                 incident=form.get("incident") or "-")
        return await self._write(request, "silence", build, "/silences")

    async def silence_remove(self, request: Request) -> Response:
        sid = request.path_params["sid"]

        def build(who: verbs.Identity, form: dict[str, str]) -> Any:
            found = next((x for x in verbs.active_silences(self.state.records, self.clock())
                          if x.silence_id == sid), None)
            if found is None:
                raise verbs.VerbError(f"no silence {sid} in force")
            return verbs.unsilence(found.cluster, sid, who, reason=form.get("reason", ""), at=self.clock())
        return await self._write(request, "unsilence", build, "/silences")

    async def admin(self, request: Request) -> Response:
        verb = request.path_params["verb"]
        if verb not in verbs.ADMIN_VERBS:
            return PlainTextResponse("unknown verb", status_code=404)

        def build(who: verbs.Identity, form: dict[str, str]) -> Any:
            cluster = form.get("cluster", "")
            if not cluster:
                raise verbs.VerbError("name the cluster")
            if verb == "breaker_reset":
                return verbs.breaker_reset(cluster, who, reason=form.get("reason", ""), at=self.clock())
            return verbs.kill_switch(cluster, who, rule=form.get("rule", ""), code=form.get("code", ""),
                                     enabled=form.get("enabled", "true") == "true", reason=form.get("reason", ""),
                                     at=self.clock())
        return await self._write(request, verb, build, "/fleet")

    # -- login ---------------------------------------------------------------------------------------
    async def login_page(self, request: Request) -> Response:
        if self.auth.config.mode != "users":
            return RedirectResponse("/incidents", status_code=303)
        html = self.env.get_template("login.html").render(error=request.query_params.get("error", ""),
                                                          next=request.query_params.get("next", "/incidents"))
        return HTMLResponse(html)

    async def login(self, request: Request) -> Response:
        form = await request.form()
        try:
            s = self.auth.login(str(form.get("name", ""))[:100], str(form.get("token", ""))[:500],
                                remote=self._remote(request))
        except Refusal:
            return RedirectResponse("/login?error=1", status_code=303)
        nxt = str(form.get("next", "/incidents"))
        resp = RedirectResponse(nxt if nxt.startswith("/") and not nxt.startswith("//") else "/incidents",
                                status_code=303)
        self._cookie(resp, s)
        return resp

    async def logout(self, request: Request) -> Response:
        form = await request.form()
        s = self.auth.sessions.get(request.cookies.get(COOKIE) or "")
        if s is not None and str(form.get("csrf", "")) == s.csrf:
            self.auth.logout(s.sid)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE, path="/")
        return resp

    async def healthz(self, _request: Request) -> Response:
        return PlainTextResponse("ok" if self.state.ready.is_set() else "loading",
                                 status_code=200 if self.state.ready.is_set() else 503)

    def app(self, lifespan: Callable[[Starlette], contextlib.AbstractAsyncContextManager[None]] | None = None
            ) -> Starlette:
        async def root(_r: Request) -> Response:
            return RedirectResponse("/incidents", status_code=303)

        routes = [
            Route("/", root), Route("/healthz", self.healthz),
            Route("/login", self.login_page), Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/incidents", self.incidents), Route("/incidents/{iid}", self.incident),
            Route("/incidents/{iid}/{verb}", self.incident_verb, methods=["POST"]),
            Route("/fleet", self.fleet), Route("/history", self.history_page), Route("/history/rma.csv", self.rma_csv),
            Route("/silences", self.silences), Route("/silences", self.silence_add, methods=["POST"]),
            Route("/silences/{sid}/remove", self.silence_remove, methods=["POST"]),
            Route("/admin/{verb}", self.admin, methods=["POST"]),
            Route("/events", self.events),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
        return Starlette(routes=routes, lifespan=lifespan)
