"""contrib/systemd/mxisd.service: systemd accepts it, its hardening holds, and `mxisd run` stops and
reloads the way the unit expects."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, started, wait_until

UNIT = REPO / "contrib" / "systemd" / "mxisd.service"
INSTALLED = "/opt/mxisd/bin/mxisd"


def service_settings() -> dict[str, list[str]]:
    """The [Service] section's settings, each key with its values in order."""
    settings: dict[str, list[str]] = {}
    section = None
    for line in UNIT.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def unit_here(tmp_path: Path) -> Path:
    """The unit with its commands pointing at this environment's mxisd (systemd-analyze checks that
    they exist)."""
    mxisd = shutil.which("mxisd", path=str(Path(sys.executable).parent))
    assert mxisd is not None
    path = tmp_path / "mxisd.service"
    path.write_text(UNIT.read_text().replace(INSTALLED, mxisd))
    return path


def test_systemd_accepts_the_unit_and_rates_its_exposure_low(tmp_path: Path) -> None:
    path = unit_here(tmp_path)
    verify = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    # Unknown keys and bad values are only warnings (exit 0): none may be printed.
    assert (verify.returncode, verify.stderr, verify.stdout) == (0, "", "")
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(path)],
                              capture_output=True, text=True, timeout=60)
    exposure = re.search(r"Overall exposure level for mxisd.service: ([0-9.]+)", security.stdout)
    assert exposure is not None, security.stdout + security.stderr
    assert float(exposure.group(1)) <= 2.0, security.stdout


def test_the_unit_runs_mxisd_as_its_own_user_with_config_and_state_where_the_readme_says() -> None:
    settings = service_settings()
    assert settings["User"] == ["mxisd"]
    assert settings["ExecStart"] == [f"{INSTALLED} run --config /etc/mxisd/config.yml"]
    assert settings["StateDirectory"] == ["mxisd"] and settings["WorkingDirectory"] == ["/var/lib/mxisd"]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "contrib/systemd/mxisd.service" in readme and "data_dir: /var/lib/mxisd" in readme


def test_mxisd_run_reloads_and_stops_as_the_unit_expects(make_server) -> None:
    settings = service_settings()
    server = started(make_server())
    assert server.process is not None

    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    server.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "received SIGHUP" in server.log(), what="the reload")
    assert server.process.poll() is None
    assert server.lookup_v1("email", "alice@example.com")["mxid"] == "@alice:example.org"

    # KillMode=mixed: the stop signal reaches `mxisd run` alone, which must be done within the
    # timeout and exit 0 (Restart=on-failure would start it again otherwise).
    assert settings["KillMode"] == ["mixed"]
    began = time.monotonic()
    server.process.send_signal(getattr(signal, settings["KillSignal"][0]))
    assert server.process.wait(timeout=float(settings["TimeoutStopSec"][0])) == 0
    assert time.monotonic() - began < float(settings["TimeoutStopSec"][0])


def test_mxisd_run_tells_systemd_when_it_answers_reloads_and_stops(make_server, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    assert service_settings()["Type"] == ["notify"]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify.sock"))
    listener.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    server = make_server()
    server.launch()
    try:
        ready = listener.recv(4096).decode()
        # Ready means answering: the first message comes only once the HTTP server listens.
        assert server.http.get("/_matrix/identity/v2").status_code == 200
        assert ready.splitlines() == ["READY=1", f"STATUS=answering on 127.0.0.1:{server.port}"]

        assert server.process is not None
        server.process.send_signal(signal.SIGHUP)
        reloading = listener.recv(4096).decode().splitlines()
        assert reloading[0] == "RELOADING=1" and re.fullmatch(r"MONOTONIC_USEC=[0-9]+", reloading[1])
        assert listener.recv(4096).decode() == "READY=1"

        assert server.stop() == 0
        assert listener.recv(4096).decode() == "STOPPING=1"
    finally:
        listener.close()
