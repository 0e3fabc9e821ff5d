"""Who matches a directory search, best first, read from the local Whoosh index as compressed
bitmaps of document numbers (indexer/fulltext.py writes the index). Blocking; never on the event loop.

Matching rules of a directory search: every word of the query must match a word of the person
(display name and localpart, and their 3PIDs where the config allows) exactly, as a prefix, inside a
word (3 letters or more, through trigrams) or, for words of 5 letters or more, with one typo (a
letter wrong, missing or extra, or two adjacent letters swapped); the last two only for query words
that nobody in the index has as a whole word (deleted people do not count). Case and diacritics are
folded on both sides. Exact words rank above prefixes, which rank above matches inside a word, which
rank above typos: each query word counts once per person, by how well the person's best-matching
word matches it, and a person ranks by the sum over the query's words. People who rank alike come
in index order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pyroaring import FrozenBitMap
from whoosh.reading import IndexReader, TermNotFound

from indexer.fulltext import query_words

# Whole word and typo (13) outranks two prefixes (8).
EXACT, PREFIX, INSIDE, TYPO = 12.0, 4.0, 2.0, 1.0
TYPO_MIN_LENGTH = 5
MATCHES_KEPT_BYTES = 32 * 1024 * 1024
PEOPLE_KEPT = 10_000
_NOBODY = FrozenBitMap()


def _swaps(word: str) -> list[str]:
    """word with each pair of adjacent (different) letters swapped."""
    return [word[:i] + word[i + 1] + word[i] + word[i + 2:] for i in range(len(word) - 1) if word[i] != word[i + 1]]


def _union(bitmaps: list[FrozenBitMap]) -> FrozenBitMap:
    return FrozenBitMap.union(*bitmaps) if bitmaps else _NOBODY


def _bytes(bitmap: FrozenBitMap) -> int:
    """About what a kept bitmap costs in memory: at most 2 bytes a document, and the entry."""
    return 2 * len(bitmap) + 256


class OpenIndex:
    """One open index reader for directory searches: who matches a query word in each way (exactly,
    as a prefix, inside a word, with a typo) as compressed bitmaps of document numbers, and the
    people found. What it reads is kept between searches, least recently used out first, up to
    about MATCHES_KEPT_BYTES of bitmaps and PEOPLE_KEPT people: reading posting lists, listing a
    word's near terms or loading a person costs far more than the set operations of a search, and
    the same names come back (people type them letter by letter, and names repeat)."""

    def __init__(self, reader: IndexReader) -> None:
        self.reader = reader
        self._matches: OrderedDict[tuple[str, str, str], FrozenBitMap] = OrderedDict()
        self._held = 0
        self._people: OrderedDict[int, tuple[Hit, tuple[str, ...]]] = OrderedDict()

    def close(self) -> None:
        self.reader.close()

    def _kept(self, key: tuple[str, str, str], read: Callable[[], FrozenBitMap]) -> FrozenBitMap:
        found = self._matches.get(key)
        if found is not None:
            self._matches.move_to_end(key)
            return found
        found = self._matches[key] = read()
        self._held += _bytes(found)
        while self._held > MATCHES_KEPT_BYTES and len(self._matches) > 1:
            self._held -= _bytes(self._matches.popitem(last=False)[1])
        return found

    def _postings(self, field: str, term: str) -> FrozenBitMap:
        try:
            return FrozenBitMap(self.reader.postings(field, term).all_ids())
        except TermNotFound:
            return _NOBODY

    def has(self, field: str, word: str) -> bool:
        return (field, word) in self.reader

    def exact(self, field: str, term: str) -> FrozenBitMap:
        return self._kept(("exact", field, term), lambda: self._postings(field, term))

    def prefixed(self, field: str, word: str) -> FrozenBitMap:
        """Who has a word starting with word (the word itself included)."""
        def read() -> FrozenBitMap:
            # Only the union is kept: a short prefix can have thousands of terms (user1, user2...).
            terms = [t.decode() for t in self.reader.expand_prefix(field, word)]
            return _union([self._matches.get(("exact", field, t)) or self._postings(field, t) for t in terms])

        return self._kept(("prefix", field, word), read)

    def inside(self, field: str, word: str) -> FrozenBitMap:
        """Who has every trigram of word in the trigrams field."""
        def read() -> FrozenBitMap:
            # Rarest first: most words that nobody has stop at a trigram that nobody has.
            grams = sorted({word[i:i + 3] for i in range(len(word) - 2)},
                           key=lambda g: self.reader.doc_frequency(field, g))
            found = self.exact(field, grams[0])
            for gram in grams[1:]:
                if not found:
                    break
                found &= self.exact(field, gram)
            return found

        return self._kept(("inside", field, word), read)

    def near(self, field: str, word: str) -> FrozenBitMap:
        """Who has a word one typo away from word: one letter wrong, missing or extra (with the same
        first letter), or two adjacent letters swapped."""
        def read() -> FrozenBitMap:
            terms = set(self.reader.terms_within(field, word, maxdist=1, prefix=1))
            # Whoosh's automaton counts a swap as two edits; each swapped spelling is one term lookup.
            terms.update(t for t in _swaps(word) if (field, t) in self.reader)
            return _union([self.exact(field, t) for t in terms])

        return self._kept(("near", field, word), read)

    def person(self, docnum: int) -> tuple[Hit, tuple[str, ...]]:
        """The person of one document, and their 3PIDs ("medium:address") for the hide rules."""
        found = self._people.get(docnum)
        if found is None:
            stored = self.reader.stored_fields(docnum)
            found = self._people[docnum] = (Hit(stored["mxid"], stored.get("display_name") or None, stored["store"]),
                                            tuple(stored.get("threepids") or ()))
            if len(self._people) > PEOPLE_KEPT:
                self._people.popitem(last=False)
        else:
            self._people.move_to_end(docnum)
        return found


def _tiers(opened: OpenIndex, word: str, fields: list[tuple[str, str]]) -> Iterator[tuple[float, FrozenBitMap]]:
    """The people matching one query word by how well their best-matching word matches it, best
    first, each person in one tier only. Computed lazily: a search that has enough people from
    the first tiers never pays for the others."""
    # A word that someone has is taken as typed whole and spelt right: it is looked for as a word
    # and as a prefix only. Looking inside words and for near misses finds little more for it.
    # Only people still in the index count: a term that deleted documents alone hold is unknown.
    found = _union([opened.exact(words, word) for words, _ in fields if opened.has(words, word)])
    known = bool(found)
    yield EXACT, found
    prefixed = _union([opened.prefixed(words, word) for words, _ in fields]) - found
    yield PREFIX, prefixed
    if known:
        return
    found |= prefixed
    if len(word) >= 3:
        inside = _union([opened.inside(grams, word) for _, grams in fields]) - found
        yield INSIDE, inside
        found |= inside
    if len(word) >= TYPO_MIN_LENGTH:
        yield TYPO, _union([opened.near(words, word) for words, _ in fields]) - found


def ranked(opened: OpenIndex, text: str, threepids: bool) -> Iterator[int]:
    """The document numbers matching a search term, best first."""
    mxid = text.strip().lower()
    shown = _NOBODY
    if ":" in mxid:
        # Someone's whole Matrix ID finds them first.
        shown = opened.exact("mxid", mxid if mxid.startswith("@") else "@" + mxid)
        yield from shown
    words = query_words(text)
    if not words:
        return
    fields = [("words", "grams")] + ([("tp_words", "tp_grams")] if threepids else [])
    if len(words) == 1:
        for _, tier in _tiers(opened, words[0], fields):
            yield from tier - shown
        return
    # Every word must match: people by the sum of how well each word matches them.
    scores = {0.0: FrozenBitMap(range(opened.reader.doc_count_all()))}
    for word in words:
        combined: dict[float, FrozenBitMap] = {}
        for boost, tier in _tiers(opened, word, fields):
            for score, people in scores.items():
                both = people & tier
                if both:
                    total = score + boost
                    combined[total] = combined[total] | both if total in combined else both
        scores = combined
        if not scores:
            return
    for score in sorted(scores, reverse=True):
        yield from scores[score] - shown


@dataclass(frozen=True)
class Hit:
    """One person found by a directory search."""

    mxid: str
    display_name: str | None
    store: str


class IndexNotReady(Exception):
    """The follower has not built this host's index yet."""
