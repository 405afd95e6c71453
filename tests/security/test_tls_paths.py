"""Issue 21: with TLS on, a rollout server offers only the weight paths TLS covers (gRPC) unless the config lists
the others in `security.unprotected_weight_paths`. A real TLS RolloutService over the fake engine (which offers gloo,
as vLLM's does); GetWeightsStatus asked over TLS."""

from __future__ import annotations

import asyncio

import pytest
from omegaconf import OmegaConf

from fabric import security
from fabric.config.loader import ConfigError
from fabric.weights.sender import weights_status
from tests.rollout.test_servicer import fake_server
from tests.security.test_collective_auth import GlooEngine
from tests.test_security import make_ca, make_cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_cert(d, "ca", "server")
    return d


def tls_config(pki, **extra) -> security.SecurityConfig:
    section = {"tls_cert": str(pki / "server.pem"), "tls_key": str(pki / "server.key"), "tls_ca": str(pki / "ca.pem")}
    return security.SecurityConfig.from_cfg(OmegaConf.create({"security": {**section, **extra}}))


def offered(config: security.SecurityConfig) -> list[str]:
    async def go():
        async with fake_server(GlooEngine()) as (client, _, _engine):
            return [o.name for o in (await weights_status(client.address)).transports]

    saved = security.current()
    security.configure(config)
    try:
        return asyncio.run(go())
    finally:
        security.configure(saved)


def test_under_tls_only_paths_tls_covers_are_offered(pki):
    assert offered(security.SecurityConfig()) == ["gloo", "tcp", "grpc"]  # no TLS: everything
    assert offered(tls_config(pki)) == ["grpc"]
    assert offered(tls_config(pki, unprotected_weight_paths=["gloo"])) == ["gloo", "grpc"]


def test_unprotected_weight_paths_takes_only_known_paths(pki):
    with pytest.raises(ConfigError) as err:
        tls_config(pki, unprotected_weight_paths=["gloo", "ipc"])
    assert "security.unprotected_weight_paths" in str(err.value)
