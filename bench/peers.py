"""Benchmark: our lookups against Sydent's (the reference identity server), side by side.

    .venv/bin/python bench/peers.py [--n 10000] [--duration 10] [--connections 32] [--rounds 2]
                                    [--redis-url redis://127.0.0.1:6379/0 | --redis-cluster HOST:PORT ...]
                                    [--workdir /tmp/mxisd-bench-peers]

Installs matrix-sydent[prometheus] from PyPI into its own virtual environment (kept in --workdir
for the next run) and wrk from Debian when missing, seeds both servers with the same N people
(userI@example.org -> @userI:example.org), starts both on loopback (ours with one Sanic worker per
core) and drives them with wrk at the same concurrency, alternating the two servers run by run so
that drift on a shared machine hits both. Prints requests per second and p50/p99 latency per
scenario and server, and our ratio to Sydent. Targets on a 2-core machine: v2 sha256 lookup of
100 hashes >= 20x Sydent, v1 bulk_lookup of 100 >= 5x, v1 single lookup >= 1x.

The framework's ceiling: the v1 lookup and hash_details are also measured on a bare Sanic app
(bench/bare_sanic.py) with as many workers as ours, answering the JSON our server answered for the
same request, in the same alternating runs; the report prints ours / bare Sanic beside ours /
Sydent (target for the v1 lookup: >= 0.6).

Seeding: ours through a `file` store of N people synced with `mxisd index` (what lookups read is
the Redis cache either way; a binding made through /3pid/bind lands in the same cache), and one v2
account written into its SQL storage. Sydent through its SQLite database while it is stopped: N
rows of global_threepid_associations, each with its sha256 lookup_hash under Sydent's pepper and
its association signed by Sydent's key (as its bind API stores them), and one account with its
token. Every answer is checked once on both servers before measuring.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import yaml
from signedjson.key import encode_signing_key_base64, generate_signing_key
from signedjson.sign import sign_json
from unpaddedbase64 import encode_base64

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from indexer.redis_clients import connect  # noqa: E402
from indexer.settings import RedisClusterConfig, RedisTlsConfig  # noqa: E402
from server.storage import Storage  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOMAIN = "example.org"
SYDENT_NAME = "sydent.bench"
BODIES = 20  # distinct request bodies per POST scenario, cycled by wrk
SCENARIOS = ["v1 lookup", "v1 bulk_lookup 100", "v2 sha256 lookup 100", "v2 sha256 lookup 1000", "hash_details"]
BARE = ["v1 lookup", "hash_details"]  # the scenarios also run on a bare Sanic app (the framework's ceiling)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def address(i: int) -> str:
    return f"user{i}@{DOMAIN}"


def mxid(i: int) -> str:
    return f"@user{i}:{DOMAIN}"


def lookup_hash(addr: str, pepper: str) -> str:
    return encode_base64(hashlib.sha256(f"{addr} email {pepper}".encode()).digest(), urlsafe=True)


def http(method: str, url: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{url} exited with {process.returncode}; log: {log}\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    sys.exit(f"{url} did not answer within {timeout} s; log: {log}")


def start(cmd: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    print("installing wrk from Debian ...", flush=True)
    subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=False, stdout=subprocess.DEVNULL)
    if not shutil.which("wrk"):
        subprocess.run(["apt-get", "update", "-q"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, stdout=subprocess.DEVNULL)
    return shutil.which("wrk") or sys.exit("wrk is not installed")


def ensure_sydent(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import sydent, prometheus_client"]).returncode == 0:
        return python
    print(f"installing matrix-sydent[prometheus] into {venv} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "matrix-sydent[prometheus]"], check=True)
    return python


class Sydent:
    """Sydent on loopback with N signed associations and one v2 account, seeded in its SQLite."""

    def __init__(self, python: Path, root: Path, n: int) -> None:
        self.python, self.root, self.n = python, root, n
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = root / "sydent.db"
        self.log = root / "sydent.log"
        self.key = generate_signing_key("0")
        self.token = uuid.uuid4().hex
        (root / "sydent.conf").write_text(
            f"[general]\nserver.name = {SYDENT_NAME}\nlog.level = WARNING\n"
            f"[db]\ndb.file = {self.db}\n"
            f"[http]\nclientapi.http.bind_address = 127.0.0.1\nclientapi.http.port = {self.port}\n"
            f"[crypto]\ned25519.signingkey = ed25519 0 {encode_signing_key_base64(self.key)}\n"
        )
        self.env = {**os.environ, "SYDENT_CONF": str(root / "sydent.conf")}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = start([str(self.python), "-m", "sydent.sydent"], self.root, self.log, self.env)
        wait_ready(self.url + "/_matrix/identity/api/v1", self.process, self.log)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)

    def seed(self) -> str:
        """Create the schema and pepper with a first start, then write the associations; the pepper."""
        self.db.unlink(missing_ok=True)
        self.start()
        self.stop()
        conn = sqlite3.connect(self.db)
        [(pepper,)] = conn.execute("SELECT lookup_pepper FROM hashing_metadata").fetchall()
        now = int(time.time() * 1000)
        far = now + 10 * 365 * 24 * 3600 * 1000
        rows = []
        for i in range(self.n):
            assoc = sign_json({"medium": "email", "address": address(i), "mxid": mxid(i), "ts": now,
                               "not_before": now - 1000, "not_after": far}, SYDENT_NAME, self.key)
            rows.append(("email", address(i), lookup_hash(address(i), pepper), mxid(i), now, now - 1000, far,
                         SYDENT_NAME, i + 1, json.dumps(assoc)))
        with conn:
            conn.executemany(
                "INSERT INTO global_threepid_associations (medium, address, lookup_hash, mxid, ts, notBefore,"
                " notAfter, originServer, originId, sgAssoc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            conn.execute("INSERT INTO accounts (user_id, created_ts, consent_version) VALUES (?, ?, NULL)",
                         ("@bench:" + DOMAIN, now))
            conn.execute("INSERT INTO tokens (token, user_id) VALUES (?, ?)", (self.token, "@bench:" + DOMAIN))
        conn.close()
        return pepper


class Ours:
    """`mxisd run` on loopback, one worker per core, with a file store of N people in Redis."""

    def __init__(self, root: Path, n: int, redis_section: dict[str, Any]) -> None:
        self.root, self.n = root, n
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        self.redis = redis_section  # the config's: a url, or a cluster's seed nodes
        self.prefix = f"mxisd-bench-peers:{uuid.uuid4().hex[:8]}:"
        self.config = root / "config.yml"
        self.token = uuid.uuid4().hex
        self.process: subprocess.Popen[bytes] | None = None

    def seed(self) -> None:
        people = [{"localpart": f"user{i}", "emails": [address(i)]} for i in range(self.n)]
        (self.root / "people.yml").write_text(yaml.safe_dump(people, width=1000))
        self.config.write_text(yaml.safe_dump({
            "matrix": {"domain": DOMAIN},
            "server": {"name": "mxisd.bench", "port": self.port, "bind": "127.0.0.1", "public_url": self.url,
                       "workers": os.cpu_count() or 1},
            "data_dir": str(self.root / "data"),
            "redis": {**self.redis, "prefix": self.prefix},
            "stores": [{"name": "people", "kind": "file", "path": str(self.root / "people.yml"),
                        "sync": {"full_every": "24h", "max_delete_ratio": 0.5}}],
            "lookup": {"bulk_max": 10000},
        }))
        subprocess.run([sys.executable, "-m", "server.cli", "index", "--config", str(self.config)],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        storage = Storage(None, str(self.root / "data"))
        storage.upgrade()
        storage.add_account(self.token, "@bench:" + DOMAIN)
        storage.close()

    def start(self) -> None:
        self.process = start([sys.executable, "-m", "server.cli", "run", "--config", str(self.config)],
                             ROOT, self.log)
        wait_ready(self.url + "/_matrix/identity/v2", self.process, self.log)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
        target = self.redis.get("url") or RedisClusterConfig(tuple(self.redis["cluster"]["nodes"]), None, None,
                                                             RedisTlsConfig(False, None, True), 24)
        client = connect(target)
        if "cluster" in self.redis:
            print(f"the cache over the cluster's masters: {spread(client, self.prefix)}", flush=True)
        for key in client.scan_iter(match=self.prefix + "*", count=1000):
            client.delete(key)
        client.close()


def spread(client: Any, prefix: str) -> str:
    """How the keys under prefix and their memory (MEMORY USAGE) are shared among a cluster's masters."""
    held = {}
    for node in client.get_primaries():
        names = list(node.redis_connection.scan_iter(match=prefix + "*", count=1000))
        held[f"{node.host}:{node.port}"] = (len(names), sum(node.redis_connection.memory_usage(n, samples=0) or 0
                                                            for n in names))
    total = sum(size for _, size in held.values()) or 1
    return ", ".join(f"{name}: {keys} keys, {size / 2**20:.1f} MiB ({100 * size / total:.0f} %)"
                     for name, (keys, size) in sorted(held.items()))


class BareSanic:
    """bench/bare_sanic.py on loopback with as many workers as ours, answering what ours answered."""

    def __init__(self, root: Path, answers: dict[str, Any]) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "bare-sanic.log"
        (root / "answers.json").write_text(json.dumps(answers))
        self.probe = next(iter(answers))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = start([sys.executable, str(ROOT / "bench" / "bare_sanic.py"), str(self.root / "answers.json"),
                              str(self.port), str(os.cpu_count() or 1)], ROOT, self.log)
        wait_ready(self.url + self.probe, self.process, self.log)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


def lua(method: str, path: str, token: str | None, bodies: list[Any] | None = None,
        paths: list[str] | None = None) -> str:
    """A wrk script cycling through the given bodies or paths; its done() prints one RESULT line."""
    out = ["local i = 0", f'wrk.method = "{method}"', 'wrk.headers["Content-Type"] = "application/json"']
    if token:
        out.append(f'wrk.headers["Authorization"] = "Bearer {token}"')
    items = [json.dumps(b) for b in bodies] if bodies is not None else paths or [path]
    out.append("local items = {" + ",".join(f"[==[{x}]==]" for x in items) + "}")
    if bodies is not None:
        out.append(f'request = function() i = i % #items + 1; return wrk.format(nil, "{path}", nil, items[i]) end')
    else:
        out.append("request = function() i = i % #items + 1; return wrk.format(nil, items[i]) end")
    out.append('done = function(s, latency, r) io.write(string.format("RESULT %d %d %d %d %d\\n", s.requests, '
               "s.duration, latency:percentile(50), latency:percentile(99), s.errors.status + s.errors.connect + "
               "s.errors.read + s.errors.write + s.errors.timeout)) end")
    return "\n".join(out) + "\n"


def scenarios(n: int, token: str, pepper: str, rng: random.Random) -> dict[str, tuple[str, Any, int]]:
    """name -> (wrk script, one request for checking as (method, path, body), expected matches)."""
    def picks(k: int) -> list[int]:
        return rng.sample(range(n), k)
    singles = [f"/_matrix/identity/api/v1/lookup?medium=email&address={address(i).replace('@', '%40')}"
               for i in picks(1000)]
    bulks = [{"threepids": [["email", address(i)] for i in picks(100)]} for _ in range(BODIES)]
    v2 = {k: [{"algorithm": "sha256", "pepper": pepper,
               "addresses": [lookup_hash(address(i), pepper) for i in picks(k)]}
              for _ in range(BODIES)] for k in (100, 1000)}
    return {
        "v1 lookup": (lua("GET", "", None, paths=singles), ("GET", singles[0], None), 1),
        "v1 bulk_lookup 100": (lua("POST", "/_matrix/identity/api/v1/bulk_lookup", None, bodies=bulks),
                               ("POST", "/_matrix/identity/api/v1/bulk_lookup", bulks[0]), 100),
        "v2 sha256 lookup 100": (lua("POST", "/_matrix/identity/v2/lookup", token, bodies=v2[100]),
                                 ("POST", "/_matrix/identity/v2/lookup", v2[100][0]), 100),
        "v2 sha256 lookup 1000": (lua("POST", "/_matrix/identity/v2/lookup", token, bodies=v2[1000]),
                                  ("POST", "/_matrix/identity/v2/lookup", v2[1000][0]), 1000),
        "hash_details": (lua("GET", "/_matrix/identity/v2/hash_details", token),
                         ("GET", "/_matrix/identity/v2/hash_details", None), 0),
    }


def check(name: str, base: str, token: str, probe: tuple[str, str, Any], expected: int) -> None:
    """One request of the scenario, answered 200 with every address found."""
    method, path, body = probe
    status, answer = http(method, base + path, body, token)
    found = len(answer.get("threepids", answer.get("mappings", {}))) if "mxid" not in answer else 1
    if status != 200 or (expected and found != expected) or (not expected and "lookup_pepper" not in answer):
        sys.exit(f"{name} on {base}: {status} with {found} of {expected} found: {str(answer)[:300]}")


def wrk(binary: str, script: Path, url: str, duration: int, connections: int) -> dict[str, float]:
    result = subprocess.run([binary, "-t2", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", "-s", str(script),
                             url], capture_output=True, text=True, check=True)
    line = next((x for x in result.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"wrk printed no result:\n{result.stdout}\n{result.stderr}")
    requests, duration_us, p50, p99, errors = map(int, line.split()[1:])
    return {"rps": requests / (duration_us / 1e6), "p50": p50 / 1000, "p99": p99 / 1000, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="bound associations on each server")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="runs per scenario and server, alternating")
    parser.add_argument("--only", action="append", choices=SCENARIOS, help="run only this scenario (repeatable)")
    parser.add_argument("--redis-url", default=os.environ.get("MXISD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--redis-cluster", action="append", metavar="HOST:PORT",
                        help="a seed node of a Redis Cluster to use instead of --redis-url (repeatable)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mxisd-bench-peers"))
    args = parser.parse_args()
    if args.n < 1000:
        parser.error("--n must be at least 1000 (a request asks for up to 1000 distinct addresses)")
    binary = ensure_wrk()
    python = ensure_sydent(args.workdir / "sydent-venv")
    run_dir = args.workdir / f"run-{uuid.uuid4().hex[:8]}"
    sydent, ours = Sydent(python, run_dir / "sydent", args.n), Ours(run_dir / "ours", args.n,
                                                                   {"cluster": {"nodes": args.redis_cluster}}
                                                                   if args.redis_cluster else {"url": args.redis_url})
    bare: BareSanic | None = None
    try:
        print(f"seeding {args.n} associations into Sydent and into ours ...", flush=True)
        sydent_pepper = sydent.seed()
        ours.seed()
        sydent.start()
        ours.start()
        _, details = http("GET", ours.url + "/_matrix/identity/v2/hash_details", token=ours.token)
        ours_plan = scenarios(args.n, ours.token, details["lookup_pepper"], random.Random(7))
        # The bare app answers each path with the JSON ours answered for the scenario's first request.
        answers = {probe[1].partition("?")[0]: http("GET", ours.url + probe[1], token=ours.token)[1]
                   for name, (_, probe, _) in ours_plan.items() if name in BARE}
        bare = BareSanic(run_dir / "bare", answers)
        bare.start()
        servers = {"ours": (ours.url, ours.token, details["lookup_pepper"]),
                   "sydent": (sydent.url, sydent.token, sydent_pepper),
                   "sanic": (bare.url, ours.token, details["lookup_pepper"])}
        plans: dict[str, dict[str, tuple[Path, tuple[str, str, Any], int]]] = {}
        for server, (url, token, pepper) in servers.items():
            plans[server] = {}
            for name, (script, probe, expected) in scenarios(args.n, token, pepper, random.Random(7)).items():
                if server == "sanic" and name not in BARE:
                    continue
                path = run_dir / f"{server}-{name.replace(' ', '_')}.lua"
                path.write_text(script)
                check(name, url, token, probe, expected)
                plans[server][name] = (path, probe, expected)
        print(f"wrk: 2 threads, {args.connections} connections, {args.duration:g} s per run, "
              f"{args.rounds} alternating rounds; ours with {os.cpu_count()} workers", flush=True)
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        chosen = [name for name in SCENARIOS if not args.only or name in args.only]
        for name in chosen:
            running = [server for server in servers if name in plans[server]]
            for server in running:
                wrk(binary, plans[server][name][0], servers[server][0], 1, args.connections)  # warm up
            for round_ in range(args.rounds):
                for server in (running if round_ % 2 == 0 else list(reversed(running))):
                    results.setdefault((name, server), []).append(
                        wrk(binary, plans[server][name][0], servers[server][0], args.duration, args.connections))
        report(chosen, results)
    finally:
        if bare is not None:
            bare.stop()
        ours.stop()
        sydent.stop()


def report(chosen: list[str], results: dict[tuple[str, str], list[dict[str, float]]]) -> None:
    def mean(name: str, server: str, key: str) -> float:
        runs = results[(name, server)]
        return sum(r[key] for r in runs) / len(runs)
    print(f"\n{'scenario':<24}{'ours rps':>10}{'p50 ms':>8}{'p99 ms':>8}{'sydent rps':>12}{'p50 ms':>8}"
          f"{'p99 ms':>8}{'ratio':>8}{'bare Sanic rps':>16}{'p50 ms':>8}{'p99 ms':>8}{'ours/bare':>11}")
    for name in chosen:
        ours_rps, syd_rps = mean(name, "ours", "rps"), mean(name, "sydent", "rps")
        line = (f"{name:<24}{ours_rps:>10.0f}{mean(name, 'ours', 'p50'):>8.1f}{mean(name, 'ours', 'p99'):>8.1f}"
                f"{syd_rps:>12.0f}{mean(name, 'sydent', 'p50'):>8.1f}{mean(name, 'sydent', 'p99'):>8.1f}"
                f"{ours_rps / syd_rps:>7.1f}x")
        if (name, "sanic") in results:
            bare_rps = mean(name, "sanic", "rps")
            line += (f"{bare_rps:>16.0f}{mean(name, 'sanic', 'p50'):>8.1f}{mean(name, 'sanic', 'p99'):>8.1f}"
                     f"{ours_rps / bare_rps:>10.2f}x")
        print(line)
    for name in BARE:
        if (name, "sanic") in results:
            target = " (target >= 0.6)" if name == "v1 lookup" else ""
            print(f"{name}: ours / bare Sanic = {mean(name, 'ours', 'rps') / mean(name, 'sanic', 'rps'):.2f}{target}")
    errors = {k: sum(r["errors"] for r in v) for k, v in results.items() if any(r["errors"] for r in v)}
    if errors:
        print("errors (non-2xx or socket) during the runs:", errors)


if __name__ == "__main__":
    main()
