"""Binding 3PIDs to Matrix IDs and unbinding them: the binding in SQL (its truth), its mirror in
Redis (what lookups read), the invites it resolves, and its signed association (SigningKeys)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from indexer.settings import Config, ServerConfig
from server.bindings import BindingMirror
from server.errors import MatrixError, shown
from server.federation import BadSignature, Federation, FederationError, WrongDestination
from server.services.onbind import InviteWorker
from server.services.validation import ValidationSessions
from server.signing import SigningKeys
from server.storage import Storage, now_ms

log = logging.getLogger(__name__)

def our_names(server: ServerConfig) -> list[str]:
    """The names a homeserver may have been told to reach us by (its X-Matrix "destination"), in
    lower case: server.name, and public_url's host with and without its port."""
    url = urlsplit(server.public_url)
    host = url.hostname or ""
    host = f"[{host}]" if ":" in host else host
    port = url.port or (443 if url.scheme == "https" else 80)
    return list(dict.fromkeys(n.lower() for n in (server.name, host, f"{host}:{port}") if n))


@dataclass(frozen=True)
class SignedRequest:
    """A request as its X-Matrix signature covers it."""

    authorization: str
    method: str
    uri: str
    body: Any


@dataclass(frozen=True)
class Bindings:
    """/3pid/bind and /3pid/unbind."""

    config: Config
    storage: Storage
    mirror: BindingMirror
    sessions: ValidationSessions
    invite_worker: InviteWorker
    keys: SigningKeys
    federation: Federation

    async def bind(self, sid: str, client_secret: str, mxid: str, owner: str | None) -> dict[str, Any]:
        """Bind the 3PID that session sid validated to mxid (replacing its binding to anyone else),
        mirror it to Redis and queue the delivery of the invites waiting for the 3PID; the signed
        association. owner is the Matrix ID of the request's token (None on the v1 paths).

        Raises MatrixError: 403 M_UNAUTHORIZED when owner is not mxid; those of
        ValidationSessions.validated_session; 403 M_FORBIDDEN when sessions.policy refuses to bind
        the 3PID to mxid."""
        if owner is not None and mxid != owner:
            raise MatrixError(403, "M_UNAUTHORIZED", "A token can only bind 3PIDs to its own Matrix ID")
        session = await self.sessions.validated_session(sid, client_secret)
        local = await self.sessions.policy.may_bind(session.medium, session.address, mxid)
        ts = now_ms()
        replaced, generation = await self.storage.run(self.storage.bind, session.medium, session.address, mxid, ts,
                                                      local)
        await self.mirror.put(session.medium, session.address, mxid, generation, local)
        if replaced is not None and replaced.mxid != mxid:
            log.info("%s %s rebound from %s to %s", session.medium, session.address, replaced.mxid, mxid)
        else:
            log.info("%s %s bound to %s", session.medium, session.address, mxid)
        await self.invite_worker.addresses_known([(session.medium, session.address)], mxid)
        return self.keys.bound_association(session.medium, session.address, mxid, ts)

    async def unbind_by_session(self, medium: str, address: str, mxid: str, sid: str, client_secret: str) -> None:
        """Remove the binding of (medium, address) to mxid, if there is one, proven by session sid
        having validated that 3PID.

        Raises MatrixError: those of ValidationSessions.live_session; 403 M_SESSION_NOT_VALIDATED; 403
        M_FORBIDDEN when the session validated another 3PID."""
        session = await self.sessions.live_session(sid, client_secret)
        if session.validated_at is None:
            raise MatrixError(403, "M_SESSION_NOT_VALIDATED", "This 3PID has not been validated yet")
        if (session.medium, session.address) != (medium, address):
            raise MatrixError(403, "M_FORBIDDEN", "The session validated a different 3PID")
        await self._unbind(medium, address, mxid, f"session {session.sid}")

    async def unbind_by_homeserver(self, medium: str, address: str, mxid: str, request: SignedRequest) -> None:
        """Remove the binding of (medium, address) to mxid, if there is one, proven by the X-Matrix
        signature of mxid's homeserver on request.

        Raises MatrixError: 403 M_FORBIDDEN for a signature that is malformed, does not verify, was
        made for another destination or by another homeserver; 502 M_UNKNOWN when the homeserver's
        keys cannot be fetched."""
        origin = await self._signing_homeserver(request)
        if mxid.partition(":")[2] != origin:
            raise MatrixError(403, "M_FORBIDDEN", f"{origin} cannot unbind a user of another homeserver")
        await self._unbind(medium, address, mxid, f"signature of {origin}")

    async def association(self, medium: str, address: str, mxid: str) -> dict[str, Any] | None:
        """The signed association that binding (medium, address) to mxid answered, or None when the
        3PID is not bound to mxid."""
        binding = await self.storage.run(self.storage.binding, medium, address)
        if binding is None or binding.mxid != mxid:
            return None
        return self.keys.bound_association(binding.medium, binding.address, binding.mxid, binding.ts)

    async def _unbind(self, medium: str, address: str, mxid: str, proof: str) -> None:
        generation = await self.storage.run(self.storage.unbind, medium, address, mxid)
        if generation is not None:
            await self.mirror.remove(medium, address, generation)
            log.info("%s %s unbound from %s (%s)", medium, address, mxid, proof)

    async def _signing_homeserver(self, request: SignedRequest) -> str:
        try:
            signer: str = await self.federation.verify_request(
                request.authorization, request.method, request.uri, request.body, our_names(self.config.server))
            return signer
        except ValueError as exc:
            raise MatrixError(403, "M_FORBIDDEN", f"Invalid X-Matrix authorization: {exc}") from None
        except WrongDestination as exc:
            accepted = ", ".join(exc.our_names)
            log.warning("unbind refused: signed for %s, which is not a name of this server (it answers to %s)",
                        shown(exc.destination), accepted)
            raise MatrixError(403, "M_FORBIDDEN", f"The request was signed for {exc.destination!r}, which is not a "
                                                  f"name of this identity server; it answers to {accepted}") from None
        except BadSignature as exc:
            log.warning("unbind refused: %s", exc)
            raise MatrixError(403, "M_FORBIDDEN", "The homeserver signature does not verify") from None
        except FederationError as exc:
            log.warning("unbind: cannot check the homeserver signature: %s", exc)
            raise MatrixError(502, "M_UNKNOWN",
                              "Could not fetch the homeserver's keys to check its signature") from None
