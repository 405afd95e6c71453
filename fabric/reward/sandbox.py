"""`code_sandbox`: ROLL's CodeSandboxRewardWorker with `use_local: true`, each program run in a local sandbox.

A response's code (ROLL's extraction: the first fenced block that defines a function, after </think>) runs against
the item's tests; the reward and the correctness score are ROLL's: 1.0 when every test passes, else 0.0.
`ground_truth` carries the test fields of ROLL's code data as one JSON object:
`{"case_type": "assert", "test_cases": [{"assert_code": "assert f(1) == 2"}]}`; case types as ROLL's local tester:
`assert` / `pytest` (each case's code after the solution; `def test_*` functions are called), `check_based`
(`check(entry_point)` per test line), `text` (the response itself quoted into `{response}`), and stdin/stdout
(any other case_type: cases `{"stdin": ..., "expected_stdout": ...}`, compared line by line, trailing blanks
ignored). Call-based stdin/stdout tests (`test_case_function` set) are refused per item.

The sandbox (`SandboxRunner`): each program runs in a subprocess, in a fresh temporary folder, with limits on CPU
time (RLIMIT_CPU), address space (RLIMIT_AS), processes (RLIMIT_NPROC), file size (RLIMIT_FSIZE), output size and
wall-clock time; on any limit its whole process group is killed. Isolation comes from Linux namespaces through
`unshare --net --mount --pid` (util-linux) and an unprivileged uid, which needs the server to run as root (as in
its container); elsewhere the scorer refuses to start rather than run code unconfined:
  * no network: a fresh network namespace holds only a loopback that is down, so connect() fails at once;
  * writes only in its folder: the program runs as a uid of its own (`uid_base` + slot), which owns nothing but its
    folder, and /tmp, /var/tmp, /dev/shm and /run/lock are covered by empty read-only tmpfs in its mount namespace;
  * nothing outlives it: it runs in a PID namespace whose init is the launcher (sandbox_exec.py), so its children
    die with it even when they left its process group; each concurrent slot has its own uid, so one program's fork
    bomb cannot use up another's RLIMIT_NPROC.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fabric.config import ConfigError
from fabric.errors import FabricError, internal, invalid
from fabric.reward.scorer import ScoreItem, Scorer, ScoreResult

LAUNCHER = str(Path(__file__).with_name("sandbox_exec.py"))
SETUP_FAILED = 125
# ROLL's BASE_IMPORTS (roll/utils/local_code/execute_utils.py), put before every program.
BASE_IMPORTS = (
    "from string import *\nfrom re import *\nfrom datetime import *\nfrom collections import *\nfrom heapq import *\n"
    "from bisect import *\nfrom copy import *\nfrom math import *\nfrom random import *\nfrom statistics import *\n"
    "from itertools import *\nfrom functools import *\nfrom operator import *\nfrom io import *\nfrom sys import *\n"
    "from json import *\nfrom builtins import *\nfrom typing import *\nimport string\nimport re\nimport datetime\n"
    "import collections\nimport heapq\nimport bisect\nimport copy\nimport math\nimport random\nimport statistics\n"
    "import itertools\nimport functools\nimport operator\nimport io\nimport sys\nimport json\n"
    "from typing import List, Dict, Any, Optional, Tuple\nfrom math import inf\nsys.setrecursionlimit(6*10**5)\n"
)


@dataclass
class RunResult:
    returncode: int | None  # None when killed by the sandbox on a limit
    stdout: str
    stderr: str
    limit: str = ""  # "wall-clock", "output" or "cpu" when a limit ended it
    wall_s: float = 0.0

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.limit


class SandboxRunner:
    """Runs Python programs in the sandbox of the module doc, at most `slots` at once."""

    def __init__(
        self,
        python: str = "/usr/bin/python3",
        wall_s: float = 10.0,
        cpu_s: int = 5,
        memory_mb: int = 1024,
        max_output_bytes: int = 1 << 20,
        max_processes: int = 32,
        max_file_mb: int = 16,
        slots: int = 2,
        uid_base: int = 61000,
    ):
        self.python, self.wall_s, self.max_output_bytes = python, wall_s, max_output_bytes
        self.limits = {
            "RLIMIT_CPU": [cpu_s, cpu_s + 1],  # SIGXCPU at the soft limit, SIGKILL a second later
            "RLIMIT_AS": [memory_mb << 20] * 2,
            "RLIMIT_NPROC": [max_processes] * 2,
            "RLIMIT_FSIZE": [max_file_mb << 20] * 2,
            "RLIMIT_NOFILE": [256, 256],
            "RLIMIT_CORE": [0, 0],
        }
        self._uids: asyncio.Queue[int] = asyncio.Queue()
        for slot in range(slots):
            self._uids.put_nowait(uid_base + slot)

    @staticmethod
    def unusable() -> str:
        """Why this host cannot sandbox, or ""."""
        if os.geteuid() != 0:
            return "the code sandbox needs root (network, mount and PID namespaces, a uid per program)"
        if shutil.which("unshare") is None:
            return "the code sandbox needs util-linux's unshare on PATH"
        return ""

    async def run(self, code: str, stdin: str = "") -> RunResult:
        uid = await self._uids.get()
        folder = tempfile.mkdtemp(prefix="fabric-sandbox-")
        try:
            Path(folder, "prog.py").write_text(code)
            os.chown(folder, uid, uid)
            os.chmod(folder, 0o700)
            return await self._run(folder, uid, stdin)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            self._uids.put_nowait(uid)

    async def _run(self, folder: str, uid: int, stdin: str) -> RunResult:
        spec = json.dumps({"python": self.python, "uid": uid, "limits": self.limits})
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            "unshare", "--net", "--mount", "--pid", "--fork", "--kill-child", os.path.realpath(sys.executable),
            "-I", LAUNCHER, spec,
            cwd=folder, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        limit = ""

        def kill(why: str) -> None:
            nonlocal limit
            limit = limit or why
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        async def read(stream: asyncio.StreamReader, cap: int, over: str) -> bytes:
            data = bytearray()
            while chunk := await stream.read(65536):
                data += chunk
                if len(data) > cap:
                    kill(over)
                    return bytes(data[:cap])
            return bytes(data)

        async def feed() -> None:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(stdin.encode())
                await proc.stdin.drain()
            proc.stdin.close()

        assert proc.stdout is not None and proc.stderr is not None
        work = asyncio.gather(
            feed(),
            read(proc.stdout, self.max_output_bytes, "output"),
            read(proc.stderr, self.max_output_bytes, "output"),
            proc.wait(),
        )
        try:
            _, out, err, _ = await asyncio.wait_for(asyncio.shield(work), self.wall_s)
        except TimeoutError:
            kill("wall-clock")
            _, out, err, _ = await work
        except BaseException:
            kill("cancelled")
            raise
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its group
        code = proc.returncode
        stderr = err.decode(errors="replace")
        if code == SETUP_FAILED and stderr.startswith("sandbox:"):
            raise internal(f"code sandbox: {stderr.strip()}", "SANDBOX_FAILED")
        if not limit and code in (128 + signal.SIGXCPU, 128 + signal.SIGKILL):
            limit = "cpu"  # the kernel's RLIMIT_CPU signals (nothing else here sends SIGKILL)
        return RunResult(
            None if limit else code, out.decode(errors="replace"), stderr, limit, time.monotonic() - started
        )


# ---- ROLL's local tester ------------------------------------------------------------------------------------------


def extract_code(response: str) -> str:
    """ROLL's extract_code_generation (LiveCodeBench's): the first fenced block defining a function, else the first
    fenced block, else the whole text; after </think> and <|begin_of_solution|>."""
    if "<|begin_of_solution|>" in response:
        response = response.split("<|begin_of_solution|>")[-1].strip()
    if "</think>" in response:
        response = response.split("</think>")[-1].strip()
    if "```" not in response:
        return response.strip()
    blocks = [code for _, code in re.findall(r"```([\w\+\#\-\.]*)\s*\n*(.*?)```", response, re.DOTALL)]
    blocks = blocks or re.findall(r"```(.*?)```", response, re.DOTALL)
    return next((b for b in blocks if "def " in b), blocks[0] if blocks else "")


def _test_runner(assert_code: str) -> str:
    """ROLL's runner for pytest-style cases: call every `def test_*` in order."""
    names = [line.strip().split("(")[0][4:] for line in assert_code.split("\n") if line.strip().startswith("def test_")]
    calls = "".join(f"    {name}()\n" for name in names)
    return f"\n\n# Test runner\ntry:\n{calls}    print('All tests passed!')\nexcept AssertionError as e:\n" + (
        "    print(f'Test failed: {e}')\n    exit(1)"
    )


def same_output(actual: str, expected: str) -> bool:
    return [line.rstrip() for line in actual.strip().splitlines()] == [
        line.rstrip() for line in expected.strip().splitlines()
    ]


CODE_CASES = ("assert", "pytest", "check_based", "text")  # cases with assert_code; any other case_type: stdin/stdout


def parse_tests(ground_truth: str) -> tuple[str, list]:
    """ground_truth -> (case_type, test_cases); FabricError (INVALID_ARGUMENT) says what is wrong."""
    try:
        spec = json.loads(ground_truth)
        cases = spec["test_cases"]
        if isinstance(cases, str):  # ROLL's data stores them JSON-encoded
            cases = json.loads(cases)
    except (ValueError, TypeError, KeyError):
        raise invalid("ground_truth", 'expected JSON {"case_type": "assert", "test_cases": [...]}') from None
    if not isinstance(cases, list) or not cases:
        raise invalid("ground_truth", "test_cases: expected a non-empty list")
    case_type = str(spec.get("case_type") or "")
    if case_type in CODE_CASES:
        if not all(isinstance(c, str) or isinstance(c, dict) and isinstance(c.get("assert_code"), str) for c in cases):
            raise invalid("ground_truth", f"{case_type} test cases need assert_code")
    elif str(spec.get("test_case_function") or "None") != "None":
        raise invalid("ground_truth", "call-based stdin/stdout tests (test_case_function) are not supported")
    elif not all(isinstance(c, dict) and "stdin" in c and "expected_stdout" in c for c in cases):
        raise invalid("ground_truth", "stdin/stdout test cases need stdin and expected_stdout")
    return case_type, cases


def _assert_code(case) -> str:
    return case["assert_code"] if isinstance(case, dict) else str(case)


class CodeSandboxScorer(Scorer):
    """ROLL's CodeSandboxRewardWorker (local tests) over SandboxRunner.

    Config keys: `timeout_s` (wall clock per program, 10), `cpu_s` (5), `memory_mb` (1024), `max_output_bytes`
    (1 MiB), `max_processes` (32), `num_workers` (programs at once, 2), `python` (the interpreter the programs
    run with, /usr/bin/python3: the sandbox's uid must be able to run it), `uid_base` (61000). ROLL's `use_local`
    must be true (or unset): ROLL's remote sandbox service is not called.
    """

    needs_ground_truth = True

    def __init__(self, config):
        super().__init__(config)
        if config.options.get("use_local", True) is not True:
            raise ConfigError(config.key("use_local"), "only true: the fabric runs the tests in its local sandbox")
        workers = config.get_int("num_workers", 2)
        self.runner = SandboxRunner(
            python=config.get_str("python", "/usr/bin/python3"),
            wall_s=config.get_float("timeout_s", 10.0, minimum=0.1),
            cpu_s=config.get_int("cpu_s", 5),
            memory_mb=config.get_int("memory_mb", 1024, minimum=64),
            max_output_bytes=config.get_int("max_output_bytes", 1 << 20),
            max_processes=config.get_int("max_processes", 32),
            slots=workers,
            uid_base=config.get_int("uid_base", 61000, minimum=1000),
        )
        self.model = "local code sandbox"
        self.device = f"cpu ({workers} programs at once)"

    async def start(self) -> None:
        why = self.runner.unusable()
        if why:
            raise ConfigError(self.config.key("worker_cls"), f"{why}; run the reward server as root")
        try:  # a first program, so that a sandbox that cannot work here stops the server, not every item
            result = await self.runner.run("print('ok')")
            detail = "" if result.stdout == "ok\n" else (result.stderr or result.limit).strip()[-200:]
        except FabricError as exc:
            detail = exc.message
        if detail:
            key = "python" if self.runner.python in detail else "worker_cls"
            raise ConfigError(self.config.key(key), f"the code sandbox cannot run a program here: {detail}")

    async def _score(self, item: ScoreItem) -> ScoreResult:
        case_type, cases = parse_tests(item.ground_truth)
        response = item.response
        if "<|begin_of_solution|>" in response:
            response = response.split("<|begin_of_solution|>")[-1].strip()
        if "</think>" in response:
            response = response.split("</think>")[-1].strip()
        code = "" if case_type == "text" else extract_code(response)
        runs: list[tuple[str, str, str | None]] = []  # (program, stdin, expected stdout or None)
        if case_type == "text":
            runs = [(_assert_code(c).replace("{response}", f"'''{response}'''"), "", None) for c in cases]
        elif case_type in ("assert", "pytest"):
            for case in cases:
                tests = _assert_code(case)
                runner = _test_runner(tests) if "def test_" in tests else ""
                runs.append((f"{BASE_IMPORTS}\n{code}\n{tests}{runner}", "", None))
        elif case_type == "check_based":
            first = cases[0] if isinstance(cases[0], dict) else {"assert_code": cases[0]}
            lines = [line for line in first["assert_code"].split("\n") if line != ""]
            solution = BASE_IMPORTS + first.get("import_prefix", "") + code
            check = f"\ncheck({first.get('entry_point', 'candidate')})"
            tail = [f"\n{lines[0]}\n{line}" for line in lines[1:]] or [f"\n{lines[0]}"]
            runs = [(solution + t + check, "", None) for t in tail]
        else:
            runs = [(BASE_IMPORTS + code, str(c["stdin"]), str(c["expected_stdout"])) for c in cases]
        passed = 0
        for index, (program, stdin, expected) in enumerate(runs):
            result = await self.runner.run(program, stdin)
            ok = result.passed and (expected is None or same_output(result.stdout, expected))
            if not ok:
                why = f"{result.limit} limit" if result.limit else _last_line(result.stderr) or "wrong output"
                return ScoreResult(0.0, f"test {index + 1}/{len(runs)} failed: {why}", correct=0.0)
            passed += 1
        return ScoreResult(1.0, f"{passed}/{len(runs)} tests passed", correct=1.0)

    async def score_batch(self, items: list[ScoreItem]) -> list[ScoreResult | BaseException]:
        return list(await asyncio.gather(*(self._score(item) for item in items), return_exceptions=True))


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""
