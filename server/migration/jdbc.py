"""JDBC connection settings of mxisd and ma1sd turned into SQLAlchemy URLs."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import sqlalchemy as sa

from server.migration import MigrationError

DRIVERS = {"postgresql": "postgresql", "mysql": "mysql", "mariadb": "mysql"}


def sqlalchemy_url(kind: str, connection: str, username: str | None = None, password: str | None = None,
                   base: Path | None = None) -> tuple[str, list[str]]:
    """The URL of a database mxisd reached as `jdbc:<kind>:<connection>` (a file path for SQLite,
    `//host[:port]/db?user=..&password=..` otherwise), and the JDBC parameters it has no use for.
    A relative SQLite path is taken relative to base."""
    if kind == "sqlite":
        path = Path(connection)
        if base is not None and not path.is_absolute():
            path = base / path
        return f"sqlite:///{path}", []
    if kind not in DRIVERS:
        raise MigrationError(f"unknown database type {kind!r} (sqlite, postgresql, mysql or mariadb)")
    parts = urlsplit(connection if connection.startswith("//") else "//" + connection)
    if not parts.hostname or not parts.path.strip("/"):
        raise MigrationError(f"{connection!r} is not a JDBC connection like //host:5432/database")
    query: dict[str, str] = {}
    unused = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "user":
            username = username or value
        elif name == "password":
            password = password or value
        elif name == "currentSchema" and kind == "postgresql":
            query["options"] = f"-csearch_path={value}"
        else:
            unused.append(f"{name}={value}")
    url = sa.URL.create(DRIVERS[kind], username=username or None, password=password or None,
                        host=parts.hostname, port=parts.port, database=parts.path.strip("/"), query=query)
    return url.render_as_string(hide_password=False), unused
