"""The local Whoosh index of identities: schema, writer and searcher. Blocking; never on the event loop."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable

from whoosh import index
from whoosh.analysis import CharsetFilter, LowercaseFilter, RegexTokenizer
from whoosh.fields import ID, KEYWORD, TEXT, Schema
from whoosh.qparser import MultifieldParser, OrGroup
from whoosh.support.charset import accent_map

from indexer.identity import Identity

POSITION_FILE = "position.json"

_folding = RegexTokenizer() | LowercaseFilter() | CharsetFilter(accent_map)

SCHEMA = Schema(
    key=ID(unique=True, stored=True),
    store=ID(stored=True),
    mxid=ID(stored=True),
    localpart=TEXT(analyzer=RegexTokenizer(r"[^._=\-/+]+") | LowercaseFilter()),
    display_name=TEXT(analyzer=_folding, stored=True),
    threepids=KEYWORD(lowercase=True, commas=True, stored=True),
)


def document_key(store: str, store_id: str) -> str:
    return f"{store}\x1f{store_id}"


def _document(identity: Identity) -> dict[str, Any]:
    return {
        "key": document_key(identity.store, identity.store_id),
        "store": identity.store,
        "mxid": identity.mxid,
        "localpart": identity.localpart,
        "display_name": identity.display_name or "",
        "threepids": ",".join(f"{m}:{a}" for m, a in identity.threepids),
    }


class FullText:
    """One Whoosh index directory and the change-stream position it reflects."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def exists(self) -> bool:
        return index.exists_in(str(self.path)) and (self.path / POSITION_FILE).is_file()

    def position(self) -> dict[str, str] | None:
        """{"epoch", "last_id"} of the cache this index was built from, or None if unusable."""
        if not self.exists():
            return None
        try:
            data = json.loads((self.path / POSITION_FILE).read_text())
            return {"epoch": str(data["epoch"]), "last_id": str(data["last_id"])}
        except (OSError, ValueError, KeyError):
            return None

    def _save_position(self, path: Path, epoch: str, last_id: str) -> None:
        tmp = path / (POSITION_FILE + ".tmp")
        tmp.write_text(json.dumps({"epoch": epoch, "last_id": last_id}))
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

    def search(self, text: str, limit: int = 10) -> list[dict[str, Any]]:
        """Stored fields of the best matches for a free-text query."""
        ix = index.open_dir(str(self.path))
        parser = MultifieldParser(["display_name", "localpart", "mxid", "threepids"], SCHEMA, group=OrGroup)
        with ix.searcher() as searcher:
            return [dict(hit) for hit in searcher.search(parser.parse(text), limit=limit)]
