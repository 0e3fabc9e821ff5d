"""The local Whoosh index of identities: its schema and its writer (the follower's), and the analysis
of a search term that matches it. Blocking; never on the event loop. The server reads the index
in server/services/directory_ranking.py."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from whoosh import index
from whoosh.analysis import CharsetFilter, LowercaseFilter, RegexTokenizer
from whoosh.codec.whoosh3 import W3Codec
from whoosh.fields import ID, STORED, TEXT, Schema
from whoosh.support.charset import accent_map

from indexer.identity import Identity
from indexer.settings import Config

POSITION_FILE = "position.json"
# Bump when SCHEMA or _document changes: a follower finding another version rebuilds the index.
SCHEMA_VERSION = 3

_WORD = r"\w+"
_words = RegexTokenizer(_WORD) | LowercaseFilter() | CharsetFilter(accent_map)

# Matches inside words are found in the term list (server/services/directory_ranking.py), not in
# trigram fields: those were two thirds of the cost of writing a person.
SCHEMA = Schema(
    key=ID(unique=True, stored=True),
    store=ID(stored=True),
    mxid=ID(stored=True),
    localpart=STORED(),
    display_name=STORED(),
    threepids=STORED(),
    words=TEXT(analyzer=_words, phrase=False),
    tp_words=TEXT(analyzer=_words, phrase=False),
)


class _Codec(W3Codec):  # type: ignore[misc]
    """Whoosh's codec without field length statistics: they serve scoring, which search does not
    use, and Whoosh looks each one up on disk for every posting it writes."""

    length_stats = False


# A batch's commit merges small segments only when the index has this many (see _write_changes).
MERGE_FROM_SEGMENTS = 16
# Uncompressed posting blocks: most terms (a localpart, an address) have one posting, and
# compressing each one's block was about a tenth of the writing. Segments as separate files, not
# one compound file: a reader opens a compound file's parts by copying each into memory (Whoosh's
# BufferFile), in one C call holding the interpreter lock, which stalled the searches going on
# beside the opening of a changed index (16 ms a part at 100,000 people with 3PIDs).
_WRITER = {"limitmb": 256, "codec": _Codec(compression=0), "compound": False}


def fulltext_path(config: Config) -> Path:
    """Where a host keeps its index: data_dir/fulltext."""
    return Path(config.data_dir) / "fulltext"


def document_key(store: str, store_id: str) -> str:
    return f"{store}\x1f{store_id}"


def _document(identity: Identity, threepids: bool) -> dict[str, Any]:
    person = f"{identity.display_name or ''} {identity.localpart}"
    # Addresses are half of what a person costs to write: only when searches may look at them.
    addresses = " ".join(a for _, a in identity.threepids) if threepids else ""
    return {
        "key": document_key(identity.store, identity.store_id),
        "store": identity.store,
        "mxid": identity.mxid,
        "localpart": identity.localpart,
        "display_name": identity.display_name,
        "threepids": [f"{m}:{a}" for m, a in identity.threepids],
        "words": person,
        "tp_words": addresses,
    }


def query_words(text: str) -> list[str]:
    """The folded words of a search term, as the index holds them."""
    return [token.text for token in _words(text)]


class FullText:
    """One Whoosh index directory and the change-stream position it reflects. threepids: whether
    people's addresses are indexed (directory.threepids)."""

    def __init__(self, path: str | Path, threepids: bool = True) -> None:
        self.path = Path(path)
        self.threepids = threepids

    def exists(self) -> bool:
        return index.exists_in(str(self.path)) and (self.path / POSITION_FILE).is_file()

    def position(self) -> dict[str, Any] | None:
        """{"schema", "threepids", "epoch", "last_id"} of the cache this index was built from, or None
        if unusable."""
        if not self.exists():
            return None
        try:
            data = json.loads((self.path / POSITION_FILE).read_text())
            return {"schema": data.get("schema"), "threepids": data.get("threepids"), "epoch": str(data["epoch"]),
                    "last_id": str(data["last_id"])}
        except (OSError, ValueError, KeyError):
            return None

    def _save_position(self, path: Path, epoch: str, last_id: str) -> None:
        # Replaced, never rewritten in place: a new inode tells searchers the index changed.
        tmp = path / (POSITION_FILE + ".tmp")
        tmp.write_text(json.dumps({"schema": SCHEMA_VERSION, "threepids": self.threepids, "epoch": epoch,
                                   "last_id": last_id}))
        tmp.replace(path / POSITION_FILE)

    def rebuild(self, identities: Iterable[Identity], epoch: str, last_id: str) -> int:
        """Write a new index from identities beside the current one, then swap it in; how many it holds."""
        fresh = self.path.with_name(self.path.name + ".new")
        count = _write_fresh(fresh, (_document(identity, self.threepids) for identity in identities))
        self._save_position(fresh, epoch, last_id)
        old = self.path.with_name(self.path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.path.exists():
            self.path.rename(old)
        fresh.rename(self.path)
        shutil.rmtree(old, ignore_errors=True)
        return count

    def apply(self, upserts: Sequence[Identity], deleted_keys: list[str], epoch: str, last_id: str) -> None:
        """Apply a batch of changes, then record the stream position they bring the index to."""
        documents = [_document(identity, self.threepids) for identity in upserts]
        _write_changes(self.path, documents, deleted_keys)
        self._save_position(self.path, epoch, last_id)

    def count(self) -> int:
        return int(index.open_dir(str(self.path)).doc_count())


def _write_fresh(path: Path, documents: Iterator[dict[str, Any]]) -> int:
    """A new index at path holding documents, in their order; how many."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    count = 0
    with index.create_in(str(path), SCHEMA).writer(**_WRITER) as writer:
        for document in documents:
            writer.add_document(**document)
            count += 1
    return count


def _write_changes(path: Path, documents: list[dict[str, Any]], deleted_keys: list[str]) -> None:
    """deleted_keys out of the index at path, documents in (replacing theirs)."""
    writer = index.open_dir(str(path)).writer(**_WRITER)
    try:
        # One reader for the batch: Whoosh's update_document and delete_by_term open one per document.
        with writer.reader() as reader:
            segments = len(list(reader.leaf_readers()))
            keys = {*deleted_keys, *(document["key"] for document in documents)}
            if len(keys) * segments > reader.doc_count_all() // 4:
                # Many keys (a full sync's batches): one pass over the keys the index has costs less
                # than looking each one up in every segment.
                present = keys.intersection(term.decode() for term in reader.lexicon("key"))
            else:
                present = {key for key in keys if ("key", key) in reader}
            for key in present:
                for docnum in reader.postings("key", key).all_ids():
                    writer.delete_document(docnum)
        for document in documents:
            writer.add_document(**document)
    except BaseException:
        writer.cancel()
        raise
    # Merging segments rewrites them, and a searcher reads each new segment's terms again: small
    # segments are merged only once there are many (a consolidation rebuilds the index whole).
    writer.commit(merge=segments >= MERGE_FROM_SEGMENTS)
