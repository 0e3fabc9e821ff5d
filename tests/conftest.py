"""Shared fixtures: a Redis per test (own key prefix), a PostgreSQL database per test, free ports,
a fake homeserver, an SMTP listener, a fake Twilio, and a real `mxisd run` server wired to them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import psycopg
import pytest
import redis
import yaml

from indexer.cache import Cache
from indexer.config import parse_config
from indexer.redis_server import EmbeddedRedis
from indexer.settings import Config, StoreConfig
from indexer.stores import Store, build_store
from server.services.directory_search import DirectorySearch, HideRules
from tests.fake_homeserver import ClientHomeserver
from tests.fakes import FakeHomeserver, FakeTwilio, Mailbox
from tests.samba import SambaDC, listening
from tests.slapd import Slapd

REPO = Path(__file__).resolve().parent.parent
V1 = "/_matrix/identity/api/v1"
V2 = "/_matrix/identity/v2"
HS_NAME = "example.org"
TWILIO_SID = "AC0123456789abcdef0123456789abcdef"
TWILIO_TOKEN = "twilio-auth-token-for-tests"
TWILIO_NUMBER = "+15005550006"


# Tests using any of these start a process or a server of their own (`mxisd run`, slapd, Samba, Chromium,
# Synapse) and are marked `slow`: `./run-tests --quick` leaves them out. The markers are registered in
# pyproject.toml.
SLOW_FIXTURES = {"make_server", "slapd", "own_slapd", "memberof_slapd", "samba_dc", "browser", "stack"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if (SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ()))
                or item.get_closest_marker("synapse") or item.get_closest_marker("faults")):
            item.add_marker(pytest.mark.slow)


def wait_until(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll check() until it returns something truthy; fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (httpx.HTTPError, redis.exceptions.RedisError, OSError) as exc:
            last_error = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}" + (f" (last error: {last_error})" if last_error else ""))


def typed_config(stores: list[dict[str, Any]] | None = None, **sections: Any) -> Config:
    """The config of these sections as written in YAML (matrix.domain example.org unless given, and
    a file store when stores are not), relative paths taken from the working directory."""
    raw = {"matrix": {"domain": HS_NAME}, **sections,
           "stores": stores or [{"name": "people", "kind": "file", "path": "/dev/null"}]}
    return parse_config(raw, Path.cwd())


def store_settings(store: dict[str, Any], sections: dict[str, Any]) -> tuple[StoreConfig, Config]:
    """A store entry as written in YAML, and a config of sections with it as its only store."""
    config = typed_config([store], **sections)
    return config.stores[0], config


def make_store(store: dict[str, Any], sections: dict[str, Any]) -> Store:
    """The adapter for a store entry as written in YAML, in a config of sections."""
    return build_store(*store_settings(store, sections))


def search_mxids(index_path: Path, text: str) -> list[str]:
    """The mxids a directory search of the index at index_path finds, best first (no hide rules)."""
    search = DirectorySearch(index_path, HideRules([]), threepids=False)
    try:
        return [hit.mxid for hit in search.search(text, 10)[0]]
    finally:
        search.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """MXISD_TEST_REDIS_URL when set, else an embedded Redis for the whole run."""
    url = os.environ.get("MXISD_TEST_REDIS_URL")
    if url:
        yield url
        return
    embedded = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    embedded.start()
    yield embedded.url
    embedded.stop()


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are removed afterwards."""
    value = f"test:{uuid.uuid4().hex[:12]}:"
    yield value
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{value}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="session")
def homeserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHomeserver]:
    """The homeserver of matrix.domain, over HTTPS with a certificate from a CA of the test's own."""
    hs = FakeHomeserver(HS_NAME, tmp_path_factory.mktemp("homeserver"))
    yield hs
    hs.close()


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox(free_port())
    yield box
    box.close()


@pytest.fixture
def twilio() -> Iterator[FakeTwilio]:
    fake = FakeTwilio(TWILIO_SID, TWILIO_TOKEN)
    yield fake
    fake.close()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL database of this test's own (MXISD_TEST_POSTGRES_URL names the server), dropped after."""
    admin_url = os.environ.get("MXISD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
    name = f"mxisd_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield admin_url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def cache(rclient: redis.Redis, prefix: str) -> Cache:
    """A cache under this test's prefix, with a known lookup pepper; its store hashes cut into
    MXISD_TEST_BUCKETS buckets (default 1), to run the cache's tests as on a Redis Cluster."""
    c = Cache(rclient, prefix, int(os.environ.get("MXISD_TEST_BUCKETS", "1")))
    c.initialize(pepper="pepper")
    return c


def cached(cache: Cache, key_of: Callable[[str, int], str], store: str, field: str) -> str | None:
    """A field of one of a store's bucketed hashes (key_of: cache.k.hashes and the like)."""
    return cast("str | None", cache.r.hget(key_of(store, cache.k.bucket(store, field)), field))


def cached_all(cache: Cache, key_of: Callable[[str, int], str], store: str) -> dict[str, str]:
    """Every field of one of a store's bucketed hashes."""
    found: dict[str, str] = {}
    for bucket in range(cache.k.spread(store)):
        found.update(cast("dict[str, str]", cache.r.hgetall(key_of(store, bucket))))
    return found


PEOPLE = [
    {"localpart": "alice", "display_name": "Alice Liddell", "emails": ["alice@example.com"],
     "phones": ["+1 800 555 2067"]},
    {"localpart": "bob", "display_name": "Bob Builder", "emails": ["bob@example.com", "b.builder@example.org"]},
    {"mxid": "@carol:example.org", "display_name": "Carol Danvers", "emails": ["Carol@Example.ORG"]},
]


class Server:
    """A `mxisd run` process on a free port, with a config and people file written by the test."""

    def __init__(self, root: Path, config: dict[str, Any], homeserver: FakeHomeserver) -> None:
        self.root = root
        self.config = config
        self.homeserver = homeserver
        self._token: str | None = None
        self.config_path = root / "config.yml"
        self.people_path = root / "people.yml"
        self.port = config["server"]["port"]
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=10)
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = root / "server.log"

    def write_people(self, people: list[dict[str, Any]]) -> None:
        self.people_path.write_text(yaml.safe_dump(people))

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "server.cli", *args, "--config", str(self.config_path)],
            capture_output=True, text=True, timeout=120, cwd=self.root,
        )

    def start(self) -> None:
        self.launch()
        wait_until(self._ready, 30, f"the server on port {self.port} (log: {self.log_path})")

    def launch(self) -> None:
        """`mxisd run` with self.config, not waiting for it to answer."""
        self.config_path.write_text(yaml.safe_dump(self.config))
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "run", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True,
        )

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
        return self.http.get("/_matrix/identity/v2").status_code == 200

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM and wait; the exit status."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"server did not stop on SIGTERM:\n{self.log()}") from None

    def register(self, homeserver: FakeHomeserver, user_id: str) -> dict[str, str]:
        """Register user_id with an OpenID token from the homeserver; Authorization headers for the token."""
        response = self.http.post(V2 + "/account/register", json=homeserver.openid_token(user_id))
        assert response.status_code == 200, response.text
        return {"Authorization": f"Bearer {response.json()['token']}"}

    def token(self) -> str:
        """The v2 token of a tester account, registered on first use."""
        if self._token is None:
            self._token = self.register(self.homeserver, "@tester:example.org")["Authorization"][len("Bearer "):]
        return self._token

    def auth(self) -> dict[str, str]:
        """Authorization headers of the tester account."""
        return {"Authorization": f"Bearer {self.token()}"}

    def lookup_v1(self, medium: str, address: str) -> dict[str, Any]:
        response = self.http.get("/_matrix/identity/api/v1/lookup", params={"medium": medium, "address": address})
        assert response.status_code == 200, response.text
        return response.json()


def started(srv: Server) -> Server:
    """Start srv and wait until its first sync answers lookups of the default people (alice)."""
    srv.start()
    wait_until(lambda: srv.lookup_v1("email", "alice@example.com").get("mxid"), what="the first sync")
    return srv


@pytest.fixture
def make_server(tmp_path: Path, redis_url: str, prefix: str, homeserver: FakeHomeserver, mailbox: Mailbox,
                twilio: FakeTwilio) -> Iterator[Callable[..., Server]]:
    """Build (not start) a server; the test may adjust server.config before start()."""
    servers: list[Server] = []

    def build(people: list[dict[str, Any]] | None = None, embedded_redis: bool = False) -> Server:
        root = tmp_path / f"server{len(servers)}"
        root.mkdir()
        config = {
            "matrix": {"domain": "example.org"},
            "server": {"name": "id.example.org", "port": free_port(), "public_url": "http://127.0.0.1"},
            "data_dir": "data",
            "redis": {"url": None if embedded_redis else redis_url, "prefix": prefix},
            "threepids": {"msisdn": {"default_region": "GB"}},
            "stores": [{"name": "people", "kind": "file", "path": "people.yml",
                        "sync": {"full_every": "1h", "max_delete_ratio": 0.5}}],
            "lookup": {"bulk_max": 50},
            "federation": {"ca_file": str(homeserver.ca_file), "allow_private_networks": ["127.0.0.1/32"],
                           "overrides": {HS_NAME: f"127.0.0.1:{homeserver.port}"}},
            "email": {"from": "mxisd@id.example.org", "from_name": "Example ID",
                      "smtp": {"host": "127.0.0.1", "port": mailbox.port, "tls": "none"}},
            "sms": {"twilio": {"base_url": twilio.url, "account_sid": TWILIO_SID, "auth_token": TWILIO_TOKEN,
                               "number": TWILIO_NUMBER}},
        }
        server = Server(root, config, homeserver)
        server.write_people(PEOPLE if people is None else people)
        servers.append(server)
        return server

    yield build
    for server in servers:
        server.stop()
        server.http.close()


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A SQLAlchemy URL of an empty database of this test's own: a SQLite file, a PostgreSQL schema
    (MXISD_TEST_POSTGRES_URL) or a MariaDB database (MXISD_TEST_MYSQL_URL); dropped afterwards."""
    yield from _database(request.param, tmp_path)


def _database(kind: str, tmp_path: Path) -> Iterator[str]:
    import sqlalchemy

    name = f"t_{uuid.uuid4().hex[:12]}"
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    if kind == "postgresql":
        admin_url = os.environ.get("MXISD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
        create, drop = f"CREATE SCHEMA {name}", f"DROP SCHEMA {name} CASCADE"
        url = sqlalchemy.make_url(admin_url).update_query_dict({"options": f"-csearch_path={name}"})
    else:
        admin_url = os.environ.get("MXISD_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
        create, drop = f"CREATE DATABASE {name} CHARACTER SET utf8mb4", f"DROP DATABASE {name}"
        url = sqlalchemy.make_url(admin_url).set(database=name)
    admin = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(create))
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(drop))
        admin.dispose()


@pytest.fixture(scope="session")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """One slapd for the run; each test works in an organizational unit of its own."""
    server = Slapd(tmp_path_factory.mktemp("slapd"))
    server.load()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def samba_dc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SambaDC]:
    """One Active Directory domain controller for the whole run (it needs the fixed LDAP ports)."""
    if listening(636):
        pytest.fail("127.0.0.1:636 is taken: the Active Directory tests need it for their Samba DC")
    dc = SambaDC(tmp_path_factory.mktemp("samba"))
    dc.start()
    yield dc
    dc.stop()


@pytest.fixture
def client_homeserver() -> Iterator[ClientHomeserver]:
    """A homeserver's client API (whoami, directory, login, profile) of this test's own on a free port."""
    fake = ClientHomeserver()
    yield fake
    fake.stop()
