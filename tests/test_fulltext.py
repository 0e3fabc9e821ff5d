"""Directory search on the local fulltext index, without a server: how people are matched and
ranked, limits and hidden people, and a kept search following the index as it changes."""

from __future__ import annotations

from indexer.fulltext import FullText
from indexer.identity import Identity
from server.services.directory_search import DirectorySearch, HideRules
from tests.conftest import typed_config, wait_until


def person(localpart: str, name: str, *emails: str) -> Identity:
    return Identity.build(mxid=f"@{localpart}:example.org", localpart=localpart, display_name=name,
                          threepids=[("email", e) for e in emails], store="hr", store_id=localpart)


PEOPLE = [
    person("mmartinez", "Martin Martínez"),
    person("msmith", "Maria Smith", "maria@corp.example"),
    person("omar", "Omar Khan"),
    person("mar", "Mar Ortiz"),
    person("rmaro", "Rosa Maro"),
    person("asmith", "Anna Smith"),
    person("msmithers", "Mark Smithers"),
    person("jberg", "Johan Berg"),
    person("lbergamo", "Luca Bergamo"),
    person("iumbergast", "Ida Umbergast"),
    person("svc-mars", "Mars Rover"),
]


def searcher(tmp_path, threepids: bool = False, hide: HideRules | None = None) -> DirectorySearch:
    return DirectorySearch(tmp_path / "fulltext", hide or HideRules([]), threepids)


def ids(search: DirectorySearch, text: str, limit: int = 10) -> list[str]:
    return [hit.mxid.split(":")[0][1:] for hit in search.search(text, limit)[0]]


def test_whole_words_before_prefixes_before_inside_words_before_typos(tmp_path):
    FullText(tmp_path / "fulltext").rebuild(PEOPLE, "epoch", "0-0")
    search = searcher(tmp_path)
    # Nobody has "berga" whole: a prefix of Bergamo, inside Umbergast, one letter more than Berg.
    assert ids(search, "berga") == ["lbergamo", "iumbergast", "jberg"]
    # A word that someone has is matched whole and as a prefix only.
    assert ids(search, "berg") == ["jberg", "lbergamo"]
    found = ids(search, "mar")
    assert found[0] == "mar" and sorted(found[1:]) == ["mmartinez", "msmith", "msmithers", "rmaro", "svc-mars"]
    assert sorted(ids(search, "smit")) == ["asmith", "msmith", "msmithers"]
    assert sorted(ids(search, "mith")) == ["asmith", "msmith", "msmithers"]
    assert sorted(ids(search, "smoth")) == ["asmith", "msmith"]
    assert ids(search, "MARTÍN") == ids(search, "martin") == ["mmartinez"]


def test_every_word_must_match_and_better_matches_rank_first(tmp_path):
    FullText(tmp_path / "fulltext").rebuild(PEOPLE, "epoch", "0-0")
    search = searcher(tmp_path)
    assert ids(search, "smith maria") == ["msmith"]
    # A whole word and a prefix before two prefixes; Anna Smith has no word starting with m.
    assert ids(search, "smith m") == ["msmith", "msmithers"]
    assert ids(search, "nobody smith") == []
    assert ids(search, "@omar:example.org") == ids(search, "omar:example.org") == ["omar"]
    # Addresses are searched only when the config allows it.
    assert ids(search, "corp") == []
    assert ids(searcher(tmp_path, threepids=True), "corp") == ["msmith"]


def test_limits_and_hidden_people(tmp_path):
    FullText(tmp_path / "fulltext").rebuild(PEOPLE, "epoch", "0-0")
    search = searcher(tmp_path, hide=HideRules(typed_config(directory={"hide": [{"mxid": "@svc-.*"}]}).directory.hide))
    hits, more = search.search("mar", 4)
    assert len(hits) == 4 and more is True
    # Five people match besides the hidden one, who neither shows nor makes the result limited.
    hits, more = search.search("mar", 5)
    assert len(hits) == 5 and more is False and "@svc-mars:example.org" not in [h.mxid for h in hits]
    assert search.search("rover", 10) == ([], False)
    assert search.search("mar", 0) == ([], True)
    assert search.search(" - ", 10) == ([], False)


def test_a_kept_search_follows_the_index_as_it_changes(tmp_path):
    index = FullText(tmp_path / "fulltext")
    index.rebuild(PEOPLE, "epoch", "0-0")
    search = searcher(tmp_path)
    assert ids(search, "smith") == ["msmith", "asmith", "msmithers"]
    assert ids(search, "zoe") == []
    index.apply([person("zoe", "Zoë Smith")], ["hr\x1fasmith"], "epoch", "0-1")
    # The changed index is opened beside the one searched, which answers meanwhile.
    wait_until(lambda: ids(search, "smith") == ["msmith", "zoe", "msmithers"], 10, "the change to be searched")
    assert ids(search, "zoe") == ["zoe"]
    index.rebuild(PEOPLE[:2], "epoch", "0-2")
    wait_until(lambda: ids(search, "smith") == ["msmith"], 10, "the rebuilt index to be searched")


SEARCHED = ["berg", "berga", "bergamo", "johan", "smith", "smiht", "smoth", "mith", "mar", "mars", "rover",
            "martin", "marti", "omar", "khan", "kahn", "smith m", "berg j", "maria smith", "ida", "umber", "o"]


def test_search_after_deletions_equals_search_on_a_fresh_index(tmp_path):
    kept = FullText(tmp_path / "kept")
    kept.rebuild(PEOPLE, "epoch", "0-0")
    gone = {"jberg", "omar", "msmith"}  # each holds words nobody else has whole
    kept.apply([], [f"hr\x1f{p}" for p in sorted(gone)], "epoch", "0-1")
    fresh = FullText(tmp_path / "fresh")
    fresh.rebuild([p for p in PEOPLE if p.localpart not in gone], "epoch", "0-1")
    after, new = DirectorySearch(kept.path, HideRules([]), True), DirectorySearch(fresh.path, HideRules([]), True)
    for text in SEARCHED:
        assert ids(after, text, 20) == ids(new, text, 20), text
    # "berg" was Johan Berg's whole word: now it is looked for inside words, as in a fresh index.
    assert ids(after, "berg") == ["lbergamo", "iumbergast"]


def test_two_swapped_letters_are_one_typo(tmp_path):
    FullText(tmp_path / "fulltext").rebuild(PEOPLE, "epoch", "0-0")
    search = searcher(tmp_path)
    assert sorted(ids(search, "smiht")) == ["asmith", "msmith"]
    assert sorted(ids(search, "msith")) == ["asmith", "msmith"]  # the first two letters too
    assert ids(search, "bregamo") == ["lbergamo"]
    assert ids(search, "johan bregamo") == []  # every word must still match
    assert ids(search, "rosa mraoo") == []  # a swap and another typo are two


def test_ready_once_the_index_is_open(tmp_path):
    search = searcher(tmp_path)
    assert search.ready() is False  # no index yet
    FullText(tmp_path / "fulltext").rebuild(PEOPLE, "epoch", "0-0")
    wait_until(search.ready, what="the index opened for searches")
    assert ids(search, "berg") == ["jberg", "lbergamo"]
