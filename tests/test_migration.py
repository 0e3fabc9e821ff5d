"""`mxisd import-config` and `mxisd import-data`: mxisd and ma1sd configs (our own, written from
their documented keys, in tests/data/) imported and run against the real slapd, Samba AD DC,
PostgreSQL and a web application; a ma1sd-shaped database and key store taken over by a running server."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import ldap3
import pytest
import sqlalchemy
import yaml
from signedjson.key import decode_signing_key_base64, decode_verify_key_bytes, encode_verify_key_base64, get_verify_key
from signedjson.sign import verify_signed_json
from unpaddedbase64 import decode_base64

from indexer.config import load_config
from indexer.settings import Config
from indexer.stores import build_store
from indexer.sync import full_sync
from server.cli import main
from server.doctor import public_url
from server.migration.data import import_data
from server.signing import SigningKeys
from server.storage import Storage
from tests.conftest import V1, V2, _database, started, wait_until
from tests.samba import ADMIN_DN as SAMBA_ADMIN_DN
from tests.samba import ADMIN_PASSWORD as SAMBA_ADMIN_PASSWORD
from tests.slapd import ADMIN_DN, ADMIN_PASSWORD, READER_DN, READER_PASSWORD, SUFFIX
from tests.test_active_directory import Domain
from tests.test_api import validate_email
from tests.test_synapse_preset import Synapse

DATA = Path(__file__).parent / "data"
# The ed25519 seed and public key of the Matrix specification's signing examples (appendix).
SEED = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1"
PUBLIC = "XGX0JRS2Af3be3knz2fBiRbApjm2Dh61gXDJA8kcJNI"
SERIAL = "AAGHPYZiFAk5"
EPHEMERAL_SEED = "nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
EPHEMERAL_PUBLIC = encode_verify_key_base64(get_verify_key(decode_signing_key_base64("ed25519", "0", EPHEMERAL_SEED)))


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def old_config(name: str, tmp_path: Path, **changes: Any) -> Path:
    """tests/data/<name> with dotted keys changed, written into tmp_path."""
    data = yaml.safe_load((DATA / name).read_text())
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The mxisd command in this process (import-config needs nothing else): status, stdout, stderr."""
    capsys.readouterr()
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def import_config(capsys: pytest.CaptureFixture[str], old: Path,
                  tmp_path: Path) -> tuple[dict[str, Any], Config, str, str]:
    """Run import-config; what it wrote, that loaded (check-config passes), its text and what stderr said."""
    out = tmp_path / "imported.yml"
    status, _, stderr = run(capsys, "import-config", str(old), "-o", str(out), "--data-dir", str(tmp_path / "data"))
    assert status == 0, stderr
    status, checked, _ = run(capsys, "check-config", str(out))
    assert status == 0 and checked.startswith(f"{out}: ok"), checked
    text = out.read_text()
    return yaml.safe_load(text), load_config(out), text, stderr


def verify_key(public: str, key_id: str = "ed25519:0") -> Any:
    return decode_verify_key_bytes(key_id, decode_base64(public))


def test_ldap_config_imported_serves_the_directory(slapd, cache, tmp_path, capsys):
    admin = ldap3.Connection(slapd.uri, ADMIN_DN, ADMIN_PASSWORD, auto_bind=True, raise_exceptions=True)
    base = f"ou=m{int(time.time() * 1000)},{SUFFIX}"
    admin.add(base, ["organizationalUnit"])
    admin.add(f"uid=ann,{base}", ["inetOrgPerson"], {"uid": "ann", "cn": "Ann Example", "sn": "Example",
                                                      "mail": "Ann@Example.org", "telephoneNumber": "+447700900123"})
    admin.add(f"cn=printer,{base}", ["device"], {"cn": "printer"})
    port = urlsplit(slapd.uri).port
    old = old_config("mxisd-ldap.yaml", tmp_path, **{
        "ldap.connection.host": "127.0.0.1", "ldap.connection.port": port, "ldap.connection.bindDn": READER_DN,
        "ldap.connection.bindPassword": READER_PASSWORD, "ldap.connection.baseDNs": [base]})
    (tmp_path / "invite-template.eml").write_text("Subject: %SENDER_NAME_OR_ID% invited you\n\n%REGISTER_URL%\n")
    config, typed, text, stderr = import_config(capsys, old, tmp_path)

    # What was not carried over is said on stderr and in the file, a typo mxisd ignored included.
    assert "lookup.recursive.allowedCIDR: not a key mxisd knows: it ignored it silently" in stderr
    assert "#   lookup.recursive.allowedCIDR: not a key mxisd knows" in text
    assert "ldap.identity.token: 3PIDs are looked up in the cache" in stderr
    [store_config] = config["stores"]
    assert store_config["preset"] == "openldap" and store_config["uri"] == f"ldap://127.0.0.1:{port}"
    assert config["email"]["smtp"]["tls"] == "starttls" and config["email"]["templates"]["invite"] == str(
        tmp_path / "invite-template.eml")
    assert config["invites"] == {**config["invites"], "expire_after": "4320m",
                                 "register_url": "https://chat.example.org"}
    assert config["homeserver"]["url"] == "http://localhost:8008"
    assert config["recursion"]["forwarders"] == ["https://matrix.org"]

    store = build_store(typed.stores[0], typed)
    result = full_sync(cache, store, 0.2)
    assert result.outcome == "ok" and result.added == 1, result.error
    assert cache.mxid_of("ldap", "email", "ann@example.org") == "@ann:example.org"
    assert cache.mxid_of("ldap", "msisdn", "447700900123") == "@ann:example.org"
    admin.unbind()


def test_active_directory_config_keeps_the_ad_choice_and_the_group_filter(tmp_path, capsys):
    config, _typed, _text, stderr = import_config(capsys, DATA / "ma1sd-active-directory.yaml", tmp_path)
    [store] = config["stores"]
    assert store["preset"] == "active_directory" and store["uri"] == "ldaps://dc1.corp.example.org:636"
    assert store["filter"].startswith("(&(&(objectCategory=person)(objectClass=user)")
    assert store["filter"].endswith("(memberOf=CN=Matrix,OU=Groups,DC=corp,DC=example,DC=org))")
    assert store["attributes"]["user_id"] == "sAMAccountName"
    assert store["attributes"]["display_name"] == ["displayName"]
    assert config["server"]["bind"] == "127.0.0.1"
    assert config["sms"]["twilio"]["number"] == "+15005550006"
    assert config["terms"]["policies"]["privacy"]["en"]["url"] == "https://corp.example.org/privacy-1.0.html"
    assert config["accounts"]["homeservers"] == ["*"] and config["log_level"] == "DEBUG"
    for key in ("register:", "hashing:", "ldap.directory.filter:", "policy.policies.privacy.regexp:",
                "ldap.attribute.threepid: not set"):
        assert key in stderr


def test_active_directory_config_imported_serves_the_domain(samba_dc, make_server, tmp_path, capsys):
    domain = Domain(samba_dc)
    alice = domain.add("alice", "Passw0rd-Alice!", mail=f"alice.{domain.tag}@corp.example.org",
                       phone="+44 7700 900001")
    bob = domain.add("bob", "Passw0rd-Bob!", mail=f"bob.{domain.tag}@corp.example.org")
    group = domain.name("matrix")
    samba_dc.tool("group", "add", group, f"--groupou=OU=t{domain.tag}")
    samba_dc.tool("group", "addmembers", group, alice)
    old = old_config("ma1sd-active-directory.yaml", tmp_path, **{
        "ldap.connection.host": "127.0.0.1", "ldap.connection.bindDn": SAMBA_ADMIN_DN,
        "ldap.connection.bindPassword": SAMBA_ADMIN_PASSWORD, "ldap.connection.baseDNs": [domain.ou],
        "ldap.filter": f"(memberOf=CN={group},{domain.ou})"})
    config, _typed, _text, _stderr = import_config(capsys, old, tmp_path)
    # ma1sd trusted the DC's certificate through the JVM's trust store, which no config names.
    config["stores"][0]["tls"] = {"ca_file": str(samba_dc.cert)}
    srv = make_server()
    srv.config = {**config, "server": {**config["server"], "port": srv.port}, "data_dir": "data",
                  "redis": srv.config["redis"]}
    srv.start()
    try:
        email = wait_until(lambda: srv.lookup_v1("email", f"alice.{domain.tag}@corp.example.org"), 60,
                           "the first sync of the domain")
        assert email["mxid"] == f"@{alice}:corp.example.org"
        assert srv.lookup_v1("msisdn", "447700900001")["mxid"] == f"@{alice}:corp.example.org"
        assert srv.lookup_v1("email", f"bob.{domain.tag}@corp.example.org") == {}  # not in the group
        check = "/_matrix-internal/identity/v1/check_credentials"
        accepted = srv.http.post(check, json={"user": {"id": f"@{alice}:corp.example.org",
                                                       "password": "Passw0rd-Alice!"}})
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["auth"]["success"] is True
        assert accepted.json()["auth"]["mxid"] == f"@{alice}:corp.example.org"
        for user, password in ((alice, "Passw0rd-Wrong!"), (bob, "Passw0rd-Bob!")):
            refused = srv.http.post(check, json={"user": {"id": f"@{user}:corp.example.org", "password": password}})
            assert refused.json()["auth"]["success"] is False, user
    finally:
        domain.conn.unbind()


def test_sql_config_imported_serves_the_database(cache, tmp_path, capsys):
    url = next(database := _database("postgresql", tmp_path))
    schema = sqlalchemy.make_url(url).query["options"].split("=", 1)[1]
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("CREATE TABLE people_threepids (mxid text, medium text, address text)"))
        conn.execute(sqlalchemy.text("INSERT INTO people_threepids VALUES "
                                     "('@ann:example.org', 'email', 'ann@example.org'), "
                                     "('@ann:example.org', 'msisdn', '447700900123'), "
                                     "('@bob:example.org', 'email', 'bob@example.org')"))
        conn.execute(sqlalchemy.text("CREATE TABLE people_roles (mxid text, role_name text)"))
        conn.execute(sqlalchemy.text("INSERT INTO people_roles VALUES ('@ann:example.org', 'inviters'), "
                                     "('@ann:example.org', 'inviters'), ('@ann:example.org', 'staff')"))
    engine.dispose()
    try:
        old = old_config("mxisd-sql.yaml", tmp_path,
                         **{"sql.connection": f"//127.0.0.1:5432/test?user=postgres&currentSchema={schema}"})
        _config, typed, _text, stderr = import_config(capsys, old, tmp_path)
        assert "sql.profile.displayName: not carried over" in stderr
        assert "sql.profile.role" not in stderr  # mxisd's one-user roles query became one for everyone
        [store_config] = typed.stores
        result = full_sync(cache, build_store(store_config, typed), 0.2)
        assert result.outcome == "ok" and result.added == 2, result.error
        assert cache.identity_by_mxid("sql", "@ann:example.org").roles == ("inviters", "staff")
        assert cache.identity_by_mxid("sql", "@bob:example.org").roles == ()
        assert cache.mxid_of("sql", "email", "bob@example.org") == "@bob:example.org"
        assert cache.mxid_of("sql", "msisdn", "447700900123") == "@ann:example.org"
    finally:
        database.close()


def test_synapse_sql_config_imported_serves_synapse_users(cache, tmp_path, capsys):
    url = next(database := _database("postgresql", tmp_path))
    schema = sqlalchemy.make_url(url).query["options"].split("=", 1)[1]
    synapse = Synapse(url)
    synapse.register("alice", 1_767_225_600, "Alice")
    synapse.add_threepid("alice", "email", "alice@example.org", 1_767_225_600_000)
    synapse.engine.dispose()
    try:
        old = old_config("ma1sd-synapse.yaml", tmp_path,
                         **{"synapseSql.connection": f"//127.0.0.1:5432/test?user=postgres&currentSchema={schema}"})
        config, typed, _text, stderr = import_config(capsys, old, tmp_path)
        assert "synapseSql.legacyRoomNames" in stderr
        assert config["stores"][0]["preset"] == "synapse"
        result = full_sync(cache, build_store(typed.stores[0], typed), 0.2)
        assert result.outcome == "ok" and result.added == 1, result.error
        assert cache.mxid_of("synapse", "email", "alice@example.org") == "@alice:example.org"
    finally:
        database.close()


class WebApp:
    """A web application speaking mxisd's REST backend protocol (lookup and auth), as mxisd asked it."""

    def __init__(self) -> None:
        app = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                answer = app.answer(self.path, body)
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if path.endswith("/identity/single") and body["lookup"]["address"] == "dan@example.org":
            return {"lookup": {**body["lookup"], "id": {"type": "localpart", "value": "dan"}}}
        if path.endswith("/auth/login"):
            return {"auth": {"success": body["auth"]["password"] == "dan-secret"}}
        return {}


@pytest.fixture
def webapp() -> Iterator[WebApp]:
    app = WebApp()
    yield app
    app.server.shutdown()
    app.server.server_close()


def test_rest_config_imported_answers_lookups(make_server, webapp, tmp_path, capsys):
    config, _typed, _text, stderr = import_config(
        capsys, old_config("mxisd-rest.yaml", tmp_path, **{"rest.host": webapp.url}), tmp_path)
    assert "rest.endpoints.identity.bulk" in stderr and "rest.endpoints.directory" in stderr
    srv = make_server()
    srv.config["stores"] += config["stores"]
    started(srv)
    assert srv.lookup_v1("email", "dan@example.org")["mxid"] == "@dan:example.org"
    assert srv.lookup_v1("email", "nobody@example.org") == {}


def test_an_mxisd_sms_template_works_unchanged(make_server, twilio, tmp_path):
    template = tmp_path / "sms-validation.txt"
    template.write_text("%DOMAIN_PRETTY% code for %RECIPIENT_ADDRESS_URL_ENCODED% (%RECIPIENT_MEDIUM%): "
                        "%VALIDATION_TOKEN% or %NEXT_URL%\n")
    srv = make_server()
    srv.config["sms"]["templates"] = {"validation": str(template)}
    started(srv)
    response = srv.http.post(V1 + "/validate/msisdn/requestToken", json={
        "client_secret": "abc", "country": "GB", "phone_number": "07400 123456", "send_attempt": 1})
    assert response.status_code == 200, response.text
    [sms] = twilio.sent
    assert sms["Body"].startswith("Example.org code for 447400123456 (msisdn): ")
    token, link = sms["Body"].split(": ", 1)[1].split(" or ")
    assert token.isdigit() and link.startswith("http://127.0.0.1/_matrix/identity/v2/validate/msisdn/submitToken?")
    assert f"token={token}" in link


def test_an_mxisd_sms_invite_template_is_carried_over_and_works_unchanged(make_server, twilio, tmp_path, capsys):
    (tmp_path / "sms-invite.txt").write_text("%SENDER_NAME_OR_ID% invited you (%INVITE_MEDIUM%) to "
                                             "%ROOM_NAME_OR_ID%: %REGISTER_URL%\n")
    old = old_config("ma1sd-active-directory.yaml", tmp_path, **{
        "threepid.medium.msisdn.generators.template.invite": "sms-invite.txt"})
    config, _typed, _text, stderr = import_config(capsys, old, tmp_path)
    assert config["sms"]["templates"]["invite"] == str(tmp_path / "sms-invite.txt")
    assert "generators.template.invite" not in stderr
    srv = make_server()
    srv.config["sms"]["templates"] = {"invite": config["sms"]["templates"]["invite"]}
    started(srv)
    stored = srv.http.post(V2 + "/store-invite", headers=srv.auth(), json={
        "medium": "msisdn", "address": "447400123456", "room_id": "!room:example.org",
        "sender": "@tester:example.org", "room_name": "Project X"})
    assert stored.status_code == 200, stored.text
    [sms] = twilio.sent
    assert sms["Body"] == "@tester:example.org invited you (msisdn) to Project X: https://example.org"


@pytest.mark.parametrize(("content", "message"), [
    ("matrix: [unclosed", "not valid YAML at line 1"),
    ("- just\n- a list\n", "expected an mxisd or ma1sd config (a mapping of keys), got list"),
    ("server: {port: 8090}\n", "has no matrix.domain"),
    ("matrix: {domain: example.org}\nserver: {port: eighty}\n", "server.port: expected a whole number, got 'eighty'"),
    ("matrix: {domain: example.org}\nldap: {enabled: true, connection: {host: dc1}}\n",
     "no identity store could be carried over (ldap, netiq, sql, synapseSql or rest), and this server needs one: "
     "ldap: no connection.host or no base DN"),
    ("matrix: {domain: example.org}\nrest: {enabled: true, host: 'http://app'}\nforward: {servers: 5}\n",
     "a value of an unexpected type"),
])
def test_unreadable_old_config_is_a_clear_error(tmp_path, content, message, capsys):
    path = tmp_path / "mxisd.yaml"
    path.write_text(content)
    out = tmp_path / "out.yml"
    status, stdout, stderr = run(capsys, "import-config", str(path), "-o", str(out))
    assert status == 2 and not stdout
    assert stderr.startswith(f"mxisd: {path}: {message}") and len(stderr.splitlines()) == 1
    assert not out.exists()
    status, _, stderr = run(capsys, "import-config", str(tmp_path / "absent.yaml"))
    assert status == 2 and stderr == f"mxisd: {tmp_path / 'absent.yaml'}: file not found\n"


# -- import-data ------------------------------------------------------------------------------------

def write_key_store(folder: Path, seed: str = SEED, serial: str = SERIAL) -> None:
    """mxisd's key folder: the long-term key, one ephemeral key, and `current`."""
    (folder / "regular" / "ed25519").mkdir(parents=True)
    (folder / "ephemeral" / "ed25519").mkdir(parents=True)
    (folder / "regular" / "ed25519" / serial).write_text(
        json.dumps({"version": "0", "isValid": True, "key": seed + "="}))
    (folder / "ephemeral" / "ed25519" / "EPH1").write_text(
        json.dumps({"version": "0", "isValid": True, "key": EPHEMERAL_SEED + "="}))
    (folder / "current").write_text(json.dumps({"type": "regular", "algo": "ed25519", "serial": serial}))


def our_config(tmp_path: Path) -> Path:
    (tmp_path / "people.yml").write_text("[]\n")
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"matrix": {"domain": "example.org"}, "data_dir": "data",
                                    "stores": [{"name": "people", "kind": "file", "path": "people.yml"}]}))
    return path


def test_a_key_folder_is_taken_over_and_signs_as_before(tmp_path):
    write_key_store(tmp_path / "keys")
    config = our_config(tmp_path)
    done = cli("import-data", "--config", str(config), "--key", str(tmp_path / "keys"))
    assert done.returncode == 0, done.stderr
    assert f"signing key: taken over from {tmp_path / 'keys'} as ed25519:{SERIAL} (public key {PUBLIC})" in done.stdout
    keys = SigningKeys.load_or_create(tmp_path / "data", "id.example.org")
    assert keys.key_id == f"ed25519:{SERIAL}" and keys.public_key == PUBLIC
    signed = keys.sign({"mxid": "@ann:example.org", "token": "abc"})
    assert list(signed["signatures"]["id.example.org"]) == [f"ed25519:{SERIAL}"]
    verify_signed_json(signed, "id.example.org", verify_key(PUBLIC, f"ed25519:{SERIAL}"))

    again = cli("import-data", "--config", str(config), "--key", str(tmp_path / "keys"))
    assert again.returncode == 0 and "unchanged" in again.stdout and "nothing changed" in again.stdout


def test_a_single_key_file_of_mxisd_before_1_3_is_taken_over_as_serial_0(tmp_path):
    (tmp_path / "mxisd.key").write_text(SEED + "\n")
    done = cli("import-data", "--config", str(our_config(tmp_path)), "--key", str(tmp_path / "mxisd.key"))
    assert done.returncode == 0, done.stderr
    keys = SigningKeys.load_or_create(tmp_path / "data", "id.example.org")
    assert keys.key_id == "ed25519:0"
    verify_signed_json(keys.sign({"a": 1}), "id.example.org", verify_key(PUBLIC))


def test_another_key_in_place_is_not_replaced(tmp_path):
    config = our_config(tmp_path)
    mine = SigningKeys.load_or_create(tmp_path / "data", "id.example.org").public_key
    write_key_store(tmp_path / "keys")
    done = cli("import-data", "--config", str(config), "--key", str(tmp_path / "keys"))
    assert done.returncode == 2 and "already holds another signing key (ed25519:0)" in done.stderr
    assert SigningKeys.load_or_create(tmp_path / "data", "id.example.org").public_key == mine
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "current").write_text("not json")
    broken = cli("import-data", "--config", str(config), "--key", str(tmp_path / "broken"))
    assert broken.returncode == 2 and "not JSON" in broken.stderr


# ORMLite's tables as mxisd and ma1sd made them (column names as ORMLite writes them, quoted).
OLD_TABLES = [
    'CREATE TABLE "invite_3pid" ("id" VARCHAR(255) PRIMARY KEY, "token" VARCHAR(255), "sender" VARCHAR(255), '
    '"medium" VARCHAR(255), "address" VARCHAR(255), "roomId" VARCHAR(255), "properties" TEXT)',
    'CREATE TABLE "session_3pid" ("id" VARCHAR(255) PRIMARY KEY, "creationTime" BIGINT, "server" VARCHAR(255), '
    '"medium" VARCHAR(255), "address" VARCHAR(255), "secret" VARCHAR(255), "attempt" INTEGER, '
    '"nextLink" VARCHAR(255), "token" VARCHAR(255), "validated" BOOLEAN, "validationTime" BIGINT, '
    '"isRemote" BOOLEAN, "remoteServer" VARCHAR(255), "remoteId" VARCHAR(255), "remoteSecret" VARCHAR(255), '
    '"remoteAttempt" INTEGER, "isRemoteValidated" BOOLEAN)',
    'CREATE TABLE "account" ("token" VARCHAR(255) PRIMARY KEY, "accessToken" VARCHAR(255), '
    '"tokenType" VARCHAR(255), "matrixServerName" VARCHAR(255), "expiresIn" BIGINT, "createdAt" BIGINT, '
    '"userId" VARCHAR(255))',
    'CREATE TABLE "accepted" ("id" INTEGER PRIMARY KEY, "url" VARCHAR(255), "userId" VARCHAR(255), '
    '"acceptedAt" BIGINT)',
]
INVITE_TOKEN = "q" * 64
ZOE_TOKEN = "0d5e6b2c-7a1f-4f57-9a3e-4f2b7d1c9e01"
PRIVACY_URL = "https://example.org/privacy-1.0.html"


def fill_old_database(url: str) -> str:
    """ma1sd's tables with two invites, two accounts, an accepted policy and two sessions; the sid of
    the session still open."""
    now = int(time.time())
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    properties = {"room_name": "Project X", "sender_display_name": "Tess Ter", "p_key_algo": "ed25519",
                  "p_key_serial": SERIAL, "p_key_public": PUBLIC, "e_key_algo": "ed25519", "e_key_serial": "EPH1",
                  "e_key_public": EPHEMERAL_PUBLIC}
    with engine.begin() as conn:
        for ddl in OLD_TABLES:
            conn.execute(sqlalchemy.text(ddl))
        insert = conn.execute
        insert(sqlalchemy.text('INSERT INTO "invite_3pid" VALUES (:id, :token, :sender, :medium, :address, :room, '
                               ':properties)'),
               [{"id": "ZXhhbXBsZS5vcmdlbWFpbHpvZUBleGFtcGxlLm5ldA", "token": INVITE_TOKEN,
                 "sender": "@tester:example.org", "medium": "email", "address": "Zoe@Example.NET",
                 "room": "!room:example.org", "properties": json.dumps(properties)},
                {"id": "msisdn-invite", "token": "m" * 64, "sender": "@tester:example.org", "medium": "msisdn",
                 "address": "447700900999", "room": "!room:example.org", "properties": "{}"}])
        insert(sqlalchemy.text('INSERT INTO "account" VALUES (:token, :access, \'Bearer\', \'example.org\', '
                               ':expires, :created, :user)'),
               [{"token": ZOE_TOKEN, "access": "openid-1", "expires": 3600, "created": now - 60,
                 "user": "@zoe:example.org"},
                {"token": "expired-token", "access": "openid-2", "expires": 3600, "created": now - 7200,
                 "user": "@old:example.org"}])
        insert(sqlalchemy.text('INSERT INTO "accepted" VALUES (1, :url, \'@zoe:example.org\', :at)'),
               {"url": PRIVACY_URL, "at": now * 1000})
        insert(sqlalchemy.text(
            'INSERT INTO "session_3pid" ("id", "creationTime", "server", "medium", "address", "secret", "attempt", '
            '"token", "validated", "validationTime", "isRemote") VALUES (:id, :created, \'127.0.0.1\', \'email\', '
            ':address, :secret, 1, \'123456\', :validated, :validated_at, :remote)'),
            [{"id": str(now * 1000 - 5000), "created": now * 1000 - 5000, "address": "ann@example.org",
              "secret": "ann-secret", "validated": True, "validated_at": now * 1000 - 4000, "remote": False},
             {"id": str(now * 1000 - 3 * 86_400_000), "created": now * 1000 - 3 * 86_400_000,
              "address": "old@example.org", "secret": "old-secret", "validated": False, "validated_at": None,
              "remote": False}])
    engine.dispose()
    return str(now * 1000 - 5000)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_ma1sd_database_and_key_are_taken_over(kind, make_server, homeserver, mailbox, tmp_path):
    write_key_store(tmp_path / "keys")
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'ma1sd.db'}"
        storage = {"backend": "sqlite", "provider": {"sqlite": {"database": "ma1sd.db"}}}
        database = None
    else:
        url = next(database := _database("postgresql", tmp_path))
        schema = sqlalchemy.make_url(url).query["options"].split("=", 1)[1]
        storage = {"backend": "postgresql", "provider": {"postgresql": {
            "database": f"//127.0.0.1:5432/test?currentSchema={schema}", "username": "postgres"}}}
    try:
        open_sid = fill_old_database(url)
        old = tmp_path / "ma1sd.yaml"
        old.write_text(yaml.safe_dump({"matrix": {"domain": "example.org", "v2": True}, "key": {"path": "keys"},
                                       "storage": storage}))
        srv = make_server()
        srv.config["server"]["public_url"] = srv.url
        srv.config["invites"] = {"check_every": "1s", "retry_first": "1s"}
        srv.config["terms"] = {"policies": {"privacy": {"version": "1.0",
                                                        "en": {"name": "Privacy", "url": PRIVACY_URL}}}}
        srv.config_path.write_text(yaml.safe_dump(srv.config))

        done = srv.cli("import-data", str(old))
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert f"signing key: taken over from {tmp_path / 'keys'} as ed25519:{SERIAL} (public key {PUBLIC})" in lines
        assert ("pending invites: 2 read, 1 imported, 1 skipped (msisdn invites are not supported, only email)"
                in lines)
        assert "v2 accounts: 2 read, 1 imported, 1 skipped (expired)" in lines
        assert "accepted terms: 1 read, 1 imported" in lines
        assert "validation sessions: 2 read, 1 imported, 1 skipped (older than sessions.lifetime)" in lines
        again = srv.cli("import-data", str(old))
        assert again.returncode == 0, again.stderr
        assert again.stdout.splitlines()[-1] == "nothing changed: everything was imported before"
        assert "pending invites: 2 read, 0 imported, 1 already there" in again.stdout

        started(srv)
        zoe = {"Authorization": f"Bearer {ZOE_TOKEN}"}
        # Zoe's ma1sd token still works, and her acceptance of the terms with it.
        assert srv.http.get(V2 + "/account", headers=zoe).json() == {"user_id": "@zoe:example.org"}
        expired = srv.http.get(V2 + "/account", headers={"Authorization": "Bearer expired-token"})
        assert expired.status_code == 401
        # The session ann validated under ma1sd is still open.
        validated = srv.http.get(V2 + "/3pid/getValidated3pid", headers=zoe,
                                 params={"sid": open_sid, "client_secret": "ann-secret"})
        assert validated.status_code == 200, validated.text
        assert {k: validated.json()[k] for k in ("medium", "address")} == {"medium": "email",
                                                                           "address": "ann@example.org"}
        # The key answers under its old id (and `mxisd doctor` finds it there); the invite's
        # ephemeral key is still valid.
        assert srv.http.get(V2 + f"/pubkey/ed25519:{SERIAL}").json() == {"public_key": PUBLIC}
        [finding] = public_url.check(load_config(srv.config_path))
        assert (finding.level, finding.text) == ("ok", f"{srv.url} serves this identity server (the key file's "
                                                       "public key)")
        assert httpx.get(srv.url + V2 + "/pubkey/isvalid", params={"public_key": PUBLIC}).json() == {"valid": True}
        assert srv.http.get(V2 + "/pubkey/ephemeral/isvalid", params={"public_key": EPHEMERAL_PUBLIC}).json() == {
            "valid": True}

        # Zoe binds her address: the invite ma1sd stored is delivered, signed with the old key.
        sid = validate_email(srv, mailbox, "zoe@example.net", "zoe-secret", headers=zoe)
        bound = srv.http.post(V2 + "/3pid/bind", headers=zoe,
                              json={"sid": sid, "client_secret": "zoe-secret", "mxid": "@zoe:example.org"})
        assert bound.status_code == 200, bound.text
        [onbind] = wait_until(lambda: homeserver.onbinds("zoe@example.net"), what="the onbind callback")
        old_key = verify_key(PUBLIC, f"ed25519:{SERIAL}")
        verify_signed_json(onbind, "id.example.org", old_key)
        [invite] = onbind["invites"]
        assert (invite["token"], invite["room_id"], invite["sender"]) == (
            INVITE_TOKEN, "!room:example.org", "@tester:example.org")
        verify_signed_json(invite["signed"], "id.example.org", old_key)
    finally:
        if database is not None:
            database.close()


def test_every_section_is_carried_over_or_named(tmp_path, capsys):
    (tmp_path / "success.html").write_text("<p>Done</p>")
    old = tmp_path / "ma1sd.yaml"
    old.write_text(yaml.safe_dump({
        "matrix": {"domain": "example.org", "identity": {"servers": {"central": ["https://id.central.example/"]}}},
        "server": {"publicUrl": "https://id.example.org:8443", "port": 9090},
        "storage": {"backend": "postgresql", "provider": {"postgresql": {
            "database": "//db.example.org/ma1sd", "username": "ma1sd", "password": "p@ss", "pool": True}}},
        "rest": {"enabled": True, "host": "https://app.example.org"},
        "forward": {"servers": ["central"]},
        "lookup": {"recursive": {"allowedCidr": ["10.1.0.0/16"], "bridge": {
            "enabled": True, "server": "http://bridge:8091", "mappings": {"msisdn": "http://sms-bridge:8092"}}}},
        "dns": {"overwrite": {"homeserver": {"federation": [{"name": "example.org",
                                                             "value": "https://synapse.internal:8448"}]}}},
        "invite": {"expiration": {"enabled": False}, "resolution": {"timer": 30, "period": "seconds"}},
        "view": {"session": {"onTokenSubmit": {"success": "success.html"}}},
        "session": {"policy": {"validation": {"forLocal": {"enabled": True}}}},
        "notification": {"handler": {"email": "sendgrid"}},
        "appsvc": {"enabled": True},
        "auth": {"rewrite": {"user": {"rules": [{"regex": "^[0-9]+$", "medium": "employee"}]}}},
        "directory": {"exclude": {"threepid": True}},
        "server_name": "typo.example.org",
        "threepid": {"medium": {"email": {"identity": {"from": "id@example.org"}, "connectors": {"smtp": {
            "host": "smtp.example.org", "pasword": "secret"}}}}},
        "policy": {"policies": {"broken": {"version": "2", "terms": {"en": {"name": "Terms", "url": "ftp://x"}}}}},
        "ldap": {"enabled": True, "connection": {"host": "ldap.example.org", "baseDNs": "ou=people,dc=example,dc=org"},
                 "attribute": {"uid": {"value": "uid"},
                               "threepid": {"email": ["mail"], "Employee ID": ["employeeNumber"]}}},
    }))
    config, _typed, _text, stderr = import_config(capsys, old, tmp_path)
    assert config["server"]["public_url"] == "https://id.example.org:8443" and config["server"]["port"] == 9090
    assert config["storage"]["url"] == "postgresql://ma1sd:p%40ss@db.example.org/ma1sd"
    assert config["recursion"]["allow"] == ["10.1.0.0/16"]
    assert config["recursion"]["forwarders"] == ["https://id.central.example"]
    assert config["recursion"]["bridges"] == {"email": "http://bridge:8091", "msisdn": "http://sms-bridge:8092"}
    assert config["federation"]["overrides"] == {"example.org": "synapse.internal:8448"}
    assert config["invites"]["expire_after"] == "3650d" and config["invites"]["check_every"] == "30s"
    assert config["sessions"]["pages"]["success"] == str(tmp_path / "success.html")
    assert config["directory"]["threepids"] is False
    assert [s["kind"] for s in config["stores"]] == ["ldap", "rest"]
    assert config["stores"][0]["base_dns"] == ["ou=people,dc=example,dc=org"]
    assert config["stores"][0]["attributes"]["threepids"] == {"email": ["mail"]}
    assert "terms" not in config
    for said in ("storage.provider.postgresql.pool: not carried over: no equivalent here",
                 "notification: SendGrid (the one handler besides raw) is not supported",
                 "appsvc: the application service",
                 "auth.rewrite: rewriting logins", "invite.expiration.enabled: invites cannot be kept forever",
                 "server_name: not a key ma1sd knows: it ignored it silently",
                 "threepid.medium.email.connectors.smtp.pasword: not a key ma1sd knows",
                 "ldap.attribute.threepid.Employee ID: not a 3PID medium name",
                 "policy.policies.broken: a policy needs a version and, per language, a name and an http(s) URL"):
        assert said in stderr, said
    # What was carried over as it was is not named.
    for key in ("rest.host", "server.publicUrl", "lookup.recursive.bridge", "view.session", "forward.servers"):
        assert f": {key}" not in stderr, key


MINIMAL = {"matrix": {"domain": "example.org"},
           "ldap": {"enabled": True, "connection": {"host": "ldap.example.org", "baseDNs": ["dc=example,dc=org"]}}}


def test_ma1sd_validation_switch_becomes_the_session_policy(tmp_path, capsys):
    old = tmp_path / "ma1sd.yaml"
    old.write_text(yaml.safe_dump({**MINIMAL, "session": {"policy": {"validation": {"enabled": False}}}}))
    _config, typed, _text, stderr = import_config(capsys, old, tmp_path)
    assert not typed.sessions.policy.email.enabled and not typed.sessions.policy.msisdn.enabled
    assert "session.policy" not in stderr
    assert typed.lookup.share_binds


def test_mxisd_1_2_local_and_remote_sessions_become_the_session_policy(tmp_path, capsys):
    old = tmp_path / "mxisd.yaml"
    old.write_text(yaml.safe_dump({**MINIMAL, "session": {"policy": {"validation": {
        # Local 3PIDs validated here and never at the central server; remote ones only at the central server.
        "forLocal": {"enabled": True, "toLocal": True, "toRemote": {"enabled": False}},
        "forRemote": {"enabled": True, "toLocal": False,
                      "toRemote": {"enabled": True, "server": "https://vector.im"}}}}}}))
    _config, typed, _text, stderr = import_config(capsys, old, tmp_path)
    for medium in (typed.sessions.policy.email, typed.sessions.policy.msisdn):
        assert (medium.enabled, medium.local, medium.remote) == (True, "allow", "deny")
    assert typed.lookup.share_binds is False
    for said in ("session.policy.validation.forRemote.toLocal: carried over as sessions.policy.<medium>.remote: deny",
                 "session.policy.validation.forRemote.toRemote: validation by another identity server",
                 "session.policy.validation.forLocal.toRemote: validation by another identity server (remote "
                 "sessions) is not offered here: only this server validates 3PIDs; toRemote.enabled: false is "
                 "carried over as lookup.share_binds: false"):
        assert said in stderr, said
    assert "mxisd 1.3 and later ignored this key" in stderr


def test_an_invite_without_its_public_key_gets_it_from_the_key_store(tmp_path):
    write_key_store(tmp_path / "keys")
    url = f"sqlite:///{tmp_path / 'mxisd.db'}"
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    with engine.begin() as conn:
        for ddl in OLD_TABLES[:2]:  # mxisd had no accounts nor terms
            conn.execute(sqlalchemy.text(ddl))
        conn.execute(sqlalchemy.text('INSERT INTO "invite_3pid" VALUES (:id, :token, \'@tester:example.org\', '
                                     '\'email\', :address, \'!room:example.org\', :properties)'),
                     [{"id": "a", "token": "a" * 64, "address": "amy@example.net",
                       "properties": json.dumps({"e_key_serial": "EPH1", "room_name": "Project X"})},
                      {"id": "b", "token": "b" * 64, "address": "ben@example.net", "properties": "{}"}])
    engine.dispose()
    config = load_config(our_config(tmp_path))
    report = import_data(config, tmp_path / "keys", url)
    assert "pending invites: 2 read, 2 imported, 1 without their ephemeral key (a new one stands in)" in report.lines()
    assert "v2 accounts: 0 read, 0 imported" in report.lines()
    storage = Storage(config.storage.url, config.data_dir, threads=1)
    try:
        assert storage.ephemeral_key_known(EPHEMERAL_PUBLIC)
        invite = storage.invite("a" * 64)
        assert invite is not None and invite.properties == {"room_name": "Project X"}
        assert invite.address == "amy@example.net" and invite.settled_at is None
    finally:
        storage.close()
    assert import_data(config, tmp_path / "keys", url).lines()[-1] == "nothing changed: everything was imported before"


def test_registration_and_invite_policies_are_carried_over(tmp_path, capsys):
    threepid = {"email": {"domain": {"whitelist": ["example.org", "*partner.example", "bad domain"],
                                     "blacklist": ["*spam.example"]},
                          "pattern": {"blacklist": ["admin@.*", "(unclosed"]}},
                "msisdn": {"pattern": {"whitelist": ["44.*"]}, "domain": {"whitelist": ["example.org"]}},
                "jabber": {"pattern": {"whitelist": [".*"]}}}
    old = old_config("mxisd-ldap.yaml", tmp_path, **{
        "register.policy": {"allowed": False, "threepid": threepid},  # invite: true by default
        "invite.policy.ifSender.hasRole": ["inviters", "hr"]})
    config, typed, _text, stderr = import_config(capsys, old, tmp_path)
    assert config["registration"]["policy"] == {
        "invite_only": True,
        "email": {"domains": {"allow": ["example.org", "*partner.example"], "deny": ["*spam.example"]},
                  "patterns": {"deny": ["admin@.*"]}},
        "msisdn": {"patterns": {"allow": ["44.*"]}}}
    assert typed.registration.policy.allowed is True and typed.registration.policy.invite_only is True
    assert typed.invites.policy.senders.roles == ("inviters", "hr")
    for said in ("register.policy.threepid.jabber: registration policies are for email and msisdn only",
                 "register.policy.threepid.msisdn.domain.whitelist: phone numbers have no domain",
                 "register.policy.threepid.email.domain.whitelist: left out, not a valid domain entry: 'bad domain'",
                 "register.policy.threepid.email.pattern.blacklist: left out, not a valid regular expression: "
                 "'(unclosed'",
                 "register.policy.invite: an invited address on a blacklist could register with mxisd; here the deny",
                 "register: enforced only when the reverse proxy sends register requestToken here",
                 "invite.policy.ifSender.hasRole: carried to invites.policy.senders.roles"):
        assert said in stderr, said


@pytest.mark.parametrize("policy, ours, note", [
    # No invites, a whitelist for email only: phone numbers could not register at all.
    ({"allowed": False, "invite": False, "threepid": {"email": {"domain": {"whitelist": ["example.org"]}}}},
     {"email": {"domains": {"allow": ["example.org"]}}, "msisdn": {"patterns": {"deny": [".*"]}}},
     "register.policy.threepid.msisdn: no whitelist: msisdn registration was closed"),
    # Open to all: the whitelists changed nothing, the blacklists stay.
    ({"allowed": True, "threepid": {"email": {"domain": {"whitelist": ["example.org"],
                                                         "blacklist": ["spam.example"]}}}},
     {"email": {"domains": {"deny": ["spam.example"]}}},
     "register.policy.allowed: true: every address not blacklisted could register"),
    # Closed, with nothing to open it.
    ({"allowed": False, "invite": False}, {"allowed": False}, "register: enforced only when"),
])
def test_each_shape_of_mxisd_registration_policy(policy, ours, note, tmp_path, capsys):
    old = old_config("mxisd-ldap.yaml", tmp_path, **{"register.policy": policy})
    config, _typed, _text, stderr = import_config(capsys, old, tmp_path)
    assert config["registration"]["policy"] == ours
    assert note in stderr
