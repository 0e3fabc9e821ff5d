"""A Samba AD domain controller provisioned into a temp folder, serving LDAP(S) on the fixed ports of
the loopback (Samba cannot be told other ports): one for a whole test run."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import ldap3

from tests.slapd import make_certificate

SAMBA = os.environ.get("MXISD_TEST_SAMBA", "/usr/sbin/samba")
SAMBA_TOOL = os.environ.get("MXISD_TEST_SAMBA_TOOL", "/usr/bin/samba-tool")
REALM = "corp.example.org"
DOMAIN_DN = "DC=corp,DC=example,DC=org"
ADMIN_DN = f"CN=Administrator,CN=Users,{DOMAIN_DN}"
ADMIN_PASSWORD = "Adm1n-Passw0rd!"


def listening(port: int) -> bool:
    """Whether something accepts connections on this port of the loopback."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class SambaDC:
    """A Samba AD DC provisioned into root, serving only LDAP on the fixed ports of the loopback."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cert, key = make_certificate(root)
        key.chmod(0o600)  # Samba refuses a key others can read
        self.smb_conf = root / "dc" / "etc" / "smb.conf"
        self.process: subprocess.Popen[bytes] | None = None
        self._run([
            SAMBA_TOOL, "domain", "provision", f"--realm={REALM.upper()}", "--domain=CORP",
            "--server-role=dc", "--dns-backend=NONE", f"--targetdir={root / 'dc'}", f"--adminpass={ADMIN_PASSWORD}",
            "--option=interfaces=lo", "--option=bind interfaces only=yes", "--option=server services=ldap",
            f"--option=tls certfile={self.cert}", f"--option=tls keyfile={key}", "--option=tls cafile=",
            f"--option=log file={root / 'log.%m'}",
        ], timeout=300)

    def _run(self, args: list[str], timeout: float = 120) -> str:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:3])} failed ({done.returncode}): {done.stderr or done.stdout}")
        return done.stdout

    def start(self) -> None:
        log = open(self.root / "samba.log", "ab")
        self.process = subprocess.Popen([SAMBA, "-s", str(self.smb_conf), "--foreground", "--no-process-group"],
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"samba exited with {self.process.returncode}: "
                                   + (self.root / "samba.log").read_text(errors="replace"))
            if listening(636):
                try:
                    self.admin().unbind()
                    return
                except ldap3.core.exceptions.LDAPException:
                    pass
            time.sleep(0.2)
        raise RuntimeError("samba did not answer LDAPS on 127.0.0.1:636 within 120 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def admin(self) -> ldap3.Connection:
        tls = ldap3.Tls(ca_certs_file=str(self.cert), validate=ssl.CERT_REQUIRED)
        server = ldap3.Server("ldaps://127.0.0.1", tls=tls, get_info=ldap3.NONE, connect_timeout=5)
        return ldap3.Connection(server, ADMIN_DN, ADMIN_PASSWORD, auto_bind=True, raise_exceptions=True)

    def tool(self, *args: str) -> str:
        return self._run([SAMBA_TOOL, *args, "-s", str(self.smb_conf)])
