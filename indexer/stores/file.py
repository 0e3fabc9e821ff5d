"""The `file` store: a YAML list of people (schemas/file-store.schema.json)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import yaml

from indexer import passwords
from indexer.identity import Identity
from indexer.settings import Config, FileStoreConfig
from indexer.stores import Store, StoreError

log = logging.getLogger(__name__)


class FileStore(Store):
    """People listed in a YAML file, re-read on every sync."""

    kind = "file"

    def __init__(self, settings: FileStoreConfig, config: Config) -> None:
        super().__init__(settings, config)
        self.path = settings.path
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
            store_id = self.person_id(entry, f"entry {index} of {self.path}")
            if store_id is not None:
                yield store_id, entry

    def size(self) -> int:
        """The number of entries in the file."""
        return len(self._read())

    def enumerate(self) -> Iterator[Identity]:
        """Every valid person in the file."""
        for store_id, entry in self._people():
            identity = self.person_identity(store_id, entry)
            if identity is not None:
                yield identity

    def authenticate(self, identity: Identity, password: str) -> bool:
        """Check password against the person's bcrypt hash in the file."""
        if not password:
            return False
        entry = next((e for sid, e in self._people() if sid == identity.store_id), None)
        return passwords.verify(password, entry.get("password") if entry else None, who=identity.mxid)

