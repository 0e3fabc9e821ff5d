"""The OpenAPI 3.1 document of the HTTP API, made from the app's registered routes and the request
schemas in schemas/api/, so that it cannot drift from either: a route that OPERATIONS does not
describe, or a description whose route is gone, is an error. `python -m server.openapi` prints the
document of every route (schemas/openapi.json is that output; a test keeps the two equal)."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from typing import Any

from sanic import Sanic

from indexer.config import load_schema
from server.api.health import VERSION

V1 = "/_matrix/identity/api/v1"
V2 = "/_matrix/identity/v2"

IDENTITY, HOMESERVER, ADMIN = "identityToken", "homeserverToken", "adminToken"

STATUS_TEXT = {
    200: "OK", 202: "Accepted", 302: "Redirect", 400: "Bad request: a Matrix error such as M_BAD_JSON, "
    "M_NOT_JSON, M_MISSING_PARAMS or M_INVALID_PARAM", 401: "No valid access token", 403: "Not allowed",
    404: "Not found", 413: "The request body is larger than server.max_body_size (M_TOO_LARGE)",
    429: "Rate limited (M_LIMIT_EXCEEDED, with retry_after_ms)", 500: "The message could not be sent",
    502: "A server this one had to ask did not answer", 503: "Temporarily unavailable (the cache, the database "
    "or the homeserver; or no answer within the response timeout)",
}


@dataclass(frozen=True)
class Op:
    """How one handler is called and what it answers (besides the 503 every route may answer)."""

    body: str | dict[str, Any] | None = None  # a schemas/api name, an inline schema, or no body
    form: bool = False  # also application/x-www-form-urlencoded
    query: tuple[tuple[str, bool, dict[str, Any]], ...] = ()  # (name, required, schema)
    query_schema: str | None = None  # query parameters from a schemas/api schema's properties
    auth: str | None = None  # a security scheme
    v1_open: bool = False  # on the v1 path no token is needed (the legacy API), nor can it be refused
    ok: tuple[int, ...] = (200,)
    errors: tuple[int, ...] = ()
    ok_type: str = "application/json"
    html_errors: bool = False  # errors answered as an HTML page (a link opened in a browser)
    relayed: bool = False  # the homeserver's answer is passed on as it is: any 4xx
    ready: bool = False  # 503 with the readiness checks, not a Matrix error
    answer: dict[str, Any] | None = None  # the schema of a JSON success body (default: any object)


STRING = {"type": "string"}
BOOLEAN = {"type": "boolean"}
INTEGER = {"type": "integer"}


def _object(required: list[str], **properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


SIGNED = {"type": "object", "additionalProperties": {"type": "object", "additionalProperties": STRING}}
ASSOCIATION = _object(["address", "medium", "mxid", "not_before", "not_after", "ts", "signatures"],
                      address=STRING, medium=STRING, mxid=STRING, not_before=INTEGER, not_after=INTEGER, ts=INTEGER,
                      signatures=SIGNED)
VALID = _object(["valid"], valid=BOOLEAN)
EMPTY = {"type": "object", "maxProperties": 0}
DIRECTORY_HIT = _object(["user_id"], user_id=STRING, display_name={"type": ["string", "null"]},
                        avatar_url={"type": ["string", "null"]})
SUCCESS = _object(["success"], success=BOOLEAN)
PUBLIC_KEY = (("public_key", True, STRING),)
ANY_OBJECT = {"type": "object", "description": "Passed on to the homeserver as it is."}

# Handler name -> description. Every registered route's handler must be here.
OPERATIONS: dict[str, Op] = {
    "versions": Op(answer=_object(["versions"], versions={"type": "array", "items": STRING})),
    "ping_v1": Op(answer=EMPTY),
    "ping_v2": Op(answer=EMPTY),
    "status": Op(),
    "version": Op(),
    "openapi": Op(),
    "ready": Op(ready=True),
    "metrics": Op(errors=(403,), ok_type="text/plain"),
    "get_key": Op(errors=(404,), answer=_object(["public_key"], public_key=STRING)),
    "is_valid": Op(query=PUBLIC_KEY, errors=(400,), answer=VALID),
    "ephemeral_is_valid": Op(query=PUBLIC_KEY, errors=(400,), answer=VALID),
    "lookup": Op(query=(("medium", True, STRING), ("address", True, STRING)), errors=(400,),
                 answer={"anyOf": [EMPTY, ASSOCIATION]}),
    "bulk_lookup": Op(body="v1_bulk_lookup", errors=(400, 413), answer=_object(
        ["threepids"], threepids={"type": "array", "items": {"type": "array", "items": STRING, "minItems": 3,
                                                                   "maxItems": 3}})),
    "hash_details": Op(auth=IDENTITY, errors=(401, 403), answer=_object(
        ["lookup_pepper", "algorithms"], lookup_pepper=STRING, algorithms={"type": "array", "items": STRING})),
    "lookup_v2": Op(body="v2_lookup", auth=IDENTITY, errors=(400, 401, 403, 413),
                    answer=_object(["mappings"], mappings={"type": "object", "additionalProperties": STRING})),
    "register": Op(body="v2_account_register", errors=(400, 401, 403, 413, 502),
                   answer=_object(["token", "access_token"], token=STRING, access_token=STRING)),
    "account": Op(auth=IDENTITY, errors=(401, 403), answer=_object(["user_id"], user_id=STRING)),
    "logout": Op(auth=IDENTITY, errors=(401,), answer=EMPTY),
    "get_terms": Op(answer=_object(["policies"], policies={"type": "object"})),
    "accept_terms": Op(body="v2_terms", auth=IDENTITY, errors=(400, 401, 413), answer=EMPTY),
    "request_email_token": Op(body="request_email_token", auth=IDENTITY, v1_open=True,
                              errors=(400, 401, 403, 413, 429, 500), answer=_object(["sid"], sid=STRING)),
    "request_msisdn_token": Op(body="request_msisdn_token", auth=IDENTITY, v1_open=True,
                               errors=(400, 401, 403, 413, 429),
                               answer=_object(["sid", "msisdn", "intl_fmt"], sid=STRING, msisdn=STRING,
                                              intl_fmt=STRING)),
    "submit_email_token": Op(body="submit_token", form=True, auth=IDENTITY, v1_open=True,
                             errors=(400, 401, 403, 404, 413), answer=SUCCESS),
    "submit_msisdn_token": Op(body="submit_token", form=True, auth=IDENTITY, v1_open=True,
                              errors=(400, 401, 403, 404, 413), answer=SUCCESS),
    "submit_email_token_link": Op(query_schema="submit_token", ok_type="text/html", ok=(200, 302),
                                  errors=(400, 403, 404), html_errors=True),
    "submit_msisdn_token_link": Op(query_schema="submit_token", ok_type="text/html", ok=(200, 302),
                                   errors=(400, 403, 404), html_errors=True),
    "get_validated": Op(query_schema="get_validated_3pid", auth=IDENTITY, v1_open=True,
                        errors=(400, 401, 403, 404),
                        answer=_object(["medium", "address", "validated_at"], medium=STRING, address=STRING,
                                       validated_at=INTEGER)),
    "bind": Op(body="bind", form=True, auth=IDENTITY, v1_open=True, errors=(400, 401, 403, 404, 413),
               answer=ASSOCIATION),
    "unbind": Op(body="unbind", errors=(400, 403, 404, 413, 502), answer=EMPTY),
    "store_invite": Op(body="store_invite", form=True, auth=IDENTITY, v1_open=True,
                       errors=(400, 401, 403, 413, 429, 500), answer=_object(
                           ["token", "public_keys", "public_key", "display_name"], token=STRING, public_key=STRING,
                           display_name=STRING, public_keys={"type": "array", "items": _object(
                               ["public_key", "key_validity_url"], public_key=STRING, key_validity_url=STRING)})),
    "invite_link": Op(ok=(302,)),
    "sign_ed25519": Op(body="sign_ed25519", auth=IDENTITY, v1_open=True, errors=(400, 401, 403, 404, 413),
                       answer=_object(["mxid", "sender", "token", "signatures"], mxid=STRING, sender=STRING,
                                      token=STRING, signatures=SIGNED)),
    "check_credentials": Op(body="check_credentials", errors=(400, 413), answer=_object(
        ["auth"], auth=_object(["success", "profile"], success=BOOLEAN, mxid=STRING, profile={"type": "object"}))),
    "internal_profile": Op(errors=(404,), answer=_object(["user_id", "display_name", "threepids", "roles"],
                                                         user_id=STRING, display_name={"type": ["string", "null"]},
                                                         threepids={"type": "array"},
                                                         roles={"type": "array", "items": STRING})),
    "search": Op(body="user_directory_search", auth=HOMESERVER, errors=(400, 401, 413, 502), relayed=True,
                 answer=_object(["results", "limited"], results={"type": "array", "items": DIRECTORY_HIT},
                                limited=BOOLEAN)),
    "login": Op(body=ANY_OBJECT, errors=(400, 413, 429, 502), relayed=True),
    "login_flows": Op(errors=(401, 502), relayed=True),
    "register_email_token": Op(body="register_email_token", errors=(400, 401, 403, 413, 502), relayed=True),
    "register_msisdn_token": Op(body="register_msisdn_token", errors=(400, 401, 403, 413, 502), relayed=True),
    "room_invite": Op(body=ANY_OBJECT, auth=HOMESERVER, errors=(400, 401, 403, 413, 502), relayed=True),
    "create_room": Op(body=ANY_OBJECT, auth=HOMESERVER, errors=(400, 401, 403, 413, 502), relayed=True),
    "profile": Op(errors=(401, 404, 502), relayed=True),
    "page_redirect": Op(ok=(302,), errors=(403,)),
    "page": Op(ok_type="text/html", errors=(403,)),
    "stores": Op(auth=ADMIN, errors=(401, 403)),
    "sync": Op(body="admin_sync", auth=ADMIN, ok=(200, 202), errors=(400, 401, 403, 404, 413)),
    "job": Op(auth=ADMIN, errors=(401, 403, 404)),
    "identities": Op(query=(("q", True, STRING),), auth=ADMIN, errors=(400, 401, 403)),
    "rebuild_fulltext": Op(auth=ADMIN, ok=(202,), errors=(401, 403)),
}

MATRIX_ERROR = {
    "type": "object",
    "required": ["errcode", "error"],
    "properties": {"errcode": {"type": "string", "pattern": "^M_[A-Z_]+$"}, "error": {"type": "string"}},
    "description": "A Matrix error; some carry more fields (retry_after_ms, success, lookup_pepper, ...).",
}
READY = {
    "type": "object",
    "required": ["ready", "checks"],
    "properties": {"ready": {"type": "boolean"}, "checks": {"type": "object"}},
}

_PARAMETER = re.compile(r"<([^:>]+)(?::[^>]*)?>")


def _operation_key(handler: str, path: str) -> str:
    # Handlers of the same name in two areas: the v2 lookup is the only one.
    return "lookup_v2" if handler == "lookup" and path.startswith(V2) else handler


def _request_schema(name: str) -> dict[str, Any]:
    schema = dict(load_schema(f"api/{name}.json"))
    schema.pop("$schema", None)
    schema.pop("$id", None)
    return schema


def _responses(op: Op, errors: set[int]) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status in op.ok:
        if status == 302:
            responses["302"] = {"description": STATUS_TEXT[302], "headers": {"Location": {"schema": STRING}}}
        elif op.ok_type == "application/json":
            answer = op.answer if op.answer is not None and status == 200 else {"type": "object"}
            if op.ready:
                answer = {"$ref": "#/components/schemas/Ready"}
            responses[str(status)] = {"description": STATUS_TEXT[status],
                                      "content": {"application/json": {"schema": answer}}}
        else:
            responses[str(status)] = {"description": STATUS_TEXT[status], "content": {op.ok_type: {"schema": STRING}}}
    error_content = {"application/json": {"schema": {"$ref": "#/components/schemas/MatrixError"}}}
    for status in sorted(errors | {503}):
        content = {"text/html": {"schema": STRING}} if op.html_errors and status < 500 else error_content
        responses[str(status)] = {"description": STATUS_TEXT[status], "content": content}
    if op.ready:
        responses["503"] = {"description": "Not ready: the failing checks are in the body",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Ready"}}}}
    if op.relayed:
        responses["4XX"] = {"description": "The homeserver's own answer, passed on", "content": error_content}
    return dict(sorted(responses.items()))


def _operation(method: str, path: str, handler: Any, op: Op) -> dict[str, Any]:
    first_line = (handler.__doc__ or "").strip().split("\n")[0]
    summary = re.sub(r"^[A-Z]+ /\S*( \(and v1\))?: ", "", first_line)
    summary = summary[:1].upper() + summary[1:]
    open_v1 = op.v1_open and path.startswith(V1)
    auth = None if open_v1 else op.auth
    operation: dict[str, Any] = {"operationId": f"{method.lower()}{re.sub(r'[^A-Za-z0-9]+', '_', path)}",
                                 "summary": summary}
    parameters = [{"name": name, "in": "path", "required": True, "schema": STRING}
                  for name in re.findall(r"\{([^}]+)\}", path)]
    query = list(op.query)
    if op.query_schema is not None:
        schema = _request_schema(op.query_schema)
        query += [(name, name in schema.get("required", []), prop) for name, prop in schema["properties"].items()]
    parameters += [{"name": name, "in": "query", "required": required, "schema": schema}
                   for name, required, schema in query]
    if auth == IDENTITY:
        parameters.append({"name": "access_token", "in": "query", "required": False, "schema": STRING,
                           "description": "The identity-server token, for clients that cannot send a header"})
    if parameters:
        operation["parameters"] = parameters
    if op.body is not None:
        schema = {"$ref": f"#/components/schemas/{op.body}"} if isinstance(op.body, str) else op.body
        content = {"application/json": {"schema": schema}}
        if op.form:
            content["application/x-www-form-urlencoded"] = {"schema": schema}
        operation["requestBody"] = {"required": True, "content": content}
    if auth is not None:
        operation["security"] = [{auth: []}]
    errors = set(op.errors)
    if open_v1:  # no token, so no 401, nor the 403s that come from a token's terms or owner
        errors -= {401, 403}
    operation["responses"] = _responses(op, errors)
    return operation


def document(app: Sanic[Any, Any]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route the app has registered."""
    paths: dict[str, dict[str, Any]] = {}
    used: set[str] = set()
    schemas: dict[str, Any] = {"MatrixError": MATRIX_ERROR, "Ready": READY}
    for route in app.router.routes:
        path = "/" + _PARAMETER.sub(r"{\1}", route.path)
        key = _operation_key(route.handler.__name__, path)
        if key not in OPERATIONS:
            raise KeyError(f"route /{route.path} ({route.handler.__name__}) is not described in server/openapi.py")
        used.add(key)
        op = OPERATIONS[key]
        if isinstance(op.body, str):
            schemas[op.body] = _request_schema(op.body)
        for method in sorted(route.methods):
            paths.setdefault(path, {})[method.lower()] = _operation(method, path, route.handler, op)
    return {
        "openapi": "3.1.0",
        "info": {"title": "mxisd", "version": VERSION,
                 "description": "A Matrix identity server answering from a cache of the organisation's directories. "
                                "Every error is a Matrix error body {errcode, error}."},
        # Sanic lists a path's routes in no fixed order: sorted, the output is the same on every run.
        "paths": {path: dict(sorted(methods.items())) for path, methods in sorted(paths.items())},
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {
                IDENTITY: {"type": "http", "scheme": "bearer",
                           "description": "An identity-server token from POST /_matrix/identity/v2/account/register"},
                HOMESERVER: {"type": "http", "scheme": "bearer",
                             "description": "A client access token of the homeserver, checked with its whoami"},
                ADMIN: {"type": "http", "scheme": "bearer", "description": "admin.token"},
            },
        },
    }


def full_app() -> Sanic[Any, Any]:
    """An app with every route registered (the admin API and /metrics too), for the document."""
    # server.app serves this module's document: imported here, not at the top.
    from server.app import blueprints

    app = Sanic.get_app("mxisd_openapi", force_create=True)
    if not app.router.routes:
        for blueprint in blueprints(with_admin=True, with_metrics=True):
            app.blueprint(blueprint)
    return app


def unused_operations(app: Sanic[Any, Any]) -> set[str]:
    """Descriptions in OPERATIONS that no route of the app uses."""
    keys = {_operation_key(r.handler.__name__, "/" + r.path) for r in app.router.routes}
    return set(OPERATIONS) - keys


def text(app: Sanic[Any, Any]) -> str:
    """The document of app as `python -m server.openapi` prints it."""
    return json.dumps(document(app), indent=1, ensure_ascii=False) + "\n"


def main() -> None:
    sys.stdout.write(text(full_app()))


if __name__ == "__main__":
    main()
