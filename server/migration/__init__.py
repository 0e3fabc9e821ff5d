"""Moving a Java mxisd or ma1sd deployment over: its config (`mxisd import-config`), its signing key
and its database (`mxisd import-data`)."""

from __future__ import annotations


class MigrationError(Exception):
    """Input that cannot be imported; the message says which and why. Nothing was changed."""
