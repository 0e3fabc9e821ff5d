"""create_app(config): listeners, blueprints, CORS and the mapping of every error to a Matrix error."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
from typing import Any

import orjson
import redis
import sqlalchemy
from multidict import istr
from sanic import Blueprint, Request, Sanic
from sanic.compat import Header
from sanic.config import Config as SanicConfig
from sanic.exceptions import BadRequest, MethodNotAllowed, NotFound, PayloadTooLarge, SanicException, ServiceUnavailable
from sanic.http import Http
from sanic.response import BaseHTTPResponse, HTTPResponse, empty, json

from indexer import logs
from indexer.cache import Cache
from indexer.redis_clients import REDIS_ERRORS, RedisTarget, cache_spread, connect
from indexer.settings import Config
from server import metrics
from server.api import (
    account,
    admin,
    auth,
    bind,
    directory,
    health,
    identity_v1,
    identity_v2,
    load_json,
    policies,
    profile,
    pubkey,
    sessions,
    status,
    terms,
)
from server.api import invites as invites_api
from server.api import metrics as metrics_api
from server.api import openapi as openapi_api
from server.bindings import check_cache
from server.container import Context, Services, services
from server.errors import MatrixError, log_bad_request
from server.storage import now_ms

log = logging.getLogger(__name__)
access_log = logging.getLogger("mxisd.access")

def _unbroken(text: str) -> str:
    if "\r" in text or "\n" in text or "\0" in text:
        raise ValueError(f"a header may not hold CR, LF or NUL: {text!r}")
    return text


class HeaderText(str):
    """Header text known to hold no CR, LF or NUL, for what we add to every answer (the CORS
    headers, the request id). Sanic strips those three from every header it sends with a
    str.translate that looks up each character, 1 to 3 us a header: for this text, translate (and
    f"{text}", by which Sanic reads a value) give it back as it is. Only the speed depends on
    Sanic calling them: were it to check another way, this text would be checked like any other, so
    no Sanic upgrade can break an answer (the private method was not patched for that reason)."""

    __slots__ = ()

    def __new__(cls, text: str) -> HeaderText:
        return super().__new__(cls, _unbroken(text))

    def __format__(self, spec: str) -> str:
        return self if not spec else super().__format__(spec)

    def translate(self, table: object) -> str:
        return self


class HeaderName(istr):
    """A header name known to hold no CR, LF or NUL (see HeaderText); Sanic's headers keep it as given."""

    __slots__ = ()

    def __new__(cls, text: str) -> HeaderName:
        return super().__new__(cls, _unbroken(text))

    def translate(self, table: object) -> str:
        return self


REQUEST_ID_HEADER = HeaderName("X-Request-ID")
_GOOD_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

CORS_HEADERS: dict[str, str] = {HeaderName(name): HeaderText(value) for name, value in {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Origin, X-Requested-With, Content-Type, Accept, Authorization",
}.items()}


def new_request_id() -> str:
    """A random request id: 32 hex digits (uuid4().hex cost 3 us more, for its object)."""
    return HeaderText(os.urandom(16).hex())


def blueprints(with_admin: bool, with_metrics: bool) -> list[Blueprint]:
    """Every route the server answers, by area (server/openapi.py documents them all)."""
    modules = [status, health, pubkey, identity_v1, identity_v2, account, terms, sessions, bind, directory, auth,
               profile, invites_api, policies, openapi_api]
    if with_admin:
        modules.append(admin)
    if with_metrics:
        modules.append(metrics_api)
    return [module.bp for module in modules]


class MatrixRequest(Request):
    """A request that takes its id (the client's X-Request-ID if well formed, else a new one) and
    its start time when it is read, before routing, so that every log line of its handling carries
    the id; and whose answer, however it was made (by a handler, by the error handler, a CORS
    preflight), gets the CORS headers, the request id, the metrics and the access log line when it
    is given (respond), once. This is what a middleware each way did: Sanic's running of them cost
    more than their work (a coroutine each, its own loop and checks, on every request)."""

    __slots__ = ("request_id", "started", "_finished")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        given = self.headers.get(REQUEST_ID_HEADER, "")
        self.request_id: str = HeaderText(given) if _GOOD_REQUEST_ID.fullmatch(given) else new_request_id()
        self.started = time.perf_counter()
        self._finished = False
        logs.request_id.set(self.request_id)

    async def respond(self, response: BaseHTTPResponse | None = None, *, status: int = 200,
                      headers: Header | dict[str, str] | None = None,
                      content_type: str | None = None) -> Any:
        response = await super().respond(response, status=status, headers=headers, content_type=content_type)
        # Once, as Sanic runs response middleware: an error answered after a first respond is the same request.
        if not self._finished:
            self._finished = True
            response.headers.update(CORS_HEADERS)
            record_response(self, response)
            if not self.app.config.KEEP_ALIVE and isinstance(self.stream, Http):
                self.stream.keep_alive = False  # this worker is stopping (begin_stop)
        return response


# The application with Sanic's own config type and our context: the services, once it has started.
App = Sanic[SanicConfig, Context]


def create_app(config: Config, target: RedisTarget) -> App:
    """The Sanic application for one worker."""
    logs.setup(config.log_level, "server", config.log_format)  # spawned workers start with no logging set up
    app = Sanic("mxisd", ctx=Context(), configure_logging=False, dumps=orjson.dumps, loads=load_json,  # fast JSON
                request_class=MatrixRequest)
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.config.REQUEST_MAX_SIZE = config.server.max_body_size
    # uvloop installs SIGTERM handling only once the loop runs, after Sanic has set SIGTERM to
    # "ignore" and begun answering: a SIGTERM in that window was lost and the server never stopped.
    app.config.USE_UVLOOP = False
    if config.server.proxies_count:
        app.config.PROXIES_COUNT = config.server.proxies_count
    for blueprint in blueprints(bool(config.admin.token), config.metrics.enabled):
        app.blueprint(blueprint)

    @app.before_server_start
    async def open_connections(app: App) -> None:
        app.ctx.services = Services.build(config, target)

    @app.after_server_start
    async def start_maintenance(app: App) -> None:
        built = app.ctx.services
        built.run_in_background(maintenance(built, target), built.invite_worker.run())
        log.info("worker %d ready", os.getpid())

    @app.before_server_stop
    async def begin_stop(app: App) -> None:
        # Sanic closes the connections idle at its stop, but one busy then stays open, answering
        # whatever comes next for up to its graceful timeout: a worker replaced on a reload would
        # go on serving a busy client (a proxy's pooled connection) with the old config. From now
        # on each answer ends its connection (Sanic reads this per request; finish() does it for
        # the requests already read).
        app.config.KEEP_ALIVE = False
        # Ctrl-C reaches each worker twice, from the terminal and from Sanic's manager: the second
        # must not abort the clean stop that the first began.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        await app.ctx.services.stop_background()

    @app.after_server_stop
    async def close_connections(app: App) -> None:
        await app.ctx.services.close()

    @app.exception(Exception)
    async def matrix_error(request: Request, exc: Exception) -> HTTPResponse:
        return error_response(request, exc)

    return app


async def maintenance(built: Services, target: RedisTarget) -> None:
    """Every redis.check_every: have Redis rebuilt if it was emptied or went back in time while we
    run (see server.bindings); every sessions.purge_every: forget validation sessions expired longer
    than sessions.keep_expired ago."""
    config = built.config
    storage = built.storage
    cache = Cache(connect(target, config.redis.timeout), config.redis.prefix, cache_spread(config.redis))
    stores = [s.name for s in config.stores]
    check_every = max(1, config.redis.check_every)
    purge_every = max(1, config.sessions.purge_every)
    keep_ms = (config.sessions.lifetime + config.sessions.keep_expired) * 1000
    next_check, next_purge = time.monotonic() + check_every, time.monotonic() + purge_every
    try:
        while True:
            await asyncio.sleep(max(0.0, min(next_check, next_purge) - time.monotonic()))
            try:
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + check_every
                    await storage.run(check_cache, storage, cache, stores)
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + purge_every
                    purged = await storage.run(storage.delete_sessions_before, now_ms() - keep_ms)
                    if purged:
                        log.info("forgot %d expired validation sessions", purged)
            except (*REDIS_ERRORS, sqlalchemy.exc.SQLAlchemyError) as exc:
                logs.repeated.warning(log, "cache check skipped: %s", exc, key="cache check")
    finally:
        cache.r.close()


def record_response(request: MatrixRequest, response: BaseHTTPResponse) -> None:
    """The request id header, the request metrics and the access log line of one answered request."""
    if REQUEST_ID_HEADER not in response.headers:
        response.headers[REQUEST_ID_HEADER] = request.request_id
    took = time.perf_counter() - request.started
    endpoint = "/" + request.route.path if request.route is not None else "unmatched"
    metrics.count_request(request.method, endpoint, response.status, took)
    if services(request).config.server.access_log:
        target = logs.mask_secrets(request.path + (f"?{request.query_string}" if request.query_string else ""))
        access_log.info(
            "%s %s %s %d %.1f ms", request.ip, request.method, target, response.status, took * 1000,
            extra={"http": {"remote": request.ip, "method": request.method, "target": target,
                            "status": response.status, "ms": round(took * 1000, 1)}},
        )


def error_response(request: Request, exc: Exception) -> HTTPResponse:
    """Every failure as a Matrix error body; tracebacks go to the log only. A CORS preflight
    (OPTIONS), on any path, is answered 200: no route takes OPTIONS, so each one ends here."""
    if request.method == "OPTIONS":
        return empty(status=200, headers=CORS_HEADERS)
    if isinstance(exc, MatrixError):
        error = exc
    elif isinstance(exc, NotFound):
        error = MatrixError(404, "M_UNRECOGNIZED", "Unrecognized request")
    elif isinstance(exc, MethodNotAllowed):
        error = MatrixError(405, "M_UNRECOGNIZED", f"Method {request.method} is not allowed here")
    elif isinstance(exc, PayloadTooLarge):
        error = MatrixError(413, "M_TOO_LARGE", "The request body is too large")
    elif isinstance(exc, BadRequest):
        error = MatrixError(400, "M_BAD_JSON", str(exc) or "Bad request")
    elif isinstance(exc, redis.exceptions.TimeoutError):
        logs.repeated.error(log, "requests failed: the cache did not answer in time: %s", exc, key="redis timeout")
        error = MatrixError(503, "M_UNKNOWN", "The cache did not answer in time, try again shortly")
    elif isinstance(exc, REDIS_ERRORS):
        logs.repeated.error(log, "requests failed: cache unavailable: %s", exc, key=f"redis {type(exc).__name__}")
        error = MatrixError(503, "M_UNKNOWN", "The lookup cache is unavailable, try again shortly")
    elif isinstance(exc, sqlalchemy.exc.OperationalError):
        logs.repeated.error(log, "requests failed: database unavailable: %s", exc.orig, key="sql unavailable")
        error = MatrixError(503, "M_UNKNOWN", "The database is unavailable, try again shortly")
    elif isinstance(exc, ServiceUnavailable):  # Sanic's response timeout
        logs.repeated.error(log, "requests failed: no answer within the response timeout: %s", exc)
        error = MatrixError(503, "M_UNKNOWN", "The server did not answer in time, try again shortly")
    elif isinstance(exc, SanicException) and 400 <= exc.status_code < 500:
        error = MatrixError(exc.status_code, "M_UNKNOWN", str(exc))
    else:
        log.exception("%s %s failed", request.method, request.path)
        error = MatrixError(500, "M_UNKNOWN", "Internal server error")
    if error.status == 400:
        log_bad_request(request, error)
    response = json(error.body(), status=error.status)
    response.headers.update(CORS_HEADERS)
    return response
