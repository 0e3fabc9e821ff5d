"""The `mxisd` command: run, index, check-config, test-email."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any, TextIO

from indexer.cache import Cache
from indexer.config import ConfigError, load_config
from indexer.normalize import InvalidAddress
from indexer.normalize import email as canonical_email
from indexer.redis_server import EmbeddedRedis, EmbeddedRedisError
from indexer.stores import build_store
from indexer.sync import SyncBusy, SyncResult, full_sync, incremental_sync
from server.notify import SendError
from server.notify.email import EmailSender
from server.runner import StartupError, hold_data_dir, run, setup_logging, wait_for_redis

EXIT_FAILED = 1
EXIT_CONFIG = 2


def _default_config() -> str:
    return os.environ.get("MXISD_CONFIG") or "config.yml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mxisd", description="Federated Matrix identity server")
    commands = parser.add_subparsers(dest="command", required=True)
    run_cmd = commands.add_parser("run", help="serve, with the indexer and (by default) an embedded Redis")
    run_cmd.add_argument("--config", default=None, help="config file (default: $MXISD_CONFIG, then ./config.yml)")
    index_cmd = commands.add_parser("index", help="sync stores into the cache now, showing progress")
    index_cmd.add_argument("--config", default=None, help="config file (default: $MXISD_CONFIG, then ./config.yml)")
    index_cmd.add_argument("--store", help="only this store (default: every store)")
    index_cmd.add_argument("--full", action="store_true",
                           help="enumerate the whole store (default: only what changed, where the store can tell)")
    check_cmd = commands.add_parser("check-config", help="validate a config file without starting anything")
    check_cmd.add_argument("file")
    email_cmd = commands.add_parser("test-email", help="send a test email with the configured settings")
    email_cmd.add_argument("address")
    email_cmd.add_argument("--config", default=None, help="config file (default: $MXISD_CONFIG, then ./config.yml)")
    return parser


class TerminalProgress:
    """A progress line rewritten in place on a terminal; silent when output is not a terminal."""

    def __init__(self, store: str, stream: TextIO) -> None:
        self.store = store
        self.stream = stream
        self.live = stream.isatty()
        self.started = time.monotonic()
        self.last = 0.0

    def __call__(self, read: int, applied: int) -> None:
        now = time.monotonic()
        if self.live and now - self.last >= 0.1:
            self.last = now
            rate = read / max(now - self.started, 1e-6)
            self.stream.write(f"\r{self.store}: {read} entries read, {applied} written ({rate:.0f}/s)   ")
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


def _index(config: dict[str, Any], only: str | None, full: bool) -> int:
    names = [s["name"] for s in config["stores"]]
    if only is not None and only not in names:
        print(f"mxisd: no store named {only!r}; configured stores: {', '.join(names)}", file=sys.stderr)
        return EXIT_CONFIG
    url, embedded, lock = config["redis"]["url"], None, None
    if not url:
        candidate = EmbeddedRedis(config["data_dir"])
        url = candidate.url
        try:
            lock = hold_data_dir(config["data_dir"])
        except StartupError:
            # A running server owns the embedded Redis: sync into it.
            if not candidate.answering():
                raise StartupError(f"the server holding {config['data_dir']} has no Redis answering") from None
        else:
            candidate.start()
            embedded = candidate
    try:
        cache = Cache(wait_for_redis(url), config["redis"]["prefix"])
        cache.initialize()
        status = 0
        for store_config in config["stores"]:
            if only is not None and store_config["name"] != only:
                continue
            store = build_store(store_config, config)
            progress = TerminalProgress(store.name, sys.stderr)
            try:
                result = None if full else incremental_sync(cache, store, progress, wait_for_lock=600)
                if result is None:
                    result = full_sync(cache, store, store_config["sync"]["max_delete_ratio"], progress,
                                       wait_for_lock=600)
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
    finally:
        if embedded is not None:
            embedded.stop()
        if lock is not None:
            lock.close()


def _test_email(config: dict[str, Any], address: str) -> int:
    if "email" not in config:
        print("mxisd: the config has no email section: nothing to test", file=sys.stderr)
        return EXIT_CONFIG
    try:
        recipient = canonical_email(address)
    except InvalidAddress as exc:
        print(f"mxisd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    sender = EmailSender(config["email"], config["matrix"]["domain"])
    try:
        asyncio.run(sender.send("test", recipient, {}))
    except SendError as exc:
        print(f"mxisd: test email to {recipient} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"test email sent to {recipient}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    path = args.file if args.command == "check-config" else (args.config or _default_config())
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"mxisd: invalid config {path}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        print(f"{path}: ok ({len(config['stores'])} store(s))")
        return 0
    setup_logging(config["log_level"])
    try:
        if args.command == "run":
            run(config)
            return 0
        if args.command == "test-email":
            return _test_email(config, args.address)
        return _index(config, args.store, args.full)
    except (StartupError, EmbeddedRedisError) as exc:
        print(f"mxisd: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
