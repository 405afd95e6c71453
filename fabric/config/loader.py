"""Loading a ROLL-style YAML: Hydra `defaults:` composed as ROLL composes them, OmegaConf `${...}` interpolation
resolved lazily (a process resolves only the sections it reads), and `key=value` overrides.

Every problem is a ConfigError naming the key and the fix, so a CLI can print one line instead of a traceback.
"""

from __future__ import annotations

import ast
import difflib
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# The resolvers ROLL's configs use: `oc.env` is OmegaConf's own; `now` is Hydra's (registered here too, so that a
# config without a `defaults:` list, loaded without Hydra, resolves the same way).
if not OmegaConf.has_resolver("now"):
    with warnings.catch_warnings():  # OmegaConf 2.4 deprecates the name (2.3's register_resolver is another API)
        warnings.filterwarnings("ignore", message=r"register_new_resolver\(\) is deprecated")
        OmegaConf.register_new_resolver("now", lambda pattern: datetime.now().strftime(pattern), use_cache=True)

# Hydra's own settings (`hydra: {run: {dir: .}}`): they configure Hydra's app runner, which the fabric is not.
HYDRA_KEYS = ("hydra", "defaults")


class ConfigError(ValueError):
    """A config problem: `key` is the dotted path at fault, the message says what to change."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config key '{key}': {message}" if key else message)
        self.key = key


def did_you_mean(key: str, known: Iterable[str], cutoff: float = 0.75) -> str:
    """ "did you mean 'x'?" for the closest known key, or ''."""
    match = difflib.get_close_matches(str(key), sorted(map(str, known)), n=1, cutoff=cutoff)
    return f"did you mean {match[0]!r}?" if match else ""


def check_keys(section: Any, allowed: set[str], where: str) -> None:
    """Unknown keys are errors with the closest allowed key as a suggestion."""
    if section is None:
        return
    if not isinstance(section, DictConfig):
        raise ConfigError(where, f"must be a mapping, got {type(section).__name__}")
    for key in map(str, section.keys()):
        if key not in allowed:
            hint = did_you_mean(key, allowed, cutoff=0.6) or f"allowed keys: {', '.join(sorted(allowed))}"
            path = f"{where}.{key}" if where else str(key)
            raise ConfigError(path, f"unknown key; {hint}")


def number(value: Any, key: str, kind: Any = float, minimum: float | None = None, above: float | None = None) -> Any:
    """`value` as `kind` (int or float), or a ConfigError naming `key` (never a TypeError/ValueError)."""
    if isinstance(value, bool):
        raise ConfigError(key, f"must be a number, got {value!r}")
    try:
        value = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(key, f"must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(key, f"must be >= {minimum}, got {value}")
    if above is not None and value <= above:
        raise ConfigError(key, f"must be > {above}, got {value}")
    return value


_ENV_REF = re.compile(r"\$\{oc\.env:([^,}\s]+)")
FROM_ENV = "(from the environment)"


def env_redacted(cfg: DictConfig, exc: ConfigError) -> ConfigError:
    """`exc` with every value that `cfg` takes from `${oc.env:...}` shown as "(from the environment)": a bad
    value's message must not print a secret."""
    names = set(_ENV_REF.findall(OmegaConf.to_yaml(cfg, resolve=False)))
    values = {os.environ[name] for name in names if os.environ.get(name)}
    # Quoted anywhere; bare only when long enough not to match ordinary words and numbers of the message.
    forms = {repr(v) for v in values} | {v for v in values if len(v) >= 4}
    if not forms:
        return exc
    pattern = "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))
    message = re.sub(pattern, FROM_ENV, str(exc))
    if message == str(exc):
        return exc
    redacted = ConfigError("", message)
    redacted.key = exc.key
    return redacted


def _error(exc: OmegaConfBaseException, key: str = "") -> ConfigError:
    full_key = str(getattr(exc, "full_key", "") or key or "")
    message = str(exc).splitlines()[0]
    if "oc.env" in str(exc) or "environment variable" in message.lower():
        message += " (set the variable, or override the key: key=value)"
    return ConfigError(full_key, message)


SEARCH_PATH_FLAG = "--config-search-path"


def _default_names(entry: Any) -> list[str]:
    """The config paths (group/option, no .yaml) one `defaults:` entry names, as Hydra reads them."""

    def group(text: str) -> str:
        for prefix in ("optional ", "override "):
            text = text.strip().removeprefix(prefix)
        return text.split("@")[0].strip()

    if isinstance(entry, str):
        return [] if entry.strip() == "_self_" else [group(entry)]
    if isinstance(entry, dict):
        names = []
        for key, option in entry.items():
            options = option if isinstance(option, list) else [option]
            names += [group(str(key)) + ("" if o in (None, "???") else f"/{o}") for o in options]
        return names
    return []


def _check_search_paths(path: Path, allowed: Sequence[str | Path]) -> None:
    """Refuses a `defaults:` entry or `hydra.searchpath` that reaches outside the config's folder (a config from
    elsewhere must not read any file it names): one line naming the flag that allows the folder."""
    root = path.parent.resolve()
    roots = [root, *(Path(d).resolve() for d in allowed)]

    def refuse(target: Path, what: str, where: Path) -> None:
        if not any(target.is_relative_to(r) for r in roots):
            raise ConfigError(
                "defaults" if what.startswith("defaults") else "hydra.searchpath",
                f"{what} in {where} reaches {target}, outside the config's folder {root}: "
                f"pass {SEARCH_PATH_FLAG} {target.parent} to allow that folder",
            )

    files, seen = [path.resolve()], set()
    while files:
        current = files.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            raw = yaml.safe_load(current.read_text()) or {}
        except (yaml.YAMLError, OSError):
            continue  # Hydra's composition reports it
        if not isinstance(raw, dict):
            continue
        hydra = raw.get("hydra")
        hydra = hydra if isinstance(hydra, dict) else {}
        for entry in hydra.get("searchpath") or []:
            text = str(entry)
            if text.startswith("pkg://"):
                raise ConfigError("hydra.searchpath", f"'{text}' in {current}: copy the package's configs under {root}")
            folder = Path(text.removeprefix("file://"))
            for base in [Path("/")] if folder.is_absolute() else [root, Path.cwd()]:  # either reading
                refuse((base / folder).resolve(), f"hydra.searchpath '{text}'", current)
        for entry in raw.get("defaults") or []:
            for name in _default_names(entry):
                base = root if name.startswith("/") else current.parent  # Hydra: relative to the entry's file
                target = (base / f"{name.lstrip('/')}.yaml").resolve()  # symlinks followed
                refuse(target, f"defaults entry '{name}'", current)
                files.append(target)


def _compose_hydra(path: Path) -> DictConfig:
    """The file composed with Hydra's compose API, as ROLL's launch scripts do (`initialize(config_path=DIR)`,
    `compose(config_name=STEM)`): the `defaults:` list merged in order, the file itself last unless `_self_`
    says otherwise, `hydra` settings dropped."""
    try:
        from hydra import compose, initialize_config_dir
        from hydra.errors import HydraException
    except ImportError:  # pragma: no cover - hydra-core is a dependency
        raise ConfigError(
            "defaults", "composing a `defaults:` list needs hydra-core (pip install hydra-core)"
        ) from None
    if path.suffix != ".yaml":
        raise ConfigError("defaults", f"Hydra composes only .yaml files: rename {path.name} to {path.stem}.yaml")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Defaults list is missing `_self_`": ROLL's files rely on that default
            with initialize_config_dir(version_base=None, config_dir=str(path.parent.resolve()), job_name="fabric"):
                cfg = compose(config_name=path.stem)
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as exc:
        message = " ".join(str(exc).split())
        raise ConfigError("defaults", f"cannot compose {path}: {message}") from None
    # A plain config again (compose returns a struct one, which would refuse new keys from overrides).
    return cast(DictConfig, OmegaConf.create(OmegaConf.to_container(cfg, resolve=False)))


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    base: dict | None = None,
    search_paths: Sequence[str | Path] | None = (),
) -> DictConfig:
    """Loads YAML (and/or a base dict), composes its Hydra `defaults:`, applies dotlist overrides.
    `defaults:` and `hydra.searchpath` may name files only under the config's folder and `search_paths`
    (the CLI's --config-search-path).

    Interpolations are left for the reader: a section is resolved when a process reads it (`resolved`), so a
    `${oc.env:VAR}` in a section this process never reads does not stop it. `check.check_config` resolves every
    section a process needs, before anything starts."""
    parts: list[DictConfig | ListConfig] = [OmegaConf.create(base or {})]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("", f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, OSError) as exc:
            raise ConfigError("", f"cannot parse {path}: {' '.join(str(exc).split())}") from None
        if not isinstance(raw, dict):
            raise ConfigError("", f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
        try:
            if raw.get("defaults"):
                _check_search_paths(path, search_paths or ())
            parts.append(_compose_hydra(path) if raw.get("defaults") else OmegaConf.load(path))
        except OmegaConfBaseException as exc:
            raise ConfigError("", f"cannot parse {path}: {str(exc).splitlines()[0]}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like key=value (e.g. max_steps=3)")
    try:
        parts.append(OmegaConf.from_dotlist(list(overrides)))
        cfg = cast(DictConfig, OmegaConf.merge(*parts))
    except OmegaConfBaseException as exc:
        raise _error(exc) from None
    for key in HYDRA_KEYS:
        cfg.pop(key, None)
    return cfg


def resolved(cfg: DictConfig, key: str) -> Any:
    """The value at dotted `key`, interpolations resolved (a container for a section); None when absent.
    A failing interpolation is a ConfigError naming the key that holds it."""
    try:
        node = OmegaConf.select(cfg, key, default=None, throw_on_missing=True)
        if OmegaConf.is_config(node):
            return OmegaConf.to_container(node, resolve=True)
        return node
    except OmegaConfBaseException as exc:
        raise _error(exc, key) from None


def role_section(cfg: DictConfig, role: str) -> DictConfig:
    if role not in cfg or cfg[role] is None:
        present = [k for k in cfg.keys() if isinstance(cfg._get_node(k), DictConfig)]
        raise ConfigError(role, f"section missing (sections present: {', '.join(map(str, present)) or 'none'})")
    return cfg[role]


MAX_DEVICE_IDS = 1 << 16
_RANGE_RE = re.compile(r"^\s*list\s*\(\s*range\s*\((.*)\)\s*\)\s*$")
_LIST_RE = re.compile(r"^\s*list\s*\(\s*(\[.*\])\s*\)\s*$")


def parse_device_mapping(value: Any, key: str = "device_mapping") -> list[int]:
    """ROLL writes a Python expression that it evals (`list(range(0,12))`, `list([4,5,12,13])`, `[0]`): parsed
    here without evaluating code; a list or '0,1,2' also works."""
    if value is None:
        return []
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a list of device ids, got {value!r}")
    if isinstance(value, int):
        return [value]
    if not isinstance(value, str):
        try:
            if any(isinstance(v, bool) for v in value):
                raise ValueError
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
            span = range(*args)
            if len(span) > MAX_DEVICE_IDS:  # measured before it is built: list(range(0, 10**9)) would not fit
                raise ConfigError(key, f"{value!r} names {len(span)} devices; at most {MAX_DEVICE_IDS}")
            ids = list(span)
        else:
            listed = _LIST_RE.match(text)
            text = listed.group(1) if listed else text
            parsed = ast.literal_eval(text if text.startswith("[") else f"[{text}]")
            if not all(type(v) is int for v in parsed):
                raise ValueError
            ids = list(parsed)
        if any(isinstance(v, bool) or v < 0 for v in ids):
            raise ValueError
        return ids
    except ConfigError:
        raise
    except (ValueError, SyntaxError, TypeError):
        raise ConfigError(
            key, f"cannot parse {value!r}: write list(range(0,8)), list([4,5,12,13]), [0,1,2] or 0,1,2"
        ) from None
