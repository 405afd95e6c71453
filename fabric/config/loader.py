"""Loading a ROLL-style YAML: OmegaConf with `${...}` interpolation and `key=value` overrides.

Every problem is a ConfigError naming the key and the fix, so a CLI can print one line instead of a traceback.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config problem: `key` is the dotted path at fault, the message says what to change."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config key '{key}': {message}" if key else message)
        self.key = key


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), base: dict | None = None) -> DictConfig:
    """Loads YAML (and/or a base dict), applies dotlist overrides, resolves every interpolation."""
    parts = [OmegaConf.create(base or {})]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("", f"config file not found: {path}")
        try:
            parts.append(OmegaConf.load(path))
        except (OmegaConfBaseException, Exception) as exc:  # yaml.YAMLError and friends
            raise ConfigError("", f"cannot parse {path}: {exc}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like key=value (e.g. max_steps=3)")
    try:
        parts.append(OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.merge(*parts)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or ""
        raise ConfigError(str(key), str(exc).splitlines()[0]) from None
    return cfg


def role_section(cfg: DictConfig, role: str) -> DictConfig:
    if role not in cfg or cfg[role] is None:
        present = [k for k in cfg.keys() if isinstance(cfg[k], DictConfig)]
        raise ConfigError(role, f"section missing (sections present: {', '.join(map(str, present)) or 'none'})")
    return cfg[role]


_RANGE_RE = re.compile(r"^\s*list\s*\(\s*range\s*\((.*)\)\s*\)\s*$")


def parse_device_mapping(value: Any, key: str = "device_mapping") -> list[int]:
    """ROLL writes `list(range(0,12))` as a string: parse it (never eval), or take a list / '0,1,2'."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if not isinstance(value, str):
        try:
            return [int(v) for v in value]
        except (TypeError, ValueError):
            raise ConfigError(key, f"expected a list of device ids, got {value!r}") from None
    text = value.strip()
    match = _RANGE_RE.match(text)
    try:
        if match:
            args = [int(a) for a in match.group(1).split(",") if a.strip()]
            if not 1 <= len(args) <= 3:
                raise ValueError
            return list(range(*args))
        parsed = ast.literal_eval(text if text.startswith("[") else f"[{text}]")
        return [int(v) for v in parsed]
    except (ValueError, SyntaxError):
        raise ConfigError(key, f"cannot parse {value!r}: write list(range(0,8)), [0,1,2] or 0,1,2") from None
