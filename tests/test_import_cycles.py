"""tools/import_cycles.py (run by `make lint`): fabric/ has no import cycle, and the tool sees the ones hidden in a
function while it leaves out imports under `if TYPE_CHECKING:`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "import_cycles.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("import_cycles", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fabric_has_no_import_cycle():
    tool = load_tool()
    assert tool.cycles(tool.graph()) == []
    assert tool.main([]) == 0


def test_a_cycle_through_a_function_level_import_fails_and_one_under_type_checking_does_not(tmp_path, monkeypatch):
    package = tmp_path / "fabric"
    package.mkdir()
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from fabric import b\n",
        "b.py": "from fabric.a import f\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fabric import d\n",
        "d.py": "from fabric import c\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    tool = load_tool()
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    assert tool.cycles(tool.graph()) == [["fabric.a", "fabric.b"]]
    assert tool.main([]) == 1
