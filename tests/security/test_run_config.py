"""Issue 21: the config a run writes for its processes holds no secret from the environment and only its owner can
read it; the processes still resolve it (they inherit the environment)."""

from __future__ import annotations

import stat

from fabric.config import load_config
from fabric.config.loader import resolved
from fabric.run.launcher import save_run_config

SECRET = "tok-9f8e7d"


def test_the_run_config_keeps_env_secrets_out_and_is_owner_only(tmp_path, monkeypatch):
    monkeypatch.setenv("FABRIC_TEST_TOKEN", SECRET)
    source = tmp_path / "in.yaml"
    source.write_text("seed: 3\nsecurity:\n  token: ${oc.env:FABRIC_TEST_TOKEN}\nexp_name: run-${seed}\n")
    out = tmp_path / "config.yaml"
    out.write_text("old")
    out.chmod(0o644)  # an older file of the name: its mode must not survive
    save_run_config(load_config(source), out)
    text = out.read_text()
    assert SECRET not in text and "${oc.env:FABRIC_TEST_TOKEN}" in text
    assert "exp_name: run-3" in text  # everything else is resolved once, for every process
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert resolved(load_config(out), "security.token") == SECRET  # a process of the run still gets it
