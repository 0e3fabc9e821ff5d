"""Resolving stored 3PID invites: when the invited address becomes known (or was known already, under
a spelling the homeserver's lookup missed), POST the signed invites to the homeserver of its Matrix
ID (`/_matrix/federation/v1/3pid/onbind`), from a delivery queue in SQL retried with exponential
backoff across restarts; and forgetting invites once they expire.

Every worker process runs one `InviteWorker`; a delivery is leased in SQL by the worker sending it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis
import sqlalchemy

from indexer import logs
from indexer.settings import Config
from server.federation import Federation, FederationError, split_server_name
from server.services.lookups import Lookups
from server.signing import BOUND_ASSOCIATION_LIFETIME_MS, SigningKeys
from server.storage import Delivery, Invite, Storage, now_ms

log = logging.getLogger(__name__)

ONBIND_PATH = "/_matrix/federation/v1/3pid/onbind"

IDLE_WAKE_S = 30.0  # look at the queue at least this often: other workers queue deliveries too
# An invited mark outlives any pruning for this long after it is made: far longer than storing the
# invite in SQL can take (a pruning that read SQL before the invite was there must not remove it).
MARK_KEPT_MS = 10 * 60 * 1000


def onbind_body(keys: SigningKeys, medium: str, address: str, mxid: str, pending: list[Invite],
                ts: int) -> dict[str, Any]:
    """The association signed with our long-term key, its invites inside, each `signed` block signed too."""
    invites = [{"medium": i.medium, "address": i.address, "mxid": mxid, "room_id": i.room_id, "sender": i.sender,
                "token": i.token, "signed": keys.sign({"mxid": mxid, "token": i.token})} for i in pending]
    return keys.sign({"medium": medium, "address": address, "mxid": mxid, "ts": ts, "not_before": ts,
                      "not_after": ts + BOUND_ASSOCIATION_LIFETIME_MS, "invites": invites})


def permanent(status: int) -> bool:
    """A refusal that retrying cannot change (a 4xx other than 408 and 429)."""
    return 400 <= status < 500 and status not in (408, 429)


class InviteWorker:
    """Queues, sends and retries onbind deliveries; checks pending invites against the lookup cache."""

    def __init__(self, config: Config, storage: Storage, lookups: Lookups, federation: Federation,
                 keys: SigningKeys) -> None:
        settings = config.invites
        self.expire_ms = settings.expire_after * 1000
        self.check_every_s = settings.check_every
        self.retry_first_ms = settings.retry_first * 1000
        self.retry_max_ms = settings.retry_max * 1000
        self.known_delay_ms = settings.known_address_delay * 1000
        self.known_retry_for_ms = settings.known_address_retry_for * 1000
        # A sender that died mid-request releases its lease after this: longer than any request.
        self.lease_ms = int((config.federation.deadline_s + 60) * 1000)
        self.storage = storage
        self.lookups = lookups
        self.federation = federation
        self.keys = keys
        self.wake = asyncio.Event()

    async def addresses_known(self, threepids: list[tuple[str, str]], mxid: str) -> None:
        """These (medium, address) now map to mxid: queue the delivery of their pending invites."""
        queued = await self.storage.run(self.storage.queue_deliveries, threepids, mxid, now_ms())
        for medium, address in queued:
            log.info("invites for %s %s queued for delivery to %s", medium, address, mxid)
        if queued:
            self.wake.set()

    async def logged_in(self, threepids: list[tuple[str, str]], mxid: str) -> None:
        """A login proved that mxid owns these (medium, address): queue the delivery of their
        pending invites. SQL is asked only about the 3PIDs marked as invited in Redis, which on
        nearly every login is none."""
        marked = await self.lookups.invited(threepids)
        if any(marked):
            await self.addresses_known([t for t, invited in zip(threepids, marked) if invited], mxid)

    async def storing(self, medium: str, address: str) -> None:
        """An invite for (medium, canonical address) is about to be stored: mark the 3PID as
        invited in Redis first, so that a login on any host from now on asks SQL for it."""
        await self.lookups.mark_invited(medium, address, MARK_KEPT_MS)

    async def stored_for_known_address(self, medium: str, address: str, mxid: str) -> None:
        """An invite was just stored for an address already known to mxid: deliver it after
        known_address_delay, once the homeserver has recorded the room's invite event, which it does
        only after store-invite has answered."""
        await self.storage.run(self.storage.queue_deliveries, [(medium, address)], mxid, now_ms(), self.known_delay_ms)
        log.info("invite for %s %s queued for delivery to %s in %d ms", medium, address, mxid, self.known_delay_ms)
        self.wake.set()  # so that the loop's next wait ends when this delivery is due

    async def run(self) -> None:
        """Until cancelled: check pending invites every check_every, send deliveries when due."""
        next_check = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                if loop.time() >= next_check:
                    await self.check_pending()
                    next_check = loop.time() + self.check_every_s
                await self.send_due()
                earliest = await self.storage.run(self.storage.next_delivery_at)
            except (redis.exceptions.RedisError, sqlalchemy.exc.SQLAlchemyError) as exc:
                logs.repeated.warning(log, "invite delivery paused: %s", exc, key="invites paused")
                earliest = None
            wait = min(IDLE_WAKE_S, max(0.0, next_check - loop.time()))
            if earliest is not None:
                wait = min(wait, max(0.0, (earliest - now_ms()) / 1000))
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=max(wait, 0.05))
            except TimeoutError:
                pass

    async def check_pending(self) -> None:
        """Forget expired invites; mark in Redis the 3PIDs that have pending invites, and only
        those (see logged_in); queue deliveries for pending invites whose address a store sync
        (or a binding made by another worker) has made known."""
        expired = await self.storage.run(self.storage.delete_invites_before, now_ms() - self.expire_ms)
        if expired:
            log.info("forgot %d expired invites", expired)
        # The invited marks made again from SQL (at the start too: the first check runs then).
        since = await self.lookups.invited_clock_ms()
        unsettled = await self.storage.run(self.storage.unsettled_threepids)
        unmarked = await self.lookups.prune_invited(since, [(m, a) for m, a, _ in unsettled])
        if unmarked:
            log.info("%d 3PIDs without pending invites any more", unmarked)
        threepids = [(m, a) for m, a, queued in unsettled if not queued]
        if not threepids:
            return
        for (medium, address), mxid in zip(threepids, await self.lookups.by_address(threepids)):
            if mxid is not None:
                await self.addresses_known([(medium, address)], mxid)

    async def send_due(self) -> None:
        now = now_ms()
        due = await self.storage.run(self.storage.claim_due_deliveries, now, now + self.lease_ms)
        outcomes = await asyncio.gather(*(self.deliver(d) for d in due), return_exceptions=True)
        for delivery, outcome in zip(due, outcomes):
            if isinstance(outcome, Exception):
                # The lease runs out and the delivery is tried again then.
                logs.repeated.error(log, "onbind delivery for %s %s failed: %r", delivery.medium, delivery.address,
                                    outcome, key=f"onbind {type(outcome).__name__}")

    async def deliver(self, delivery: Delivery) -> None:
        """One attempt: POST onbind; settle the invites on success or a permanent refusal, else retry later."""
        pending = await self.storage.run(self.storage.unsettled_invites, delivery.medium, delivery.address)
        tokens = [i.token for i in pending]
        if not pending:
            await self.storage.run(self.storage.finish_delivery, delivery.id, tokens, now_ms())
            return
        # A binding's association was made when it was bound; one a store made known is new now.
        binding = await self.storage.run(self.storage.binding, delivery.medium, delivery.address)
        ts = binding.ts if binding is not None and binding.mxid == delivery.mxid else now_ms()
        body = onbind_body(self.keys, delivery.medium, delivery.address, delivery.mxid, pending, ts)
        try:
            server_name = delivery.mxid.partition(":")[2]
            split_server_name(server_name)
            status, answer = await self.federation.post(server_name, ONBIND_PATH, body)
        except ValueError:
            log.error("invites for %s %s dropped: %s has no valid server name", delivery.medium, delivery.address,
                      delivery.mxid)
            await self.storage.run(self.storage.finish_delivery, delivery.id, tokens, now_ms())
            return
        except FederationError as exc:
            await self._retry(delivery, str(exc))
            return
        if 200 <= status < 300:
            log.info("%d invites for %s %s delivered to %s (attempt %d)", len(pending), delivery.medium,
                     delivery.address, delivery.mxid, delivery.attempts + 1)
        elif permanent(status) and self._early(pending):
            # The homeserver may not have recorded the room's invite event yet.
            await self._retry(delivery, f"HTTP {status}, within known_address_retry_for of the invite")
            return
        elif permanent(status):
            errcode = answer.get("errcode") if isinstance(answer, dict) else None
            log.warning("invites for %s %s refused by the homeserver of %s (HTTP %d %s): not retried",
                        delivery.medium, delivery.address, delivery.mxid, status, errcode or "")
        else:
            await self._retry(delivery, f"HTTP {status}")
            return
        await self.storage.run(self.storage.finish_delivery, delivery.id, tokens, now_ms())

    def _early(self, pending: list[Invite]) -> bool:
        """Whether one of these invites was stored for an already known address less than
        known_address_retry_for ago."""
        since = now_ms() - self.known_retry_for_ms
        return any(i.known_mxid is not None and i.created_at > since for i in pending)

    async def _retry(self, delivery: Delivery, error: str) -> None:
        attempts = delivery.attempts + 1
        wait_ms = min(self.retry_max_ms, self.retry_first_ms * 2 ** (attempts - 1))
        log.warning("onbind for %s %s to %s failed (attempt %d: %s); retrying in %d s", delivery.medium,
                    delivery.address, delivery.mxid, attempts, error, wait_ms // 1000)
        await self.storage.run(self.storage.retry_delivery, delivery.id, attempts, now_ms() + wait_ms, error)
