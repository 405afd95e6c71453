"""The rollout config section and the engine-argument checks: a ROLL config loads as written; every bad one fails
with a ConfigError naming its key, before any vLLM engine starts."""

from __future__ import annotations

import pytest

from fabric import cli
from fabric.config import ConfigError, load_config
from fabric.rollout.config import load_rollout_config
from fabric.rollout.validation import check_generating_args, resolve_request
from fabric.v1 import rollout_pb2
from tests.rollout.configs import write_config

# ROLL's example block (reference/roll-vllm-backend.zh.txt), as written, with the values it interpolates.
ROLL_EXAMPLE = """
response_length: 512
num_return_sequences_in_group: 8
actor_infer:
  model_args:
    disable_gradient_checkpointing: true
    dtype: bf16
  generating_args:
    max_new_tokens: ${response_length}
    top_p: 0.99
    top_k: 100
    num_beams: 1
    temperature: 0.99
    num_return_sequences: ${num_return_sequences_in_group}
  strategy_args:
    strategy_name: vllm
    strategy_config:
      gpu_memory_utilization: 0.8
      block_size: 16
      max_model_len: 8000
  device_mapping: list(range(0,12))
  infer_batch_size: 1
"""


def roll_example(tmp_path, model: str = "/models/Qwen2.5-7B", overrides=()):
    path = tmp_path / "roll.yaml"
    path.write_text(ROLL_EXAMPLE)
    return load_rollout_config(load_config(path, [f"actor_infer.pretrain={model}", *overrides]))


def test_roll_example_loads_as_written(tmp_path):
    rc = roll_example(tmp_path)
    assert rc.model == "/models/Qwen2.5-7B" and rc.model_key == "actor_infer.pretrain"
    assert rc.dtype == "bfloat16"
    assert rc.strategy_config == {"gpu_memory_utilization": 0.8, "block_size": 16, "max_model_len": 8000}
    assert rc.device_mapping == list(range(12))
    assert rc.infer_batch_size == 1 and rc.sleep_level == 1
    assert rc.generating_args == {
        "max_new_tokens": 512, "top_p": 0.99, "top_k": 100, "num_beams": 1, "temperature": 0.99,
        "num_return_sequences": 8,
    }  # fmt: skip
    check_generating_args(rc.generating_args, rc.role)


def test_sleep_level_is_popped_and_model_name_or_path_wins(tmp_path):
    rc = roll_example(
        tmp_path,
        overrides=[
            "actor_infer.strategy_args.strategy_config.sleep_level=2",
            "actor_infer.model_args.model_name_or_path=/models/other",
        ],
    )
    assert rc.sleep_level == 2 and "sleep_level" not in rc.strategy_config
    assert rc.model == "/models/other" and rc.model_key == "actor_infer.model_args.model_name_or_path"


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("actor_infer.strategy_args.strategy_name=sglang", "actor_infer.strategy_args.strategy_name", "vllm"),
        ("actor_infer.strategy_args.strategy_config.sleep_level=3", "sleep_level", "1 or 2"),
        ("actor_infer.model_args.dtype=fp8", "actor_infer.model_args.dtype", "bf16"),
        ("actor_infer.infer_batch_size=0", "actor_infer.infer_batch_size", ">= 1"),
        ("actor_infer.generating_args.temprature=1.0", "actor_infer.generating_args.temprature", "temperature"),
        ("actor_infer.device_mapping=list(range(a))", "actor_infer.device_mapping", "list(range"),
    ],
)
def test_bad_section_names_the_key(tmp_path, override, key, words):
    with pytest.raises(ConfigError) as err:
        roll_example(tmp_path, overrides=[override])
    assert key in err.value.key and words in str(err.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("actor_infer.generating_args.top_p=1.5", "actor_infer.generating_args.top_p"),
        ("actor_infer.generating_args.num_beams=4", "actor_infer.generating_args.num_beams"),
        ("actor_infer.generating_args.temperature=-1", "actor_infer.generating_args.temperature"),
    ],
)
def test_bad_generating_args_name_the_key(tmp_path, override, key):
    rc = roll_example(tmp_path, overrides=[override])
    with pytest.raises(ConfigError) as err:
        check_generating_args(rc.generating_args, rc.role)
    assert err.value.key == key


def test_missing_model_names_the_key(tmp_path):
    path = tmp_path / "roll.yaml"
    path.write_text(ROLL_EXAMPLE)
    with pytest.raises(ConfigError) as err:
        load_rollout_config(load_config(path))
    assert err.value.key == "actor_infer.model_args.model_name_or_path"


@pytest.mark.parametrize(
    "override, key, words",
    [
        # The ROLL example's own block_size: fine on a GPU, refused by the CPU attention backend.
        ((), "strategy_config.block_size", "not supported"),
        (("actor_infer.strategy_args.strategy_config.blok_size=32",), "strategy_config.blok_size", "'block_size'"),
        (("actor_infer.strategy_args.strategy_config.gpu_memory_utilization=3",),
         "strategy_config.gpu_memory_utilization", "less than or equal to 1"),
        (("actor_infer.strategy_args.strategy_config.max_model_len=100000",), "strategy_config.max_model_len",
         "greater than the derived max_model_len"),
        (("actor_infer.strategy_args.strategy_config.dtype=float64",), "strategy_config.dtype", "float64"),
    ],
)  # fmt: skip
def test_engine_args_are_checked_before_the_engine_starts(tmp_path, tiny_model, override, key, words):
    from fabric.rollout.vllm.engine import VLLMEngine

    # The tiny model allows 512 positions, not the example's 8000 (a case of its own below).
    fits = "actor_infer.strategy_args.strategy_config.max_model_len=256"
    rc = roll_example(tmp_path, model=tiny_model, overrides=[fits, *override])
    with pytest.raises(ConfigError) as err:
        VLLMEngine(rc)
    assert err.value.key.endswith(key), err.value
    assert words in str(err.value)
    assert "\n" not in str(err.value)


def test_engine_args_pass_strategy_config_through(tmp_path, tiny_model):
    from fabric.rollout.vllm.engine import build_engine_args

    rc = roll_example(
        tmp_path, model=tiny_model, overrides=["actor_infer.strategy_args.strategy_config.kv_cache_dtype=auto"]
    )
    args = build_engine_args(rc)
    assert args["model"] == tiny_model and args["dtype"] == "bfloat16"  # model_args.dtype, as ROLL maps it
    assert args["block_size"] == 16 and args["kv_cache_dtype"] == "auto" and args["max_model_len"] == 8000
    assert args["weight_transfer_config"] == {"backend": "fabric_shm"}
    assert "sleep_level" not in args


def test_cli_bad_config_prints_one_line_and_exits_2(tmp_path, tiny_model, capsys):
    config = write_config(tmp_path / "bad.yaml", tiny_model, strategy_config={"block_size": 16})
    # The CLI's entry point in process (the config is refused before anything starts): a subprocess would spend
    # most of a minute importing vLLM again on a loaded 2-core host.
    code = cli.main(["serve", "rollout", "--config", str(config), "--port", "0"])
    stderr = capsys.readouterr().err
    assert code == 2
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("fabric: config key 'actor_infer.strategy_args.strategy_config.block_size'"), last
    assert "Traceback" not in stderr


# ---- request validation, without a server (the server tests check the same over gRPC) ----


def resolve(request, defaults=None, max_model_len=64):
    return resolve_request(request, defaults or {}, lambda text: list(text.encode()), 320, max_model_len)


def test_request_defaults_and_overrides():
    defaults = {"max_new_tokens": 8, "temperature": 0.5, "num_return_sequences": 4}
    sampling = rollout_pb2.SamplingParams(temperature=0.0, top_k=-1)
    ids, s = resolve(rollout_pb2.GenerateRequest(request_id="a", prompt="hi", sampling=sampling), defaults)
    assert ids == [104, 105]
    assert (s.max_new_tokens, s.temperature, s.num_return_sequences, s.top_k, s.logprobs) == (8, 0.0, 4, 0, True)
    # Unset everywhere: fill the context.
    _, s = resolve(rollout_pb2.GenerateRequest(request_id="a", prompt_token_ids=[1, 2, 3]))
    assert s.max_new_tokens == 61


def test_default_max_new_tokens_too_large_says_where_it_came_from():
    from fabric.errors import FabricError

    with pytest.raises(FabricError) as err:
        resolve(rollout_pb2.GenerateRequest(request_id="a", prompt="hi"), {"max_new_tokens": 100})
    assert err.value.field == "sampling.max_new_tokens" and "generating_args default" in err.value.message
    assert "at most 62" in err.value.message
