"""Who matches a directory search, best first, read from the local Whoosh index as compressed
bitmaps of document numbers (indexer/fulltext.py writes the index). Blocking; never on the event loop.

Matching rules of a directory search: every word of the query must match a word of the person
(display name and localpart, and their 3PIDs where the config allows) exactly, as a prefix, inside a
word (3 letters or more; looked for in the first INSIDE_MOST words of an index segment that hold
it, and the answer is limited when there were more) or, for words of 5 letters or more, with one typo (a
letter wrong, missing or extra, or two adjacent letters swapped); the last two only for query words
that nobody in the index has as a whole word (deleted people do not count). Case and diacritics are
folded on both sides. Exact words rank above prefixes, which rank above matches inside a word, which
rank above typos: each query word counts once per person, by how well the person's best-matching
word matches it, and a person ranks by the sum over the query's words. People who rank alike come
in index order.
"""

from __future__ import annotations

import re
from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

from pyroaring import FrozenBitMap
from whoosh.reading import IndexReader, TermNotFound

from indexer.fulltext import query_words

# Whole word and typo (13) outranks two prefixes (8).
EXACT, PREFIX, INSIDE, TYPO = 12.0, 4.0, 2.0, 1.0
TYPO_MIN_LENGTH = 5
MATCHES_KEPT_BYTES = 32 * 1024 * 1024
PEOPLE_KEPT = 10_000
CAPPED_KEPT = 10_000
WORD_FIELDS = ("words", "tp_words")
# A part of a word is looked for in the first this many terms (in term order) that hold it past
# their first letter, per index segment: `ser` is inside every one of 100,000 `user<i>`, and the
# answer of a search that stopped there says it is limited.
INSIDE_MOST = 10_000
# Spellings one typo away from a word are looked up in the term list up to this many; beyond (a large
# alphabet), Whoosh's Levenshtein automaton lists the near terms.
NEAR_SPELLINGS = 4000
_NOBODY = FrozenBitMap()
# Above every character a term can hold: the end of the terms starting with a prefix.
_LAST = "\U0010ffff"
# Terms read between two calls of the pause of SegmentTerms (about a millisecond of reading).
PAUSE_EVERY = 1000


class SegmentTerms:
    """The terms of one field in one index segment, held in memory in order, with the documents
    (numbered within the segment, deleted ones included) that have each. A prefix is a range of
    this list and a part of a word one regular expression over a text of the terms (inside): no posting list is
    read, however many terms match (a one-letter prefix matches every user<i>). Built once per
    segment, which Whoosh never changes but to delete documents; a person is almost always a
    term's only document, which the term list tells, so building reads little more than that.
    pause is called every PAUSE_EVERY terms: building runs beside searches on the index opened
    before, and holds the interpreter lock while it reads (see DirectorySearch)."""

    def __init__(self, reader: IndexReader, field: str, pause: Callable[[], None] = lambda: None) -> None:
        terms: list[str] = []
        self.first = array("I")  # each term's first document
        self.more: dict[int, array[int]] = {}  # the documents of the few terms that have several
        for btext, info in reader.iter_field(field):
            if len(terms) % PAUSE_EVERY == 0:
                pause()
            if info.doc_frequency() == 1:
                self.first.append(info.min_id())
            else:
                docs = array("I", reader.postings(field, btext).all_ids())
                self.first.append(docs[0] if docs else info.min_id())
                self.more[len(terms)] = docs
            terms.append(btext.decode())
        self.terms = terms
        self.several = sorted(self.more)
        # Each term but its first letter, then NUL and the term's number, on a line of its own: a
        # part of a word is found in this text with the numbers of the terms that hold it, by one
        # regular expression (a term holding it from its first letter is a prefix match, which
        # ranks higher anyway). Terms are runs of word characters: no NUL, no line break.
        tails = []
        for start in range(0, len(terms), PAUSE_EVERY):
            pause()
            chunk = enumerate(terms[start:start + PAUSE_EVERY], start)
            tails.append("".join(f"{term[1:]}\0{i}\n" for i, term in chunk))
        self.tails = "".join(tails)
        self.letters = sorted(set("".join(terms)))

    def _range(self, low: int, high: int) -> FrozenBitMap:
        if low >= high:
            return _NOBODY
        return self._union(self.first[low:high], self.several[bisect_left(self.several, low):
                                                              bisect_left(self.several, high)])

    def exact(self, term: str) -> FrozenBitMap:
        at = bisect_left(self.terms, term)
        return self._range(at, at + 1) if at < len(self.terms) and self.terms[at] == term else _NOBODY

    def prefixed(self, word: str) -> FrozenBitMap:
        return self._range(bisect_left(self.terms, word), bisect_left(self.terms, word + _LAST))

    def near(self, word: str) -> list[str] | None:
        """The terms (word itself included) with word's first letter and one letter wrong, missing or
        extra after it; None when that is too many spellings to look up (a large alphabet)."""
        head, rest = word[:1], word[1:]
        if (2 * len(rest) + 1) * len(self.letters) > NEAR_SPELLINGS:
            return None
        spellings = {word}
        spellings.update(head + rest[:i] + rest[i + 1:] for i in range(len(rest)))
        for letter in self.letters:
            spellings.update(head + rest[:i] + letter + rest[i + 1:] for i in range(len(rest)))
            spellings.update(head + rest[:i] + letter + rest[i:] for i in range(len(rest) + 1))
        return [spelling for spelling in spellings if self.has(spelling)]

    def has(self, term: str) -> bool:
        at = bisect_left(self.terms, term)
        return at < len(self.terms) and self.terms[at] == term

    def inside(self, word: str) -> tuple[FrozenBitMap, bool]:
        """Who has a term holding word after its first letter (a term starting with it is a prefix
        match), from the first INSIDE_MOST occurrences; and whether there were more. A pass over the
        text in C, and C calls per occurrence: no Python loop per term."""
        # One match per term at most: a match runs on to the term's number, past any other occurrence.
        pattern = re.compile(re.escape(word) + "[^\n]*?\0([0-9]+)")
        numbers = [int(m.group(1)) for m in islice(pattern.finditer(self.tails), INSIDE_MOST + 1)]
        capped = len(numbers) > INSIDE_MOST
        if not numbers:
            return _NOBODY, False
        holding = numbers[:INSIDE_MOST]
        return self._union(map(self.first.__getitem__, holding), sorted(self.more.keys() & holding)), capped

    def _union(self, first: Iterable[int], several: list[int]) -> FrozenBitMap:
        """first, and the documents of the terms numbered several."""
        found = FrozenBitMap(first)
        return found.union(*(FrozenBitMap(self.more[i]) for i in several)) if several else found


def segment_key(reader: IndexReader) -> str | None:
    """What names a segment's terms for as long as it exists (None: a reader of no segment)."""
    segment = reader.segment()
    return None if segment is None else str(segment.segment_id())


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
    people found. The word fields' terms are in memory (SegmentTerms, taken over from the index
    opened before for the segments they share). What it computes is kept between searches, least
    recently used out first, up to about MATCHES_KEPT_BYTES of bitmaps and PEOPLE_KEPT people:
    listing a word's near terms or loading a person costs far more than the set operations of a
    search, and the same names come back (people type them letter by letter, and names repeat)."""

    def __init__(self, reader: IndexReader, fields: tuple[str, ...] = WORD_FIELDS,
                 before: OpenIndex | None = None, pause: Callable[[], None] = lambda: None) -> None:
        self.reader = reader
        known = before.segments if before is not None else {}
        self.segments: dict[tuple[str, str], SegmentTerms] = {}
        # Per segment: its terms by field, its first document number in this reader, its deleted documents.
        self._leaves: list[tuple[dict[str, SegmentTerms], int, FrozenBitMap]] = []
        for leaf, offset in reader.leaf_readers():
            key = segment_key(leaf)
            if key is None:
                continue
            terms = {}
            for field in fields:
                terms[field] = self.segments[(key, field)] = known.get((key, field)) or SegmentTerms(leaf, field, pause)
            deleted = FrozenBitMap(leaf.deleted_docs_set) if leaf.has_deletions() else _NOBODY
            self._leaves.append((terms, offset, deleted))
            # Whoosh opens a segment's stored fields at their first use: now, while its files exist.
            if leaf.doc_count_all():
                leaf.stored_fields(0)
        self._matches: OrderedDict[tuple[str, str, str], FrozenBitMap] = OrderedDict()
        self._held = 0
        self._people: OrderedDict[int, tuple[Hit, tuple[str, ...]]] = OrderedDict()
        self._capped: dict[tuple[str, str], None] = {}  # (field, word) of capped inside(), oldest first
        # While set, a search that needs a match not kept raises NotKept instead of computing it.
        self.kept_only = False

    def close(self) -> None:
        self.reader.close()

    def _kept(self, key: tuple[str, str, str], read: Callable[[], FrozenBitMap]) -> FrozenBitMap:
        found = self._matches.get(key)
        if found is not None:
            self._matches.move_to_end(key)
            return found
        if self.kept_only:
            raise NotKept(key)
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

    def matrix_id(self, mxid: str) -> FrozenBitMap:
        """Who has this Matrix ID."""
        return self._kept(("exact", "mxid", mxid), lambda: self._postings("mxid", mxid))

    def _every_segment(self, field: str, find: Callable[[SegmentTerms], FrozenBitMap]) -> FrozenBitMap:
        found = []
        for terms, offset, deleted in self._leaves:
            here = find(terms[field])
            if here and deleted:
                here -= deleted
            if here:
                found.append(here.shift(offset) if offset else here)
        return _union(found)

    def exact(self, field: str, term: str) -> FrozenBitMap:
        """Who has the word term (people deleted from the index do not count)."""
        return self._kept(("exact", field, term), lambda: self._every_segment(field, lambda t: t.exact(term)))

    def prefixed(self, field: str, word: str) -> FrozenBitMap:
        """Who has a word starting with word (the word itself included)."""
        return self._kept(("prefix", field, word), lambda: self._every_segment(field, lambda t: t.prefixed(word)))

    def inside(self, field: str, word: str) -> FrozenBitMap:
        """Who has a word holding word after its first letter (those starting with it are prefix
        matches), as far as INSIDE_MOST occurrences per segment go: see capped."""
        def read() -> FrozenBitMap:
            def find(terms: SegmentTerms) -> FrozenBitMap:
                found, capped = terms.inside(word)
                if capped:
                    self._capped[(field, word)] = None
                    while len(self._capped) > CAPPED_KEPT:
                        del self._capped[next(iter(self._capped))]
                return found

            return self._every_segment(field, find)

        return self._kept(("inside", field, word), read)

    def capped(self, field: str, word: str) -> bool:
        """Whether inside(field, word) stopped at INSIDE_MOST occurrences in a segment."""
        return (field, word) in self._capped

    def near(self, field: str, word: str) -> FrozenBitMap:
        """Who has a word one typo away from word: one letter wrong, missing or extra (with the same
        first letter), or two adjacent letters swapped."""
        def read() -> FrozenBitMap:
            terms: set[str] = set()
            for segment, _, _ in self._leaves:
                found = segment[field].near(word)
                if found is None:  # Whoosh's Levenshtein automaton, over every segment
                    terms = set(self.reader.terms_within(field, word, maxdist=1, prefix=1))
                    break
                terms.update(found)
            # Whoosh's automaton counts a swap as two edits; each swapped spelling is one term lookup.
            terms.update(_swaps(word))
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


def _tiers(opened: OpenIndex, word: str, fields: list[str]) -> Iterator[tuple[float, FrozenBitMap]]:
    """The people matching one query word by how well their best-matching word matches it, best
    first, each person in one tier only. Computed lazily: a search that has enough people from
    the first tiers never pays for the others."""
    # A word that someone has is taken as typed whole and spelt right: it is looked for as a word
    # and as a prefix only. Looking inside words and for near misses finds little more for it.
    # Only people still in the index count: a term that deleted documents alone hold is unknown.
    found = _union([opened.exact(field, word) for field in fields])
    known = bool(found)
    yield EXACT, found
    prefixed = _union([opened.prefixed(field, word) for field in fields]) - found
    yield PREFIX, prefixed
    if known:
        return
    found |= prefixed
    if len(word) >= 3:
        inside = _union([opened.inside(field, word) for field in fields]) - found
        yield INSIDE, inside
        found |= inside
    if len(word) >= TYPO_MIN_LENGTH:
        yield TYPO, _union([opened.near(field, word) for field in fields]) - found


def ranked(opened: OpenIndex, text: str, threepids: bool) -> Iterator[int]:
    """The document numbers matching a search term, best first."""
    mxid = text.strip().lower()
    shown = _NOBODY
    if ":" in mxid:
        # Someone's whole Matrix ID finds them first.
        shown = opened.matrix_id(mxid if mxid.startswith("@") else "@" + mxid)
        yield from shown
    words = query_words(text)
    if not words:
        return
    fields = ["words", "tp_words"] if threepids else ["words"]
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


def capped(opened: OpenIndex, text: str, threepids: bool) -> bool:
    """Whether, after ranked(), who matches a word of text inside a word was cut at INSIDE_MOST:
    there may be more matches than it gave."""
    fields = ["words", "tp_words"] if threepids else ["words"]
    return any(opened.capped(field, word) for word in query_words(text) for field in fields)


@dataclass(frozen=True)
class Hit:
    """One person found by a directory search."""

    mxid: str
    display_name: str | None
    store: str


class NotKept(Exception):
    """A search with OpenIndex.kept_only set needs a match that is not kept."""


class IndexNotReady(Exception):
    """The follower has not built this host's index yet."""
