"""A throwaway OpenLDAP slapd (mdb database in a temp folder, free ports), for tests and bench/."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

SLAPD = os.environ.get("MXISD_TEST_SLAPD", "/usr/sbin/slapd")
SLAPADD = os.environ.get("MXISD_TEST_SLAPADD", "/usr/sbin/slapadd")
SUFFIX = "dc=example,dc=org"
ADMIN_DN = f"cn=admin,{SUFFIX}"
ADMIN_PASSWORD = "admin-secret"
READER_DN = f"cn=reader,{SUFFIX}"
READER_PASSWORD = "reader-secret"

_CONFIG = """\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
modulepath /usr/lib/ldap
moduleload back_mdb
{modules}
pidfile {root}/slapd.pid
{tls}
sizelimit {sizelimit}
access to attrs=userPassword by anonymous auth by self write by * none
access to * by dn.exact="{reader}" read by self read by * none
database mdb
maxsize {map_size}
suffix "{suffix}"
rootdn "{admin}"
rootpw {password}
directory {root}/db
index objectClass eq
index entryUUID eq
index uid eq
index modifyTimestamp eq
{extra}"""

_BASE_LDIF = f"""\
dn: {SUFFIX}
objectClass: top
objectClass: dcObject
objectClass: organization
o: Example
dc: example

dn: {READER_DN}
objectClass: simpleSecurityObject
objectClass: organizationalRole
cn: reader
userPassword: {READER_PASSWORD}

"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost (its own CA): (cert, key)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


class Slapd:
    """slapd serving SUFFIX on ldap://127.0.0.1:<port> (STARTTLS too) and ldaps://127.0.0.1:<tls_port>."""

    def __init__(self, root: Path, sizelimit: str = "unlimited", extra: str = "", modules: str = "",
                 map_size: int = 4 << 30) -> None:
        """extra: more lines for the database section (more indexes, overlays); modules: more
        global lines (moduleload of an overlay); map_size: the most bytes the mdb database may grow
        to (a million entries need more than the default 4 GiB)."""
        self.root = root
        self.port = free_port()
        self.tls_port = free_port()
        self.uri = f"ldap://127.0.0.1:{self.port}"
        self.ldaps_uri = f"ldaps://127.0.0.1:{self.tls_port}"
        self.cert, key = make_certificate(root)
        (root / "db").mkdir(exist_ok=True)
        tls = f"TLSCertificateFile {self.cert}\nTLSCertificateKeyFile {key}"
        self.config = root / "slapd.conf"
        self.config.write_text(_CONFIG.format(root=root, tls=tls, suffix=SUFFIX, admin=ADMIN_DN,
                                              password=ADMIN_PASSWORD, reader=READER_DN, sizelimit=sizelimit,
                                              extra=extra, modules=modules, map_size=map_size))
        self.process: subprocess.Popen[bytes] | None = None

    def load(self, ldif: str | Iterable[str] = "") -> None:
        """slapadd the suffix, the reader account and ldif (a string, or chunks written one by one so
        that a large directory is never whole in memory), while slapd is stopped (fast bulk load)."""
        path = self.root / "load.ldif"
        with path.open("w") as out:
            out.write(_BASE_LDIF)
            out.writelines([ldif] if isinstance(ldif, str) else ldif)
        subprocess.run([SLAPADD, "-q", "-f", str(self.config), "-l", str(path)],
                       check=True, capture_output=True, timeout=3600)

    def start(self) -> None:
        log = open(self.root / "slapd.log", "ab")
        self.process = subprocess.Popen(
            [SLAPD, "-d", "0", "-f", str(self.config), "-h", f"{self.uri}/ {self.ldaps_uri}/"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"slapd exited with {self.process.returncode}: "
                                   + (self.root / "slapd.log").read_text(errors="replace"))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("slapd did not start listening within 30 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a frozen slapd handles SIGTERM only once thawed
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def freeze(self) -> None:
        """Stop answering while keeping the port: connections are still accepted (by the kernel,
        into the listen backlog) and nothing is ever answered, as a hung directory does."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        # The signal takes effect a moment later: a request sent meanwhile would still be answered.
        stat = Path(f"/proc/{self.process.pid}/stat")
        deadline = time.monotonic() + 10
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "T":
            if time.monotonic() > deadline:
                raise RuntimeError("slapd did not stop within 10 s of SIGSTOP")
            time.sleep(0.01)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """Stop at once, as a crashed or unplugged directory does."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        self.process = None
