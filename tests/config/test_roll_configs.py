"""ROLL's configs load as written: Hydra defaults composed, the model from top-level `pretrain`, ROLL's keys sorted
into used / ignored (one warning line) / refused, interpolations resolved only where a process reads them, and
`fabric check` saying so before anything starts. Fast: the check functions and the CLI in-process."""

from __future__ import annotations

import pytest

from fabric import cli
from fabric.config import ConfigError, load_config, parse_device_mapping, resolved
from fabric.rollout.config import load_rollout_config
from fabric.run.check import check_config, resolved_for_processes
from tests.config.configs import AGENTIC, ENVS_FRAGMENT, FSDP2_VL, MEGATRON, SEARCH, dataset, load_roll, write


def megatron(tmp_path, tiny_model, *overrides):
    return load_roll(
        MEGATRON, [f"pretrain={tiny_model}", f"actor_train.data_args.file_name=[{dataset(tmp_path)}]", *overrides]
    )


def test_hydra_defaults_are_composed_as_hydra_does():
    cfg = load_roll(MEGATRON)
    assert cfg.deepspeed_zero2.zero_optimization.stage == 2  # from the fragment
    assert cfg.logging_steps == 5  # only in the fragment
    assert cfg.seed == 42  # the primary config wins (Hydra's default without `_self_`)
    assert "defaults" not in cfg and "hydra" not in cfg


def test_missing_defaults_file_names_the_key(tmp_path):
    path = write(tmp_path, "a/c.yaml", "defaults:\n  - ../config/nope@_here_\nseed: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, search_paths=[tmp_path / "config"])
    assert err.value.key == "defaults" and "nope" in str(err.value) and "\n" not in str(err.value)


def test_model_comes_from_top_level_pretrain(tmp_path):
    rc = load_rollout_config(load_roll(MEGATRON, ["pretrain=/models/qwen"]))
    assert rc.model == "/models/qwen" and rc.model_key == "pretrain"
    assert rc.sleep_level == 2 and "sleep_level" not in rc.strategy_config
    assert "VLLM_USE_V1" not in rc.strategy_config  # ROLL pops it: not a vLLM engine argument
    assert rc.device_mapping == [0] and rc.generating_args["max_new_tokens"] == 16


def test_whole_megatron_pipeline_checks_clean_with_one_warning_line(tmp_path, tiny_model):
    report = check_config(megatron(tmp_path, tiny_model), "all")  # vLLM engine arguments included
    assert report.ok, [str(e) for e in report.errors]
    assert [line.split(":")[0] for line in report.summary] == [
        "actor_infer", "rewards.math_rule", "rewards.crossthinkqa", "actor_train",
    ]  # fmt: skip
    assert "engine arguments OK" in report.summary[0] and "(from pretrain)" in report.summary[0]
    warning = report.warning()
    assert "\n" not in warning
    for key in ("reward_shift", "tracker_kwargs", "validation", "actor_infer.num_gpus_per_worker",
                "rewards.math_rule.world_size"):  # fmt: skip
        assert key in warning
    assert "reward_norm" not in warning.replace("reward_normal", "")  # null: not set, not listed
    for key in ("adv_estimator", "whiten_advantages", "difficulty_low_threshold", "max_len_mask", "entropy_loss_coef"):
        assert key not in warning  # the trainer's keys (fabric/trainer/algorithm_config.py)


def test_unset_env_and_now_in_unread_sections_do_not_stop_a_server():
    cfg = load_roll(MEGATRON, ["pretrain=/models/qwen"])
    for role in ("rollout", "reward"):
        assert check_config(cfg, role, engine=False).ok
    assert "${now:" not in str(resolved(cfg, "checkpoint_config"))  # resolvable when asked
    saved = resolved_for_processes(cfg)  # what `fabric run` hands its processes
    assert "tracker_kwargs" not in saved and saved.actor_infer.model_args.dtype == "fp32"


def test_unset_env_in_a_read_section_names_the_key(monkeypatch):
    monkeypatch.delenv("FABRIC_TEST_UNSET", raising=False)
    cfg = load_roll(MEGATRON, ["actor_infer.strategy_args.strategy_config.max_model_len=${oc.env:FABRIC_TEST_UNSET}"])
    report = check_config(cfg, "rollout", engine=False)
    (error,) = report.errors
    assert error.key == "actor_infer.strategy_args.strategy_config.max_model_len"
    assert "FABRIC_TEST_UNSET" in str(error) and "set the variable" in str(error)


def test_fsdp2_is_refused_for_training_but_its_actor_infer_serves(tmp_path, tiny_model):
    cfg = load_config(write(tmp_path, "vl.yaml", FSDP2_VL, model=tiny_model))
    rollout = check_config(cfg, "rollout", engine=False)
    assert rollout.ok, [str(e) for e in rollout.errors]
    rc = load_rollout_config(cfg)
    assert rc.device_mapping == [4, 5, 12, 13] and rc.include_stop_str_in_output is True
    assert rc.generating_args["stop"] == ["</answer>"]
    report = check_config(cfg, "all", engine=False, files=False)
    assert [e.key for e in report.errors] == ["actor_train.strategy_args.strategy_name"]
    assert "fsdp2_train" in str(report.errors[0]) and "megatron_train" in str(report.errors[0])


def test_sequence_length_gives_response_length(tmp_path, tiny_model):
    from fabric.trainer.config import pipeline_config

    cfg = load_config(
        write(tmp_path, "vl.yaml", FSDP2_VL, model=tiny_model),
        ["actor_train.strategy_args.strategy_name=megatron_train"],
    )
    assert pipeline_config(cfg).response_length == 32


def test_agentic_pipeline_is_refused_in_one_line_for_training_and_its_actor_infer_serves(tmp_path):
    write(tmp_path, "config/envs.yaml", ENVS_FRAGMENT)
    cfg = load_config(write(tmp_path, "agentic/agent.yaml", AGENTIC), search_paths=[tmp_path / "config"])
    assert cfg.custom_envs.FrozenLake.env_type == "frozen_lake"  # composed from the defaults list
    for role in ("train", "all"):
        errors = check_config(cfg, role, engine=False).errors
        assert len(errors) == 1 and "agentic pipelines are not supported" in str(errors[0])
        assert errors[0].key == "train_env_manager" and "fabric serve rollout" in str(errors[0])
    report = check_config(cfg, "rollout", engine=False)  # a role reads its own section
    assert report.ok, report.errors
    assert report.summary[0].startswith("actor_infer: vllm serving /models/Qwen2.5-0.5B-Instruct")


# ROLL's own pipeline keys, from its agentic, distillation, DPO and SFT example configs: never typos.
PIPELINE_KEYS = [
    ("single_prompt_agent_template", "agentic"), ("custom_env", "agentic"), ("next_step_template", "agentic"),
    ("student_pretrain", "distillation"), ("chosen_key", "DPO"), ("sft_train", "SFT"),
]  # fmt: skip


@pytest.mark.parametrize("key, pipeline", PIPELINE_KEYS, ids=[k for k, _ in PIPELINE_KEYS])
def test_other_pipelines_keys_are_known_and_refused_for_training_naming_the_pipeline(key, pipeline):
    cfg = load_roll(MEGATRON, ["pretrain=/models/qwen", f"{key}=x"])
    for role in ("rollout", "reward"):
        assert not check_config(cfg, role, engine=False, files=False).errors, f"{key} refused for {role}"
    for role in ("train", "all"):
        (error,) = check_config(cfg, role, engine=False, files=False).errors
        assert error.key == key and f"ROLL's {pipeline} pipeline" in str(error) and "unknown" not in str(error)


HOSTILE = [
    # typos inside sections: refused, not the default silently used
    ("actor_infer.infer_batch_sise=4", "actor_infer.infer_batch_sise", "did you mean 'infer_batch_size'?"),
    ("rewards.math_rule.infer_batch_sise=4", "rewards.math_rule.infer_batch_sise", "did you mean 'infer_batch_size'?"),
    ("rewards.crossthinkqa.reward_tpye=soft", "rewards.crossthinkqa.reward_tpye", "did you mean 'reward_type'?"),
    ("actor_infer.model_args.dtpye=bf16", "actor_infer.model_args.dtpye", "did you mean 'dtype'?"),
    ("max_step=3", "max_step", "did you mean 'max_steps'?"),
    ("zzqq_flux=3", "zzqq_flux", "not a ROLL pipeline key"),
    ("actor_infer.generating_args.max_new_tokens=-5", "actor_infer.generating_args.max_new_tokens", ">= 1"),
    ("actor_infer.generating_args.include_stop_str_in_output=maybe", "include_stop_str_in_output", "true or false"),
    ("actor_infer.device_mapping=__import__('os').system('true')", "actor_infer.device_mapping", "cannot parse"),
    # ROLL keys whose loss would change the result
    ("async_generation_ratio=-1", "async_generation_ratio", "must be >= 0"),  # mapped: async_training
    ("resume_from_checkpoint=/ckpt/step-100", "resume_from_checkpoint", "resuming is not supported"),
    ("use_topr_loss=true", "use_topr_loss", "TOPR"),
    ("actor_train.strategy_args.strategy_name=deepspeed_train", "actor_train.strategy_args.strategy_name", "megatron"),
    ("actor_infer.strategy_args.strategy_name=sglang", "actor_infer.strategy_args.strategy_name", "vllm"),
    ("actor_infer.strategy_args.strategy_config.distributed_executor_backend=ray",
     "strategy_config.distributed_executor_backend", "Ray executors are not supported"),
    ("actor_infer.strategy_args.strategy_config.VLLM_USE_V1=0", "strategy_config.VLLM_USE_V1", "V0 engine"),
    ("actor_infer.worker_cls=my.InferWorker", "actor_infer.worker_cls", "custom inference workers"),
    ("actor_infer.model_args.adapter_name_or_path=/lora", "actor_infer.model_args.adapter_name_or_path", "LoRA"),
    ("rewards.math_rule.query_filter_config.type=mean_filter", "rewards.math_rule.query_filter_config", "filtering"),
    ("rewards.det.worker_cls=roll.pipeline.rlvr.rewards.detection_reward_worker.DetectionRewardWorker",
     "rewards.det.worker_cls", "DetectionRewardWorker is not supported; supported: math_rule"),
    ("rewards.remote.worker_cls=roll.pipeline.rlvr.rewards.remote_reward_system_worker.RemoteRewardSystemWorker",
     "rewards.remote.worker_cls", "RemoteRewardSystemWorker is not supported"),
    ("rewards.judge.worker_cls=roll.pipeline.rlvr.rewards.llm_judge_reward_worker.LLMJudgeRewardWorker",
     "rewards.judge.judge_address", "fabric rollout servers serving the judge model"),
    ("rewards.crossthinkqa.reward_type=fuzzy", "rewards.crossthinkqa.reward_type", "loose, soft or strict"),
    ("actor_train.data_args.file_name=[a.jsonl,b.jsonl]", "actor_train.data_args.file_name", "one JSONL file"),
    ("train_env_manager.tags=[Sokoban]", "train_env_manager", "agentic pipelines are not supported"),
]  # fmt: skip


@pytest.mark.parametrize("override, key, words", HOSTILE, ids=[h[0].split("=")[0] for h in HOSTILE])
def test_hostile_config_is_refused_naming_the_key(tmp_path, override, key, words):
    cfg = load_roll(MEGATRON, ["pretrain=/models/qwen", override])
    report = check_config(cfg, "all", engine=False, files=False)
    assert report.errors, f"{override} was accepted"
    error = next((e for e in report.errors if key in e.key), None)
    assert error is not None, [str(e) for e in report.errors]
    assert words in str(error) and "\n" not in str(error) and len(str(error)) < 300, str(error)


@pytest.mark.parametrize(
    "text, ids",
    [("list(range(0,8))", list(range(8))), ("list([4,5,12,13])", [4, 5, 12, 13]), ("[0]", [0]), ("0,1", [0, 1]),
     ("list(range(2, 4))", [2, 3]), ([1, 2], [1, 2]), (None, [])],
)  # fmt: skip
def test_device_mapping_forms(text, ids):
    assert parse_device_mapping(text) == ids


@pytest.mark.parametrize("text", ["eval('1')", "list(x for x in 'ab')", "[True]", "[-1]", "list(range(a))"])
def test_device_mapping_never_evaluates_code(text):
    with pytest.raises(ConfigError, match="cannot parse"):
        parse_device_mapping(text)


# ---- the CLI, in-process --------------------------------------------------------------------------------------


def test_cli_check_ok_prints_one_line_per_section(tmp_path, tiny_model, capsys):
    code = cli.main(["check", "--config", str(MEGATRON), *SEARCH, "--role", "rollout", f"pretrain={tiny_model}"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("actor_infer: vllm serving") and lines[-1].startswith("OK:")
    assert err.count("warning:") == 1 and len([line for line in err.splitlines() if line.strip()]) == 1


def test_cli_check_bad_prints_one_line_per_problem_and_exits_2(capsys):
    bad = ["actor_infer.infer_batch_sise=4", "rewards.math_rule.batch_wait_ms=soon", "max_step=1"]
    code = cli.main(["check", "--config", str(MEGATRON), *SEARCH, "--role", "all", "pretrain=/nonexistent", *bad])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    problems = [line for line in err.splitlines() if line.startswith("fabric: ")]
    keys = ["'max_step'", "'actor_infer.infer_batch_sise'", "'rewards.math_rule.batch_wait_ms'"]
    for key in keys:
        assert sum(key in line for line in problems) == 1, problems


def test_serve_and_train_check_before_starting_anything(tmp_path, capsys):
    # A bad key exits 2 before the server or trainer module is even imported (so before any engine starts).
    for argv in (["serve", "rollout", "--config", str(MEGATRON), *SEARCH, "actor_infer.infer_batch_sise=4"],
                 ["serve", "reward", "--config", str(MEGATRON), *SEARCH, "rewards.math_rule.infer_batch_sise=4"],
                 ["train", "--config", str(MEGATRON), *SEARCH, "use_topr_loss=true"]):  # fmt: skip
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fabric: config key"), err


def test_run_refuses_bad_max_new_tokens_before_starting_servers(tmp_path, tiny_model, capsys):
    argv = ["run", "--config", str(MEGATRON), *SEARCH, f"pretrain={tiny_model}", f"output_dir={tmp_path}/out",
            f"actor_train.data_args.file_name=[{dataset(tmp_path)}]",
            "actor_infer.generating_args.max_new_tokens=-5"]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "actor_infer.generating_args.max_new_tokens" in err
    assert not (tmp_path / "out" / "logs" / "rollout-0.log").exists()


# ---- ROLL's CrossThinkQA rule, as its worker scores -------------------------------------------------------------


@pytest.mark.parametrize(
    "response, truth, kind, expected",
    [("<think>A or B?</think>\n\\boxed{B}", "B", "soft", (1.0, True, True)),
     ("the answer is B", "B", "soft", (0.5, True, False)),
     ("\\boxed{C}", "B", "soft", (-0.5, False, True)),
     ("no idea", "B", "soft", (-1.0, False, False)),
     ("the answer is B", "B", "strict", (-1.0, True, False)),
     ("\\boxed{C}", "B", "loose", (-1.0, False, True))],
)  # fmt: skip
def test_crossthinkqa_rule(response, truth, kind, expected):
    from fabric.reward.rules import crossthinkqa_reward

    assert crossthinkqa_reward(response, truth, kind) == expected
