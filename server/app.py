"""create_app(config): listeners, blueprints, CORS and the mapping of every error to a Matrix error."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from sanic import Request, Sanic
from sanic.exceptions import BadRequest, MethodNotAllowed, NotFound, PayloadTooLarge, SanicException
from sanic.response import HTTPResponse, empty, json

from indexer import logs
from indexer.cache import Lookups, connect_async
from indexer.config import parse_duration
from indexer.fulltext import DirectorySearch, HideRules
from indexer.scheduler import fulltext_path
from server.api import auth, directory, identity_v1, identity_v2, profile, pubkey, status
from server.credentials import Credentials
from server.homeserver import Homeserver
from server.errors import MatrixError
from server.keys import Keys
from server.read_through import ReadThrough

log = logging.getLogger(__name__)

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Origin, X-Requested-With, Content-Type, Accept, Authorization",
}


class HashedTokens:
    """Configured tokens kept as digests, so membership does not compare secrets byte by byte."""

    def __init__(self, tokens: list[str]) -> None:
        self._digests = {hashlib.sha256(t.encode()).digest() for t in tokens}

    def __contains__(self, token: object) -> bool:
        return isinstance(token, str) and hashlib.sha256(token.encode()).digest() in self._digests


def create_app(config: dict[str, Any], redis_url: str) -> Sanic:
    """The Sanic application for one worker."""
    logs.setup(config["log_level"], "server")  # spawned workers start with no logging set up
    app = Sanic("mxisd", configure_logging=False)
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.config.REQUEST_MAX_SIZE = 16 * 1024 * 1024
    # uvloop installs SIGTERM handling only once the loop runs, after Sanic has set SIGTERM to
    # "ignore" and begun answering: a SIGTERM in that window was lost and the server never stopped.
    app.config.USE_UVLOOP = False
    app.ctx.config = config
    app.ctx.bulk_max = config["lookup"]["bulk_max"]
    app.ctx.association_validity_ms = parse_duration(config["lookup"]["association_validity"]) * 1000
    app.ctx.access_tokens = HashedTokens(config["lookup"]["access_tokens"])
    app.ctx.keys = Keys.load_or_create(config["data_dir"], config["server"]["name"])

    if config["server"]["proxies_count"]:
        app.config.PROXIES_COUNT = config["server"]["proxies_count"]

    for module in (status, pubkey, identity_v1, identity_v2, directory, auth, profile):
        app.blueprint(module.bp)

    @app.before_server_start
    async def open_cache(app: Sanic) -> None:
        client = connect_async(redis_url)
        app.ctx.redis = client
        app.ctx.lookups = Lookups(client, config["redis"]["prefix"], [s["name"] for s in config["stores"]])
        app.ctx.read_through = ReadThrough(config, app.ctx.lookups)
        app.ctx.homeserver = Homeserver(config)
        settings = config["directory"]
        app.ctx.directory = DirectorySearch(fulltext_path(config), HideRules(settings["hide"]), settings["threepids"])
        # Whoosh blocks: searches run in a thread of their own, taking turns on one open searcher.
        app.ctx.search_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="search")
        app.ctx.credentials = Credentials(config, app.ctx.lookups)

    @app.after_server_start
    async def announce(app: Sanic) -> None:
        log.info("worker %d ready", os.getpid())

    @app.before_server_stop
    async def ignore_repeated_interrupts(app: Sanic) -> None:
        # Ctrl-C reaches each worker twice, from the terminal and from Sanic's manager: the second
        # must not abort the clean stop that the first began.
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    @app.after_server_stop
    async def close_cache(app: Sanic) -> None:
        await app.ctx.read_through.close()
        await app.ctx.homeserver.close()
        app.ctx.search_executor.shutdown(wait=True)
        app.ctx.directory.close()
        await asyncio.get_running_loop().run_in_executor(None, app.ctx.credentials.close)
        await app.ctx.redis.aclose()

    @app.on_request
    async def preflight(request: Request) -> HTTPResponse | None:
        if request.method == "OPTIONS":
            return empty(status=200)
        return None

    @app.on_response
    async def cors(request: Request, response: HTTPResponse) -> None:
        response.headers.update(CORS_HEADERS)

    @app.exception(Exception)
    async def matrix_error(request: Request, exc: Exception) -> HTTPResponse:
        return error_response(request, exc)

    return app


def error_response(request: Request, exc: Exception) -> HTTPResponse:
    """Every failure as a Matrix error body; tracebacks go to the log only."""
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
    elif isinstance(exc, redis.exceptions.RedisError):
        log.error("%s %s: cache unavailable: %s", request.method, request.path, exc)
        error = MatrixError(503, "M_UNKNOWN", "The lookup cache is unavailable, try again shortly")
    elif isinstance(exc, SanicException) and 400 <= exc.status_code < 500:
        error = MatrixError(exc.status_code, "M_UNKNOWN", str(exc))
    else:
        log.exception("%s %s failed", request.method, request.path)
        error = MatrixError(500, "M_UNKNOWN", "Internal server error")
    response = json(error.body(), status=error.status)
    response.headers.update(CORS_HEADERS)
    return response
