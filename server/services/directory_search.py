"""Directory search for the HTTP server: the hide rules, and searches on one index reader kept open
between requests. Blocking; run in a thread, never on the event loop."""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from whoosh import index

from indexer.fulltext import POSITION_FILE
from indexer.identity import Identity
from indexer.settings import DirectoryHideConfig
from server.services.directory_ranking import WORD_FIELDS, Hit, IndexNotReady, NotKept, OpenIndex, capped, ranked

log = logging.getLogger(__name__)

# The longest a search waits for the first index to be opened (its terms read) before answering 503.
OPEN_WAIT = 60.0
# The longest the opening of a changed index pauses at a time for searches on the one before.
PAUSE_MOST = 0.05


class HideRules:
    """directory.hide from the config: a person matching every condition of any one rule is left out
    of search results. Conditions: store (a name), mxid, display_name, threepid ("medium:address"),
    each a regular expression that must match the whole value, case-insensitively."""

    def __init__(self, rules: Iterable[DirectoryHideConfig]) -> None:
        self.rules = [
            {k: (v if k == "store" else re.compile(v, re.IGNORECASE))
             for k in ("store", "mxid", "display_name", "threepid") if (v := getattr(rule, k)) is not None}
            for rule in rules
        ]

    def __bool__(self) -> bool:
        return bool(self.rules)

    def hides(self, store: str, mxid: str, display_name: str | None, threepids: Iterable[str]) -> bool:
        """Whether these values of one person match a rule."""
        values = {"mxid": [mxid], "display_name": [display_name or ""], "threepid": list(threepids)}
        for rule in self.rules:
            if all(
                store == condition if isinstance(condition, str) else any(condition.fullmatch(v) for v in values[key])
                for key, condition in rule.items()
            ):
                return True
        return False

    def hides_identity(self, identity: Identity) -> bool:
        return self.hides(identity.store, identity.mxid, identity.display_name,
                          [f"{m}:{a}" for m, a in identity.threepids])



def _search(opened: OpenIndex, text: str, threepids: bool, limit: int, hide: HideRules) -> tuple[list[Hit], bool]:
    """The best limit visible hits for a search term, and whether there were more."""
    hits: list[Hit] = []
    for docnum in ranked(opened, text, threepids):
        hit, hit_threepids = opened.person(docnum)
        if hide and hide.hides(hit.store, hit.mxid, hit.display_name, hit_threepids):
            continue
        hits.append(hit)
        if len(hits) > limit:
            return hits[:limit], True
    return hits, capped(opened, text, threepids)



class DirectorySearch:
    """Directory searches on one index kept open between requests (with what it has read). When the
    follower has moved the index on, the new index is opened and its terms read in a thread of its
    own, while searches go on in the one opened before; then it takes over. The first index is
    opened that way too, from the start (a search waits for it, at most OPEN_WAIT seconds; the
    server is not ready until then, see ready()).
    Reading the terms is Python code holding the interpreter lock, which a search would get only
    every switch interval (5 ms) and lose as often: the opening pauses while a search runs (a
    search of `u` took 49 ms beside it, 100,000 people with 3PIDs). Thread-safe: searches take
    turns on the open index."""

    def __init__(self, path: str | Path, hide: HideRules, threepids: bool) -> None:
        self.path = Path(path)
        self.hide = hide
        self.threepids = threepids
        self.fields = WORD_FIELDS if threepids else WORD_FIELDS[:1]
        self._lock = threading.Lock()
        self._opened: OpenIndex | None = None
        self._stamp: tuple[int, int] | None = None
        self._opening: threading.Thread | None = None
        self._searches = 0  # running now, which the opening waits for
        self._quiet = threading.Condition()
        self._open_soon()

    def _changed(self) -> tuple[int, int] | None:
        """The index's stamp when it differs from the open one's."""
        try:
            stat = os.stat(self.path / POSITION_FILE)
        except FileNotFoundError:
            return None  # not built yet, or the follower is swapping in a rebuilt index
        stamp = (stat.st_ino, stat.st_mtime_ns)
        return stamp if stamp != self._stamp else None

    def _open(self, stamp: tuple[int, int]) -> None:
        """Open the index as it is now and make it the one searched."""
        try:
            fresh = OpenIndex(index.open_dir(str(self.path)).reader(), self.fields, self._opened, self._pause)
        except (OSError, index.EmptyIndexError):
            return  # swapped meanwhile: the next search tries again
        except Exception as exc:  # in a thread of its own: said here, and the next search tries again
            log.warning("directory search: could not open the changed index at %s (%s: %s)", self.path,
                        type(exc).__name__, exc)
            return
        with self._lock:
            before, self._opened, self._stamp = self._opened, fresh, stamp
        if before is not None:
            before.close()

    def _pause(self) -> None:
        """In the opening thread: wait for the running searches (at most PAUSE_MOST seconds)."""
        with self._quiet:
            self._quiet.wait_for(lambda: self._searches == 0, PAUSE_MOST)

    @contextmanager
    def _searching(self) -> Iterator[None]:
        with self._quiet:
            self._searches += 1
        try:
            yield
        finally:
            with self._quiet:
                self._searches -= 1
                self._quiet.notify_all()

    def _open_soon(self) -> threading.Thread | None:
        """The thread opening the index as it is now, started unless one runs (None: no index yet)."""
        stamp = self._changed()
        if stamp is not None and (self._opening is None or not self._opening.is_alive()):
            self._opening = threading.Thread(target=self._open, args=(stamp,), name="search-open", daemon=True)
            self._opening.start()
        return self._opening if stamp is not None else None

    def ready(self, wait: float = 0.0) -> bool:
        """Whether an index is open for searches, its terms read (a search would not wait for the
        opening); starts opening the index as it is now when it changed, and waits for a first
        opening at most `wait` seconds (blocking: call it in a thread)."""
        opening = self._open_soon()
        if self._opened is None and opening is not None and wait > 0:
            opening.join(wait)
        return self._opened is not None

    def _current(self) -> OpenIndex:
        opening = self._open_soon()
        if self._opened is None and opening is not None:
            opening.join(OPEN_WAIT)
        if self._opened is None:
            raise IndexNotReady(f"no fulltext index at {self.path} yet")
        return self._opened

    def search(self, text: str, limit: int) -> tuple[list[Hit], bool]:
        """The best limit visible matches for a search term, and whether there were more."""
        opened = self._current()
        with self._searching(), self._lock:
            return _search(self._opened or opened, text, self.threepids, limit, self.hide)

    def search_kept(self, text: str, limit: int) -> tuple[list[Hit], bool] | None:
        """search(text, limit) when the open index has kept every match it needs and no other
        search runs (a few set operations, and at most a page of people read: fit for the event
        loop, which a thread hand-off would cost more than the search); None when not."""
        self._open_soon()
        opened = self._opened
        if opened is None or not self._lock.acquire(blocking=False):
            return None
        try:
            opened.kept_only = True
            with self._searching():
                return _search(opened, text, self.threepids, limit, self.hide)
        except NotKept:
            return None
        finally:
            opened.kept_only = False
            self._lock.release()

    def close(self) -> None:
        if self._opening is not None:
            self._opening.join(timeout=30)
        with self._lock:
            if self._opened is not None:
                self._opened.close()
                self._opened = None
