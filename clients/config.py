"""Typed configuration: a YAML file plus `key=value` overrides, validated into pydantic models.

    cfg = load_config(RewardConfig, "configs/reward.yaml", ["functions.0.weight=2"])

Every error is a `ConfigError` naming the dotted key, what was wrong and what is allowed, so a bad
config fails at start-up instead of at the first request. Services and the orchestrator share it.
"""

from __future__ import annotations

import pathlib
import re
import typing
from typing import Any, Iterable, TypeVar

import pydantic
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T", bound=pydantic.BaseModel)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and how to fix it."""


class Config(pydantic.BaseModel):
    """Base for config models: unknown keys are errors (typos must not pass silently)."""

    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True)


class ClientConfig(Config):
    """How a caller reaches forgerpc services (as forgerpc.clients.ChannelSettings); empty = plaintext.

    The orchestrator's `client` key, and every service's `client` key for its own outgoing calls
    (reward -> sandbox, generator -> weight store, trainer -> weight store / replay buffer).
    """

    token_env: str = ""  # env var holding the bearer token
    tls_ca: str = ""  # CA that signed the services' certificates (turns TLS on)
    tls_cert: str = ""  # client certificate, for mutual TLS
    tls_key: str = ""
    server_name: str = ""  # TLS name to check instead of the address's host

    def settings(self):
        from forgerpc.clients.channel import ChannelSettings

        return ChannelSettings(**self.model_dump())


def _allowed(model: type[pydantic.BaseModel], loc: tuple) -> str:
    """Lists the keys a model accepts at `loc`, for "unknown key" errors."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return ""
        current = _model_in(field.annotation)
    fields = getattr(current, "model_fields", None)
    return ", ".join(sorted(fields)) if fields else ""


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def validate(model: type[T], data: dict, source: str = "config") -> T:
    """Validates a plain dict into `model`, raising ConfigError with one line per problem."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(root)"
            if err["type"] == "extra_forbidden":
                allowed = _allowed(model, err["loc"])
                lines.append(f"unknown key '{key}' (allowed here: {allowed})")
            else:
                lines.append(f"key '{key}': {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(lines)) from None


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: only true/false (any case) are booleans, so
    `tis: off` or `mode: on` reach the model as the words. Boolean fields still accept on/off/yes/no
    (pydantic parses those strings)."""


_BOOL = "tag:yaml.org,2002:bool"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _yaml(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def load_config(model: type[T], path: str | pathlib.Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Loads `path` (YAML; optional), applies dotted `key=value` overrides, and validates.

    Raises:
        ConfigError: missing file, bad YAML, malformed override, or a value the model rejects.
    """
    base = OmegaConf.create({})
    source = "config"
    if path is not None:
        path = pathlib.Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        source = f"config {path}"
        try:
            loaded = _yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        base = OmegaConf.create(loaded)
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' must look like key=value")
    for item in overrides:
        key, _, raw = item.partition("=")
        try:
            value = _yaml(raw) if raw else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': value is not valid YAML: {e}") from None
        try:
            # update (not merge) so that "functions.0.weight=2" indexes into a list.
            OmegaConf.update(base, key.strip(), value, merge=True, force_add=True)
        except (OmegaConfBaseException, TypeError, ValueError, IndexError) as e:
            raise ConfigError(f"override '{item}': {e}") from None
    try:
        data = OmegaConf.to_container(base, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve config: {e}") from None
    return validate(model, data, source)


def dump_config(cfg: pydantic.BaseModel) -> str:
    """The effective configuration as YAML (for GetState and run directories)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
