"""Building channel adapters from configuration (``adapter = "module:Class"``)."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from failover._channel import Channel, check_channel
from failover._errors import ConfigError
from failover.config import RouterConfig


def build_channels(config: RouterConfig, source: str = "config") -> list[Channel]:
    """One adapter per configured channel, in the file's order.

    ``options`` are passed to the adapter's constructor as keyword arguments; a
    constructor that takes ``name`` gets the channel's name from the file, and the
    built adapter's ``name`` is set to it in any case.
    """
    return [build_channel(name, config, source) for name in config.channels]


def build_channel(name: str, config: RouterConfig, source: str = "config") -> Channel:
    where = f"{source}: channels.{name}.adapter"
    spec = config.channels[name].adapter
    if spec is None:
        raise ConfigError(f"{where}: missing (building a router from a file needs one)")
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module failed while importing
        raise ConfigError(f"{where}: cannot import {module_name!r}: {exc}") from exc
    factory = getattr(module, attribute, None)
    if factory is None or not callable(factory):
        raise ConfigError(f"{where}: {module_name!r} has no class {attribute!r}")
    options: dict[str, Any] = dict(config.channels[name].options)
    if "name" not in options and _takes_name(factory):
        options["name"] = name
    try:
        adapter = factory(**options)
    except Exception as exc:
        raise ConfigError(
            f"{source}: channels.{name}.options: cannot build {spec} with {options!r}: {exc}"
        ) from exc
    if getattr(adapter, "name", None) != name:
        try:
            adapter.name = name
        except AttributeError as exc:
            raise ConfigError(f"{where}: {spec} instances cannot be named {name!r}") from exc
    try:
        check_channel(adapter)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return adapter  # type: ignore[no-any-return]


def _takes_name(factory: Any) -> bool:
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return "name" in parameters
