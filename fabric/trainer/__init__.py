"""The trainer: the megatron-core side (imported module by module: megatron takes seconds to import) and the loop.

compat.py          init_megatron(); CPU redirections for megatron's few CUDA-only calls (only without CUDA)
convert.py         HF <-> megatron tensor layouts as functions of (tp_rank, tp_size): qkv per query group, fused fc1
model.py           build_gpt_model(hf_config), load_hf_into_megatron, iter_hf_weights, export_hf_state_dict,
                   save_hf_checkpoint
losses.py          token logprobs, reward normalization, KL estimators, ROLL's loss aggregations, the clipped
                   policy loss
algorithm.py       scored samples -> per-token advantages as ROLL's pipeline computes them; KL controller; LR schedule
policy.py          Policy (model + AdamW on fp32 main params): logprobs, train_step, sft_step, hf_weights, save
sft.py             sft_warmup and a greedy-decoding evaluator (transformers)
data.py            the dataset (JSONL)
loop.py            Trainer: the RL loop, composing the parts below, and its controls (pause, resume, stop)
rollout_stream.py  the run's Generate stream: producer (max_staleness), partial rollouts, staleness filter
scoring.py         each sample's rewards, scored as it arrives
step.py            one training step on a scored batch: advantages, off-policy weights, mini-batches
sync.py            the weight push, servers taken out of routing and re-admitted
colocate.py        rollout servers asleep while the trainer trains (colocation)
settings.py        each part's settings, from the pipeline config
servicer.py        fabric.v1.TrainerService over a Trainer
server.py          `fabric train`: the composition root
"""
