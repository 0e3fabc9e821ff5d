"""Benchmark: syncing a large OpenLDAP directory into the cache, against ldapsearch as the floor.

    .venv/bin/python bench/ldap_sync.py [N] [--changes 1000] [--page-size 500] [--latency-ms 0]
                                        [--lookups 20000] [--no-fulltext] [--redis-url redis://...]

Generates N users (default 100,000) into a throwaway slapd with slapadd, then prints the time for
ldapsearch to dump them all (the floor), our full sync until every identity is answerable by
lookup, until the Whoosh index holds them all (not with --no-fulltext), and an incremental sync of
--changes modified entries, each with its ratio to the floor; then lookups at that size (single
addresses one after another, and bulk hashed lookups of 100 at a time from 32 concurrent callers, on
the server's pipelined Redis connection) and the costs per identity: Redis memory (INFO used_memory
grown by the sync, without the change stream, which is trimmed to a fixed length), Whoosh index
bytes on disk, full-sync seconds per 100,000. Targets on a 2-core machine: 100,000 users answerable
within 60 s, 1,000 changes within 2 s. Without --redis-url an embedded Redis is started; memory is
measured in it, or in a --redis-url Redis that was empty (not in one holding other data).
--latency-ms puts a proxy in front of slapd that delays every request, as a distant directory would.
Nothing is held whole in memory: the LDIF is written entry by entry and ldapsearch's dump goes to a
file.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import random
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import ldap3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.latency_proxy import LatencyProxy  # noqa: E402
from indexer.cache import Cache, CacheAddress  # noqa: E402
from indexer.config import parse_config  # noqa: E402
from indexer.follower import FollowerProcess  # noqa: E402
from indexer.fulltext import FullText, fulltext_path  # noqa: E402
from indexer.normalize import lookup_hash  # noqa: E402
from indexer.redis_clients import DEFAULT_TIMEOUT_S, connect  # noqa: E402
from indexer.redis_server import EmbeddedRedis  # noqa: E402
from indexer.status import HostBounds  # noqa: E402
from indexer.stores import build_store  # noqa: E402
from indexer.sync import full_sync, incremental_sync  # noqa: E402
from server.redis_pipe import PipelinedRedis  # noqa: E402
from server.services.lookups import Lookups  # noqa: E402
from tests.slapd import ADMIN_DN, ADMIN_PASSWORD, READER_DN, READER_PASSWORD, SUFFIX, Slapd  # noqa: E402

BASE = f"ou=people,{SUFFIX}"
CONFIG = {"matrix": {"domain": "example.org"}, "threepids": {"msisdn": {"default_region": "GB"}}}


FIRST = ("Adam Agnès Ahmed Aiko Alice Amélie Ana Andrea Anne Anton Arjun Astrid Ben Bernadette Björn Carla "
         "Carlos Chloé Chen Clara Daniel Dmitri Elena Élodie Emma Eric Fatima Felix Florian François Gabriel "
         "Greta Hannah Hélène Hugo Ines Ingrid Isabel Ivan Jakob Jana Jean José Julia Jürgen Kai Karin Katarzyna "
         "Laura Léa Lena Lucas Luis Maja Marco María Martin Mathilde Mehmet Mia Michael Nadia Niklas Noah Nora "
         "Olga Oscar Paul Pedro Petra Pierre Priya Rafael Rosa Ruth Sami Sara Sebastian Sofia Stefan Søren "
         "Thomas Tomás Ursula Valentina Victor Wei Yasmin Yusuf Zoë Zoltán").split()
LAST = ("Abbott Achterberg Álvarez Andersen Baker Bauer Becker Bernard Bianchi Blanchard Böhm Brown Carvalho "
        "Castillo Chevalier Costa Dąbrowski Davies Dubois Dupont Eriksson Esposito Fernández Fischer Fontaine "
        "García Gauthier Gómez González Gruber Hansen Hartmann Herrera Hoffmann Horváth Ivanov Jansen Jiménez "
        "Johansson Jones Kaiser Keller Kowalski Krüger Lambert Larsen Laurent Lefèvre Lehmann Lindqvist López "
        "Martín Martínez Meyer Moreau Morales Müller Nakamura Navarro Nielsen Novák Olsen Ortiz Papadopoulos "
        "Pereira Petrov Popescu Ramírez Richter Rodríguez Romano Rossi Ruiz Sánchez Santos Schmidt Schneider "
        "Schulz Silva Smith Suzuki Svensson Takahashi Taylor Thomas Torres Vargas Vogel Wagner Weber Williams "
        "Wójcik Yılmaz Zimmermann").split()


def full_name(i: int) -> str:
    """The display name of generated user i: a first name and one or two surnames, unique by i
    (up to 800,000), each name about as common as any other."""
    pairs = len(FIRST) * len(LAST)
    first = FIRST[i % len(FIRST)]
    last = LAST[(i // len(FIRST)) % len(LAST)]
    # Users i and i + k * pairs share first name and surname; this keeps their second surnames apart
    # (37 and len(LAST) have no common factor) while spreading every surname evenly.
    second = LAST[(i + 37 * (i // pairs)) % len(LAST)]
    return f"{first} {last}" if i < pairs else f"{first} {last}-{second}"


def ldif(count: int, passwords: bool = False) -> Iterator[str]:
    """count people with a realistic name, two email addresses and a phone number each (and, with
    passwords, userPassword "pw<i>"), entry by entry."""
    yield f"dn: {BASE}\nobjectClass: organizationalUnit\nou: people\n\n"
    for i in range(count):
        name = full_name(i)
        yield (
            f"dn: uid=user{i},{BASE}\nobjectClass: inetOrgPerson\nuid: user{i}\ncn:: {_b64(name)}\n"
            f"sn:: {_b64(name.split(' ', 1)[1])}\ndisplayName:: {_b64(name)}\nmail: user{i}@example.org\n"
            f"mail: u{i}@mail.example.com\ntelephoneNumber: +44 7{i:09d}\n"
            + (f"userPassword: pw{i}\n" if passwords else "") + "\n"
        )


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def timed(label: str, floor: float | None, seconds: float) -> None:
    ratio = f"  ({seconds / floor:.3g}x the floor)" if floor else ""
    print(f"{label:<48} {seconds:8.2f} s{ratio}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", nargs="?", type=int, default=100_000, help="users in the directory (default 100000)")
    parser.add_argument("--changes", type=int, default=1000, help="entries changed before the incremental sync")
    parser.add_argument("--redis-url", help="a Redis to use (a fresh key prefix, removed afterwards)")
    parser.add_argument("--page-size", type=int, default=500)
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="delay every request to the directory by this much (a distant directory)")
    parser.add_argument("--lookups", type=int, default=20_000,
                        help="single lookups timed one after another, and 100 times as many addresses in bulk "
                             "(0: none)")
    parser.add_argument("--no-fulltext", action="store_true",
                        help="no Whoosh index (its time and bytes are not measured): sync and lookups only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory(prefix="mxisd-bench-") as tmp:
        root = Path(tmp)
        (root / "slapd").mkdir()
        # mdb takes about 3.5 KiB per generated entry with these indexes; the map is sparse, so room
        # to spare costs nothing.
        slapd = Slapd(root / "slapd", map_size=max(4 << 30, args.n * 16 << 10))
        started = time.perf_counter()
        slapd.load(ldif(args.n))
        print(f"slapadd of {args.n} users took {time.perf_counter() - started:.1f} s (setup, not measured)")
        slapd.start()
        uri = slapd.uri
        proxy = LatencyProxy(slapd.port, args.latency_ms / 1000) if args.latency_ms else None
        if proxy:
            uri = f"ldap://127.0.0.1:{proxy.port}"
            print(f"every request to the directory is delayed by {args.latency_ms:g} ms")
        embedded = None
        redis_url = args.redis_url
        if not redis_url:
            embedded = EmbeddedRedis(root / "redis")
            embedded.start()
            redis_url = embedded.url
        prefix = f"bench:{uuid.uuid4().hex[:8]}:"
        client = connect(redis_url)
        # Memory is measured only in a Redis that held nothing else: other data would move it too.
        own_redis = embedded is not None or client.dbsize() == 0
        try:
            cache = Cache(client, prefix, address=CacheAddress(redis_url, DEFAULT_TIMEOUT_S, prefix))
            run(args, slapd, uri, cache, root, redis_url, prefix, own_redis)
        finally:
            if not embedded:  # an embedded Redis goes with its directory
                # UNLINK frees the large hashes in the background: a DEL of a million identities'
                # keys outlasted the client's timeout.
                keys = list(client.scan_iter(match=f"{prefix}*", count=10_000))
                for start in range(0, len(keys), 1_000):
                    client.unlink(*keys[start:start + 1_000])
            client.close()
            if proxy:
                proxy.close()
            slapd.stop()
            if embedded:
                embedded.stop()


async def lookups(n: int, count: int, redis_url: str, prefix: str, pepper: str, changed: set[int]) -> None:
    """count single-address lookups one after another, then count // 10 bulk lookups of 100 hashes
    from 32 concurrent callers, as the server makes them (Lookups on its pipelined connection)."""
    pipe = PipelinedRedis(redis_url)
    service = Lookups(pipe, prefix, ["bench"])
    rng = random.Random(17)

    def expected(i: int) -> str | None:
        # The incremental sync replaced the addresses of the changed entries.
        return None if i in changed else f"@user{i}:example.org"

    picks = [rng.randrange(n) for _ in range(count)]
    latencies = []
    started = time.perf_counter()
    for i in picks:
        asked = time.perf_counter()
        found = await service.by_address([("email", f"u{i}@mail.example.com")])
        latencies.append(time.perf_counter() - asked)
        assert found == [expected(i)], (i, found)
    took = time.perf_counter() - started
    latencies.sort()
    print(f"single lookups at {n} identities, one after another: median {latencies[len(latencies) // 2] * 1e3:.3f} ms,"
          f" p99 {latencies[len(latencies) * 99 // 100] * 1e3:.3f} ms, {count / took:.0f} lookups/s")

    batches = [[rng.randrange(n) for _ in range(100)] for _ in range(max(1, count // 10))]
    hashed = [[lookup_hash(f"u{i}@mail.example.com", "email", pepper) for i in batch] for batch in batches]
    queue = iter(zip(batches, hashed))

    async def caller() -> None:
        for batch, hashes in queue:
            _, found = await service.by_hash(hashes)
            assert found == [expected(i) for i in batch]

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(32)))
    took = time.perf_counter() - started
    print(f"bulk hashed lookups of 100 at {n} identities, 32 callers: {len(batches) / took:.0f} requests/s, "
          f"{len(batches) * 100 / took:.0f} addresses/s")
    pipe.close()


def wait(done: Callable[[], bool], what: str, timeout_s: float = 3600.0) -> None:
    """Poll done() until it holds (every 50 ms)."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {what} after {timeout_s:.0f} s")
        time.sleep(0.05)


def used_memory(cache: Cache) -> int:
    return int(cache.r.info("memory")["used_memory"])


def disk_bytes(folder: Path) -> int:
    """The bytes the files under folder take on disk."""
    return sum(path.stat().st_blocks * 512 for path in folder.rglob("*") if path.is_file())


def run(args: argparse.Namespace, slapd: Slapd, uri: str, cache: Cache, root: Path, redis_url: str, prefix: str,
        own_redis: bool) -> None:
    cache.initialize()
    started = time.perf_counter()
    dump_path = root / "dump.ldif"
    with dump_path.open("wb") as dump:
        subprocess.run(
            ["ldapsearch", "-LLL", "-x", "-H", uri, "-D", READER_DN, "-w", READER_PASSWORD, "-b", BASE,
             "-E", f"pr={args.page_size}/noprompt", "(objectClass=inetOrgPerson)",
             "uid", "entryUUID", "modifyTimestamp", "displayName", "cn", "mail", "telephoneNumber", "mobile"],
            stdout=dump, check=True, timeout=3600,
        )
    floor = time.perf_counter() - started
    with dump_path.open("rb") as dump:
        entries = sum(1 for line in dump if line.startswith(b"dn: "))
    dump_path.unlink()
    assert entries >= args.n, "ldapsearch did not return every entry"
    timed(f"ldapsearch dump of {args.n} entries (floor)", None, floor)

    config = parse_config({**CONFIG, "data_dir": str(root), "server": {"host_id": "bench"}, "log_level": "WARNING",
                           "redis": {"url": redis_url, "prefix": prefix}, "stores": [{
        "name": "bench", "kind": "ldap", "uri": uri, "base_dns": [BASE],
        "bind": {"dn": READER_DN, "password": READER_PASSWORD}, "page_size": args.page_size}]}, root)
    store = build_store(config.stores[0], config)
    fulltext = FullText(fulltext_path(config), config.directory.threepids)  # as `mxisd index` writes it
    follower = None
    if not args.no_fulltext:
        # In a process of its own, as the indexer runs it; timed from its first report (an empty index).
        follower = FollowerProcess(config, redis_url)
        follower.start()
        wait(lambda: any(f["host"] == "bench" for f in cache.status(["bench"], HostBounds(60, 3600))["followers"]),
             "the follower's first report")
    memory_before = used_memory(cache)
    started = time.perf_counter()
    cpu = time.process_time()
    result = full_sync(cache, store, 0.2)
    answerable = time.perf_counter() - started
    cpu = time.process_time() - cpu
    assert result.outcome == "ok" and result.added == args.n, result
    last = args.n - 1
    assert cache.mxid_of("bench", "email", f"u{last}@mail.example.com") == f"@user{last}:example.org"
    timed("full sync: every identity answerable by lookup", floor, answerable)
    # Less sensitive to other load than the time: the sync's work, and the follower's when it shares the process.
    print(f"  (CPU of this process meanwhile: {cpu:.2f} s)")
    memory_after = used_memory(cache)
    # The stream is trimmed to STREAM_MAXLEN entries, so it is a fixed cost, not one per identity.
    stream_bytes = int(cache.r.memory_usage(cache.k.changes, samples=0) or 0)
    stream_entries = int(cache.r.xlen(cache.k.changes))
    indexed = None
    if follower:
        wait(lambda: fulltext.count() >= args.n, "the follower to index everyone")
        indexed = time.perf_counter() - started
        timed("full sync: every identity in the Whoosh index", floor, indexed)
        # Stopped before the consolidating rebuild a quiet stream starts, which is not measured.
        follower.stop()

    conn = ldap3.Connection(slapd.uri, ADMIN_DN, ADMIN_PASSWORD, auto_bind=True, raise_exceptions=True)
    # modifyTimestamp has whole seconds, so an incremental sync re-reads the entries of its mark's
    # second: right after slapadd that is the whole bulk load's last second. One ordinary change and
    # sync (not measured) move the mark past it, as the first scheduled incremental sync would.
    time.sleep(1.1)
    conn.modify(f"uid=user0,{BASE}", {"description": [(ldap3.MODIFY_REPLACE, ["settled"])]})
    settling = incremental_sync(cache, store)
    assert settling is not None and settling.outcome == "ok", settling
    print(f"(settling incremental sync after the bulk load: read {settling.read} entries, "
          f"{settling.ended - settling.started:.2f} s, not measured)")
    step = max(1, args.n // args.changes)
    changed = list(range(0, args.n, step))[:args.changes]
    for i in changed:
        conn.modify(f"uid=user{i},{BASE}", {"mail": [(ldap3.MODIFY_REPLACE, [f"changed{i}@example.org"])]})
    conn.unbind()
    started = time.perf_counter()
    result = incremental_sync(cache, store)
    took = time.perf_counter() - started
    assert result is not None and result.outcome == "ok" and result.changed == len(changed), result
    assert cache.mxid_of("bench", "email", f"changed{changed[-1]}@example.org") == f"@user{changed[-1]}:example.org"
    timed(f"incremental sync of {len(changed)} changed entries", floor, took)
    print(f"  (the incremental sync read {result.read} entries: those changed at or after the mark's second)")
    store.close()
    if args.lookups:
        asyncio.run(lookups(args.n, args.lookups, redis_url, prefix, cache.pepper(), set(changed)))

    print(f"\nper identity, at {args.n} identities:")
    if own_redis:
        grown = memory_after - memory_before
        print(f"  Redis memory: {(grown - stream_bytes) / args.n:.0f} bytes (INFO used_memory grew by "
              f"{grown / 2**20:.1f} MiB, of which the change stream of {stream_entries} entries "
              f"{stream_bytes / 2**20:.1f} MiB, {stream_bytes / max(1, stream_entries):.0f} bytes per entry)")
        print(f"  Redis used_memory_peak: {int(cache.r.info('memory')['used_memory_peak']) / 2**20:.1f} MiB")
    else:
        print("  Redis memory: not measured (the --redis-url Redis held other keys, which move it too)")
    per_100k = 100_000 / args.n
    if indexed is not None:
        size = disk_bytes(fulltext.path)
        print(f"  fulltext index: {size / args.n:.0f} bytes on disk ({size / 2**20:.1f} MiB)")
    print(f"  full sync: {answerable * per_100k:.1f} s per 100,000 until answerable"
          + (f", {indexed * per_100k:.1f} s until indexed" if indexed is not None else ""))
    print(f"  bench process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
