"""One module per API area; helpers shared by their handlers."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Any, Union

import jsonschema
from sanic import Request
from sanic.exceptions import BadRequest

from indexer.config import explain, load_schema
from server.errors import MatrixError

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@lru_cache(maxsize=None)
def _validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_schema(f"api/{name}.json"))


def json_body(request: Request, schema: str) -> dict[str, Any]:
    """The request's JSON object, checked against schemas/api/<schema>.json."""
    try:
        body = request.json
    except BadRequest:
        raise MatrixError(400, "M_NOT_JSON", "The request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise MatrixError(400, "M_BAD_JSON", "The request body must be a JSON object")
    errors = list(_validator(schema).iter_errors(body))
    missing = sorted({e.message.split("'")[1] for e in errors if e.validator == "required" and not e.path})
    if missing:
        raise MatrixError(400, "M_MISSING_PARAMS", f"Missing parameters: {','.join(missing)}")
    if errors:
        raise MatrixError(400, "M_INVALID_PARAM", explain(jsonschema.exceptions.best_match(errors)))
    return body


def access_token(request: Request) -> str | None:
    """The identity-server token from "Authorization: Bearer" or, as Synapse sends it, ?access_token=."""
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return request.args.get("access_token") or None


def require_token(request: Request) -> None:
    """401 M_UNAUTHORIZED unless the request carries an accepted identity-server token."""
    token = access_token(request)
    if token is None:
        raise MatrixError(401, "M_UNAUTHORIZED", "An identity server access token is required")
    if token not in request.app.ctx.access_tokens:
        raise MatrixError(401, "M_UNAUTHORIZED", "Unrecognised access token")


def require_client_in(request: Request, networks: list[IPNetwork]) -> None:
    """403 M_FORBIDDEN unless the client's address is in one of networks."""
    try:
        address = ipaddress.ip_address(request.ip)
    except ValueError:
        address = None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if address is None or not any(address in network for network in networks):
        raise MatrixError(403, "M_FORBIDDEN", f"Not allowed from {request.ip or 'this address'}")
