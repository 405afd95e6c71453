"""The worker's replayed copy plan (fabric.rollout.vllm.copy_plan): recorded from a load_weights made of vLLM-style
weight loaders (stacked q/k/v shards narrowed into one parameter, a plain copy, a tied head), replayed over another
staging buffer of the same layout, it leaves the parameters exactly as load_weights does; loaders that convert or
compute on the way give no plan."""

from __future__ import annotations

import functools

import torch

from fabric.rollout.vllm import copy_plan
from fabric.weights.staging import layout, tensor_views

SPECS = [("q", torch.float32, (4, 3)), ("k", torch.float32, (2, 3)), ("v", torch.float32, (2, 3)),
         ("norm", torch.float32, (3,)), ("embed", torch.float32, (5, 3))]  # fmt: skip


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Parameter(torch.zeros(8, 3))
        self.norm = torch.nn.Parameter(torch.zeros(3))
        self.embed = torch.nn.Parameter(torch.zeros(6, 3))  # padded vocabulary: one row more than the checkpoint

    def load_weights(self, weights, convert=False, add=False):
        offsets = {"q": (0, 4), "k": (4, 2), "v": (6, 2)}
        for name, tensor in weights:
            if name in offsets:  # a stacked parameter: each shard narrowed into place
                start, rows = offsets[name]
                self.qkv.data.narrow(0, start, rows).copy_(tensor.double() if convert else tensor)
            elif name == "norm":
                self.norm.data.copy_(tensor)
                if add:
                    self.norm.data.add_(1.0)
            else:  # vLLM's VocabParallelEmbedding: the checkpoint's rows, then the padding zeroed
                self.embed.data[: tensor.shape[0]].copy_(tensor)
                self.embed.data[tensor.shape[0] :].fill_(0)


def staged(seed: int) -> tuple[torch.Tensor, list]:
    slots, size = layout(SPECS)
    flat = torch.zeros(size, dtype=torch.uint8)
    generator = torch.Generator().manual_seed(seed)
    entries = []
    for slot in slots:
        values = torch.randn(slot.shape, generator=generator, dtype=slot.dtype)
        flat[slot.offset : slot.offset + slot.nbytes] = values.reshape(-1).view(torch.uint8)
        entries.append([slot.name, "float32", list(slot.shape), slot.offset])
    return flat, entries


def loaded(flat, entries, **kwargs) -> dict:
    model = Toy()
    model.load_weights(tensor_views(flat, entries), **kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_recorded_plan_replayed_over_the_next_buffer_equals_load_weights():
    model = Toy()
    first, entries = staged(0)
    plan = copy_plan.record(lambda: model.load_weights(tensor_views(first, entries)), first, model.parameters())
    assert plan is not None and len(plan) == 6
    assert all(torch.equal(v, loaded(first, entries)[k]) for k, v in model.state_dict().items())
    second, _ = staged(1)  # another buffer (the server alternates two), same layout
    model.embed.data.fill_(7.0)  # the padding row must come back to 0
    plan.replay(second)
    want = loaded(second, entries)
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    assert not torch.equal(want["qkv"], loaded(first, entries)["qkv"])


def test_loaders_that_convert_or_compute_give_no_plan():
    for kwargs in ({"convert": True}, {"add": True}):
        model = Toy()
        flat, entries = staged(0)
        load = functools.partial(model.load_weights, tensor_views(flat, entries), **kwargs)
        assert copy_plan.record(load, flat, model.parameters()) is None
        assert torch.equal(model.state_dict()["qkv"], loaded(flat, entries, **kwargs)["qkv"])  # loaded all the same
