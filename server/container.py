"""The services of one server worker, built once when it starts (`Services.build`), and the typed
accessor through which handlers reach them (`services(request)`); app.ctx holds nothing else."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio
from sanic import Request

from indexer.fulltext import fulltext_path
from indexer.redis_clients import RedisTarget, cache_spread, connect_async
from indexer.rediskeys import BINDINGS, LOCAL_BINDINGS
from indexer.settings import Config
from indexer.status import host_bounds
from server.bindings import BindingMirror
from server.credentials import Credentials
from server.federation import Federation
from server.homeserver import Homeserver
from server.notify.email import EmailSender
from server.notify.sms import SmsSender
from server.rate_limits import RateLimits
from server.read_through import ReadThrough
from server.recursion import Recursion, RemoteAnswers
from server.redis_pipe import CommandPipe, lookup_pipe
from server.services.accounts import Accounts
from server.services.admin import Admin
from server.services.associations import Associations
from server.services.binding import Bindings
from server.services.directory_search import DirectorySearch, HideRules
from server.services.invitations import Invitations
from server.services.logins import Logins
from server.services.lookups import Lookups
from server.services.onbind import InviteWorker
from server.services.policies import InvitePolicy, RegistrationPolicy
from server.services.profiles import Profiles
from server.services.readiness import Readiness
from server.services.session_policy import SessionPolicy
from server.services.terms_of_service import TermsOfService
from server.services.user_directory import UserDirectory
from server.services.validation import ValidationSessions
from server.signing import SigningKeys
from server.storage import Storage
from server.token_cache import TokenCache


def lookup_order(config: Config) -> list[str]:
    """The stores lookups ask, first match wins: bindings before or after the configured stores."""
    stores = [s.name for s in config.stores]
    mirrors = [BINDINGS, LOCAL_BINDINGS]
    return [*mirrors, *stores] if config.lookup.prefer == "binding" else [*stores, *mirrors]


@dataclass
class Services:
    """Everything the handlers of one worker use. The email and SMS senders are None when their
    section is absent from the config."""

    config: Config
    keys: SigningKeys
    tokens: TokenCache
    email: EmailSender | None
    sms: SmsSender | None
    redis: redis.asyncio.Redis
    redis_pipe: CommandPipe
    lookups: Lookups
    associations: Associations
    admin: Admin
    read_through: ReadThrough
    binding_mirror: BindingMirror
    rate_limits: RateLimits
    storage: Storage
    federation: Federation
    homeserver: Homeserver
    directory: DirectorySearch
    search_executor: ThreadPoolExecutor
    credentials: Credentials
    recursion: Recursion
    invite_worker: InviteWorker
    sessions: ValidationSessions
    binding: Bindings
    invitations: Invitations
    accounts: Accounts
    terms: TermsOfService
    user_directory: UserDirectory
    profiles: Profiles
    readiness: Readiness
    logins: Logins
    registration: RegistrationPolicy
    invite_policy: InvitePolicy
    _background: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def build(cls, config: Config, target: RedisTarget) -> Services:
        """The services for config, with their clients of Redis (target), SQL and the homeserver."""
        client = connect_async(target, config.redis.timeout)
        prefix = config.redis.prefix
        domain = config.matrix.domain
        keys = SigningKeys.load_or_create(config.data_dir, config.server.name)
        tokens = TokenCache()
        email = EmailSender(config.email, domain) if config.email else None
        sms = SmsSender(config.sms, domain) if config.sms else None
        redis_pipe = lookup_pipe(target, config.redis.timeout)
        hidden = frozenset() if config.lookup.share_binds else frozenset([LOCAL_BINDINGS])
        spread = cache_spread(config.redis)
        lookups = Lookups(redis_pipe, prefix, lookup_order(config), hidden, [s.name for s in config.stores], spread)
        read_through = ReadThrough(config, lookups)
        binding_mirror = BindingMirror(client, prefix)
        rate_limits = RateLimits(client, prefix)
        storage = Storage(config.storage.url, config.data_dir)
        federation = Federation(config.federation)
        recursion = Recursion(config, federation, RemoteAnswers(client, prefix))
        invite_worker = InviteWorker(config, storage, lookups, federation, keys)
        sessions = ValidationSessions(config, storage, rate_limits, email, sms,
                                      SessionPolicy(config, lookups, read_through))
        terms = TermsOfService(config, storage)
        directory = DirectorySearch(fulltext_path(config), HideRules(config.directory.hide),
                                    config.directory.threepids)
        # Whoosh blocks: searches run in a thread of their own, taking turns on one open reader.
        search_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="search")
        homeserver = Homeserver(config.homeserver)
        credentials = Credentials(config, lookups)
        admin = Admin(client, prefix, config.stores, config.admin.job_start_timeout, host_bounds(config), spread)
        binding = Bindings(config, storage, binding_mirror, sessions, invite_worker, keys, federation)
        return cls(
            config=config,
            keys=keys,
            tokens=tokens,
            email=email,
            sms=sms,
            redis=client,
            redis_pipe=redis_pipe,
            lookups=lookups,
            associations=Associations(config, lookups, read_through, recursion, binding, keys),
            admin=admin,
            read_through=read_through,
            binding_mirror=binding_mirror,
            rate_limits=rate_limits,
            storage=storage,
            federation=federation,
            homeserver=homeserver,
            directory=directory,
            search_executor=search_executor,
            credentials=credentials,
            recursion=recursion,
            invite_worker=invite_worker,
            sessions=sessions,
            binding=binding,
            invitations=Invitations(config, storage, rate_limits, lookups, read_through, recursion, invite_worker,
                                    email, sms, keys),
            accounts=Accounts(config, storage, federation, terms, tokens),
            terms=terms,
            user_directory=UserDirectory(config, directory, search_executor, homeserver, lookups),
            profiles=Profiles(config, homeserver, lookups),
            readiness=Readiness(config, storage, admin, binding_mirror, read_through, directory),
            logins=Logins(credentials, homeserver, invite_worker),
            registration=RegistrationPolicy(config, storage, homeserver),
            invite_policy=InvitePolicy(config, homeserver, lookups),
        )

    def reload(self, config: Config) -> None:
        """Apply a config re-read on SIGHUP, which differs from this one only in what a reload
        applies: the rate limits and policy of validation sessions and the rate limits of logins."""
        self.config = config
        self.sessions.config = config
        self.sessions.policy.config = config
        self.credentials.set_limits(config.auth.rate_limit)

    def run_in_background(self, *jobs: Coroutine[Any, Any, None]) -> None:
        """Run jobs as tasks until stop_background."""
        self._background.extend(asyncio.create_task(job) for job in jobs)

    async def stop_background(self) -> None:
        """Cancel the background tasks and wait for each to end."""
        for task in self._background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._background.clear()

    async def close(self) -> None:
        """Close every client and pool."""
        await self.read_through.close()
        await self.homeserver.close()
        self.search_executor.shutdown(wait=True)
        self.directory.close()
        await asyncio.get_running_loop().run_in_executor(None, self.credentials.close)
        await self.redis.aclose()
        await self.redis_pipe.aclose()
        await self.federation.close()
        self.storage.close()


class Context:
    """app.ctx: the worker's services, from the moment it starts."""

    services: Services


def services(request: Request) -> Services:
    """The services of the worker answering request."""
    built: Services = request.app.ctx.services
    return built
