"""A plain (not editable) `pip install .` gives a working mxisd: schemas, admin page and templates included."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))

# Run from the installed copy with the working directory outside the repository, so nothing can be
# read from the checkout by accident.
CHECK = """
import importlib.metadata, json, sys
from pathlib import Path
import indexer.config, server.api.admin
from server.notify import read_template

here = Path(indexer.config.__file__).resolve()
assert here.is_relative_to(Path(sys.prefix).resolve()), f"indexer imported from {here}, not the installed copy"
schemas = {}
for name in sys.argv[1:]:
    schemas[name] = indexer.config.load_schema(name)
templates = {p: read_template(None, p) for p in ("email-validation.eml", "email-invite.eml", "submit-success.html")}
dist = importlib.metadata.distribution("mxisd")
print(json.dumps({"schemas": schemas, "admin_page": server.api.admin.PAGE, "templates": templates,
                  "license": dist.metadata["License-Expression"], "license_text": dist.read_text("licenses/LICENSE")}))
"""


@pytest.mark.slow
def test_a_plain_pip_install_runs_outside_the_checkout(tmp_path: Path) -> None:
    # A copy of the source, so the build's own files (build/, *.egg-info) stay out of the checkout.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "build", "*.egg-info", ".pytest_cache", "data"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # The dependencies (and setuptools, to build) come from the test run's own environment rather than
    # a download: its site-packages is added behind the new environment's.
    new_site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   check=True, capture_output=True, text=True, timeout=60).stdout.strip())
    (new_site / "test-run-packages.pth").write_text(sysconfig.get_path("purelib") + "\n")

    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--no-index", str(source)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert install.returncode == 0, install.stderr
    shutil.rmtree(source)

    check = subprocess.run([venv / "bin" / "mxisd", "check-config", str(REPO / "config.example.yml")],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr

    names = sorted(str(p.relative_to(REPO / "schemas")) for p in (REPO / "schemas").rglob("*.json"))
    loaded = subprocess.run([python, "-c", CHECK, *names], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    shipped = json.loads(loaded.stdout)
    assert shipped["schemas"] == {n: json.loads((REPO / "schemas" / n).read_text(encoding="utf-8")) for n in names}
    assert shipped["admin_page"] == (REPO / "server" / "static" / "admin.html").read_text(encoding="utf-8")
    for name, text in shipped["templates"].items():
        assert text == (REPO / "server" / "notify" / "templates" / name).read_text(encoding="utf-8")
    assert shipped["license"] == "Apache-2.0"
    assert shipped["license_text"] == (REPO / "LICENSE").read_text(encoding="utf-8")

    version = subprocess.run([venv / "bin" / "mxisd", "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout == f"mxisd {PROJECT['project']['version']}\n"
    # The doctor is installed too: it reads the example's file store (and finds no SMTP server to ask).
    doctor = subprocess.run([venv / "bin" / "mxisd", "doctor", "--config", str(REPO / "config.example.yml"),
                             "--timeout", "5"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "ok       store example: finds people, e.g. @alice:example.org" in doctor.stdout, doctor.stderr


def test_every_package_of_the_source_is_in_the_package_list() -> None:
    listed = set(PROJECT["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(REPO).parts) for top in ("indexer", "server")
             for init in (REPO / top).rglob("__init__.py")}
    # What the list leaves out, a plain pip install leaves out.
    assert found - listed == set()
