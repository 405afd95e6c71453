"""The megatron-core side of the trainer (imported module by module: megatron takes seconds to import).

compat.py   init_megatron(); CPU redirections for megatron's few CUDA-only calls (only without CUDA)
convert.py  HF <-> megatron tensor layouts as functions of (tp_rank, tp_size): qkv per query group, fused fc1
model.py    build_gpt_model(hf_config), load_hf_into_megatron, iter_hf_weights, export_hf_state_dict,
            save_hf_checkpoint
losses.py   token logprobs, GRPO advantages, clipped policy-gradient loss with KL, masked means
policy.py   Policy (model + AdamW): logprobs, train_step, sft_step, hf_weights, save; TrainBatch
sft.py      sft_warmup and a greedy-decoding evaluator (transformers)
"""
