"""The committed client code is what `buf generate` makes from protos/ today (nothing edited by hand, nothing stale)."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED_DIRS = ["clients/typescript/src/gen", "clients/cpp/gen", "clients/go/gen"]
PLUGINS = {
    "protoc-gen-es": ROOT / "clients/typescript/node_modules/.bin/protoc-gen-es",
    "protoc": Path("/usr/bin/protoc"),
    "grpc_cpp_plugin": Path("/usr/bin/grpc_cpp_plugin"),
    "protoc-gen-go": Path("/usr/bin/protoc-gen-go"),
    "protoc-gen-go-grpc": Path("/usr/bin/protoc-gen-go-grpc"),
}


def differing_files(fresh: Path, committed: Path) -> list[str]:
    """Paths (relative) that are missing on either side or differ in content."""
    out = []
    compared = filecmp.dircmp(fresh, committed)
    out += [f"{name} (not generated any more)" for name in compared.right_only]
    out += [f"{name} (missing)" for name in compared.left_only]
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, compared.common_files, shallow=False)
    out += mismatch + errors
    for sub in compared.common_dirs:
        out += [f"{sub}/{name}" for name in differing_files(fresh / sub, committed / sub)]
    return out


def test_generated_clients_are_current(tmp_path):
    missing = [name for name, path in PLUGINS.items() if not path.exists()]
    if missing or not shutil.which("node"):
        pytest.skip(f"code generators missing ({', '.join(missing) or 'node'}): run `make clients`")
    buf = Path(sys.executable).parent / "buf"
    result = subprocess.run(
        [str(buf), "generate", "protos", "--template", "clients/buf.gen.yaml", "-o", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    stale = [f"{d}/{name}" for d in GENERATED_DIRS for name in differing_files(tmp_path / d, ROOT / d)]
    assert not stale, f"generated clients are stale ({', '.join(stale)}): run `make clients-generate` and commit"
