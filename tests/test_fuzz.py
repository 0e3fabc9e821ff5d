"""Schemathesis against a running `mxisd run` over loopback: every operation of the served OpenAPI
document gets generated requests, valid and invalid, with a fixed seed and a bounded number of
examples; no answer may be a 5xx, none may take longer than a bound, and each must be what the
document says (status code, content type, body schema)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from indexer.cache import Cache
from server.openapi import ADMIN, HOMESERVER, IDENTITY
from tests.conftest import REPO, started
from tests.fake_homeserver import ClientHomeserver

EXAMPLES = 15  # per operation and generation mode (62 operations): at most 1,860 requests
ANSWER_WITHIN_S = 15  # a hang is an answer later than this
HS_TOKEN = "syt_fuzzer_token"
ADMIN_TOKEN = "admin-token-of-the-fuzzer"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def fuzz(operation: Any, mode: GenerationMode, url: str, headers: dict[str, str], statuses: Counter[int]) -> None:
    """EXAMPLES requests of one operation in one mode; the first failure found is raised."""
    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def call(case: Any) -> None:
        response = case.call(base_url=url, headers=headers, timeout=ANSWER_WITHIN_S)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=CHECKS)

    call()


def _last(operation: Any) -> bool:
    # Logging the tester's token out would leave the operations after it nothing but 401s.
    return operation.path.endswith("/account/logout")


@pytest.fixture
def server(make_server, client_homeserver: ClientHomeserver, redis_url, prefix):
    srv = make_server()
    srv.config["homeserver"] = {"url": client_homeserver.url}
    srv.config["admin"] = {"token": ADMIN_TOKEN}
    client_homeserver.tokens[HS_TOKEN] = "@fuzzer:example.org"
    client_homeserver.identity_server = srv.url
    Cache(redis.Redis.from_url(redis_url, decode_responses=True), prefix).initialize(pepper="pepper")
    return started(srv)


def test_generated_requests_get_no_5xx_and_answers_the_document_describes(server):
    served = server.http.get("/_mxisd/openapi.json").json()
    assert served == json.loads((REPO / "schemas" / "openapi.json").read_text(encoding="utf-8"))
    schema = schemathesis.openapi.from_dict(served)
    tokens = {IDENTITY: server.token(), HOMESERVER: HS_TOKEN, ADMIN: ADMIN_TOKEN}
    operations = sorted((result.ok() for result in schema.get_all_operations()), key=_last)
    # Every operation is fuzzed: the admin page and /metrics too (they answer loopback, as here).
    assert len(operations) == sum(len(methods) for methods in served["paths"].values())
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    for operation in operations:
        schemes = [name for requirement in operation.definition.raw.get("security", []) for name in requirement]
        headers = {"Authorization": f"Bearer {tokens[schemes[0]]}"} if schemes else {}
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                fuzz(operation, mode, server.url, headers, statuses)
            except Unsatisfiable:
                # Negative mode only: the operation takes nothing that can be made invalid (no
                # parameters, or only path strings, which any string satisfies).
                assert mode is GenerationMode.NEGATIVE, operation.label
            except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - all operations' failures, together
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)
    assert statuses[200] and statuses[400] and statuses[401], statuses  # both good and bad requests were made
