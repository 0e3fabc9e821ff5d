"""The admin API (/_mxisd/admin/v1/) and page (/_mxisd/admin/): store freshness, sync jobs, cache
inspection. Served only when admin.token is set, only to admin.allow; every API call needs the token."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from pathlib import Path

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, html, json, redirect

from indexer import logs
from server.api import json_body, require_client_in
from server.caller import usable_token
from server.container import services
from server.errors import MatrixError

bp = Blueprint("admin", url_prefix="/_mxisd/admin")

PAGE = (Path(__file__).resolve().parent.parent / "static" / "admin.html").read_text(encoding="utf-8")


def _inline_source(tag: str) -> str:
    """The CSP source allowing exactly the page's one inline <script> or <style> and nothing else."""
    match = re.search(rf"<{tag}>(.*?)</{tag}>", PAGE, re.DOTALL)
    assert match is not None, f"admin.html has no <{tag}>"
    return "'sha256-" + base64.b64encode(hashlib.sha256(match.group(1).encode()).digest()).decode() + "'"


PAGE_HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; script-src {_inline_source('script')}; "
                               f"style-src {_inline_source('style')}; connect-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@bp.on_request
async def gate(request: Request) -> None:
    config = services(request).config
    require_client_in(request, config.admin.allow)
    if request.route is not None and request.route.name.endswith((".admin.page", ".admin.page_redirect")):
        return
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header[:7].lower() == "bearer " else ""
    if not given:
        raise MatrixError(401, "M_UNAUTHORIZED", "The admin token is required (Authorization: Bearer ...)")
    # Digests of equal length, compared in constant time: the token's length leaks nothing either.
    expected = token_digest(config.admin.token or "")
    if not usable_token(given) or not hmac.compare_digest(token_digest(given), expected):
        raise MatrixError(401, "M_UNAUTHORIZED", "Unrecognised admin token")


@bp.get("", name="page_redirect", strict_slashes=True)
async def page_redirect(request: Request) -> HTTPResponse:
    """GET /_mxisd/admin: to the page's canonical address."""
    return redirect("/_mxisd/admin/")


@bp.get("/", name="page", strict_slashes=True)
async def page(request: Request) -> HTTPResponse:
    """GET /_mxisd/admin/: the admin page (it asks for the token and calls the API)."""
    return html(PAGE, headers=PAGE_HEADERS)


@bp.get("/v1/stores")
async def stores(request: Request) -> HTTPResponse:
    """GET /_mxisd/admin/v1/stores: each store's size, syncs and job; followers' lag; whether indexers run."""
    return json(await services(request).admin.overview())


@bp.post("/v1/stores/<name>/sync")
async def sync(request: Request, name: str) -> HTTPResponse:
    """POST /_mxisd/admin/v1/stores/{name}/sync: queue a sync for the indexer, or return the store's active one."""
    body = json_body(request, "admin_sync") if request.body else {}
    job, created = await services(request).admin.start_job(name, bool(body.get("full")), logs.request_id.get())
    return json({"job": job, "created": created}, status=202 if created else 200)


@bp.get("/v1/jobs/<job_id>")
async def job(request: Request, job_id: str) -> HTTPResponse:
    """GET /_mxisd/admin/v1/jobs/{id}: a sync job's state, progress and outcome."""
    return json(await services(request).admin.job(job_id))


@bp.get("/v1/identities")
async def identities(request: Request) -> HTTPResponse:
    """GET /_mxisd/admin/v1/identities?q=: what the cache holds for a 3PID or an mxid, store by store."""
    q = (request.args.get("q") or "").strip()
    if not q:
        raise MatrixError(400, "M_MISSING_PARAMS", "Missing parameters: q")
    return json(await services(request).admin.inspect(q))


@bp.post("/v1/cache/rebuild-fulltext")
async def rebuild_fulltext(request: Request) -> HTTPResponse:
    """POST /_mxisd/admin/v1/cache/rebuild-fulltext: every host's follower rebuilds Whoosh from Redis."""
    requests = await services(request).admin.request_rebuild()
    return json({"requested": requests}, status=202)
