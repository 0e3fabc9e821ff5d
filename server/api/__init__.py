"""One module per API area; helpers shared by their handlers."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import cache
from typing import Any
from urllib.parse import parse_qs, unquote

import jsonschema
import jsonschema_rs
import orjson
from sanic import Request
from sanic.exceptions import BadRequest

from indexer.config import Validator, explain, load_schema
from indexer.settings import Network
from server.caller import usable_token
from server.container import services
from server.errors import MatrixError


@cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    return Validator(load_schema(f"api/{name}.json"))


@cache
def _fast_validator(name: str) -> Any:
    # Compiled (Rust) validation of the same schema is hundreds of times faster on a bulk lookup's
    # hundreds of items; jsonschema only explains the bodies it rejects.
    return jsonschema_rs.validator_for(load_schema(f"api/{name}.json"))


V1 = "/_matrix/identity/api/v1"
V2 = "/_matrix/identity/v2"

# Far deeper than any request of the APIs (4 levels at most), far shallower than what exhausts the
# stack of the schema checks and encoders that walk a value recursively.
MAX_JSON_DEPTH = 64


def load_json(body: bytes) -> Any:
    """A request body's JSON value; ValueError (400 from Sanic) when it is nested deeper than
    MAX_JSON_DEPTH."""
    value = orjson.loads(body)
    # Counting brackets costs little and clears nearly every body; only a larger one is walked.
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH:
        level = [value]
        for _ in range(MAX_JSON_DEPTH):
            level = [child for v in level for child in (v.values() if type(v) is dict else v)
                     if type(child) is list or type(child) is dict]
            if not level:
                return value
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def query_params(request: Request) -> dict[str, str]:
    """The first value of each query parameter, as request.args.get gives it (urllib's parse_qs
    without blank values, undecodable bytes replaced), for the hottest handlers: Sanic's parsing
    (parse_qs, its dict of lists, its cache) cost 3 us of a v1 lookup."""
    params: dict[str, str] = {}
    query = request.query_string
    for pair in query.split("&") if query else ():
        name, equals, value = pair.partition("=")
        if equals and value:  # a parameter without "=" or without a value counts as absent
            name = _unquote(name)
            if name not in params:
                params[name] = _unquote(value)
    return params


def _unquote(text: str) -> str:
    if "+" in text:
        text = text.replace("+", " ")
    return unquote(text, errors="replace") if "%" in text else text


def json_body(request: Request, schema: str, allow_form: bool = False) -> dict[str, Any]:
    """The request's JSON object (or, with allow_form, its legacy form-encoded fields), checked
    against schemas/api/<schema>.json."""
    if allow_form and request.content_type.startswith("application/x-www-form-urlencoded"):
        # Parsed here, not by Sanic: Sanic logs a traceback for every form that is not UTF-8.
        try:
            text = request.body.decode("utf-8")
        except UnicodeDecodeError:
            raise MatrixError(400, "M_INVALID_PARAM", "The form body is not UTF-8") from None
        body: Any = {k: v[0] for k, v in parse_qs(text).items()}
    else:
        try:
            body = request.json
        except BadRequest:
            raise MatrixError(400, "M_NOT_JSON",
                              "The request body is not valid JSON (or is nested too deeply)") from None
    if not isinstance(body, dict):
        raise MatrixError(400, "M_BAD_JSON", "The request body must be a JSON object")
    return check_params(body, schema)


def check_params(body: dict[str, Any], schema: str) -> dict[str, Any]:
    """body checked against schemas/api/<schema>.json: M_MISSING_PARAMS or M_INVALID_PARAM."""
    if _fast_validator(schema).is_valid(body):
        return body
    errors = list(_validator(schema).iter_errors(body))
    missing = sorted({e.message.split("'")[1] for e in errors if e.validator == "required" and not e.path})
    if missing:
        raise MatrixError(400, "M_MISSING_PARAMS", f"Missing parameters: {','.join(missing)}")
    if errors:
        raise MatrixError(400, "M_INVALID_PARAM", explain(jsonschema.exceptions.best_match(errors)))
    # The compiled validator refused what the explaining one accepts: refuse it all the same.
    raise MatrixError(400, "M_INVALID_PARAM", "The request does not match its schema")


def access_token(request: Request) -> str | None:
    """The identity-server token from "Authorization: Bearer" or, as Synapse sends it, ?access_token=."""
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return request.args.get("access_token") or None


def identity_token(request: Request) -> str:
    """The request's identity-server token: 401 M_UNAUTHORIZED without one, or with one that cannot be ours."""
    token = access_token(request)
    if token is None:
        raise MatrixError(401, "M_UNAUTHORIZED", "An identity server access token is required")
    if not usable_token(token):
        raise MatrixError(401, "M_UNAUTHORIZED", "Unrecognised access token")
    return token


async def authenticate(request: Request, terms: bool = True) -> str:
    """The Matrix ID owning the request's identity-server token: the errors of identity_token and
    Accounts.authenticate (401 M_UNAUTHORIZED; unless terms=False, 403 M_TERMS_NOT_SIGNED)."""
    return await services(request).accounts.authenticate(identity_token(request), terms)


async def authenticate_v2(request: Request) -> str | None:
    """authenticate() on the v2 paths; None on the unauthenticated legacy v1 paths."""
    return None if request.path.startswith(V1) else await authenticate(request)


def require_client_in(request: Request, networks: Iterable[Network]) -> None:
    """403 M_FORBIDDEN unless the client's address is in one of networks."""
    try:
        address = ipaddress.ip_address(request.ip)
    except ValueError:
        address = None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if address is None or not any(address in network for network in networks):
        raise MatrixError(403, "M_FORBIDDEN", f"Not allowed from {request.ip or 'this address'}")
