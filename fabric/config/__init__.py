"""The YAML config: ROLL's vocabulary, loaded with OmegaConf (`${...}` interpolation, dotlist overrides)."""

from fabric.config.loader import ConfigError, load_config, parse_device_mapping, resolved, role_section

__all__ = ["ConfigError", "load_config", "parse_device_mapping", "resolved", "role_section"]
