"""The config as typed, frozen objects: what `indexer.config.load_config` returns.

One class per section of schemas/config.schema.json, and one attribute per key, named as the key
(`config.sessions.max_token_attempts` is `sessions: {max_token_attempts: ...}` in the YAML). The
schema stays the one source of defaults and descriptions: these classes have no defaults of their
own, and tests/test_settings.py fails when a key and an attribute drift apart. By the time a value
is here it is ready to use:

- a duration (`"5m"`, `"1h30m"`) has the key's name and holds whole seconds (`Duration`, an int);
  keys ending in `_s` were numbers of seconds already and stay floats;
- a path (data_dir, a file store's path, template, page and CA files, an sqlite:// store's
  database) is absolute, resolved against the config file's folder;
- a list of CIDR networks holds `ipaddress` networks; other lists are tuples and maps read-only;
- what the loader completes is filled in: server.name, server.public_url (without a trailing
  "/"), homeserver.url (likewise), accounts.homeservers;
- a key the YAML may leave out that has no default is None when left out; an optional section
  (email, sms, an LDAP store's bind) is None when absent.

Naming: a section's class is its key in CamelCase with "Config" after it, with the names of the
sections it sits in before it (`sessions.rate_limit` is `SessionsRateLimitConfig`); store kinds are
`<Kind>StoreConfig` and their sections `<Kind>Store<Key>Config`; a shape the schema uses in several
places has one class named after it (`RequestLimitConfig`, `SyncConfig`). A key that is a Python
keyword gets a trailing underscore (`email.from` is `EmailConfig.from_`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Annotated, Any, Literal


class Seconds:
    """Marks an int that the YAML writes as a duration ("1h30m")."""


# Whole seconds, written as a duration in the YAML.
Duration = Annotated[int, Seconds()]

Network = IPv4Network | IPv6Network


@dataclass(frozen=True, slots=True)
class MatrixConfig:
    domain: str


@dataclass(frozen=True, slots=True)
class ServerConfig:
    name: str
    public_url: str
    bind: str
    port: int
    workers: int
    access_log: bool
    max_body_size: int
    host_id: str
    proxies_count: int


@dataclass(frozen=True, slots=True)
class RedisTlsConfig:
    enabled: bool
    ca_file: str | None
    verify: bool


@dataclass(frozen=True, slots=True)
class RedisSentinelConfig:
    addresses: tuple[str, ...]
    master: str
    username: str | None
    password: str | None
    sentinel_password: str | None
    db: int
    tls: RedisTlsConfig


@dataclass(frozen=True, slots=True)
class RedisClusterConfig:
    nodes: tuple[str, ...]
    username: str | None
    password: str | None
    tls: RedisTlsConfig
    buckets: int


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str | None
    prefix: str
    timeout: Duration
    check_every: Duration
    sentinel: RedisSentinelConfig | None
    cluster: RedisClusterConfig | None


@dataclass(frozen=True, slots=True)
class ThreepidsMsisdnConfig:
    default_region: str | None


@dataclass(frozen=True, slots=True)
class ThreepidsConfig:
    msisdn: ThreepidsMsisdnConfig


@dataclass(frozen=True, slots=True)
class LookupConfig:
    bulk_max: int
    association_validity: Duration
    prefer: Literal["store", "binding"]
    share_binds: bool


@dataclass(frozen=True, slots=True)
class AdminConfig:
    token: str | None
    allow: tuple[Network, ...]
    job_start_timeout: Duration


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool
    allow: tuple[Network, ...]


@dataclass(frozen=True, slots=True)
class HealthConfig:
    max_follower_lag: Duration
    forget_host_after: Duration


@dataclass(frozen=True, slots=True)
class SupervisorConfig:
    heartbeat: Duration
    restart_first: Duration
    restart_max: Duration


@dataclass(frozen=True, slots=True)
class EmailSmtpConfig:
    host: str
    port: int
    tls: Literal["none", "starttls", "tls"]
    ca_file: str | None
    login: str | None
    password: str | None
    timeout_s: float


@dataclass(frozen=True, slots=True)
class EmailTemplatesConfig:
    validation: str | None
    test: str | None
    invite: str | None


@dataclass(frozen=True, slots=True)
class EmailConfig:
    from_: str
    from_name: str
    smtp: EmailSmtpConfig
    templates: EmailTemplatesConfig


@dataclass(frozen=True, slots=True)
class FederationConfig:
    verify_tls: bool
    ca_file: str | None
    timeout_s: float
    deadline_s: float
    max_in_flight: int
    allow_private_networks: tuple[Network, ...]
    overrides: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class RecursionBridgesConfig:
    email: str | None
    msisdn: str | None


@dataclass(frozen=True, slots=True)
class RecursionConfig:
    allow: tuple[Network, ...]
    proxies: tuple[Network, ...]
    own_domains: tuple[str, ...]
    resolvers: tuple[str, ...]
    scheme: Literal["https", "http"]
    forwarders: tuple[str, ...]
    bridges: RecursionBridgesConfig
    budget_s: float
    ttl: Duration
    miss_ttl: Duration


@dataclass(frozen=True, slots=True)
class AccountsConfig:
    homeservers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SmsTwilioConfig:
    base_url: str
    account_sid: str
    auth_token: str
    number: str
    timeout_s: float


@dataclass(frozen=True, slots=True)
class SmsTemplatesConfig:
    validation: str | None
    invite: str | None


@dataclass(frozen=True, slots=True)
class SmsConfig:
    twilio: SmsTwilioConfig
    templates: SmsTemplatesConfig


@dataclass(frozen=True, slots=True)
class RequestLimitConfig:
    requests: int
    window: Duration


@dataclass(frozen=True, slots=True)
class SessionsRateLimitConfig:
    per_address: RequestLimitConfig
    per_ip: RequestLimitConfig


@dataclass(frozen=True, slots=True)
class SessionsPagesConfig:
    success: str | None
    failure: str | None


# What session control does with an address: sessions.policy.<medium>.local and .remote.
AddressPolicy = Literal["allow", "deny", "bind_only_own"]


@dataclass(frozen=True, slots=True)
class ValidationPolicyConfig:
    enabled: bool
    local: AddressPolicy
    remote: AddressPolicy


@dataclass(frozen=True, slots=True)
class SessionsPolicyConfig:
    email: ValidationPolicyConfig
    msisdn: ValidationPolicyConfig
    remote_bind_to: Literal["other_domains", "this_domain"]


@dataclass(frozen=True, slots=True)
class SessionsConfig:
    lifetime: Duration
    max_token_attempts: int
    keep_expired: Duration
    purge_every: Duration
    rate_limit: SessionsRateLimitConfig
    pages: SessionsPagesConfig
    policy: SessionsPolicyConfig


@dataclass(frozen=True, slots=True)
class InvitesRateLimitConfig:
    per_sender: RequestLimitConfig
    per_ip: RequestLimitConfig
    per_address: RequestLimitConfig


@dataclass(frozen=True, slots=True)
class InvitesPolicySendersConfig:
    roles: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class InvitesPolicyConfig:
    senders: InvitesPolicySendersConfig


@dataclass(frozen=True, slots=True)
class InvitesConfig:
    expire_after: Duration
    register_url: str | None
    check_every: Duration
    retry_first: Duration
    retry_max: Duration
    known_address_delay: Duration
    known_address_retry_for: Duration
    rate_limit: InvitesRateLimitConfig
    policy: InvitesPolicyConfig


@dataclass(frozen=True, slots=True)
class AllowDenyConfig:
    """An allow list and a deny list (of email domains or of regular expressions)."""

    allow: tuple[str, ...]
    deny: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RegistrationPolicyEmailConfig:
    domains: AllowDenyConfig
    patterns: AllowDenyConfig


@dataclass(frozen=True, slots=True)
class RegistrationPolicyMsisdnConfig:
    patterns: AllowDenyConfig


@dataclass(frozen=True, slots=True)
class RegistrationPolicyConfig:
    allowed: bool
    invite_only: bool
    email: RegistrationPolicyEmailConfig
    msisdn: RegistrationPolicyMsisdnConfig


@dataclass(frozen=True, slots=True)
class RegistrationConfig:
    policy: RegistrationPolicyConfig


@dataclass(frozen=True, slots=True)
class StorageConfig:
    url: str | None


@dataclass(frozen=True, slots=True)
class TermsConfig:
    # Shown to clients as written (GET /terms): {policy id: {version, language: {name, url}}}.
    policies: Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class HomeserverConfig:
    url: str | None
    timeout: Duration
    whoami_cache: Duration


@dataclass(frozen=True, slots=True)
class DirectoryHideConfig:
    store: str | None
    mxid: str | None
    display_name: str | None
    threepid: str | None


@dataclass(frozen=True, slots=True)
class DirectoryConfig:
    homeserver: bool
    threepids: bool
    hide: tuple[DirectoryHideConfig, ...]


@dataclass(frozen=True, slots=True)
class AuthRateLimitConfig:
    per_user: int
    per_ip: int
    window: Duration


@dataclass(frozen=True, slots=True)
class AuthConfig:
    threads: int
    rate_limit: AuthRateLimitConfig


@dataclass(frozen=True, slots=True)
class ProfileConfig:
    threepids: bool


@dataclass(frozen=True, slots=True)
class SyncConfig:
    full_every: Duration | None
    changes_every: Duration | None
    max_delete_ratio: float


@dataclass(frozen=True, slots=True)
class FileStoreConfig:
    name: str
    kind: Literal["file"]
    sync: SyncConfig
    path: str


@dataclass(frozen=True, slots=True)
class SqlStoreQueriesConfig:
    identities: str | None
    changes: str | None
    high_water_mark: str | None
    password: str | None
    roles: str | None


@dataclass(frozen=True, slots=True)
class SqlStorePasswordConfig:
    pepper: str | None
    normalize: Literal["NFC", "NFKC", "NFD", "NFKD"] | None


@dataclass(frozen=True, slots=True)
class SqlStoreConfig:
    name: str
    kind: Literal["sql"]
    sync: SyncConfig
    url: str
    preset: Literal["synapse"] | None
    queries: SqlStoreQueriesConfig
    password: SqlStorePasswordConfig
    timeout: Duration


@dataclass(frozen=True, slots=True)
class RestStoreEndpointsConfig:
    auth: str | None
    lookup: str | None
    enumerate: str | None
    changes: str | None


@dataclass(frozen=True, slots=True)
class RestStoreReadThroughConfig:
    ttl: Duration
    miss_ttl: Duration
    max_per_request: int


@dataclass(frozen=True, slots=True)
class RestStoreConfig:
    name: str
    kind: Literal["rest"]
    sync: SyncConfig
    url: str
    endpoints: RestStoreEndpointsConfig
    headers: Mapping[str, str]
    timeout: Duration
    page_size: int
    read_through: RestStoreReadThroughConfig


@dataclass(frozen=True, slots=True)
class LdapStoreTlsConfig:
    ca_file: str | None
    verify: bool


@dataclass(frozen=True, slots=True)
class LdapStoreBindConfig:
    dn: str
    password: str


@dataclass(frozen=True, slots=True)
class LdapStoreAttributesConfig:
    user_id: str | None
    user_id_type: Literal["localpart", "mxid"]
    lowercase: bool
    stable_id: str | None
    changed: str | None
    display_name: tuple[str, ...] | None
    threepids: Mapping[str, tuple[str, ...]] | None


@dataclass(frozen=True, slots=True)
class LdapStoreRolesConfig:
    source: Literal["member_of", "groups"] | None
    name: str
    member_of: str
    base_dns: tuple[str, ...] | None
    filter: str | None
    member_attribute: str
    nested: bool


@dataclass(frozen=True, slots=True)
class LdapStoreConfig:
    name: str
    kind: Literal["ldap"]
    sync: SyncConfig
    preset: Literal["openldap", "active_directory"]
    uri: tuple[str, ...]  # one URI in the YAML is a tuple of one
    start_tls: bool
    tls: LdapStoreTlsConfig
    connect_timeout: Duration
    timeout: Duration
    bind: LdapStoreBindConfig | None
    base_dns: tuple[str, ...]
    filter: str | None
    page_size: int
    auth_pool_size: int
    attributes: LdapStoreAttributesConfig
    roles: LdapStoreRolesConfig


StoreConfig = FileStoreConfig | LdapStoreConfig | SqlStoreConfig | RestStoreConfig


@dataclass(frozen=True, slots=True)
class Config:
    matrix: MatrixConfig
    server: ServerConfig
    data_dir: str
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"]
    redis: RedisConfig
    threepids: ThreepidsConfig
    stores: tuple[StoreConfig, ...]
    lookup: LookupConfig
    log_format: Literal["text", "json"]
    admin: AdminConfig
    metrics: MetricsConfig
    health: HealthConfig
    supervisor: SupervisorConfig
    email: EmailConfig | None
    federation: FederationConfig
    recursion: RecursionConfig
    accounts: AccountsConfig
    sms: SmsConfig | None
    sessions: SessionsConfig
    invites: InvitesConfig
    registration: RegistrationConfig
    storage: StorageConfig
    terms: TermsConfig
    homeserver: HomeserverConfig
    directory: DirectoryConfig
    auth: AuthConfig
    profile: ProfileConfig
