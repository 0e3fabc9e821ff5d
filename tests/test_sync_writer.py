"""A large full sync's batches written by a process of its own (indexer.sync_writer), into a real
Redis: the same cache as a sync written in one process, and failures of that process fail the sync
without harm."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator

import pytest

from indexer import logs
from indexer.cache import Cache, CacheAddress
from indexer.identity import Identity
from indexer.settings import Config, StoreConfig
from indexer.stores import Store
from indexer.sync import full_sync
from indexer.sync_writer import HANDOVER_AFTER
from tests.conftest import cached_all, store_settings

CONFIG = {"matrix": {"domain": "example.org"}, "threepids": {"msisdn": {"default_region": "GB"}}}
HR = {"name": "hr", "kind": "file", "path": "/dev/null"}  # the settings of the test's own Store classes
PEOPLE = HANDOVER_AFTER + 6000
HANDED_OVER = "are written by process"


class Directory(Store):
    """PEOPLE people (the same every time, but for the first `renamed`), each with two addresses and
    a phone; with `handed_over`, it is read slowly past HANDOVER_AFTER until the sync has handed its
    writes over (as a real directory, read over the network), and calls `meanwhile` once it has."""

    kind = "test"

    def __init__(self, settings: StoreConfig, config: Config, renamed: int = 0,
                 handed_over: Callable[[], bool] | None = None, meanwhile: Callable[[], None] = lambda: None) -> None:
        super().__init__(settings, config)
        self.renamed = renamed
        self.handed_over = handed_over
        self.meanwhile = meanwhile
        self.met = False

    def enumerate(self) -> Iterator[Identity]:
        for i in range(PEOPLE):
            if self.handed_over is not None and i >= HANDOVER_AFTER and not self.met:
                # Slowly (the sync looks for its writer between batches) until it has handed over.
                if self.handed_over():
                    self.met = True
                    self.meanwhile()
                else:
                    assert i < PEOPLE - 500, "the sync never handed its writes over"
                    time.sleep(0.002)
            name = f"Person {i}" + (" Renamed" if i < self.renamed else "")
            # Every three people share a team address: claims held by several records.
            identity = self.build_identity(f"p{i}", f"p{i}", name, [
                ("email", f"p{i}@example.org"), ("email", f"team{i // 3}@example.org"),
                ("msisdn", f"+44 7700 9{i:05d}")],
                locator=f"uid=p{i},ou=people,dc=example,dc=org")
            assert identity is not None
            yield identity


def handed_over_in(caplog: pytest.LogCaptureFixture) -> Callable[[], bool]:
    return lambda: any(HANDED_OVER in r.getMessage() for r in caplog.records)


@pytest.fixture(autouse=True)
def fresh_repeated_logs(monkeypatch):
    """Sync failures are logged once a minute per store and kind: an earlier test's failure of store
    hr would keep this test's line out of the log."""
    monkeypatch.setattr(logs, "repeated", logs.Repeated())


@pytest.fixture
def writing_cache(rclient, redis_url, prefix) -> Cache:
    """The test's cache, with the address a writer process opens it at."""
    spread = int(os.environ.get("MXISD_TEST_BUCKETS", "1"))
    cache = Cache(rclient, prefix, spread, address=CacheAddress(redis_url, 5.0, prefix, spread))
    cache.initialize(pepper="pepper")
    return cache


def contents(cache: Cache) -> dict[str, object]:
    """Every store hash of the cache, and the change stream's (store_id, op) in order."""
    k = cache.k
    hashes = {name: cached_all(cache, key_of, "hr") for name, key_of in (
        ("records", k.records), ("content_hashes", k.content_hashes), ("locators", k.locators),
        ("3pid", k.threepids), ("sha256", k.hashes), ("mxids", k.mxids), ("claims", k.claims))}
    generations = {}
    for bucket in range(k.spread("hr")):
        generations.update(cache.r.zrange(k.generations("hr", bucket), 0, -1, withscores=True))
    changes = [(c.store_id, c.op) for c in cache.read_changes("0-0", 100_000, None)]
    return {**hashes, "generations": generations, "changes": changes}


def test_a_handed_over_sync_writes_what_one_process_writes(writing_cache, rclient, caplog):
    caplog.set_level(logging.INFO)
    alone = Cache(rclient, writing_cache.k.prefix + "alone:", writing_cache.k.spread("hr"))
    alone.initialize(pepper="pepper")
    try:
        for renamed in (0, PEOPLE - 100):  # a first sync, then one that changes all but the last 100
            caplog.clear()
            result = full_sync(writing_cache, Directory(*store_settings(HR, CONFIG), renamed,
                                                        handed_over_in(caplog)), 0.2)
            assert result.outcome == "ok", result.error
            assert handed_over_in(caplog)()
            expected = full_sync(alone, Directory(*store_settings(HR, CONFIG), renamed), 0.2)
            assert expected.outcome == "ok"
            assert result.as_dict() | {"started": 0, "ended": 0} == expected.as_dict() | {"started": 0, "ended": 0}
            assert contents(writing_cache) == contents(alone)
        assert writing_cache.mxid_of("hr", "email", "team0@example.org") == "@p2:example.org"
        assert writing_cache.mxid_of("hr", "msisdn", "447700900042") == "@p42:example.org"
        assert multiprocessing.active_children() == []
    finally:
        alone.r.delete(*alone.r.scan_iter(match=f"{alone.k.prefix}*"))


def test_a_small_sync_starts_no_writer_process(writing_cache, caplog):
    caplog.set_level(logging.INFO)

    class Few(Directory):
        def enumerate(self) -> Iterator[Identity]:
            for n, identity in enumerate(super().enumerate()):
                if n == HANDOVER_AFTER - 1:
                    assert multiprocessing.active_children() == []
                    return
                yield identity

    assert full_sync(writing_cache, Few(*store_settings(HR, CONFIG)), 0.2).outcome == "ok"
    assert HANDED_OVER not in caplog.text
    assert writing_cache.count("hr") == HANDOVER_AFTER - 1


def writer_process() -> multiprocessing.process.BaseProcess:
    [process] = [p for p in multiprocessing.active_children() if p.name == "sync-writer-hr"]
    return process


def test_a_killed_writer_fails_the_sync_and_the_next_one_completes_it(writing_cache, caplog):
    caplog.set_level(logging.INFO)
    killed = []

    def kill() -> None:
        process = writer_process()
        os.kill(process.pid, signal.SIGKILL)
        killed.append(process.pid)

    result = full_sync(writing_cache, Directory(*store_settings(HR, CONFIG), 0, handed_over_in(caplog), kill), 0.2)
    assert result.outcome == "failed"
    assert result.error == f"the sync's writer process (pid {killed[0]}) was killed by SIGKILL"
    assert "hr: full sync failed: the sync's writer process" in caplog.text
    assert multiprocessing.active_children() == []
    assert writing_cache.incomplete_stores(["hr"]) == ["hr"]
    assert full_sync(writing_cache, Directory(*store_settings(HR, CONFIG)), 0.2).outcome == "ok"
    assert writing_cache.count("hr") == PEOPLE and writing_cache.incomplete_stores(["hr"]) == []


def test_a_redis_failure_in_the_writer_fails_the_sync_as_a_redis_failure(writing_cache, caplog):
    caplog.set_level(logging.INFO)

    def lose_pepper() -> None:  # the writer reads the pepper for every batch
        writing_cache.r.delete(writing_cache.k.pepper)

    result = full_sync(writing_cache, Directory(*store_settings(HR, CONFIG), 0, handed_over_in(caplog),
                                                lose_pepper), 0.2)
    assert (result.outcome, result.error) == ("failed", "redis: the cache has no lookup pepper: it was emptied "
                                                        "while running")
    assert "full sync failed on Redis" in caplog.text
    assert multiprocessing.active_children() == []


def test_a_sync_stopped_midway_stops_its_writer(writing_cache, caplog):
    caplog.set_level(logging.INFO)

    class Stop(Exception):
        pass

    def progress(read: int, applied: int) -> None:
        if read >= HANDOVER_AFTER + 2000:
            raise Stop()

    result = full_sync(writing_cache, Directory(*store_settings(HR, CONFIG), 0, handed_over_in(caplog)), 0.2, progress)
    assert (result.outcome, result.error) == ("failed", "Stop: ")
    assert multiprocessing.active_children() == []
