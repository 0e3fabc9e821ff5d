"""The keys Java mxisd 1.4 and ma1sd read, and the features of theirs this server does not have:
what `mxisd import-config` tells a key the Java servers ignored silently from one it cannot carry over."""

from __future__ import annotations

import fnmatch

_LDAP_KEYS = ["enabled", "activeDirectory", "defaultDomain", "connection.host", "connection.port", "connection.tls",
              "connection.bindDn", "connection.bindPassword", "connection.baseDn", "connection.baseDNs", "filter",
              "attribute.uid.type", "attribute.uid.value", "attribute.name", "attribute.threepid.*", "auth.filter",
              "directory.filter", "directory.attribute.other", "identity.filter", "identity.token",
              "identity.lookup", "identity.medium.*", "profile.filter"]
_SQL_KEYS = ["enabled", "type", "connection", "auth.enabled", "directory.enabled", "identity.enabled",
             "profile.enabled", "identity.type", "identity.query", "identity.medium.*", "directory.query.*.type",
             "directory.query.*.value", "profile.displayName.query", "profile.threepid.query", "profile.role.type",
             "profile.role.query", "lookup.query"]
# Every key mxisd 1.4 and ma1sd read (a "*" stands for one name of the user's choosing, "**" for
# anything below); whatever else a file holds, they ignored without a word.
KNOWN_KEYS = [
    "matrix.domain", "matrix.identity.servers.*", "matrix.v1", "matrix.v2", "accountConfig.allowOnlyTrustDomains",
    "server.name", "server.port", "server.publicUrl", "server.hostname", "key.path",
    "storage.backend", "storage.provider.sqlite.database", "storage.provider.postgresql.*",
    "dns.overwrite.homeserver.client", "dns.overwrite.homeserver.federation",
    "lookup.bulk.enabled", "lookup.recursive.enabled", "lookup.recursive.allowedCidr",
    "lookup.recursive.bridge.enabled", "lookup.recursive.bridge.recursiveOnly", "lookup.recursive.bridge.server",
    "lookup.recursive.bridge.mappings.*", "forward.servers", "auth.rewrite.user.rules",
    "directory.exclude.homeserver", "directory.exclude.threepid",
    "invite.expiration.enabled", "invite.expiration.after", "invite.expiration.resolveTo",
    "invite.resolution.recursive", "invite.resolution.timer", "invite.resolution.period",
    "invite.policy.ifSender.hasRole", "invite.fullDisplayName",
    "register.policy.allowed", "register.policy.invite", "register.policy.threepid.**",
    "session.policy.validation.enabled", "session.policy.validation.forLocal.**",
    "session.policy.validation.forRemote.**", "session.policy.unbind.fraudulent.sendWarning",
    "session.policy.unbind.enabled", "session.policy.unbind.notifications",
    "threepid.medium.email.identity.from", "threepid.medium.email.identity.name",
    *(f"threepid.medium.email.connectors.smtp.{key}" for key in ("host", "port", "tls", "login", "password")),
    *(f"threepid.medium.msisdn.connectors.twilio.{key}" for key in ("account_sid", "auth_token", "number")),
    *(f"threepid.medium.{medium}.{key}" for medium in ("email", "msisdn") for key in (
        "connector", "generator", "generators.template.invite", "generators.template.session.validation",
        "generators.template.session.unbind.fraudulent", "generators.template.generic.matrixId",
        "generators.template.placeholder.*")),
    "notification.**", "view.session.**", "appsvc.**",
    "exec.**", "memory.**", "firebase.**", "wordpress.**",
    "rest.enabled", "rest.host", "rest.endpoints.auth", "rest.endpoints.directory",
    "rest.endpoints.identity.single", "rest.endpoints.identity.bulk", "rest.endpoints.profile.displayName",
    "rest.endpoints.profile.threepids", "rest.endpoints.profile.roles",
    "logging.root", "logging.app", "logging.requests", "internal.enabled",
    "hashing.enabled", "hashing.pepperLength", "hashing.rotationPolicy", "hashing.hashStorageType",
    "hashing.algorithms", "hashing.delay", "hashing.requests",
    "policy.policies.*.version", "policy.policies.*.terms.*.name", "policy.policies.*.terms.*.url",
    "policy.policies.*.regexp",
    *(f"{root}.{key}" for root in ("ldap", "netiq") for key in _LDAP_KEYS),
    *(f"{root}.{key}" for root in ("sql", "synapseSql") for key in _SQL_KEYS), "synapseSql.legacyRoomNames",
]
# Whole sections of features this server does not have.
UNSUPPORTED = {
    "appsvc": "the application service (admin bot, invites by Matrix ID) is not part of this server",
    "exec": "the exec store (scripts) is not supported: a rest store can call a small web service instead",
    "memory": "the memory store is not supported: write the people (and their roles) in a file store (README: The "
              "file store)",
    "firebase": "the Firebase store is not supported",
    "wordpress": "the WordPress store is not supported: a sql store can read its database",
    "auth.rewrite": "rewriting logins by regular expression is not supported",
    "notification": "SendGrid (the one handler besides raw) is not supported: email goes through SMTP (email.smtp)",
    "hashing": "v2 hashed lookups are always on here (sha256 and none), with the pepper kept in the cache",
    "internal": "the internal invite maintenance endpoint is gone: pending invites are checked every "
                "invites.check_every, and the admin API (admin.token) has the rest",
    "session.policy.unbind": "no message is sent on unbind",
    "view.session.remote": "remote validation sessions were removed in mxisd 1.3, which ignored this key",
}
MA1SD_ONLY = ("matrix.v1", "matrix.v2", "accountConfig", "hashing", "policy", "logging", "internal",
              "server.hostname", "storage.provider.postgresql")


def known(key: str) -> bool:
    """Whether mxisd or ma1sd read this dotted key."""
    for pattern in KNOWN_KEYS:
        if pattern.endswith(".**") and (key == pattern[:-3] or key.startswith(pattern[:-2])):
            return True
        if fnmatch.fnmatchcase(key, pattern) and key.count(".") == pattern.count("."):
            return True
    return False
