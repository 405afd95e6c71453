"""Issue 21: a value of the wrong type anywhere the pipeline reads a number is a one-line ConfigError from
`fabric check` naming the key (it was an uncaught TypeError/ValueError), and a bad value that came from
`${oc.env:...}` is never printed (it may be a secret)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fabric import cli

DEFAULT = str(Path(__file__).resolve().parents[2] / "examples" / "default.yaml")


def problems(capsys, *overrides: str) -> list[str]:
    """`fabric check` of the trainer's config, in process: exit 2, nothing on stdout, the problem lines."""
    code = cli.main(["check", "--config", DEFAULT, "--role", "train", *overrides])
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (code, out, err)
    return [line for line in err.splitlines() if line.startswith("fabric: ")]


@pytest.mark.parametrize(
    "key",
    [
        "actor_infer.generating_args.max_new_tokens",  # was TypeError: '>' not supported between 'str' and 'int'
        "seed",  # the rest were ValueError: invalid literal for int() / could not convert string to float
        "save_steps",
        "cluster.num_rollout_servers",
        "cluster.trainer_port",
        "timeouts.generate_s",
        "weight_sync.chunk_mib",
        "sft_warmup.batch_size",
        "actor_train.max_tokens_per_microbatch_in_train",
        "async_training.importance_cap",
    ],
)
def test_a_non_numeric_value_is_one_line_naming_the_key(capsys, key):
    lines = problems(capsys, f"{key}=abc")
    assert len(lines) == 1 and lines[0].startswith(f"fabric: config key '{key}': must be "), lines
    assert lines[0].endswith(", got 'abc'"), lines


@pytest.mark.parametrize("key", ["actor_infer.generating_args.max_new_tokens", "max_steps", "seed"])
def test_a_bad_value_from_the_environment_is_not_echoed(capsys, monkeypatch, key):
    secret = "s3cr3t-token-value"
    monkeypatch.setenv("FABRIC_TEST_SECRET", secret)
    lines = problems(capsys, f"{key}=${{oc.env:FABRIC_TEST_SECRET}}")
    assert len(lines) == 1 and f"'{key}'" in lines[0], lines
    assert "(from the environment)" in lines[0] and secret not in lines[0], lines
