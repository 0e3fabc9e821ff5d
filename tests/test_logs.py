"""Log lines: secrets masked wherever they appear, JSON events with the request id."""

from __future__ import annotations

import json
import logging

import pytest

from indexer import logs


@pytest.mark.parametrize("line, secret", [
    ("GET /_matrix/identity/v2/hash_details?access_token=syt_abc123&x=1", "syt_abc123"),
    ("bind failed for cn=svc with password=hunter2", "hunter2"),
    ('body {"password": "hunter2", "user": "alice"}', "hunter2"),
    ("{'client_secret': 'cs-9f8e7d', 'sid': '1'}", "cs-9f8e7d"),
    ("Authorization: Bearer admin-token-0123456789abcdef", "admin-token-0123456789abcdef"),
    ("token=abc&sid=2", "abc"),
])
def test_secrets_are_masked(line, secret):
    masked = logs.mask_secrets(line)
    assert secret not in masked and logs.REDACTED in masked


def test_other_text_is_kept():
    assert logs.mask_secrets("store people: full sync done, read 3") == "store people: full sync done, read 3"
    assert logs.mask_secrets('{"user": "alice", "sid": "1"}') == '{"user": "alice", "sid": "1"}'


def test_json_events_carry_the_request_id_and_mask_tracebacks(capsys):
    logs.setup("INFO", "server", "json")
    log = logging.getLogger("mxisd.test")
    token = logs.request_id.set("req-1")
    try:
        try:
            raise ValueError("password=hunter2 was wrong")
        except ValueError:
            log.exception("check failed for %s", "alice password=hunter2")
    finally:
        logs.request_id.reset(token)
    log.info("no request")
    first, second = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert first["request_id"] == "req-1" and first["process"] == "server" and first["level"] == "ERROR"
    assert "hunter2" not in json.dumps(first) and "ValueError" in first["exception"]
    assert "request_id" not in second and second["message"] == "no request"
    logging.getLogger().handlers.clear()


def test_a_repeated_error_is_logged_once_per_interval_with_a_count(caplog):
    now = [0.0]
    repeated = logs.Repeated(interval_s=60, clock=lambda: now[0])
    log = logging.getLogger("mxisd.test")
    with caplog.at_level(logging.WARNING, logger="mxisd.test"):
        for second in (0, 1, 2, 30):
            now[0] = second
            repeated.error(log, "cache unavailable: %s", f"timeout {second}", key="redis")
            repeated.warning(log, "homeserver %s failed", "hs.example.org")
        now[0] = 61
        repeated.error(log, "cache unavailable: %s", "refused", key="redis")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("ERROR", "cache unavailable: timeout 0"),
        ("WARNING", "homeserver hs.example.org failed"),
        ("ERROR", "cache unavailable: refused (3 more times in the last 61 s)"),
    ]
