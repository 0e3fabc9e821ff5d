"""The `file` store: a YAML list of people (schemas/file-store.schema.json)."""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator

import bcrypt
import jsonschema
import yaml

from indexer.config import explain, load_schema
from indexer.identity import Identity
from indexer.stores import Store, StoreError

log = logging.getLogger(__name__)


class FileStore(Store):
    """People listed in a YAML file, re-read on every sync."""

    kind = "file"

    def __init__(self, store_config: dict[str, Any], config: dict[str, Any]) -> None:
        super().__init__(store_config, config)
        self.path: str = store_config["path"]
        self._validator = jsonschema.Draft202012Validator(load_schema("file-store.schema.json")["$defs"]["person"])
        self._cache: tuple[tuple[int, int], list[dict[str, Any]]] | None = None

    def _read(self) -> list[dict[str, Any]]:
        try:
            stat = os.stat(self.path)
            key = (stat.st_mtime_ns, stat.st_size)
            if self._cache and self._cache[0] == key:
                return self._cache[1]
            with open(self.path, encoding="utf-8") as handle:
                data = yaml.safe_load(handle)
        except OSError as exc:
            raise StoreError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise StoreError(f"{self.path} is not valid YAML: {exc}") from None
        if data is None:
            data = []
        if not isinstance(data, list):
            raise StoreError(f"{self.path}: expected a YAML list of people, got {type(data).__name__}")
        self._cache = (key, data)
        return data

    def _people(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for index, entry in enumerate(self._read()):
            error = next(iter(self._validator.iter_errors(entry)), None)
            if error is not None:
                log.warning("store %s: entry %d of %s skipped: %s", self.name, index, self.path, explain(error))
                continue
            # Without an explicit id, the user id is the stable id (case does not make a new person).
            yield str(entry.get("id") or (entry.get("mxid") or entry["localpart"]).strip().lower()), entry

    def size(self) -> int:
        """The number of entries in the file."""
        return len(self._read())

    def enumerate(self) -> Iterator[Identity]:
        """Every valid person in the file."""
        for store_id, entry in self._people():
            threepids = [("email", a) for a in entry.get("emails", [])]
            threepids += [("msisdn", str(a)) for a in entry.get("phones", [])]
            threepids += [(t["medium"], t["address"]) for t in entry.get("threepids", [])]
            identity = self.build_identity(
                store_id, entry.get("mxid") or entry["localpart"], entry.get("display_name"), threepids
            )
            if identity is not None:
                yield identity

    def authenticate(self, identity: Identity, password: str) -> bool:
        """Check password against the person's bcrypt hash in the file."""
        if not password:
            return False
        entry = next((e for sid, e in self._people() if sid == identity.store_id), None)
        stored = entry.get("password") if entry else None
        if not stored:
            log.info("store %s: %s has no password hash", self.name, identity.mxid)
            return False
        try:
            return bcrypt.checkpw(password.encode(), stored.encode())
        except ValueError:
            log.warning("store %s: %s has a malformed bcrypt hash", self.name, identity.mxid)
            return False

