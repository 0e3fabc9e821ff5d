"""The typed config classes (indexer/settings.py) and the config schema cannot drift apart: every
key has an attribute of a matching type, every attribute a key, and nothing has a default twice."""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Mapping
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import pytest

from indexer.config import field_key, load_config, load_schema, parse_config, read_config, write_config
from indexer.settings import Config, Seconds

ROOT = load_schema("config.schema.json")
REPO = Path(__file__).resolve().parent.parent
# Keys the schema lets be null or absent that loading always fills in (see indexer.config._complete).
COMPLETED = {"server.name", "server.public_url", "server.host_id", "accounts.homeservers"}
NETWORK = 'an address or network like "10.0.0.0/8"'
JSON_TYPES = {str: {"string"}, int: {"integer"}, float: {"number", "integer"}, bool: {"boolean"}}


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    """schema with its $ref followed and a lone allOf (a shape with a default) merged in."""
    while "$ref" in schema or ("allOf" in schema and len(schema["allOf"]) == 1 and "properties" not in schema):
        if "$ref" in schema:
            target = ROOT
            for part in schema["$ref"].lstrip("#/").split("/"):
                target = target[part]
            schema = {**{k: v for k, v in schema.items() if k != "$ref"}, **target}
        else:
            schema = {**{k: v for k, v in schema.items() if k != "allOf"}, **schema["allOf"][0]}
    return schema


def is_duration(schema: dict[str, Any]) -> bool:
    return schema.get("$ref") == "#/$defs/duration" or any(is_duration(s) for s in schema.get("anyOf", []))


def object_properties(schema: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """The properties of an object schema, with those of the schemas in its allOf, and the required ones."""
    schema = resolve(schema)
    properties, required = dict(schema.get("properties", {})), set(schema.get("required", []))
    for part in schema.get("allOf", []):
        if "if" not in part:
            more, more_required = object_properties(part)
            properties, required = {**more, **properties}, required | more_required
    return properties, required


def json_types(schema: dict[str, Any]) -> set[str]:
    """The JSON types a value of schema may have (null included)."""
    schema = resolve(schema)
    found: set[str] = set()
    if "type" in schema:
        found |= set([schema["type"]] if isinstance(schema["type"], str) else schema["type"])
    values = schema.get("enum", []) + ([schema["const"]] if "const" in schema else [])
    found |= {"null" if v is None else "string" if isinstance(v, str) else "number" for v in values}
    for branch in schema.get("anyOf", []):
        found |= json_types(branch)
    return found


def items_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The items of an array schema, or of the array branch of an anyOf (a YAML scalar or a list)."""
    schema = resolve(schema)
    if "items" in schema:
        return resolve(schema["items"])
    arrays = [resolve(b) for b in schema.get("anyOf", []) if "array" in json_types(b)]
    return resolve(arrays[0]["items"])


def store_schemas() -> dict[str, dict[str, Any]]:
    """kind -> the schema of a store of that kind."""
    kinds = resolve(ROOT["$defs"]["store"])["allOf"]
    return {part["if"]["properties"]["kind"]["const"]: part["then"] for part in kinds}


def check_class(cls: type, schema: dict[str, Any], path: str, problems: list[str]) -> None:
    properties, required = object_properties(schema)
    hints = get_type_hints(cls, include_extras=True)
    fields = {field_key(f.name): hints[f.name] for f in dataclasses.fields(cls)}
    for key in sorted(set(properties) - set(fields)):
        problems.append(f"{path}{key}: in the schema, not in {cls.__name__}")
    for key in sorted(set(fields) - set(properties)):
        problems.append(f"{path}{key}: in {cls.__name__}, not in the schema")
    for key in sorted(set(fields) & set(properties)):
        prop = properties[key]
        nullable = "null" in json_types(prop) or (key not in required and "default" not in resolve(prop))
        check_type(fields[key], prop, f"{path}{key}", nullable and f"{path}{key}" not in COMPLETED, problems)


def check_type(hint: Any, schema: dict[str, Any], path: str, nullable: bool, problems: list[str]) -> None:
    options = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    if (type(None) in options) != nullable:
        problems.append(f"{path}: {'may' if nullable else 'may not'} be null or absent, but the type is {hint}")
    options = tuple(o for o in options if o is not type(None))
    if set(options) == {IPv4Network, IPv6Network}:
        if resolve(schema).get("x-expected") != NETWORK:
            problems.append(f"{path}: a network in the class, not in the schema")
        return
    if len(options) > 1:  # the store kinds
        kinds = store_schemas()
        for option in options:
            (kind,) = get_args(get_type_hints(option)["kind"])
            kind_schema = resolve(kinds.pop(kind))  # its kind is the one its class names
            kind_schema = {**kind_schema, "properties": {**kind_schema["properties"], "kind": {"const": kind}}}
            check_class(option, kind_schema, f"{path}({kind}).", problems)
        problems += [f"{path}: no class for store kind {kind}" for kind in kinds]
        return
    (hint,) = options
    origin = get_origin(hint)
    if origin is Annotated:
        if not any(isinstance(m, Seconds) for m in get_args(hint)[1:]) or not is_duration(schema):
            problems.append(f"{path}: a Duration in the class and not a duration in the schema")
        return
    if is_duration(schema):
        problems.append(f"{path}: a duration in the schema, {hint} in the class")
        return
    if resolve(schema).get("x-expected") == NETWORK:
        problems.append(f"{path}: a network in the schema, {hint} in the class")
        return
    expected = json_types(schema) - {"null"}
    if origin is Literal:
        literal = resolve(schema)
        values = set(literal.get("enum", [literal.get("const")])) - {None}
        if values != set(get_args(hint)):
            problems.append(f"{path}: the schema allows {sorted(values)}, the class {sorted(get_args(hint))}")
    elif origin is tuple:
        if "array" not in expected:
            problems.append(f"{path}: a tuple in the class, {expected} in the schema")
        else:
            check_type(get_args(hint)[0], items_schema(schema), f"{path}[]", False, problems)
    elif origin is Mapping:
        additional = resolve(schema).get("additionalProperties")
        if expected != {"object"} or not isinstance(additional, dict):
            problems.append(f"{path}: a mapping in the class, not a map of any keys in the schema")
        elif get_args(hint)[1] is not Any:  # Any: data passed on as written (terms.policies)
            check_type(get_args(hint)[1], additional, f"{path}.*", False, problems)
    elif dataclasses.is_dataclass(hint):
        if expected != {"object"} or "properties" not in resolve(schema) and "allOf" not in resolve(schema):
            problems.append(f"{path}: a section in the class, {expected} in the schema")
        else:
            check_class(hint, schema, f"{path}.", problems)
    elif hint not in JSON_TYPES or not expected <= JSON_TYPES[hint] or not expected:
        problems.append(f"{path}: {hint} in the class, {sorted(expected)} in the schema")


def test_every_key_has_an_attribute_of_its_type_and_every_attribute_a_key():
    problems: list[str] = []
    check_class(Config, ROOT, "", problems)
    assert problems == []


def test_the_drift_check_notices_a_missing_key_and_a_wrong_type(monkeypatch):
    sessions = dict(ROOT["properties"]["sessions"])
    sessions["properties"] = {**sessions["properties"], "colour": {"type": "string"},
                              "max_token_attempts": {"type": "string", "default": "5"}}
    sessions["properties"].pop("lifetime")
    monkeypatch.setitem(ROOT["properties"], "sessions", sessions)
    problems: list[str] = []
    check_class(Config, ROOT, "", problems)
    assert problems == [
        "sessions.colour: in the schema, not in SessionsConfig",
        "sessions.lifetime: in SessionsConfig, not in the schema",
        "sessions.max_token_attempts: <class 'int'> in the class, ['string'] in the schema",
    ]


def test_the_classes_carry_no_defaults_of_their_own():
    def sections(cls: type) -> set[type]:
        found = {cls}
        for hint in get_type_hints(cls).values():
            for arg in (hint, *get_args(hint), *(a for h in get_args(hint) for a in get_args(h))):
                if dataclasses.is_dataclass(arg) and arg not in found:
                    found |= sections(arg)
        return found

    for cls in sections(Config):
        for f in dataclasses.fields(cls):
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, (cls, f.name)


def test_loaded_values_are_ready_to_use(tmp_path):
    config = parse_config({
        "matrix": {"domain": "example.org"},
        "stores": [{"name": "db", "kind": "sql", "url": "sqlite:///people.db", "queries": {"identities": "SELECT 1"}},
                   {"name": "dir", "kind": "ldap", "uri": "ldap://dc1", "base_dns": ["dc=example"],
                    "sync": {"full_every": "1h30m", "changes_every": None}}],
        "email": {"from": "id@example.org", "smtp": {"host": "localhost"}},
        "admin": {"allow": ["10.0.0.1"]},
    }, tmp_path)
    assert (config.sessions.lifetime, config.invites.expire_after, config.redis.timeout) == (86400, 7 * 86400, 5)
    assert config.stores[0].url == f"sqlite:///{tmp_path}/people.db"
    assert (config.stores[1].uri, config.stores[1].sync.full_every, config.stores[1].sync.changes_every) == \
        (("ldap://dc1",), 5400, None)
    assert config.email is not None and config.email.from_ == "id@example.org" and config.sms is None
    assert config.admin.allow == (IPv4Network("10.0.0.1/32"),)
    assert (config.server.name, config.server.public_url, config.accounts.homeservers) == \
        ("example.org", "https://example.org", ("example.org",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.sessions.lifetime = 1  # type: ignore[misc]


def test_configs_cross_a_pipe_unchanged_until_it_closes():
    config = load_config(REPO / "config.example.yml")
    reloaded = dataclasses.replace(config, log_level="DEBUG")
    reading, writing = os.pipe()
    with os.fdopen(writing, "wb") as stream:
        write_config(stream, config)
        write_config(stream, reloaded)
    try:
        assert (read_config(reading), read_config(reading), read_config(reading)) == (config, reloaded, None)
    finally:
        os.close(reading)
