"""Config validation: every kind of mistake is one message naming the key, and exit status 2."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from indexer.config import ConfigError, load_config, parse_duration
from indexer.settings import (
    AuthConfig,
    AuthRateLimitConfig,
    DirectoryConfig,
    FileStoreConfig,
    HomeserverConfig,
    LdapStoreConfig,
    LdapStoreTlsConfig,
    RedisConfig,
    ServerConfig,
    SyncConfig,
)
from server.runner import reloadable

REPO = Path(__file__).resolve().parent.parent

VALID = {
    "matrix": {"domain": "example.org"},
    "stores": [{"name": "people", "kind": "file", "path": "people.yml"}],
}
LDAP = {"name": "corp", "kind": "ldap", "preset": "active_directory", "uri": "ldaps://dc1.corp.example.org",
        "bind": {"dn": "CN=svc,DC=corp,DC=example,DC=org", "password": "secret"},
        "base_dns": ["OU=Staff,DC=corp,DC=example,DC=org"]}


def write(tmp_path: Path, config: object) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


def check_config(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60, env=env)


def with_changes(**changes: object) -> dict:
    config = yaml.safe_load(yaml.safe_dump(VALID))
    for dotted, value in changes.items():
        node = config
        *parents, last = dotted.split("__")
        for part in parents:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        node[int(last) if last.isdigit() else last] = value
    return config


@pytest.mark.parametrize(
    "config, message",
    [
        (with_changes(stores__0__sync__full_every=12),
         'stores[0].sync.full_every: expected a duration like "1h" or null, got 12'),
        (with_changes(stores__0__sync__full_every="12 hours"),
         'stores[0].sync.full_every: expected a duration like "1h" or null, got "12 hours"'),
        (with_changes(server__prot=8090), "server.prot: unknown key"),
        (with_changes(directory__hide=[{"mxid": "@svc-(.*"}]),
         "directory.hide[0].mxid: not a valid regular expression: missing ), unterminated subpattern at position 5"),
        (with_changes(directory__hide=[{"uid": "x"}]), "directory.hide[0].uid: unknown key"),
        (with_changes(registration__policy__msisdn__patterns__deny=["44(7"]),
         "registration.policy.msisdn.patterns.deny[0]: not a valid regular expression: missing ), unterminated "
         "subpattern at position 2"),
        (with_changes(registration__policy__email__domains__allow=["*.example.org"]),
         'registration.policy.email.domains.allow[0]: expected a domain like "example.org", ".example.org" (its '
         'subdomains) or "*example.org" (both), got "*.example.org"'),
        (with_changes(registration__policy__email__domains__deny=["exa_mple..org"]),
         "registration.policy.email.domains.deny[0]: not a valid email domain: 'exa_mple..org': Codepoint U+005F "
         "at position 4 of 'exa_mple' not allowed"),
        (with_changes(registration__policy__invite_only="yes"),
         'registration.policy.invite_only: expected boolean, got "yes"'),
        (with_changes(invites__policy__senders__roles="admins"),
         'invites.policy.senders.roles: expected array, got "admins"'),
        (with_changes(homeserver__url="localhost:8008"),
         'homeserver.url: expected an http:// or https:// URL with no path, or null, got "localhost:8008"'),
        (with_changes(auth__rate_limit__per_user=0), "auth.rate_limit.per_user: 0 is less than the minimum of 1"),
        (with_changes(stores__0__colour="blue"), "stores[0].colour: unknown key"),
        (with_changes(sessions__policy__email__local="block"),
         'sessions.policy.email.local: expected one of "allow", "deny", "bind_only_own", got "block"'),
        (with_changes(server__port="eighty"), 'server.port: expected integer, got "eighty"'),
        (with_changes(server__port=70000), "server.port: 70000 is greater than the maximum of 65535"),
        (with_changes(server__max_body_size="4M"),
         'server.max_body_size: expected a number of bytes, at least 1024, got "4M"'),
        (with_changes(server__host_id="host a:1"),
         'server.host_id: expected a name of letters, digits, dots, hyphens or underscores, like a hostname, '
         'got "host a:1"'),
        ({"stores": VALID["stores"]}, "matrix: missing required key"),
        (with_changes(matrix={}), "matrix.domain: missing required key"),
        (with_changes(stores__0={"name": "people", "kind": "file"}), "stores[0].path: missing required key"),
        (with_changes(stores__0__kind="ldapp"),
         'stores[0].kind: expected one of "file", "ldap", "sql", "rest", got "ldapp"'),
        (with_changes(stores__0=dict(LDAP, uri="http://dc1")),
         'stores[0].uri: expected an ldap:// or ldaps:// URI, or a list of them, got "http://dc1"'),
        (with_changes(stores__0=dict(LDAP, preset="openldapp")),
         'stores[0].preset: expected one of "openldap", "active_directory", got "openldapp"'),
        (with_changes(stores__0=dict(LDAP, attributes={"mail": ["mail"]})), "stores[0].attributes.mail: unknown key"),
        (with_changes(stores__0=dict(LDAP, attributes={"threepids": {"E-mail": ["mail"]}})),
         'stores[0].attributes.threepids: expected a 3PID medium like "email", got "E-mail"'),
        (with_changes(stores__0=dict(LDAP, bind={"dn": "cn=reader"})), "stores[0].bind.password: missing required key"),
        (with_changes(stores__0=dict(LDAP, base_dns=[])), "stores[0].base_dns: [] should be non-empty"),
        (with_changes(stores__0=dict(LDAP, path="people.yml")), "stores[0].path: unknown key"),
        (with_changes(matrix__domain="not a domain"),
         'matrix.domain: expected a server name like "example.org", got "not a domain"'),
        (with_changes(stores=[]), "stores: [] should be non-empty"),
        (with_changes(redis__url="http://localhost"),
         'redis.url: expected null or a redis://, rediss:// or unix:// URL, got "http://localhost"'),
        (with_changes(redis__url="redis://r:6379", redis__sentinel={"addresses": ["s:26379"], "master": "m"}),
         'redis.url: expected null when redis.sentinel is set (one of redis.url, redis.sentinel and '
         'redis.cluster, not several), got "redis://r:6379"'),
        (with_changes(redis__url="redis://r:6379", redis__cluster={"nodes": ["c:6379"]}),
         'redis.url: expected null when redis.cluster is set (one of redis.url, redis.sentinel and '
         'redis.cluster, not several), got "redis://r:6379"'),
        (with_changes(redis__sentinel={"addresses": ["s:26379"], "master": "m"}, redis__cluster={"nodes": ["c:1"]}),
         "redis.cluster: expected nothing when redis.sentinel is set (one of redis.url, redis.sentinel and "
         "redis.cluster, not several), got a mapping"),
        (with_changes(redis__sentinel={"addresses": ["s:26379"]}), "redis.sentinel.master: missing required key"),
        (with_changes(redis__cluster={"nodes": ["c"]}),
         'redis.cluster.nodes[0]: expected an address like "redis-1.example.org:26379", got "c"'),
        (with_changes(stores=[VALID["stores"][0], VALID["stores"][0]]),
         "stores[1].name: 'people' is already the name of stores[0]"),
        (with_changes(stores__0__sync__max_delete_ratio=1.5),
         "stores[0].sync.max_delete_ratio: 1.5 is greater than the maximum of 1"),
        (with_changes(admin__token="short"),
         'admin.token: expected null or a token of at least 16 characters, got "short"'),
        (with_changes(admin__allow=["10.0.0.0/33"]),
         'admin.allow[0]: expected an address or network like "10.0.0.0/8", got "10.0.0.0/33"'),
        (with_changes(metrics__allow=["intranet"]),
         'metrics.allow[0]: expected an address or network like "10.0.0.0/8", got "intranet"'),
        (with_changes(log_format="xml"), 'log_format: expected one of "text", "json", got "xml"'),
        (with_changes(health__max_follower_lag="soon"),
         'health.max_follower_lag: expected a duration like "1h", got "soon"'),
        (with_changes(storage__url="mysql://db"),
         'storage.url: expected null or a sqlite:// or postgresql:// URL, got "mysql://db"'),
        (with_changes(sessions__lifetime=24), 'sessions.lifetime: expected a duration like "1h", got 24'),
        (with_changes(sessions__rate_limit__per_ip={"requests": 5}),
         "sessions.rate_limit.per_ip.window: missing required key"),
        (with_changes(email={"from": "a@example.org", "smtp": {"host": "h", "tls": "ssl"}}),
         'email.smtp.tls: expected one of "none", "starttls", "tls", got "ssl"'),
        (with_changes(sms={"twilio": {"account_sid": "a", "auth_token": "b", "number": "0800"}}),
         'sms.twilio.number: expected a number like "+15005550006", got "0800"'),
        (with_changes(terms__policies={"tos": {"version": "1", "en": {"name": "T"}}}),
         "terms.policies.tos.en.url: missing required key"),
        (with_changes(lookup__access_tokens=["0123456789abcdef"]), "lookup.access_tokens: unknown key"),
        (with_changes(federation__allow_private_networks=["everything"]),
         'federation.allow_private_networks[0]: expected an address or network like "10.0.0.0/8", got "everything"'),
        (with_changes(federation__allow_private_networks=["10.0.0.0/33"]),
         "federation.allow_private_networks[0]: '10.0.0.0/33' does not appear to be an IPv4 or IPv6 network"),
        (with_changes(recursion__proxies=["10.0.0.0/33"]),
         'recursion.proxies[0]: expected an address or network like "10.0.0.0/8", got "10.0.0.0/33"'),
        (with_changes(recursion__forwarders=["matrix.org"]),
         'recursion.forwarders[0]: expected an http(s) URL, got "matrix.org"'),
        (with_changes(invites__register_url="javascript:alert(1)"),
         'invites.register_url: expected an http:// or https:// URL, or null, got "javascript:alert(1)"'),
        (with_changes(invites__expire_after="a week"),
         'invites.expire_after: expected a duration like "1h", got "a week"'),
    ],
)
def test_mistakes_are_named_with_their_key_path(tmp_path, config, message):
    result = check_config(write(tmp_path, config))
    assert result.returncode == 2
    assert result.stderr.strip().endswith(message), result.stderr
    assert result.stderr.count("\n") == 1  # one message, no traceback


def test_unparseable_yaml_and_missing_file(tmp_path):
    result = check_config(write(tmp_path, "matrix: {domain: [\n"))
    assert result.returncode == 2 and "not valid YAML at line" in result.stderr
    missing = check_config(tmp_path / "nope.yml")
    assert missing.returncode == 2 and "config file not found" in missing.stderr


def test_environment_variables_fill_strings(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_DOMAIN", "corp.example")
    path = write(tmp_path, with_changes(matrix__domain="${TEST_DOMAIN}",
                                        server={"name": "${UNSET_NAME:-id.corp.example}"}))
    config = load_config(path)
    assert config.matrix.domain == "corp.example"
    assert config.server.name == "id.corp.example"


def test_a_missing_environment_variable_is_named(tmp_path):
    path = write(tmp_path, with_changes(lookup={"access_tokens": ["${MXISD_TEST_SURELY_UNSET}"]}))
    result = check_config(path, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        "lookup.access_tokens[0]: environment variable MXISD_TEST_SURELY_UNSET is not set")


def test_defaults_and_relative_paths(tmp_path):
    config = load_config(write(tmp_path, VALID))
    assert config.server == ServerConfig(
        name="example.org", public_url="https://example.org", bind="127.0.0.1", port=8090,
        workers=1, access_log=False, max_body_size=4 * 1024 * 1024, host_id=socket.gethostname(), proxies_count=0,
    )
    assert config.homeserver == HomeserverConfig(url=None, timeout=10, whoami_cache=60)
    assert config.directory == DirectoryConfig(homeserver=True, threepids=False, hide=())
    assert config.auth == AuthConfig(threads=16, rate_limit=AuthRateLimitConfig(per_user=5, per_ip=20, window=300))
    assert config.stores[0].sync == SyncConfig(full_every=6 * 3600, changes_every=60, max_delete_ratio=0.2)
    assert config.data_dir == str(tmp_path / "data")
    assert isinstance(config.stores[0], FileStoreConfig) and config.stores[0].path == str(tmp_path / "people.yml")
    assert config.redis == RedisConfig(url=None, prefix="mxisd:", timeout=5, check_every=5, sentinel=None, cluster=None)
    assert config.lookup.bulk_max == 10000


def test_a_directory_needs_only_uri_bind_base_and_preset(tmp_path):
    config = load_config(write(tmp_path, with_changes(stores__0=LDAP)))
    store = config.stores[0]
    assert isinstance(store, LdapStoreConfig)
    assert (store.page_size, store.start_tls, store.tls) == (500, False, LdapStoreTlsConfig(ca_file=None, verify=True))
    relative = load_config(write(tmp_path, with_changes(stores__0=dict(LDAP, tls={"ca_file": "ca.pem"}))))
    assert isinstance(relative.stores[0], LdapStoreConfig)
    assert relative.stores[0].tls.ca_file == str(tmp_path / "ca.pem")


def test_shipped_example_config_is_valid():
    result = check_config(REPO / "config.example.yml")
    assert result.returncode == 0, result.stderr


def test_config_defaults_to_environment_then_working_directory(tmp_path):
    write(tmp_path, with_changes(stores__0__sync__full_every=5))
    by_cwd = subprocess.run([sys.executable, "-m", "server.cli", "index"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert by_cwd.returncode == 2 and "config.yml: stores[0].sync.full_every" in by_cwd.stderr
    other = tmp_path / "other.yml"
    other.write_text(yaml.safe_dump(with_changes(server__port="x")))
    by_env = subprocess.run([sys.executable, "-m", "server.cli", "run"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "MXISD_CONFIG": str(other)})
    assert by_env.returncode == 2 and "other.yml: server.port" in by_env.stderr


@pytest.mark.parametrize("text, seconds", [("30s", 30), ("5m", 300), ("1h", 3600), ("1d", 86400), ("1h30m", 5400)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_bad_duration_raises():
    with pytest.raises(ValueError):
        parse_duration("1 hour")


def test_load_config_raises_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"server.workers: expected integer"):
        load_config(write(tmp_path, with_changes(server__workers="two")))


def test_missing_template_or_ca_file_is_named(tmp_path):
    path = tmp_path / "config.yml"
    path.write_text("matrix: {domain: example.org}\nstores: [{name: s, kind: file, path: p.yml}]\n"
                    "email: {from: a@example.org, smtp: {host: localhost}, templates: {validation: nope.eml}}\n")
    with pytest.raises(ConfigError, match=r"email.templates.validation: cannot read .*nope.eml"):
        load_config(path)
    path.write_text("matrix: {domain: example.org}\nstores: [{name: s, kind: file, path: p.yml}]\n"
                    "federation: {ca_file: missing.pem}\n")
    with pytest.raises(ConfigError, match=r"federation.ca_file: cannot read"):
        load_config(path)
    path.write_text("matrix: {domain: example.org}\nstores: [{name: s, kind: file, path: p.yml}]\n"
                    "redis: {sentinel: {addresses: ['s:1'], master: m, tls: {enabled: true, ca_file: no.pem}}}\n")
    with pytest.raises(ConfigError, match=r"redis.sentinel.tls.ca_file: cannot read .*no.pem"):
        load_config(path)


def test_a_reload_keeps_what_needs_a_restart_and_names_it(tmp_path):
    old = load_config(write(tmp_path, VALID))
    new = load_config(write(tmp_path, with_changes(
        log_level="DEBUG", stores__0__sync__full_every="2h", auth__threads=2, lookup__bulk_max=7,
        sessions__rate_limit__per_ip={"requests": 1, "window": "1m"},
        sessions__policy={"email": {"remote": "deny"}})))
    merged, ignored = reloadable(old, new)
    assert ignored == ["auth (other than rate_limit)", "lookup"]
    assert merged.sessions.policy.email.remote == "deny"
    assert (merged.log_level, merged.stores, merged.sessions) == ("DEBUG", new.stores, new.sessions)
    assert (merged.auth, merged.lookup) == (old.auth, old.lookup)
    renamed = load_config(write(tmp_path, with_changes(stores__0__path="other.yml")))
    assert reloadable(old, renamed) == (old, ["stores (other than their sync settings)"])


def test_ldap_roles_settings_that_cannot_work_are_named(tmp_path):
    path = tmp_path / "config.yml"
    store = "{name: d, kind: ldap, uri: ldap://127.0.0.1, base_dns: [dc=example], roles: %s}"
    for roles, error in (("{source: member_of, nested: true}", r"stores\[0\].roles.nested: needs roles.source: groups"),
                         ("{source: groups, member_attribute: memberUid, nested: true}",
                          r"stores\[0\].roles.nested: groups listing members by memberUid cannot nest"),
                         ("{source: everything}", r"stores\[0\].roles.source"),
                         ("{source: groups, filter: objectClass=group}", r"stores\[0\].roles.filter")):
        path.write_text(f"matrix: {{domain: example.org}}\nstores: [{store % roles}]\n")
        with pytest.raises(ConfigError, match=error):
            load_config(path)
    path.write_text(f"matrix: {{domain: example.org}}\nstores: [{store % '{}'}]\n")
    assert load_config(path).stores[0].roles.source is None  # off by default
