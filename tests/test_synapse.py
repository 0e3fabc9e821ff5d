"""End to end with a real Synapse from PyPI (installed by run-tests into a virtual environment of its
own, with contrib/synapse in it), wired as docs/synapse.md says: Synapse on loopback with a TLS
federation listener, this server behind a TLS terminator (Synapse speaks only https to an identity
server), certificates from a CA of the test's own that both sides trust. Everything goes through
Synapse's client API as Element calls it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import ssl
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import bcrypt
import httpx
import psutil
import pytest
import redis
import trustme
import yaml
from signedjson.key import generate_signing_key, write_signing_keys

from tests.conftest import TWILIO_NUMBER, TWILIO_SID, TWILIO_TOKEN, Server, free_port, wait_until
from tests.fakes import FakeTwilio, Mailbox

pytestmark = pytest.mark.synapse

SYNAPSE_VERSION = "1.163.2"
PASSWORD = "correct horse battery"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
PEOPLE = [
    {"localpart": "alice", "display_name": "Alice Liddell", "emails": ["alice@example.com"],
     "phones": ["+44 7700 900456"], "password": HASH},
    {"localpart": "bob", "display_name": "Bob Builder", "emails": ["bob@example.com"], "password": HASH},
    {"localpart": "dave", "display_name": "Dave Lister", "emails": ["dave@example.com"], "password": HASH},
    {"localpart": "erin", "display_name": "Erin Brockovich", "emails": ["erin@example.com"], "password": HASH},
    {"localpart": "frank", "display_name": "Frank Zappa", "emails": ["desk@example.com"], "password": HASH},
    {"localpart": "grace", "display_name": "Grace Hopper", "emails": [], "password": HASH},
]
ALICE = "@alice:example.org"


def synapse_python() -> Path:
    """Synapse's interpreter: MXISD_TEST_SYNAPSE_VENV (run-tests sets it), else the cache run-tests fills."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    venv = Path(os.environ.get("MXISD_TEST_SYNAPSE_VENV") or cache / "mxisd-tests" / f"synapse-{SYNAPSE_VERSION}")
    python = venv / "bin" / "python"
    if not python.exists():
        pytest.fail(f"no Synapse in {venv}: ./run-tests installs it there")
    return python


class TlsTerminator:
    """What a reverse proxy does for the identity API: TLS on a port of its own, bytes passed on to
    the server's plain HTTP port."""

    def __init__(self, cert: trustme.LeafCert, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(self.context)
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10), "the TLS terminator did not start"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self.context))
        ready.set()
        self.loop.run_forever()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.target_port), 5)
        except OSError:  # TimeoutError included
            client_writer.close()
            return

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(client_reader, writer), pipe(reader, client_writer))

    async def _shutdown(self) -> None:
        self.server.close()
        connections = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Synapse:
    """A Synapse for example.org: client API over plain HTTP on loopback, federation over TLS."""

    def __init__(self, root: Path, ca: trustme.CA, identity_port: int, identity_server: str,
                 homeserver_config: dict[str, Any] | None = None, **module_config: Any) -> None:
        self.root = root
        self.client_port, self.federation_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        self.log_path = root / "homeserver.log"
        cert = ca.issue_cert("example.org")
        cert.cert_chain_pems[0].write_to_path(str(root / "tls.crt"))
        for blob in cert.cert_chain_pems[1:]:
            blob.write_to_path(str(root / "tls.crt"), append=True)
        cert.private_key_pem.write_to_path(str(root / "tls.key"))
        ca.cert_pem.write_to_path(str(root / "ca.pem"))
        with open(root / "signing.key", "w") as f:
            write_signing_keys(f, [generate_signing_key("a_test")])
        (root / "log.yaml").write_text(yaml.safe_dump({
            "version": 1,
            "formatters": {"precise": {"format": "%(asctime)s %(name)s %(levelname)s %(message)s"}},
            "handlers": {"file": {"class": "logging.FileHandler", "filename": str(self.log_path),
                                  "formatter": "precise"}},
            "root": {"level": "INFO", "handlers": ["file"]},
            "disable_existing_loggers": False,
        }))
        lots = {"per_second": 1000, "burst_count": 1000}
        config = {
            "server_name": "example.org",
            "pid_file": str(root / "homeserver.pid"),
            "public_baseurl": self.url + "/",
            "listeners": [
                {"port": self.client_port, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": False,
                 "resources": [{"names": ["client"], "compress": False}]},
                {"port": self.federation_port, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": True,
                 "resources": [{"names": ["federation", "keys"], "compress": False}]},
            ],
            "tls_certificate_path": str(root / "tls.crt"),
            "tls_private_key_path": str(root / "tls.key"),
            "database": {"name": "sqlite3", "args": {"database": str(root / "homeserver.db")}},
            "log_config": str(root / "log.yaml"),
            "media_store_path": str(root / "media"),
            "signing_key_path": str(root / "signing.key"),
            "macaroon_secret_key": secrets.token_hex(16),
            "form_secret": secrets.token_hex(16),
            "report_stats": False,
            "trusted_key_servers": [],
            "enable_registration": False,
            # The identity server is on loopback, which Synapse refuses to reach unless told.
            "ip_range_whitelist": ["127.0.0.1/32", "::1/128"],
            "rc_login": {"address": lots, "account": lots, "failed_attempts": lots},
            "rc_message": lots, "rc_joins": {"local": lots, "remote": lots}, "rc_invites": {
                "per_room": lots, "per_user": lots, "per_issuer": lots},
            "rc_3pid_validation": lots,
            "modules": [{"module": "mxisd_synapse.PasswordProvider",
                         "config": {"endpoint": f"http://127.0.0.1:{identity_port}", "timeout_s": 2,
                                    **module_config}}],
        }
        config.update(homeserver_config or {})
        self.identity_server = identity_server
        (root / "homeserver.yaml").write_text(yaml.safe_dump(config))
        self.http = httpx.Client(base_url=self.url, timeout=30)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready: bool = True) -> None:
        # Synapse trusts identity servers by the system's CAs (OpenSSL's default paths, which
        # SSL_CERT_FILE replaces), the way a private CA is trusted in production.
        env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
        env["SSL_CERT_FILE"] = str(self.root / "ca.pem")
        with open(self.root / "stdout.log", "ab") as out:
            self.process = subprocess.Popen(
                [str(synapse_python()), "-m", "synapse.app.homeserver", "--config-path",
                 str(self.root / "homeserver.yaml")],
                cwd=self.root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        if ready:
            wait_until(self._ready, 120, f"Synapse on port {self.client_port} (log: {self.log_path})")

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"Synapse exited with {self.process.returncode}:\n"
                                 + (self.root / "stdout.log").read_text(errors="replace")[-4000:])
        return self.http.get("/health").status_code == 200

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.http.close()
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def login(self, identifier: dict[str, Any], password: str = PASSWORD) -> httpx.Response:
        return self.http.post("/_matrix/client/v3/login", json={
            "type": "m.login.password", "identifier": identifier, "password": password,
            "initial_device_display_name": "tests"})

    def session(self, user: str) -> dict[str, str]:
        """Log user in by localpart; Authorization headers for the access token."""
        response = self.login({"type": "m.id.user", "user": user})
        assert response.status_code == 200, response.text
        return {"Authorization": f"Bearer {response.json()['access_token']}"}


class Stack:
    def __init__(self, synapse: Synapse, server: Server, mailbox: Mailbox, ca: trustme.CA,
                 terminator: TlsTerminator, twilio: FakeTwilio) -> None:
        self.synapse, self.server, self.mailbox, self.terminator = synapse, server, mailbox, terminator
        self.twilio = twilio
        self.id_server = synapse.identity_server
        self.ca_file = synapse.root / "ca.pem"
        # The identity API as a client reaches it: over https, by the name Synapse is given.
        self.identity = httpx.Client(base_url=f"https://{self.id_server}", timeout=30,
                                     verify=ssl.create_default_context(cafile=str(self.ca_file)))

    def identity_token(self, session: dict[str, str], user: str) -> str:
        """A v2 identity-server token, registered with an OpenID token from Synapse (as Element does)."""
        openid = self.synapse.http.post(f"/_matrix/client/v3/user/{quote(user)}/openid/request_token",
                                        headers=session, json={})
        assert openid.status_code == 200, openid.text
        registered = self.identity.post("/_matrix/identity/v2/account/register", json=openid.json())
        assert registered.status_code == 200, registered.text
        return registered.json()["token"]


@contextlib.contextmanager
def running_stack(root: Path, redis_url: str, people: list[dict[str, Any]],
                  synapse_config: Callable[[Mailbox], dict[str, Any]] | None = None,
                  **mxisd_config: Any) -> Iterator[Stack]:
    """Synapse and mxisd wired as docs/synapse.md says, with these people in mxisd's file store;
    synapse_config gives more homeserver.yaml settings (it is handed the test's SMTP listener),
    mxisd_config more config sections. Everything is stopped, and mxisd's Redis keys deleted, after."""
    ca = trustme.CA()
    mailbox = Mailbox(free_port())
    twilio = FakeTwilio(TWILIO_SID, TWILIO_TOKEN)
    server_port = free_port()
    terminator = TlsTerminator(ca.issue_cert("localhost"), server_port)
    id_server = f"localhost:{terminator.port}"
    synapse_root = root / "synapse"
    synapse_root.mkdir()
    synapse = Synapse(synapse_root, ca, server_port, id_server,
                      homeserver_config=synapse_config(mailbox) if synapse_config else None)
    server_root = root / "mxisd"
    server_root.mkdir()
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    config = {
        "matrix": {"domain": "example.org"},
        # As docs/synapse.md says: public_url is what clients are told, id_server its host and port.
        "server": {"name": "id.example.org", "port": server_port, "public_url": f"https://{id_server}"},
        "data_dir": "data",
        "redis": {"url": redis_url, "prefix": prefix},
        "threepids": {"msisdn": {"default_region": "GB"}},
        "stores": [{"name": "people", "kind": "file", "path": "people.yml", "sync": {"full_every": "1h"}}],
        "federation": {"ca_file": str(synapse_root / "ca.pem"), "allow_private_networks": ["127.0.0.1/32"],
                       "overrides": {"example.org": f"127.0.0.1:{synapse.federation_port}"}},
        "homeserver": {"url": synapse.url},
        "invites": {"retry_first": "1s"},
        "email": {"from": "mxisd@id.example.org", "from_name": "Example ID",
                  "smtp": {"host": "127.0.0.1", "port": mailbox.port, "tls": "none"}},
        "sms": {"twilio": {"base_url": twilio.url, "account_sid": TWILIO_SID, "auth_token": TWILIO_TOKEN,
                           "number": TWILIO_NUMBER}},
        **mxisd_config,
    }
    server = Server(server_root, config, None)  # type: ignore[arg-type]
    server.write_people(people)
    try:
        server.start()
        last = next(p for p in reversed(people) if p["emails"])["emails"][0]
        wait_until(lambda: server.lookup_v1("email", last).get("mxid"), 60, "the first sync")
        synapse.start()
        yield Stack(synapse, server, mailbox, ca, terminator, twilio)
    finally:
        synapse.stop()
        server.stop()
        server.http.close()
        terminator.close()
        mailbox.close()
        twilio.close()
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("synapse"), redis_url, PEOPLE) as running:
        yield running


def clean(log: str) -> None:
    """Synapse's log shows no crash of any kind, and no password."""
    assert "Traceback" not in log
    assert "Failed to run module API callback" not in log
    assert PASSWORD not in log


def test_login_by_localpart_email_and_phone_lands_in_one_account(stack: Stack) -> None:
    synapse = stack.synapse
    identifiers = [
        {"type": "m.id.user", "user": "alice"},
        {"type": "m.id.user", "user": "@alice:example.org"},
        {"type": "m.id.thirdparty", "medium": "email", "address": "Alice@Example.com"},
        # Element's phone login (with "number" too: Synapse still requires it, whatever the spec says)
        {"type": "m.id.phone", "country": "GB", "phone": "07700 900456", "number": "07700 900456"},
        {"type": "m.id.phone", "country": "FR", "phone": "+44 7700 900456", "number": "+44 7700 900456"},
        {"type": "m.id.user", "user": "+44 7700 900456"},  # a phone number typed as the username
        {"type": "m.id.user", "user": "@+447700900456:example.org"},
        {"type": "m.id.user", "user": "alice@example.com"},
    ]
    for identifier in identifiers:
        response = synapse.login(identifier)
        assert response.status_code == 200, (identifier, response.text)
        assert response.json()["user_id"] == ALICE, identifier
    # No second account was made for what was typed.
    phone_account = synapse.http.get("/_matrix/client/v3/profile/" + quote("@+447700900456:example.org"))
    assert phone_account.status_code == 404
    session = synapse.session("alice")
    name = synapse.http.get(f"/_matrix/client/v3/profile/{quote(ALICE)}/displayname", headers=session)
    assert name.json() == {"displayname": "Alice Liddell"}
    threepids = synapse.http.get("/_matrix/client/v3/account/3pid", headers=session).json()["threepids"]
    assert {(t["medium"], t["address"]) for t in threepids} == {("email", "alice@example.com"),
                                                                ("msisdn", "447700900456")}
    clean(synapse.log())


def test_login_through_the_optional_mxisd_login_route(stack: Stack) -> None:
    """docs/synapse.md's optional /login route: mxisd names the account before Synapse sees the login
    (so a phone identifier needs no "number" key there)."""
    for identifier in [{"type": "m.id.phone", "country": "GB", "phone": "07700 900456"},
                       {"type": "m.id.thirdparty", "medium": "email", "address": "alice@example.com"},
                       {"type": "m.id.user", "user": "+44 7700 900456"}]:
        response = stack.server.http.post("/_matrix/client/v3/login", json={
            "type": "m.login.password", "identifier": identifier, "password": PASSWORD})
        assert response.status_code == 200, (identifier, response.text)
        assert response.json()["user_id"] == ALICE
    refused = stack.server.http.post("/_matrix/client/v3/login", json={
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "wrong"})
    assert refused.status_code == 403 and refused.json()["errcode"] == "M_FORBIDDEN"


def test_wrong_empty_and_unknown_refused(stack: Stack) -> None:
    synapse = stack.synapse
    for identifier, password in [({"type": "m.id.user", "user": "bob"}, "wrong"),
                                 ({"type": "m.id.user", "user": "bob"}, ""),
                                 ({"type": "m.id.thirdparty", "medium": "email", "address": "bob@example.com"}, "x"),
                                 ({"type": "m.id.user", "user": "nobody"}, PASSWORD),
                                 ({"type": "m.id.phone", "country": "GB", "phone": "07700 900999",
                                   "number": "07700 900999"}, PASSWORD)]:
        response = synapse.login(identifier, password)
        assert response.status_code == 403, (identifier, response.text)
        assert response.json()["errcode"] == "M_FORBIDDEN"
    # Nothing was created for a refused login.
    assert synapse.http.get("/_matrix/client/v3/profile/" + quote("@nobody:example.org")).status_code == 404
    clean(synapse.log())


def test_display_name_at_first_login_and_kept_in_step(stack: Stack) -> None:
    synapse, server = stack.synapse, stack.server
    session = synapse.session("bob")
    path = "/_matrix/client/v3/profile/" + quote("@bob:example.org") + "/displayname"
    assert synapse.http.get(path, headers=session).json() == {"displayname": "Bob Builder"}
    changed = dict(PEOPLE[1], display_name="Robert Builder", emails=["bob@example.com", "rob@example.com"],
                   phones=["+44 7700 900123"])
    server.write_people([changed if p["localpart"] == "bob" else p for p in PEOPLE])
    try:
        assert server.cli("index").returncode == 0
        synapse.session("bob")
        assert synapse.http.get(path, headers=session).json() == {"displayname": "Robert Builder"}
        threepids = synapse.http.get("/_matrix/client/v3/account/3pid", headers=session).json()["threepids"]
        assert {(t["medium"], t["address"]) for t in threepids} == {
            ("email", "bob@example.com"), ("email", "rob@example.com"), ("msisdn", "447700900123")}
    finally:
        server.write_people(PEOPLE)
        assert server.cli("index").returncode == 0


def test_a_3pid_another_account_holds_stays_with_it(stack: Stack) -> None:
    synapse, server = stack.synapse, stack.server
    frank = synapse.session("frank")
    # The address moves to Grace in the directory; Frank's account keeps it, Grace still logs in.
    moved = [dict(p, emails=[]) if p["localpart"] == "frank" else
             dict(p, emails=["desk@example.com"]) if p["localpart"] == "grace" else p for p in PEOPLE]
    server.write_people(moved)
    try:
        assert server.cli("index").returncode == 0
        grace = synapse.session("grace")
        for session, held in [(frank, [{"medium": "email", "address": "desk@example.com"}]), (grace, [])]:
            threepids = synapse.http.get("/_matrix/client/v3/account/3pid", headers=session).json()["threepids"]
            assert [{k: t[k] for k in ("medium", "address")} for t in threepids] == held
        assert "email desk@example.com not added to @grace:example.org: account @frank:example.org has it" \
            in synapse.log()
        clean(synapse.log())
    finally:
        server.write_people(PEOPLE)
        assert server.cli("index").returncode == 0


def test_directory_unreachable_is_a_clean_refusal(stack: Stack) -> None:
    erin = {"type": "m.id.user", "user": "erin"}
    stack.server.stop()
    try:
        response = stack.synapse.login(erin)
        assert response.status_code == 403, response.text
    finally:
        stack.server.start()
    assert "could not be asked (ConnectionRefusedError" in stack.synapse.log()
    assert stack.server.process is not None
    # `mxisd run` starts its children in sessions of their own: freeze the whole tree, so that
    # connections are accepted and nothing answers.
    supervisor = psutil.Process(stack.server.process.pid)
    frozen = [supervisor, *supervisor.children(recursive=True)]
    for process in frozen:
        process.send_signal(signal.SIGSTOP)
    try:
        response = stack.synapse.login(erin)
        assert response.status_code == 403, response.text
        assert stack.synapse.login(erin).status_code == 403
    finally:
        for process in frozen:
            process.send_signal(signal.SIGCONT)
    log = stack.synapse.log()
    assert log.count("did not answer within 2 s: login refused") == 1  # the second refusal is counted
    clean(log)
    # Back up: the same login works, and the log says how many logins were refused meanwhile.
    assert stack.synapse.login(erin).status_code == 200
    assert "answers again; 3 login(s) refused while it did not" in stack.synapse.log()


def test_v2_account_with_a_synapse_openid_token(stack: Stack) -> None:
    token = stack.identity_token(stack.synapse.session("alice"), ALICE)
    account = stack.identity.get("/_matrix/identity/v2/account", headers={"Authorization": f"Bearer {token}"})
    assert account.status_code == 200 and account.json() == {"user_id": ALICE}


def test_directory_search_with_a_synapse_access_token(stack: Stack) -> None:
    session = stack.synapse.session("alice")
    found = stack.server.http.post("/_matrix/client/v3/user_directory/search", headers=session,
                                   json={"search_term": "brock"})
    assert found.status_code == 200, found.text
    assert {"user_id": "@erin:example.org", "display_name": "Erin Brockovich"} in [
        {k: r.get(k) for k in ("user_id", "display_name")} for r in found.json()["results"]]
    refused = stack.server.http.post("/_matrix/client/v3/user_directory/search",
                                     headers={"Authorization": "Bearer not-a-token"}, json={"search_term": "brock"})
    assert refused.status_code == 401


def test_email_invite_in_a_default_room_bind_onbind_and_unbind(stack: Stack) -> None:
    synapse, identity = stack.synapse, stack.identity
    alice = synapse.session("alice")
    alice_token = stack.identity_token(alice, ALICE)
    created = synapse.http.post("/_matrix/client/v3/createRoom", headers=alice, json={"name": "Tea party"})
    assert created.status_code == 200, created.text
    room_id = created.json()["room_id"]
    create_event = synapse.http.get(f"/_matrix/client/v3/rooms/{quote(room_id)}/state/m.room.create",
                                    headers=alice).json()
    assert create_event["room_version"] == "12" and ":" not in room_id  # a room ID with no server part
    address = "dave.at.home@elsewhere.example"
    invited = synapse.http.post(f"/_matrix/client/v3/rooms/{quote(room_id)}/invite", headers=alice, json={
        "id_server": stack.id_server, "id_access_token": alice_token, "medium": "email", "address": address})
    assert invited.status_code == 200, invited.text + "\n" + stack.server.log()[-3000:]
    [invite_mail] = wait_until(lambda: stack.mailbox.to(address), 20, "the invite email")
    assert "Tea party" in invite_mail.get_content()

    # Dave logs in with his directory password, proves the address to the identity server and binds
    # it through Synapse, as Element does.
    dave = synapse.session("dave")
    dave_token = {"Authorization": f"Bearer {stack.identity_token(dave, '@dave:example.org')}"}
    secret = "secret" + uuid.uuid4().hex
    requested = identity.post("/_matrix/identity/v2/validate/email/requestToken", headers=dave_token,
                              json={"client_secret": secret, "email": address, "send_attempt": 1})
    assert requested.status_code == 200, requested.text
    sid = requested.json()["sid"]
    [mail] = wait_until(lambda: [m for m in stack.mailbox.to(address) if "submitToken" in m.get_content()],
                        20, "the validation email")
    link = re.search(r"token=([0-9A-Za-z._=-]+)", mail.get_content())
    assert link is not None, mail.get_content()
    token = link.group(1)
    submitted = identity.post("/_matrix/identity/v2/validate/email/submitToken", headers=dave_token,
                              json={"sid": sid, "client_secret": secret, "token": token})
    assert submitted.status_code == 200 and submitted.json() == {"success": True}, submitted.text
    bound = synapse.http.post("/_matrix/client/v3/account/3pid/bind", headers=dave, json={
        "client_secret": secret, "id_server": stack.id_server, "id_access_token": dave_token["Authorization"][7:],
        "sid": sid})
    assert bound.status_code == 200, bound.text
    assert stack.server.lookup_v1("email", address)["mxid"] == "@dave:example.org"

    # onbind: Synapse turns the 3PID invite into Dave's room invite.
    # (Synapse keeps an initial sync's answer for a while: later syncs go on from its next_batch, as
    # Element's do.)
    since: dict[str, str] = {}

    def invited_rooms() -> dict[str, Any]:
        sync = synapse.http.get("/_matrix/client/v3/sync", headers=dave, params={"timeout": 1000, **since}).json()
        since["since"] = sync["next_batch"]
        return sync.get("rooms", {}).get("invite", {})

    assert room_id in wait_until(invited_rooms, 30, "the room invite at Dave's")
    joined = synapse.http.post(f"/_matrix/client/v3/join/{quote(room_id)}", headers=dave, json={})
    assert joined.status_code == 200, joined.text

    # Unbind through Synapse, which signs the request to the identity server with its server key.
    unbound = synapse.http.post("/_matrix/client/v3/account/3pid/unbind", headers=dave, json={
        "medium": "email", "address": address, "id_server": stack.id_server})
    assert unbound.status_code == 200 and unbound.json() == {"id_server_unbind_result": "success"}, unbound.text
    assert stack.server.lookup_v1("email", address) == {}
    clean(synapse.log())


def test_an_email_invite_for_a_known_address_in_other_letters_reaches_the_account(stack: Stack) -> None:
    """A client that sends the address as typed (Element lowercases it, /invite by API need not):
    Synapse's hashed lookup of that spelling misses and it stores a 3PID invite with us. The address
    is Alice's, so she gets no email: the invite reaches her account by onbind once Synapse has
    recorded the room's invite event."""
    synapse = stack.synapse
    bob = synapse.session("bob")
    bob_token = stack.identity_token(bob, "@bob:example.org")
    created = synapse.http.post("/_matrix/client/v3/createRoom", headers=bob, json={"name": "Mad hatters"})
    assert created.status_code == 200, created.text
    room_id = created.json()["room_id"]
    invited = synapse.http.post(f"/_matrix/client/v3/rooms/{quote(room_id)}/invite", headers=bob, json={
        "id_server": stack.id_server, "id_access_token": bob_token, "medium": "email",
        "address": "Alice@Example.COM"})
    assert invited.status_code == 200, invited.text + "\n" + stack.server.log()[-3000:]

    alice = synapse.session("alice")  # through the module, by localpart
    since: dict[str, str] = {}

    def invited_rooms() -> dict[str, Any]:
        sync = synapse.http.get("/_matrix/client/v3/sync", headers=alice, params={"timeout": 1000, **since}).json()
        since["since"] = sync["next_batch"]
        return sync.get("rooms", {}).get("invite", {})

    wait_until(lambda: room_id in invited_rooms(), 40, "the room invite at Alice's")
    joined = synapse.http.post(f"/_matrix/client/v3/join/{quote(room_id)}", headers=alice, json={})
    assert joined.status_code == 200, joined.text
    assert not [m for m in stack.mailbox.to("alice@example.com") if "Mad hatters" in m.get_content()]
    clean(synapse.log())


def test_a_phone_number_invite_is_texted_and_reaches_the_account_once_the_number_is_bound(stack: Stack) -> None:
    """Synapse's /invite with medium msisdn: its lookup misses, it stores the invite here and puts the
    redacted number in the room; the invitee gets an SMS, binds the number through Synapse after
    validating it by SMS, and the invite becomes a room invite at her account."""
    synapse, identity = stack.synapse, stack.identity
    bob = synapse.session("bob")
    bob_token = stack.identity_token(bob, "@bob:example.org")
    created = synapse.http.post("/_matrix/client/v3/createRoom", headers=bob, json={"name": "Night shift"})
    assert created.status_code == 200, created.text
    room_id = created.json()["room_id"]
    invited = synapse.http.post(f"/_matrix/client/v3/rooms/{quote(room_id)}/invite", headers=bob, json={
        "id_server": stack.id_server, "id_access_token": bob_token, "medium": "msisdn", "address": "447400123488"})
    assert invited.status_code == 200, invited.text + "\n" + stack.server.log()[-3000:]
    [sms] = wait_until(lambda: [s for s in stack.twilio.sent if s["To"] == "+447400123488"], 20, "the invite SMS")
    assert sms["Body"].startswith("Bob Builder invited you to Night shift on Matrix: https://")
    state = synapse.http.get(f"/_matrix/client/v3/rooms/{quote(room_id)}/state", headers=bob).json()
    [third_party] = [e for e in state if e["type"] == "m.room.third_party_invite"]
    assert third_party["content"]["display_name"] == "+44 740..."

    erin = synapse.session("erin")
    erin_token = {"Authorization": f"Bearer {stack.identity_token(erin, '@erin:example.org')}"}
    secret = "secret" + uuid.uuid4().hex
    requested = identity.post("/_matrix/identity/v2/validate/msisdn/requestToken", headers=erin_token, json={
        "client_secret": secret, "country": "GB", "phone_number": "07400 123488", "send_attempt": 1})
    assert requested.status_code == 200, requested.text
    sid = requested.json()["sid"]
    code = re.search(r"\b(\d{6})\b", stack.twilio.sent[-1]["Body"])
    assert code is not None, stack.twilio.sent[-1]
    submitted = identity.post("/_matrix/identity/v2/validate/msisdn/submitToken", headers=erin_token,
                              json={"sid": sid, "client_secret": secret, "token": code.group(1)})
    assert submitted.status_code == 200 and submitted.json() == {"success": True}, submitted.text
    bound = synapse.http.post("/_matrix/client/v3/account/3pid/bind", headers=erin, json={
        "client_secret": secret, "id_server": stack.id_server, "id_access_token": erin_token["Authorization"][7:],
        "sid": sid})
    assert bound.status_code == 200, bound.text

    since: dict[str, str] = {}

    def invited_rooms() -> dict[str, Any]:
        sync = synapse.http.get("/_matrix/client/v3/sync", headers=erin, params={"timeout": 1000, **since}).json()
        since["since"] = sync["next_batch"]
        return sync.get("rooms", {}).get("invite", {})

    wait_until(lambda: room_id in invited_rooms(), 30, "the room invite at Erin's")
    joined = synapse.http.post(f"/_matrix/client/v3/join/{quote(room_id)}", headers=erin, json={})
    assert joined.status_code == 200, joined.text
    clean(synapse.log())


def test_a_mistake_in_the_module_config_stops_synapse(tmp_path: Path) -> None:
    synapse = Synapse(tmp_path, trustme.CA(), free_port(), "localhost", update_threepid=True)
    synapse.start(ready=False)
    assert synapse.process is not None
    assert synapse.process.wait(120) != 0
    synapse.stop()
    output = (tmp_path / "stdout.log").read_text(errors="replace")
    assert "mxisd_synapse: unknown config key(s): update_threepid" in output
