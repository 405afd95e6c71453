"""FABRIC_TRAINER_COMPILE=layers: each decoder layer one torch.compile'd graph (inductor on CPU here), the same
numbers as the eager layers in fp32, one graph shared by the layers and no recompile on a new sequence length.

Compiling the tiny model's layer takes about 30 s on 2 cores: one compiled Policy for the module, micro-batches of
two rows (a micro-batch of one row would compile again: torch specializes sizes 0 and 1)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from fabric.config import ConfigError
from fabric.trainer import model
from fabric.trainer.config import compile_mode, resolve_compile_mode
from fabric.trainer.policy import Policy, TrainBatch
from tests.trainer.test_packing import _assert_same, _optim, _step

pytestmark = pytest.mark.slow


def _policy(tiny_model, torch_compile: str) -> Policy:
    net = model.build_gpt_model(tiny_model, torch_compile=torch_compile)
    model.load_hf_into_megatron(net, tiny_model)
    return Policy(net, tiny_model, _optim())


@pytest.fixture(scope="module")
def eager(megatron, tiny_model):
    return _policy(tiny_model, "off")


@pytest.fixture(scope="module")
def compiled(megatron, tiny_model):
    torch._dynamo.reset()  # nothing compiled by earlier tests counts
    counters.clear()
    return _policy(tiny_model, "layers")


def _batch(shapes, seed: int) -> TrainBatch:
    """Rows of the given (prompt, response) lengths, RL fields filled (ratios off 1: clipping takes part)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 300, (p,), generator=g).tolist() for p, _ in shapes]
    responses = [torch.randint(1, 300, (r,), generator=g).tolist() for _, r in shapes]
    batch = TrainBatch.from_token_lists(prompts, responses, pad_id=0)
    noise = torch.randn(batch.input_ids.shape, generator=g)
    batch.old_logprobs = -2.0 + 0.3 * noise * batch.attention_mask
    batch.ref_logprobs = -2.0 - 0.2 * noise.flip(0) * batch.attention_mask
    batch.advantages = torch.randn(len(shapes), generator=g)
    return batch


def _logprobs(policy: Policy, batch: TrainBatch, packed: bool) -> torch.Tensor:
    """Under grad and in train mode, as in a step (the graph compiled for training; no second compile)."""
    policy.model.train()
    lp = model.token_logprobs(policy.model, batch.input_ids, batch.attention_mask, packed=packed)
    policy.model.zero_grad(set_to_none=True)
    return lp.detach()


def test_compiled_layers_step_equals_eager_padded_and_packed(eager, compiled):
    assert compiled.model.compiled_layers and not compiled.packed  # compiled layers train padded micro-batches
    batch = _batch([(3, 9), (6, 2), (2, 14), (5, 6)], seed=0)  # micro-batches of 12 and 16 tokens, with padding
    padded = _step(compiled, batch, packed=False)
    # both layers ran one graph, whole (no graph break), compiled once for both micro-batch lengths
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    _assert_same(padded, _step(eager, batch, packed=False))
    torch.testing.assert_close(_logprobs(compiled, batch, False), _logprobs(eager, batch, False), rtol=1e-5, atol=1e-5)
    # packed micro-batches run the eager layers (thd: megatron's rotary and the SDPA loop per sequence)
    graphs = dict(counters["stats"])
    _assert_same(_step(compiled, batch, packed=True), _step(eager, batch, packed=True))
    torch.testing.assert_close(_logprobs(compiled, batch, True), _logprobs(eager, batch, True), rtol=1e-5, atol=1e-5)
    assert dict(counters["stats"]) == graphs


def test_compiled_layers_do_not_recompile_on_a_new_length(eager, compiled):
    _step(compiled, _batch([(3, 9), (6, 2), (2, 14), (5, 6)], seed=0), packed=False)  # compiled (or cached)
    frames = counters["frames"]["total"]
    longer = _batch([(7, 20), (4, 3), (9, 30), (2, 2)], seed=1)  # micro-batches of 27 and 39 tokens
    _assert_same(_step(compiled, longer, packed=False), _step(eager, longer, packed=False))
    assert counters["frames"]["total"] == frames  # no new frame compiled
    assert counters["stats"]["unique_graphs"] == 1


def test_compile_mode_is_validated(megatron, tiny_model, tmp_path, monkeypatch):
    from fabric.trainer.config import pipeline_config
    from tests.config.configs import MEGATRON, dataset, load_roll

    monkeypatch.setenv("FABRIC_TRAINER_COMPILE", "layers")  # the default when build_gpt_model is not told
    assert model.build_gpt_model(tiny_model).compiled_layers  # compiled lazily: at the first call
    assert not model.build_gpt_model(tiny_model, torch_compile="off").compiled_layers
    # The fused logprob passes follow the model's own setting (on CUDA only), not the environment: a bench or a user
    # may hold an eager and a compiled model in one process.
    monkeypatch.setenv("FABRIC_TRAINER_COMPILE", "off")
    layers = model.build_gpt_model(tiny_model, torch_compile="layers")
    assert model._compile_fusions(layers, "cuda") and not model._compile_fusions(layers, "cpu")
    assert not model._compile_fusions(model.build_gpt_model(tiny_model), "cuda")
    monkeypatch.setenv("FABRIC_TRAINER_COMPILE", "yes")  # fails at config load, before any process starts
    cfg = load_roll(MEGATRON, [f"pretrain={tiny_model}", f"actor_train.data_args.file_name=[{dataset(tmp_path)}]"])
    with pytest.raises(ConfigError, match="FABRIC_TRAINER_COMPILE.*'yes' is unknown; use auto, off, fusions or layers"):
        pipeline_config(cfg)

    assert [compile_mode(v) for v in ("0", "off", "1", "fusions", "layers", "Layers", "auto")] == [
        "off",
        "off",
        "fusions",
        "fusions",
        "layers",
        "layers",
        "auto",
    ]
    monkeypatch.delenv("FABRIC_TRAINER_COMPILE")
    assert compile_mode() == "auto"  # the default: compiled layers where they pay, eager elsewhere
    assert resolve_compile_mode("auto", "cuda", 1_500_000_000) == "layers"
    assert resolve_compile_mode("auto", "cuda", 5_000_000) == "off"  # a tiny model compiles longer than it trains
    assert resolve_compile_mode("auto", "cpu", 1_500_000_000) == "off"
    assert resolve_compile_mode("fusions", "cpu", 5) == "fusions"  # an explicit choice stands
    tiny = model.build_gpt_model(tiny_model)  # auto, on the CPU: eager
    assert tiny.torch_compile == "off" and not tiny.compiled_layers
    unknown = "FABRIC_TRAINER_COMPILE.*'layer' is unknown; use auto, off, fusions or layers"
    with pytest.raises(ConfigError, match=unknown):
        compile_mode("layer")
