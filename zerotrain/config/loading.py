"""Reading and validating configs: JSON files, dicts and bare scheduler blocks."""
from __future__ import annotations

import json
import logging
import os
from typing import Any

from pydantic import TypeAdapter, ValidationError

from zerotrain.config.blocks import SchedulerConfig
from zerotrain.config.errors import ConfigError
from zerotrain.config.messages import _describe, format_validation_error
from zerotrain.config.schema import ZeroTrainConfig

logger = logging.getLogger("zerotrain")


def read_json(path: str, *, error: type[Exception] = ConfigError) -> Any:
    """A JSON file's content; ``error`` names the file and the problem: missing, not UTF-8, not
    JSON, or an object with the same key twice (JSON parsers keep the last one silently)."""
    if not os.path.isfile(path):
        raise error(f"config file not found: {path}")

    def no_duplicates(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise error(f"{path}: key {key!r} appears twice in the same object; keep one (JSON readers "
                            "would silently use the last)")
            seen.add(key)
        return dict(pairs)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=no_duplicates)
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save the "
                    "file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


_read_json = read_json


def parse_config(data: dict[str, Any], source: str = "config dict") -> ZeroTrainConfig:
    """Validate a dict into a :class:`ZeroTrainConfig`, raising one :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a JSON object, got {type(data).__name__}")
    try:
        return ZeroTrainConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def parse_scheduler(data: dict[str, Any]) -> Any:
    """Validate a bare ``scheduler`` block (as it appears under "scheduler")."""
    try:
        return TypeAdapter(SchedulerConfig).validate_python(data)
    except ValidationError as e:
        errors = [{**err, "loc": ("scheduler", *err["loc"])} for err in e.errors()]
        raise ConfigError("\n".join(["invalid scheduler block"] +
                                     [f"  - {line}" for err in errors for line in _describe(err)])) from None


def load_config(source: str | os.PathLike | dict | ZeroTrainConfig) -> ZeroTrainConfig:
    """Parse a JSON file path or a dict; log one warning naming the keys that have no effect."""
    if isinstance(source, ZeroTrainConfig):
        return source
    if isinstance(source, (str, os.PathLike)):
        cfg = parse_config(_read_json(os.fspath(source)), os.fspath(source))
    elif isinstance(source, dict):
        cfg = parse_config(source)
    else:
        raise ConfigError(f"config must be a path or a dict, got {type(source).__name__}")
    inert = cfg.inert_keys()
    if inert:
        logger.warning("config keys accepted but without effect in zerotrain: %s", ", ".join(inert))
    return cfg
