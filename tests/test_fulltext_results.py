"""Directory search finds the same people, in the same order, however its index was written: as
recorded before the index was made faster to fill and to search (tests/data/fulltext_results.json),
and whether the index was rebuilt whole or filled change by change.

One recorded result changed on purpose: matches inside a word were found through trigrams, which
also matched people whose words held the query's trigrams between them ("rtíne" found Ines
Martin); they are now found in the term list, inside one word, as the matching rules say."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from whoosh import index

from indexer.fulltext import FullText
from indexer.identity import Identity
from server.services import directory_ranking as ranking
from server.services.directory_search import DirectorySearch, HideRules

RECORDED = Path(__file__).parent / "data" / "fulltext_results.json"

FIRST = ("Adam Agnès Ahmed Alice Amélie Björn Chloé Dmitri Élodie François Jürgen Søren Zoë Zoltán Mia Maria Mario "
         "Marius Ines Li Bo Дмитрий Ольга Γιώργος Ελένη 王 李 محمد فاطمة").split()
LAST = ("Martínez Martin Smith Smithers Schmidt Müller Dąbrowski Yılmaz Berg Bergamo Umbergast Ivanov Иванов "
        "Петров Παπαδόπουλος Νικολάου 伟 芳 الحسن O'Brien Lefèvre-Dubois Nakamura Takahashi Kowalski Wójcik").split()
COUNT = 1500

# Whole words, short and long prefixes (of tens to hundreds of people), inside words, typos (a
# letter wrong, missing, extra, two swapped), several words, Matrix IDs, accents, non-Latin
# scripts, addresses and punctuation.
QUERIES = [
    "smith", "martin", "bergamo", "berg", "zoe", "zoë", "ZOË", "soren", "søren", "иванов", "ИВАНОВ", "ivanov",
    "παπαδόπουλος", "王", "李 伟", "محمد", "o'brien", "lefèvre-dubois", "dubois", "yilmaz", "yılmaz", "dabrowski",
    "u", "us", "use", "user", "user1", "user12", "user123", "user1499", "user1500", "m", "ma", "mar", "mart", "sm",
    "z", "и", "ив", "ива", "па", "πα", "ف", "a", "b",
    "mith", "ergam", "mbergas", "ван", "етро", "παδό", "rtíne", "ser12", "123", "rien", "akamu", "owals",
    "smiht", "smoth", "bregamo", "martinex", "ivamov", "иваноф", "usre12", "usre13", "kowalsky", "nakamure", "takahasi",
    "schmdit", "muller", "umbergastt", "παπαδόπουλως", "zimmermann",
    "maria smith", "smith m", "m s", "zoe b", "дмитрий иванов", "user1 smith", "nobody smith", "mia ber",
    "ines kowalsky", "a b c", "li 伟",
    "@user13:example.org", "user13:example.org", "@aberg234:example.org", "@nobody:example.org",
    "corp", "corp.example", "user12@corp.example", "4479", "example", "mail", "", " - ", "'",
]
LIMIT = 10


def population(count: int = COUNT, renamed: bool = False) -> list[Identity]:
    """count people: every third has a localpart of their name, the others user<i>; addresses at
    corp.example (and some at mail.example.com), a phone number each. renamed: everyone whose
    number is a multiple of 7 has another first name."""
    people = []
    for i in range(count):
        first = FIRST[(i + (3 if renamed and i % 7 == 0 else 0)) % len(FIRST)]
        last = LAST[(i // len(FIRST)) % len(LAST)]
        if i % 3 == 0:
            localpart = f"{first[0]}{last}{i}".lower().replace("'", "").replace(" ", "")
            if not localpart.isascii():
                localpart = f"p{i}"
        else:
            localpart = f"user{i}"
        threepids = [("email", f"{localpart}@corp.example"), ("msisdn", f"4479{i:08d}")]
        if i % 5 == 0:
            threepids.append(("email", f"u{i}@mail.example.com"))
        people.append(Identity.build(mxid=f"@{localpart}:example.org", localpart=localpart,
                                     display_name=f"{first} {last}" if i % 11 else None,
                                     threepids=threepids, store="hr", store_id=str(i)))
    return people


def results(path: Path) -> dict[str, list[object]]:
    """For each query, without and with 3PIDs searched: its first page of results and whether it was
    limited; how many people it finds in all, and a digest of them all in order."""
    out: dict[str, list[object]] = {}
    for threepids in (False, True):
        search = DirectorySearch(path, HideRules([]), threepids)
        for query in QUERIES:
            hits, limited = search.search(query, LIMIT)
            everyone = [hit.mxid for hit in search.search(query, COUNT)[0]]
            digest = hashlib.sha256("\n".join(everyone).encode()).hexdigest()[:16]
            out[f"{'3pids' if threepids else 'names'}:{query}"] = [[hit.mxid for hit in hits], limited,
                                                                    len(everyone), digest]
        search.close()
    return out


@pytest.mark.parametrize("near_spellings", [ranking.NEAR_SPELLINGS, 0], ids=["as-configured", "whoosh-near-terms"])
def test_search_results_are_those_recorded_before_the_index_was_made_faster(tmp_path, monkeypatch, near_spellings):
    # Near terms are looked up spelling by spelling or listed by Whoosh, by the size of the alphabet.
    monkeypatch.setattr(ranking, "NEAR_SPELLINGS", near_spellings)
    FullText(tmp_path / "fulltext").rebuild(population(), "epoch", "0-0")
    recorded = json.loads(RECORDED.read_text())
    found = results(tmp_path / "fulltext")
    assert found.keys() == recorded.keys()
    for query, expected in recorded.items():
        assert found[query] == expected, query


def test_a_part_of_a_word_held_by_more_terms_than_looked_at_gives_a_limited_answer(tmp_path, monkeypatch):
    # "ser1" is inside 111 localparts user1<j> of the first 1,500 people, and as many addresses.
    FullText(tmp_path / "fulltext").rebuild(population(), "epoch", "0-0")
    whole = DirectorySearch(tmp_path / "fulltext", HideRules([]), True)
    everyone, limited = whole.search("ser1", COUNT)
    whole.close()
    assert len(everyone) > 20 and not limited
    monkeypatch.setattr(ranking, "INSIDE_MOST", 20)
    capped = DirectorySearch(tmp_path / "fulltext", HideRules([]), True)
    some, limited = capped.search("ser1", COUNT)
    assert limited and 0 < len(some) < len(everyone) and {h.mxid for h in some} < {h.mxid for h in everyone}
    # Every word must match: "ser1 smith" finds at most what "ser1" did, and says it is limited too.
    assert capped.search("ser1 smith", COUNT)[1]
    capped.close()


def test_an_index_filled_change_by_change_finds_what_a_rebuilt_one_does(tmp_path):
    changed = FullText(tmp_path / "changed")
    people = population()
    changed.rebuild(people[:300], "epoch", "0-0")
    # Batches as the follower applies them: new people, renamed people, people who left; enough of
    # them for the writer to merge segments.
    renamed = population(renamed=True)
    gone = {str(i) for i in range(0, COUNT, 13)}
    for start in range(300, COUNT, 50):
        upserts = people[start:start + 50] + [p for p in renamed[start - 300:start - 250]
                                              if int(p.store_id) % 7 == 0 and p.store_id not in gone]
        deleted = [f"hr\x1f{i}" for i in range(start - 300, start - 250) if str(i) in gone]
        changed.apply(upserts, deleted, "epoch", f"0-{start}")
    changed.apply([p for p in renamed[COUNT - 300:] if int(p.store_id) % 7 == 0 and p.store_id not in gone],
                  [f"hr\x1f{i}" for i in range(COUNT - 300, COUNT) if str(i) in gone], "epoch", "0-9999")
    # People who rank alike come in index order: the rebuilt index gets them in the order that
    # the changed index ended up with.
    with index.open_dir(str(changed.path)).reader() as reader:
        order = [fields["key"].split("\x1f")[1] for _, fields in reader.iter_docs()]
    final = {p.store_id: p for p in renamed if p.store_id not in gone}
    assert sorted(order) == sorted(final)
    rebuilt = FullText(tmp_path / "rebuilt")
    rebuilt.rebuild([final[i] for i in order], "epoch", "0-9999")
    assert results(changed.path) == results(rebuilt.path)


def test_a_search_answered_from_kept_matches_is_the_search_itself(tmp_path):
    # The HTTP server answers on its event loop the searches whose matches earlier ones have kept.
    FullText(tmp_path / "fulltext").rebuild(population(), "epoch", "0-0")
    search = DirectorySearch(tmp_path / "fulltext", HideRules([]), True)
    search.search("alice", LIMIT)  # waits for the index to open
    for query in ("smith", "ser12", "smiht", "maria smith", "@user13:example.org", "4479"):
        assert search.search_kept(query, LIMIT) is None
        answer = search.search(query, LIMIT)
        assert search.search_kept(query, LIMIT) == answer
    search.close()
