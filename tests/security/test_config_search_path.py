"""Issue 21: a config's Hydra `defaults:` and `hydra.searchpath` load files only from the config's folder, unless
the user allows another folder with --config-search-path (ROLL's examples load ../config/...). Through
`fabric check`, in process."""

from __future__ import annotations

import pytest

from fabric import cli
from fabric.config import ConfigError, load_config
from tests.config.configs import write

OUTSIDE = "exp_name: from-outside\n"


def check(capsys, config, *args: str) -> tuple[int, list[str]]:
    code = cli.main(["check", "--config", str(config), "--role", "train", *args])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("fabric: ")]


def test_a_defaults_entry_outside_the_folder_is_refused_naming_the_flag(tmp_path, capsys):
    write(tmp_path, "outside/x.yaml", OUTSIDE)
    config = write(tmp_path, "cfg/main.yaml", "defaults:\n  - ../outside/x@_here_\n  - _self_\nseed: 1\n")
    code, lines = check(capsys, config)
    allow = f"--config-search-path {(tmp_path / 'outside').resolve()}"
    assert code == 2 and len(lines) == 1 and lines[0].startswith("fabric: config key 'defaults': "), lines
    assert "'../outside/x'" in lines[0] and lines[0].endswith(f"pass {allow} to allow that folder"), lines
    # Allowed by the flag, the file is composed (the check goes on to the trainer's own keys).
    code, lines = check(capsys, config, *allow.split())
    assert not any("'defaults'" in line for line in lines), lines
    assert load_config(config, search_paths=[tmp_path / "outside"]).exp_name == "from-outside"


@pytest.mark.parametrize(
    "fragment, entry",
    [
        ("defaults:\n  - ../../outside/x@_here_\n", "'../../outside/x'"),  # a fragment inside reaching out
        ("defaults:\n  - {../../outside: x}\n", "'../../outside/x'"),  # a group entry
    ],
)
def test_a_fragment_in_the_folder_cannot_reach_outside_either(tmp_path, fragment, entry):
    write(tmp_path, "outside/x.yaml", OUTSIDE)
    write(tmp_path, "cfg/parts/inner.yaml", fragment)
    config = write(tmp_path, "cfg/main.yaml", "defaults:\n  - parts/inner@_here_\nseed: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert err.value.key == "defaults" and entry in str(err.value) and "\n" not in str(err.value)


def test_a_symlink_in_the_folder_to_a_file_outside_is_refused(tmp_path):
    write(tmp_path, "outside/x.yaml", OUTSIDE)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "x.yaml").symlink_to(tmp_path / "outside" / "x.yaml")
    config = write(tmp_path, "cfg/main.yaml", "defaults:\n  - x@_here_\nseed: 1\n")
    with pytest.raises(ConfigError, match="--config-search-path"):
        load_config(config)


@pytest.mark.parametrize("entry", ["file://../outside", "pkg://fabric"])
def test_hydra_searchpath_outside_the_folder_is_refused(tmp_path, capsys, entry):
    write(tmp_path, "outside/x.yaml", OUTSIDE)
    config = write(tmp_path, "cfg/main.yaml", f"hydra:\n  searchpath: ['{entry}']\ndefaults:\n  - x@_here_\nseed: 1\n")
    code, lines = check(capsys, config)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("fabric: config key 'hydra.searchpath': "), lines
    assert entry in lines[0], lines
