"""`fabric` command line. Each command's work lives in its own module, imported only when the command runs
(so `fabric --help` is instant and a missing GPU library never breaks an unrelated command)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from fabric.config import ConfigError
from fabric.config.loader import SEARCH_PATH_FLAG
from fabric.procs import exit_now


def _add_search_path(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        SEARCH_PATH_FLAG,
        dest="config_search_path",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder outside the config's own that its `defaults:` / hydra.searchpath may load (repeatable; "
        "ROLL's examples load ../config/...)",
    )


def _add_server_args(p: argparse.ArgumentParser, role: str) -> None:
    p.add_argument("--config", required=True, help="ROLL-style YAML file")
    _add_search_path(p)
    p.add_argument("--role", default=role, help=f"config section to serve (default: {role})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for a cluster)")
    p.add_argument("--port", type=int, default=0, help="port to bind (0: any free port, printed at start)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (OmegaConf dotlist)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fabric", description="gRPC fabric for RL of LLMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("make-tiny-model", help="build the tiny Qwen2 model + tokenizer offline")
    p.add_argument("dir", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler="fabric.models.tiny:cli_main")

    serve = sub.add_parser("serve", help="start one fabric server on this node")
    serve_sub = serve.add_subparsers(dest="server", required=True, metavar="KIND")
    p = serve_sub.add_parser("rollout", help="vLLM rollout server (fabric.v1.RolloutService)")
    _add_server_args(p, "actor_infer")
    p.set_defaults(handler="fabric.rollout.server:cli_main", exit_without_teardown=True)
    p = serve_sub.add_parser("reward", help="reward server (fabric.v1.RewardService)")
    _add_server_args(p, "rewards")
    p.set_defaults(handler="fabric.reward.server:cli_main", exit_without_teardown=True)

    p = sub.add_parser("run", help="run every process of a config on this node (default: the embedded demo)")
    p.add_argument("--config", default=None, help="ROLL-style YAML (default: examples/default.yaml)")
    _add_search_path(p)
    p.add_argument(
        "--trainer-nproc",
        type=int,
        default=1,
        help="trainer processes (torchrun; data x tensor parallel as actor_train.strategy_args.strategy_config says)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. max_steps=3 output_dir=/tmp/x")
    p.set_defaults(handler="fabric.run.launcher:cli_main")

    p = sub.add_parser("train", help="run the GRPO loop against running rollout and reward servers")
    p.add_argument("--config", required=True, help="ROLL-style YAML file")
    _add_search_path(p)
    p.add_argument("--rollout", action="append", help="rollout server HOST:PORT (repeatable; else cluster.rollout)")
    p.add_argument("--reward", action="append", help="reward server HOST:PORT (repeatable; else cluster.reward)")
    p.add_argument("--port", type=int, default=None, help="TrainerService port (default cluster.trainer_port or 0)")
    p.add_argument(
        "--servers-file",
        default=None,
        help='read the rollout and reward addresses from this JSON file ({"rollout": [...], "reward": [...]}), '
        "waiting for it after loading the policy: `fabric run` starts the trainer so, beside its servers",
    )
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        help="trainer processes on this node, started by torchrun (data x tensor parallel; sizes from "
        "actor_train.strategy_args.strategy_config). For several nodes run torchrun -m fabric.trainer on each",
    )
    p.add_argument("--resume", default=None, help="a checkpoint's megatron/ folder: resume the policy's sharded state")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (OmegaConf dotlist)")
    p.set_defaults(handler="fabric.trainer.server:cli_main")

    p = sub.add_parser("check", help="check a config for the named processes without starting anything")
    p.add_argument("--config", required=True, help="ROLL-style YAML file")
    _add_search_path(p)
    p.add_argument(
        "--role", default="all", choices=["rollout", "reward", "train", "all"], help="which processes (default all)"
    )
    p.add_argument("--rollout-section", default="actor_infer", help="the rollout servers' section")
    p.add_argument("--reward-section", default="rewards", help="the reward servers' section (default rewards)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (OmegaConf dotlist)")
    p.set_defaults(handler="fabric.cli:check_main")

    p = sub.add_parser("push-weights", help="push an HF checkpoint to running rollout servers")
    p.add_argument("--checkpoint", required=True, help="HF model directory (safetensors)")
    p.add_argument("--target", action="append", required=True, help="rollout server HOST:PORT (repeatable)")
    p.add_argument("--version", type=int, default=None, help="weight version (default: serving version + 1)")
    p.add_argument("--mode", choices=["relay", "direct"], default=None, help="fan-out (default: relay for 2+)")
    p.add_argument(
        "--transport",
        choices=["auto", "grpc", "tcp", "gloo", "nccl", "ipc"],
        default="auto",
        help="the path of the bulk bytes, if the server offers it and this sender can use it, else the best both can "
        "(auto: ipc > nccl > tcp > grpc; gloo only when asked); each server's result says which it took and why",
    )
    p.add_argument("--chunk-mib", type=float, default=4.0, help="chunk size in MiB")
    p.add_argument("--config", default=None, help="YAML whose `security` section (token, TLS) to use")
    p.set_defaults(handler="fabric.weights.push:cli_main")

    return parser


def check_main(args) -> int:
    """`fabric check`: exit 0 with one line per section, or exit 2 with one line per problem."""
    from fabric.config import load_config
    from fabric.run.check import check_config

    try:
        cfg = load_config(args.config, args.overrides, search_paths=args.config_search_path)
    except ConfigError as exc:
        print(f"fabric: {exc}", file=sys.stderr)
        return 2
    report = check_config(cfg, args.role, rollout_section=args.rollout_section, reward_section=args.reward_section)
    if report.warning():
        print(f"warning: {report.warning()}", file=sys.stderr)
    for error in report.errors:
        print(f"fabric: {error}", file=sys.stderr)
    if report.errors:
        return 2
    for line in report.summary:
        print(line)
    print(f"OK: {args.config} ({args.role})")
    return 0


def check_before_start(args) -> None:
    """`fabric serve` and `fabric train` check what they will read before starting anything (ConfigError, exit 2,
    one line per problem); `fabric run` does it in its launcher, after preparing the task's model and data."""
    from fabric.config import load_config
    from fabric.run.check import check_or_raise

    if args.command == "serve":
        role = {"rollout": "rollout", "reward": "reward"}[args.server]
        sections = {"rollout_section": args.role} if role == "rollout" else {"reward_section": args.role}
        check_or_raise(load_config(args.config, args.overrides, search_paths=args.config_search_path), role, **sections)
    elif args.command == "train":
        check_or_raise(load_config(args.config, args.overrides, search_paths=args.config_search_path), "train")


def main(argv: list[str] | None = None, *, exiting: bool = False) -> int:
    """Runs one command; returns its exit code. `exiting`: this process ends right after (the `fabric` entry point),
    so a server that has stopped cleanly may skip the interpreter's teardown (see fabric.procs.exit_now)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv[argv.index(args.command) + 1 :]  # the command's own arguments (`fabric train` re-launches them)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    module_name, func_name = args.handler.split(":")
    try:
        check_before_start(args)
        func = getattr(importlib.import_module(module_name), func_name)
        code = int(func(args) or 0)
        if exiting and getattr(args, "exit_without_teardown", False):
            exit_now(code)
        return code
    except ConfigError as exc:
        print(f"fabric: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    """The `fabric` command."""
    sys.exit(main(exiting=True))


if __name__ == "__main__":
    entry()
