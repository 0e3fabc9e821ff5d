"""Telling systemd how `mxisd run` is doing (the sd_notify protocol of a Type=notify unit): ready once
the HTTP server answers, reloading during a SIGHUP, stopping. Outside systemd it does nothing."""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 1.0


def notify(*fields: str) -> None:
    """Send fields ("READY=1", ...) to the socket systemd named in NOTIFY_SOCKET, if it named one.
    A failure is logged and otherwise ignored: the service manager's view is not worth the service."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket: Linux spells its name with a leading NUL
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT_S)
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError as exc:
        log.warning("could not tell systemd %s through NOTIFY_SOCKET %s: %s", fields[0], address, exc)


def monotonic_usec() -> str:
    """The MONOTONIC_USEC field systemd wants beside RELOADING=1."""
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
