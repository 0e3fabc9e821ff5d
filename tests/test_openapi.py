"""The OpenAPI document: made from the routes and schemas/api/, and kept in the repo as it is made."""

from __future__ import annotations

import json
import re

from server.openapi import document, full_app, unused_operations
from tests.conftest import REPO


def test_the_document_in_the_repo_is_what_the_generator_makes():
    kept = json.loads((REPO / "schemas" / "openapi.json").read_text(encoding="utf-8"))
    assert kept == document(full_app()), "run: .venv/bin/python -m server.openapi > schemas/openapi.json"


def test_every_registered_route_is_documented_with_matrix_errors():
    app = full_app()
    paths = document(app)["paths"]
    for route in app.router.routes:
        path = "/" + re.sub(r"<([^:>]+)(:[^>]*)?>", r"{\1}", route.path)
        for method in route.methods:
            operation = paths[path][method.lower()]
            assert operation["summary"], path
            errors = [r for status, r in operation["responses"].items() if status[0] in "45"]
            assert errors, f"{method} {path} documents no error"
    assert unused_operations(app) == set()
    assert document(app)["openapi"] == "3.1.0"
