"""`mxisd index` on a terminal: a progress line while it reads, then what it did."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

import yaml


def test_index_shows_progress_on_a_terminal(tmp_path, redis_url, prefix):
    people = [{"localpart": f"user{i}", "emails": [f"user{i}@example.org"]} for i in range(3000)]
    (tmp_path / "people.yml").write_text(yaml.safe_dump(people))
    (tmp_path / "config.yml").write_text(yaml.safe_dump({
        "matrix": {"domain": "example.org"},
        "redis": {"url": redis_url, "prefix": prefix},
        "stores": [{"name": "staff", "kind": "file", "path": "people.yml"}],
    }))
    primary, secondary = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "index", "--config", str(tmp_path / "config.yml")],
                               stdout=secondary, stderr=secondary, cwd=tmp_path)
    os.close(secondary)
    output = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the terminal closes when the command exits
            break
        if not chunk:
            break
        output += chunk
    assert process.wait(timeout=120) == 0
    text = output.decode()
    assert "\rstaff: " in text and " entries read, " in text
    assert "staff: full sync ok in" in text and "read 3000, added 3000, changed 0, removed 0" in text


def test_index_output_without_a_terminal_is_the_summary_only(tmp_path, redis_url, prefix):
    (tmp_path / "people.yml").write_text(yaml.safe_dump([{"localpart": "alice"}]))
    (tmp_path / "config.yml").write_text(yaml.safe_dump({
        "matrix": {"domain": "example.org"},
        "redis": {"url": redis_url, "prefix": prefix},
        "stores": [{"name": "staff", "kind": "file", "path": "people.yml"}],
    }))
    done = subprocess.run([sys.executable, "-m", "server.cli", "index", "--config", "config.yml"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0
    assert "\r" not in done.stderr
    assert "staff: full sync ok in" in done.stderr and "read 1, added 1" in done.stderr
