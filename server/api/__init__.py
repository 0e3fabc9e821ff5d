"""One module per API area; helpers shared by their handlers."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any
from urllib.parse import parse_qs

import jsonschema
import jsonschema_rs
import orjson
from sanic import Request
from sanic.exceptions import BadRequest

from indexer.config import Validator, explain, load_schema
from indexer.settings import Config, Network
from server.caller import usable_token
from server.errors import MatrixError


def config_of(request: Request) -> Config:
    """The server's config."""
    config: Config = request.app.ctx.config
    return config


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


def unsigned_policies(policies: Mapping[str, Mapping[str, Any]], accepted: set[str]) -> list[str]:
    """Ids of the policies of which the user has accepted no language."""
    return [pid for pid, policy in policies.items()
            if not any(isinstance(v, dict) and v["url"] in accepted for v in policy.values())]


async def authenticate(request: Request, terms: bool = True) -> str:
    """The Matrix ID owning the request's identity-server token: 401 M_UNAUTHORIZED without a known
    token, and (unless terms=False) 403 M_TERMS_NOT_SIGNED until every policy is accepted. A token
    checked in the last TOKEN_TRUST_S seconds is answered from the worker's TokenCache."""
    token = access_token(request)
    if token is None:
        raise MatrixError(401, "M_UNAUTHORIZED", "An identity server access token is required")
    if not usable_token(token):
        raise MatrixError(401, "M_UNAUTHORIZED", "Unrecognised access token")
    tokens = request.app.ctx.tokens
    known: tuple[str, bool] | None = tokens.get(token)
    if known is not None and (known[1] or not terms):
        return known[0]
    storage = request.app.ctx.storage
    user_id: str | None = await storage.run(storage.account_user, token)
    if user_id is None:
        tokens.forget(token)
        raise MatrixError(401, "M_UNAUTHORIZED", "Unrecognised access token")
    policies = config_of(request).terms.policies
    missing = unsigned_policies(policies, await storage.run(storage.accepted_urls, user_id)) if policies else []
    tokens.put(token, user_id, not missing)
    if terms and missing:
        raise MatrixError(403, "M_TERMS_NOT_SIGNED", f"Accept the terms first: {', '.join(missing)}")
    return user_id


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
