"""Checks of what the server keeps itself: the signing key, the SQL storage, Redis."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import redis as redis_lib
import sqlalchemy as sa
from signedjson.key import encode_verify_key_base64, get_verify_key

from indexer.cache import Cache
from indexer.redis_clients import configured_target, connect, describe
from indexer.redis_server import EmbeddedRedis
from indexer.settings import Config
from server.doctor import Finding, not_checked, ok, problem
from server.signing import key_path, read_signing_key
from server.storage import SCHEMA_VERSION, Storage, engine_url

KEY = "signing key"


def public_key(config: Config) -> str | None:
    """The base64 public key of the key file, None when there is none yet; OSError or ValueError when
    it cannot be read."""
    path = key_path(config.data_dir)
    if not path.exists():
        return None
    return encode_verify_key_base64(get_verify_key(read_signing_key(path)))


def key_id(config: Config) -> str:
    """The key id the key file's key is served under: ed25519:0, or the serial of a key taken over
    from mxisd (`mxisd import-data`)."""
    try:
        key = read_signing_key(key_path(config.data_dir))
    except (OSError, ValueError):
        return "ed25519:0"  # the signing key's own check says what is wrong with the file
    return f"{key.alg}:{key.version}"


def signing_key(config: Config) -> Iterator[Finding]:
    path = key_path(config.data_dir)
    try:
        key = public_key(config)
    except OSError as exc:
        yield problem(KEY, f"cannot read {path}: {exc.strerror}: the user mxisd runs as must be able to read it")
        return
    except ValueError as exc:
        yield problem(KEY, f"{path} is not a signing key file: {exc}; restore it from a backup (a new key "
                           "makes every signature and pending invite made with the old one unverifiable)")
        return
    if key is None:
        yield not_checked(KEY, f"{path} does not exist yet: mxisd run creates it when it first starts")
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & stat.S_IROTH:
        yield problem(KEY, f"{path} is readable by every user of this host (mode {mode:04o}): whoever reads it "
                           f"can sign as this identity server; chmod 600 {path}")
        return
    yield ok(KEY, f"{path} is readable (public key {key})")


def storage(config: Config) -> Iterator[Finding]:
    subject = "storage"
    url = engine_url(config.storage.url, config.data_dir)
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        yield not_checked(subject, f"{url.database} does not exist yet: mxisd run creates it when it first starts")
        return
    store = Storage(config.storage.url, config.data_dir, threads=1)
    try:
        version = store.version()
    except sa.exc.SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        yield problem(subject, f"{store.describe()} cannot be used: {str(cause).strip().splitlines()[0]}: "
                               "check storage.url, and that the database runs and this user may use it")
        return
    finally:
        store.close()
    if version is None:
        yield ok(subject, f"{store.describe()} answers; it has no tables yet: mxisd run creates them")
    elif version > SCHEMA_VERSION:
        yield problem(subject, f"{store.describe()} has schema version {version}, newer than this mxisd "
                               f"understands ({SCHEMA_VERSION}): a newer mxisd used it; upgrade this one")
    elif version < SCHEMA_VERSION:
        yield ok(subject, f"{store.describe()} answers (schema version {version}: mxisd run upgrades it to "
                          f"{SCHEMA_VERSION} when it starts)")
    else:
        yield ok(subject, f"{store.describe()} answers (schema version {version})")


def redis(config: Config) -> Iterator[Finding]:
    subject = "redis"
    target = configured_target(config.redis)
    if target is None:
        embedded = EmbeddedRedis(config.data_dir)
        if embedded.answering():
            yield ok(subject, f"the embedded Redis of the running mxisd answers at {embedded.socket}")
        else:
            yield not_checked(subject, f"embedded (no redis.url, sentinel or cluster), and not running: "
                                       f"mxisd run starts it in {embedded.dir}")
        return
    shown = describe(target)
    key = "sentinel" if config.redis.sentinel else "cluster" if config.redis.cluster else "url"
    prefix = config.redis.prefix
    client = connect(target, config.redis.timeout)
    try:
        info = client.info("server")
        epoch = Cache(client, prefix).epoch()
    except redis_lib.exceptions.RedisError as exc:
        yield problem(subject, f"{shown} does not answer: {exc}: check redis.{key}, and that Redis runs and "
                               "lets this host in")
        return
    finally:
        client.close()
    # No cache under the prefix is right before the first start, and a sign of a wrong prefix after it.
    holds = "holds a cache" if epoch else "holds no cache yet"
    yield ok(subject, f"{shown} answers (Redis {info.get('redis_version', '?')}; {holds} under the prefix {prefix!r})")
