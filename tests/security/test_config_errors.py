"""Issue 21: a device_mapping that names a billion devices is a one-line ConfigError from `fabric check`, not a
MemoryError after the list is built."""

from __future__ import annotations

from fabric import cli
from tests.config.configs import MEGATRON, SEARCH


def test_a_huge_device_mapping_range_is_one_line_naming_the_key(capsys):
    code = cli.main(["check", "--config", str(MEGATRON), *SEARCH, "--role", "rollout",
                     "actor_infer.device_mapping=list(range(0,1000000000))"])  # fmt: skip
    out, err = capsys.readouterr()
    problems = [line for line in err.splitlines() if line.startswith("fabric: ")]
    assert code == 2 and out == "", (out, err)
    assert any("device_mapping" in line and "at most" in line for line in problems), err
