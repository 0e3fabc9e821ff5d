"""Benchmark: syncing a large OpenLDAP directory into the cache, against ldapsearch as the floor.

    .venv/bin/python bench/ldap_sync.py [N] [--changes 1000] [--page-size 500] [--latency-ms 0] [--redis-url redis://...]

Generates N users (default 100,000) into a throwaway slapd with slapadd, then prints the time for
ldapsearch to dump them all (the floor), our full sync until every identity is answerable by
lookup, until the Whoosh index holds them all, and an incremental sync of --changes modified
entries, each with its ratio to the floor. Targets on a 2-core machine: 100,000 users answerable
within 60 s, 1,000 changes within 2 s. Without --redis-url an embedded Redis is started;
--latency-ms puts a proxy in front of slapd that delays every request, as a distant directory would.
"""

from __future__ import annotations

import argparse
import base64
import logging
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import ldap3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.latency_proxy import LatencyProxy  # noqa: E402
from indexer.cache import Cache  # noqa: E402
from indexer.config import parse_config  # noqa: E402
from indexer.follower import Follower  # noqa: E402
from indexer.fulltext import FullText  # noqa: E402
from indexer.redis_clients import connect  # noqa: E402
from indexer.redis_server import EmbeddedRedis  # noqa: E402
from indexer.stores import build_store  # noqa: E402
from indexer.sync import full_sync, incremental_sync  # noqa: E402
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


def ldif(count: int, passwords: bool = False) -> str:
    """count people with a realistic name, two email addresses and a phone number each (and, with
    passwords, userPassword "pw<i>")."""
    parts = [f"dn: {BASE}\nobjectClass: organizationalUnit\nou: people\n\n"]
    for i in range(count):
        name = full_name(i)
        parts.append(
            f"dn: uid=user{i},{BASE}\nobjectClass: inetOrgPerson\nuid: user{i}\ncn:: {_b64(name)}\n"
            f"sn:: {_b64(name.split(' ', 1)[1])}\ndisplayName:: {_b64(name)}\nmail: user{i}@example.org\n"
            f"mail: u{i}@mail.example.com\ntelephoneNumber: +44 7{i:09d}\n"
            + (f"userPassword: pw{i}\n" if passwords else "") + "\n"
        )
    return "".join(parts)


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
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory(prefix="mxisd-bench-") as tmp:
        root = Path(tmp)
        (root / "slapd").mkdir()
        slapd = Slapd(root / "slapd")
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
        try:
            run(args, slapd, uri, Cache(client, prefix), root)
        finally:
            keys = list(client.scan_iter(match=f"{prefix}*", count=10_000))
            for start in range(0, len(keys), 10_000):
                client.delete(*keys[start:start + 10_000])
            client.close()
            if proxy:
                proxy.close()
            slapd.stop()
            if embedded:
                embedded.stop()


def run(args: argparse.Namespace, slapd: Slapd, uri: str, cache: Cache, root: Path) -> None:
    cache.initialize()
    started = time.perf_counter()
    dump = subprocess.run(
        ["ldapsearch", "-LLL", "-x", "-H", uri, "-D", READER_DN, "-w", READER_PASSWORD, "-b", BASE,
         "-E", f"pr={args.page_size}/noprompt", "(objectClass=inetOrgPerson)",
         "uid", "entryUUID", "modifyTimestamp", "displayName", "cn", "mail", "telephoneNumber", "mobile"],
        capture_output=True, check=True,
    )
    floor = time.perf_counter() - started
    assert dump.stdout.count(b"\ndn: ") + 1 >= args.n, "ldapsearch did not return every entry"
    timed(f"ldapsearch dump of {args.n} entries (floor)", None, floor)

    config = parse_config({**CONFIG, "stores": [{
        "name": "bench", "kind": "ldap", "uri": uri, "base_dns": [BASE],
        "bind": {"dn": READER_DN, "password": READER_PASSWORD}, "page_size": args.page_size}]}, root)
    store = build_store(config.stores[0], config)
    fulltext = FullText(root / "fulltext")
    follower = Follower(cache, fulltext, ["bench"], "bench")
    follower.start()  # an empty index, following the change stream like the indexer's thread
    stop = threading.Event()
    indexed_at: list[float] = []

    def follow() -> None:
        while not stop.is_set():
            follower.step(block_ms=200)
            if not indexed_at and fulltext.count() >= args.n:
                indexed_at.append(time.perf_counter())

    thread = threading.Thread(target=follow, daemon=True)
    started = time.perf_counter()
    thread.start()
    result = full_sync(cache, store, 0.2)
    answerable = time.perf_counter() - started
    assert result.outcome == "ok" and result.added == args.n, result
    last = args.n - 1
    assert cache.mxid_of("bench", "email", f"u{last}@mail.example.com") == f"@user{last}:example.org"
    timed("full sync: every identity answerable by lookup", floor, answerable)
    while not indexed_at:
        time.sleep(0.05)
    timed("full sync: every identity in the Whoosh index", floor, indexed_at[0] - started)

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
    stop.set()
    thread.join()
    store.close()


if __name__ == "__main__":
    main()
