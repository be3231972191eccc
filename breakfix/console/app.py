"""The SRE console: a Starlette app (Jinja2 pages, htmx, server-sent events) over the console state.

Reads ``ConsoleState`` (kept live from the incident index and the audit trail by
``state.follow``); writes on-call verbs as ``ActionRecord``s through ``oncall.Oncall`` with the
authenticated user (``auth``). Pages: /incidents, /incidents/<id> (stable URL), /fleet,
/history, /silences; /events streams changes; every POST needs the session's CSRF token.

Every request passes ``Guard`` first: bodies over ``MAX_BODY`` are refused (by Content-Length, and
counted as they stream), and in lab mode the Host and the Origin are checked (``Auth.check_lab``).
A write is refused before its body is read when nobody is logged in; its publish is bounded by
``publish_timeout_s`` and refused at once while NATS does not answer (``ConsoleState.bus_up``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from breakfix.console import fleetview, history, verbs, views
from breakfix.console.auth import COOKIE, Auth, Refusal, Session
from breakfix.console.runbook import runbook_html
from breakfix.console.state import BUS_FAILURES, ConsoleState, TooManyListeners
from breakfix.schemas.catalog import Catalog

log = structlog.get_logger("breakfix.console")
HERE = Path(__file__).resolve().parent
Publish = Callable[[str, verbs.Identity, Any], Awaitable[Any]]
INCIDENT_VERBS = ("approve", "deny", "ack", "note", "assign", "release", "cancel")
MAX_BODY = 64 * 1024  # the largest form is a 2000-character reason
MAX_FIELDS = 20
MAX_FIELD = 32 * 1024  # 2000 characters of 4-byte UTF-8, percent-encoded, fit
PUBLISH_TIMEOUT_S = 5.0


def peer_of(request: Request) -> str:
    """The socket's peer: the only address proxy-mode identity headers are trusted from."""
    return request.client.host if request.client else "-"


def client_of(auth: Auth, request: Request) -> str:
    """The client's address for login limits and logs (``Auth.client``: behind a configured proxy, the client it
    names)."""
    return auth.client(peer_of(request), request.headers.get("x-forwarded-for"))


class Guard:
    """ASGI middleware in front of every route: the body cap and lab mode's Host / Origin check."""

    def __init__(self, app: ASGIApp, *, auth: Auth) -> None:
        self.app, self.auth = app, auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        headers = request.headers
        path = request.url.path
        remote = client_of(self.auth, request)
        try:
            self.auth.check_lab(host=headers.get("host", ""), origin=headers.get("origin") or headers.get("referer"),
                                write=request.method not in ("GET", "HEAD"), path=path, remote=remote)
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
                raise self.auth.refuse(413, "request body too large", path=path, remote=remote)
        except Refusal as r:
            await PlainTextResponse(f"refused: {r.reason}", status_code=r.status)(scope, receive, send)
            return
        seen = 0

        async def capped() -> Message:  # a streamed (chunked) body is counted as it arrives
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_BODY:
                    r = self.auth.refuse(413, "request body too large", path=path, remote=remote)
                    raise HTTPException(r.status, f"refused: {r.reason}")
            return message

        await self.app(scope, capped, send)


class Console:
    def __init__(self, state: ConsoleState, auth: Auth, publish: Publish, clock: Callable[[], datetime],
                 catalog: Catalog, *, heartbeat_s: float = 15.0, publish_timeout_s: float = PUBLISH_TIMEOUT_S) -> None:
        self.state, self.auth, self.publish, self.clock, self.catalog = state, auth, publish, clock, catalog
        self.heartbeat_s, self.publish_timeout_s = heartbeat_s, publish_timeout_s
        self.env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(),
                               trim_blocks=True, lstrip_blocks=True)
        self.env.globals.update(age=views.age, iso=lambda d: d.isoformat() if d else "")
        self.env.filters["links"] = views.link_urls

    # -- plumbing ----------------------------------------------------------------------------------
    def _remote(self, request: Request) -> str:
        return client_of(self.auth, request)

    def _session(self, request: Request) -> tuple[Session | None, bool]:
        headers = {k.lower(): v for k, v in request.headers.items()}
        return self.auth.session(request.cookies.get(COOKIE), headers, peer_of(request), request.url.path)

    def _page(self, request: Request, template: str, s: Session, new: bool, **ctx: Any) -> HTMLResponse:
        html = self.env.get_template(template).render(who=s.who, csrf=s.csrf, mode=self.auth.config.mode,
                                                      now=self.clock(), path=request.url.path,
                                                      bus_up=self.state.bus_up, **ctx)
        resp = HTMLResponse(html)
        if new:
            self._cookie(resp, s)
        return resp

    def _cookie(self, resp: Response, s: Session) -> None:
        resp.set_cookie(COOKIE, s.sid, max_age=int(self.auth.config.session_ttl_s), httponly=True,
                        samesite="strict", path="/")

    async def _form(self, request: Request) -> dict[str, str]:
        """The form, parsed with tight limits (an over-limit form is a one-line 400 from Starlette)."""
        form = await request.form(max_files=0, max_fields=MAX_FIELDS, max_part_size=MAX_FIELD)
        return {k: str(v)[:4000] for k, v in form.items()}

    def _clusters(self) -> list[str]:
        """Every cluster the console knows: named by an incident or by an audit record (a remediator's
        breaker or kill-switch record, a verb), so a quiet cluster can be switched off before its first incident."""
        return sorted(self.state.clusters)

    def _cluster(self, value: str) -> str:
        """A cluster named in a form: one the console knows from its incidents or records (a typo would publish on
        a subject no remediator reads, and the page would say "recorded")."""
        cluster = value.strip()
        if not cluster:
            raise verbs.VerbError("name the cluster")
        known = self._clusters()
        if cluster not in known:
            raise verbs.VerbError(f"unknown cluster {cluster[:100]!r}; the console knows "
                                  f"{', '.join(known) or 'none'} (from their incidents and audit records)")
        return cluster

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
            clusters = self._clusters()
            return self._page(request, "fleet.html", s, new, groups=fleetview.fleet_grid(incs, group), group=group,
                              keys=fleetview.TOPOLOGY_KEYS, clusters=clusters,
                              breakers=fleetview.breakers(self.state.records, clusters),
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
            q = self.state.listen(s.who.user)
        except TooManyListeners as exc:
            return PlainTextResponse(str(exc), status_code=429 if exc.per_user else 503)

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
        try:
            s, _new = self._session(request)
            if s is None:  # refused before a byte of the body is read
                raise self.auth.refuse(401, "not logged in", path=path, remote=remote)
            form = await self._form(request)
            s = self.auth.check_write(s, request.headers.get("x-csrf-token") or form.get("csrf"), verb=verb,
                                      path=path, remote=remote)
        except Refusal as r:
            return PlainTextResponse(f"refused: {r.reason}", status_code=r.status)
        try:
            rec = build(s.who, form)
        except verbs.VerbError as exc:
            return self._flash(request, str(exc), back, error=True)
        if not self.state.bus_up:
            return self._flash(request, f"{verb}: not sent, NATS is unreachable; try again once the console "
                                        "says it is back", back, status=503)
        try:
            async with asyncio.timeout(self.publish_timeout_s):
                await self.publish(verb, s.who, rec)
        except verbs.VerbError as exc:
            return self._flash(request, str(exc), back, error=True)
        except BUS_FAILURES as exc:
            log.warning("console_publish_failed", verb=verb, user=s.who.user, record=rec.id,
                        error=str(exc) or type(exc).__name__)
            return self._flash(request, f"{verb}: NATS did not confirm it, so it may not have been recorded; "
                                        "check the audit trail before trying again", back, status=503)
        self.state.add_record(rec)
        return self._flash(request, f"{verb}: recorded as {rec.id}", back)

    def _flash(self, request: Request, message: str, back: str, *, error: bool = False,
               status: int | None = None) -> Response:
        """htmx: the message for #flash; a plain form: back to the page (an error status: the message)."""
        error = error or status is not None
        if request.headers.get("hx-request"):
            cls = "flash error" if error else "flash"
            from html import escape
            return HTMLResponse(f'<div class="{cls}" role="status">{escape(message)}</div>',
                                status_code=status or (400 if error else 200))
        if status is not None:
            return PlainTextResponse(message, status_code=status)
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
            if not (math.isfinite(hours) and 0 < hours <= verbs.MAX_SILENCE.total_seconds() / 3600):
                raise verbs.VerbError(f"silence duration must be between 0 and {verbs.MAX_SILENCE.days} days")
            matcher = {k: form.get(k) for k in verbs.MATCHER_FIELDS}
            if (matcher.get("cluster") or "").strip():
                matcher["cluster"] = self._cluster(matcher["cluster"] or "")
            return verbs.silence(matcher, who,
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
            cluster = self._cluster(form.get("cluster", ""))
            if verb == "breaker_reset":
                return verbs.breaker_reset(cluster, who, reason=form.get("reason", ""), at=self.clock())
            return verbs.kill_switch(cluster, who, rule=form.get("rule", "").strip(),
                                     code=form.get("code", "").strip(),
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
        form = await self._form(request)
        try:
            s = await self.auth.login(form.get("name", "")[:100], form.get("token", "")[:500],
                                      remote=self._remote(request))
        except Refusal as r:
            return RedirectResponse("/login?error=throttled" if r.status == 429 else "/login?error=1", status_code=303)
        nxt = form.get("next", "/incidents")
        resp = RedirectResponse(nxt if nxt.startswith("/") and not nxt.startswith("//") else "/incidents",
                                status_code=303)
        self._cookie(resp, s)
        return resp

    async def logout(self, request: Request) -> Response:
        form = await self._form(request)
        s = self.auth.sessions.get(request.cookies.get(COOKIE) or "")
        if s is not None and form.get("csrf", "") == s.csrf:
            self.auth.logout(s.sid)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE, path="/")
        return resp

    async def healthz(self, _request: Request) -> Response:
        """Liveness: 200 whenever the process serves requests. A NATS outage is not a reason to restart the
        console (it keeps showing the last state received, with a banner): that is ``/readyz``'s to say."""
        return PlainTextResponse("ok")

    async def readyz(self, _request: Request) -> Response:
        """Readiness: 503 while loading and while NATS does not answer (the pages then show the last state
        received), else 200."""
        if not self.state.ready.is_set():
            return PlainTextResponse("loading", status_code=503)
        if not self.state.bus_up:
            return PlainTextResponse("NATS unreachable", status_code=503)
        return PlainTextResponse("ok")

    def app(self, lifespan: Callable[[Starlette], contextlib.AbstractAsyncContextManager[None]] | None = None
            ) -> Starlette:
        async def root(_r: Request) -> Response:
            return RedirectResponse("/incidents", status_code=303)

        routes = [
            Route("/", root), Route("/healthz", self.healthz), Route("/readyz", self.readyz),
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
        return Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(Guard, auth=self.auth)])
