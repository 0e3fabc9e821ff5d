"""Redis high availability with two `mxisd run` hosts sharing PostgreSQL: on Redis Sentinel (one
master, one replica, three sentinels) and on a Redis Cluster (three masters, three replicas), binds,
store syncs, lookups, search, sessions and rate limits work from both hosts, and a failover under a
lookup load is followed without a restart: requests in flight answer 503 (never 500), later ones
succeed, and no acknowledged bind is lost."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from indexer.normalize import lookup_hash
from indexer.redis_clients import connect
from indexer.rediskeys import RedisKeys
from indexer.settings import RedisClusterConfig, RedisSentinelConfig, RedisTlsConfig
from server.redis_pipe import lookup_pipe
from server.services.lookups import Lookups
from tests.conftest import PEOPLE, V1, V2, Server, wait_until
from tests.fake_homeserver import ClientHomeserver
from tests.redis_ha import MASTER, ClusterSetup, SentinelSetup
from tests.test_api import link_of

pytestmark = pytest.mark.slow

TOKEN = "syt_searcher"
# Generous bounds for this shared 2-core machine; the README gives the figures measured.
RECOVERY_BOUND_S = 20.0
# redis.cluster.buckets by default (schemas/config.schema.json).
BUCKETS = 24


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[SentinelSetup]:
    setup = SentinelSetup(tmp_path / "redis")
    yield setup
    setup.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterSetup]:
    setup = ClusterSetup(tmp_path / "redis")
    yield setup
    setup.stop()


def _no_tls() -> RedisTlsConfig:
    return RedisTlsConfig(enabled=False, ca_file=None, verify=True)


def two_hosts(make_server: Callable[..., Server], postgres_url: str, client_homeserver: ClientHomeserver,
              redis_section: dict[str, Any], tmp_path: Path) -> tuple[Server, Server]:
    """Two `mxisd run` hosts on the same Redis (redis_section), PostgreSQL and people file, started."""
    people = tmp_path / "people.yml"
    people.write_text(yaml.safe_dump(PEOPLE))
    client_homeserver.tokens[TOKEN] = "@searcher:example.org"
    hosts = []
    for _ in range(2):
        host = make_server()
        host.config["redis"] = {"prefix": host.config["redis"]["prefix"], "timeout": "2s", "check_every": "1s",
                                **redis_section}
        host.config["storage"] = {"url": postgres_url}
        host.config["stores"][0]["path"] = str(people)
        host.config["homeserver"] = {"url": client_homeserver.url}
        host.config["directory"] = {"homeserver": False}
        host.config["lookup"] = {"bulk_max": 1000}
        host.config["sessions"] = {"rate_limit": {"per_address": {"requests": 2, "window": "1h"},
                                                  "per_ip": {"requests": 1000, "window": "1h"}}}
        hosts.append(host)
    for host in hosts:  # both at once: the second one's indexer waits for the first one's sync lock
        host.launch()
    for host in hosts:
        wait_until(host._ready, 30, f"the server on port {host.port} (log: {host.log_path})")
        wait_until(lambda host=host: lookup(host, "alice@example.com"), 30, "the first sync")
    return hosts[0], hosts[1]


def search(host: Server, term: str) -> list[str]:
    response = host.http.post("/_matrix/client/v3/user_directory/search", json={"search_term": term},
                              headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    return [r["user_id"] for r in response.json()["results"]]


def bind(mailbox: Any, ask: Server, answer: Server, address: str, mxid: str) -> int:
    """The v1 email flow: requestToken on ask, submitToken and bind on answer; the first status
    that is not 200, or 200 once bound."""
    before = len(mailbox.to(address))
    requested = ask.http.post(V1 + "/validate/email/requestToken",
                              json={"client_secret": "secret", "email": address, "send_attempt": 1})
    if requested.status_code != 200:
        return requested.status_code
    deadline = time.monotonic() + 10
    while len(mailbox.to(address)) <= before:
        if time.monotonic() > deadline:
            return 0  # no mail: the session was made, the sending failed; nothing was acknowledged
        time.sleep(0.05)
    _, params = link_of(mailbox.to(address)[-1])
    submitted = answer.http.post(V1 + "/validate/email/submitToken",
                                 json={"sid": params["sid"], "client_secret": "secret", "token": params["token"]})
    if submitted.status_code != 200:
        return submitted.status_code
    bound = answer.http.post(V1 + "/3pid/bind", json={"sid": params["sid"], "client_secret": "secret", "mxid": mxid})
    return bound.status_code


def lookup(host: Server, address: str) -> str | None:
    mxid: str | None = host.lookup_v1("email", address).get("mxid")
    return mxid


def check_both_hosts(a: Server, b: Server, mailbox: Any, tmp_path: Path) -> None:
    """Lookups, a store sync, search, a bind, sessions and rate limits, each seen from both hosts."""
    assert lookup(a, "alice@example.com") == lookup(b, "alice@example.com") == "@alice:example.org"
    people = tmp_path / "people.yml"
    people.write_text(yaml.safe_dump([*PEOPLE, {"localpart": "zoe", "display_name": "Zoe Quartz",
                                                "emails": ["zoe@example.com"]}]))
    synced = a.cli("index", "--store", "people")
    assert synced.returncode == 0, synced.stderr
    assert lookup(b, "zoe@example.com") == "@zoe:example.org"
    for host in (a, b):  # each host's follower fills its own index from the change stream
        wait_until(lambda host=host: search(host, "quartz") == ["@zoe:example.org"], 20, "the new person in search")
    # A session made on one host is validated and bound on the other.
    assert bind(mailbox, a, b, "erin@example.net", "@erin:example.org") == 200
    assert lookup(a, "erin@example.net") == lookup(b, "erin@example.net") == "@erin:example.org"
    # The rate limit counts requests on both hosts together (2 per address).
    statuses = [host.http.post(V1 + "/validate/email/requestToken", json={
        "client_secret": f"s{i}", "email": "limited@example.net", "send_attempt": 1}).status_code
        for i, host in enumerate((a, b, a, b))]
    assert statuses == [200, 200, 429, 429]


def through_failover(hosts: tuple[Server, Server], mailbox: Any, fail: Callable[[], None]) -> float:
    """Fail Redis over (fail) while both hosts answer lookups and take binds; how long after fail()
    the lookups answered again for good. Checks that nothing answered but 200 or 503, and that
    every acknowledged bind, and one made afterwards, is found on both hosts."""
    stop = threading.Event()
    answers: list[tuple[float, int]] = []
    acknowledged: list[str] = []

    def load(host: Server) -> None:
        with httpx.Client(base_url=host.url, timeout=10) as client:
            while not stop.is_set():
                response = client.get(V1 + "/lookup", params={"medium": "email", "address": "alice@example.com"})
                ok = response.status_code != 200 or response.json().get("mxid") == "@alice:example.org"
                answers.append((time.monotonic(), response.status_code if ok else -1))
                time.sleep(0.01)

    def binds() -> None:
        for i in range(200):
            if stop.is_set():
                return
            address = f"during{i}@example.net"
            if bind(mailbox, hosts[i % 2], hosts[(i + 1) % 2], address, f"@during{i}:example.org") == 200:
                acknowledged.append(address)

    threads = [threading.Thread(target=load, args=(h,)) for h in hosts] + [threading.Thread(target=binds)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.5)
        failed_at = time.monotonic()
        fail()
        # Recovered: lookups on both hosts have answered 200 for two seconds since the last failure.
        deadline = failed_at + 60
        while time.monotonic() < deadline:
            time.sleep(0.5)
            failures = [t for t, status in answers if status != 200 and t >= failed_at]
            last = max(failures, default=failed_at)
            if time.monotonic() - last > 2 and sum(1 for t, s in answers if t > last and s == 200) > 20:
                break
        time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    statuses = {status for t, status in answers if t >= failed_at}
    assert statuses <= {200, 503}, statuses
    recovered = max((t for t, status in answers if status != 200), default=failed_at) - failed_at
    assert recovered < RECOVERY_BOUND_S, recovered
    # Later requests succeed at once, on both hosts.
    assert bind(mailbox, hosts[0], hosts[1], "after@example.net", "@after:example.org") == 200
    assert acknowledged, "no bind was acknowledged during the load"
    for address in [*acknowledged, "after@example.net"]:
        for host in hosts:
            wait_until(lambda host=host, address=address: lookup(host, address), 20, f"the bind of {address}")
    print(f"\nfailover: lookups answered again {recovered:.2f} s after the failure; "
          f"{len(answers)} lookups, {sum(1 for _, s in answers if s == 503)} answered 503; "
          f"{len(acknowledged)} binds acknowledged during the load, none lost")
    return recovered


def test_sentinel_two_hosts_and_a_killed_master(sentinel, make_server, postgres_url, client_homeserver,
                                                mailbox, tmp_path):
    hosts = two_hosts(make_server, postgres_url, client_homeserver,
                      {"sentinel": {"addresses": sentinel.addresses, "master": MASTER}}, tmp_path)
    check_both_hosts(*hosts, mailbox, tmp_path)
    old = sentinel.master_port()
    through_failover(hosts, mailbox, sentinel.master.kill)
    assert sentinel.master_port() == sentinel.replica.port != old
    for host in hosts:  # still the same processes: the failover needed no restart
        assert host.process is not None and host.process.poll() is None


def test_sentinel_clients_follow_a_demoted_master(tmp_path):
    """A failover that keeps the old master running, now as a replica (SENTINEL FAILOVER): the
    lookups' pipelined connection and redis-py's clients, with the master's password, leave it for
    the new master."""
    sentinel = SentinelSetup(tmp_path / "redis", password="s3cret")
    try:
        follow_a_demoted_master(sentinel)
    finally:
        sentinel.stop()


def follow_a_demoted_master(sentinel: SentinelSetup) -> None:
    target = RedisSentinelConfig(addresses=tuple(sentinel.addresses), master=MASTER, username=None,
                                 password="s3cret", sentinel_password=None, db=0, tls=_no_tls())
    blocking = connect(target, 2)

    async def scenario() -> None:
        pipe = lookup_pipe(target, 2)
        assert await pipe.execute("SET", "ha:key", "before") is not None
        with sentinel.sentinels[0].client() as client:
            client.execute_command("SENTINEL", "FAILOVER", MASTER)
        wait_until(lambda: sentinel.master_port() == sentinel.replica.port, 20, "the failover")
        # Until the sentinels make the old master a replica it still takes writes (Redis replicates
        # asynchronously): the connections are left on it until then.
        with sentinel.master.client() as old:
            wait_until(lambda: old.execute_command("ROLE")[0] == "slave", 20, "the old master to follow")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                await pipe.execute("SET", "ha:key", "after")
                blocking.set("ha:other", "after")
                break
            except redis.exceptions.ConnectionError:  # a request answers 503 meanwhile
                await asyncio.sleep(0.2)
        await pipe.aclose()

    asyncio.run(scenario())
    with sentinel.replica.client() as new_master:
        assert new_master.mget("ha:key", "ha:other") == ["after", "after"]
    blocking.close()


def test_cluster_two_hosts_and_a_failed_master(cluster, make_server, postgres_url, client_homeserver,
                                               mailbox, tmp_path):
    hosts = two_hosts(make_server, postgres_url, client_homeserver,
                      {"cluster": {"nodes": cluster.addresses[:2]}}, tmp_path)
    check_both_hosts(*hosts, mailbox, tmp_path)
    prefix = hosts[0].config["redis"]["prefix"]
    # The keys of single requests are spread over the masters, and so are the buckets of a store's
    # hashes; the rest of the cache's keys share one slot.
    with cluster.nodes[0].client() as client:
        def slot(key: str) -> int:
            return int(client.execute_command("CLUSTER", "KEYSLOT", key))

        assert len({slot(f"{prefix}rate:a:{who}") for who in "xyz"}) > 1
        keys = RedisKeys(prefix, BUCKETS)
        assert slot(keys.changes) == slot(keys.epoch) == slot(keys.state("people")) == slot(keys.jobs)
        assert len({slot(keys.threepids("people", bucket)) for bucket in range(BUCKETS)}) == BUCKETS
    # The master holding the cache fails; its replica takes over.
    master = cluster.node_of(RedisKeys(prefix).epoch)
    replica = cluster.replica_of(master)
    through_failover(hosts, mailbox, master.kill)
    assert cluster.node_of(RedisKeys(prefix).epoch) is replica
    for host in hosts:
        assert host.process is not None and host.process.poll() is None


def test_cluster_lookups_pipeline_per_node(cluster):
    """The lookups' client on a cluster: commands for keys on several nodes sent together, an MGET
    over keys of several nodes, a script, and an error, each answered in order."""
    target = RedisClusterConfig(nodes=(cluster.addresses[0],), username=None, password=None, tls=_no_tls(),
                                buckets=BUCKETS)
    keys = [f"lk:{i}" for i in range(12)]
    assert len({cluster.node_of(k).port for k in keys}) == 3
    for key in keys:
        with cluster.node_of(key).client() as node:
            node.set(key, key.upper())

    async def scenario() -> list[Any]:
        pipe = lookup_pipe(target, 2)
        try:
            replies = await pipe.execute_many([("GET", keys[0]), ("MGET", *keys, "lk:none"), ("HMGET", "lk:h", "a"),
                                               ("EVAL", "return redis.call('GET', KEYS[1])", 1, keys[5])])
            with pytest.raises(redis.exceptions.ResponseError):
                await pipe.execute("INCR", keys[1])
            # The login counters: two attempts per window, then the time left.
            logins = Lookups(pipe, "lk:", ["people"])
            claims = [await logins.claim_attempt("user", "@u:example.org", 60, 2) for _ in range(3)]
            assert claims[:2] == [None, None] and 0 < claims[2] <= 60_000
            await logins.return_attempt("user", "@u:example.org")
            assert (await logins.failures("user", "@u:example.org"))[0] == 2
            return replies
        finally:
            await pipe.aclose()

    assert asyncio.run(scenario()) == ["LK:0", [k.upper() for k in keys] + [None], [None], "LK:5"]


def test_cluster_spreads_the_cache(cluster, make_server, postgres_url, client_homeserver, tmp_path):
    """A store of thousands of identities synced on the cluster: its keys and their memory are spread
    over the three masters, and v1, v1 bulk and v2 (sha256, bulk) lookups answer from both hosts."""
    hosts = two_hosts(make_server, postgres_url, client_homeserver,
                      {"cluster": {"nodes": cluster.addresses[:2]}}, tmp_path)
    many = [{"localpart": f"u{i:05}", "emails": [f"user{i:05}@example.com"]} for i in range(3000)]
    (tmp_path / "people.yml").write_text(yaml.safe_dump([*PEOPLE, *many]))
    synced = hosts[0].cli("index", "--store", "people", "--full")
    assert synced.returncode == 0, synced.stderr
    prefix = hosts[0].config["redis"]["prefix"]
    keys = RedisKeys(prefix, BUCKETS)
    masters = {node.port: node for node in (cluster.node_of(keys.records("people", b)) for b in range(BUCKETS))}
    assert len(masters) == 3
    held: dict[int, tuple[int, int]] = {}  # master port -> (keys, bytes) of the cache
    for port, node in masters.items():
        with node.client() as client:
            names = list(client.scan_iter(match=f"{prefix}*", count=1000))
            held[port] = (len(names), sum(int(client.memory_usage(n, samples=0) or 0) for n in names))
    total_bytes = sum(b for _, b in held.values())
    print(f"\ncache over the masters (keys, bytes): {held}")
    for keys, size in held.values():
        assert keys > 0 and size < 0.6 * total_bytes, held
    addresses = [f"user{i:05}@example.com" for i in range(0, 3000, 4)]
    expected = {a: f"@u{a[4:9]}:example.org" for a in addresses}
    for host in hosts:
        for address in addresses[:20]:
            assert host.lookup_v1("email", address)["mxid"] == expected[address]
        bulk = host.http.post(V1 + "/bulk_lookup", json={"threepids": [["email", a] for a in addresses]})
        assert bulk.status_code == 200, bulk.text
        assert {a: m for _, a, m in bulk.json()["threepids"]} == expected
        auth = host.auth()
        pepper = host.http.get(V2 + "/hash_details", headers=auth).json()["lookup_pepper"]
        hashed = {lookup_hash(a, "email", pepper): expected[a] for a in addresses}
        response = host.http.post(V2 + "/lookup", headers=auth, json={
            "algorithm": "sha256", "pepper": pepper, "addresses": [*hashed, "not-a-known-hash"]})
        assert response.status_code == 200, response.text
        assert response.json()["mappings"] == hashed
    # The identities of Matrix IDs (password checks, profiles), read from their buckets.
    target = RedisClusterConfig(nodes=(cluster.addresses[0],), username=None, password=None, tls=_no_tls(),
                                buckets=BUCKETS)

    async def identities() -> tuple[list[str | None], list[str]]:
        pipe = lookup_pipe(target, 2)
        try:
            service = Lookups(pipe, prefix, ["people"], spread=BUCKETS)
            found = await service.identities(["@u00007:example.org", "@nobody:example.org", "@u02999:example.org"])
            everywhere = await service.identity_everywhere("@u00042:example.org")
            return [i.store_id if i else None for i in found], [i.mxid for i in everywhere]
        finally:
            await pipe.aclose()

    found, everywhere = asyncio.run(identities())
    assert found[1] is None and found[0] and found[2] and found[0] != found[2]
    assert everywhere == ["@u00042:example.org"]
