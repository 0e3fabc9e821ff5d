"""Loading the YAML config: environment substitution, schema validation, defaults, paths, and the
typed objects of indexer.settings that the rest of the code reads."""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import json
import keyword
import os
import pickle
import re
import socket
import types
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import IO, Annotated, Any, Literal, Union, cast, get_args, get_origin, get_type_hints

import jsonschema
import yaml

from indexer.normalize import InvalidAddress, email_domain
from indexer.settings import Config, Seconds

# An installed copy carries the schemas as package data (indexer/schemas, see pyproject.toml); a checkout
# keeps them at the repository root, where the README points.
_HERE = Path(__file__).resolve().parent
SCHEMA_DIR = _HERE / "schemas" if (_HERE / "schemas").is_dir() else _HERE.parent / "schemas"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DURATION_PART = re.compile(r"([0-9]+)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class ConfigError(Exception):
    """A config that cannot be used; the message names the key path."""


@cache
def load_schema(name: str) -> dict[str, Any]:
    """Read one of the JSON Schemas in schemas/ (callers must not modify it)."""
    schema: dict[str, Any] = json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8"))
    return schema


def _end_anchored(pattern: str) -> str:
    """pattern with every "$" outside a character class made "\\Z" (the very end of the text)."""
    out: list[str] = []
    escaped = in_class = False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "$":
            char = r"\Z"
        out.append(char)
    return "".join(out)


@cache
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    return re.compile(_end_anchored(pattern))


def _pattern(validator: Any, pattern: str, instance: Any, schema: dict[str, Any]) -> Any:
    # JSON Schema patterns are ECMA-262 regular expressions, whose "$" is the very end of the
    # text; Python's "$" also matches before a final newline and would let "abc\n" through (the
    # compiled jsonschema_rs validator, like ECMA-262, refuses it).
    if validator.is_type(instance, "string") and not _pattern_regex(pattern).search(instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


# The validator every schema of the project is checked with.
Validator: type[jsonschema.protocols.Validator] = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"pattern": _pattern})


def parse_duration(text: str) -> int:
    """Seconds in a duration written like "30s", "5m", "1h30m" or "1d"."""
    if not re.fullmatch(r"([0-9]+[smhd])+", text or ""):
        raise ValueError(f'expected a duration like "1h", got {text!r}')
    return sum(int(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))


def format_path(path: list[Any] | tuple[Any, ...]) -> str:
    """JSON path elements as a key path like stores[0].sync.full_every."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _describe(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    return json.dumps(value, ensure_ascii=False)


def _substitute_env(node: Any, path: list[Any]) -> Any:
    if isinstance(node, dict):
        return {k: _substitute_env(v, path + [k]) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute_env(v, path + [i]) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:

        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            value = os.environ.get(name)
            if value is None:
                if default is None:
                    raise ConfigError(f"{format_path(path)}: environment variable {name} is not set")
                return default
            return value

        return _ENV_REF.sub(replace, node)
    return node


def explain(error: jsonschema.ValidationError, root: dict[str, Any] | None = None) -> str:
    """One line naming the key path and what was expected (root: the schema, to follow its $refs)."""
    path = list(error.absolute_path)
    if error.validator in ("additionalProperties", "unevaluatedProperties") and isinstance(error.instance, dict):
        schema = cast("dict[str, Any]", error.schema)
        allowed = _declared_properties(schema, root or schema)
        unknown = sorted(k for k in error.instance if k not in allowed)
        if unknown:
            return f"{format_path(path + [unknown[0]])}: unknown key"
    if error.validator == "required":
        missing = re.match(r"'([^']+)'", error.message)
        name = missing.group(1) if missing else "?"
        return f"{format_path(path + [name])}: missing required key"
    # The widest description wins: an anyOf's x-expected covers all of its branches.
    expected = None
    node: jsonschema.exceptions._Error | None = error
    while node is not None:
        if isinstance(node.schema, dict) and node.schema.get("x-expected"):
            expected = node.schema["x-expected"]
        node = node.parent
    if expected:
        return f"{format_path(path)}: expected {expected}, got {_describe(error.instance)}"
    if error.validator == "type":
        types = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        return f"{format_path(path)}: expected {' or '.join(map(str, types))}, got {_describe(error.instance)}"
    if error.validator == "enum":
        choices = ", ".join(_describe(c) for c in cast("list[Any]", error.validator_value))
        return f"{format_path(path)}: expected one of {choices}, got {_describe(error.instance)}"
    return f"{format_path(path)}: {error.message}"


def _declared_properties(schema: dict[str, Any], root: dict[str, Any]) -> set[str]:
    schema = _resolve(schema, root)
    names = set(schema.get("properties", {}))
    for sub in schema.get("allOf", []):
        names |= _declared_properties(sub, root)
    return names


def _first_error(validator: jsonschema.protocols.Validator, instance: Any) -> jsonschema.ValidationError | None:
    errors = list(validator.iter_errors(instance))
    if not errors:
        return None
    # A property that fails its own schema also counts as "unevaluated": report the real failure.
    errors = [e for e in errors if e.validator != "unevaluatedProperties"] or errors
    best: jsonschema.ValidationError | None = jsonschema.exceptions.best_match(errors)
    return best


def validate(instance: Any, schema_name: str) -> None:
    """Raise ConfigError with one explained message when instance does not match the schema."""
    schema = load_schema(schema_name)
    validator = Validator(schema)
    error = _first_error(validator, instance)
    if error is not None:
        raise ConfigError(explain(error, schema))


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        ref = schema["$ref"]
        target = root
        for part in ref.lstrip("#/").split("/"):
            target = target[part]
        schema = {**{k: v for k, v in schema.items() if k != "$ref"}, **target}
    return schema


def apply_defaults(instance: Any, schema: dict[str, Any], root: dict[str, Any]) -> Any:
    """Fill in the schema's "default" values for keys the config leaves out (instance must be valid)."""
    schema = _resolve(schema, root)
    for sub in schema.get("allOf", []):
        sub = _resolve(sub, root)
        if "if" in sub:
            branch = "then" if Validator(sub["if"]).is_valid(instance) else "else"
            if branch in sub:
                apply_defaults(instance, sub[branch], root)
        else:
            apply_defaults(instance, sub, root)
    if isinstance(instance, dict):
        for key, prop in schema.get("properties", {}).items():
            prop = _resolve(prop, root)
            if key not in instance and "default" in prop:
                instance[key] = copy.deepcopy(prop["default"])
            if key in instance:
                apply_defaults(instance[key], prop, root)
    elif isinstance(instance, list) and "items" in schema:
        for item in instance:
            apply_defaults(item, schema["items"], root)
    return instance


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, substitute, validate and complete a config file; raise ConfigError on any problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return parse_config(raw, path.resolve().parent)


def write_config(stream: IO[bytes], config: Config) -> None:
    """Hand config to a process of `mxisd run` through a pipe (not its command line: the config may
    hold secrets, which must not show in the process list): its length, then the pickled config."""
    data = pickle.dumps(config)
    stream.write(len(data).to_bytes(8, "big") + data)
    stream.flush()


def read_config(fd: int) -> Config | None:
    """The next config write_config sent to the file descriptor fd; None once the pipe is closed.
    Only for the pipe from the parent process: pickle trusts what it reads. It reads the descriptor
    itself, not Python's buffered stdin: a thread waiting there holds the buffer's lock, and a
    process exiting meanwhile aborts."""
    header = _read_exactly(fd, 8)
    data = None if header is None else _read_exactly(fd, int.from_bytes(header, "big"))
    if data is None:
        return None
    config: Config = pickle.loads(data)
    return config


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def parse_config(raw: dict[str, Any], base: Path) -> Config:
    """The typed config of a mapping of config keys as read from YAML (relative paths taken from
    base); raise ConfigError on any problem."""
    config = _substitute_env(raw, [])
    validate(config, "config.schema.json")
    schema = load_schema("config.schema.json")
    apply_defaults(config, schema, schema)
    typed: Config = build(Config, _complete(config, base.resolve()))
    return typed


def field_key(name: str) -> str:
    """The YAML key of a settings attribute (a keyword has a trailing underscore there)."""
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def build(hint: Any, value: Any) -> Any:
    """value (valid and completed config data) as the type hint of indexer.settings says."""
    origin = get_origin(hint)
    if origin is Annotated:
        kind, *marks = get_args(hint)
        return parse_duration(value) if any(isinstance(m, Seconds) for m in marks) else build(kind, value)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        if value is None and len(options) < len(get_args(hint)):
            return None
        if set(options) == {ipaddress.IPv4Network, ipaddress.IPv6Network}:
            return ipaddress.ip_network(value, strict=False)
        if len(options) > 1:  # the store kinds: the one whose kind the value names
            options = [o for o in options if value["kind"] in get_args(_hints(o)["kind"])]
        return build(options[0], value)
    if origin is Literal or hint is Any:
        return value
    if origin is tuple:
        return tuple(build(get_args(hint)[0], v) for v in (value if isinstance(value, list) else [value]))
    if origin is Mapping:
        return {k: build(get_args(hint)[1], v) for k, v in value.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        hints = _hints(hint)
        return hint(**{f.name: build(hints[f.name], value.get(field_key(f.name)))
                       for f in dataclasses.fields(hint)})
    if hint is float:
        return float(value)
    return value


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls, include_extras=True)


def _complete(config: dict[str, Any], base: Path) -> dict[str, Any]:
    names = [s["name"] for s in config["stores"]]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise ConfigError(f"stores[{i}].name: {name!r} is already the name of stores[{names.index(name)}]")
    for section, key in (("admin", "allow"), ("metrics", "allow"), ("recursion", "allow"), ("recursion", "proxies")):
        for i, network in enumerate(config[section][key]):
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ConfigError(f"{section}.{key}[{i}]: expected an address or network like \"10.0.0.0/8\", "
                                  f"got {json.dumps(network)}") from None
    server = config["server"]
    server.setdefault("name", config["matrix"]["domain"])
    server.setdefault("public_url", f"https://{server['name']}")
    server["public_url"] = server["public_url"].rstrip("/")
    server.setdefault("host_id", socket.gethostname())
    config["data_dir"] = str((base / config["data_dir"]).resolve())
    from indexer.stores import store_class  # here: the stores import this module

    for i, store in enumerate(config["stores"]):
        if "path" in store:
            store["path"] = str((base / store["path"]).resolve())
        if store.get("tls", {}).get("ca_file"):
            store["tls"]["ca_file"] = str((base / store["tls"]["ca_file"]).resolve())
        store_class(store["kind"]).complete_config(store, f"stores[{i}]", base)
    files = [("sessions.pages", config["sessions"]["pages"], k) for k in ("success", "failure")]
    files += [(f"redis.{kind}.tls", config["redis"][kind]["tls"], "ca_file")
              for kind in ("sentinel", "cluster") if kind in config["redis"]]
    files += [("federation", config["federation"], "ca_file")]
    if "email" in config:
        files += [("email.smtp", config["email"]["smtp"], "ca_file")]
    for section in ("email", "sms"):
        if section in config:
            files += [(f"{section}.templates", config[section]["templates"], k) for k in config[section]["templates"]]
    for where, holder, key in files:
        if holder.get(key):
            holder[key] = str((base / holder[key]).resolve())
            if not os.access(holder[key], os.R_OK):
                raise ConfigError(f"{where}.{key}: cannot read {holder[key]}")
    for i, network in enumerate(config["federation"]["allow_private_networks"]):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError as exc:
            raise ConfigError(f"federation.allow_private_networks[{i}]: {exc}") from None
    if config["accounts"]["homeservers"] is None:
        config["accounts"]["homeservers"] = [config["matrix"]["domain"]]
    patterns = [(f"directory.hide[{i}].{key}", pattern)
                for i, rule in enumerate(config["directory"]["hide"]) for key, pattern in rule.items()]
    policy = config["registration"]["policy"]
    for medium in ("email", "msisdn"):
        for kind in ("allow", "deny"):
            where = f"registration.policy.{medium}.patterns.{kind}"
            patterns += [(f"{where}[{i}]", p) for i, p in enumerate(policy[medium]["patterns"][kind])]
    for where, pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{where}: not a valid regular expression: {exc}") from None
    for kind in ("allow", "deny"):
        for i, entry in enumerate(policy["email"]["domains"][kind]):
            try:
                email_domain(entry.lstrip("*."))
            except InvalidAddress as exc:
                raise ConfigError(f"registration.policy.email.domains.{kind}[{i}]: {exc}") from None
    if config["homeserver"]["url"]:
        config["homeserver"]["url"] = config["homeserver"]["url"].rstrip("/")
    return config

