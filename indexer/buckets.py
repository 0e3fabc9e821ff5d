"""Reading and writing a store's bucketed hashes (indexer.rediskeys) through a blocking client: the
fields of one call grouped by bucket, one command per bucket, sent together in one pipeline (which a
Redis Cluster client splits per node). With one bucket, each is the single command it always was."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import redis
from redis.typing import EncodableT, FieldT

from indexer.rediskeys import RedisKeys

# A key of a bucketed hash: RedisKeys.records and the like, (store, bucket) -> key.
KeyOf = Callable[[str, int], str]


def by_bucket(k: RedisKeys, store: str, fields: Iterable[str]) -> dict[int, list[str]]:
    """The fields grouped by their bucket."""
    groups: dict[int, list[str]] = {}
    for field in fields:
        groups.setdefault(k.bucket(store, field), []).append(field)
    return groups


def split(k: RedisKeys, store: str, mapping: Mapping[str, EncodableT]) -> dict[int, dict[FieldT, EncodableT]]:
    """A mapping of fields (for HSET or ZADD) grouped by their bucket."""
    groups: dict[int, dict[FieldT, EncodableT]] = {}
    for field, value in mapping.items():
        groups.setdefault(k.bucket(store, field), {})[field] = value
    return groups


def hmget_many(r: redis.Redis, k: RedisKeys, store: str, reads: list[tuple[KeyOf, list[str]]]) -> list[list[Any]]:
    """For each (hash, fields): the fields' values in order (None where missing), all in one pipeline."""
    pipe = r.pipeline(transaction=False)
    plans: list[list[tuple[int, list[int]]]] = []
    for key_of, fields in reads:
        positions: dict[int, list[int]] = {}
        for i, field in enumerate(fields):
            positions.setdefault(k.bucket(store, field), []).append(i)
        plan = list(positions.items())
        for bucket, where in plan:
            pipe.hmget(key_of(store, bucket), [fields[i] for i in where])
        plans.append(plan)
    replies = iter(pipe.execute() if any(plans) else [])
    out: list[list[Any]] = []
    for (_, fields), plan in zip(reads, plans):
        values: list[Any] = [None] * len(fields)
        for _, where in plan:
            for i, value in zip(where, next(replies)):
                values[i] = value
        out.append(values)
    return out


def hmget(r: redis.Redis, k: RedisKeys, key_of: KeyOf, store: str, fields: list[str]) -> list[Any]:
    """The fields' values in order (None where missing)."""
    if not fields:
        return []
    if k.spread(store) == 1:
        return list(r.hmget(key_of(store, 0), fields))
    return hmget_many(r, k, store, [(key_of, fields)])[0]


def every(k: RedisKeys, key_of: KeyOf, store: str) -> list[str]:
    """The keys of every bucket of one of the store's hashes."""
    return [key_of(store, bucket) for bucket in range(k.spread(store))]
