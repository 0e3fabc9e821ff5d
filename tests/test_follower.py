"""The fulltext follower against a real Redis: catch-up, restarts, and rebuilds from the cache alone."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
import whoosh.index
import yaml

import indexer.follower as follower_module
from indexer.cache import Cache
from indexer.follower import Follower, FollowerProcess
from indexer.fulltext import FullText
from indexer.status import HostBounds
from indexer.sync import full_sync
from server.services.directory_search import DirectorySearch, HideRules
from tests.conftest import make_store, search_mxids, typed_config, wait_until

CONFIG = {"matrix": {"domain": "example.org"}, "threepids": {"msisdn": {"default_region": None}}}


def sync(cache, path, people):
    path.write_text(yaml.safe_dump(people))
    store = make_store({"name": "hr", "kind": "file", "path": str(path)}, CONFIG)
    assert full_sync(cache, store, 1.0).outcome == "ok"


def names(index: FullText, text: str) -> list[str]:
    return sorted(search_mxids(index.path, text))


def test_follower_catches_up_resumes_and_rebuilds(rclient, prefix, tmp_path, caplog):
    caplog.set_level("INFO")
    cache = Cache(rclient, prefix)
    cache.initialize()
    people = tmp_path / "people.yml"
    sync(cache, people, [{"localpart": "alice", "display_name": "Alice Liddell"},
                         {"localpart": "bob", "display_name": "Bob Builder"}])
    index = FullText(tmp_path / "fulltext")
    follower = Follower(cache, index, ["hr"], "host-a")
    follower.start()
    assert "because the index is missing: 2 identities" in caplog.text
    assert names(index, "builder") == ["@bob:example.org"]

    sync(cache, people, [{"localpart": "alice", "display_name": "Alice Kingsleigh"},
                         {"localpart": "carol", "display_name": "Carol Danvers"}])
    while follower.step(block_ms=None):
        pass
    assert names(index, "kingsleigh") == ["@alice:example.org"]
    assert names(index, "liddell") == [] and names(index, "builder") == []
    assert names(index, "danvers") == ["@carol:example.org"]

    # A new follower on the same index resumes from the saved position instead of rebuilding.
    caplog.clear()
    again = Follower(cache, index, ["hr"], "host-a")
    again.start()
    assert "following changes after" in caplog.text and "rebuilt" not in caplog.text
    assert again.last_id == follower.last_id

    # The cache emptied and refilled (a new epoch): the index is rebuilt, not patched.
    keys = list(rclient.scan_iter(match=f"{prefix}*"))
    rclient.delete(*keys)
    cache.initialize()
    sync(cache, people, [{"localpart": "dave", "display_name": "Dave Lister"}])
    caplog.clear()
    again.step(block_ms=None)
    assert "rebuilt from the cache because the index was built from another cache: 1 identities" in caplog.text
    assert index.count() == 1 and names(index, "lister") == ["@dave:example.org"]


def test_an_index_of_another_schema_version_is_rebuilt(rclient, prefix, tmp_path, caplog):
    caplog.set_level("INFO")
    cache = Cache(rclient, prefix)
    cache.initialize()
    sync(cache, tmp_path / "people.yml", [{"localpart": "alice", "display_name": "Alice Liddell"}])
    index = FullText(tmp_path / "fulltext")
    Follower(cache, index, ["hr"], "host-a").start()
    position = index.path / "position.json"
    written = json.loads(position.read_text())
    position.write_text(json.dumps({**written, "schema": written["schema"] - 1}))  # as an older version left it
    caplog.clear()
    Follower(cache, index, ["hr"], "host-a").start()
    assert "rebuilt from the cache because the index was built with another schema: 1 identities" in caplog.text
    assert search_mxids(index.path, "lidd") == ["@alice:example.org"]


def test_addresses_are_indexed_only_when_searches_may_use_them(rclient, prefix, tmp_path, caplog):
    caplog.set_level("INFO")
    cache = Cache(rclient, prefix)
    cache.initialize()
    sync(cache, tmp_path / "people.yml", [{"localpart": "alice", "display_name": "Alice Liddell",
                                           "emails": ["wonder@corp.example"]}])

    def by_address() -> list[str]:
        search = DirectorySearch(tmp_path / "fulltext", HideRules([]), threepids=True)
        try:
            return [hit.mxid for hit in search.search("wonder", 10)[0]]
        finally:
            search.close()

    Follower(cache, FullText(tmp_path / "fulltext", threepids=False), ["hr"], "host-a").start()
    assert by_address() == [] and search_mxids(tmp_path / "fulltext", "alice") == ["@alice:example.org"]
    caplog.clear()
    Follower(cache, FullText(tmp_path / "fulltext", threepids=True), ["hr"], "host-a").start()
    assert "rebuilt from the cache because directory.threepids changed: 1 identities" in caplog.text
    assert by_address() == ["@alice:example.org"]


def test_many_small_batches_are_consolidated_when_the_stream_is_quiet(rclient, prefix, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(follower_module, "CONSOLIDATE_AFTER", 3)
    caplog.set_level("INFO")
    cache = Cache(rclient, prefix)
    cache.initialize()
    people = tmp_path / "people.yml"
    index = FullText(tmp_path / "fulltext")
    follower = Follower(cache, index, ["hr"], "host-a")
    follower.start()
    everyone: list[dict] = []
    for name in ("Alice Liddell", "Bob Builder", "Carol Danvers"):
        everyone.append({"localpart": name.split()[0].lower(), "display_name": name})
        sync(cache, people, everyone)
        follower.step(block_ms=None)  # one batch, one segment each
    assert len(index_segments(index)) == 3
    caplog.clear()
    assert follower.step(block_ms=None) == 0
    assert "because 3 changes were applied batch by batch" in caplog.text
    assert len(index_segments(index)) == 1
    assert search_mxids(index.path, "danvers") == ["@carol:example.org"]


def index_segments(index: FullText) -> list:
    return whoosh.index.open_dir(str(index.path)).reader().leaf_readers()


def process_setup(redis_url, rclient, prefix, tmp_path):
    """(the file store's path, a config of it for a follower process on this test's Redis, the cache)."""
    people = tmp_path / "people.yml"
    config = typed_config([{"name": "hr", "kind": "file", "path": str(people)}], data_dir=str(tmp_path),
                          server={"host_id": "host-a"}, redis={"url": redis_url, "prefix": prefix}, **CONFIG)
    cache = Cache(rclient, prefix)
    cache.initialize()
    return people, config, cache


def test_the_follower_process_follows_a_sync_and_is_started_again_when_killed(redis_url, rclient, prefix, tmp_path,
                                                                              caplog):
    caplog.set_level("INFO")
    people, config, cache = process_setup(redis_url, rclient, prefix, tmp_path)
    index = FullText(tmp_path / "fulltext")

    def follower_position() -> str | None:
        reported = cache.status(["hr"], HostBounds(60, 3600))["followers"]
        return reported[0]["last_id"] if reported else None

    follower = FollowerProcess(config, redis_url)
    follower.start()
    try:
        first = follower.pid
        assert first is not None and first != os.getpid()
        sync(cache, people, [{"localpart": "alice", "display_name": "Alice Liddell"}])
        # The process reads the change stream and the records from Redis itself, and reports where it is.
        wait_until(lambda: follower_position() == cache.last_change_id(), what="the follower to report the sync")
        assert names(index, "liddell") == ["@alice:example.org"]

        follower.revive()  # a live follower is left alone
        assert follower.pid == first and follower.restarts == 0

        os.kill(first, signal.SIGKILL)
        wait_until(lambda: follower.pid is None, what="the killed follower to be seen dead")
        follower.revive()
        assert follower.restarts == 1 and follower.last_exit == "was killed by SIGKILL"
        assert f"fulltext follower (pid {first}) was killed by SIGKILL; starting it again (1 restarts so far)" \
            in caplog.text
        second = follower.pid
        assert second is not None and second != first

        # The new process resumes where the index is, and follows the next sync.
        sync(cache, people, [{"localpart": "alice", "display_name": "Alice Kingsleigh"},
                             {"localpart": "bob", "display_name": "Bob Builder"}])
        wait_until(lambda: follower_position() == cache.last_change_id(), what="the new follower to catch up")
        assert names(index, "kingsleigh") == ["@alice:example.org"] and names(index, "liddell") == []
        assert names(index, "builder") == ["@bob:example.org"]
    finally:
        follower.stop()
    assert follower.pid is None
    follower.revive()  # a stopped follower is not started again
    assert follower.pid is None and follower.restarts == 1


def test_a_follower_process_that_shows_no_progress_is_killed_and_started_again(redis_url, rclient, prefix, tmp_path,
                                                                              caplog):
    caplog.set_level("INFO")
    people, config, cache = process_setup(redis_url, rclient, prefix, tmp_path)
    # A following process shows progress at least once a second, while it waits for changes.
    follower = FollowerProcess(config, redis_url, stuck_after=3.0)
    follower.start()
    try:
        first = follower.pid
        assert first is not None
        wait_until(lambda: cache.status(["hr"], HostBounds(60, 3600))["followers"], what="the follower to start")
        time.sleep(4)
        follower.revive()  # a quiet stream is not being stuck
        assert follower.pid == first and follower.restarts == 0

        os.kill(first, signal.SIGSTOP)  # alive, but as a hung write: no progress
        time.sleep(3.5)
        follower.revive()
        assert follower.restarts == 1 and follower.last_exit is not None
        assert re.fullmatch(r"showed no progress for \d+ s and was killed", follower.last_exit)
        assert f"fulltext follower (pid {first}) showed no progress for " in caplog.text
        second = follower.pid
        assert second is not None and second != first
        with pytest.raises(ProcessLookupError):
            os.kill(first, 0)  # the stuck process is gone, not left behind

        # The new process follows the next sync.
        sync(cache, people, [{"localpart": "alice", "display_name": "Alice Liddell"}])
        reported = lambda: cache.status(["hr"], HostBounds(60, 3600))["followers"][0]["last_id"]  # noqa: E731
        wait_until(lambda: reported() == cache.last_change_id(), what="the new follower to follow the sync")
        assert names(FullText(tmp_path / "fulltext"), "liddell") == ["@alice:example.org"]
    finally:
        follower.stop()
