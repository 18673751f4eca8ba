"""Loading the config tree: YAML files, dotted overrides, errors that name the bad key."""

from __future__ import annotations

import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from anisora_ray.config.base import _scalar_types
from anisora_ray.config.sections import AnisoraConfig
from anisora_ray.errors import ConfigError


class ConfigYamlLoader(yaml.SafeLoader):
    """YAML as config files and overrides are read: ``1e-5`` is a float (YAML 1.1 wants ``1.0e-5``, so PyYAML
    reads it as a string, which a number field would take but DeepSpeed's JSON overrides would not)."""


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int | str:
    """Integers as YAML 1.2 reads them: ``010`` is ten (1.1: octal eight), ``1:30`` stays a string (1.1: base 60,
    ninety); ``0x``/``0o``/``0b`` prefixes as written."""
    value = str(loader.construct_scalar(node)).replace("_", "")
    if ":" in value:
        return value
    sign, digits = (-1 if value.startswith("-") else 1), value.lstrip("+-")
    return sign * int(digits, 0 if digits[:2].lower() in ("0x", "0o", "0b") else 10)


ConfigYamlLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float | str:
    """Floats as YAML 1.2 reads them: ``1:30.0`` stays a string (1.1: base 60, ninety)."""
    value = str(loader.construct_scalar(node))
    return value if ":" in value else yaml.SafeLoader.construct_yaml_float(loader, node)


ConfigYamlLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)
# no timestamps (YAML 1.2 has none): run.name=2024-12-06 is that text, not a date a text field refuses
ConfigYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=ConfigYamlLoader)  # noqa: S506 - a SafeLoader subclass


UNION_TAG = re.compile(r"^(?:constrained-\w+|function-[\w-]+|\w+\[.*\]|int|float|str|bool)$")  # pydantic's loc


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> (["a", "b"], 3); the value is parsed as a YAML scalar or flow collection. A value with
    `` #`` in it is taken as it is (YAML would drop the rest as a comment: ``run.name=exp #2``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected KEY=VALUE with a dotted KEY, e.g. generator.replicas=2")
    if " #" in raw:
        return key.split("."), raw.strip()
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value {raw!r} is not valid YAML ({exc})") from exc
    return key.split("."), value


def _text_only(path: list[str]) -> bool:
    """Whether the config field at ``path`` takes text and no number (``model.revision``, ``run.name``)."""
    model: Any = AnisoraConfig
    for i, part in enumerate(path):
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return False
        kinds = _scalar_types(field.annotation)
        if i == len(path) - 1:
            return str in kinds and not kinds & {int, float, bool}
        model = next((k for k in kinds if typing.get_origin(k) is None and issubclass(k, BaseModel)), None)  # 3.10:
    return False  # dict[str, Any] is a type there, and issubclass() of it raises


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a raw config dict (in place) and return it. A text field takes the text as written
    where YAML would read a number or a date (``model.revision=0123456``, ``run.name=1.10``)."""
    for text in overrides:
        path, value = parse_override(text)
        if value is not None and not isinstance(value, str | list | dict) and _text_only(path):
            value = text.partition("=")[2].strip()
        node = raw
        for i, part in enumerate(path[:-1]):
            if node.get(part, {}) is None and i == 0:  # a section whose keys a file commented out: empty
                node[part] = {}
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise ConfigError(f"override {text!r}: {where} is a value ({child!r}), not a section")
            node = child
        node[path[-1]] = value
    return raw


def _describe(errors: list[dict[str, Any]], model: type[BaseModel]) -> str:
    """One line for the errors of one key (a union field's members each say what they want: joined by "or")."""
    error = errors[0]
    key = _key(error)
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, [str(p) for p in error["loc"][:-1]])
        hint = difflib.get_close_matches(str(error["loc"][-1]), allowed, n=1)
        suggestion = f" (did you mean {'.'.join([*map(str, error['loc'][:-1]), hint[0]])!r}?)" if hint else ""
        return f"{key} = {value!r}: unknown key; expected one of {sorted(allowed)}{suggestion}"
    msg = ", or ".join(dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in errors))
    if not error["loc"]:  # a check across sections names its keys in the message itself
        return msg
    return f"{key} = {value!r}: {msg}"


def _key(error: dict[str, Any]) -> str:
    """The dotted key of a validation error, without the member tags pydantic adds for a union field
    (``run.keep.weights``, not ``run.keep.weights.constrained-int``)."""
    return ".".join(str(p) for p in error["loc"] if not (isinstance(p, str) and UNION_TAG.match(p))) or "<root>"


def _allowed_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    for part in path:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def build_config(raw: dict[str, Any], source: str = "<dict>") -> AnisoraConfig:
    """Validate a raw dict, laid over the defaults, into the config tree; errors name each bad key.

    Laying it over the defaults keeps per-entry defaults (e.g. each reward dimension's range)
    when a file or an override sets only part of a section.
    """
    try:
        return AnisoraConfig.model_validate(_merge(AnisoraConfig().model_dump(), raw))
    except ValidationError as exc:
        by_key: dict[Any, list[dict[str, Any]]] = {}  # a check across sections (no loc) stays a line of its own
        for i, e in enumerate(exc.errors()):
            by_key.setdefault(_key(e) if e["loc"] else i, []).append(e)
        lines = [_describe(errors, AnisoraConfig) for errors in by_key.values()]
        raise ConfigError(f"invalid config {source}:\n  " + "\n  ".join(lines)) from None


def _read_yaml(path: Path, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """A YAML mapping; its ``include:`` files (paths relative to it) are laid under it, in order."""
    source = str(path.resolve())  # one file, however its includes spell the way to it
    if source in chain:
        raise ConfigError(f"config file {source!r} includes itself ({' -> '.join((*chain, source))})")
    try:
        loaded = load_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        where = f" (included by {chain[-1]!r})" if chain else ""
        raise ConfigError(f"config file {source!r} does not exist{where}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {source!r} is not valid YAML: {exc}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {source!r}: expected a mapping at the top, got {type(loaded).__name__}")
    raw = {k: {} if v is None and k in AnisoraConfig.model_fields else v for k, v in (loaded or {}).items()}  # `loop:`
    includes = raw.pop("include", None) or []
    base: dict[str, Any] = {}
    for name in [includes] if isinstance(includes, str) else includes:
        included = _read_yaml(path.parent / name, (*chain, source))
        base = _merge(_switch_backends(base, included), included)
    return _merge(_switch_backends(base, raw), raw)


def _switch_backends(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` without the ``options`` and ``actor`` of each reward dimension whose backend ``update`` changes: one
    backend's options (and GPU) merged into another's would be refused, or reserve what it does not use (a zero-shot
    preset included after the released one)."""
    new = ((update.get("reward") or {}).get("dimensions") or {})
    old = ((base.get("reward") or {}).get("dimensions") or {})
    defaults = {n: d.backend for n, d in AnisoraConfig().reward.dimensions.as_dict().items()}  # an unset backend's
    switched = [n for n, d in new.items() if isinstance(d, dict) and isinstance(old.get(n), dict)
                and "backend" in d and d["backend"] != old[n].get("backend", defaults.get(n))]
    if not switched:
        return base
    dims = {n: ({k: v for k, v in d.items() if k not in ("options", "actor")} if n in switched else d)
            for n, d in old.items()}
    return {**base, "reward": {**base["reward"], "dimensions": dims}}


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> AnisoraConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply dotted overrides.
    A file may ``include:`` others (a path or a list, relative to it); its own keys win."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        raw = _read_yaml(Path(path))
    apply_overrides(raw, list(overrides or []))
    return build_config(raw, source)
