"""Preparing what the embedded default needs before any process starts: the tiny model and the toy task's data.

A config asks for it with a `task` section:
```yaml
task: {name: arithmetic, model_dir: ${output_dir}/base_model, dataset: ${output_dir}/data/train.jsonl}
```
Both are built offline and deterministically, and only when missing, so a second run starts at once.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from fabric.config import ConfigError

TASKS = ("arithmetic", "multi_domain")


def prepare_task(cfg: DictConfig, log=print) -> None:
    task = cfg.get("task")
    if not task:
        return
    name = task.get("name", "arithmetic")
    if name not in TASKS:
        raise ConfigError("task.name", f"unknown task '{name}'; known: {', '.join(TASKS)}")
    model_dir = Path(str(task.get("model_dir") or ""))
    if not str(model_dir) or str(model_dir) == ".":
        raise ConfigError("task.model_dir", "where to build the tiny model (e.g. ${output_dir}/base_model)")
    if not (model_dir / "config.json").exists():
        from fabric.models.tiny import make_tiny_model

        log(f"building the tiny model in {model_dir}")
        make_tiny_model(model_dir, seed=int(task.get("seed", 0)))
    dataset = task.get("dataset")
    if dataset and not Path(dataset).exists():
        from fabric.tasks import arithmetic, multi_domain

        log(f"writing the {name} dataset to {dataset}")
        if name == "multi_domain":
            multi_domain.write_dataset(dataset, seed=int(task.get("seed", 0)), per_domain=task.get("per_domain", 8))
        else:
            arithmetic.write_dataset(dataset, seed=int(task.get("seed", 0)), max_operand=task.get("max_operand"))
