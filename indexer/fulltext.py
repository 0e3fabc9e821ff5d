"""The local Whoosh index of identities: schema, writer and searcher. Blocking; never on the event loop.

Matching rules of a directory search: every word of the query must match a word of the person
(display name and localpart, and their 3PIDs where the config allows) exactly, as a prefix, inside a
word (3 letters or more, through trigrams) or, for words of 5 letters or more, with one typo; the
last two only for query words that nobody has as a whole word. Case and diacritics are folded on
both sides. Exact words rank above prefixes, which rank above matches inside a word, which rank
above typos.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from whoosh import index
from whoosh.analysis import CharsetFilter, LowercaseFilter, NgramFilter, RegexTokenizer
from whoosh.collectors import TopCollector
from whoosh.fields import ID, STORED, TEXT, Schema
from whoosh.query import And, FuzzyTerm, Or, Query, Term
from whoosh.scoring import BaseScorer, WeightingModel
from whoosh.searching import Searcher
from whoosh.support.charset import accent_map

from indexer.identity import Identity

POSITION_FILE = "position.json"
# Bump when SCHEMA or _document changes: a follower finding another version rebuilds the index.
SCHEMA_VERSION = 2

_WORD = r"\w+"
_words = RegexTokenizer(_WORD) | LowercaseFilter() | CharsetFilter(accent_map)
_trigrams = _words | NgramFilter(3, 3)

SCHEMA = Schema(
    key=ID(unique=True, stored=True),
    store=ID(stored=True),
    mxid=ID(stored=True),
    localpart=STORED(),
    display_name=STORED(),
    threepids=STORED(),
    words=TEXT(analyzer=_words, phrase=False),
    grams=TEXT(analyzer=_trigrams, phrase=False),
    tp_words=TEXT(analyzer=_words, phrase=False),
    tp_grams=TEXT(analyzer=_trigrams, phrase=False),
)

# A prefix matching two words of a person (Martin Martínez for "mar") must not outrank a whole word.
EXACT, PREFIX, INSIDE, TYPO = 12.0, 4.0, 2.0, 1.0


class _OneScorer(BaseScorer):
    def supports_block_quality(self) -> bool:
        return True

    def score(self, matcher: Any) -> float:
        return 1.0

    def max_quality(self) -> float:
        return 1.0

    def block_quality(self, matcher: Any) -> float:
        return 1.0


class _Constant(WeightingModel):
    """Every matching term scores its query boost: how a word matched ranks a person, not how rare
    the word is."""

    def scorer(self, searcher: Searcher, fieldname: str, text: bytes, qf: int = 1) -> BaseScorer:
        return _OneScorer()


WEIGHTING = _Constant()
TYPO_MIN_LENGTH = 5


def document_key(store: str, store_id: str) -> str:
    return f"{store}\x1f{store_id}"


def _document(identity: Identity) -> dict[str, Any]:
    person = f"{identity.display_name or ''} {identity.localpart}"
    addresses = " ".join(a for _, a in identity.threepids)
    return {
        "key": document_key(identity.store, identity.store_id),
        "store": identity.store,
        "mxid": identity.mxid,
        "localpart": identity.localpart,
        "display_name": identity.display_name,
        "threepids": [f"{m}:{a}" for m, a in identity.threepids],
        "words": person,
        "grams": person,
        "tp_words": addresses,
        "tp_grams": addresses,
    }


def query_words(text: str) -> list[str]:
    """The folded words of a search term, as the index holds them."""
    return [token.text for token in _words(text)]


def _word_query(word: str, fields: list[tuple[str, str]], searcher: Searcher) -> Query:
    """One query word against (words field, trigrams field) pairs, scored by how well it matches."""
    reader = searcher.reader()
    # A word that someone has is taken as typed whole and spelt right: it is looked for as a word
    # and as a prefix only. Looking inside words and for near misses costs more than the rest of a
    # search, and finds little more for a word that exists.
    known = any((f, word) in reader for f, _ in fields)
    choices: list[Query] = []
    for words, grams in fields:
        # The prefix's words are listed here rather than by a Prefix query, so that the whole word
        # is one posting list to walk, not two.
        for term in reader.expand_prefix(words, word):
            text = term.decode()
            choices.append(Term(words, text, boost=EXACT if text == word else PREFIX))
        if len(word) >= 3 and not known:
            grams_of = [word[i:i + 3] for i in range(len(word) - 2)]
            choices.append(And([Term(grams, g, boost=INSIDE / len(grams_of)) for g in grams_of]))
        if len(word) >= TYPO_MIN_LENGTH and not known:
            choices.append(FuzzyTerm(words, word, boost=TYPO, maxdist=1, prefixlength=1, constantscore=False))
    return Or(choices)


def build_query(text: str, threepids: bool, searcher: Searcher) -> Query | None:
    """The Whoosh query for a search term, or None when it has no word to search for."""
    words = query_words(text)
    if not words:
        return None
    fields = [("words", "grams")] + ([("tp_words", "tp_grams")] if threepids else [])
    everything = And([_word_query(w, fields, searcher) for w in words])
    mxid = text.strip().lower()
    if ":" in mxid:
        return Or([everything, Term("mxid", mxid if mxid.startswith("@") else "@" + mxid, boost=EXACT * 4)])
    return everything


@dataclass(frozen=True)
class Hit:
    """One person found by a directory search."""

    mxid: str
    display_name: str | None
    store: str


class HideRules:
    """directory.hide from the config: a person matching every condition of any one rule is left out
    of search results. Conditions: store (a name), mxid, display_name, threepid ("medium:address"),
    each a regular expression that must match the whole value, case-insensitively."""

    def __init__(self, rules: list[dict[str, str]]) -> None:
        self.rules = [
            {k: (v if k == "store" else re.compile(v, re.IGNORECASE)) for k, v in rule.items()} for rule in rules
        ]

    def __bool__(self) -> bool:
        return bool(self.rules)

    def hides(self, store: str, mxid: str, display_name: str | None, threepids: Iterable[str]) -> bool:
        """Whether these values of one person match a rule."""
        values = {"mxid": [mxid], "display_name": [display_name or ""], "threepid": list(threepids)}
        for rule in self.rules:
            if all(
                store == condition if key == "store" else any(condition.fullmatch(v) for v in values[key])
                for key, condition in rule.items()
            ):
                return True
        return False

    def hides_identity(self, identity: Identity) -> bool:
        return self.hides(identity.store, identity.mxid, identity.display_name,
                          [f"{m}:{a}" for m, a in identity.threepids])


class _TopCollector(TopCollector):
    """Whoosh's top-N collector, told that a later match which only ties the worst of a full top N
    cannot enter it (ties go to the lower document number): with every match scoring one of a few
    values, that lets the search stop early instead of visiting every match."""

    def _collect(self, global_docnum: int, score: float) -> float:
        result = super()._collect(global_docnum, score)
        if len(self.items) >= self.limit:
            self.minscore = self.items[0][0] + 1e-9
        return result


class IndexNotReady(Exception):
    """The follower has not built this host's index yet."""


def _search(searcher: Searcher, text: str, threepids: bool, limit: int, hide: HideRules) -> tuple[list[Hit], bool]:
    """The best limit visible hits for a search term, and whether there were more."""
    query = build_query(text, threepids, searcher)
    if query is None:
        return [], False
    wanted = limit + 1
    fetch = wanted + (10 if hide else 0)
    while True:
        collector = _TopCollector(limit=fetch)
        searcher.search_with_collector(query, collector)
        results = collector.results()
        hits: list[Hit] = []
        for found in results:
            if hide and hide.hides(found["store"], found["mxid"], found.get("display_name"),
                                   found.get("threepids") or []):
                continue
            hits.append(Hit(found["mxid"], found.get("display_name") or None, found["store"]))
            if len(hits) == wanted:
                break
        if len(hits) == wanted or results.scored_length() < fetch:
            return hits[:limit], len(hits) > limit
        fetch *= 4  # hidden people filled the page: look further down the ranking


class FullText:
    """One Whoosh index directory and the change-stream position it reflects."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def exists(self) -> bool:
        return index.exists_in(str(self.path)) and (self.path / POSITION_FILE).is_file()

    def position(self) -> dict[str, Any] | None:
        """{"schema", "epoch", "last_id"} of the cache this index was built from, or None if unusable."""
        if not self.exists():
            return None
        try:
            data = json.loads((self.path / POSITION_FILE).read_text())
            return {"schema": data.get("schema"), "epoch": str(data["epoch"]), "last_id": str(data["last_id"])}
        except (OSError, ValueError, KeyError):
            return None

    def _save_position(self, path: Path, epoch: str, last_id: str) -> None:
        # Replaced, never rewritten in place: a new inode tells searchers the index changed.
        tmp = path / (POSITION_FILE + ".tmp")
        tmp.write_text(json.dumps({"schema": SCHEMA_VERSION, "epoch": epoch, "last_id": last_id}))
        tmp.replace(path / POSITION_FILE)

    def rebuild(self, identities: Iterable[Identity], epoch: str, last_id: str) -> int:
        """Write a new index from identities beside the current one, then swap it in."""
        fresh = self.path.with_name(self.path.name + ".new")
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir(parents=True)
        ix = index.create_in(str(fresh), SCHEMA)
        count = 0
        with ix.writer(limitmb=128) as writer:
            for identity in identities:
                writer.add_document(**_document(identity))
                count += 1
        self._save_position(fresh, epoch, last_id)
        old = self.path.with_name(self.path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.path.exists():
            self.path.rename(old)
        fresh.rename(self.path)
        shutil.rmtree(old, ignore_errors=True)
        return count

    def apply(self, upserts: list[Identity], deleted_keys: list[str], epoch: str, last_id: str) -> None:
        """Apply a batch of changes, then record the stream position they bring the index to."""
        ix = index.open_dir(str(self.path))
        with ix.writer() as writer:
            for key in deleted_keys:
                writer.delete_by_term("key", key)
            for identity in upserts:
                writer.update_document(**_document(identity))
        self._save_position(self.path, epoch, last_id)

    def count(self) -> int:
        return index.open_dir(str(self.path)).doc_count()

    def search(self, text: str, limit: int = 10, threepids: bool = False) -> list[Hit]:
        """The best matches for a search term, with a searcher opened for this one search."""
        with index.open_dir(str(self.path)).searcher(weighting=WEIGHTING) as searcher:
            return _search(searcher, text, threepids, limit, HideRules([]))[0]


class DirectorySearch:
    """Directory searches on one index with a searcher kept open between requests, reopened when
    the follower has moved the index on. Thread-safe: searches take turns on the one searcher."""

    def __init__(self, path: str | Path, hide: HideRules, threepids: bool) -> None:
        self.path = Path(path)
        self.hide = hide
        self.threepids = threepids
        self._lock = threading.Lock()
        self._searcher: Searcher | None = None
        self._stamp: tuple[int, int] | None = None

    def _current(self) -> Searcher:
        try:
            stat = os.stat(self.path / POSITION_FILE)
        except FileNotFoundError:
            stat = None  # not built yet, or the follower is swapping in a rebuilt index
        if stat is not None and (stat.st_ino, stat.st_mtime_ns) != self._stamp:
            try:
                fresh = index.open_dir(str(self.path)).searcher(weighting=WEIGHTING)
            except (OSError, index.EmptyIndexError):
                fresh = None
            if fresh is not None:
                if self._searcher is not None:
                    self._searcher.close()
                self._searcher, self._stamp = fresh, (stat.st_ino, stat.st_mtime_ns)
        if self._searcher is None:
            raise IndexNotReady(f"no fulltext index at {self.path} yet")
        return self._searcher

    def search(self, text: str, limit: int) -> tuple[list[Hit], bool]:
        """The best limit visible matches for a search term, and whether there were more."""
        with self._lock:
            return _search(self._current(), text, self.threepids, limit, self.hide)

    def close(self) -> None:
        with self._lock:
            if self._searcher is not None:
                self._searcher.close()
                self._searcher = None
