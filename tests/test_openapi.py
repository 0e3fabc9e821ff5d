"""The OpenAPI document: made from the routes and schemas/api/, and kept in the repo as it is made."""

from __future__ import annotations

import re

from server.openapi import document, full_app, text, unused_operations
from tests.conftest import REPO


def test_the_document_in_the_repo_is_what_the_generator_makes_byte_for_byte():
    # Byte for byte, not only as JSON: regenerating it must not reorder keys (a diff of nothing).
    kept = (REPO / "schemas" / "openapi.json").read_text(encoding="utf-8")
    assert kept == text(full_app()), "run: .venv/bin/python -m server.openapi > schemas/openapi.json"


def test_every_registered_route_is_documented_with_matrix_errors():
    app = full_app()
    paths = document(app)["paths"]
    for route in app.router.routes:
        path = "/" + re.sub(r"<([^:>]+)(:[^>]*)?>", r"{\1}", route.path)
        for method in route.methods:
            operation = paths[path][method.lower()]
            # A whole sentence: a docstring's first line, so a handler's docstring is one line.
            assert operation["summary"].endswith("."), f"{method} {path}: {operation['summary']!r}"
            errors = [r for status, r in operation["responses"].items() if status[0] in "45"]
            assert errors, f"{method} {path} documents no error"
    assert unused_operations(app) == set()
    assert document(app)["openapi"] == "3.1.0"
