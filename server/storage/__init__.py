"""Durable SQL state the identity server owns: accounts, accepted terms, validation sessions,
bindings and pending invites. SQLite in data_dir by default, PostgreSQL by URL.

`schema` holds the tables and their migrations, `records` the rows as the server sees them,
`database` the engine and the schema upgrade; each `*_queries` module the operations on one area's
tables, all of them methods of the one `Storage`. Every such method blocks: the HTTP server calls
them through `Storage.run`, in a thread pool.
"""

from __future__ import annotations

from server.storage.account_queries import AccountQueries
from server.storage.binding_queries import BindingQueries
from server.storage.database import Database, StorageError, engine_url
from server.storage.invite_queries import InviteQueries
from server.storage.records import Binding, Delivery, Invite, Session, now_ms, token_hash
from server.storage.schema import BINDINGS_GENERATION, CACHE_GENERATION, SCHEMA_VERSION, schema_version
from server.storage.session_queries import SessionQueries

__all__ = [
    "BINDINGS_GENERATION", "CACHE_GENERATION", "SCHEMA_VERSION", "Binding", "Delivery", "Invite", "Session",
    "Storage", "StorageError", "engine_url", "now_ms", "schema_version", "token_hash",
]


class Storage(Database, AccountQueries, SessionQueries, BindingQueries, InviteQueries):
    """The durable state; one per process, shared by its threads."""
