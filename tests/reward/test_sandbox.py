"""The code sandbox: hostile programs under its limits; ROLL's local tests through the served code_sandbox reward."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

import pytest

from fabric.reward.sandbox import SandboxRunner, extract_code
from tests.reward.test_server import score
from tests.servers import ROOT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the code sandbox needs root (it refuses to start)")
UID_BASE = 62000  # apart from the served scorer's uids, so that the process counts below see only these tests


def run(code: str, stdin: str = "", wall_s: float = 6.0, cpu_s: int = 2, **limits):
    runner = SandboxRunner(wall_s=wall_s, cpu_s=cpu_s, uid_base=UID_BASE, slots=1, **limits)
    return asyncio.run(runner.run(code, stdin))


def processes_of(uid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            status = (entry / "status").read_text()
        except (OSError, ValueError):
            continue
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        if int(uids[0]) == uid:
            pids.append(int(entry.name))
    return pids


def test_a_correct_program_runs_with_its_stdin_in_a_fresh_folder():
    result = run("import os, sys\nopen('out.txt', 'w').write('x')\nprint(sys.stdin.read().upper(), os.listdir('.'))",
                 stdin="hello")  # fmt: skip
    assert result.passed and result.stdout == "HELLO ['prog.py', 'out.txt']\n", result
    assert run("print(sorted(__import__('os').listdir('.')))").stdout == "['prog.py']\n"  # nothing left over


def test_a_failing_program_reports_its_error():
    result = run("assert 1 + 1 == 3, 'wrong sum'")
    assert not result.passed and result.returncode == 1 and not result.limit
    assert "AssertionError: wrong sum" in result.stderr


def test_an_infinite_loop_is_killed_at_its_cpu_or_wall_clock_limit():
    result = run("while True: pass", wall_s=4.0, cpu_s=1)
    assert not result.passed and result.limit in ("cpu", "wall-clock"), result
    assert result.wall_s < 6.0
    result = run("import time\ntime.sleep(60)", wall_s=2.0)  # no CPU used: the wall clock ends it
    assert result.limit == "wall-clock" and result.wall_s < 4.0


def test_a_fork_bomb_is_contained_and_leaves_no_process_behind():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run(bomb, wall_s=4.0, cpu_s=2, max_processes=16)
    assert not result.passed and result.limit in ("cpu", "wall-clock"), result
    assert processes_of(UID_BASE) == []
    # children that leave the process group die with the sandbox too (its PID namespace ends)
    escape = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')"
    assert run(escape).stdout == "parent done\n"
    assert processes_of(UID_BASE) == []


def test_a_10_gb_allocation_fails_inside_the_sandbox():
    result = run("x = bytearray(10 * 1024**3)\nprint('allocated')", memory_mb=512)
    assert not result.passed and "MemoryError" in result.stderr and "allocated" not in result.stdout


def test_writing_outside_its_folder_fails(tmp_path):
    targets = [ROOT / "sandbox-escape.txt", tmp_path / "escape.txt", Path("/tmp/sandbox-escape.txt"),
               Path("/var/tmp/sandbox-escape.txt"), Path("/dev/shm/sandbox-escape.txt")]  # fmt: skip
    for target in targets:
        result = run(f"open({str(target)!r}, 'w').write('x')\nprint('wrote')")
        assert not result.passed and "wrote" not in result.stdout, target
        assert "PermissionError" in result.stderr or "FileNotFoundError" in result.stderr, result.stderr
        assert not target.exists()


def test_opening_a_socket_fails_and_reaches_nothing():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)\nprint('connected')"
        result = run(code)
        assert not result.passed and "connected" not in result.stdout
        assert "Network is unreachable" in result.stderr, result.stderr
        with pytest.raises(TimeoutError):
            listener.accept()
    result = run("import socket\nsocket.getaddrinfo('pypi.org', 443)")
    assert not result.passed and "gaierror" in result.stderr


def test_output_past_its_limit_kills_the_program():
    result = run("while True:\n    print('x' * 1000)", max_output_bytes=10_000)
    assert result.limit == "output" and len(result.stdout) == 10_000


def test_code_is_extracted_as_roll_extracts_it():
    response = "<think>```python\nx = 1\n```</think>\n```python\nimport os\n```\n```python\ndef f():\n    return 1\n```"
    assert extract_code(response) == "def f():\n    return 1\n"
    assert extract_code("def g(): pass") == "def g(): pass"


# ---- through the served reward: ROLL's case types ----------------------------------------------------------------

ADD = "```python\ndef add(a, b):\n    return a + b\n```"
SUB = "```python\ndef add(a, b):\n    return a - b\n```"


def code_item(response: str, case_type: str, test_cases: list) -> dict:
    truth = json.dumps({"case_type": case_type, "test_cases": test_cases})
    return {"prompt": "Write add(a, b).", "response": response, "ground_truth": truth, "reward_name": "code"}


def test_served_code_reward_scores_right_and_wrong_programs_as_roll(rlvr_reward_server):
    asserts = [{"assert_code": "assert add(1, 2) == 3\nassert add(-1, 1) == 0"}]
    pytest_cases = [{"assert_code": "def test_add():\n    assert add(2, 2) == 4\n"}]
    check = [{"assert_code": "def check(candidate):\n    assert candidate(1, 1) == 2\n    assert candidate(0, 5) == 5",
              "entry_point": "add"}]  # fmt: skip
    io = [{"stdin": "2 3\n", "expected_stdout": "5\n"}, {"stdin": "10 -4\n", "expected_stdout": "6"}]
    io_program = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    text = [{"assert_code": "assert 'paris' in {response}.lower()"}]
    responses = score(rlvr_reward_server.address, [
        code_item(ADD, "assert", asserts), code_item(SUB, "assert", asserts),
        code_item(ADD, "pytest", pytest_cases), code_item(SUB, "pytest", pytest_cases),
        code_item(ADD, "check_based", check), code_item(SUB, "check_based", check),
        code_item(io_program, "", io), code_item(io_program.replace("a + b", "a * b"), "", io),
        code_item("The capital is Paris.", "text", text), code_item("It is Lyon.", "text", text),
        code_item("```python\nwhile True: pass\n```", "assert", asserts),
    ])  # fmt: skip
    assert [r.HasField("error") for r in responses] == [False] * 11, [r.error.message for r in responses]
    assert [r.score for r in responses] == [1.0, 0.0] * 5 + [0.0]
    assert "AssertionError" in responses[1].info and "limit" in responses[10].info


def test_served_code_reward_refuses_tests_it_cannot_read(rlvr_reward_server):
    bad = [
        {"prompt": "p", "response": ADD, "ground_truth": "assert add(1, 2) == 3", "reward_name": "code"},
        code_item(ADD, "assert", []),
        code_item(ADD, "assert", [{"stdin": "1"}]),
        code_item(ADD, "", []) | {"ground_truth": json.dumps({"test_cases": "[oops"})},  # not JSON inside
    ]
    responses = score(rlvr_reward_server.address, bad)
    assert [(r.error.code, r.error.field) for r in responses] == [(3, "ground_truth")] * 4
    assert "test_cases" in responses[1].error.message and "assert_code" in responses[2].error.message


def test_a_sandbox_that_cannot_run_the_interpreter_stops_the_scorer_naming_the_key(tmp_path):
    from fabric.config import ConfigError, load_config
    from fabric.reward.config import load_reward_configs
    from fabric.reward.scorer import build_scorer

    path = tmp_path / "c.yaml"
    path.write_text("rewards:\n  code: {worker_cls: code_sandbox, python: /no/such/python3}\n")
    scorer = build_scorer(load_reward_configs(load_config(path))["code"])
    with pytest.raises(ConfigError, match=r"rewards\.code\.python.*cannot run a program here.*/no/such/python3"):
        asyncio.run(scorer.start())
