"""The local Whoosh index of identities: its schema and its writer (the follower's), and the analysis
of a search term that matches it. Blocking; never on the event loop. The server reads the index
in server/services/directory_ranking.py."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from whoosh import index
from whoosh.analysis import CharsetFilter, LowercaseFilter, NgramFilter, RegexTokenizer
from whoosh.fields import ID, STORED, TEXT, Schema
from whoosh.support.charset import accent_map

from indexer.identity import Identity
from indexer.settings import Config

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

def fulltext_path(config: Config) -> Path:
    """Where a host keeps its index: data_dir/fulltext."""
    return Path(config.data_dir) / "fulltext"


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
        return int(index.open_dir(str(self.path)).doc_count())
