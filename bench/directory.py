"""Benchmark: directory search and check_credentials answered from the cache, against the way
mxisd asked the directory on every request.

    .venv/bin/python bench/directory.py [N] [--searches 2000] [--ldap-searches 300] [--concurrency 2] [--logins 300]
                                        [--redis-url redis://...]

Generates the LDAP sync benchmark's directory (N users, default 100,000, with passwords) into a
throwaway slapd with slapadd, runs `mxisd run` on it (with a fake homeserver for access tokens;
the homeserver's own results are left out, so only our search is measured) and waits until the
Whoosh index holds everyone. Then, at a fixed concurrency, directory searches of realistic terms
(full names, 3-letter prefixes, a surname with a typo): median and 99th-percentile latency and
requests per second, beside the same terms searched the mxisd way (a new connection, a bind, a
substring filter over the name attributes) against slapd directly and through a TCP proxy adding
10 ms each way. Targets: median under 5 ms, faster than the mxisd way on the local slapd, and at
least 10 times faster than it behind the proxy. Then check_credentials: median latency, and its
ratio to one bind on an open connection (the floor) and to a search then a bind on a new
connection (the mxisd way). Requests are sent by the standard library's http.client on keep-alive
connections, whose own cost is small beside the server's; each figure is followed by the same
requests sent by httpx, whose own CPU per request (in this process, on the same cores) was about
half the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import queue
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import ldap3
import yaml
from ldap3.utils.conv import escape_filter_chars

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.latency_proxy import LatencyProxy  # noqa: E402
from bench.ldap_sync import BASE, FIRST, LAST, full_name, ldif  # noqa: E402
from indexer.follower import CONSOLIDATE_AFTER  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.fake_homeserver import ClientHomeserver  # noqa: E402
from tests.slapd import READER_DN, READER_PASSWORD, Slapd  # noqa: E402

TOKEN = "syt_bench_token"
# The name attributes mxisd searched (its directory.attribute.name and the display name), indexed
# for substrings so that slapd is not made to scan every entry.
SUBSTRING_INDEXES = "index cn,displayName sub\n"


def terms(count: int, n: int, rng: random.Random) -> list[str]:
    """Realistic search terms, in turn: a full name, a 3-letter prefix, a surname with one typo."""
    out = []
    for k in range(count):
        kind = k % 3
        if kind == 0:
            out.append(full_name(rng.randrange(n)))
        elif kind == 1:
            out.append(rng.choice(FIRST + LAST)[:3])
        else:
            word = rng.choice([w for w in LAST if len(w) >= 6])
            at = rng.randrange(1, len(word) - 1)
            out.append(word[:at] + ("x" if word[at] != "x" else "y") + word[at + 1:])
    return out


def summary(latencies: list[float], wall: float) -> tuple[float, float, float]:
    """(median ms, 99th percentile ms, requests per second)."""
    ordered = sorted(latencies)
    return (1000 * statistics.median(ordered), 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            len(ordered) / wall)


def show(label: str, figures: tuple[float, float, float], ours: tuple[float, float, float] | None = None) -> None:
    median, p99, rps = figures
    line = f"{label:<52} median {median:8.2f} ms  p99 {p99:8.2f} ms  {rps:8.1f} req/s"
    if ours is not None:
        line += f"  (median {median / ours[0]:.3g}x ours)"
    print(line, flush=True)


async def search_httpx(url: str, items: list[str], concurrency: int) -> tuple[list[float], float, int]:
    """Latencies of directory searches over HTTP sent by httpx, the wall time, and how many found someone."""
    slots = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    found = 0
    async with httpx.AsyncClient(base_url=url, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"},
                                 limits=httpx.Limits(max_connections=concurrency)) as http:

        async def one(term: str) -> None:
            nonlocal found
            async with slots:
                started = time.perf_counter()
                response = await http.post("/_matrix/client/v3/user_directory/search",
                                           json={"search_term": term, "limit": 10})
                latencies.append(time.perf_counter() - started)
                response.raise_for_status()
                found += bool(response.json()["results"])

        started = time.perf_counter()
        await asyncio.gather(*(one(t) for t in items))
        return latencies, time.perf_counter() - started, found


class LeanClient:
    """Keep-alive HTTP/1.1 connections of the standard library, each used by one request at a time
    and kept for the next: a request costs the benchmark's process a fraction of what httpx's does
    (README "Performance"), which the latencies would otherwise count as ours."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.idle: queue.SimpleQueue[http.client.HTTPConnection] = queue.SimpleQueue()

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        """(status, JSON answer) of a POST of body as JSON."""
        try:
            conn, kept = self.idle.get_nowait(), True
        except queue.Empty:
            conn, kept = http.client.HTTPConnection(self.host, self.port, timeout=30), False
        try:
            conn.request("POST", path, json.dumps(body), self.headers)
            response = conn.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            conn.close()
            if not kept:
                raise
            # A kept connection idle longer than the server's keep-alive timeout (while the slow
            # LDAP searches ran) was closed by the server: once more on a new one.
            return self.post(path, body)
        answer = response.status, json.loads(response.read())
        self.idle.put(conn)
        return answer


def search_ours(client: LeanClient, items: list[str], concurrency: int) -> tuple[list[float], float, int]:
    """Latencies of directory searches over HTTP, the wall time, and how many found someone."""
    found: list[bool] = []

    def one(term: str) -> None:
        status, answer = client.post("/_matrix/client/v3/user_directory/search", {"search_term": term, "limit": 10})
        assert status == 200, answer
        found.append(bool(answer["results"]))

    latencies, wall = threaded(one, items, concurrency)
    return latencies, wall, sum(found)


def search_mxisd_way(uri: str, term: str) -> int:
    """One directory search as mxisd made it: connect, bind, substring filter, disconnect."""
    conn = ldap3.Connection(uri, READER_DN, READER_PASSWORD, auto_bind=True, raise_exceptions=True)
    value = escape_filter_chars(term)
    conn.search(BASE, f"(|(cn=*{value}*)(displayName=*{value}*)(uid=*{value}*))", attributes=["uid", "displayName"])
    count = len(conn.entries)
    conn.unbind()
    return count


def threaded(work: Callable[[Any], Any], items: list[Any], concurrency: int) -> tuple[list[float], float]:
    """Latencies of work(item) for every item at a fixed concurrency, and the wall time."""
    def timed(item: Any) -> float:
        started = time.perf_counter()
        work(item)
        return time.perf_counter() - started

    started = time.perf_counter()
    pool = ThreadPoolExecutor(concurrency)
    try:
        latencies = list(pool.map(timed, items))
    finally:
        pool.shutdown(cancel_futures=True)  # Ctrl-C stops at once
    return latencies, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", nargs="?", type=int, default=100_000, help="users in the directory (default 100000)")
    parser.add_argument("--searches", type=int, default=2000, help="searches per measurement (default 2000)")
    parser.add_argument("--concurrency", type=int, default=2, help="searches in flight (default 2: one per core here)")
    parser.add_argument("--ldap-searches", type=int, default=300,
                        help="searches per measurement of the mxisd way (default 300)")
    parser.add_argument("--logins", type=int, default=300, help="check_credentials calls (default 300)")
    parser.add_argument("--redis-url", help="a Redis to use (a fresh key prefix); default: an embedded one")
    args = parser.parse_args()

    # SIGTERM (and SIGHUP) end the benchmark as Ctrl-C does, through the finally blocks below that
    # stop mxisd, slapd and the proxy: the default action would leave them running.
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, interrupted)
    with tempfile.TemporaryDirectory(prefix="mxisd-bench-") as tmp:
        root = Path(tmp)
        (root / "slapd").mkdir()
        slapd = Slapd(root / "slapd", extra=SUBSTRING_INDEXES)
        started = time.perf_counter()
        slapd.load(ldif(args.n, passwords=True))
        print(f"slapadd of {args.n} users took {time.perf_counter() - started:.1f} s (setup, not measured)")
        slapd.start()
        proxy = LatencyProxy(slapd.port, 0.010, 0.010)
        homeserver = ClientHomeserver()
        homeserver.tokens[TOKEN] = "@bench:example.org"
        servers: list[subprocess.Popen[bytes]] = []
        try:
            url = start_server(args, root, slapd, homeserver, servers)
            run(args, url, slapd, f"ldap://127.0.0.1:{proxy.port}")
        finally:
            for server in servers:
                stop(server)
            homeserver.stop()
            proxy.close()
            slapd.stop()


def interrupted(number: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {number}")


def stop(server: subprocess.Popen[bytes]) -> None:
    """Stop `mxisd run` and whatever it started (its indexer and the indexer's Whoosh writer): the
    process group it leads, killed when it has not stopped within a minute."""
    if server.poll() is None:
        server.terminate()
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=10)
    try:
        os.killpg(server.pid, signal.SIGKILL)  # children left behind by a killed supervisor
    except ProcessLookupError:
        pass


def start_server(args: argparse.Namespace, root: Path, slapd: Slapd, homeserver: ClientHomeserver,
                 servers: list[subprocess.Popen[bytes]]) -> str:
    """The URL of `mxisd run` on the directory (its process appended to servers as soon as it is
    started, for the caller to stop), once its Whoosh index holds every user."""
    port = free_port()
    config = {
        "matrix": {"domain": "example.org"},
        "server": {"name": "id.example.org", "port": port},
        "data_dir": str(root / "data"),
        "log_level": "INFO",
        "redis": {"url": args.redis_url, "prefix": f"bench:{uuid.uuid4().hex[:8]}:"},
        "stores": [{"name": "staff", "kind": "ldap", "uri": slapd.uri, "base_dns": [BASE], "page_size": 1000,
                    "bind": {"dn": READER_DN, "password": READER_PASSWORD},
                    "sync": {"full_every": "1d", "changes_every": None}}],
        "homeserver": {"url": homeserver.url},
        "directory": {"homeserver": False},
        "auth": {"rate_limit": {"per_user": 1_000_000, "per_ip": 1_000_000}},
    }
    (root / "config.yml").write_text(yaml.safe_dump(config))
    log = open(root / "server.log", "ab")
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "run", "--config", str(root / "config.yml")],
                               stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent,
                               start_new_session=True)  # its own process group: stop() ends its children too
    servers.append(process)
    url = f"http://127.0.0.1:{port}"
    last = full_name(args.n - 1)
    started = time.perf_counter()
    # Generous (a loaded machine syncs and indexes 100,000 people in minutes), but bounded.
    deadline = started + 300 + args.n / 100
    with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        while True:
            if time.perf_counter() > deadline:
                raise SystemExit(f"mxisd did not index {args.n} users in {deadline - started:.0f} s; its log: "
                                 f"{root / 'server.log'}")
            if process.poll() is not None:
                raise SystemExit(f"mxisd exited with {process.returncode}: {(root / 'server.log').read_text()}")
            try:
                response = http.post("/_matrix/client/v3/user_directory/search", json={"search_term": last})
                if response.status_code == 200 and any(r["user_id"] == f"@user{args.n - 1}:example.org"
                                                        for r in response.json()["results"]):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
    print(f"mxisd synced and indexed {args.n} users in {time.perf_counter() - started:.1f} s (setup, not measured)")
    # The follower applied the sync batch by batch; it rebuilds the index whole once the stream is
    # quiet, if CONSOLIDATE_AFTER changes (and half the index) were applied so. A smaller directory
    # is searched as the batches left it.
    if args.n < CONSOLIDATE_AFTER:
        print(f"... its index left in the follower's segments (fewer than {CONSOLIDATE_AFTER} changes)")
        return url
    # The follower may also have built it whole, from a cache the sync had filled, and have nothing
    # to consolidate: then the searches go on after a minute or two.
    rebuilt = re.compile(rf"fulltext index rebuilt from the cache because .*: {args.n} identities")
    consolidating = time.perf_counter() + 60 + args.n / 1000
    while not rebuilt.search((root / "server.log").read_text(errors="replace")):
        if time.perf_counter() > consolidating:
            print("... its index not consolidated in one segment meanwhile: searched as it is")
            return url
        time.sleep(1)
    print(f"... and consolidated its index in one segment after {time.perf_counter() - started:.1f} s")
    return url


def run(args: argparse.Namespace, url: str, slapd: Slapd, proxied_uri: str) -> None:
    rng = random.Random(42)
    items = terms(args.searches, args.n, rng)
    print(f"\ndirectory search, {len(items)} searches at concurrency {args.concurrency} "
          f"(full names, 3-letter prefixes, surnames with a typo):")
    client = LeanClient(url, {"Authorization": f"Bearer {TOKEN}"})
    search_ours(client, items[:50], args.concurrency)  # warm up: connections, whoami, searcher
    latencies, wall, found = search_ours(client, items, args.concurrency)
    ours = summary(latencies, wall)
    show("mxisd (Python): from the cache", ours)
    print(f"  ({found} of {len(items)} searches found someone)")
    latencies, wall, _ = asyncio.run(search_httpx(url, items, args.concurrency))
    show("the same sent by httpx (its own cost included)", summary(latencies, wall), ours)
    # Fewer of these: each takes long. The same mix of terms, in the same order.
    local = summary(*threaded(lambda t: search_mxisd_way(slapd.uri, t), items[:args.ldap_searches], args.concurrency))
    show("mxisd way: new connection, bind, substring search", local, ours)
    proxied = summary(*threaded(lambda t: search_mxisd_way(proxied_uri, t), items[:args.ldap_searches],
                                args.concurrency))
    show("mxisd way through the proxy (+10 ms each way)", proxied, ours)

    print(f"\ncheck_credentials, {args.logins} logins one after another:")
    users = [rng.randrange(args.n) for _ in range(args.logins)]

    def credentials(i: int) -> dict[str, Any]:
        return {"user": {"id": f"@user{i}:example.org", "password": f"pw{i}"}}

    def login(i: int) -> None:
        status, answer = client.post("/_matrix-internal/identity/v1/check_credentials", credentials(i))
        assert status == 200 and answer["auth"]["success"], answer

    login(users[0])
    ours_login = summary(*threaded(login, users, 1))
    show("mxisd (Python): check_credentials", ours_login)
    with httpx.Client(base_url=url, timeout=30) as http:
        def login_httpx(i: int) -> None:
            answer = http.post("/_matrix-internal/identity/v1/check_credentials", json=credentials(i)).json()
            assert answer["auth"]["success"], answer

        login_httpx(users[0])
        show("the same sent by httpx (its own cost included)", summary(*threaded(login_httpx, users, 1)), ours_login)
    conn = ldap3.Connection(slapd.uri, READER_DN, READER_PASSWORD, auto_bind=True, raise_exceptions=True)

    def rebind(i: int) -> None:
        assert conn.rebind(f"uid=user{i},{BASE}", f"pw{i}")

    floor = summary(*threaded(rebind, users, 1))
    conn.unbind()
    show("floor: one bind on an open connection", floor, ours_login)

    def search_then_bind(i: int) -> None:
        reader = ldap3.Connection(slapd.uri, READER_DN, READER_PASSWORD, auto_bind=True, raise_exceptions=True)
        reader.search(BASE, f"(uid=user{i})", attributes=["displayName", "mail", "telephoneNumber"])
        dn = reader.entries[0].entry_dn
        reader.unbind()
        user = ldap3.Connection(slapd.uri, dn, f"pw{i}", auto_bind=True, raise_exceptions=True)
        user.unbind()

    show("mxisd way: new connection, search, bind", summary(*threaded(search_then_bind, users, 1)), ours_login)


if __name__ == "__main__":
    main()
