"""`mxisd doctor`: checks everything the config points at and prints one line per check, saying in
plain words what is wrong and what to do. One module per kind of check; this one runs them."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TextIO

from indexer.settings import Config

OK = "ok"
PROBLEM = "PROBLEM"
NOT_CHECKED = "-"


@dataclass(frozen=True)
class Finding:
    """The outcome of one check: ok, PROBLEM, or "-" for something not configured or not checked."""

    level: str
    subject: str
    text: str

    def line(self) -> str:
        return f"{self.level:<8} {self.subject}: {self.text}"


def ok(subject: str, text: str) -> Finding:
    return Finding(OK, subject, text)


def problem(subject: str, text: str) -> Finding:
    return Finding(PROBLEM, subject, text)


def not_checked(subject: str, text: str) -> Finding:
    return Finding(NOT_CHECKED, subject, text)


# One group of checks of one thing: blocking, yielding its findings in order and stopping at its first
# problem when the checks after it depend on it (no base DN check after a refused bind).
Checks = Callable[[], Iterator[Finding]]


def _groups(config: Config) -> list[tuple[str, Checks]]:
    from server.doctor import homeserver, local, notify, public_url, stores

    groups: list[tuple[str, Checks]] = [
        ("signing key", lambda: local.signing_key(config)),
        ("storage", lambda: local.storage(config)),
        ("redis", lambda: local.redis(config)),
    ]
    for index, settings in enumerate(config.stores):
        groups.append((f"store {settings.name}", partial(stores.check, settings, config, f"stores[{index}]")))
    groups += [
        ("email", lambda: notify.email(config)),
        ("sms", lambda: notify.sms(config)),
        ("homeserver client API", lambda: homeserver.client_api(config)),
        ("homeserver federation API", lambda: homeserver.federation(config)),
        ("public URL", lambda: public_url.check(config)),
    ]
    return groups


def _bounded(subject: str, checks: Checks, timeout: float) -> Iterator[Finding]:
    """The findings of checks, each of which may take at most timeout seconds: the checks run in a
    thread of their own, left behind (a daemon) when one hangs past every timeout of its client."""
    findings: queue.Queue[Finding | None] = queue.Queue()

    def work() -> None:
        try:
            for finding in checks():
                findings.put(finding)
        except Exception as exc:  # an unforeseen failure of one check must not hide the others' findings
            findings.put(problem(subject, f"the check failed: {type(exc).__name__}: {exc}"))
        finally:
            findings.put(None)

    threading.Thread(target=work, name=f"doctor {subject}", daemon=True).start()
    while True:
        try:
            finding = findings.get(timeout=timeout)
        except queue.Empty:
            yield problem(subject, f"no answer within {timeout:g} s (mxisd doctor --timeout sets this)")
            return
        if finding is None:
            return
        yield finding


def run(config: Config, out: TextIO, timeout: float) -> int:
    """Run every check, printing each finding as it comes; 0 when nothing is a problem, else 1."""
    problems = checked = 0
    for subject, checks in _groups(config):
        for finding in _bounded(subject, checks, timeout):
            print(finding.line(), file=out, flush=True)
            checked += finding.level != NOT_CHECKED
            problems += finding.level == PROBLEM
    if problems:
        print(f"{problems} problem(s) found in {checked} check(s): see the lines marked {PROBLEM}", file=out)
        return 1
    print(f"all {checked} checks passed", file=out)
    return 0
