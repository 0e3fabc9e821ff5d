"""Log setup shared by every mxisd process: one line per event, naming the process's role."""

from __future__ import annotations

import logging
import sys


def setup(level: str, role: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format=f"%(asctime)s %(levelname)s {role} %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # httpx logs every request at INFO: one line per read-through lookup or sync page is noise.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, getattr(logging, level)))
