"""`mxisd doctor` against real parts (slapd, Redis, an SMTP listener, a running `mxisd run`) and the
fake homeserver: a good config passes, and each kind of broken one is named in plain words."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from signedjson.key import generate_signing_key
from unpaddedbase64 import encode_base64

from indexer.config import load_config
from server.doctor import run as run_doctor
from server.storage import SCHEMA_VERSION
from tests.conftest import HS_NAME, PEOPLE, TWILIO_NUMBER, TWILIO_SID, TWILIO_TOKEN, Server, free_port, started
from tests.fake_homeserver import ClientHomeserver
from tests.fakes import FakeHomeserver, FakeTwilio, Mailbox
from tests.slapd import READER_DN, READER_PASSWORD, Slapd
from tests.test_ldap import Directory
from tests.test_rest_store import LOOKUP, Service, person, store_config
from tests.test_sql_store import QUERIES, T0
from tests.test_sql_store import Directory as Tables

SMTP_LOGIN = ("mxisd", "smtp-password")


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str


def doctor(config_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", "doctor", "--config", str(config_path), *extra],
                          capture_output=True, text=True, timeout=120, cwd=config_path.parent)


def diagnose(config_path: Path) -> Outcome:
    """The doctor run in this process (quicker than the command, whose exit statuses and interrupting
    timeout other tests check)."""
    out = io.StringIO()
    status = run_doctor(load_config(config_path), out, timeout=20.0)
    return Outcome(status, out.getvalue())


def lines(result: Outcome | subprocess.CompletedProcess[str], subject: str) -> list[str]:
    """The doctor's lines about subject, without the level column's padding."""
    return [" ".join(line.split(None, 1)) for line in result.stdout.splitlines() if f" {subject}: " in line]


@pytest.fixture
def secure_mailbox(homeserver: FakeHomeserver) -> Iterator[Mailbox]:
    """An SMTP listener requiring STARTTLS (a certificate from the test CA) and a login."""
    box = Mailbox(free_port(), tls="starttls", cert=homeserver.ca.issue_cert("localhost"), login=SMTP_LOGIN)
    yield box
    box.close()


def ldap_store(directory: Directory, **overrides: Any) -> dict[str, Any]:
    store = {"name": "staff", "kind": "ldap", "preset": "openldap", "uri": directory.server.uri,
             "bind": {"dn": READER_DN, "password": READER_PASSWORD}, "base_dns": [directory.base],
             "sync": {"full_every": "1h"}}
    store.update(overrides)
    return store


def smtp(mailbox: Mailbox, homeserver: FakeHomeserver, password: str = SMTP_LOGIN[1]) -> dict[str, Any]:
    return {"host": "localhost", "port": mailbox.port, "tls": "starttls", "ca_file": str(homeserver.ca_file),
            "login": SMTP_LOGIN[0], "password": password}


@pytest.fixture
def configured(tmp_path: Path, redis_url: str, prefix: str, homeserver: FakeHomeserver,
               client_homeserver: ClientHomeserver, secure_mailbox: Mailbox, twilio: FakeTwilio) -> dict[str, Any]:
    """A config of a deployment without its HTTP server running, each part reachable; a test breaks one."""
    (tmp_path / "people.yml").write_text(yaml.safe_dump(PEOPLE))
    return {
        "matrix": {"domain": HS_NAME},
        "server": {"name": "id.example.org", "public_url": f"http://127.0.0.1:{free_port()}"},
        "data_dir": "data",
        "redis": {"url": redis_url, "prefix": prefix},
        "stores": [{"name": "people", "kind": "file", "path": "people.yml"}],
        "federation": {"ca_file": str(homeserver.ca_file), "allow_private_networks": ["127.0.0.1/32"],
                       "overrides": {HS_NAME: f"127.0.0.1:{homeserver.port}"}},
        "email": {"from": "mxisd@id.example.org", "smtp": smtp(secure_mailbox, homeserver)},
        "sms": {"twilio": {"base_url": twilio.url, "account_sid": TWILIO_SID, "auth_token": TWILIO_TOKEN,
                           "number": TWILIO_NUMBER}},
        "homeserver": {"url": client_homeserver.url},
    }


def write(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_good_deployment_passes_every_check(make_server, slapd: Slapd, homeserver: FakeHomeserver,
                                              client_homeserver: ClientHomeserver, secure_mailbox: Mailbox,
                                              tmp_path: Path) -> None:
    directory = Directory(slapd)
    directory.add("dora", mail=["dora@example.org"], displayName="Dora Explorer")
    server: Server = make_server()
    server.config["server"]["public_url"] = server.url
    server.config["stores"].append(ldap_store(directory))
    server.config["email"]["smtp"] = smtp(secure_mailbox, homeserver)
    server.config["homeserver"] = {"url": client_homeserver.url}
    started(server)

    result = server.cli("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PROBLEM" not in result.stdout
    assert result.stdout.splitlines()[-1].startswith("all ") and "checks passed" in result.stdout
    assert lines(result, "signing key")[0].startswith(f"ok signing key: {server.root / 'data/keys/signing.key'} ")
    assert lines(result, "storage")[0].endswith(f"answers (schema version {SCHEMA_VERSION})")
    assert lines(result, "redis")[0].startswith("ok redis: redis://")
    assert lines(result, "redis")[0].endswith(f"; holds a cache under the prefix {server.config['redis']['prefix']!r})")
    assert lines(result, "store people") == [
        "ok store people: finds people, e.g. @alice:example.org (Alice Liddell), email alice@example.com, "
        "msisdn 18005552067"]
    assert lines(result, "store staff") == [
        f"ok store staff: {slapd.uri} answers",
        f"ok store staff: bind as {READER_DN} accepted",
        f"ok store staff: base DN {directory.base} found",
        "ok store staff: finds people, e.g. @dora:example.org (Dora Explorer), email dora@example.org",
    ]
    assert lines(result, "email") == [
        f"ok email: SMTP server localhost:{secure_mailbox.port} accepts the login as mxisd (TLS: starttls)"]
    assert secure_mailbox.logins == ["mxisd"] and not secure_mailbox.messages  # logged in, sent nothing
    assert lines(result, "sms") == [
        f"ok sms: Twilio at {server.config['sms']['twilio']['base_url']} accepts the account {TWILIO_SID} "
        "(status active)"]
    assert lines(result, "homeserver client API") == [
        f"ok homeserver client API: {client_homeserver.url} answers (client API versions r0.6.1, v1.1, v1.11)"]
    assert lines(result, "homeserver federation API") == [
        f"ok homeserver federation API: example.org is served at 127.0.0.1:{homeserver.port}: "
        f"federation.overrides sends example.org to 127.0.0.1:{homeserver.port}",
        f"ok homeserver federation API: example.org at 127.0.0.1:{homeserver.port} answers with valid TLS for "
        f"example.org, keys {homeserver.key_id}",
    ]
    assert lines(result, "public URL") == [
        f"ok public URL: {server.url} serves this identity server (the key file's public key)"]

    # The same public URL seen from a deployment with another signing key: not this server.
    other = dict(server.config, data_dir=str(tmp_path / "other"))
    (tmp_path / "other" / "keys").mkdir(parents=True)
    key = generate_signing_key("0")
    (tmp_path / "other" / "keys" / "signing.key").write_text(f"ed25519 0 {encode_base64(key.encode())}\n")
    result = doctor(write(tmp_path, other))
    assert result.returncode == 1
    [line] = lines(result, "public URL")
    assert line.startswith(f"PROBLEM public URL: {server.url} serves another identity server: its public key is ")


@pytest.fixture
def people_ou(slapd: Slapd) -> Iterator[Directory]:
    """An organizational unit of the test's own in the run's slapd, holding one person."""
    directory = Directory(slapd)
    directory.add("dora")
    yield directory
    directory.conn.unbind()


@pytest.mark.parametrize(("broken", "expected"), [
    ({"bind": {"dn": READER_DN, "password": "wrong"}}, [
        "ok store staff: {uri} answers",
        f"PROBLEM store staff: bind as {READER_DN} refused: invalidCredentials: "
        "check stores[1].bind.dn and stores[1].bind.password"]),
    ({"base_dns": ["{base}", "ou=nowhere,{base}"]}, [
        "ok store staff: {uri} answers",
        f"ok store staff: bind as {READER_DN} accepted",
        f"PROBLEM store staff: base DN ou=nowhere,{{base}} does not exist (or {READER_DN} may not read it): "
        "check stores[1].base_dns"]),
    ({"filter": "(objectClass=posixAccount)"}, [
        "ok store staff: {uri} answers",
        f"ok store staff: bind as {READER_DN} accepted",
        "ok store staff: base DN {base} found",
        "PROBLEM store staff: finds nobody (entries it skipped are logged above): "
        "check stores[1].filter ((objectClass=posixAccount)) and stores[1].attributes"]),
], ids=["wrong bind password", "missing base DN", "filter finding nobody"])
def test_a_broken_ldap_store_is_named_and_stops_its_checks(configured, people_ou: Directory, broken: dict[str, Any],
                                                            expected: list[str], tmp_path: Path) -> None:
    def fill(text: Any) -> Any:
        if isinstance(text, list):
            return [fill(item) for item in text]
        return text.format(uri=people_ou.server.uri, base=people_ou.base) if isinstance(text, str) else text

    configured["stores"].append(ldap_store(people_ou, **{key: fill(value) for key, value in broken.items()}))
    result = diagnose(write(tmp_path, configured))
    assert result.returncode == 1
    assert lines(result, "store staff") == fill(expected)


def test_every_configured_sql_query_runs_and_a_failing_one_is_named(configured, database: str,
                                                                    tmp_path: Path) -> None:
    tables = Tables(database)
    tables.add("1", "erin", "Erin Example", T0, ("email", "erin@example.org"))
    configured["stores"].append({"name": "hr", "kind": "sql", "url": database, "queries": QUERIES})
    try:
        result = diagnose(write(tmp_path, configured))
        assert lines(result, "store hr")[1:] == [
            "ok store hr: finds people, e.g. @erin:example.org (Erin Example), email erin@example.org",
            "ok store hr: the identities, high_water_mark, changes, password queries run",
        ]
        assert lines(result, "store hr")[0].endswith(" answers")

        configured["stores"][-1]["queries"] = {**QUERIES, "password": "SELECT secret FROM people WHERE id = :id"}
        [*_, line] = lines(diagnose(write(tmp_path, configured)), "store hr")
        assert line.startswith("PROBLEM store hr: password query on ")
        assert "secret" in line and line.endswith(": check stores[1].queries")
    finally:
        tables.engine.dispose()


def test_rest_stores_answer_and_a_refused_token_is_named(configured, tmp_path: Path) -> None:
    service = Service()
    service.people = [person(1)]
    synced = store_config(service)
    read_through = {**store_config(service, enumerate=None, changes=None), "name": "lookups"}
    configured["stores"] += [synced, read_through]
    try:
        result = diagnose(write(tmp_path, configured))
        assert lines(result, "store app") == [
            "ok store app: finds people, e.g. @user1:example.org (User 1), email user1@example.org",
            "ok store app: the changes endpoint answers (high-water mark 0)",
        ]
        assert lines(result, "store lookups") == [
            f"ok store lookups: the lookup endpoint {service.url}{LOOKUP} answers"]

        for store in (synced, read_through):
            store["headers"] = {"Authorization": "Bearer wrong-token"}
        result = diagnose(write(tmp_path, configured))
    finally:
        service.close()
    assert lines(result, "store app") == [
        "PROBLEM store app: enumerate endpoint /people: HTTP 401: "
        "check stores[1].url and stores[1].endpoints.enumerate"]
    assert lines(result, "store lookups") == [
        f"PROBLEM store lookups: lookup endpoint {service.url}{LOOKUP} answered HTTP 401: check stores[2].url, "
        "stores[2].headers and stores[2].endpoints.lookup"]


def test_the_parts_of_a_good_config_pass_without_a_running_server(configured, tmp_path: Path) -> None:
    result = diagnose(write(tmp_path, configured))
    # Only the public URL fails: nothing serves it. What mxisd run creates is not there yet, and that is fine.
    problems = [line for line in result.stdout.splitlines() if line.startswith("PROBLEM")]
    assert [line.split(":")[0] for line in problems] == ["PROBLEM  public URL"]
    assert "is mxisd running, and does server.public_url lead to it" in problems[0]
    assert lines(result, "signing key") == [f"- signing key: {tmp_path / 'data/keys/signing.key'} does not exist "
                                            "yet: mxisd run creates it when it first starts"]
    prefix = configured["redis"]["prefix"]
    assert lines(result, "redis")[0].endswith(f"; holds no cache yet under the prefix {prefix!r})")
    assert result.returncode == 1


def test_a_signing_key_file_others_can_read_or_that_is_no_key_is_named(configured, tmp_path: Path) -> None:
    path = tmp_path / "data" / "keys" / "signing.key"
    path.parent.mkdir(parents=True)
    path.write_text(f"ed25519 0 {encode_base64(generate_signing_key('0').encode())}\n")
    path.chmod(0o644)
    assert lines(diagnose(write(tmp_path, configured)), "signing key") == [
        f"PROBLEM signing key: {path} is readable by every user of this host (mode 0644): whoever reads it can "
        f"sign as this identity server; chmod 600 {path}"]

    path.write_text("0123456789abcdef\n")
    path.chmod(0o600)
    assert lines(diagnose(write(tmp_path, configured)), "signing key") == [
        f"PROBLEM signing key: {path} is not a signing key file: expected one line \"ed25519 <version> <base64 "
        "seed>\"; restore it from a backup (a new key makes every signature and pending invite made with the old "
        "one unverifiable)"]


def test_smtp_refusing_the_connection_or_the_login_is_named(configured, homeserver: FakeHomeserver,
                                                             secure_mailbox: Mailbox, tmp_path: Path) -> None:
    configured["email"]["smtp"] = smtp(secure_mailbox, homeserver, password="wrong")
    [line] = lines(diagnose(write(tmp_path, configured)), "email")
    assert line.startswith(f"PROBLEM email: SMTP server localhost:{secure_mailbox.port} refused the login as "
                           "mxisd: 535 ")
    assert line.endswith(": check email.smtp")
    assert not secure_mailbox.logins

    closed = free_port()
    configured["email"]["smtp"] = {"host": "127.0.0.1", "port": closed, "tls": "none"}
    [line] = lines(diagnose(write(tmp_path, configured)), "email")
    assert line.startswith(f"PROBLEM email: SMTP server 127.0.0.1:{closed} cannot be reached: ")
    assert "Connect call failed" in line


def test_twilio_refusing_the_credentials_is_named(configured, twilio: FakeTwilio, tmp_path: Path) -> None:
    configured["sms"]["twilio"]["auth_token"] = "wrong"
    result = diagnose(write(tmp_path, configured))
    assert result.returncode == 1
    assert lines(result, "sms") == [
        f"PROBLEM sms: Twilio refused the account {TWILIO_SID} (HTTP 401) Authenticate: check sms.twilio"]
    assert not twilio.sent


@pytest.mark.parametrize(("certified_name", "ca_trusted", "reason"), [
    (HS_NAME, False, "unable to get local issuer certificate"),
    ("other.example", True, "Hostname mismatch, certificate is not valid for 'example.org'."),
], ids=["unknown CA", "another name"])
def test_a_homeserver_certificate_from_an_unknown_ca_or_for_another_name_is_named(
        configured, certified_name: str, ca_trusted: bool, reason: str, tmp_path: Path) -> None:
    impostor = FakeHomeserver(certified_name, tmp_path)  # with a CA of its own
    try:
        configured["federation"]["overrides"] = {HS_NAME: f"127.0.0.1:{impostor.port}"}
        if ca_trusted:
            configured["federation"]["ca_file"] = str(impostor.ca_file)
        result = diagnose(write(tmp_path, configured))
    finally:
        impostor.close()
    assert result.returncode == 1
    assert lines(result, "homeserver federation API")[1] == (
        f"PROBLEM homeserver federation API: example.org at 127.0.0.1:{impostor.port} has no valid TLS "
        f"certificate for example.org ({reason}): homeservers need one from a CA this host trusts "
        "(federation.ca_file names a private one)")


def test_a_homeserver_client_api_with_a_certificate_this_host_does_not_trust_is_named(
        configured, homeserver: FakeHomeserver, tmp_path: Path) -> None:
    url = f"https://127.0.0.1:{homeserver.port}"  # the test CA is not among the system's
    configured["homeserver"]["url"] = url
    result = diagnose(write(tmp_path, configured))
    assert result.returncode == 1
    assert lines(result, "homeserver client API") == [
        f"PROBLEM homeserver client API: {url} has no valid TLS certificate (unable to get local issuer "
        "certificate): give it one this host trusts, or point homeserver.url at the homeserver's internal listener"]


def test_an_unreachable_redis_is_named(configured, tmp_path: Path) -> None:
    port = free_port()
    configured["redis"] = {"url": f"redis://:secret@127.0.0.1:{port}/0", "timeout": "2s"}
    result = diagnose(write(tmp_path, configured))
    assert result.returncode == 1
    [line] = lines(result, "redis")
    assert line.startswith(f"PROBLEM redis: redis://:***@127.0.0.1:{port}/0 does not answer: ")
    assert line.endswith("check redis.url, and that Redis runs and lets this host in")
    assert "secret" not in result.stdout


def test_a_check_that_hangs_is_cut_off_by_the_timeout(configured, tmp_path: Path) -> None:
    # Accepts connections (into the backlog) and never says a word, as a hung SMTP server does.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        configured["email"]["smtp"] = {"host": "127.0.0.1", "port": silent.getsockname()[1], "tls": "none",
                                       "timeout_s": 60}
        result = doctor(write(tmp_path, configured), "--timeout", "2")
    assert lines(result, "email") == ["PROBLEM email: no answer within 2 s (mxisd doctor --timeout sets this)"]
    assert lines(result, "homeserver client API")[0].startswith("ok ")  # the checks after it still ran
    assert result.returncode == 1


def test_an_invalid_config_is_one_message_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"matrix": {"domain": "example.org"}, "redis": {"url": 5},
                                    "stores": [{"name": "people", "kind": "file", "path": "people.yml"}]}))
    result = doctor(path)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"mxisd: invalid config {path}: "
                                     "redis.url: expected null or a redis://, rediss:// or unix:// URL, got 5")
    assert result.stdout == ""
