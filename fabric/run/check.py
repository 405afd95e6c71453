"""`fabric check`: everything the named processes would read, checked without starting anything.

`check_config(cfg, role)` returns a CheckReport: one summary line per section that passed, one ConfigError per
problem (each names its key and the fix), and the ROLL keys the fabric accepts but does not implement (one warning
line). `fabric run`, `fabric serve` and `fabric train` run the same checks before they start anything.

Roles: `rollout` (the actor_infer section, vLLM engine arguments included), `reward` (the rewards section, each
scorer built but not started), `train` (the pipeline keys, actor_train, the dataset and the model directory), `all`.
Each role reads and checks only its own sections. Every role refuses top-level typos with the closest key (another
ROLL pipeline's keys are known, never typos); `train` and `all` also refuse other pipelines (agentic, distillation,
DPO, SFT: one line naming the pipeline) and ROLL keys whose loss would change the result, so the rollout role of
an agentic config serves. Every section the process reads is resolved (`${...}`), nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fabric.config import roll_keys
from fabric.config.loader import ConfigError, env_redacted, resolved
from fabric.config.roll_keys import top_level

ROLES = ("rollout", "reward", "train", "all")
log = logging.getLogger("fabric.config")


@dataclass
class CheckReport:
    summary: list[str] = field(default_factory=list)
    errors: list[ConfigError] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def warning(self) -> str:
        """The one warning line, or '' when nothing is ignored."""
        if not self.ignored:
            return ""
        keys = ", ".join(dict.fromkeys(self.ignored))
        return f"ROLL keys accepted but not implemented by the fabric (ignored; README 'ROLL configs'): {keys}"

    def raise_errors(self) -> None:
        """Raises the problems as one ConfigError (the first one's key, every problem on its own line)."""
        if self.errors:
            first = self.errors[0]
            if len(self.errors) == 1:
                raise first
            error = ConfigError("", "\n".join(str(e) for e in self.errors))
            error.key = first.key
            raise error


@contextlib.contextmanager
def _quiet_vllm():
    """vLLM's chatter off while the engine arguments are checked: its INFO lines (on stdout, from the import and from
    building the engine config, where vLLM may first configure its loggers) would bury the one line that matters."""
    previous = os.environ.get("VLLM_LOGGING_LEVEL")
    os.environ["VLLM_LOGGING_LEVEL"] = "ERROR"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("VLLM_LOGGING_LEVEL")
        else:
            os.environ["VLLM_LOGGING_LEVEL"] = previous
        for name in [n for n in logging.root.manager.loggerDict if n.startswith("vllm")]:
            logging.getLogger(name).setLevel(logging.ERROR)


def _check_rollout(cfg: DictConfig, section: str, report: CheckReport, engine: bool) -> None:
    from fabric.rollout.config import load_rollout_config
    from fabric.rollout.validation import check_generating_args

    rc = load_rollout_config(cfg, section)
    report.ignored += rc.ignored
    check_generating_args(rc.generating_args, rc.role)
    engine_note = "engine arguments not checked"
    if engine:
        with _quiet_vllm():
            from fabric.rollout.engine import check_engine_config

            check_engine_config(rc)
        engine_note = "engine arguments OK"
    sampling = ", ".join(f"{k} {v}" for k, v in rc.generating_args.items())
    devices = f"{len(rc.device_mapping)} device(s)" if rc.device_mapping else "no device_mapping"
    report.summary.append(
        f"{section}: {rc.strategy_name} serving {rc.model} (from {rc.model_key}), {devices}, infer_batch_size "
        f"{rc.infer_batch_size}, sleep_level {rc.sleep_level}; generating_args: {sampling or 'none'}; {engine_note}"
    )


def _check_rewards(cfg: DictConfig, section: str, report: CheckReport) -> None:
    from fabric.reward.config import load_reward_configs, unknown_options
    from fabric.reward.scorer import build_scorer

    for name, rc in load_reward_configs(cfg, section).items():
        try:
            scorer = build_scorer(rc)  # constructors check their keys and paths; nothing loads before start()
            report.ignored += unknown_options(rc)
        except ConfigError as exc:
            report.errors.append(exc)
            continue
        tags = f", tags {rc.tag_included}" if rc.tag_included else ""
        report.summary.append(
            f"{section}.{name}: {rc.worker_cls} -> {rc.target} ({scorer.model or 'rule'}), infer_batch_size "
            f"{rc.infer_batch_size}{tags}"
        )


def _check_train(cfg: DictConfig, report: CheckReport, files: bool) -> None:
    from fabric.trainer.config import pipeline_config

    for key in cfg.keys():  # every section the trainer reads resolves (the ignored ones are never read)
        key = str(key)
        if key not in roll_keys.TOP_LEVEL_IGNORED and key not in roll_keys.PIPELINE_KEYS:
            resolved(cfg, key)
    pc = pipeline_config(cfg)
    if files:
        if not Path(pc.pretrain, "config.json").is_file():
            raise ConfigError("actor_train.pretrain", f"not an HF model directory (no config.json): {pc.pretrain}")
        if not Path(pc.dataset).is_file():
            raise ConfigError("actor_train.data_args.file_name", f"dataset not found: {pc.dataset}")
    report.summary.append(
        f"actor_train: megatron_train on {pc.pretrain}, dataset {pc.dataset}; {pc.max_steps} steps of "
        f"{pc.rollout_batch_size} prompts x {pc.group_size} samples, response_length {pc.response_length}, "
        f"rewards {', '.join(pc.rewards)}"
    )


def check_config(
    cfg: DictConfig,
    role: str = "all",
    *,
    rollout_section: str = "actor_infer",
    reward_section: str = "rewards",
    engine: bool = True,
    files: bool = True,
) -> CheckReport:
    """Checks what the processes of `role` would read; never raises a ConfigError (they are in the report).
    `engine`: check vLLM engine arguments (imports vLLM). `files`: check the trainer's model dir and dataset."""
    from fabric.trainer.config import TOP_LEVEL_KEYS

    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    report = CheckReport()
    ignored, report.errors = top_level(cfg, set(TOP_LEVEL_KEYS), role)
    report.ignored += ignored
    if any(e.key in roll_keys.PIPELINE_KEYS for e in report.errors):
        return report  # one line says it all: the trainer's sections do not mean what the fabric would read
    steps = []
    if role in ("rollout", "all"):
        steps.append(lambda: _check_rollout(cfg, rollout_section, report, engine))
    if role in ("reward", "all"):
        steps.append(lambda: _check_rewards(cfg, reward_section, report))
    if role in ("train", "all"):
        steps.append(lambda: _check_train(cfg, report, files))
    try:
        resolved(cfg, "security")
    except ConfigError as exc:
        report.errors.append(exc)
    for step in steps:
        try:
            step()
        except ConfigError as exc:
            if not any(str(exc) == str(e) for e in report.errors):
                report.errors.append(exc)
    report.errors = [env_redacted(cfg, e) for e in report.errors]
    return report


def check_or_raise(cfg: DictConfig, role: str = "all", **kwargs) -> CheckReport:
    """check_config for a command about to start: logs the warning line, raises the problems as one ConfigError."""
    report = check_config(cfg, role, **kwargs)
    report.raise_errors()
    if report.warning():
        log.warning("%s", report.warning())
    return report


def resolved_for_processes(cfg: DictConfig) -> DictConfig:
    """The config every process of a run reads, resolved once (so `${now:...}` is one time for all of them): the
    keys the fabric ignores are left out, so an unset `${oc.env:...}` among them stops nothing."""
    skip = set(roll_keys.TOP_LEVEL_IGNORED) | set(roll_keys.PIPELINE_KEYS)
    return OmegaConf.create({str(k): resolved(cfg, str(k)) for k in cfg.keys() if str(k) not in skip})
