"""Binding and unbinding 3PIDs to Matrix IDs (identity service API "Association"), v2 and v1."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from indexer.normalize import query_address
from indexer.settings import ServerConfig
from server.api import V1, V2, authenticate_v2, config_of, json_body
from server.api.sessions import live_session, validated_session
from server.bindings import bound_association
from server.errors import MatrixError, shown
from server.federation import BadSignature, FederationError, WrongDestination
from server.storage import Binding, now_ms

log = logging.getLogger(__name__)

bp = Blueprint("bind")


@bp.post(V1 + "/3pid/bind", name="bind_v1")
@bp.post(V2 + "/3pid/bind", name="bind_v2")
async def bind(request: Request) -> HTTPResponse:
    """POST /_matrix/identity/v2/3pid/bind (and v1): bind a validated 3PID to a Matrix ID."""
    owner = await authenticate_v2(request)
    body = json_body(request, "bind", allow_form=True)
    if owner is not None and body["mxid"] != owner:
        raise MatrixError(403, "M_UNAUTHORIZED", "A token can only bind 3PIDs to its own Matrix ID")
    session = await validated_session(request, body["sid"], body["client_secret"])
    ts = now_ms()
    storage = request.app.ctx.storage
    replaced, generation = await storage.run(storage.bind, session.medium, session.address, body["mxid"], ts)
    await request.app.ctx.binding_mirror.put(session.medium, session.address, body["mxid"], generation)
    if replaced is not None and replaced.mxid != body["mxid"]:
        log.info("%s %s rebound from %s to %s", session.medium, session.address, replaced.mxid, body["mxid"])
    else:
        log.info("%s %s bound to %s", session.medium, session.address, body["mxid"])
    await request.app.ctx.invites.addresses_known([(session.medium, session.address)], body["mxid"])
    return json(bound_association(request.app.ctx.keys, Binding(session.medium, session.address, body["mxid"], ts)))


def our_names(server: ServerConfig) -> list[str]:
    """The names a homeserver may have been told to reach us by (its X-Matrix "destination"), in
    lower case: server.name, and public_url's host with and without its port."""
    url = urlsplit(server.public_url)
    host = url.hostname or ""
    host = f"[{host}]" if ":" in host else host
    port = url.port or (443 if url.scheme == "https" else 80)
    return list(dict.fromkeys(n.lower() for n in (server.name, host, f"{host}:{port}") if n))


async def _signing_homeserver(request: Request, authorization: str) -> str:
    uri = request.path + (f"?{request.query_string}" if request.query_string else "")
    try:
        signer: str = await request.app.ctx.federation.verify_request(
            authorization, request.method, uri, request.json, our_names(config_of(request).server))
        return signer
    except ValueError as exc:
        raise MatrixError(403, "M_FORBIDDEN", f"Invalid X-Matrix authorization: {exc}") from None
    except WrongDestination as exc:
        accepted = ", ".join(exc.our_names)
        log.warning("unbind refused: signed for %s, which is not a name of this server (it answers to %s)",
                    shown(exc.destination), accepted)
        raise MatrixError(403, "M_FORBIDDEN", f"The request was signed for {exc.destination!r}, which is not a name "
                                              f"of this identity server; it answers to {accepted}") from None
    except BadSignature as exc:
        log.warning("unbind refused: %s", exc)
        raise MatrixError(403, "M_FORBIDDEN", "The homeserver signature does not verify") from None
    except FederationError as exc:
        log.warning("unbind: cannot check the homeserver signature: %s", exc)
        raise MatrixError(502, "M_UNKNOWN", "Could not fetch the homeserver's keys to check its signature") from None


@bp.post(V1 + "/3pid/unbind", name="unbind_v1")
@bp.post(V2 + "/3pid/unbind", name="unbind_v2")
async def unbind(request: Request) -> HTTPResponse:
    """POST /_matrix/identity/v2/3pid/unbind (and v1): remove a binding, proven by a validated session
    for the 3PID or by the signature of the Matrix ID's homeserver (no identity-server token needed)."""
    body = json_body(request, "unbind")
    medium = body["threepid"]["medium"]
    address = query_address(medium, body["threepid"]["address"])
    mxid = body["mxid"]
    if "sid" in body and "client_secret" in body:
        session = await live_session(request, body["sid"], body["client_secret"])
        if session.validated_at is None:
            raise MatrixError(403, "M_SESSION_NOT_VALIDATED", "This 3PID has not been validated yet")
        if (session.medium, session.address) != (medium, address):
            raise MatrixError(403, "M_FORBIDDEN", "The session validated a different 3PID")
        proof = f"session {session.sid}"
    elif request.headers.get("authorization", "").startswith("X-Matrix "):
        origin = await _signing_homeserver(request, request.headers["authorization"])
        if mxid.partition(":")[2] != origin:
            raise MatrixError(403, "M_FORBIDDEN", f"{origin} cannot unbind a user of another homeserver")
        proof = f"signature of {origin}"
    else:
        raise MatrixError(403, "M_FORBIDDEN", "Unbinding needs a validated session (sid, client_secret) "
                                              "or the homeserver's X-Matrix signature")
    storage = request.app.ctx.storage
    generation = await storage.run(storage.unbind, medium, address, mxid)
    if generation is not None:
        await request.app.ctx.binding_mirror.remove(medium, address, generation)
        log.info("%s %s unbound from %s (%s)", medium, address, mxid, proof)
    return json({})
