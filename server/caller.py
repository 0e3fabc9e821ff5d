"""What the server knows of who sent a request: the client's address behind reverse proxies, and
whether a token it sent can be one that we or the homeserver handed out."""

from __future__ import annotations

import ipaddress

from sanic import Request


def usable_token(token: str) -> bool:
    """Whether a token can be one we or the homeserver handed out: printable ASCII. Anything else
    (bytes that are not UTF-8 arrive as surrogates) is refused as unknown before it is hashed,
    stored or sent on."""
    return token.isascii() and token.isprintable()


def client_address(request: Request, proxies_count: int) -> str:
    """The client's address for per-client limits: behind proxies_count reverse proxies
    (server.proxies_count), the X-Forwarded-For entry that many hops from the right (each proxy
    appends the address it was reached from; entries further left are whatever the client wrote, so
    they never count); else the TCP peer's. A forwarded value that is not an IP address (any bytes a
    client sent) counts as the peer's."""
    if proxies_count:
        hops = [hop.strip() for header in request.headers.getall("x-forwarded-for", []) for hop in header.split(",")]
        hops = [hop for hop in hops if hop]
        if len(hops) >= proxies_count:
            try:
                return str(ipaddress.ip_address(hops[-proxies_count]))
            except ValueError:
                pass
    return request.ip
