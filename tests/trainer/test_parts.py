"""The trainer's loop is in parts a reader can name (issue 22): each part takes its own small settings, never the
whole pipeline config, and none imports the loop (or the settings that read the config) back."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fabric.trainer

PARTS = ["rollout_stream", "scoring", "step", "sync"]
FORBIDDEN = {"fabric.trainer.loop", "fabric.trainer.settings", "fabric.trainer.config"}


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


@pytest.mark.parametrize("part", PARTS)
def test_a_part_of_the_loop_imports_neither_the_loop_nor_the_pipeline_config(part):
    path = Path(fabric.trainer.__file__).with_name(f"{part}.py")
    assert not imported_modules(path) & FORBIDDEN
