"""The `mxisd` command: run, index, status, check-config, test-email, doctor, import-config, import-data."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import httpx

from indexer import logs
from indexer.cache import Cache, CacheAddress
from indexer.config import ConfigError, load_config
from indexer.normalize import InvalidAddress
from indexer.normalize import email as canonical_email
from indexer.redis_clients import configured_target
from indexer.redis_server import EmbeddedRedis, EmbeddedRedisError
from indexer.settings import Config
from indexer.status import host_bounds
from indexer.stores import build_store
from indexer.sync import SyncBusy, SyncResult, sync_store
from server import doctor
from server.migration import MigrationError
from server.migration import config as config_import
from server.migration import data as data_import
from server.notify import SendError
from server.notify.email import EmailSender
from server.runner import StartupError, hold_data_dir, run, wait_for_redis

EXIT_FAILED = 1
EXIT_CONFIG = 2


def _default_config() -> str:
    return os.environ.get("MXISD_CONFIG") or "config.yml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mxisd", description="Federated Matrix identity server")
    parser.add_argument("--version", action="version", version=f"mxisd {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    run_cmd = commands.add_parser("run", help="serve, with the indexer and (by default) an embedded Redis")
    run_cmd.add_argument("--config", default=None, help="config file (default: $MXISD_CONFIG, then ./config.yml)")
    index_cmd = commands.add_parser("index", help="sync stores into the cache now, showing progress")
    index_cmd.add_argument("--config", default=None, help="config file (default: $MXISD_CONFIG, then ./config.yml)")
    index_cmd.add_argument("--store", help="only this store (default: every store)")
    index_cmd.add_argument("--full", action="store_true",
                           help="enumerate the whole store (default: only what changed, where the store can tell)")
    status_cmd = commands.add_parser("status", help="show every store's size, last syncs and next runs")
    status_cmd.add_argument("--config", default=None, help="config file (default: $MXISD_CONFIG, then ./config.yml)")
    check_cmd = commands.add_parser("check-config", help="validate a config file without starting anything")
    check_cmd.add_argument("file")
    email_cmd = commands.add_parser("test-email", help="send a test email with the configured settings")
    email_cmd.add_argument("address")
    email_cmd.add_argument("--config", default=None, help="config file (default: $MXISD_CONFIG, then ./config.yml)")
    doctor_cmd = commands.add_parser("doctor", help="check everything the config points at, one line per check")
    doctor_cmd.add_argument("--config", default=None, help="config file (default: $MXISD_CONFIG, then ./config.yml)")
    doctor_cmd.add_argument("--timeout", type=float, default=20.0, help="seconds each check may take (default: 20)")
    import_config = commands.add_parser("import-config", help="write a config equivalent to a Java mxisd or ma1sd "
                                        "one, listing what cannot be carried over")
    import_config.add_argument("file", help="the mxisd.yaml or ma1sd.yaml")
    import_config.add_argument("-o", "--output", help="where to write our config (default: standard output)")
    import_config.add_argument("--data-dir", default="/var/lib/mxisd",
                               help="data_dir of the new config (default: /var/lib/mxisd)")
    import_data = commands.add_parser("import-data", help="take over a Java mxisd's or ma1sd's signing key, pending "
                                      "invites, v2 accounts, accepted terms and open validation sessions")
    import_data.add_argument("old", nargs="?", help="the mxisd.yaml or ma1sd.yaml naming its key.path and database")
    import_data.add_argument("--config", default=None,
                             help="our config file (default: $MXISD_CONFIG, then ./config.yml)")
    import_data.add_argument("--key", help="mxisd's key.path (default: the old config's)")
    import_data.add_argument("--database", help="mxisd's database: a SQLite file or a postgresql:// URL "
                             "(default: the old config's)")
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("mxisd")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed: run from a checkout)"


class TerminalProgress:
    """A progress line (a bar when the total is known) rewritten in place on a terminal; silent when
    output is not a terminal."""

    BAR = 30

    def __init__(self, store: str, stream: TextIO) -> None:
        self.store = store
        self.stream = stream
        self.live = stream.isatty()
        self.started = time.monotonic()
        self.last = 0.0

    def __call__(self, read: int, applied: int, total: int | None = None) -> None:
        now = time.monotonic()
        if self.live and now - self.last >= 0.1:
            self.last = now
            rate = read / max(now - self.started, 1e-6)
            bar = ""
            if total:
                filled = min(self.BAR, self.BAR * read // total)
                bar = f"[{'#' * filled}{'.' * (self.BAR - filled)}] {min(100, 100 * read // total):3d}% "
            self.stream.write(f"\r{self.store}: {bar}{read} entries read, {applied} written ({rate:.0f}/s)   ")
            self.stream.flush()

    def done(self, result: SyncResult) -> None:
        if self.live:
            self.stream.write("\r\033[K")
        took = (result.ended or time.time()) - result.started
        line = (f"{result.store}: {result.kind} sync {result.outcome} in {took:.1f} s: read {result.read}, "
                f"added {result.added}, changed {result.changed}, removed {result.removed}")
        if result.error:
            line += f"\n{result.store}: {result.error}"
        self.stream.write(line + "\n")
        self.stream.flush()


@contextlib.contextmanager
def _open_cache(config: Config) -> Iterator[Cache]:
    """The configured cache; with the embedded Redis, the running server's, or one started for now."""
    target, embedded, lock = configured_target(config.redis), None, None
    if target is None:
        candidate = EmbeddedRedis(config.data_dir)
        target = candidate.url
        try:
            lock = hold_data_dir(config.data_dir)
        except StartupError:
            # A running server owns the embedded Redis: use it.
            if not candidate.answering():
                raise StartupError(f"the server holding {config.data_dir} has no Redis answering") from None
        else:
            candidate.start()
            embedded = candidate
    try:
        address = CacheAddress.configured(config.redis, target)
        cache = Cache(wait_for_redis(target, config.redis.timeout), address.prefix, address.spread, address=address)
        cache.initialize()
        yield cache
    finally:
        if embedded is not None:
            embedded.stop()
        if lock is not None:
            lock.close()


class AdminRefused(Exception):
    """The running server's admin API answered, but not with what was asked."""


def _admin_client(config: Config) -> httpx.Client | None:
    """A client of the running server's admin API, when a token is configured and a server answers
    at the configured address; AdminRefused when it answers with an error (such as a wrong token)."""
    token = config.admin.token
    if not token:
        return None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(config.server.bind, config.server.bind)
    if ":" in host:
        host = f"[{host}]"
    client = httpx.Client(base_url=f"http://{host}:{config.server.port}/_mxisd/admin/v1",
                          headers={"Authorization": f"Bearer {token}"}, timeout=30)
    try:
        answer = client.get("/stores")
    except httpx.TransportError:
        client.close()
        return None
    if answer.status_code != 200:
        client.close()
        raise AdminRefused(f"the server at {client.base_url} refused the admin API call: "
                           f"{answer.status_code} {_error_text(answer)}")
    return client


def _error_text(answer: httpx.Response) -> str:
    try:
        body = answer.json()
        return f"{body['errcode']}: {body['error']}"
    except (ValueError, KeyError, TypeError):
        return answer.reason_phrase


def _index_via_api(client: httpx.Client, names: list[str], full: bool) -> int:
    """Start a sync job per store in the running server's indexer and follow each to its end."""
    status = 0
    for name in names:
        progress = TerminalProgress(name, sys.stderr)
        started = client.post(f"/stores/{name}/sync", json={"full": full}).raise_for_status().json()
        job = started["job"]
        if not started["created"]:
            print(f"{name}: a sync of this store is already {job['state']} (job {job['id']}): following it",
                  file=sys.stderr)
        while job["state"] != "done":
            progress(job["read"], job["applied"], job["total"])
            time.sleep(0.2)
            answer = client.get(f"/jobs/{job['id']}")
            if answer.status_code == 404:
                print(f"mxisd: sync job {job['id']} of store {name} vanished (its indexer stopped?)", file=sys.stderr)
                return EXIT_FAILED
            job = answer.raise_for_status().json()
        if job["result"] is None:
            print(f"{name}: sync failed: {job['error']}", file=sys.stderr)
            status = EXIT_FAILED
            continue
        progress.done(SyncResult(**job["result"]))
        if job["outcome"] != "ok":
            status = EXIT_FAILED
    return status


def _index(config: Config, only: str | None, full: bool) -> int:
    names = [s.name for s in config.stores]
    if only is not None and only not in names:
        print(f"mxisd: no store named {only!r}; configured stores: {', '.join(names)}", file=sys.stderr)
        return EXIT_CONFIG
    wanted = [only] if only is not None else names
    try:
        client = _admin_client(config)
    except AdminRefused as exc:
        print(f"mxisd: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if client is not None:
        # The server's indexer owns the sync lock: let it do the work and follow it.
        try:
            return _index_via_api(client, wanted, full)
        except httpx.HTTPError as exc:
            print(f"mxisd: the server's admin API failed: {exc}", file=sys.stderr)
            return EXIT_FAILED
        finally:
            client.close()
    with _open_cache(config) as cache:
        status = 0
        for settings in config.stores:
            if settings.name not in wanted:
                continue
            store = build_store(settings, config)
            if not store.enumerable:
                store.close()
                print(f"{store.name}: not synced: it cannot be enumerated, lookups ask it on cache misses")
                continue
            progress = TerminalProgress(store.name, sys.stderr)
            try:
                result = sync_store(cache, store, settings.sync, full, progress, wait_for_lock=600)
            except SyncBusy as exc:
                print(f"mxisd: {exc}; gave up after waiting 10 minutes", file=sys.stderr)
                status = EXIT_FAILED
                continue
            finally:
                store.close()
            progress.done(result)
            if result.outcome != "ok":
                status = EXIT_FAILED
        return status


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _last(sync: dict[str, Any] | None) -> str:
    if not sync:
        return "never"
    took = (sync["ended"] or time.time()) - sync["started"]
    text = (f"{sync['outcome']} {_when(sync['started'])} ({took:.1f} s) "
            f"+{sync['added']} ~{sync['changed']} -{sync['removed']}")
    return text + (f": {sync['error']}" if sync.get("error") else "")


def _status(config: Config) -> int:
    """Print the stores table, then each host's fulltext follower and indexer."""
    with _open_cache(config) as cache:
        state = cache.status([s.name for s in config.stores], host_bounds(config))
    rows = [("STORE", "KIND", "IDENTITIES", "LAST FULL SYNC", "LAST INCREMENTAL", "NEXT FULL", "JOB")]
    for settings in config.stores:
        s = state["stores"][settings.name]
        job = s["job"]
        rows.append((settings.name, settings.kind, str(s["identities"]), _last(s["last_full"]),
                     _last(s["last_incremental"]), _when(s["next_full"]),
                     f"{job['state']} {job['id']} ({job['read']} read)" if job else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    followers = {f["host"]: f for f in state["followers"]}
    for host in state["hosts"]:
        follower = followers.get(host["host"])
        if host["stale"]:
            print(f"host {host['host']}: STALE: last reported {time.time() - host['last_seen']:.0f} s ago "
                  f"(at {_when(host['last_seen'])})")
        if follower:
            print(f"fulltext index on {follower['host']}: {follower['lag_seconds']:.1f} s behind the cache")
    for indexer in state["indexers"]:
        print(_indexer_line(indexer))
    return 0


def _indexer_line(indexer: dict[str, Any]) -> str:
    """Whether a host's indexer runs (its heartbeat is recent), and how it last ended."""
    last_exit = indexer["last_exit"]
    ended = f"{last_exit['reason']} at {_when(last_exit['at'])}" if last_exit else None
    if indexer["alive"]:
        line = (f"indexer on {indexer['host']}: running (pid {indexer['pid']}, since {_when(indexer['started'])}, "
                f"heartbeat {time.time() - indexer['beat']:.0f} s ago)")
        if indexer.get("follower_pid"):  # an indexer of an older version does not say
            line += f"; its fulltext follower: pid {indexer['follower_pid']}"
            if restarts := indexer.get("follower_restarts"):
                line += (f", started again {restarts} time{'s' if restarts > 1 else ''} "
                         f"(the follower before it {indexer['follower_last_exit']})")
        return line + (f"; before that it {ended}" if ended else "")
    if ended:
        return f"indexer on {indexer['host']}: NOT RUNNING: it {ended}; mxisd run starts it again"
    return f"indexer on {indexer['host']}: NOT RUNNING: no recent heartbeat"


def _test_email(config: Config, address: str) -> int:
    if config.email is None:
        print("mxisd: the config has no email section: nothing to test", file=sys.stderr)
        return EXIT_CONFIG
    try:
        recipient = canonical_email(address)
    except InvalidAddress as exc:
        print(f"mxisd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    sender = EmailSender(config.email, config.matrix.domain)
    try:
        asyncio.run(sender.send("test", recipient, {}))
    except SendError as exc:
        print(f"mxisd: test email to {recipient} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"test email sent to {recipient}")
    return 0


def _import_config(args: argparse.Namespace) -> int:
    try:
        converted, old, flavour = config_import.convert(args.file, args.data_dir)
    except MigrationError as exc:
        print(f"mxisd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for key, reason in sorted(old.notes.items()):
        print(f"{args.file}: {key}: {reason}", file=sys.stderr)
    text = config_import.render(converted, old, Path(args.file), flavour)
    with tempfile.TemporaryDirectory() as scratch:
        target = Path(args.output) if args.output else Path(scratch) / "config.yml"
        target.write_text(text, encoding="utf-8")
        try:
            load_config(target)
        except ConfigError as exc:
            print(f"mxisd: the imported config does not pass check-config: {exc}", file=sys.stderr)
            return EXIT_FAILED
    if not args.output:
        sys.stdout.write(text)
    return 0


def _import_data(args: argparse.Namespace, config: Config) -> int:
    key, database = args.key, args.database
    if database and "://" not in database:
        database = f"sqlite:///{Path(database).resolve()}"
    try:
        if args.old:
            data, base = config_import.read_old_config(args.old)
            key = key or data_import.old_key_path(data, base)
            database = database or data_import.old_database_url(data, base)
        if not key and not database:
            print("mxisd: nothing to import: give the old config, --key or --database", file=sys.stderr)
            return EXIT_CONFIG
        report = data_import.import_data(config, Path(key) if key else None, database)
    except MigrationError as exc:
        print(f"mxisd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for line in report.lines():
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "import-config":
        return _import_config(args)
    path = args.file if args.command == "check-config" else (args.config or _default_config())
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"mxisd: invalid config {path}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        print(f"{path}: ok ({len(config.stores)} store(s))")
        return 0
    # The doctor's lines are its output; of the log, only warnings (such as entries a store skips).
    logs.setup("WARNING" if args.command == "doctor" else config.log_level, args.command, config.log_format)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per admin API call
    try:
        if args.command == "run":
            run(config, path)
            return 0
        if args.command == "status":
            return _status(config)
        if args.command == "doctor":
            return doctor.run(config, sys.stdout, args.timeout)
        if args.command == "test-email":
            return _test_email(config, args.address)
        if args.command == "import-data":
            return _import_data(args, config)
        return _index(config, args.store, args.full)
    except (StartupError, EmbeddedRedisError) as exc:
        print(f"mxisd: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ConfigError as exc:  # the cache in Redis does not fit the config (Cache.initialize)
        print(f"mxisd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
