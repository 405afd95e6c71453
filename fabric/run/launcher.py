"""`fabric run [--config FILE] [key=value ...]`: starts the config's rollout servers, reward servers and trainer on
this node as separate processes talking gRPC on localhost, shows each step as it ends, and shuts everything down
cleanly: at the end, on Ctrl-C / SIGTERM, or when the trainer dies. A rollout server that dies is reported by name;
the trainer carries on with the others (its pool resubmits the lost requests), and only when no rollout server or
no reward server is left does the run end. Everything a run writes goes under `output_dir`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import grpc
from omegaconf import DictConfig, ListConfig, OmegaConf, ValueNode
from rich.console import Console
from rich.live import Live

from fabric import security
from fabric.config import ConfigError, load_config, parse_device_mapping
from fabric.config.loader import env_redacted
from fabric.procs import ServerProcess, become_subreaper, end_descendants, start_all
from fabric.reward.judge import JUDGE_ON_ACTOR_INFER
from fabric.run.check import resolved_for_processes
from fabric.trainer import report
from fabric.trainer.config import pipeline_config
from fabric.v1 import trainer_pb2, trainer_pb2_grpc

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "default.yaml"
EXIT_SERVER_DIED = 3


def gpu_env(devices: str | None) -> dict[str, str] | None:
    """A process's CUDA_VISIBLE_DEVICES from its role's device_mapping (None: it sees what the launcher sees)."""
    return {"CUDA_VISIBLE_DEVICES": devices} if devices is not None else None


def keep_env_interpolations(raw, resolved_cfg):
    """`resolved_cfg` with every value that came from `${oc.env:...}` put back as written: the processes of the run
    inherit the environment and resolve it themselves, and the secret it may hold is never written to disk."""

    def walk(raw_node, value):
        if isinstance(value, dict) and isinstance(raw_node, DictConfig):
            return {k: walk(raw_node._get_node(k), v) if k in raw_node else v for k, v in value.items()}
        if isinstance(value, list) and isinstance(raw_node, ListConfig) and len(raw_node) == len(value):
            return [walk(raw_node._get_node(i), v) for i, v in enumerate(value)]
        text = raw_node._value() if isinstance(raw_node, ValueNode) else None
        return text if isinstance(text, str) and "oc.env" in text else value

    return OmegaConf.create(walk(raw, OmegaConf.to_container(resolved_cfg, resolve=False)))


def save_run_config(cfg, path: Path) -> None:
    """The config every process of the run reads: resolved once, `${oc.env:...}` kept as written, mode 0600."""
    write_private(path, OmegaConf.to_yaml(keep_env_interpolations(cfg, resolved_for_processes(cfg))))


def write_private(path: Path, text: str) -> None:
    """Writes a file only its owner can read (0600 from its creation on): what a run writes may hold secrets."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file of the same name keeps its mode through O_TRUNC
    with os.fdopen(fd, "w") as file:
        file.write(text)


class RunFailed(RuntimeError):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class Launcher:
    def __init__(
        self,
        config_path: Path,
        overrides: list[str],
        console: Console,
        trainer_nproc: int = 1,
        search_paths: list[str] | None = None,
    ):
        from fabric.run.prepare import prepare_task

        self.console = console
        self.trainer_nproc = trainer_nproc  # > 1: the trainer runs under torchrun (data x tensor parallel)
        cfg = load_config(config_path, overrides, search_paths=search_paths)
        try:
            self.pc = pipeline_config(cfg)
        except ConfigError as exc:
            raise env_redacted(cfg, exc) from None  # a bad value from `${oc.env:...}` is not printed
        security.configure(
            security.SecurityConfig.from_cfg(cfg)
        )  # every config error surfaces here, before any process starts
        self.out = self.pc.out.resolve()
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        prepare_task(cfg, log=lambda line: console.print(f"[dim]{line}"))
        check_before_start(cfg, self.pc)
        self.device_mappings = {
            role: parse_device_mapping(OmegaConf.select(cfg, f"{role}.device_mapping"), f"{role}.device_mapping")
            for role in ("actor_train", "actor_infer")
        }
        self.config_file = self.out / "config.yaml"
        save_run_config(cfg, self.config_file)
        # LLM judges asking the run's own rollout servers (judge_address: actor_infer): told their addresses
        rewards = cfg.get("rewards") or {}
        self.self_judges = [str(n) for n, r in rewards.items() if r.get("judge_address") == JUDGE_ON_ACTOR_INFER]
        self.reward_devices = {
            d
            for name, reward in rewards.items()
            for d in parse_device_mapping(reward.get("device_mapping"), f"rewards.{name}.device_mapping")
        }
        # the servers' addresses for the trainer, written once they are ready (a resumed run's old one goes first)
        self.servers_file = self.out / "servers.json"
        self.servers_file.unlink(missing_ok=True)
        self.servers: list[ServerProcess] = []
        self.trainer: ServerProcess | None = None
        self.lost: set[str] = set()

    def devices(self, role: str) -> list[str]:
        """The CUDA devices a role's device_mapping names (indices into the visible ones), on a CUDA host only."""
        import torch

        mapping = self.device_mappings.get(role) or []
        if not mapping or not torch.cuda.is_available():
            return []
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        for d in mapping:
            if d >= len(ids):
                raise ConfigError(f"{role}.device_mapping", f"device {d} does not exist here ({len(ids)} visible)")
        return [ids[d] for d in mapping]

    def start_servers(self) -> tuple[list[str], list[str]]:
        import torch

        logs = self.out / "logs"
        infer_devices = self.devices("actor_infer")
        rollout_devices = [infer_devices[i % len(infer_devices)] if infer_devices else None for i in range(
            self.pc.num_rollout_servers)]  # fmt: skip
        rollouts = [
            ServerProcess(
                "rollout",
                self.config_file,
                name=f"rollout-{i}",
                log_path=logs / f"rollout-{i}.log",
                env=gpu_env(device),
            )
            for i, device in enumerate(rollout_devices)
        ]
        cuda = torch.cuda.is_available()
        waves = [[rollouts[i] for i in wave] for wave in start_waves(rollout_devices, cuda)]
        self.servers = list(rollouts)
        with self.console.status(
            f"starting {len(rollouts)} rollout and {self.pc.num_reward_servers} reward server(s) "
            f"(a vLLM engine takes a while to load{'; one per GPU at a time' if len(waves) > 1 else ''})"
        ):
            started = time.perf_counter()

            def start_in_turn(groups: list[list[ServerProcess]]) -> None:
                for group in groups:  # the servers of a group load side by side
                    start_all(group, timeout=self.pc.server_start_timeout_s)

            overrides: list[str] = []
            if self.self_judges:  # the judges need the rollout servers' addresses: those start first
                start_in_turn(waves)
                judged = [rollout.address or "" for rollout in rollouts]
                overrides = [f"rewards.{name}.judge_address=[{','.join(judged)}]" for name in self.self_judges]
            rewards = [
                ServerProcess(
                    "reward",
                    self.config_file,
                    name=f"reward-{i}",
                    overrides=overrides,
                    log_path=logs / f"reward-{i}.log",
                )
                for i in range(self.pc.num_reward_servers)
            ]
            self.servers += rewards
            if self.self_judges:
                start_in_turn([rewards])
            elif cuda and self.reward_devices:  # reward models on GPUs load before any engine measures its memory
                start_in_turn([rewards, *waves])
            else:
                start_in_turn([waves[0] + rewards, *waves[1:]])
        for server in self.servers:
            self.console.print(f"  {server.name:10s} {server.address}  pid {server.process.pid}")
        self.console.print(f"servers ready in {time.perf_counter() - started:.0f} s")
        return [r.address or "" for r in rollouts], [r.address or "" for r in rewards]

    def trainer_alongside_servers(self) -> bool:
        """Whether the trainer loads its policy while the servers start (cluster.trainer_start; see loads_alongside)."""
        import torch

        return loads_alongside(
            self.pc.trainer_start,
            torch.cuda.is_available(),
            set(self.device_mappings.get("actor_train") or []),
            set(self.device_mappings.get("actor_infer") or []),
            self.reward_devices,
        )

    def start_trainer(self) -> ServerProcess:
        """Starts the trainer; it loads its policy, then waits for the servers' addresses in servers.json."""
        command = ["train", "--servers-file", str(self.servers_file)]
        if self.trainer_nproc > 1:
            command += ["--nproc-per-node", str(self.trainer_nproc)]
        train_devices = self.devices("actor_train")
        self.trainer = ServerProcess(
            "trainer",
            self.config_file,
            name="trainer",
            command=command,
            log_path=self.out / "logs" / "trainer.log",
            env=gpu_env(",".join(train_devices) if train_devices else None),
        )
        return self.trainer.start()

    def trainer_ready(self, rollout: list[str], reward: list[str]) -> str:
        """Gives the trainer the servers' addresses and waits until it serves TrainerService."""
        temporary = self.servers_file.with_suffix(".tmp")
        temporary.write_text(json.dumps({"rollout": rollout, "reward": reward}))
        os.replace(temporary, self.servers_file)  # whole or absent: the trainer polls for it
        assert self.trainer is not None  # started by start_trainer
        with self.console.status("trainer: loading the policy (and the supervised warm-up, if configured)"):
            return self.trainer.wait_ready(timeout=self.pc.server_start_timeout_s)

    def check_processes(self) -> None:
        """A dead rollout server is reported and left behind; the run ends only when the trainer cannot go on."""
        for server in self.servers:
            if server.alive or server.name in self.lost:
                continue
            self.lost.add(server.name)
            code = server.process.returncode
            self.console.print(
                f"[bold red]{server.name} ({server.address}, pid {server.process.pid}) died with exit "
                f"code {code}[/]; its log: {server.log_path}"
            )
            kind = server.kind
            alive = [s for s in self.servers if s.kind == kind and s.alive]
            if not alive:
                raise RunFailed(
                    f"every {kind} server is gone (last: {server.name}, exit code {code}); "
                    f"the run cannot go on. Last lines of its log:\n{server.last_lines(10)}",
                    EXIT_SERVER_DIED,
                )
            self.console.print(f"[yellow]the trainer carries on with {len(alive)} {kind} server(s)")
        if self.trainer is not None and not self.trainer.alive and self.trainer.process.returncode != 0:
            raise RunFailed(
                f"the trainer exited with code {self.trainer.process.returncode}; last lines of its log "
                f"({self.trainer.log_path}):\n{self.trainer.last_lines(15)}",
                self.trainer.process.returncode,
            )

    async def watch(self, address: str) -> list[dict]:
        """Streams the trainer's step metrics into a live table until the trainer finishes."""
        rows: list[dict] = []
        async with security.channel(address) as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            call = stub.WatchMetrics(trainer_pb2.WatchMetricsRequest(since_step=1))
            reader = asyncio.ensure_future(self._read(call, rows))
            with Live(self._table(rows), console=self.console, refresh_per_second=2) as live:
                while not reader.done():
                    self.check_processes()
                    live.update(self._table(rows))
                    await asyncio.wait([reader], timeout=0.5)
                live.update(self._table(rows))
            call.cancel()
            try:
                reader.result()
            except (grpc.aio.AioRpcError, asyncio.CancelledError):
                pass
        return rows

    async def _read(self, call, rows: list[dict]) -> None:
        from google.protobuf.json_format import MessageToDict

        async for message in call:
            rows.append(
                MessageToDict(
                    message.metrics, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
                )
            )

    def _table(self, rows: list[dict]):
        table = report.summary_table(
            [_numbers(r) for r in rows[-25:]], title=f"{self.pc.exp_name}: step {len(rows)}/{self.pc.max_steps}"
        )
        return table

    def stop_all(self) -> None:
        for proc in [self.trainer, *self.servers]:
            if proc is not None:
                proc.stop(grace=20)
        # What escaped the servers' process groups (and so their stop) ends here too: the run is over only when
        # every process it started is gone.
        killed = end_descendants(grace=10)
        if killed:
            self.console.print(f"[yellow]killed {len(killed)} process(es) left after the servers stopped: {killed}")


def start_waves(rollout_devices: list[str | None], cuda: bool) -> list[list[int]]:
    """Which rollout servers start together (indices, wave by wave). Without CUDA, all at once. On GPUs, one engine
    per GPU at a time: vLLM sizes its KV cache from the memory it sees free while it profiles, assuming no other
    process allocates meanwhile (its gpu_worker says so), and two engines starting together on one GPU can leave
    each other nothing ("No available memory for the cache blocks", seen on one H200 with the demo's two servers).
    A server with no device of its own (None) sees every GPU, so it starts alone."""
    if not cuda:
        return [list(range(len(rollout_devices)))]
    if None in rollout_devices:
        return [[i] for i in range(len(rollout_devices))]
    by_device: dict[str | None, list[int]] = {}
    for i, device in enumerate(rollout_devices):
        by_device.setdefault(device, []).append(i)
    depth = max(len(servers) for servers in by_device.values())
    return [[servers[k] for servers in by_device.values() if k < len(servers)] for k in range(depth)]


def loads_alongside(mode: str, cuda: bool, train: set[int], infer: set[int], rewards: set[int]) -> bool:
    """cluster.trainer_start: whether the trainer loads its policy (and runs the warm-up) while the servers start.
    `auto`: on GPUs when the trainer's are none of the servers' (both actor_train and actor_infer name their devices;
    empty is every visible one); else after them. A shared GPU: vLLM sizes its KV cache from the memory it finds
    free as it starts, and a trainer loading there would take from it. A host without CUDA: they would share its
    cores (on 2 cores, `make run`'s servers took 109 s to start beside the 60-step warm-up, about 35 s alone).
    `with_servers` is refused where they share a GPU."""
    shares_gpu = cuda and not (train and infer and not train & (infer | rewards))
    if mode == "with_servers" and shares_gpu:
        raise ConfigError(
            "cluster.trainer_start",
            "with_servers: the trainer would share a GPU with a server that is sizing its KV cache; name disjoint "
            "device_mapping for actor_train and actor_infer, or use auto",
        )
    if mode == "auto":
        return cuda and not shares_gpu
    return mode == "with_servers"


def check_before_start(cfg, pc) -> None:
    """Every process's config, checked here (fabric check's checks), so a mistake is one line per problem before
    anything starts (the servers would refuse it too, but only after a long start, and in a log file)."""
    from fabric.run.check import check_or_raise

    check_or_raise(cfg, "all")
    if pc.num_rollout_servers < 1 or pc.num_reward_servers < 1:
        raise ConfigError("cluster.num_rollout_servers", "fabric run needs at least one rollout and one reward server")


def _numbers(row: dict) -> dict:
    """The JSON form of StepMetrics back to numbers (int64 fields arrive as strings)."""
    out = {
        k: (float(v) if isinstance(v, str) and k not in ("step", "weight_version", "stale_samples") else v)
        for k, v in row.items()
    }
    for key in ("step", "weight_version", "stale_samples", "samples"):
        out[key] = int(out.get(key, 0) or 0)
    out.setdefault("extra", {})
    return out


def cli_main(args) -> int:
    console = Console(width=max(130, Console().width))
    config = Path(args.config) if args.config else DEFAULT_CONFIG
    launcher = Launcher(
        config,
        list(args.overrides),
        console,
        trainer_nproc=getattr(args, "trainer_nproc", 1) or 1,
        search_paths=getattr(args, "config_search_path", None),
    )
    loop = asyncio.new_event_loop()
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    started = time.perf_counter()
    try:
        become_subreaper()  # orphans of the processes it starts come back to it, so stop_all can wait for them
        alongside = launcher.trainer_alongside_servers()
        if alongside:
            pid = launcher.start_trainer().process.pid
            console.print(f"trainer loading its policy while the servers start (pid {pid})")
        rollout, reward = launcher.start_servers()
        if not alongside:  # the servers first: a GPU they share, or the host's cores, goes to them
            launcher.start_trainer()
        address = launcher.trainer_ready(rollout, reward)
        console.print(
            f"trainer: {address} (fabric.v1.TrainerService: GetStatus, WatchMetrics, Pause, Resume, "
            "SaveCheckpoint, Stop)"
        )
        rows = loop.run_until_complete(launcher.watch(address))
        trainer = launcher.trainer
        assert trainer is not None  # started above
        code = trainer.process.wait(timeout=120)
        launcher.check_processes()
        if code != 0:
            raise RunFailed(f"the trainer exited with code {code}; see {trainer.log_path}", code)
        first, last = report.first_last([_numbers(r) for r in rows])
        console.print(
            f"[bold]done in {time.perf_counter() - started:.0f} s[/]: {len(rows)} steps; mean reward of "
            f"the first 5 steps {first:.3f}, of the last 5 steps {last:.3f}"
        )
        out = launcher.out
        console.print(
            f"metrics: {out / 'metrics.jsonl'}\nplot:    {out / 'metrics.png'}\n"
            f"model:   {out / 'checkpoints' / 'final'}\nlogs:    {out / 'logs'}"
        )
        return 0
    except RunFailed as exc:
        console.print(f"[bold red]run failed:[/] {exc}")
        return exc.code
    except KeyboardInterrupt:
        console.print(
            f"[yellow]interrupted{' by signal ' + str(stop['signal']) if stop['signal'] else ''}: "
            "stopping every process"
        )
        return 130
    except (TimeoutError, RuntimeError) as exc:
        console.print(f"[bold red]run failed:[/] {exc}")
        return 1
    finally:
        launcher.stop_all()
        loop.close()
