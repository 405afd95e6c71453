"""The ground everything stands on: generated stubs, the protos' contract, the tiny model in both engines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_current():
    result = subprocess.run([sys.executable, "-m", "fabric.protogen", "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_buf_lint_standard_is_clean():
    buf = Path(sys.executable).parent / "buf"
    result = subprocess.run([str(buf), "lint"], cwd=ROOT / "protos", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_services_and_field_names_that_outside_tools_rely_on():
    from fabric.v1 import reward_pb2, rollout_pb2, trainer_pb2

    services = {
        "fabric.v1.RolloutService": (
            rollout_pb2,
            {
                "Generate",
                "GenerateBatch",
                "Abort",
                "UpdateWeights",
                "GetWeightsStatus",
                "Sleep",
                "WakeUp",
                "GetServerInfo",
            },
        ),
        "fabric.v1.RewardService": (reward_pb2, {"Score", "GetServerInfo"}),
        "fabric.v1.TrainerService": (
            trainer_pb2,
            {"GetStatus", "WatchMetrics", "Pause", "Resume", "SaveCheckpoint", "Stop"},
        ),
    }
    for full_name, (module, methods) in services.items():
        service = module.DESCRIPTOR.services_by_name[full_name.split(".")[-1]]
        assert service.full_name == full_name
        assert {m.name for m in service.methods} == methods
    generate = rollout_pb2.DESCRIPTOR.services_by_name["RolloutService"]
    gen = generate.methods_by_name["Generate"]
    assert gen.client_streaming and gen.server_streaming
    assert generate.methods_by_name["UpdateWeights"].client_streaming

    def fields(message):
        return set(message.DESCRIPTOR.fields_by_name)

    assert {"request_id", "prompt", "prompt_token_ids", "sampling"} <= fields(rollout_pb2.GenerateRequest)
    assert {
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "num_beams",
        "num_return_sequences",
        "seed",
        "logprobs",
    } <= fields(rollout_pb2.SamplingParams)
    assert {"request_id", "sample_index", "token_ids", "text", "logprobs", "finish_reason", "weight_version"} <= fields(
        rollout_pb2.GenerateResponse
    )
    assert {"request_id", "prompt", "response", "ground_truth", "reward_name"} <= fields(reward_pb2.ScoreRequest)
    assert {"request_id", "score"} <= fields(reward_pb2.ScoreResponse)


def test_tiny_model_is_deterministic_and_generates_in_transformers(tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fabric.models.tiny import make_tiny_model

    again = make_tiny_model(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (Path(tiny_model) / name).read_bytes() == (again / name).read_bytes(), name

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == 2
    ids = tokenizer("Add 3 and 4.\n", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == "Add 3 and 4.\n"  # the BPE round-trips the task text
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] > ids.shape[1]
    assert torch.all(out < model.config.vocab_size)
