"""ROLL-style rollout configs for the tiny model (tests and bench/generation.py)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def write_config(path: Path, model: str, **section) -> Path:
    """A ROLL-style config for the tiny model: the CPU-safe engine settings, plus `section` keys of actor_infer."""
    import yaml

    strategy_config = {
        "block_size": 32,
        "dtype": "float32",
        "max_model_len": 256,
        "enforce_eager": True,
        "gpu_memory_utilization": 0.3,
        **section.pop("strategy_config", {}),
    }
    actor_infer = {
        "model_args": {"model_name_or_path": model, "dtype": "fp32"},
        "generating_args": {"max_new_tokens": 16, "temperature": 1.0, "top_p": 1.0, "num_return_sequences": 1},
        "strategy_args": {"strategy_name": "vllm", "strategy_config": strategy_config},
        "device_mapping": "list(range(0,1))",
        "infer_batch_size": 8,
        **section,
    }
    path.write_text(yaml.safe_dump({"actor_infer": actor_infer}, sort_keys=False))
    return path
