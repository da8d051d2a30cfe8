"""The dashboard's web application: pages rendered on the server (Jinja, autoescaped), each
with a `?partial=1` form that the page's script fetches to refresh itself in place."""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import time
from typing import Any, Callable

from flask import Flask, abort, jsonify, redirect, render_template, request, url_for
from flask.sessions import SecureCookieSessionInterface
from werkzeug.wrappers.response import Response as HttpResponse

from fleet_common.ask import NoAnswer, ask
from fleet_common.config import BUILTIN_TYPES, Config
from fleet_common.errors import FleetError
from fleet_common.jobs import AgentResult, Candidate, JobSpec, candidates, check_job_id, select
from fleet_common.messages import Response
from fleet_common.timefmt import ago
from fleet_common.topics import check_agent_id
from fleet_store import StoreReader

from .data import FLEET_PARAMS, RANGES_S, SORT_KEYS, Fleet, FleetQuery, cpu_percent, fullest_disk, memory_percent
from .exposition import metrics_for
from .jobs import DashboardJobs, JobView, Runner, TooManyJobs, job_request, run_over_mqtt
from .labellinks import LabelLinks
from .operators import TooManyWrongTokens, operators
from .query import PARTIAL, BadQuery, check_names, choice, local_path

Asker = Callable[[Config, str, str, float], Response]
log = logging.getLogger("fleet.dashboard")
NONE = "\u2013"  # an en dash for "no value"
# no other site may frame a page: a framed sign-in or "ask now" button could be clicked unawares
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"
# the query parameters each endpoint takes; every other is refused (static files are not checked)
TAKES: dict[str, tuple[str, ...]] = {
    "fleet_page": (*FLEET_PARAMS, "partial"), "fleet_json": FLEET_PARAMS, "agent_page": ("range", "partial"),
    "agent_series": ("range",), "ask_now": (), "rejected_page": ("partial",), "sign_in": ("next",),
    "sign_out": (), "health": (), "start_job": (), "job_page": ("partial",), "job_json": (), "metrics": ()}
JOB_TYPES = tuple(sorted(BUILTIN_TYPES))


def ask_via_mqtt(cfg: Config, agent_id: str, type_: str, timeout_s: float) -> Response:
    """Ask the agent over MQTT and wait for its answer (fleet_common.ask)."""
    return ask(cfg, agent_id, type_, {}, timeout_s)


def as_operator(cfg: Config) -> Config:
    """The config to ask with: the MQTT user configured for the dashboard's operators, if any."""
    d = cfg.dashboard
    return cfg if d.mqtt_username is None else cfg.replace("mqtt", username=d.mqtt_username,
                                                           password=d.mqtt_password)


def pct(value: float | None) -> str:
    return NONE if value is None else f"{value:.0f}%" if value >= 10 else f"{value:.1f}%"


def ms(value: float | None) -> str:
    return NONE if value is None else f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def size(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return NONE
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def outline(type_: str, result: AgentResult) -> str:
    """A job result in a few words: the error's code and message, or the reading the fleet page shows."""
    if result.error:
        return f"{result.error.get('code')}: {str(result.error.get('message') or '')[:100]}"
    data = result.data
    if data is None:
        return ""
    if type_ == "cpu":
        return f"cpu {pct(cpu_percent(data))}"
    if type_ == "memory":
        return f"memory {pct(memory_percent(data))} used"
    if type_ == "disk":
        used, mount = fullest_disk(data)
        return f"fullest disk {mount} {pct(used)}" if mount else "no partitions"
    text = json.dumps(data, ensure_ascii=False)
    return text if len(text) <= 120 else text[:119] + "\u2026"


class SessionCookies(SecureCookieSessionInterface):
    """The sign-in cookie is Secure (a browser sends it over HTTPS only) when this request came over
    HTTPS: directly, or through a TLS proxy that says so in X-Forwarded-Proto; or always, with
    dashboard.secure_cookies. Believing the header unchecked is safe: at worst a client that lies
    gets a cookie its own browser will not send back over plain HTTP."""

    def __init__(self, always: bool) -> None:
        self.always = always

    def get_cookie_secure(self, app: Flask) -> bool:
        forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
        return self.always or request.is_secure or forwarded == "https"


def create_app(cfg: Config, store: StoreReader, asker: Asker = ask_via_mqtt,
               job_runner: Runner = run_over_mqtt) -> Flask:
    app = Flask(__name__)
    app.config.update(SECRET_KEY=secrets.token_bytes(32), SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Strict")
    app.session_interface = SessionCookies(cfg.dashboard.secure_cookies)
    app.json.sort_keys = False  # type: ignore[attr-defined]  # series lines keep their order (fullest disk first)
    fleet = Fleet(store, cfg)
    ops = operators(cfg.dashboard)
    ask_cfg = as_operator(cfg)
    jobs = DashboardJobs(ask_cfg, job_runner)
    app.jinja_env.filters.update(ago=ago, pct=pct, ms=ms, size=size,
                                 tojson_pretty=lambda v: json.dumps(v, indent=2, ensure_ascii=False))
    app.jinja_env.globals.update(outline=outline)
    app.extensions["fleet"] = fleet
    app.extensions["fleet_operators"] = ops
    app.extensions["fleet_jobs"] = jobs
    exposition = app.extensions["fleet_metrics"] = metrics_for(store, cfg)

    @app.context_processor
    def common() -> dict[str, Any]:
        return {"refresh_s": cfg.dashboard.refresh_s, "ops": ops, "is_operator": ops.is_operator(),
                "csrf": ops.csrf(), "store_kind": cfg.persister.store}

    @app.before_request
    def known_parameters() -> None:
        if request.endpoint in TAKES:
            check_names(request.args, TAKES[request.endpoint])

    @app.errorhandler(BadQuery)
    def bad_query(exc: BadQuery) -> Any:
        if request.path.startswith("/api/"):
            return jsonify(exc.to_dict()), 400
        return HttpResponse(str(exc) + "\n", 400, mimetype="text/plain")

    @app.errorhandler(TooManyWrongTokens)
    def locked_out(exc: TooManyWrongTokens) -> Any:
        retry = {"Retry-After": str(exc.retry_after_s)}
        if request.path.startswith("/api/"):
            return jsonify(error=str(exc), retry_after_s=exc.retry_after_s), 429, retry
        return HttpResponse(str(exc) + "\n", 429, retry, mimetype="text/plain")

    def partial() -> bool:
        return choice(request.args, "partial", PARTIAL, "0") == "1"

    def range_key() -> str:
        return choice(request.args, "range", tuple(RANGES_S), "1h")

    @app.get("/")
    def fleet_page() -> str:
        page = fleet.page(FleetQuery.from_args(request.args))
        links = LabelLinks(url_for("fleet_page"), page.query)
        # each row's label links made here: a call from the template costs more than making them
        rows_and_labels = [(r, links.cell(r.labels)) for r in page.rows]
        return render_template("_fleet.html" if partial() else "fleet.html", page=page, sort_keys=SORT_KEYS,
                               args=request.args, label_links=links, rows_and_labels=rows_and_labels,
                               job_types=JOB_TYPES)

    @app.get("/api/fleet")
    def fleet_json() -> Any:
        page = fleet.page(FleetQuery.from_args(request.args))
        return jsonify(counts=page.snapshot.counts, matched=page.matched, page=page.query.page, pages=page.pages,
                       agents=[dataclasses.asdict(r) for r in page.rows])

    def known_agent(agent_id: str) -> Any:
        agent = fleet.agent(agent_id)
        if agent is None:
            abort(404, f"no agent {agent_id!r} is known to the store")
        return agent

    @app.get("/agent/<agent_id>")
    def agent_page(agent_id: str) -> str:
        agent = known_agent(agent_id)
        context = {"agent": agent, "os_info": fleet.newest(agent_id, "os_info"),
                   "processes": fleet.newest(agent_id, "processes"), "recent": fleet.recent(agent_id),
                   "ranges": RANGES_S, "range_key": range_key(), "ask_types": sorted(agent.types or ["ping"])}
        return render_template("_agent.html" if partial() else "agent.html", **context)

    @app.get("/api/agent/<agent_id>/series")
    def agent_series(agent_id: str) -> Any:
        range_s = RANGES_S[range_key()]
        known_agent(agent_id)
        return jsonify(fleet.series(agent_id, range_s))

    @app.post("/api/agent/<agent_id>/ask")
    def ask_now(agent_id: str) -> Any:
        if not ops.enabled:
            return jsonify(error="asking is disabled: set dashboard.ask_enabled (and an operator token)"), 403
        if not ops.may_ask():
            return jsonify(error="only a signed-in operator may ask agents"), 403
        type_ = str((request.get_json(silent=True) or {}).get("type") or request.form.get("type") or "")
        try:
            check_agent_id(agent_id)
            started = time.monotonic()
            res = asker(ask_cfg, agent_id, type_, cfg.dashboard.ask_timeout_s)
        except NoAnswer as exc:
            return jsonify(error=str(exc)), 504
        except FleetError as exc:  # a bad agent id or type
            return jsonify(error=str(exc)), 400
        took_ms = (time.monotonic() - started) * 1000
        log.info("operator asked %s for %s: %s in %.0f ms", agent_id, type_, res.status, took_ms)
        return jsonify(answer=res.to_dict(), took_ms=round(took_ms, 1))

    @app.post("/api/jobs")
    def start_job() -> Any:
        """Ask now for a label selection: the same checks as asking one agent, then one job."""
        if not ops.enabled:
            return jsonify(error="asking is disabled: set dashboard.ask_enabled (and an operator token)"), 403
        if not ops.may_ask():
            return jsonify(error="only a signed-in operator may ask agents"), 403
        try:
            type_, labels = job_request(request.get_json(silent=True))
            spec = JobSpec(type=type_, selector=labels, timeout_s=cfg.dashboard.ask_timeout_s)
        except FleetError as exc:  # a bad type or label
            return jsonify(error=str(exc)), 400
        known = [Candidate(a.agent_id, bool(a.online), dict(a.labels)) for a in fleet.snapshot().agents.values()]
        matched = select(candidates(None, known), spec)
        if not matched:
            return jsonify(error=f"no known agent is one of {spec.describe()}; nothing was sent"), 400
        try:
            job = jobs.start(spec, known)
        except TooManyJobs as exc:
            return jsonify(error=str(exc)), 429
        log.info("operator started job %s: %s to %s (%d known)", job.job, type_, spec.describe(), len(matched))
        return jsonify(job=job.job, url=url_for("job_page", job_id=job.job),
                       api=url_for("job_json", job_id=job.job)), 202

    def known_job(job_id: str) -> JobView:
        try:
            check_job_id(job_id)
        except FleetError as exc:
            abort(404, str(exc))
        view = jobs.view(job_id, store, fleet.snapshot().agents.values())
        if view is None:
            abort(404, f"no job {job_id!r} is known to this dashboard or the store")
        return view

    @app.get("/job/<job_id>")
    def job_page(job_id: str) -> str:
        view = known_job(job_id)
        return render_template("_job.html" if partial() else "job.html", view=view)

    @app.get("/api/job/<job_id>")
    def job_json(job_id: str) -> Any:
        return jsonify(known_job(job_id).to_dict())

    @app.get("/rejected")
    def rejected_page() -> str:
        return render_template("_rejected.html" if partial() else "rejected.html", rejected=fleet.rejected())

    @app.route("/signin", methods=["GET", "POST"])
    def sign_in() -> Any:
        if not ops.enabled:
            abort(404)
        failed = False
        target = local_path(request.args, "next")  # checked before the token, so a bad link fails at once
        if request.method == "POST":
            if ops.sign_in(request.form.get("token", "")):
                return redirect(target or url_for("fleet_page"))
            failed = True
        return render_template("signin.html", failed=failed), 401 if failed else 200

    @app.post("/signout")
    def sign_out() -> HttpResponse:
        ops.sign_out()
        return redirect(url_for("fleet_page"))

    @app.get("/healthz")
    def health() -> Any:
        try:
            store.rejected(limit=1)
        except Exception as exc:  # the store is down: say so, for the health check
            return jsonify(ok=False, error=f"{type(exc).__name__}: {exc}"), 503
        return jsonify(ok=True, store=cfg.persister.store)

    if exposition.enabled:
        @app.get("/metrics")
        def metrics() -> HttpResponse:
            reply = exposition.reply(request.headers.get("Authorization", ""),
                                     request.headers.get("Accept-Encoding", ""))
            return HttpResponse(reply.body, reply.status, reply.headers)

    @app.after_request
    def headers(resp: HttpResponse) -> HttpResponse:
        resp.headers.setdefault("Content-Security-Policy", CSP)
        resp.headers.setdefault("X-Frame-Options", "DENY")  # for browsers that predate frame-ancestors
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "same-origin")
        return resp

    return app
